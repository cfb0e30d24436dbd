//! Which words a reply asks the sender to text back: "Reply YES or CANCEL",
//! "Text STOP to unsubscribe", "To opt out, reply STOP". `check` uses it to
//! warn when an invited answer is a word the server takes before any flow
//! sees it (a customer following "Reply YES or CANCEL" is opted out).
//!
//! A heuristic over plain text, not a grammar: an invitation is a verb
//! (`reply`, `text`, `send`, `respond`, `answer`, `type`, `txt`, `enter`),
//! optionally `with`, `back`, `us` or `me`, then a list of answers joined by
//! `,`, `/`, `or` or `and`; each answer may be followed by its purpose, `to
//! …` or `for …`, up to the next answer. It knows nothing of consent lists.

use super::matcher::normalize;

/// One answer a reply invites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invitation {
    /// The answer, normalised (`cancel`).
    pub word: String,
    /// What the text says the answer is for, normalised: its own `to …` /
    /// `for …`, or, when it is the only answer invited, the rest of its
    /// sentence ("to opt out, reply stop" -> `to opt out`). Empty when
    /// nothing says.
    pub purpose: String,
}

const VERBS: &[&str] = &[
    "reply", "text", "send", "respond", "answer", "type", "txt", "enter",
];
/// Between the verb and the first answer: "reply back with YES", "text us STOP".
const FILLERS: &[&str] = &["with", "back", "us", "me", "just", "only"];
/// Words that cannot be an answer: after a verb they mean it is not an
/// invitation ("reply to this message", "send a photo").
const NOT_ANSWERS: &[&str] = &[
    "to", "for", "a", "an", "the", "this", "that", "your", "our", "if", "when", "by", "at", "in",
    "on", "and", "or", "it", "any", "anything", "here", "now", "us", "me", "with", "back", "you",
    "anytime", "below",
];

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    /// `,` or `/`: separates answers in a list.
    Sep,
}

/// The answers `text` invites, in order.
pub(crate) fn invitations(text: &str) -> Vec<Invitation> {
    let mut out = Vec::new();
    for sentence in text.split(['.', '!', '?', ';', '\n', '…', '。', '！', '？']) {
        let tokens = tokenize(sentence);
        let mut i = 0;
        while i < tokens.len() {
            let is_verb = matches!(&tokens[i], Token::Word(w) if VERBS.contains(&w.as_str()));
            i += 1;
            if !is_verb {
                continue;
            }
            let (found, next) = answers(&tokens, i);
            if found.len() == 1 && found[0].purpose.is_empty() {
                // "To opt out, reply STOP": the sentence says what it is for.
                let rest: Vec<&str> = tokens
                    .iter()
                    .filter_map(|t| match t {
                        Token::Word(w) if *w != found[0].word => Some(w.as_str()),
                        _ => None,
                    })
                    .collect();
                out.push(Invitation {
                    word: found[0].word.clone(),
                    purpose: rest.join(" "),
                });
            } else {
                out.extend(found);
            }
            i = next;
        }
    }
    out
}

/// The list of answers starting at `tokens[i]` (after a verb), and where it
/// ends.
fn answers(tokens: &[Token], mut i: usize) -> (Vec<Invitation>, usize) {
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => Some(w.as_str()),
        _ => None,
    };
    while word(i).is_some_and(|w| FILLERS.contains(&w)) {
        i += 1;
    }
    let mut found = Vec::new();
    while let Some(answer) = word(i).filter(|w| !NOT_ANSWERS.contains(w)) {
        i += 1;
        let mut purpose = Vec::new();
        if word(i).is_some_and(|w| w == "to" || w == "for") {
            while let Some(w) = word(i) {
                if w == "or" {
                    break;
                }
                purpose.push(w);
                i += 1;
            }
        }
        found.push(Invitation {
            word: answer.to_owned(),
            purpose: purpose.join(" "),
        });
        // A separator, `or` or `and` (in any combination) leads to the next
        // answer; anything else ends the list.
        let mut joined = false;
        while matches!(tokens.get(i), Some(Token::Sep))
            || word(i).is_some_and(|w| w == "or" || w == "and")
        {
            joined = true;
            i += 1;
        }
        if !joined {
            break;
        }
    }
    (found, i)
}

/// Words (normalised, so quotes and other punctuation around them are
/// gone) and the separators `,` and `/` between them.
fn tokenize(sentence: &str) -> Vec<Token> {
    let mut out = Vec::new();
    for piece in sentence.split_whitespace() {
        let parts: Vec<&str> = piece.split('/').collect();
        for (k, part) in parts.iter().enumerate() {
            if k > 0 {
                out.push(Token::Sep);
            }
            let w = normalize(part);
            if !w.is_empty() {
                out.push(Token::Word(w));
            }
            if part
                .trim_end_matches(['"', '\'', '”', '’', ')', '»'])
                .ends_with([',', '，', ':'])
            {
                out.push(Token::Sep);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<(String, String)> {
        invitations(text)
            .into_iter()
            .map(|i| (i.word, i.purpose))
            .collect()
    }

    fn w(word: &str, purpose: &str) -> (String, String) {
        (word.to_owned(), purpose.to_owned())
    }

    #[test]
    fn answer_lists_and_their_purposes() {
        assert_eq!(
            words("Your table for 2 is booked. Reply YES or CANCEL."),
            [w("yes", ""), w("cancel", "")]
        );
        assert_eq!(
            words("Reply YES to confirm, NO to reschedule, or STOP to opt out."),
            [
                w("yes", "to confirm"),
                w("no", "to reschedule"),
                w("stop", "to opt out")
            ]
        );
        assert_eq!(words("Reply \"Y\"/\"N\""), [w("y", ""), w("n", "")]);
        assert_eq!(
            words("Text STOP to stop receiving messages"),
            [w("stop", "to stop receiving messages")]
        );
        // A lone answer takes its sentence as purpose.
        assert_eq!(
            words("To unsubscribe, reply STOP. Thanks!"),
            [w("stop", "to unsubscribe reply")]
        );
        assert_eq!(
            words("Reply back with CANCEL to cancel your appointment"),
            [w("cancel", "to cancel your appointment")]
        );
    }

    #[test]
    fn prose_without_an_answer_list_invites_nothing() {
        assert!(words("Please reply to this message to cancel.").is_empty());
        assert!(words("We will text you when it is ready.").is_empty());
        assert!(words("Send a photo of the receipt").is_empty());
        assert!(words("Cancel anytime. Stop by our shop!").is_empty());
    }
}
