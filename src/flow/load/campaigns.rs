//! Campaign files: a top-level `campaigns:` mapping each campaign's name to
//! its `field`, optional `time_zone_field` and `events` (each a `when:`,
//! the flow to `start:` and `if_busy`); see "Campaigns" in
//! flows/README.md. Whether the flows exist and the field is known is
//! checked across files by `check_campaigns`.

use std::collections::BTreeSet;

use crate::flow::campaigns::{parse_when, Campaign, CampaignEvent, DEFAULT_ZONE_FIELD};
use crate::flow::model::{Diagnostic, SetInner, Severity, Target};
use crate::flow::template::is_ident;
use crate::flow::yaml::Node;

use super::{Cx, Doc};

impl Cx<'_> {
    pub(super) fn campaign_file(&mut self, root: &Node) -> Option<Doc> {
        let m = self.map(root, "a campaign file", &["campaigns", "description"])?;
        let (_, list) = m.get("campaigns")?;
        let entries = self.map(list, "`campaigns`", &[])?;
        let mut campaigns = Vec::new();
        for (name, (k, v)) in entries {
            if !is_ident(name) {
                self.err(
                    k.pos,
                    format!("campaign name `{name}` must be letters, digits and `_`"),
                );
                continue;
            }
            if let Some(c) = self.campaign(name, v) {
                campaigns.push(c);
            }
        }
        Some(Doc::Campaigns(campaigns))
    }

    fn campaign(&mut self, name: &str, node: &Node) -> Option<Campaign> {
        let what = format!("campaign `{name}`");
        let m = self.map(
            node,
            &what,
            &["field", "time_zone_field", "events", "description"],
        )?;
        let Some((_, field_node)) = m.get("field") else {
            self.err(node.pos, format!("{what} needs `field:` (the contact field holding the date)"));
            return None;
        };
        let field = self.ident(field_node, "`field`")?;
        let zone_field = match m.get("time_zone_field") {
            Some((_, v)) => self.ident(v, "`time_zone_field`")?,
            None => DEFAULT_ZONE_FIELD.to_owned(),
        };
        let Some((_, events_node)) = m.get("events") else {
            self.err(node.pos, format!("{what} needs `events:`"));
            return None;
        };
        let entries = self.map(events_node, "`events`", &[])?;
        if entries.is_empty() {
            self.err(events_node.pos, format!("{what} has no events"));
        }
        let mut events = Vec::new();
        for (ev, (k, v)) in entries {
            if !is_ident(ev) {
                self.err(k.pos, format!("event name `{ev}` must be letters, digits and `_`"));
                continue;
            }
            let Some(em) = self.map(v, "a campaign event", &["when", "start", "if_busy"]) else {
                continue;
            };
            let when = match em.get("when") {
                Some((_, w)) => {
                    let Some(text) = self.text(w, "`when`") else {
                        continue;
                    };
                    match parse_when(&text) {
                        Ok(when) => when,
                        Err(e) => {
                            self.err(w.pos, e);
                            continue;
                        }
                    }
                }
                None => {
                    self.err(v.pos, format!("event `{ev}` needs `when:` (like `1 day before at 10:00`)"));
                    continue;
                }
            };
            let Some(flow) = em.get("start").and_then(|(_, f)| self.step_name(f, "`start`")) else {
                if !em.contains_key("start") {
                    self.err(v.pos, format!("event `{ev}` needs `start:` (the flow it starts)"));
                }
                continue;
            };
            let interrupt = match em.get("if_busy") {
                None => true,
                Some((_, b)) => match self.text(b, "`if_busy`").as_deref() {
                    Some("interrupt") => true,
                    Some("skip") => false,
                    Some(other) => {
                        self.err(
                            b.pos,
                            format!("`if_busy` is `interrupt` or `skip`, not `{other}`"),
                        );
                        continue;
                    }
                    None => continue,
                },
            };
            events.push(CampaignEvent {
                name: ev.to_owned(),
                when,
                flow,
                interrupt,
            });
        }
        Some(Campaign {
            name: name.to_owned(),
            field,
            field_pos: field_node.pos,
            zone_field,
            events,
            file: self.file.clone(),
        })
    }
}

/// Across files: campaign names are unique, every event starts a flow of
/// the set, and when flows declare the fields given from outside
/// (`fields:`), a campaign's field is one of those or one a flow sets.
pub(super) fn check_campaigns(inner: &SetInner, diags: &mut Vec<Diagnostic>) {
    let mut err = |file: &std::path::Path, pos: crate::flow::model::Pos, message: String| {
        diags.push(Diagnostic {
            file: file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            severity: Severity::Error,
            message,
        })
    };
    let declared = inner.flows.values().any(|f| !f.fields.is_empty());
    let known = super::super::check::contact_fields(inner);
    let mut names = BTreeSet::new();
    for c in &inner.campaigns {
        if !names.insert(c.name.as_str()) {
            err(&c.file, c.field_pos, format!("campaign `{}` is defined twice", c.name));
        }
        if declared {
            if let Some(known) = &known {
                if !known.contains(c.field.as_str()) {
                    err(
                        &c.file,
                        c.field_pos,
                        format!(
                            "campaign `{}`: contact field `{}` is not declared in any flow's `fields:` nor set by one",
                            c.name, c.field
                        ),
                    );
                }
            }
        }
        for e in &c.events {
            let Target { name, pos } = &e.flow;
            if !inner.flows.contains_key(name) {
                let known: Vec<&str> = inner.flows.keys().map(String::as_str).collect();
                err(
                    &c.file,
                    *pos,
                    format!(
                        "event `{}` starts unknown flow `{name}` (flows: {})",
                        e.name,
                        known.join(", ")
                    ),
                );
            }
        }
    }
}
