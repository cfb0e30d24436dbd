//! smsflow: an SMS auto-responder behind a Twilio number.
//!
//! (architecture map written as the modules land)

pub mod flow;
