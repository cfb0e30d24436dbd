//! YAML text -> a small tree whose every node knows its line and column.
//!
//! The only module that knows a YAML parser (yaml-rust2's event API). We
//! build our own tree because validation must point at the exact key or
//! value that is wrong, and serde_yaml 0.9 exposes no spans. Scalars are kept
//! as the text written (no YAML 1.1 `yes`/`no` booleans, no numbers): the
//! schema in `load` decides what a value means where it appears.
//!
//! Hostile input is bounded here: nesting depth, node count including alias
//! expansion ("billion laughs"), and one document per file. The event
//! parser is iterative, so deep input cannot overflow the stack before our
//! depth check stops it.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::model::Pos;

/// Deeper than any sensible flow file (root > steps > step > wait > route >
/// set is six levels).
pub(crate) const MAX_DEPTH: usize = 32;
/// Nodes per file, counting every alias expansion.
pub(crate) const MAX_NODES: usize = 100_000;

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Kind {
    /// The text and whether it was written plain (unquoted): a plain empty
    /// or `~`/`null` scalar is YAML's null.
    Scalar(String, bool),
    Seq(Vec<Node>),
    /// Entries in file order (duplicates kept; `load` reports them).
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar(s, true) if matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// What kind of value this is, for error messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "nothing",
            Kind::Scalar(..) => "text",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// A syntax or limit error at a position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YamlError {
    pub pos: Pos,
    pub message: String,
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line().max(1),
        column: m.col() + 1,
    }
}

struct Frame {
    node: Node,
    anchor: usize,
    key: Option<Node>,
    /// Nodes inside, for the alias budget.
    size: usize,
    /// Levels below, for the depth limit on alias expansion.
    height: usize,
}

/// Parse one YAML document. `Ok(None)` for a file with no document.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    // Anchor id -> (node, size, height).
    let mut anchors: HashMap<usize, (Node, usize, usize)> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    let mut nodes = 0usize;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| YamlError {
            pos: pos(e.marker()),
            // The scanner has its own flow-nesting limit; say it our way.
            message: if e.info().contains("recursion limit") {
                format!("values nested more than {MAX_DEPTH} levels deep")
            } else {
                format!("invalid YAML: {}", e.info())
            },
        })?;
        let at = pos(&mark);
        let value = match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => continue,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        pos: at,
                        message: "only one YAML document per file (remove the second `---`)".into(),
                    });
                }
                continue;
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let node = Node {
                    pos: at,
                    kind: Kind::Scalar(text, style == TScalarStyle::Plain),
                };
                if anchor > 0 {
                    anchors.insert(anchor, (node.clone(), 1, 0));
                }
                (node, 1, 0)
            }
            Event::Alias(id) => {
                let Some((node, size, height)) = anchors.get(&id) else {
                    return Err(YamlError {
                        pos: at,
                        message: "alias refers to an unknown anchor".into(),
                    });
                };
                if stack.len() + height > MAX_DEPTH {
                    return Err(too_deep(at));
                }
                nodes = nodes.saturating_add(*size);
                if nodes > MAX_NODES {
                    return Err(YamlError {
                        pos: at,
                        message: format!(
                            "document expands to more than {MAX_NODES} values (too many aliases?)"
                        ),
                    });
                }
                let mut node = node.clone();
                // Point at the alias, not the anchor, when reporting it.
                node.pos = at;
                (node, *size, *height)
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(too_deep(at));
                }
                let kind = if matches!(event, Event::SequenceStart(..)) {
                    Kind::Seq(Vec::new())
                } else {
                    Kind::Map(Vec::new())
                };
                stack.push(Frame {
                    node: Node { pos: at, kind },
                    anchor,
                    key: None,
                    size: 1,
                    height: 1,
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(mut frame) = stack.pop() else {
                    continue;
                };
                // The parser marks a block mapping at its first `:`; point
                // at the first key instead, where a reader looks.
                if let Kind::Map(entries) = &frame.node.kind {
                    if let Some((k, _)) = entries.first() {
                        frame.node.pos = frame.node.pos.min(k.pos);
                    }
                }
                if frame.anchor > 0 {
                    anchors.insert(frame.anchor, (frame.node.clone(), frame.size, frame.height));
                }
                (frame.node, frame.size, frame.height)
            }
        };
        let (node, size, height) = value;
        nodes = nodes.saturating_add(1);
        if nodes > MAX_NODES {
            return Err(YamlError {
                pos: at,
                message: format!("document has more than {MAX_NODES} values"),
            });
        }
        match stack.last_mut() {
            Some(top) => {
                top.size = top.size.saturating_add(size);
                top.height = top.height.max(height + 1);
                match &mut top.node.kind {
                    Kind::Seq(items) => items.push(node),
                    Kind::Map(entries) => match top.key.take() {
                        Some(key) => entries.push((key, node)),
                        None => top.key = Some(node),
                    },
                    Kind::Scalar(..) => {}
                }
            }
            None => root = Some(node),
        }
    }
    Ok(root)
}

fn too_deep(at: Pos) -> YamlError {
    YamlError {
        pos: at,
        message: format!("values nested more than {MAX_DEPTH} levels deep"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  - x\n  - {c: d}\n").unwrap().unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!("map")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[0].1.pos, Pos { line: 1, column: 4 });
        let Kind::Seq(items) = &entries[1].1.kind else {
            panic!("seq")
        };
        assert_eq!(items[0].pos, Pos { line: 3, column: 5 });
        let Kind::Map(inner) = &items[1].kind else {
            panic!("map")
        };
        assert_eq!(inner[0].1.pos, Pos { line: 4, column: 9 });
    }

    #[test]
    fn scalars_keep_their_text() {
        let n = parse("- yes\n- 'no'\n- 007\n- ~\n").unwrap().unwrap();
        let Kind::Seq(items) = &n.kind else {
            panic!("seq")
        };
        assert_eq!(items[0].kind, Kind::Scalar("yes".into(), true));
        assert_eq!(items[1].kind, Kind::Scalar("no".into(), false));
        assert_eq!(items[2].kind, Kind::Scalar("007".into(), true));
        assert!(items[3].is_null());
    }

    #[test]
    fn billion_laughs_fails_fast() {
        let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            y.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&y).unwrap_err();
        assert!(err.message.contains("more than"), "{err:?}");
    }

    #[test]
    fn deep_nesting_fails_fast() {
        let y = "[".repeat(200_000);
        let err = parse(&y).unwrap_err();
        assert!(err.message.contains("nested"), "{err:?}");
        let tail: String = (1..100).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        let y: String = format!("a:\n{tail}");
        assert!(parse(&y).unwrap_err().message.contains("nested"));
    }

    #[test]
    fn deep_aliases_are_bounded() {
        // Each anchor nests the previous one a level deeper.
        let mut y = String::from("a0: &a0 [x]\n");
        for i in 1..60 {
            y.push_str(&format!("a{i}: &a{i} [[[*a{}]]]\n", i - 1));
        }
        assert!(parse(&y).is_err());
    }

    #[test]
    fn one_document_only() {
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert_eq!(parse("").unwrap(), None);
    }
}
