//! Consent keywords and the loop guard: the decisions taken before any flow
//! runs.
//!
//! Pure logic: it classifies a message (STOP / START / HELP class, honouring
//! Twilio's `OptOutType`) and counts replies per conversation in a sliding
//! window. The pipeline applies the decisions to the store. Knows nothing of
//! HTTP, sled or flows.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::flow::normalize;
use crate::store::ConvKey;

/// Keyword lists and help text; all configurable.
#[derive(Debug, Clone)]
pub struct ComplianceConfig {
    /// Whole-message keywords that opt the sender out.
    pub stop_keywords: Vec<String>,
    /// Keywords that opt back in. `YES` only counts while opted out, since
    /// it is also an ordinary answer to a yes/no question.
    pub start_keywords: Vec<String>,
    /// Keywords that ask for help (answered with `help_text`).
    pub help_keywords: Vec<String>,
    /// Reply to HELP-class keywords; `None` answers them with silence and
    /// leaves the help reply to Twilio.
    pub help_text: Option<String>,
}

/// Twilio's default opt-out keywords (Advanced Opt-Out docs, 2026).
pub const STOP_KEYWORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];
/// Twilio's default opt-in keywords.
pub const START_KEYWORDS: &[&str] = &["START", "YES", "UNSTOP"];
/// Twilio's default help keywords.
pub const HELP_KEYWORDS: &[&str] = &["HELP", "INFO"];

impl Default for ComplianceConfig {
    fn default() -> Self {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        ComplianceConfig {
            stop_keywords: v(STOP_KEYWORDS),
            start_keywords: v(START_KEYWORDS),
            help_keywords: v(HELP_KEYWORDS),
            help_text: None,
        }
    }
}

/// What a message means for consent, before any flow sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consent {
    /// Opt out; `cause` is the keyword or `OptOutType=STOP`.
    Stop {
        /// The keyword, or `OptOutType=STOP`.
        cause: String,
    },
    /// Opt back in (or confirm being in).
    Start {
        /// The keyword, or `OptOutType=START`.
        cause: String,
        /// True for words (such as `YES`) that only opt in a sender who is opted out.
        only_if_opted_out: bool,
    },
    /// A request for help; `twilio_answered` when `OptOutType=HELP` says
    /// Twilio already sent its help reply.
    Help {
        /// Twilio already sent its help reply.
        twilio_answered: bool,
    },
    /// An ordinary message.
    None,
}

impl ComplianceConfig {
    /// The same lists with every keyword normalised once, so `classify`
    /// compares strings instead of normalising each keyword per message.
    pub fn normalized(&self) -> ComplianceConfig {
        let norm = |l: &[String]| l.iter().map(|k| normalize(k)).collect();
        ComplianceConfig {
            stop_keywords: norm(&self.stop_keywords),
            start_keywords: norm(&self.start_keywords),
            help_keywords: norm(&self.help_keywords),
            help_text: self.help_text.clone(),
        }
    }

    /// Classify a message. The keyword lists must be normalised (as
    /// [`normalized`](Self::normalized) gives them; the pipeline does this
    /// once): the message is normalised once and compared as a string.
    pub fn classify(&self, body: &str, opt_out_type: Option<&str>) -> Consent {
        match opt_out_type
            .map(|t| t.trim().to_ascii_uppercase())
            .as_deref()
        {
            Some("STOP") => {
                return Consent::Stop {
                    cause: "OptOutType=STOP".into(),
                }
            }
            Some("START") => {
                return Consent::Start {
                    cause: "OptOutType=START".into(),
                    only_if_opted_out: false,
                }
            }
            Some("HELP") => {
                return Consent::Help {
                    twilio_answered: true,
                }
            }
            _ => {}
        }
        let word = normalize(body);
        fn find<'a>(list: &'a [String], word: &str) -> Option<&'a String> {
            list.iter().find(|k| k.as_str() == word)
        }
        let is = |list| find(list, &word);
        if word.is_empty() {
            return Consent::None;
        }
        if let Some(k) = is(&self.stop_keywords) {
            return Consent::Stop {
                cause: k.to_ascii_uppercase(),
            };
        }
        if let Some(k) = is(&self.start_keywords) {
            return Consent::Start {
                cause: k.to_ascii_uppercase(),
                only_if_opted_out: k.eq_ignore_ascii_case("YES"),
            };
        }
        if is(&self.help_keywords).is_some() {
            return Consent::Help {
                twilio_answered: false,
            };
        }
        Consent::None
    }
}

/// Counts the replies each conversation drew within the current window; a
/// sender past the limit (typically another auto-responder bouncing our
/// replies) gets silence until the window ends. In memory, 16 bytes per
/// recently answered conversation (a hash of the key, the window start and
/// a count): with 100,000 senders answered in one window that is about
/// 3 MiB. Windows are fixed (they start at a sender's first reply), so a
/// burst straddling two windows can draw up to twice the limit before the
/// guard closes. A restart forgets the counts, which only delays the guard
/// by one window.
pub(crate) struct LoopGuard {
    max_replies: u32,
    window_secs: i64,
    state: Mutex<GuardState>,
}

#[derive(Default)]
struct GuardState {
    /// hash of (To, From) -> (window start, replies in it)
    windows: HashMap<u64, (i64, u32)>,
    last_sweep: i64,
}

fn key_hash(key: &ConvKey) -> u64 {
    use std::hash::{Hash, Hasher};
    // The map lives in one process; a collision would only merge two
    // senders' counts (64-bit: not in practice).
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl LoopGuard {
    /// `max_replies == 0` disables the guard.
    pub fn new(max_replies: usize, window_secs: i64) -> Self {
        LoopGuard {
            max_replies: max_replies.min(u32::MAX as usize) as u32,
            window_secs: window_secs.max(1),
            state: Mutex::new(GuardState::default()),
        }
    }

    /// True when `key` has already drawn `max_replies` in its window.
    pub fn exceeded(&self, key: &ConvKey, now: i64) -> bool {
        if self.max_replies == 0 {
            return false;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.windows.get(&key_hash(key)) {
            Some((start, count)) => now < start + self.window_secs && *count >= self.max_replies,
            None => false,
        }
    }

    /// Note that `key` was answered with a reply at `now`.
    pub fn record(&self, key: &ConvKey, now: i64) {
        if self.max_replies == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window_secs;
        let entry = state.windows.entry(key_hash(key)).or_insert((now, 0));
        if now >= entry.0 + window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        // Drop finished windows now and then, so the map holds only
        // conversations answered within the last window or two.
        if now >= state.last_sweep + window {
            state.windows.retain(|_, (start, _)| now < *start + window);
            state.last_sweep = now;
        }
    }

    /// Drop finished windows (also done as replies are recorded).
    pub fn sweep(&self, now: i64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window_secs;
        state.windows.retain(|_, (start, _)| now < *start + window);
        state.last_sweep = now;
    }

    /// How many conversations the guard is tracking.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.windows.len())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_classes() {
        let c = ComplianceConfig::default().normalized();
        for k in [
            "STOP",
            "stop",
            " Stop. ",
            "stopall",
            "UNSUBSCRIBE",
            "cancel",
            "end",
            "quit",
            "revoke",
            "optout",
        ] {
            assert!(matches!(c.classify(k, None), Consent::Stop { .. }), "{k}");
        }
        assert_eq!(c.classify("stop please", None), Consent::None);
        assert!(matches!(
            c.classify("start", None),
            Consent::Start {
                only_if_opted_out: false,
                ..
            }
        ));
        assert!(matches!(
            c.classify("Yes", None),
            Consent::Start {
                only_if_opted_out: true,
                ..
            }
        ));
        assert!(matches!(c.classify("unstop", None), Consent::Start { .. }));
        assert_eq!(
            c.classify("help", None),
            Consent::Help {
                twilio_answered: false
            }
        );
        assert_eq!(
            c.classify("INFO", None),
            Consent::Help {
                twilio_answered: false
            }
        );
        assert_eq!(
            c.classify("anything", Some("HELP")),
            Consent::Help {
                twilio_answered: true
            }
        );
        assert!(matches!(
            c.classify("arret", Some("STOP")),
            Consent::Stop { .. }
        ));
        assert_eq!(c.classify("", None), Consent::None);
    }

    #[test]
    fn loop_guard_window() {
        let g = LoopGuard::new(3, 60);
        let k = ConvKey::new("a", "b");
        for t in 0..3 {
            assert!(!g.exceeded(&k, t));
            g.record(&k, t);
        }
        assert!(g.exceeded(&k, 10));
        assert!(g.exceeded(&k, 59));
        assert!(!g.exceeded(&k, 61));
        // Another sender is counted apart.
        assert!(!g.exceeded(&ConvKey::new("a", "c"), 10));
        g.sweep(1000);
        assert_eq!(g.tracked(), 0);
        assert!(!LoopGuard::new(0, 60).exceeded(&k, 0));
    }
}
