//! Which senders may have a consent record: a filter in memory that lets
//! the sled store answer "no record" for most webhooks without reading
//! the database.
//!
//! Every inbound message asks the store whether its sender opted out
//! ([`super::Store::opt_out`]). Almost nobody has, and each answer was a
//! sled lookup: about 1.4% of the server's CPU per message under the
//! durable multi-step load (`perf record`, README "Performance").
//!
//! The filter is one bit per bucket of a hash of the record's key, keyed
//! at random per process. A consent record's bit is set before the
//! record is written, and the store reads sled only when the bit is set.
//! So a clear bit means no consent record was written since the database
//! was opened and none was on disk then: the same answer the read would
//! have given. Bits are never cleared: a removed record (a forgotten
//! contact) leaves its bit set, and a number that shares a bucket with
//! an opted-out one is read as before. Both only cost the read every
//! webhook made before.
//!
//! Filled at open, and again at a reopen, from the consent records on
//! disk (sled lets one process open a database at a time, so every
//! later record is written by this store and passes through
//! [`ConsentFilter::add`]).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets: 2^19 bits, 64 KiB. With 10,000 records about 2% of the
/// buckets are set, so 2% of the other senders' webhooks still read.
const BITS: usize = 1 << 19;

pub(super) struct ConsentFilter {
    hasher: std::collections::hash_map::RandomState,
    words: Box<[AtomicU64]>,
}

impl ConsentFilter {
    pub(super) fn new() -> Self {
        ConsentFilter {
            hasher: std::collections::hash_map::RandomState::new(),
            words: (0..BITS / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bucket(&self, key: &[u8]) -> (&AtomicU64, u64) {
        let bit = self.hasher.hash_one(key) as usize % BITS;
        (&self.words[bit / 64], 1 << (bit % 64))
    }

    /// Note that a consent record is, or is about to be, under `key`.
    /// Called before the record is written.
    pub(super) fn add(&self, key: &[u8]) {
        let (word, bit) = self.bucket(key);
        word.fetch_or(bit, Ordering::SeqCst);
    }

    /// Whether a consent record may be under `key`; `false` means there is
    /// none.
    pub(super) fn may_hold(&self, key: &[u8]) -> bool {
        let (word, bit) = self.bucket(key);
        word.load(Ordering::SeqCst) & bit != 0
    }

    /// Add every key of `db` under `prefix`.
    pub(super) fn add_all(&self, db: &sled::Db, prefix: &[u8]) -> sled::Result<()> {
        for key in db.scan_prefix(prefix).keys() {
            self.add(&key?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever was added is found.
        #[test]
        fn an_added_key_is_always_found(
            added in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..200),
        ) {
            let filter = ConsentFilter::new();
            for key in &added {
                filter.add(key);
            }
            for key in &added {
                prop_assert!(filter.may_hold(key));
            }
        }
    }

    #[test]
    fn an_empty_filter_holds_nothing_and_ten_thousand_keys_fill_few_buckets() {
        let filter = ConsentFilter::new();
        let key = |i: usize| format!("o\0+1\0+1555{i:07}").into_bytes();
        assert!((0..20_000).all(|i| !filter.may_hold(&key(i))));
        for i in 0..10_000 {
            filter.add(&key(i));
        }
        assert!((0..10_000).all(|i| filter.may_hold(&key(i))));
        let false_positives = (10_000..20_000)
            .filter(|i| filter.may_hold(&key(*i)))
            .count();
        assert!(false_positives < 500, "{false_positives} of 10,000");
    }
}
