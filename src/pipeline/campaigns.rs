//! Campaign events: when they are due, firing them, and rescheduling every
//! conversation when the campaign set changes.
//!
//! A contact's next campaign event is part of its conversation's next due
//! time: every commit that may change contact fields (a message, a flow
//! start, an import, a timer) writes the earlier of the run's timer and
//! that event into the record's header, atomically with the fields, so the
//! store's timer index is the campaign schedule and nothing scans contacts
//! to find what is due. A commit counts events up to the grace period
//! (`campaign_grace_secs`, the sender's `max_late_secs`) in the past, so an
//! event not yet fired when the server stopped, or when its field was set
//! a little late, still comes due; one further in the past is skipped.
//!
//! A due event is a flow start keyed `campaign:<campaign>:<event>:<our
//! number>:<contact>:<date>` ([`flow::CampaignDue::key`]): the start
//! record under that key makes it happen at most once per contact and
//! date, across restarts, repeated wake-ups and field changes back and
//! forth. The start goes through [`Pipeline::start_flow`], so an
//! opted-out contact gets nothing, and the sender applies pacing, consent
//! and quiet hours to what it says.

use super::Pipeline;
use crate::flow::{self, Conversation, FlowSet};
use crate::starts::{IfBusy, StartOutcome, StartRequest};
use crate::store::{ConvKey, OutboxEntry, OutboxState, StateCommit, Store, StoreError};

/// Conversations walked per page by [`Pipeline::reschedule_campaigns`].
const PAGE: usize = 512;

/// What [`Pipeline::reschedule_campaigns`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rescheduled {
    /// Conversations looked at.
    pub conversations: usize,
    /// Conversations whose next due time was moved earlier (or set).
    pub moved: usize,
}

impl<S: Store> Pipeline<S> {
    /// The next due time to record for `conversation` of `key` at `now`:
    /// its run's timer, or its next campaign event up to the grace period
    /// in the past (see the module doc). An event already past counts only
    /// while it has not fired (no start record, no outbox entry under its
    /// key): otherwise every message of the contact in the grace period
    /// after an event would wake the scheduler for nothing.
    pub(crate) fn due_of(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        now: i64,
    ) -> Option<i64> {
        let run = flow::next_due(flows, conversation);
        if !flows.has_campaigns() || conversation.contact.is_empty() {
            return run;
        }
        let oldest = now.saturating_sub(self.options.campaign_grace_secs.max(0));
        let campaign = flow::campaign_events(
            flows,
            &self.options.time_zones,
            &key.to,
            &conversation.contact,
        )
        .into_iter()
        .filter(|e| e.due > now || (e.due >= oldest && !self.campaign_fired(e, key)))
        .map(|e| e.due)
        .min();
        match (run, campaign) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the past event `e` of `key` has fired (its start or its
    /// message is recorded under its key). A store error reads as not
    /// fired: the wake-up then finds out, as before.
    fn campaign_fired(&self, e: &flow::CampaignDue, key: &ConvKey) -> bool {
        let k = e.key(&key.to, &key.from);
        match &e.action {
            flow::DueAction::Start(_) => self.store.start_record(&k).ok().flatten().is_some(),
            flow::DueAction::Send(_) => self
                .store
                .outbound(&format!("{k}:0"))
                .ok()
                .flatten()
                .is_some(),
        }
    }

    /// The earlier of the run's timer and the first campaign event due
    /// strictly after `after`.
    pub(crate) fn due_after(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        after: i64,
    ) -> Option<i64> {
        let run = flow::next_due(flows, conversation);
        let campaign = flow::next_campaign_due(
            flows,
            &self.options.time_zones,
            &key.to,
            &conversation.contact,
            after,
        );
        match (run, campaign) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fire the campaign events of `key` due at `now` (not older than the
    /// grace period), each as a flow start under its own key. Returns the
    /// outbox entries the starts made, in order, and how many events
    /// started something new.
    pub(crate) async fn fire_campaigns(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        now: i64,
    ) -> Result<(Vec<OutboxEntry>, usize), StoreError> {
        let oldest = now.saturating_sub(self.options.campaign_grace_secs.max(0));
        let mut due: Vec<_> = flow::campaign_events(
            flows,
            &self.options.time_zones,
            &key.to,
            &conversation.contact,
        )
        .into_iter()
        .filter(|e| e.due <= now && e.due >= oldest)
        .collect();
        due.sort_by_key(|e| e.due);
        let mut sent = Vec::new();
        let mut fired = 0;
        let epoch = self.store.epoch();
        let mut messages = 0;
        for event in due {
            let flow = match &event.action {
                flow::DueAction::Start(flow) => flow,
                flow::DueAction::Send(text) => {
                    // One message, keyed like a start: enqueued once per
                    // contact and date whatever fires it again. The sender
                    // applies opt-outs, quiet hours and the pace.
                    if text.trim().is_empty() {
                        tracing::info!(
                            campaign = %event.campaign,
                            event = %event.event,
                            "campaign message skipped: empty for this contact"
                        );
                        continue;
                    }
                    let entry = OutboxEntry {
                        key: format!("{}:0", event.key(&key.to, &key.from)),
                        to: key.from.clone(),
                        from: key.to.clone(),
                        messaging_service_sid: None,
                        body: text.clone(),
                        media: Vec::new(),
                        cause: "campaign".to_owned(),
                        flow: None,
                        step: None,
                        created_at: now,
                        due_at: event.due,
                        state: OutboxState::Pending {
                            not_before: now,
                            attempts: 0,
                        },
                    };
                    if self.store.enqueue_outbound(std::slice::from_ref(&entry))? == 1 {
                        tracing::info!(
                            campaign = %event.campaign,
                            event = %event.event,
                            "campaign message"
                        );
                        fired += 1;
                        messages += 1;
                        sent.push(entry);
                    }
                    continue;
                }
            };
            let req = StartRequest {
                to: key.from.clone(),
                from: key.to.clone(),
                messaging_service_sid: None,
                fields: Default::default(),
                vars: Default::default(),
                idempotency_key: event.key(&key.to, &key.from),
                if_busy: if event.interrupt {
                    IfBusy::Interrupt
                } else {
                    IfBusy::Skip
                },
            };
            let StartOutcome::Done { record, duplicate } = self.start_flow(flow, &req, now).await?
            else {
                // The flow went away with a reload since the set was read.
                continue;
            };
            if duplicate {
                continue;
            }
            fired += 1;
            tracing::info!(
                campaign = %event.campaign,
                event = %event.event,
                flow = %flow,
                result = %record.result,
                "campaign event"
            );
            for k in &record.outbox {
                if let Some(entry) = self.store.outbound(k)? {
                    sent.push(entry);
                }
            }
        }
        if messages > 0 {
            self.store.flush(epoch).await?;
        }
        Ok((sent, fired))
    }

    /// Walk every stored conversation and move its next due time earlier
    /// where the current campaign set has an event before it (a campaign
    /// was added or moved earlier). A due time later than needed is left:
    /// firing early finds nothing due and records the right time. Run at
    /// startup and whenever the campaign set changes; each conversation is
    /// rewritten under its lock, so a message at the same time waits.
    pub async fn reschedule_campaigns(&self, now: i64) -> Result<Rescheduled, StoreError> {
        let flows = self.flows.load_full();
        let mut done = Rescheduled::default();
        let mut after: Option<ConvKey> = None;
        loop {
            let keys = self.store.conversation_keys(after.as_ref(), PAGE)?;
            let Some(last) = keys.last().cloned() else {
                break;
            };
            let epoch = self.store.epoch();
            let mut moved = false;
            for key in keys {
                done.conversations += 1;
                let guard = self.lock(&key).await?;
                let record = self.store.load(&key)?;
                let Some(bytes) = &record.conversation else {
                    continue;
                };
                let conversation = self.conversation_of(&key, &record)?;
                let due = self.due_of(&flows, &key, &conversation, now);
                let earlier = match (due, record.due) {
                    (Some(new), Some(old)) => new < old,
                    (Some(_), None) => true,
                    _ => false,
                };
                if !earlier {
                    continue;
                }
                self.store.commit_state(StateCommit {
                    key: &key,
                    conversation: Some(bytes),
                    ended: conversation.is_ended(due),
                    due,
                    recent: &record.recent,
                    at: now,
                    results: &[],
                })?;
                drop(guard);
                self.timers.set(due);
                done.moved += 1;
                moved = true;
            }
            if moved {
                self.store.flush(epoch).await?;
            }
            after = Some(last);
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arc_swap::ArcSwap;

    use super::*;
    use crate::contacts::ContactRow;
    use crate::metrics::Metrics;
    use crate::pipeline::PipelineOptions;
    use crate::store::{DueTimer, SledStore};

    const REMINDER: &str =
        "fields: [appt]\nsteps:\n  ask:\n    say: \"See you {{contact.appt}}\"\n";
    const CAMPAIGNS: &str = "campaigns:\n  appts:\n    field: appt\n    events:\n      before:\n        when: 2 hours before\n        start: reminder\n";

    fn set(dir: &std::path::Path, campaigns: bool) -> FlowSet {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("reminder.yaml"), REMINDER).unwrap();
        if campaigns {
            std::fs::write(dir.join("campaigns.yaml"), CAMPAIGNS).unwrap();
        }
        crate::flow::load_dir(dir).unwrap().set
    }

    /// A campaign added to a running set reaches contacts whose fields
    /// were set before it existed (the walk over every conversation), and
    /// its event fires once however often its index entry comes due.
    #[tokio::test]
    async fn a_campaign_added_later_is_scheduled_for_existing_contacts_and_fires_once() {
        let tmp = tempfile::tempdir().unwrap();
        let flows = tmp.path().join("flows");
        let store = SledStore::open(&tmp.path().join("data"), &Default::default()).unwrap();
        let pipeline = Pipeline::new(
            Arc::new(store),
            Arc::new(ArcSwap::from_pointee(set(&flows, false))),
            PipelineOptions {
                campaign_grace_secs: 3600,
                ..PipelineOptions::default()
            },
            Arc::new(Metrics::default()),
        );
        // 2026-09-21; the appointment is months later, its event at 06:00.
        let now = 1_790_000_000;
        let appt = "2027-01-15T08:00:00Z";
        let rows = [ContactRow {
            line: 2,
            phone: "+15557700001".into(),
            fields: [("appt".to_owned(), appt.to_owned())].into(),
        }];
        pipeline
            .import_contacts("+15550001111", &rows, now)
            .await
            .unwrap();
        let key = ConvKey::new("+15550001111", "+15557700001");
        assert_eq!(pipeline.store().load(&key).unwrap().due, None);

        pipeline.flows().store(Arc::new(set(&flows, true)));
        let done = pipeline.reschedule_campaigns(now).await.unwrap();
        assert_eq!(
            done,
            Rescheduled {
                conversations: 1,
                moved: 1
            }
        );
        let due: i64 = "2027-01-15T06:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second();
        assert_eq!(pipeline.store().load(&key).unwrap().due, Some(due));
        // Walking again changes nothing.
        assert_eq!(pipeline.reschedule_campaigns(now).await.unwrap().moved, 0);
        // A contact with an event to come is not purged as idle.
        assert_eq!(pipeline.store().purge(due * 2).unwrap().conversations, 0);

        let timer = DueTimer {
            due,
            key: key.clone(),
        };
        let fired = pipeline.fire_timer(&timer, due + 5).await.unwrap();
        assert!(fired.ran);
        let bodies: Vec<_> = fired.enqueued.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies, [format!("See you {appt}")]);
        // Past the event: nothing more is due, and a repeated firing (an
        // index entry left by a crash) starts nothing again.
        assert_eq!(pipeline.store().load(&key).unwrap().due, None);
        let again = pipeline.fire_timer(&timer, due + 6).await.unwrap();
        assert!(again.enqueued.is_empty());
        let (sent, fired) = pipeline
            .fire_campaigns(
                &pipeline.flows().load_full(),
                &key,
                &{
                    let record = pipeline.store().load(&key).unwrap();
                    pipeline.conversation_of(&key, &record).unwrap()
                },
                due + 7,
            )
            .await
            .unwrap();
        assert_eq!((sent.len(), fired), (0, 0));
        // Later than the grace period, an event is not fired at all.
        let late = ConvKey::new("+15550001111", "+15557700002");
        let rows = [ContactRow {
            line: 2,
            phone: late.from.clone(),
            fields: [("appt".to_owned(), appt.to_owned())].into(),
        }];
        pipeline
            .import_contacts("+15550001111", &rows, due + 3601)
            .await
            .unwrap();
        assert_eq!(pipeline.store().load(&late).unwrap().due, None);
    }
}

/// Figures for the README: how long scheduling 100,000 campaign events
/// takes, and the memory it needs. Run in release:
/// `cargo test --release --lib -- --ignored schedule_100k --nocapture`.
#[cfg(test)]
mod measure {
    use std::sync::Arc;
    use std::time::Instant;

    use arc_swap::ArcSwap;

    use super::*;
    use crate::contacts::ContactRow;
    use crate::metrics::Metrics;
    use crate::pipeline::PipelineOptions;
    use crate::store::SledStore;

    fn rss_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn write_set(dir: &std::path::Path, when: &str) -> FlowSet {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("reminder.yaml"),
            "fields: [appt]\nsteps:\n  ask:\n    say: \"See you {{contact.appt}}\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("campaigns.yaml"),
            format!(
                "campaigns:\n  appts:\n    field: appt\n    events:\n      before:\n        when: {when}\n        start: reminder\n"
            ),
        )
        .unwrap();
        crate::flow::load_dir(dir).unwrap().set
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "a measurement: run in release with --nocapture"]
    async fn schedule_100k() {
        const N: usize = 100_000;
        const CHUNK: usize = 1_000;
        let tmp = tempfile::tempdir().unwrap();
        let flows = tmp.path().join("flows");
        let store = SledStore::open(&tmp.path().join("data"), &Default::default()).unwrap();
        let pipeline = Pipeline::new(
            Arc::new(store),
            Arc::new(ArcSwap::from_pointee(write_set(
                &flows,
                "1 day before at 10:00",
            ))),
            PipelineOptions {
                campaign_grace_secs: 6 * 3600,
                time_zones: flow::NumberZones::new([("*", "America/New_York")]),
                ..PipelineOptions::default()
            },
            Arc::new(Metrics::default()),
        );
        let now = 1_790_000_000; // 2026-09-21
        let rss0 = rss_kib("VmRSS:");
        // Appointments spread over the following 100 days.
        let rows: Vec<ContactRow> = (0..N)
            .map(|i| ContactRow {
                line: i as u64 + 2,
                phone: format!("+1555{:07}", i),
                fields: [(
                    "appt".to_owned(),
                    jiff::Timestamp::from_second(now + 86_400 * 2 + (i as i64 * 86))
                        .unwrap()
                        .to_zoned(jiff::tz::TimeZone::UTC)
                        .datetime()
                        .to_string(),
                )]
                .into(),
            })
            .collect();
        let started = Instant::now();
        for chunk in rows.chunks(CHUNK) {
            pipeline
                .import_contacts("+15550001111", chunk, now)
                .await
                .unwrap();
        }
        let import = started.elapsed();
        let rss1 = rss_kib("VmRSS:");
        assert_eq!(pipeline.store().pending_timers(), N);

        // The campaign moves earlier: every conversation is walked and
        // rewritten with its new due time.
        pipeline
            .flows()
            .store(Arc::new(write_set(&flows, "2 days before at 09:00")));
        let started = Instant::now();
        let done = pipeline.reschedule_campaigns(now).await.unwrap();
        let walk = started.elapsed();
        assert_eq!(done.moved, N);
        // Nothing changed: a walk that only reads.
        let started = Instant::now();
        let again = pipeline.reschedule_campaigns(now).await.unwrap();
        let idle_walk = started.elapsed();
        assert_eq!(again.moved, 0);
        let rss2 = rss_kib("VmRSS:");
        let disk: u64 = walkdir(&tmp.path().join("data"));
        println!(
            "schedule_100k: import {N} contacts with a date field (chunks of {CHUNK}, each flushed): {:.2} s ({:.0}/s)\n\
             schedule_100k: reschedule after a campaign edit, all {N} moved: {:.2} s; walk with nothing to move: {:.2} s\n\
             schedule_100k: RSS {} MiB before, {} MiB after the import, {} MiB after the walks (peak {} MiB); data directory {} MiB",
            import.as_secs_f64(),
            N as f64 / import.as_secs_f64(),
            walk.as_secs_f64(),
            idle_walk.as_secs_f64(),
            rss0 / 1024,
            rss1 / 1024,
            rss2 / 1024,
            rss_kib("VmHWM:") / 1024,
            disk / (1024 * 1024),
        );
    }

    fn walkdir(dir: &std::path::Path) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                walkdir(&e.path())
            } else {
                m.len()
            };
        }
        total
    }
}
