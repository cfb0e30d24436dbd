//! The simulated phone that `chat` and transcript runs share: one sender
//! texting one of our numbers through the real [`Pipeline`], over a store
//! (temporary unless `chat --data` names one) and a virtual clock.
//!
//! Messages are built as Twilio would post them ([`InboundMessage`]), so a
//! body Twilio would refuse is refused here too; what comes back is read
//! from the TwiML the webhook would answer with ([`reply_lines`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::flow::{self, Conversation, FlowSet};
use crate::metrics::Metrics;
use crate::pipeline::{Detailed, Pipeline, PipelineOptions, TimerFired};
use crate::starts::{IfBusy, StartOutcome, StartRequest};
use crate::store::{ConvKey, SledStore, Store, StoreConfig, StoreError};
use crate::twilio::{self, InboundMessage};

/// One sender texting one of our numbers: the pipeline over its store, and
/// the virtual clock.
pub(super) struct Session {
    pub(super) pipeline: Pipeline<SledStore>,
    pub(super) from: String,
    pub(super) to: String,
    /// Virtual time (unix seconds): +1 per message, and `/wait` (`@ wait`)
    /// jumps.
    pub(super) now: i64,
    /// Makes MessageSids unique across sessions sharing a `--data` store, so
    /// dedupe never replays an answer from an earlier session.
    sid_prefix: u64,
    sent: u64,
    /// The temporary store directory; declared after `pipeline` so the
    /// store is closed before its directory is removed.
    pub(super) tmp: Option<tempfile::TempDir>,
}

/// What happened to one message.
pub(super) enum Sent {
    /// Twilio would not deliver it (a bad number, too much media).
    Rejected(String),
    Handled(Box<Detailed>),
}

impl Session {
    /// A session over the store in `data_dir`, or a temporary one removed
    /// when the session ends.
    pub(super) fn open(
        set: FlowSet,
        options: PipelineOptions,
        data_dir: Option<&Path>,
        from: &str,
        to: &str,
        now: i64,
        sid_prefix: u64,
    ) -> anyhow::Result<Session> {
        let (dir, tmp) = match data_dir {
            Some(dir) => (dir.to_path_buf(), None),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("smsflow-chat-")
                    .tempdir()
                    .context("cannot create a temporary store directory")?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let store = SledStore::open(&dir, &StoreConfig::default())
            .with_context(|| format!("cannot open the store in {}", dir.display()))?;
        let pipeline = Pipeline::new(
            Arc::new(store),
            Arc::new(ArcSwap::from_pointee(set)),
            options,
            Arc::new(Metrics::default()),
        );
        Ok(Session {
            pipeline,
            from: from.to_owned(),
            to: to.to_owned(),
            now,
            sid_prefix,
            sent: 0,
            tmp,
        })
    }

    fn key(&self) -> ConvKey {
        ConvKey::new(&self.to, &self.from)
    }

    /// Send one message through the pipeline, as Twilio would post it,
    /// with the next MessageSid (returned too: scripts seed their
    /// randomness with it).
    pub(super) async fn send(
        &mut self,
        body: String,
        media: &[String],
    ) -> Result<(String, Sent), StoreError> {
        self.now = self.now.saturating_add(1);
        self.sent += 1;
        let sid = format!("SM{:016x}{:016x}", self.sid_prefix, self.sent);
        let mut params = vec![
            ("MessageSid".to_owned(), sid.clone()),
            ("From".to_owned(), self.from.clone()),
            ("To".to_owned(), self.to.clone()),
            ("Body".to_owned(), body),
            ("NumMedia".to_owned(), media.len().to_string()),
        ];
        for (i, url) in media.iter().enumerate() {
            params.push((format!("MediaUrl{i}"), url.clone()));
        }
        let msg = match InboundMessage::from_params(params) {
            Ok(m) => m,
            Err(e) => return Ok((sid, Sent::Rejected(e.to_string()))),
        };
        let detailed = self
            .pipeline
            .handle_inbound_detailed(&msg, self.now)
            .await?;
        Ok((sid, Sent::Handled(Box::new(detailed))))
    }

    /// Advance the virtual clock by `secs`, firing every timer of the
    /// store that comes due on the way, in due order, each at its own due
    /// time, through the same [`Pipeline::fire_timer`] as the server's
    /// scheduler. Returns what each firing did (its outbox entries are
    /// what the phone would receive).
    pub(super) async fn wait(&mut self, secs: i64) -> Result<Vec<TimerFired>, StoreError> {
        let target = self.now.saturating_add(secs);
        let mut fired = Vec::new();
        // A bound against a flow that keeps setting timers already due.
        for _ in 0..10_000 {
            let store = self.pipeline.store();
            match store.next_timer()? {
                Some(next) if next <= target => {
                    self.now = self.now.max(next);
                    for timer in store.due_timers(self.now, 64)? {
                        let done = self.pipeline.fire_timer(&timer, self.now).await?;
                        if done.ran {
                            fired.push(done);
                        }
                    }
                }
                _ => break,
            }
        }
        self.now = target;
        Ok(fired)
    }

    /// Start `flow` for this sender from outside, as `POST
    /// /flows/{name}/start` does (the same [`Pipeline::start_flow`]), at
    /// the next second. What the phone receives: the messages the start
    /// put in the outbox, or the silence and why (`opted_out`,
    /// `skipped_busy`); `None` when the set has no such flow.
    pub(super) async fn start(
        &mut self,
        flow: &str,
        fields: &BTreeMap<String, String>,
        vars: &BTreeMap<String, String>,
    ) -> Result<Option<Vec<flow::ReplyLine>>, StoreError> {
        self.now = self.now.saturating_add(1);
        self.sent += 1;
        let req = StartRequest {
            to: self.from.clone(),
            from: self.to.clone(),
            messaging_service_sid: None,
            fields: fields.clone(),
            vars: vars.clone(),
            idempotency_key: format!("transcript:{:016x}:{}", self.sid_prefix, self.sent),
            if_busy: IfBusy::Interrupt,
        };
        let StartOutcome::Done { record, .. } =
            self.pipeline.start_flow(flow, &req, self.now).await?
        else {
            return Ok(None);
        };
        if record.result != "started" {
            return Ok(Some(vec![flow::ReplyLine::Silence(Some(record.result))]));
        }
        let mut lines = Vec::new();
        for key in &record.outbox {
            if let Some(e) = self.pipeline.store().outbound(key)? {
                lines.push(flow::ReplyLine::Reply(flow::Reply {
                    body: e.body,
                    media: e.media,
                    origin: None,
                }));
            }
        }
        if lines.is_empty() {
            lines.push(flow::ReplyLine::Silence(None));
        }
        Ok(Some(lines))
    }

    /// The stored conversation, as the pipeline would read it.
    pub(super) fn conversation(&self) -> anyhow::Result<Option<Conversation>> {
        let Some(bytes) = self.pipeline.store().conversation(&self.key())? else {
            return Ok(None);
        };
        Conversation::from_stored(&bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the stored conversation is unreadable: {e}"))
    }

    /// Start this sender's conversation from `conversation`.
    pub(super) async fn seed(&self, conversation: &Conversation) -> Result<(), StoreError> {
        self.pipeline
            .seed(&self.key(), conversation, self.now)
            .await
    }

    /// Forget this sender's conversation; whether there was one.
    pub(super) async fn forget(&self) -> Result<bool, StoreError> {
        self.pipeline.forget(&self.key()).await
    }
}

/// What the phone receives for one message, as transcript lines: the
/// messages of the TwiML answer (after Twilio's limits: long bodies split,
/// empty messages left out, at most ten), or the silence and its reason.
pub(super) fn reply_lines(detailed: &Detailed) -> Vec<flow::ReplyLine> {
    if let Some(silence) = &detailed.silence {
        return vec![flow::ReplyLine::Silence(Some(silence.label().to_owned()))];
    }
    let sent: Vec<flow::Reply> = match twilio::messages_in(&detailed.answer.twiml) {
        Ok(messages) => messages
            .into_iter()
            .map(|m| flow::Reply {
                body: m.body,
                media: m.media,
                origin: None,
            })
            .collect(),
        // Our own rendering always parses; the engine's replies are the
        // next best account (what the phone sees: no origin).
        Err(_) => detailed
            .replies
            .iter()
            .map(|r| flow::Reply {
                origin: None,
                ..r.clone()
            })
            .collect(),
    };
    if sent.is_empty() {
        // Replies with nothing in them: the phone gets nothing.
        return vec![flow::ReplyLine::Silence(Some(
            flow::SilenceReason::EmptyReply.as_str().to_owned(),
        ))];
    }
    sent.into_iter().map(flow::ReplyLine::Reply).collect()
}

/// What the phone receives from timer firings, as transcript lines: the
/// messages they put in the outbox, in order, or a silence when they sent
/// nothing.
pub(super) fn timer_lines(fired: &[TimerFired]) -> Vec<flow::ReplyLine> {
    let sent: Vec<flow::ReplyLine> = fired
        .iter()
        .flat_map(|f| &f.enqueued)
        .map(|e| {
            flow::ReplyLine::Reply(flow::Reply {
                body: e.body.clone(),
                media: e.media.clone(),
                origin: None,
            })
        })
        .collect();
    if sent.is_empty() {
        return vec![flow::ReplyLine::Silence(None)];
    }
    sent
}
