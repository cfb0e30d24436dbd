//! smsflow: an SMS auto-responder behind a Twilio number.
//!
//! (architecture map written as the modules land)
//!
//! - [`flow`]: flow files -> validated `FlowSet` (with located diagnostics),
//!   and the pure step function `flow::handle`. No IO in the engine, no
//!   clock, no Twilio or store types.

pub mod flow;
