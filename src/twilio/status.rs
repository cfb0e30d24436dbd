//! Message status callbacks: the status enum and the typed callback.
//!
//! Twilio posts a callback per status change of a message smsflow sent, but
//! the callbacks may arrive out of order (Twilio's "Track the Message
//! Status of Outbound Messages",
//! <https://www.twilio.com/docs/messaging/guides/track-outbound-message-status>). [`MessageStatus::rank`]
//! and [`MessageStatus::supersedes`] give the monotonic rule the store uses
//! so that a late `sent` never overwrites `delivered`.
//!
//! This module does not store anything and does not know which messages
//! smsflow sent; it only parses and orders.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::form::{first, Params};
use super::inbound::{message_sid, optional, ParamError};

/// A Message resource status: the 13 values of `message_enum_status` in
/// Twilio's OpenAPI spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// `queued`: accepted by Twilio, waiting to be sent.
    Queued,
    /// `sending`: being handed to the carrier.
    Sending,
    /// `sent`: accepted by the carrier.
    Sent,
    /// `delivered`: the carrier confirmed delivery.
    Delivered,
    /// `undelivered`: the carrier could not deliver it.
    Undelivered,
    /// `failed`: Twilio could not send it.
    Failed,
    /// `read`: the recipient read it (channels with read receipts).
    Read,
    /// `receiving`: an inbound message being received.
    Receiving,
    /// `received`: an inbound message that arrived.
    Received,
    /// `accepted`: a Messaging Service accepted it.
    Accepted,
    /// `scheduled`: scheduled to be sent later.
    Scheduled,
    /// `canceled`: a scheduled message that was canceled.
    Canceled,
    /// `partially_delivered`: some of its parts were delivered.
    PartiallyDelivered,
}

/// A status string Twilio's spec does not list.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown message status")]
pub struct UnknownStatus;

impl MessageStatus {
    /// Every status, in declaration order.
    pub const ALL: [MessageStatus; 13] = [
        MessageStatus::Queued,
        MessageStatus::Sending,
        MessageStatus::Sent,
        MessageStatus::Delivered,
        MessageStatus::Undelivered,
        MessageStatus::Failed,
        MessageStatus::Read,
        MessageStatus::Receiving,
        MessageStatus::Received,
        MessageStatus::Accepted,
        MessageStatus::Scheduled,
        MessageStatus::Canceled,
        MessageStatus::PartiallyDelivered,
    ];

    /// The wire name, as Twilio sends it.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Queued => "queued",
            MessageStatus::Sending => "sending",
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Undelivered => "undelivered",
            MessageStatus::Failed => "failed",
            MessageStatus::Read => "read",
            MessageStatus::Receiving => "receiving",
            MessageStatus::Received => "received",
            MessageStatus::Accepted => "accepted",
            MessageStatus::Scheduled => "scheduled",
            MessageStatus::Canceled => "canceled",
            MessageStatus::PartiallyDelivered => "partially_delivered",
        }
    }

    /// Position in a message's life, for monotonic updates.
    ///
    /// - 0: `accepted`, `scheduled` (Messaging Service, before queueing)
    /// - 1: `queued`, and inbound `receiving`
    /// - 2: `sending`
    /// - 3: `sent` (the carrier took it; a DLR may or may not follow)
    /// - 5: the outcomes `delivered`, `undelivered`, `failed`, `canceled`,
    ///   `partially_delivered`, and inbound `received`
    /// - 6: `read` (WhatsApp/RCS receipt, which only follows a delivery)
    ///
    /// The outcomes share one rank on purpose: Twilio never moves a message
    /// from one outcome to another, so if two disagree, the first one
    /// recorded is kept rather than guessing which is true.
    pub fn rank(self) -> u8 {
        match self {
            MessageStatus::Accepted | MessageStatus::Scheduled => 0,
            MessageStatus::Queued | MessageStatus::Receiving => 1,
            MessageStatus::Sending => 2,
            MessageStatus::Sent => 3,
            MessageStatus::Delivered
            | MessageStatus::Undelivered
            | MessageStatus::Failed
            | MessageStatus::Canceled
            | MessageStatus::PartiallyDelivered
            | MessageStatus::Received => 5,
            MessageStatus::Read => 6,
        }
    }

    /// Whether a callback reporting `self` should replace a stored `old`:
    /// only a strictly higher rank does.
    pub fn supersedes(self, old: MessageStatus) -> bool {
        self.rank() > old.rank()
    }

    /// Whether Twilio will report nothing further, except possibly `read`.
    pub fn is_final(self) -> bool {
        self.rank() >= 5
    }
}

impl FromStr for MessageStatus {
    type Err = UnknownStatus;

    /// Accepts exactly the lowercase wire names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MessageStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or(UnknownStatus)
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status callback for a message smsflow sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCallback {
    /// `MessageSid`: the message this callback is about.
    pub message_sid: String,
    /// `MessageStatus`: its new status.
    pub status: MessageStatus,
    /// Twilio's error code (`21610`, `30003`, …) on `failed`/`undelivered`;
    /// an empty `ErrorCode` counts as none.
    pub error_code: Option<String>,
    /// `To`: the recipient, if sent.
    pub to: Option<String>,
    /// `From`: our sending number, if sent.
    pub from: Option<String>,
    /// `AccountSid`, if sent.
    pub account_sid: Option<String>,
    /// `MessagingServiceSid`, if sent.
    pub messaging_service_sid: Option<String>,
    /// Every parameter as received (`RawDlrDoneDate`, `ChannelPrefix`, …).
    pub params: Params,
}

impl StatusCallback {
    /// Checks and types a status callback.
    ///
    /// `MessageSid` is required and checked as for inbound messages. The
    /// status comes from `MessageStatus`, or from the older `SmsStatus` when
    /// that is absent; it must be one of the known statuses.
    pub fn from_params(params: Params) -> Result<Self, ParamError> {
        let message_sid = message_sid(&params)?;
        let raw_status = first(&params, "MessageStatus")
            .or_else(|| first(&params, "SmsStatus"))
            .ok_or(ParamError::Missing("MessageStatus"))?;
        let status = raw_status
            .parse()
            .map_err(|_| ParamError::Invalid("MessageStatus"))?;
        let error_code = first(&params, "ErrorCode")
            .filter(|code| !code.is_empty())
            .map(str::to_owned);
        Ok(StatusCallback {
            message_sid,
            status,
            error_code,
            to: optional(&params, "To"),
            from: optional(&params, "From"),
            account_sid: optional(&params, "AccountSid"),
            messaging_service_sid: optional(&params, "MessagingServiceSid"),
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twilio::form::parse_form;
    use MessageStatus::*;

    fn callback(raw: &[u8]) -> Result<StatusCallback, ParamError> {
        StatusCallback::from_params(parse_form(raw).expect("valid form"))
    }

    #[test]
    fn parses_real_delivered_callback() {
        // A captured callback from the department-of-veterans-affairs/
        // notification-api test fixtures.
        let cb = callback(b"RawDlrDoneDate=2303222338&SmsSid=SMxxx&SmsStatus=delivered&MessageStatus=delivered&To=%2B11111111111&MessageSid=SMyyy&AccountSid=ACzzz&From=%2B12223334444&ApiVersion=2010-04-01").unwrap();
        assert_eq!(cb.message_sid, "SMyyy");
        assert_eq!(cb.status, Delivered);
        assert_eq!(cb.error_code, None);
        assert_eq!(cb.to.as_deref(), Some("+11111111111"));
        assert_eq!(cb.from.as_deref(), Some("+12223334444"));
        assert_eq!(cb.account_sid.as_deref(), Some("ACzzz"));
        assert_eq!(cb.messaging_service_sid, None);
        assert_eq!(cb.params.len(), 9);
    }

    #[test]
    fn parses_failed_after_stop() {
        // nyaruka/courier's `statusStop` test callback (sid filled in).
        let cb =
            callback(b"ErrorCode=21610&MessageSid=SM123&MessageStatus=failed&To=%2B12028831111")
                .unwrap();
        assert_eq!(cb.status, Failed);
        assert_eq!(cb.error_code.as_deref(), Some("21610"));
    }

    #[test]
    fn parses_docs_sent_example() {
        // The `sent` example of Twilio's status tracking guide: AccountSid,
        // From, MessageSid, MessageStatus=sent, SmsSid, SmsStatus=sent.
        let cb = callback(b"AccountSid=AC1&From=%2B15017122661&MessageSid=SM1&MessageStatus=sent&SmsSid=SM1&SmsStatus=sent").unwrap();
        assert_eq!(cb.status, Sent);
        assert_eq!(cb.to, None);
    }

    #[test]
    fn falls_back_to_sms_status() {
        let cb = callback(b"MessageSid=SM1&SmsStatus=undelivered&ErrorCode=").unwrap();
        assert_eq!(cb.status, Undelivered);
        assert_eq!(cb.error_code, None);
        // MessageStatus wins when both are present.
        let cb = callback(b"MessageSid=SM1&SmsStatus=sent&MessageStatus=delivered").unwrap();
        assert_eq!(cb.status, Delivered);
    }

    #[test]
    fn rejects_bad_callbacks() {
        assert_eq!(
            callback(b"MessageStatus=sent"),
            Err(ParamError::Missing("MessageSid"))
        );
        assert_eq!(
            callback(b"MessageSid=SM1"),
            Err(ParamError::Missing("MessageStatus"))
        );
        for bad in ["bogus", "Delivered", "", " sent", "partially-delivered"] {
            let raw = format!("MessageSid=SM1&MessageStatus={bad}");
            assert_eq!(
                callback(raw.as_bytes()),
                Err(ParamError::Invalid("MessageStatus")),
                "{bad:?}"
            );
        }
        assert_eq!(
            callback(b"MessageSid=SM+1&MessageStatus=sent"),
            Err(ParamError::Invalid("MessageSid"))
        );
    }

    #[test]
    fn wire_names_round_trip() {
        for status in MessageStatus::ALL {
            assert_eq!(status.as_str().parse(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
            assert_eq!(
                serde_json::from_str::<MessageStatus>(&json).unwrap(),
                status
            );
        }
        assert_eq!("partially_delivered".parse(), Ok(PartiallyDelivered));
        assert_eq!("nope".parse::<MessageStatus>(), Err(UnknownStatus));
    }

    #[test]
    fn rank_orders_the_outbound_life() {
        let path = [Accepted, Queued, Sending, Sent, Delivered, Read];
        for pair in path.windows(2) {
            assert!(
                pair[1].supersedes(pair[0]),
                "{:?} -> {:?}",
                pair[0],
                pair[1]
            );
            assert!(
                !pair[0].supersedes(pair[1]),
                "{:?} <- {:?}",
                pair[0],
                pair[1]
            );
        }
        assert_eq!(Scheduled.rank(), Accepted.rank());
        assert!(Canceled.supersedes(Scheduled));
        assert!(Received.supersedes(Receiving));
    }

    #[test]
    fn late_callbacks_never_downgrade() {
        for late in [Accepted, Scheduled, Queued, Sending, Sent] {
            for done in [Delivered, Undelivered, Failed, Canceled, PartiallyDelivered] {
                assert!(!late.supersedes(done), "{late:?} over {done:?}");
                assert!(done.supersedes(late));
            }
        }
    }

    #[test]
    fn outcomes_do_not_replace_each_other() {
        let outcomes = [
            Delivered,
            Undelivered,
            Failed,
            Canceled,
            PartiallyDelivered,
            Received,
        ];
        for a in outcomes {
            assert!(a.is_final());
            for b in outcomes {
                assert!(!a.supersedes(b), "{a:?} over {b:?}");
            }
        }
        // The same status twice (a retried callback) is not an update.
        for s in MessageStatus::ALL {
            assert!(!s.supersedes(s));
        }
    }
}
