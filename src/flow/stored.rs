//! The stored form of a [`Conversation`]: versioned JSON (see
//! [`crate::versioned`]), the bytes the store keeps for each sender. The
//! pipeline writes and reads conversations only through
//! [`Conversation::to_stored`] and [`Conversation::from_stored`], so a
//! change to the conversation's shape is a new version here with its
//! migration, never a conversation that silently starts afresh.

use super::Conversation;
use crate::versioned::{self, Versioned};

impl Versioned for Conversation {
    const KIND: &'static str = "conversation";
    const VERSION: u32 = 1;
}

impl Conversation {
    /// The bytes to store, in the current version.
    pub fn to_stored(&self) -> Vec<u8> {
        versioned::encode(self)
    }

    /// A stored conversation of any version this release reads, migrated
    /// to the current shape; or why it does not decode (the caller keeps
    /// the record aside before anything replaces it).
    pub fn from_stored(bytes: &[u8]) -> Result<Conversation, String> {
        versioned::decode(bytes)
    }
}
