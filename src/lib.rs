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
//! ```text
//! http ─► twilio (verify, parse) ─► pipeline ─► flow::handle (pure) ─► twilio::render ─► store (commit, flush)
//!                                      ▲
//!                           reload ────┘ (ArcSwap<FlowSet>)
//! ```
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
//!   fallback with the conversation unchanged.
//! - [`store`]: the only module that knows sled; the [`store::Store`]
//!   trait. A conversation and its recent answers (for retries) are one
//!   record, written with one insert; the inbound message log is an
//!   append-only file beside the database. Its own thread groups flushes
//!   (each ending in a real `fdatasync`), writes checkpoints that expose a
//!   database sled silently truncated, and reopens the store after a
//!   failed write; undecodable records are kept aside in `quarantine/`.
//!   Every record carries its format version and is migrated on read
//!   (see the store's "Format versions"; golden records of each version
//!   under `src/store/golden/` must keep decoding).
//! - [`pipeline`]: one message in phases (dedupe, consent, loop guard,
//!   engine, render, commit, flush; see [`pipeline::Pipeline`]) under a
//!   per-conversation lock; silence is an outcome with a reason
//!   ([`pipeline::Silence`]), not an error. Knows the store trait and the
//!   engine, not axum.
//! - [`compliance`]: consent keywords (STOP/START/HELP) and the loop
//!   guard, decided before any flow runs.
//! - [`http`]: axum router, request checks, error-to-status mapping. Its
//!   `serve` (src/http/serve.rs) is the accept loop: header-read and idle
//!   timeouts, and at most `max_connections`, closing the longest-idle
//!   connection to make room for a new one.
//! - [`messages`]: the message log view behind `GET /messages` and
//!   `smsflow messages`.
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
//! - [`versioned`]: the encoding of every JSON record stored (`"v"` first,
//!   decode by version, migrate on read).
//! - [`clock`]: the wall clock, read in one place (the engine is given
//!   time).
//! - [`config`]: flags, environment and the TOML file merged into one
//!   validated `Config`; [`config::SETTINGS`] is the one table of settings
//!   (file keys, help, defaults) that `serve --help` and `smsflow config`
//!   are generated from.
//! - [`admin_client`], [`cli`], [`telemetry`], [`metrics`]: process
//!   plumbing.
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
//! - Messages of one (To, From) conversation are processed one at a time;
//!   different conversations never wait on each other's lock.
//! - Every request sees one whole flow set; a set with errors is never live.
//! - User text reaches TwiML only through the escaper.
//! - One log event is one line: [`telemetry`] escapes every field value.
//! - A script error never changes a conversation and never becomes a 5xx.
//! - Consent (STOP/START/HELP) is decided before any flow runs; nothing is
//!   sent to an opted-out sender.
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
//! - **A matcher** (a way a route reads a reply): a variant of `Matcher`
//!   in `flow/model.rs`; what it matches in `route_match`
//!   (`flow/matcher.rs`, pure, with a unit test); its route key in
//!   `flow/load.rs` (the `MATCHERS` list and the arm that parses it, so
//!   `check` locates its errors); its edge label in `flow/outline.rs`
//!   (`smsflow graph`); a row in the Matchers table of `flows/README.md`,
//!   and a transcript that uses it.
//! - **A Rhai helper**: one `engine.register_fn` in `register_helpers`
//!   (`flow/script.rs`), the only place an engine is built. A helper does
//!   no IO and reads no clock (`now()` is the message's time); a failure
//!   is a runtime error (`runtime(..)`), which becomes the flow's fallback.
//!   Add a unit test beside it and a row in the Helpers table of
//!   `flows/README.md`.
//! - **A config key**: a row in [`config::SETTINGS`]; its doc lists the
//!   typed field, default and check that go with it, and tests fail until
//!   they and README's settings table are there. `serve --help` and
//!   `smsflow config` pick it up from the row.
//! - **A stored field**: a new record version with its migration (the
//!   store's "Format versions"), never a field that old records lack
//!   silently.

pub mod admin_client;
pub mod app;
pub mod author;
pub mod cli;
pub mod clock;
pub mod compliance;
pub mod config;
pub mod flow;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod pipeline;
pub mod reload;
pub mod store;
pub mod telemetry;
pub mod twilio;
pub mod versioned;
