//! One integration-test binary: the real server over real HTTP, and the
//! author tools (chat, test, graph) over the real pipeline and binary, and
//! every shipped transcript compared with the server over HTTP.

mod author;
mod broadcast_crash;
mod broadcasts;
mod calls;
mod campaigns;
mod compliance;
mod conformance;
mod contacts;
mod conversation;
mod crash;
mod export;
mod fake_twilio;
mod health;
mod helpers;
mod hostile;
mod hygiene;
mod logs;
mod outbound;
mod pg;
mod postgres;
mod process;
mod reload;
mod replies;
mod results_crash;
mod scripts;
mod service;
mod starts;
mod store;
mod timers;
mod transcripts;
mod webhook;
