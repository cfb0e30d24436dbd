//! `smsflow graph`: one flow's steps and routes as a Mermaid or Graphviz
//! DOT diagram, drawn from the flow's [`Outline`] (the flow model is not
//! read directly).

use std::collections::HashMap;

use crate::flow::{EdgeTarget, FlowSet, Outline};

/// `graph` was asked for a flow the set does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no flow named `{name}` (flows: {available})")]
pub struct UnknownFlow {
    /// The flow name asked for.
    pub name: String,
    /// The flows there are, comma-separated.
    pub available: String,
}

/// Longest step text shown in a diagram node, in characters.
const SAY_CHARS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Entry,
    /// A step that waits for a reply.
    Waiting,
    /// A step that passes straight on.
    Step,
    Flow,
    End,
    Silence,
    AsNew,
}

/// A diagram independent of its output syntax: built once from an
/// [`Outline`], rendered as Mermaid or DOT.
struct Graph {
    title: String,
    nodes: Vec<(String, Shape, Vec<String>)>,
    edges: Vec<(String, String, String, bool)>,
}

fn graph(set: &FlowSet, name: &str) -> Result<Graph, UnknownFlow> {
    let outline = set.outline(name).ok_or_else(|| UnknownFlow {
        name: name.to_owned(),
        available: set.flow_names().collect::<Vec<_>>().join(", "),
    })?;
    Ok(build_graph(&outline))
}

fn build_graph(o: &Outline) -> Graph {
    let mut ids = Ids::default();
    let mut g = Graph {
        title: o.flow.clone(),
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    let entry = if o.entries.is_empty() {
        vec!["no trigger".to_owned()]
    } else {
        o.entries.clone()
    };
    g.nodes.push(("entry".to_owned(), Shape::Entry, entry));
    g.edges.push((
        "entry".to_owned(),
        ids.get("step", &o.start),
        String::new(),
        false,
    ));
    for s in &o.steps {
        let mut label = vec![s.name.clone()];
        if let Some(say) = &s.say {
            label.push(truncate(say.lines().next().unwrap_or(""), SAY_CHARS));
        }
        let shape = if s.waits { Shape::Waiting } else { Shape::Step };
        g.nodes.push((ids.get("step", &s.name), shape, label));
    }
    // Targets outside the flow's steps get one node each, in first-use order.
    let mut extra = Vec::new();
    for s in &o.steps {
        let from = ids.get("step", &s.name);
        for e in &s.edges {
            let (to, shape, label) = match &e.to {
                EdgeTarget::Step(t) => (ids.get("step", t), None, String::new()),
                EdgeTarget::Flow(f) => {
                    (ids.get("flow", f), Some(Shape::Flow), format!("flow: {f}"))
                }
                EdgeTarget::End => ("finish".to_owned(), Some(Shape::End), "End".to_owned()),
                EdgeTarget::Silence(r) => (
                    ids.get("silence", r),
                    Some(Shape::Silence),
                    format!("silence: {r}"),
                ),
                EdgeTarget::AsNew => (
                    "as_new".to_owned(),
                    Some(Shape::AsNew),
                    "handled as a new message".to_owned(),
                ),
            };
            if let Some(shape) = shape {
                if !extra.iter().any(|(id, _, _)| *id == to) {
                    extra.push((to.clone(), shape, vec![label]));
                }
            }
            g.edges.push((from.clone(), to, e.label.clone(), e.retry));
        }
    }
    g.nodes.extend(extra);
    g
}

/// Node ids that are safe in Mermaid and DOT (`[A-Za-z0-9_]`, never the
/// Mermaid keyword `end`) and stay distinct when two names sanitise alike.
#[derive(Default)]
struct Ids {
    by_name: HashMap<(String, String), String>,
    taken: std::collections::HashSet<String>,
}

impl Ids {
    fn get(&mut self, kind: &str, name: &str) -> String {
        let key = (kind.to_owned(), name.to_owned());
        if let Some(id) = self.by_name.get(&key) {
            return id.clone();
        }
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut id = format!("{kind}_{clean}");
        let mut n = 2;
        while self.taken.contains(&id) {
            id = format!("{kind}_{clean}_{n}");
            n += 1;
        }
        self.taken.insert(id.clone());
        self.by_name.insert(key, id.clone());
        id
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// The Mermaid flowchart of flow `flow`: steps as nodes (name and the first
/// line of what they say; rounded when they wait for a reply), routes as
/// edges labelled by matcher, retries dashed, other flows as subroutine
/// boxes, and an entry node listing what starts the flow.
pub fn mermaid(set: &FlowSet, flow: &str) -> Result<String, UnknownFlow> {
    let g = graph(set, flow)?;
    let mut out = format!("---\ntitle: {}\n---\nflowchart TD\n", g.title);
    for (id, shape, label) in &g.nodes {
        let text = label
            .iter()
            .map(|l| mermaid_escape(l))
            .collect::<Vec<_>>()
            .join("<br/>");
        let (open, close) = match shape {
            Shape::Entry => ("([", "])"),
            Shape::Waiting => ("(", ")"),
            Shape::Step => ("[", "]"),
            Shape::Flow => ("[[", "]]"),
            Shape::End => ("((", "))"),
            Shape::Silence => (">", "]"),
            Shape::AsNew => ("[/", "/]"),
        };
        out.push_str(&format!("    {id}{open}\"{text}\"{close}\n"));
    }
    for (from, to, label, dashed) in &g.edges {
        let arrow = if *dashed { "-.->" } else { "-->" };
        if label.is_empty() {
            out.push_str(&format!("    {from} {arrow} {to}\n"));
        } else {
            out.push_str(&format!(
                "    {from} {arrow}|\"{}\"| {to}\n",
                mermaid_escape(label)
            ));
        }
    }
    Ok(out)
}

/// Mermaid's quoted text ends at `"` and reads `#name;` as an entity, and
/// labels are HTML (or Markdown): entity-encode what would break out.
fn mermaid_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '#' => out.push_str("#35;"),
            '"' => out.push_str("#quot;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '&' => out.push_str("#amp;"),
            // Ends an edge label even inside quotes in some Mermaid versions.
            '|' => out.push_str("#124;"),
            // GitHub renders node text as Markdown: keep `*` and backticks
            // literal (a regex like `\s*me\s*` would turn italic).
            '*' => out.push_str("#42;"),
            '`' => out.push_str("#96;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The same diagram as [`mermaid`], in Graphviz DOT.
pub fn dot(set: &FlowSet, flow: &str) -> Result<String, UnknownFlow> {
    let g = graph(set, flow)?;
    let mut out = format!(
        "digraph \"{}\" {{\n    node [shape=box, fontname=\"Helvetica\"];\n    edge [fontname=\"Helvetica\", fontsize=10];\n",
        dot_escape(&g.title)
    );
    for (id, shape, label) in &g.nodes {
        let text = label
            .iter()
            .map(|l| dot_escape(l))
            .collect::<Vec<_>>()
            .join("\\n");
        let attrs = match shape {
            Shape::Entry => "shape=oval, ",
            Shape::Waiting => "style=rounded, ",
            Shape::Step => "",
            Shape::Flow => "shape=component, ",
            Shape::End => "shape=doublecircle, ",
            Shape::Silence => "shape=cds, ",
            Shape::AsNew => "shape=parallelogram, ",
        };
        out.push_str(&format!("    {id} [{attrs}label=\"{text}\"];\n"));
    }
    for (from, to, label, dashed) in &g.edges {
        let mut attrs = Vec::new();
        if !label.is_empty() {
            attrs.push(format!("label=\"{}\"", dot_escape(label)));
        }
        if *dashed {
            attrs.push("style=dashed".to_owned());
        }
        if attrs.is_empty() {
            out.push_str(&format!("    {from} -> {to};\n"));
        } else {
            out.push_str(&format!("    {from} -> {to} [{}];\n", attrs.join(", ")));
        }
    }
    out.push_str("}\n");
    Ok(out)
}

fn dot_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_never_end() {
        let mut ids = Ids::default();
        assert_eq!(ids.get("step", "end"), "step_end");
        assert_eq!(ids.get("step", "a-b"), "step_a_b");
        assert_eq!(ids.get("step", "a_b"), "step_a_b_2");
        assert_eq!(ids.get("step", "a-b"), "step_a_b");
    }

    #[test]
    fn labels_cannot_break_out_of_quotes() {
        assert_eq!(
            mermaid_escape("say \"hi\" <b>#1|2*`"),
            "say #quot;hi#quot; #lt;b#gt;#35;1#124;2#42;#96;"
        );
        assert_eq!(dot_escape("a\"b\\c\nd"), "a\\\"b\\\\c d");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
