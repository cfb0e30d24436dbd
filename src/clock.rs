//! The wall clock, read in one place.
//!
//! The server reads the time here for messages, callbacks, reloads and the
//! store's failure reports; the flow engine never reads a clock (it is given
//! the time), and the author tools run on a virtual one. Knows nothing else.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock unix seconds (0 if the system clock is set before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Wall-clock unix milliseconds (0 if the system clock is set before
/// 1970): the timer scheduler sleeps to the millisecond.
pub fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
