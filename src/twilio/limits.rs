//! Twilio's message limits, defined once. The TwiML renderer enforces them,
//! the flow engine splits and caps replies by them, `check` warns and
//! refuses by them, and the webhook parser caps inbound media by them.
//!
//! Sources: Twilio's `<Message>` TwiML reference
//! (<https://www.twilio.com/docs/messaging/twiml/message>), the incoming
//! message webhook reference
//! (<https://www.twilio.com/docs/messaging/guides/webhook-request>), and
//! error 14103 / warning 14109 in Twilio's error dictionary.

/// Longest body of one `<Message>` (error 14103), counted here in `char`s
/// (code points). Twilio does not document its unit; if it counts UTF-16
/// units, a body full of emoji could still exceed it.
pub const MAX_BODY_CHARS: usize = 1600;

/// Most replies Twilio sends for one incoming message: `<Message>` verbs
/// per TwiML response (warning 14109).
pub const MAX_MESSAGES: usize = 10;

/// Most media items per message: `<Media>` nouns per `<Message>`, and
/// `NumMedia` on an incoming message.
pub const MAX_MEDIA: usize = 10;

/// GSM-7 (the 7-bit default alphabet): septets in a single-segment SMS.
pub const GSM7_SINGLE_SEGMENT: usize = 160;
/// GSM-7: septets per part of a multi-part SMS (the rest is its header).
pub const GSM7_PART: usize = 153;
/// UCS-2 (UTF-16): code units in a single-segment SMS.
pub const UCS2_SINGLE_SEGMENT: usize = 70;
/// UCS-2: code units per part of a multi-part SMS.
pub const UCS2_PART: usize = 67;
