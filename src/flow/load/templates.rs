//! Reply messages and the templates in them: `say:` in its three shapes,
//! `media:`, the length and segment checks, `{{var}}` templates and the
//! `{{= }}` Rhai expressions embedded in them, compiled with errors located
//! in the YAML file (see "Variables and templates" in flows/README.md).

use crate::flow::model::{Message, Pos};
use crate::flow::script::Expr;
use crate::flow::segments;
use crate::flow::template::Template;
use crate::flow::yaml::{Kind, Node};
use crate::twilio::limits::MAX_MEDIA;

use super::{Cx, MAX_MESSAGES, MAX_REPLY_CHARS};

/// Byte offset of a 1-based line and (character) column in `source`.
pub(super) fn byte_offset(source: &str, pos: Pos) -> usize {
    let mut start = 0;
    for _ in 1..pos.line {
        match source[start..].find('\n') {
            Some(i) => start += i + 1,
            None => return source.len(),
        }
    }
    source[start..]
        .char_indices()
        .nth(pos.column.saturating_sub(1))
        .map_or(source.len(), |(i, _)| start + i)
}

/// 1-based line and (character) column of a byte offset in `source`.
fn pos_at(source: &str, at: usize) -> Pos {
    let before = &source[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Pos {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

impl Cx<'_> {
    pub(super) fn template(&mut self, text: &str, pos: Pos) -> Option<Template> {
        let mut template = match Template::parse(text) {
            Ok(t) => t,
            Err(e) => {
                self.err(pos, e.to_string());
                return None;
            }
        };
        if template.has_exprs() {
            if let Some(why) = self.no_exprs {
                self.err(pos, why);
                return None;
            }
            let mut cursor = byte_offset(self.source, pos);
            let mut ok = true;
            for (src, slot) in template.exprs_mut() {
                *slot = self.expr(pos, src, &mut cursor);
                ok &= slot.is_some();
            }
            if !ok {
                return None;
            }
        }
        Some(template)
    }

    /// Compiles a Rhai expression written in the YAML value at `pos`.
    /// Errors point into this file: the expression text is looked up in the
    /// file from `*cursor` on (advanced past it, so that two expressions in
    /// one value get their own positions), which also gets quoted and block
    /// scalars right; when it is not found verbatim (YAML escapes), the
    /// value's own position is used.
    pub(super) fn expr(&mut self, pos: Pos, src: &str, cursor: &mut usize) -> Option<Expr> {
        /// How far past the value's start an expression is looked for.
        const WINDOW: usize = 64 * 1024;
        let first_line = src.lines().next().unwrap_or("");
        let from = (*cursor).min(self.source.len());
        let window = &self.source[from..self.source.len().min(from + WINDOW + src.len())];
        let at = match window.find(first_line) {
            Some(i) if !first_line.trim().is_empty() => {
                *cursor = from + i + first_line.len();
                pos_at(self.source, from + i)
            }
            _ => pos,
        };
        if let Some(expr) = self.compiled.exprs.get(src) {
            return Some(expr.relocated(at.line, at.column));
        }
        match self
            .env
            .sandbox
            .compile_expr(&self.file, at.line, at.column, src)
        {
            Ok(expr) => {
                self.env.compiled = true;
                self.compiled.exprs.insert(src.to_owned(), expr.clone());
                Some(expr)
            }
            Err(e) => {
                self.script_err(&e);
                None
            }
        }
    }

    /// One reply message from text; checks its length.
    fn message(&mut self, text: &str, media: Vec<String>, pos: Pos) -> Option<Message> {
        let template = self.template(text, pos)?;
        let literal = template.literal_text();
        let chars = literal.chars().count();
        if chars > MAX_REPLY_CHARS {
            self.err(
                pos,
                format!(
                    "reply is {chars} characters; SMS replies are limited to {MAX_REPLY_CHARS}"
                ),
            );
        } else {
            let seg = segments::count(&literal);
            if seg.count > 1 {
                let (one, enc) = (seg.encoding.single_segment(), seg.encoding.as_str());
                self.warn(
                    pos,
                    format!(
                        "reply needs {} SMS segments ({enc}, {} units; one segment holds {one})",
                        seg.count, seg.units
                    ),
                );
            }
        }
        Some(Message {
            text: template,
            media,
            pos,
        })
    }

    fn media(&mut self, node: &Node) -> Vec<String> {
        let mut out = Vec::new();
        for (url, pos) in self.texts(node, "`media`").unwrap_or_default() {
            if url.starts_with("https://") || url.starts_with("http://") {
                out.push(url);
            } else {
                self.err(pos, format!("media `{url}` must be an http(s) URL"));
            }
        }
        if out.len() > MAX_MEDIA {
            let most = format!("a message can carry at most {MAX_MEDIA} media URLs");
            self.err(node.pos, most);
        }
        out
    }

    /// `say:` -- text, a `{say, media}` mapping, or a list of either.
    pub(super) fn messages(&mut self, node: &Node, what: &str) -> Vec<Message> {
        let mut out = Vec::new();
        match &node.kind {
            _ if node.is_null() => {}
            Kind::Seq(items) => {
                for item in items {
                    if let Some(m) = self.one_message(item, what) {
                        out.push(m);
                    }
                }
            }
            _ => out.extend(self.one_message(node, what)),
        }
        if out.len() > MAX_MESSAGES {
            self.err(
                node.pos,
                format!(
                    "{what} sends {} messages; at most {MAX_MESSAGES} are allowed",
                    out.len()
                ),
            );
        }
        out
    }

    fn one_message(&mut self, node: &Node, what: &str) -> Option<Message> {
        match &node.kind {
            Kind::Map(_) => {
                let m = self.map(node, "a message", &["say", "media"])?;
                let media = m
                    .get("media")
                    .map(|(_, v)| self.media(v))
                    .unwrap_or_default();
                let text = match m.get("say") {
                    Some((_, v)) if v.is_null() => String::new(),
                    Some((_, v)) => self.text(v, "`say`")?,
                    None => String::new(),
                };
                if text.is_empty() && media.is_empty() {
                    self.err(node.pos, "a message needs `say` text or `media`");
                    return None;
                }
                let pos = m.get("say").map_or(node.pos, |(_, v)| v.pos);
                self.message(&text, media, pos)
            }
            _ => {
                let text = self.text(node, what)?;
                self.message(&text, Vec::new(), node.pos)
            }
        }
    }

    /// `say:` plus an optional `media:` attached to the last message.
    pub(super) fn say_with_media(
        &mut self,
        say: Option<&(&Node, &Node)>,
        media: Option<&(&Node, &Node)>,
        what: &str,
    ) -> Vec<Message> {
        let mut msgs = say.map(|(_, v)| self.messages(v, what)).unwrap_or_default();
        if let Some((k, v)) = media {
            let urls = self.media(v);
            match msgs.last_mut() {
                Some(last) => last.media.extend(urls),
                None => msgs.push(Message {
                    text: Template::literal(""),
                    media: urls,
                    pos: k.pos,
                }),
            }
        }
        msgs
    }
}
