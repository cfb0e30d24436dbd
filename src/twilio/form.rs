//! Exact decoding of `application/x-www-form-urlencoded` bodies.
//!
//! Twilio signs the *decoded* parameter values, so the decoder must be
//! lossless: no trimming, no merging of repeated names, no silent repair of
//! bad escapes. Frameworks' form extractors do not promise that, which is why
//! the webhook handlers decode the raw body here instead.
//!
//! This module does not know what the parameters mean; see `inbound` and
//! `status` for that.

use thiserror::Error;

/// Form pairs in the order they were received, repeated names kept.
///
/// A vector rather than a map because the signature covers every value of a
/// repeated name, and because order helps when logging a request.
pub type Params = Vec<(String, String)>;

/// Most parameters a form may carry. Twilio sends a few dozen (an MMS with
/// ten media adds twenty); the bound keeps a forged request with thousands
/// of them from costing a sort and an HMAC over all of them, and is checked
/// before anything is decoded.
pub const MAX_FORM_PARAMS: usize = 256;

/// Why a form body could not be decoded.
///
/// The messages are meant to be safe as a 400 response body: they name a
/// byte offset at most, never the (attacker-chosen) input itself.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    #[error("bad percent-encoding at byte {position}")]
    BadPercentEncoding {
        /// Byte offset of the offending `%` in the raw body.
        position: usize,
    },
    /// A name or value that does not decode to UTF-8. `name` is the decoded
    /// parameter name (lossily converted) so that logs can say which field;
    /// it is deliberately left out of the message.
    #[error("form field is not valid utf-8")]
    InvalidUtf8 {
        /// The parameter name, lossily decoded.
        name: String,
    },
    /// More than [`MAX_FORM_PARAMS`] parameters.
    #[error("more than {max} parameters")]
    TooManyParams {
        /// The limit that was exceeded.
        max: usize,
    },
}

/// Decodes a form body exactly.
///
/// Pairs are split on `&`; empty segments (`a=1&&b=2`) are skipped. The first
/// `=` separates name from value, and a segment without `=` is a name with an
/// empty value. `+` becomes a space and `%XX` is percent-decoded; the decoded
/// bytes must be UTF-8. Nothing is trimmed, and control characters (even NUL)
/// are kept: the TwiML renderer strips what XML cannot carry. More than
/// [`MAX_FORM_PARAMS`] non-empty pairs is an error, found before decoding.
pub fn parse_form(raw: &[u8]) -> Result<Params, FormError> {
    let pairs = raw
        .split(|&b| b == b'&')
        .filter(|segment| !segment.is_empty())
        .count();
    if pairs > MAX_FORM_PARAMS {
        return Err(FormError::TooManyParams {
            max: MAX_FORM_PARAMS,
        });
    }
    let mut params = Vec::with_capacity(pairs);
    // Nearly every body is ASCII (a form encodes the rest), so nearly
    // every part is a slice of valid UTF-8 without a `%`: copied as it is.
    let text = std::str::from_utf8(raw).ok();
    let mut start = 0;
    for segment in raw.split(|&b| b == b'&') {
        let offset = start;
        // The `+ 1` skips the `&` separator itself.
        start += segment.len() + 1;
        if segment.is_empty() {
            continue;
        }
        let end = offset + segment.len();
        let (name_end, value_start) = match segment.iter().position(|&b| b == b'=') {
            Some(eq) => (offset + eq, offset + eq + 1),
            None => (end, end),
        };
        let name = decode_part(raw, text, offset, name_end)?;
        let value = decode_part(raw, text, value_start, end)?;
        let name = match name {
            Ok(name) => name,
            Err(bytes) => {
                return Err(FormError::InvalidUtf8 {
                    name: String::from_utf8_lossy(&bytes).into_owned(),
                })
            }
        };
        let value = value.map_err(|_| FormError::InvalidUtf8 { name: name.clone() })?;
        params.push((name, value));
    }
    Ok(params)
}

/// Decodes the name or value at `start..end` of the body `raw`: the
/// string, or its decoded bytes when they are not UTF-8. `text` is the
/// body when it is UTF-8; a part without `%` is then a slice of it (its
/// ends are at `&`, `=` or the body's ends, all ASCII), copied with `+`
/// made a space, without decoding byte by byte or checking UTF-8 again.
fn decode_part(
    raw: &[u8],
    text: Option<&str>,
    start: usize,
    end: usize,
) -> Result<Result<String, Vec<u8>>, FormError> {
    let part = &raw[start..end];
    if let Some(text) = text.filter(|_| !part.contains(&b'%')) {
        let part = &text[start..end];
        return Ok(Ok(part.replace('+', " ")));
    }
    Ok(String::from_utf8(decode_component(part, start)?).map_err(|e| e.into_bytes()))
}

/// Decodes one name or value. `offset` is where `part` starts in the whole
/// body, so that errors can point at the right byte.
fn decode_component(part: &[u8], offset: usize) -> Result<Vec<u8>, FormError> {
    let mut out = Vec::with_capacity(part.len());
    let mut i = 0;
    while i < part.len() {
        match part[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = part.get(i + 1).copied().and_then(hex_value);
                let lo = part.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => {
                        return Err(FormError::BadPercentEncoding {
                            position: offset + i,
                        })
                    }
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The first value of `name`, if any.
///
/// First occurrence wins: Twilio never repeats the parameters smsflow reads,
/// so a repeat is either noise or tampering, and taking the first keeps the
/// choice deterministic. (The signature still covers every value.)
pub(crate) fn first<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Encode pairs as `application/x-www-form-urlencoded` the way Twilio
/// does: space as `+`, unreserved characters kept, everything else `%XX`.
/// `parse_form(encode_form(p))` gives back `p` exactly.
pub fn encode_form(params: &[(String, String)]) -> String {
    fn push(out: &mut String, s: &str) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.push('%');
                    out.push(HEX[(b >> 4) as usize] as char);
                    out.push(HEX[(b & 15) as usize] as char);
                }
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        push(&mut out, k);
        out.push('=');
        push(&mut out, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Params {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_input_is_empty() {
        assert_eq!(parse_form(b""), Ok(vec![]));
    }

    #[test]
    fn decodes_plus_and_percent() {
        let got = parse_form(b"To=%2B12028831111&ToState=District+Of+Columbia").unwrap();
        assert_eq!(
            got,
            pairs(&[("To", "+12028831111"), ("ToState", "District Of Columbia")])
        );
    }

    #[test]
    fn keeps_order_repeats_and_empty_values() {
        let got = parse_form(b"b=2&a=1&b=3&ToCity=&flag").unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("b", "2"),
                ("a", "1"),
                ("b", "3"),
                ("ToCity", ""),
                ("flag", "")
            ])
        );
    }

    #[test]
    fn first_equals_splits_and_later_ones_are_value() {
        assert_eq!(parse_form(b"a=b=c").unwrap(), pairs(&[("a", "b=c")]));
        assert_eq!(parse_form(b"=x").unwrap(), pairs(&[("", "x")]));
    }

    #[test]
    fn skips_empty_segments() {
        assert_eq!(
            parse_form(b"&a=1&&b=2&").unwrap(),
            pairs(&[("a", "1"), ("b", "2")])
        );
    }

    #[test]
    fn never_trims() {
        assert_eq!(
            parse_form(b"Body=+hi+%0A&+x+=%20").unwrap(),
            pairs(&[("Body", " hi \n"), (" x ", " ")])
        );
    }

    #[test]
    fn keeps_nul_and_utf8() {
        assert_eq!(
            parse_form(b"Body=a%00b%C3%A9%F0%9F%98%80").unwrap(),
            pairs(&[("Body", "a\0bé😀")])
        );
    }

    #[test]
    fn rejects_bad_escapes_with_position() {
        assert_eq!(
            parse_form(b"a=1&b=%4"),
            Err(FormError::BadPercentEncoding { position: 6 })
        );
        assert_eq!(
            parse_form(b"a=%zz"),
            Err(FormError::BadPercentEncoding { position: 2 })
        );
        assert_eq!(
            parse_form(b"ab%"),
            Err(FormError::BadPercentEncoding { position: 2 })
        );
        assert_eq!(
            parse_form(b"x=1&%g1=2"),
            Err(FormError::BadPercentEncoding { position: 4 })
        );
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            parse_form(b"Body=%FF"),
            Err(FormError::InvalidUtf8 {
                name: "Body".into()
            })
        );
        // Raw (unescaped) invalid bytes too.
        assert!(matches!(
            parse_form(b"Bo\xffdy=1"),
            Err(FormError::InvalidUtf8 { .. })
        ));
    }

    #[test]
    fn error_messages_are_short_and_lowercase() {
        let e = FormError::BadPercentEncoding { position: 3 };
        assert_eq!(e.to_string(), "bad percent-encoding at byte 3");
        let e = FormError::InvalidUtf8 {
            name: "<script>".into(),
        };
        assert_eq!(e.to_string(), "form field is not valid utf-8");
    }

    #[test]
    fn bounds_the_number_of_parameters() {
        let at_limit = vec!["a=1"; MAX_FORM_PARAMS].join("&");
        assert_eq!(
            parse_form(at_limit.as_bytes()).unwrap().len(),
            MAX_FORM_PARAMS
        );
        // Empty segments do not count; one more real pair does.
        let padded = format!("{at_limit}&&&");
        assert!(parse_form(padded.as_bytes()).is_ok());
        let over = format!("{at_limit}&b=2");
        assert_eq!(
            parse_form(over.as_bytes()),
            Err(FormError::TooManyParams {
                max: MAX_FORM_PARAMS
            })
        );
        assert_eq!(
            FormError::TooManyParams { max: 256 }.to_string(),
            "more than 256 parameters"
        );
    }

    #[test]
    fn first_occurrence_wins() {
        let p = pairs(&[("a", "1"), ("a", "2")]);
        assert_eq!(first(&p, "a"), Some("1"));
        assert_eq!(first(&p, "b"), None);
    }

    /// The decoder before parts were copied whole: every part decoded
    /// byte by byte, then checked for UTF-8.
    fn byte_by_byte(raw: &[u8]) -> Result<Params, FormError> {
        if raw.split(|&b| b == b'&').filter(|s| !s.is_empty()).count() > MAX_FORM_PARAMS {
            return Err(FormError::TooManyParams {
                max: MAX_FORM_PARAMS,
            });
        }
        let mut params = Vec::new();
        let mut start = 0;
        for segment in raw.split(|&b| b == b'&') {
            let offset = start;
            start += segment.len() + 1;
            if segment.is_empty() {
                continue;
            }
            let (name, value, value_offset) = match segment.iter().position(|&b| b == b'=') {
                Some(eq) => (&segment[..eq], &segment[eq + 1..], offset + eq + 1),
                None => (segment, &segment[segment.len()..], offset + segment.len()),
            };
            let name = decode_component(name, offset)?;
            let value = decode_component(value, value_offset)?;
            let name = String::from_utf8(name).map_err(|e| FormError::InvalidUtf8 {
                name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            })?;
            let value = String::from_utf8(value)
                .map_err(|_| FormError::InvalidUtf8 { name: name.clone() })?;
            params.push((name, value));
        }
        Ok(params)
    }

    proptest::proptest! {
        #[test]
        fn never_panics(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_form(&raw);
        }

        /// Parts copied whole (UTF-8 bodies, no `%`) decode as the byte
        /// by byte decoder does, errors included.
        #[test]
        fn copied_parts_decode_as_byte_by_byte(
            raw in proptest::collection::vec(
                proptest::sample::select(b"ab=&+%2F0e\xc3\xa9\xff \x00".to_vec()), 0..60)
        ) {
            proptest::prop_assert_eq!(parse_form(&raw), byte_by_byte(&raw));
        }

        #[test]
        fn round_trips_through_encoding(
            list in proptest::collection::vec((".*", ".*"), 0..8)
        ) {
            // Empty names with empty values encode to `=`, which is not an
            // empty segment, so nothing is lost.
            let pairs: Vec<(String, String)> = list.clone();
            let raw = encode_form(&pairs);
            proptest::prop_assert_eq!(parse_form(raw.as_bytes()).unwrap(), list);
        }
    }
}
