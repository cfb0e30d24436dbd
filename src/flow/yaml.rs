//! YAML text -> a small tree whose every node knows its line and column.
//!
//! The only module that knows a YAML parser (yaml-rust2's event API). We
//! build our own tree because validation must point at the exact key or
//! value that is wrong, and serde_yaml 0.9 exposes no spans. Scalars are kept
//! as the text written (no YAML 1.1 `yes`/`no` booleans, no numbers): the
//! schema in `load` decides what a value means where it appears.
//!
//! Hostile input is bounded here: nesting depth, node count and bytes
//! including alias expansion ("billion laughs"), and one document per file.
//! The event parser is iterative, so deep input cannot overflow the stack
//! before our depth check stops it.
//!
//! Aliases are why this module counts while it builds. An alias is a copy
//! of its anchored value, and yaml-rust2's own loader (`YamlLoader`) clones
//! that value at every alias before anyone can look at the result: a 309 KB
//! file that anchors one 300 KB string and aliases it a few thousand times
//! becomes gigabytes. So we take events from yaml-rust2's `Parser` and
//! build the tree ourselves, charging every value (an alias at the size of
//! everything it expands to) against [`MAX_NODES`] and
//! [`MAX_EXPANDED_BYTES`] *before* cloning it, and refuse the file at the
//! alias that would cross either budget. Everything the loader later does
//! with the tree (templates, messages, diagnostics) is at most linear in
//! it, so these two numbers bound the memory one flow file can cost.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::model::Pos;

/// Deeper than any sensible flow file (root > steps > step > wait > route >
/// set is six levels).
pub(crate) const MAX_DEPTH: usize = 32;
/// Nodes per file, counting every alias expansion.
pub(crate) const MAX_NODES: usize = 100_000;
/// Bytes the expanded tree of one file may hold: each value costs the size
/// of a [`Node`] plus its text, and an alias costs everything it expands
/// to. A file without aliases stays under it (1 MiB of text plus
/// [`MAX_NODES`] nodes is under 6 MiB), so only aliases can reach it.
pub(crate) const MAX_EXPANDED_BYTES: usize = 8 * 1024 * 1024;

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

/// What a value costs against the budgets, remembered with each anchor so
/// that an alias can be charged before it is copied.
#[derive(Clone, Copy)]
struct Cost {
    /// Nodes, itself included.
    nodes: usize,
    /// Bytes, as [`MAX_EXPANDED_BYTES`] counts them.
    bytes: usize,
    /// Levels below, for the depth limit on alias expansion.
    height: usize,
}

/// The budget charge of one node holding `text` (empty for collections).
fn node_bytes(text: &str) -> usize {
    std::mem::size_of::<Node>().saturating_add(text.len())
}

struct Frame {
    node: Node,
    anchor: usize,
    key: Option<Node>,
    /// Everything inside so far, for anchors.
    cost: Cost,
}

/// Parse one YAML document. `Ok(None)` for a file with no document.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    // Anchor id -> the anchored value and what it costs.
    let mut anchors: HashMap<usize, (Node, Cost)> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    // Totals for the whole file, every alias expansion included.
    let mut nodes = 0usize;
    let mut bytes = 0usize;
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
        let (node, cost) = match event {
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
                let cost = Cost {
                    nodes: 1,
                    bytes: node_bytes(&text),
                    height: 0,
                };
                charge(&mut nodes, &mut bytes, cost, at, false)?;
                let node = Node {
                    pos: at,
                    kind: Kind::Scalar(text, style == TScalarStyle::Plain),
                };
                if anchor > 0 {
                    anchors.insert(anchor, (node.clone(), cost));
                }
                (node, cost)
            }
            Event::Alias(id) => {
                let Some((node, cost)) = anchors.get(&id) else {
                    return Err(YamlError {
                        pos: at,
                        message: "alias refers to an unknown anchor".into(),
                    });
                };
                if stack.len() + cost.height > MAX_DEPTH {
                    return Err(too_deep(at));
                }
                // Charged before the copy is made: this is the check that
                // keeps a small file from expanding into a huge tree.
                charge(&mut nodes, &mut bytes, *cost, at, true)?;
                let mut node = node.clone();
                // Point at the alias, not the anchor, when reporting it.
                node.pos = at;
                (node, *cost)
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(too_deep(at));
                }
                let own = Cost {
                    nodes: 1,
                    bytes: node_bytes(""),
                    height: 1,
                };
                charge(&mut nodes, &mut bytes, own, at, false)?;
                let kind = if matches!(event, Event::SequenceStart(..)) {
                    Kind::Seq(Vec::new())
                } else {
                    Kind::Map(Vec::new())
                };
                stack.push(Frame {
                    node: Node { pos: at, kind },
                    anchor,
                    key: None,
                    cost: own,
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
                    anchors.insert(frame.anchor, (frame.node.clone(), frame.cost));
                }
                (frame.node, frame.cost)
            }
        };
        match stack.last_mut() {
            Some(top) => {
                top.cost.nodes = top.cost.nodes.saturating_add(cost.nodes);
                top.cost.bytes = top.cost.bytes.saturating_add(cost.bytes);
                top.cost.height = top.cost.height.max(cost.height + 1);
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

/// Adds `cost` to the file's totals, or refuses the value at `at` when
/// either budget would be exceeded.
fn charge(
    nodes: &mut usize,
    bytes: &mut usize,
    cost: Cost,
    at: Pos,
    alias: bool,
) -> Result<(), YamlError> {
    *nodes = nodes.saturating_add(cost.nodes);
    *bytes = bytes.saturating_add(cost.bytes);
    let over = if *nodes > MAX_NODES {
        format!("more than {MAX_NODES} values")
    } else if *bytes > MAX_EXPANDED_BYTES {
        format!("more than {} MiB", MAX_EXPANDED_BYTES >> 20)
    } else {
        return Ok(());
    };
    let message = if alias {
        format!("document expands to {over} (too many aliases?)")
    } else {
        format!("document has {over}")
    };
    Err(YamlError { pos: at, message })
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
    fn aliases_of_long_text_are_bounded_in_bytes() {
        // 300 KB of text, aliased 30 times: 9 MB expanded from a 300 KB file,
        // and only 32 values.
        let long = "x".repeat(300_000);
        let aliases = vec!["*a"; 30].join(", ");
        let y = format!("a: &a \"{long}\"\nb: [{aliases}]\n");
        let err = parse(&y).unwrap_err();
        assert!(err.message.contains("more than 8 MiB"), "{err:?}");
        assert!(err.message.contains("aliases"), "{err:?}");
        // At the alias that crossed the budget: the 27th, at 2:5 + 4 * 26.
        assert_eq!(
            err.pos,
            Pos {
                line: 2,
                column: 109
            }
        );

        // The same text aliased a few times is fine.
        let y = format!("a: &a \"{long}\"\nb: [*a, *a, *a]\n");
        assert!(parse(&y).is_ok());
    }

    #[test]
    fn billion_laughs_with_text_fails_on_bytes() {
        // Each level holds ten of the one before; level 0 is 10 KB of text,
        // so fewer than a thousand values reach the byte budget.
        let mut y = format!("l0: &l0 \"{}\"\n", "y".repeat(10_000));
        for i in 1..6 {
            let p = format!("*l{}", i - 1);
            y.push_str(&format!("l{i}: &l{i} [{}]\n", [p.as_str(); 10].join(", ")));
        }
        let err = parse(&y).unwrap_err();
        assert!(err.message.contains("more than 8 MiB"), "{err:?}");
        assert_eq!(err.pos.line, 4, "{err:?}");
    }

    #[test]
    fn files_without_aliases_never_reach_the_byte_budget() {
        let most = crate::flow::MAX_FILE_BYTES as usize + MAX_NODES * std::mem::size_of::<Node>();
        assert!(most < MAX_EXPANDED_BYTES, "{most}");
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
