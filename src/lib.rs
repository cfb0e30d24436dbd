//! smsflow: an SMS auto-responder behind a Twilio number.
//!
//! # Bird's-eye view
//!
//! Twilio posts every inbound text to `/twilio/sms`. We verify the
//! signature, parse the form into an [`twilio::InboundMessage`], replay the
//! recorded answer if the MessageSid was seen before, load the sender's
//! conversation from the store, run the flow engine, persist the new
//! conversation and the answer atomically, wait for the flush, and answer
//! with TwiML (replies, or `<Response/>` for silence). Delivery callbacks on
//! `/twilio/status` are recorded monotonically. Flow files are watched and
//! swapped in whole when valid.
//!
//! Not every message is an answer. A timer that comes due (`timers`; a
//! campaign event is one too), a
//! flow start or a broadcast from the admin API ([`starts`],
//! [`broadcasts`]) runs the same pipeline under the same per-conversation
//! lock, and what it says goes to the store's outbox, which the
//! [`outbound`] sender delivers through Twilio's REST API. A flow's HTTP
//! calls are made by the pipeline between engine runs ([`calls`]), or
//! after the answer from a durable queue ([`call_jobs`]).
//!
//! ```text
//! http ─► twilio (verify, parse) ─► pipeline ─► flow::handle (pure) ─► twilio::render ─► store (commit, flush)
//!                                    ▲  ▲  │ calls ◄─► calls::Caller                          │ outbox, call jobs
//!           reload (ArcSwap<FlowSet>)┘  │  ▼                                                  ▼
//!       timers, starts, broadcasts ─────┘                     outbound sender ─► Twilio REST; call_jobs ─► HTTP
//! ```
//!
//! # The public API
//!
//! The library offers the Twilio wire types and [`twilio::RequestValidator`]
//! ([`twilio`]), the flow engine, loader and transcript format ([`flow`]),
//! the author tools and transcript runner ([`author`]), the store contract
//! ([`store::Store`] and its sled backend), and what the `smsflow` binary,
//! the integration tests and the examples build on ([`app::App`],
//! [`config`], [`cli`], [`pipeline::PipelineOptions`], [`reload`],
//! [`messages`], [`results`], [`starts`], [`contacts`], [`broadcasts`],
//! [`compliance`], [`telemetry`], [`service`], [`calls`], [`call_jobs`],
//! [`admin_client`]), and [`outbound`] (credentials, settings and the
//! sender's wake-up handle). Every
//! public item is documented (`missing_docs` is on); everything else
//! (`http`, `metrics`, `clock`, `versioned`, and items not named above) is
//! crate-private.
//!
//! # Code map (each module owns one outside world)
//!
//! - [`twilio`]: the wire format. Form decoding, `RequestValidator`,
//!   TwiML rendering, status callbacks, and Twilio's message limits
//!   ([`twilio::limits`]: the one place they are defined). Knows nothing
//!   of axum, sled, flows.
//! - [`flow`]: flow model, YAML loading and validation (`check`), the pure
//!   step engine, templates, the transcript format, and a conversation's
//!   stored form (versioned JSON). No IO in the engine, no clock reads
//!   (time is passed in), no Twilio types. [`flow::script`] is the
//!   Rhai sandbox: the only place a Rhai `Engine` is built; script flows and
//!   YAML expressions run there, and any script failure becomes the flow's
//!   fallback with the conversation unchanged. Its files:
//!   - `model.rs` (the validated types), `engine.rs` (the step function),
//!     `calls.rs` (a step's `call:`, the request and answer types),
//!     `matcher.rs` (normalising and matching text), `check.rs` (cross-file
//!     rules), `template.rs`, `outline.rs` (steps and routes for diagrams),
//!     `transcript.rs` (`.chat` tests), `segments.rs` (SMS segment counts),
//!     `invitations.rs` (answers a reply asks for), `yaml.rs` (the only
//!     user of yaml-rust2: a tree with a position on every node),
//!     `campaigns.rs` (campaigns: the `when:` grammar and each contact's
//!     event times from its date field, in its time zone, with jiff);
//!   - `load.rs` runs a load; `load/` reads the format, one file per section
//!     of flows/README.md: `files` (directory walk, symlinks), `keywords`,
//!     `flows` (flow files, triggers, durations), `steps` (steps, routes,
//!     retries), `calls` (a step's `call:`), `matchers`, `templates`
//!     (messages, `{{ }}` and `{{= }}`),
//!     `scripts` (`script:` and `*.rhai` files), `campaigns` (campaign
//!     files);
//!   - `script.rs` builds the engine and runs script flows; `script/` holds
//!     `expr` (`when:`, `{{= }}`), `helpers`, `http` (a script's `http()`:
//!     answered from the answers it is run with, or the run ends at the
//!     call and the pipeline makes it, like a YAML `call:`), `modules`
//!     (imports), `limits` and `bounded` (functions that refuse before
//!     building too much), `errors`, `values` (message, state, replies)
//!     and `run` (per-run state).
//! - [`store`]: the only module that knows sled and PostgreSQL; the
//!   [`store::Store`] trait, with two backends that pass one conformance
//!   suite: sled (embedded, the default, one process) and `store/pg/`
//!   (PostgreSQL, several instances on one database: the conversation
//!   lock is also an advisory lock there, outbox and call jobs are
//!   claimed by compare and swap in a transaction, the schema is
//!   versioned SQL in `store/pg/migrations/`). [`store::AnyStore`] is the
//!   one the server holds. In sled, a conversation and its recent answers (for retries) are one
//!   record, written with one insert; the inbound message log is an
//!   append-only file beside the database, and so are flow results once
//!   the store's results thread has moved them out of sled, where they
//!   wait in a tree of their own (about once a second:
//!   `results/<flow>.jsonl`, `result_files.rs`); whether a sender
//!   may have a consent record is kept in memory (`consent_filter.rs`),
//!   so most webhooks skip that read. Its own thread groups flushes
//!   (each ending in a real `fdatasync`; sled is carried in `vendor/sled`
//!   with its flush writing on that thread instead of waking sled's IO
//!   pool and its cache in 16 parts, see its `SMSFLOW.md`), writes checkpoints that expose a
//!   database sled silently truncated, and reopens the store after a
//!   failed write; undecodable records are kept aside in `quarantine/`.
//!   Every record carries its format version and is migrated on read
//!   (see the store's "Format versions"; golden records of each version
//!   under `src/store/golden/` must keep decoding).
//! - [`pipeline`]: one message in phases (dedupe, consent, loop guard,
//!   engine, render, commit, flush; see [`pipeline::Pipeline`]) under a
//!   per-conversation lock; silence is an outcome with a reason
//!   ([`pipeline::Silence`]), not an error. Knows the store trait and the
//!   engine, not axum. The conversation each commit wrote is kept decoded
//!   (`pipeline/memo.rs`, a few thousand at most), so the next message
//!   that finds exactly those bytes in the store skips decoding them.
//! - `timers`: the timer scheduler task: sleeps until the store's index
//!   by due time says a timer is due (woken early when a commit sets an
//!   earlier one), then fires it through [`pipeline::Pipeline::fire_timer`]
//!   (same lock as messages; what it says goes to the store's outbox).
//!   A contact's next campaign event is part of its conversation's due
//!   time (`pipeline/campaigns.rs`): written with every change of its
//!   fields, fired as a flow start keyed per contact and date; when the
//!   campaigns change, the scheduler walks the conversations once.
//! - [`compliance`]: consent keywords (STOP/START/HELP) and the loop
//!   guard, decided before any flow runs.
//! - `http`: axum router, request checks, error-to-status mapping.
//!   `Routes` is what a listener serves: the router, and the inbound
//!   webhook's POST called directly (the same checks and handler, without
//!   the router's per-request work). Its `serve` (src/http/serve.rs) is
//!   the accept loop: header-read and idle timeouts, and at most
//!   `max_connections`, closing the longest-idle connection to make room
//!   for a new one.
//! - [`messages`]: the message log view behind `GET /messages` and
//!   `smsflow messages` (with the message texts, when the operator keeps
//!   them, and their search).
//! - [`results`]: flow results out (`smsflow export results`,
//!   `GET /flows/{name}/results`): the engine reports each run that
//!   ended and how ([`flow::EndedRun`]), the pipeline turns them into
//!   [`store::RunResult`]s committed with the step that ended them
//!   (`pipeline/results.rs`), this module renders CSV (spreadsheet-safe,
//!   through [`contacts::neutralize`]) or JSON lines; the route is
//!   `http/results.rs`, which also erases one contact
//!   (`DELETE /contacts/{number}`, [`pipeline::Pipeline::forget_contact`]:
//!   under the locks of all its conversations, then
//!   [`store::Store::forget_contact`]).
//! - [`starts`]: flow starts from outside (`POST /flows/{name}/start`,
//!   `smsflow start`): the request, its validation and E.164 phone
//!   numbers. The work is [`pipeline::Pipeline::start_flow`]
//!   (`pipeline/starts.rs`: under the conversation's lock, the engine's
//!   pure `flow::start_flow` in `flow/engine/start.rs`, then the outbox
//!   entries, the conversation and the result under the idempotency key
//!   in one store transaction, `store/starts.rs`); the route is
//!   `http/starts.rs`. A start queued behind a live run (`if_busy:
//!   queue`) is kept in the conversation itself and made due by
//!   `flow::next_due`; the timer fires it under the lock once no run is
//!   live.
//! - [`contacts`]: contact fields from outside: CSV or a JSON list
//!   checked whole (line numbers or indexes, all or nothing) and written
//!   per conversation under its lock (`pipeline/contacts.rs`), exported
//!   back spreadsheet-safe; the only user of the csv crate. Routes in `http/contacts.rs`.
//! - [`broadcasts`]: one message (its text rendered per contact,
//!   [`flow::ContactText`]), or one flow start, for the contacts
//!   matching a filter: one outbox entry (or one start, idempotency key)
//!   per recipient keyed by the broadcast's id (sending it again adds
//!   nobody twice), progress from the per-broadcast tallies the store
//!   keeps with every outbox write (`store/tallies.rs`: listing never
//!   reads the outbox), cancel over the broadcast's key range
//!   (`pipeline/broadcasts.rs`, `http/broadcasts.rs`).
//! - [`outbound`]: sending on our own through Twilio's REST API: the
//!   credentials (environment only), the REST client (`outbound/client.rs`,
//!   reqwest for Twilio's API), quiet hours (`outbound/quiet.rs`, with
//!   jiff, as `flow/campaigns.rs`) and the sender task (`outbound/sender.rs`), which claims
//!   due outbox entries from the store's due index, applies consent,
//!   `max_late`, quiet hours and the per-number pace, and records each
//!   send before and after the request (at most once).
//! - [`calls`]: flows' HTTP calls on the wire: the [`calls::Caller`] the
//!   pipeline makes a `call:` through and the real client (reqwest), with
//!   the allow-list (`http_allow`), the public-address-only resolver,
//!   redirects, the answer size cap and secret headers. The engine only
//!   renders requests and reads answers (`flow/calls.rs`; a script's
//!   `http()` in `flow/script/http.rs`); the pipeline's call loop
//!   (`pipeline/calls.rs`) runs the engine again with each answer, under
//!   the conversation's lock, within `call_budget_ms`. Flows see a
//!   failure only as a category (`flow::calls::CallError`); the detail
//!   goes to the logs.
//! - [`call_jobs`]: the call worker: makes `after_answer` calls from the
//!   store's durable call jobs (recorded by the pipeline before the
//!   state change) through the same client, with retries and an
//!   `Idempotency-Key`, at least once; a call our own checks refuse
//!   fails at once.
//! - [`reload`]: watches the flows directory (and its parent, to follow a
//!   replaced directory), validates, swaps atomically; owns the flow
//!   status `/status` reports and the one test a set passes to go live
//!   ([`reload::load_checked`]: startup and every reload).
//! - [`author`]: `smsflow check`, `chat`, `test` and `graph` for flow
//!   authors, one file each (`author/check.rs`, `chat.rs`,
//!   `transcripts.rs`, `graph.rs`). Chats and transcript runs share
//!   `author/session.rs`: the real pipeline with the server's options and
//!   a throwaway store with a virtual clock. No HTTP, no terminal (readers
//!   and writers).
//! - [`app`]: the composition root. `App::build` wires config, store,
//!   flows, pipeline, reloader and router together; it uses every module
//!   and no module uses it (only `main`, the tests and the examples).
//!   `main` runs it on a tokio runtime of `Config::workers` async workers
//!   (by default one fewer than the CPUs; README "Performance" says why).
//! - `versioned`: the encoding of every JSON record stored (`"v"` first,
//!   decode by version, migrate on read).
//! - `clock`: the wall clock, read in one place (the engine is given
//!   time).
//! - [`config`]: flags, environment and the TOML file merged into one
//!   validated `Config`; [`config::SETTINGS`] is the one table of settings
//!   (file keys, help, defaults) that `serve --help` and `smsflow config`
//!   are generated from.
//! - [`admin_client`], [`cli`], [`telemetry`] (text or JSON log lines,
//!   phone numbers shown or hashed), `metrics` (counters, and the
//!   process's own from `/proc/self`): process plumbing. [`service`]: the
//!   systemd notifications (`READY=1`, `RELOADING=1`, `STOPPING=1`); a
//!   no-op outside systemd.
//!
//! # Invariants
//!
//! - A reply leaves only after the state change that produced it is
//!   fsynced (unless the operator chose relaxed durability).
//! - Nothing stored is replaced silently: a record that does not decode is
//!   kept aside first; a database that lost checkpointed data is refused.
//! - Stored records are a contract: versioned, read by every later
//!   release, migrated on read, never silently reset.
//! - One MessageSid is processed once; retries get the identical TwiML.
//! - A timer's due time is written with the step that set it; a timer and
//!   a reply of one conversation are decided under the same lock; what a
//!   timer says is in the outbox (keyed, once) before its step is
//!   committed.
//! - Messages of one (To, From) conversation are processed one at a time;
//!   different conversations never wait on each other's lock.
//! - Every request sees one whole flow set; a set with errors is never live.
//! - User text reaches TwiML only through the escaper.
//! - One log event is one line: [`telemetry`] escapes every field value.
//! - A script error never changes a conversation and never becomes a 5xx.
//! - Consent (STOP/START/HELP) is decided before any flow runs; nothing is
//!   sent to an opted-out sender, in a reply or on our own.
//! - A run's result is written with the step that ended it, in the same
//!   flush and never after it; an erased contact's data goes whole, under its
//!   conversations' locks, and only its consent records stay.
//! - A flow start's messages, conversation and result are one
//!   transaction; its idempotency key answers every repeat with the first
//!   result, and its outbox keys derive from that key.
//! - A campaign event starts its flow at most once per contact and date:
//!   the start's idempotency key is made of them.
//! - A message we send on our own is in the outbox before any request,
//!   and marked `Sending` durably before it; one that may have reached
//!   Twilio is never sent again.
//! - A flow's HTTP call goes only where `http_allow` permits, never to a
//!   non-public address the operator did not list; all calls of a message
//!   end within `call_budget_ms`, so the webhook answers in time.
//! - A connection that is not serving a request never holds a place a new
//!   connection needs.
//! - `chat`, `test` and `--require-tests` run messages through the same
//!   [`pipeline::Pipeline`] and options as the webhook: a transcript that
//!   passes is what a phone would see.
//! - Dependencies point one way: [`app`] uses everything and nothing uses
//!   it; a fact (a limit, a normaliser, a setting) is defined once.
//!
//! # Extending
//!
//! **A new route matcher** (`foo: ...`): a `Matcher` variant in
//! `flow/model.rs`; its key in `MATCHERS` and its value parsed in
//! `Cx::matcher`, both in `flow/load/matchers.rs`; matching it in
//! `flow/matcher.rs` (`route_match`; in `flow/engine.rs` only if it needs
//! Rhai or run state, as `when` does); any rule it takes part in (a
//! consent word it would answer to, variables it saves) in
//! `flow/check.rs`; its label for `smsflow graph` in `route_label`
//! (`flow/outline.rs`); the "Matchers" table of flows/README.md; tests in
//! `tests/flow_engine.rs` (matching) and `tests/flow_check.rs` (load
//! errors).
//!
//! **A new Rhai helper**: register it in `register_helpers`
//! (`flow/script/helpers.rs`) with a unit test there. If it can build a
//! value larger than its inputs, or do work not counted in Rhai
//! operations, bound it before it builds (see `flow/script/bounded.rs`;
//! fixed bounds go in `flow/script/limits.rs`) and let it check
//! `run_over_budget`. It must read no clock and no file: time is the
//! run's `now`, randomness the run's seeded stream (`flow/script/run.rs`).
//! Document it in the "Helpers" table of flows/README.md, and its bound
//! under "Limits".
//!
//! **A config key**: a row in [`config::SETTINGS`]; its doc lists the
//! typed field, default and check that go with it, and tests fail until
//! they and README's settings table are there. `serve --help` and
//! `smsflow config` pick it up from the row.
//!
//! **A stored field**: a new record version with its migration (the
//! store's "Format versions"), never a field that old records lack
//! silently.

#![warn(missing_docs)]

pub mod admin_client;
pub mod app;
pub mod author;
pub mod broadcasts;
pub mod call_jobs;
pub mod calls;
pub mod cli;
pub(crate) mod clock;
pub mod compliance;
pub mod config;
pub mod contacts;
pub mod flow;
pub(crate) mod http;
pub mod messages;
pub(crate) mod metrics;
pub mod outbound;
pub mod pipeline;
pub mod reload;
pub mod results;
pub mod service;
pub mod starts;
pub mod store;
pub mod telemetry;
pub(crate) mod timers;
pub mod twilio;
pub(crate) mod versioned;
