//! Campaign files: a top-level `campaigns:` mapping each campaign's name to
//! its `field`, optional `time_zone_field` and `events` (each a `when:`,
//! the flow to `start:` and `if_busy`); see "Campaigns" in
//! flows/README.md. Whether the flows exist and the field is known is
//! checked across files by `check_campaigns`.

use std::collections::BTreeSet;

use crate::flow::campaigns::{
    parse_when, Campaign, CampaignEvent, Offset, When, DEFAULT_ZONE_FIELD,
};
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
        // Every part is read before giving up, so one pass reports all.
        let field = match m.get("field") {
            Some((_, f)) => self.ident(f, "`field`").map(|n| (n, f.pos)),
            None => {
                self.err(
                    node.pos,
                    format!("{what} needs `field:` (the contact field holding the date)"),
                );
                None
            }
        };
        let zone_field = match m.get("time_zone_field") {
            Some((_, v)) => self.ident(v, "`time_zone_field`"),
            None => Some(DEFAULT_ZONE_FIELD.to_owned()),
        };
        let mut events = Vec::new();
        match m.get("events") {
            None => self.err(node.pos, format!("{what} needs `events:`")),
            Some((_, events_node)) => {
                let entries = self.map(events_node, "`events`", &[])?;
                if entries.is_empty() {
                    self.err(events_node.pos, format!("{what} has no events"));
                }
                events.extend(
                    entries
                        .into_iter()
                        .filter_map(|(ev, (k, v))| self.campaign_event(ev, k, v)),
                );
            }
        }
        let (field, field_pos) = field?;
        Some(Campaign {
            name: name.to_owned(),
            field,
            field_pos,
            zone_field: zone_field.unwrap_or_else(|| DEFAULT_ZONE_FIELD.to_owned()),
            events,
            file: self.file.clone(),
        })
    }

    fn campaign_event(&mut self, ev: &str, k: &Node, v: &Node) -> Option<CampaignEvent> {
        if !is_ident(ev) {
            self.err(
                k.pos,
                format!("event name `{ev}` must be letters, digits and `_`"),
            );
            return None;
        }
        let em = self.map(v, "a campaign event", &["when", "start", "if_busy"])?;
        let when = match em.get("when") {
            Some((_, w)) => self
                .text(w, "`when`")
                .and_then(|text| parse_when(&text).map_err(|e| self.err(w.pos, e)).ok()),
            None => {
                self.err(
                    v.pos,
                    format!("event `{ev}` needs `when:` (like `1 day before at 10:00`)"),
                );
                None
            }
        };
        let flow = match em.get("start") {
            Some((_, f)) => self.step_name(f, "`start`"),
            None => {
                self.err(
                    v.pos,
                    format!("event `{ev}` needs `start:` (the flow it starts)"),
                );
                None
            }
        };
        let interrupt = match em.get("if_busy") {
            None => Some(true),
            Some((_, b)) => match self.text(b, "`if_busy`").as_deref() {
                Some("interrupt") => Some(true),
                Some("skip") => Some(false),
                Some(other) => {
                    self.err(
                        b.pos,
                        format!("`if_busy` is `interrupt` or `skip`, not `{other}`"),
                    );
                    None
                }
                None => None,
            },
        };
        // With an error reported the set is refused anyway; an event kept
        // with a placeholder still has its flow checked across files.
        Some(CampaignEvent {
            name: ev.to_owned(),
            when: when.unwrap_or(When {
                offset: Offset::Days(0),
                at: None,
            }),
            flow: flow?,
            interrupt: interrupt.unwrap_or(true),
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
            err(
                &c.file,
                c.field_pos,
                format!("campaign `{}` is defined twice", c.name),
            );
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
