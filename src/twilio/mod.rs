//! The Twilio wire format: everything smsflow needs to understand Twilio's
//! webhook requests and to answer them.
//!
//! - [`form`] decodes `application/x-www-form-urlencoded` bodies exactly,
//!   because the signature is computed over the decoded values and any
//!   framework-side trimming or merging would break it.
//! - [`signature`] checks `X-Twilio-Signature` the way the official helper
//!   libraries do.
//! - [`inbound`] and [`status`] turn decoded parameters into typed
//!   incoming-message and status-callback values.
//! - [`twiml`] renders the XML reply, enforcing Twilio's size limits (and
//!   reads it back for the author tools).
//! - [`limits`] holds those limits (characters, messages, media, SMS
//!   segment sizes), defined once for the renderer, the engine and `check`.
//!
//! This module knows nothing of HTTP servers, storage or flows: it takes bytes
//! and strings in and gives values and strings out. Which URL to validate
//! against is the caller's business: the public URL Twilio was configured
//! with, exactly as encoded and without the fragment, never one rebuilt
//! from the Host header (a TLS-terminating proxy changes scheme, host or
//! path; Twilio's error 57012 says to validate "with the exact webhook URL
//! Twilio requested").

pub mod form;
pub mod inbound;
pub mod limits;
pub mod signature;
pub mod status;
pub mod twiml;

pub use form::{encode_form, parse_form, FormError, Params, MAX_FORM_PARAMS};
pub use inbound::{Geo, InboundMessage, Media, ParamError};
pub use signature::RequestValidator;
pub use status::{MessageStatus, StatusCallback};
pub use twiml::{messages_in, render, render_counted, OutMessage, SILENCE};
