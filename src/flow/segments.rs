//! How many SMS segments a message body costs: GSM-7 when every character
//! is in the GSM 03.38 default alphabet (or its extension table), UCS-2
//! otherwise.
//!
//! Used by `check` to warn authors before a reply quietly doubles in price.
//! It knows nothing of flows; carriers may still re-encode, so this is an
//! estimate of what Twilio bills, not a guarantee.

use crate::twilio::limits::{GSM7_PART, GSM7_SINGLE_SEGMENT, UCS2_PART, UCS2_SINGLE_SEGMENT};

/// The GSM 03.38 basic character set, minus the escape code itself.
const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The extension table: each costs two septets (escape + code).
const GSM_EXTENSION: &str = "\u{c}^{}\\[~]|€";

/// Which alphabet a body is sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// 7-bit default alphabet: 160 septets in one segment, 153 per part.
    Gsm7,
    /// UTF-16: 70 code units in one segment, 67 per part.
    Ucs2,
}

impl Encoding {
    /// Short name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        }
    }

    /// Units (septets or UTF-16 code units) one single-segment SMS holds.
    pub fn single_segment(self) -> usize {
        match self {
            Encoding::Gsm7 => GSM7_SINGLE_SEGMENT,
            Encoding::Ucs2 => UCS2_SINGLE_SEGMENT,
        }
    }

    /// Units each part of a multi-part SMS holds.
    pub fn part(self) -> usize {
        match self {
            Encoding::Gsm7 => GSM7_PART,
            Encoding::Ucs2 => UCS2_PART,
        }
    }
}

/// The cost of one body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    /// Alphabet the body needs.
    pub encoding: Encoding,
    /// Septets (GSM-7) or UTF-16 code units (UCS-2).
    pub units: usize,
    /// Number of SMS segments; 0 for an empty body.
    pub count: usize,
}

fn gsm_cost(c: char) -> Option<usize> {
    if GSM_BASIC.contains(c) {
        Some(1)
    } else if GSM_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Count the segments `text` needs.
///
/// Multi-part messages carry a header, so parts hold 153 septets / 67 code
/// units, and a character is never split across two parts (an extension
/// character's escape pair or a surrogate pair stays together), which is
/// why this fills parts greedily instead of dividing.
pub fn count(text: &str) -> Segments {
    let gsm: Option<Vec<usize>> = text.chars().map(gsm_cost).collect();
    let (encoding, costs) = match gsm {
        Some(costs) => (Encoding::Gsm7, costs),
        None => (Encoding::Ucs2, text.chars().map(char::len_utf16).collect()),
    };
    let (single, part) = (encoding.single_segment(), encoding.part());
    let units: usize = costs.iter().sum();
    let count = if units == 0 {
        0
    } else if units <= single {
        1
    } else {
        let mut parts = 1;
        let mut used = 0;
        for c in costs {
            if used + c > part {
                parts += 1;
                used = 0;
            }
            used += c;
        }
        parts
    };
    Segments {
        encoding,
        units,
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm_boundaries() {
        assert_eq!(count("").count, 0);
        assert_eq!(count(&"a".repeat(160)).count, 1);
        assert_eq!(count(&"a".repeat(161)).count, 2);
        assert_eq!(count(&"a".repeat(306)).count, 2);
        assert_eq!(count(&"a".repeat(307)).count, 3);
        assert_eq!(count("Hello @ £5 é").encoding, Encoding::Gsm7);
    }

    #[test]
    fn extension_costs_two_and_never_splits() {
        let s = count(&"€".repeat(80));
        assert_eq!((s.encoding, s.units, s.count), (Encoding::Gsm7, 160, 1));
        assert_eq!(count(&"€".repeat(81)).count, 2);
        // 152 plain + one extension char: 154 septets, the pair moves to part 2.
        let s = count(&format!("{}{}{}", "a".repeat(152), "[", "a".repeat(10)));
        assert_eq!((s.units, s.count), (164, 2));
    }

    #[test]
    fn ucs2_boundaries() {
        assert_eq!(count(&"é".repeat(70)).encoding, Encoding::Gsm7);
        assert_eq!(count(&"ç".repeat(70)).encoding, Encoding::Ucs2);
        assert_eq!(count(&"ç".repeat(70)).count, 1);
        assert_eq!(count(&"ç".repeat(71)).count, 2);
        // One emoji is two code units and flips the whole body to UCS-2.
        let s = count(&format!("{}😀", "a".repeat(68)));
        assert_eq!((s.encoding, s.units, s.count), (Encoding::Ucs2, 70, 1));
        assert_eq!(count(&"😀".repeat(35)).count, 1);
        // 36 emoji = 72 units; a part holds 33 whole pairs (66 units).
        assert_eq!(count(&"😀".repeat(36)).count, 2);
        assert_eq!(count(&"😀".repeat(67)).count, 3);
    }
}
