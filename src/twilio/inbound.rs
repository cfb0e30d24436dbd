//! The incoming-message webhook as a typed value.
//!
//! [`InboundMessage::from_params`] checks the few parameters smsflow relies on
//! (`MessageSid`, `From`, `To`, the media list) and keeps every parameter,
//! unknown ones included, because Twilio adds parameters without notice and
//! later code (flows, logs) may want them.
//!
//! This module does not know whether the request was authentic: the caller
//! must have checked the signature over the same `Params` first.

use thiserror::Error;

use super::form::{first, Params};

/// Twilio's cap on media items per message, as a `NumMedia` value.
const MAX_MEDIA: u32 = super::limits::MAX_MEDIA as u32;

/// A parameter the webhook needs is absent or unusable.
///
/// Shared by inbound messages and status callbacks. The names are static
/// (Twilio's parameter names), never input, so the messages are safe to send
/// back in a 400 body.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParamError {
    /// A required parameter was absent or empty.
    #[error("missing parameter {0}")]
    Missing(&'static str),
    /// A parameter did not have the expected form.
    #[error("invalid parameter {0}")]
    Invalid(&'static str),
}

/// One media item attached to an MMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// `MediaUrlN`: where Twilio serves the media.
    pub url: String,
    /// `MediaContentTypeN`: its MIME type, if given.
    pub content_type: Option<String>,
}

/// Twilio's best-effort geographic lookup. Twilio sends the keys with empty
/// values when it knows nothing (`ToCity=`), so empty becomes `None` here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Geo {
    /// `FromCity`.
    pub from_city: Option<String>,
    /// `FromState`.
    pub from_state: Option<String>,
    /// `FromZip`.
    pub from_zip: Option<String>,
    /// `FromCountry`.
    pub from_country: Option<String>,
    /// `ToCity`.
    pub to_city: Option<String>,
    /// `ToState`.
    pub to_state: Option<String>,
    /// `ToZip`.
    pub to_zip: Option<String>,
    /// `ToCountry`.
    pub to_country: Option<String>,
}

/// An incoming SMS/MMS (or other-channel message) as Twilio posted it.
///
/// Values are exactly as received, never trimmed: a flow may care about a
/// leading space, and keyword matching does its own normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// `MessageSid`: Twilio's id of this message (the dedupe key).
    pub message_sid: String,
    /// `AccountSid`, if sent.
    pub account_sid: Option<String>,
    /// `MessagingServiceSid`, when the number belongs to a Messaging Service.
    pub messaging_service_sid: Option<String>,
    /// `From`: the sender's number.
    pub from: String,
    /// `To`: our number that received the message.
    pub to: String,
    /// Empty when Twilio sent no `Body` (an MMS may carry media only).
    pub body: String,
    /// `NumMedia` as declared, or the number of `MediaUrlN` found when absent.
    pub num_media: u32,
    /// The media items actually present, in index order; an index whose
    /// `MediaUrlN` is missing or empty is skipped rather than failing the
    /// whole message.
    pub media: Vec<Media>,
    /// `NumSegments`: how many SMS segments the message arrived in.
    pub num_segments: Option<u32>,
    /// `STOP`, `START` or `HELP`, only with Advanced Opt-Out enabled.
    pub opt_out_type: Option<String>,
    /// Twilio's geographic lookup of both numbers.
    pub geo: Geo,
    /// Every parameter as received, in order, repeats and unknown names kept.
    pub params: Params,
}

impl InboundMessage {
    /// Checks and types the parameters of an incoming-message webhook.
    ///
    /// Required: `MessageSid` (1 to 64 ASCII alphanumerics), `From`, `To`,
    /// all non-empty. `NumMedia` must be a decimal number no greater than 10.
    /// When a name repeats, the first value wins.
    pub fn from_params(params: Params) -> Result<Self, ParamError> {
        let known = Known::of(&params);
        let message_sid = checked_sid(known.message_sid)?;
        let from = present(known.from, "From")?;
        let to = present(known.to, "To")?;
        let body = known.body.unwrap_or_default().to_owned();

        let num_media = match known.num_media {
            Some(raw) => {
                let n = parse_count(raw).ok_or(ParamError::Invalid("NumMedia"))?;
                if n > MAX_MEDIA {
                    return Err(ParamError::Invalid("NumMedia"));
                }
                n
            }
            // Without a declared count, trust the contiguous MediaUrl0.. run.
            None => (0..MAX_MEDIA)
                .take_while(|n| first(&params, &format!("MediaUrl{n}")).is_some())
                .count() as u32,
        };
        let media = (0..num_media)
            .filter_map(|n| {
                let url = first(&params, &format!("MediaUrl{n}")).filter(|u| !u.is_empty())?;
                Some(Media {
                    url: url.to_owned(),
                    content_type: first(&params, &format!("MediaContentType{n}"))
                        .map(str::to_owned),
                })
            })
            .collect();

        let num_segments = match known.num_segments {
            Some(raw) => Some(parse_count(raw).ok_or(ParamError::Invalid("NumSegments"))?),
            None => None,
        };

        let [from_city, from_state, from_zip, from_country, to_city, to_state, to_zip, to_country] =
            known
                .geo
                .map(|v| v.filter(|v| !v.is_empty()).map(str::to_owned));
        let geo = Geo {
            from_city,
            from_state,
            from_zip,
            from_country,
            to_city,
            to_state,
            to_zip,
            to_country,
        };

        Ok(InboundMessage {
            message_sid,
            account_sid: known.account_sid.map(str::to_owned),
            messaging_service_sid: known.messaging_service_sid.map(str::to_owned),
            from,
            to,
            body,
            num_media,
            media,
            num_segments,
            opt_out_type: known.opt_out_type.map(str::to_owned),
            geo,
            params,
        })
    }
}

/// `MessageSid`, checked to look like a Twilio sid.
///
/// Real sids are 34 characters (`SM…`/`MM…`); the looser 1..=64 alphanumerics
/// rule keeps test fixtures easy while guaranteeing the value is safe to use
/// as a storage key and a log field.
pub(crate) fn message_sid(params: &[(String, String)]) -> Result<String, ParamError> {
    checked_sid(first(params, "MessageSid"))
}

fn checked_sid(sid: Option<&str>) -> Result<String, ParamError> {
    let sid = present(sid, "MessageSid")?;
    if sid.len() > 64 || !sid.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ParamError::Invalid("MessageSid"));
    }
    Ok(sid)
}

/// The first values of the parameters an inbound message reads, found in
/// one pass over them (a lookup per name went through every parameter
/// each time: about twenty names, twenty-odd parameters).
#[derive(Default)]
struct Known<'a> {
    message_sid: Option<&'a str>,
    from: Option<&'a str>,
    to: Option<&'a str>,
    body: Option<&'a str>,
    num_media: Option<&'a str>,
    num_segments: Option<&'a str>,
    account_sid: Option<&'a str>,
    messaging_service_sid: Option<&'a str>,
    opt_out_type: Option<&'a str>,
    /// `FromCity`, `FromState`, `FromZip`, `FromCountry`, `ToCity`,
    /// `ToState`, `ToZip`, `ToCountry`.
    geo: [Option<&'a str>; 8],
}

impl<'a> Known<'a> {
    fn of(params: &'a [(String, String)]) -> Self {
        let mut known = Known::default();
        for (name, value) in params {
            let slot = match name.as_str() {
                "MessageSid" => &mut known.message_sid,
                "From" => &mut known.from,
                "To" => &mut known.to,
                "Body" => &mut known.body,
                "NumMedia" => &mut known.num_media,
                "NumSegments" => &mut known.num_segments,
                "AccountSid" => &mut known.account_sid,
                "MessagingServiceSid" => &mut known.messaging_service_sid,
                "OptOutType" => &mut known.opt_out_type,
                "FromCity" => &mut known.geo[0],
                "FromState" => &mut known.geo[1],
                "FromZip" => &mut known.geo[2],
                "FromCountry" => &mut known.geo[3],
                "ToCity" => &mut known.geo[4],
                "ToState" => &mut known.geo[5],
                "ToZip" => &mut known.geo[6],
                "ToCountry" => &mut known.geo[7],
                _ => continue,
            };
            // When a name repeats, the first value wins (as `first`).
            slot.get_or_insert(value.as_str());
        }
        known
    }
}

/// `value`, which must be there and not empty.
fn present(value: Option<&str>, name: &'static str) -> Result<String, ParamError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(ParamError::Missing(name)),
    }
}

pub(crate) fn optional(params: &[(String, String)], name: &str) -> Option<String> {
    first(params, name).map(str::to_owned)
}

/// A plain decimal count. Stricter than `u32::from_str`, which would accept
/// `+3`: Twilio sends bare digits, so anything else is not from Twilio.
fn parse_count(raw: &str) -> Option<u32> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twilio::form::parse_form;

    /// A real inbound SMS in Twilio's parameter order (nyaruka/courier's
    /// `receiveValid` test request).
    const REAL_SMS: &[u8] = b"ToCountry=US&ToState=District+Of+Columbia&SmsMessageSid=SMe287d7109a5a925f182f0e07fe5b223b&NumMedia=0&ToCity=&FromZip=01022&SmsSid=SMe287d7109a5a925f182f0e07fe5b223b&FromState=MA&SmsStatus=received&FromCity=CHICOPEE&Body=Msg&FromCountry=US&To=%2B12028831111&ToZip=&NumSegments=1&MessageSid=SMe287d7109a5a925f182f0e07fe5b223b&AccountSid=acctid&From=%2B14133881111&ApiVersion=2010-04-01";

    fn pairs(list: &[(&str, &str)]) -> Params {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> Params {
        pairs(&[
            ("MessageSid", "SM123"),
            ("From", "+14155550100"),
            ("To", "+14155550199"),
        ])
    }

    #[test]
    fn parses_real_sms() {
        let params = parse_form(REAL_SMS).unwrap();
        let msg = InboundMessage::from_params(params.clone()).unwrap();
        assert_eq!(msg.message_sid, "SMe287d7109a5a925f182f0e07fe5b223b");
        assert_eq!(msg.from, "+14133881111");
        assert_eq!(msg.to, "+12028831111");
        assert_eq!(msg.body, "Msg");
        assert_eq!(msg.account_sid.as_deref(), Some("acctid"));
        assert_eq!(msg.messaging_service_sid, None);
        assert_eq!(msg.num_media, 0);
        assert!(msg.media.is_empty());
        assert_eq!(msg.num_segments, Some(1));
        assert_eq!(msg.opt_out_type, None);
        assert_eq!(msg.geo.to_state.as_deref(), Some("District Of Columbia"));
        assert_eq!(msg.geo.from_city.as_deref(), Some("CHICOPEE"));
        assert_eq!(msg.geo.from_zip.as_deref(), Some("01022"));
        assert_eq!(msg.geo.to_city, None);
        assert_eq!(msg.geo.to_zip, None);
        // Unknown parameters survive for the flows and the logs.
        assert_eq!(msg.params, params);
    }

    #[test]
    fn required_parameters() {
        for name in ["MessageSid", "From", "To"] {
            let without: Params = base().into_iter().filter(|(n, _)| n != name).collect();
            let err = InboundMessage::from_params(without).unwrap_err();
            assert_eq!(err, ParamError::Missing(name));
            assert_eq!(err.to_string(), format!("missing parameter {name}"));

            let empty: Params = base()
                .into_iter()
                .map(|(n, v)| {
                    if n == name {
                        (n, String::new())
                    } else {
                        (n, v)
                    }
                })
                .collect();
            assert_eq!(
                InboundMessage::from_params(empty),
                Err(ParamError::Missing(name))
            );
        }
    }

    #[test]
    fn message_sid_must_look_sane() {
        for bad in ["SM 1", "SM/../x", "SM-1", "SMé", &"A".repeat(65)] {
            let mut p = base();
            p[0].1 = bad.to_string();
            assert_eq!(
                InboundMessage::from_params(p),
                Err(ParamError::Invalid("MessageSid")),
                "{bad:?}"
            );
        }
        let mut p = base();
        p[0].1 = "A".repeat(64);
        assert!(InboundMessage::from_params(p).is_ok());
    }

    #[test]
    fn missing_body_is_empty_and_values_are_not_trimmed() {
        let msg = InboundMessage::from_params(base()).unwrap();
        assert_eq!(msg.body, "");
        let mut p = base();
        p.push(("Body".into(), "  STOP \n".into()));
        assert_eq!(InboundMessage::from_params(p).unwrap().body, "  STOP \n");
    }

    #[test]
    fn first_occurrence_wins() {
        let mut p = base();
        p.push(("Body".into(), "one".into()));
        p.push(("Body".into(), "two".into()));
        p.push(("From".into(), "+19990000000".into()));
        let msg = InboundMessage::from_params(p).unwrap();
        assert_eq!(msg.body, "one");
        assert_eq!(msg.from, "+14155550100");
    }

    #[test]
    fn collects_media() {
        let mut p = base();
        p.extend(pairs(&[
            ("NumMedia", "2"),
            ("MediaUrl0", "https://api.twilio.com/a"),
            ("MediaContentType0", "image/jpeg"),
            ("MediaUrl1", "https://api.twilio.com/b"),
            // Beyond NumMedia: ignored.
            ("MediaUrl2", "https://api.twilio.com/c"),
        ]));
        let msg = InboundMessage::from_params(p).unwrap();
        assert_eq!(msg.num_media, 2);
        assert_eq!(
            msg.media,
            vec![
                Media {
                    url: "https://api.twilio.com/a".into(),
                    content_type: Some("image/jpeg".into())
                },
                Media {
                    url: "https://api.twilio.com/b".into(),
                    content_type: None
                },
            ]
        );
    }

    #[test]
    fn counts_media_when_num_media_absent() {
        let mut p = base();
        p.extend(pairs(&[
            ("MediaUrl0", "u0"),
            ("MediaUrl1", "u1"),
            ("MediaUrl3", "u3"),
        ]));
        let msg = InboundMessage::from_params(p).unwrap();
        assert_eq!(msg.num_media, 2);
        assert_eq!(msg.media.len(), 2);
    }

    #[test]
    fn num_media_must_be_a_small_number() {
        for bad in ["x", "", "-1", "+1", "1.0", "11", "99999999999"] {
            let mut p = base();
            p.push(("NumMedia".into(), bad.into()));
            assert_eq!(
                InboundMessage::from_params(p),
                Err(ParamError::Invalid("NumMedia")),
                "{bad:?}"
            );
        }
        let mut p = base();
        p.push(("NumMedia".into(), "10".into()));
        assert_eq!(InboundMessage::from_params(p).unwrap().num_media, 10);
    }

    #[test]
    fn opt_out_type_and_service() {
        let mut p = base();
        p.push(("OptOutType".into(), "STOP".into()));
        p.push(("MessagingServiceSid".into(), "MG1".into()));
        let msg = InboundMessage::from_params(p).unwrap();
        assert_eq!(msg.opt_out_type.as_deref(), Some("STOP"));
        assert_eq!(msg.messaging_service_sid.as_deref(), Some("MG1"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(list in proptest::collection::vec(("[A-Za-z]{0,12}[0-9]?", ".*"), 0..12)) {
            let _ = InboundMessage::from_params(list);
        }

        /// Each field holds the first value of its parameter, as a lookup
        /// by name finds it, whatever the order and the repeats.
        #[test]
        fn fields_are_the_first_values_of_their_parameters(
            extra in proptest::collection::vec((
                proptest::sample::select(vec![
                    "MessageSid", "From", "To", "Body", "AccountSid", "MessagingServiceSid",
                    "OptOutType", "FromCity", "FromState", "FromZip", "FromCountry", "ToCity",
                    "ToState", "ToZip", "ToCountry", "NumSegments", "Bodyx", "from",
                ]),
                "[a-z0-9]{0,3}",
            ), 0..30),
            sid_first in proptest::bool::ANY,
        ) {
            let mut list: Params = extra.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
            // Valid required parameters, before or after the others.
            let required = base();
            list = if sid_first { [required, list].concat() } else { [list, required].concat() };
            let Ok(msg) = InboundMessage::from_params(list.clone()) else {
                // Only an invalid first MessageSid or NumSegments, or an
                // empty first From or To, is refused.
                let refused = ["MessageSid", "From", "To"]
                    .iter()
                    .any(|n| first(&list, n).is_none_or(|v| v.is_empty()))
                    || first(&list, "NumSegments").is_some_and(|v| parse_count(v).is_none());
                proptest::prop_assert!(refused);
                return Ok(());
            };
            let owned = |name: &str| first(&list, name).map(str::to_owned);
            let non_empty = |name: &str| owned(name).filter(|v| !v.is_empty());
            proptest::prop_assert_eq!(Some(msg.message_sid), owned("MessageSid"));
            proptest::prop_assert_eq!(Some(msg.from), owned("From"));
            proptest::prop_assert_eq!(Some(msg.to), owned("To"));
            proptest::prop_assert_eq!(msg.body, owned("Body").unwrap_or_default());
            proptest::prop_assert_eq!(msg.account_sid, owned("AccountSid"));
            proptest::prop_assert_eq!(msg.messaging_service_sid, owned("MessagingServiceSid"));
            proptest::prop_assert_eq!(msg.opt_out_type, owned("OptOutType"));
            proptest::prop_assert_eq!(msg.num_segments, first(&list, "NumSegments").and_then(parse_count));
            let geo = Geo {
                from_city: non_empty("FromCity"),
                from_state: non_empty("FromState"),
                from_zip: non_empty("FromZip"),
                from_country: non_empty("FromCountry"),
                to_city: non_empty("ToCity"),
                to_state: non_empty("ToState"),
                to_zip: non_empty("ToZip"),
                to_country: non_empty("ToCountry"),
            };
            proptest::prop_assert_eq!(msg.geo, geo);
        }
    }
}
