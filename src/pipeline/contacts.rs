//! Contact fields from outside: an import sets fields in each contact's
//! conversation with one of our numbers, under that conversation's lock
//! (a message or a timer of the same conversation waits, and sees the
//! fields); an export reads them back.

use super::Pipeline;
use crate::contacts::{Contact, ContactRow, ImportSummary};
use crate::flow::Conversation;
use crate::store::{ConvKey, StateCommit, Store, StoreError};

impl<S: Store> Pipeline<S> {
    /// Set the fields of `rows` (already checked) in the conversations of
    /// our number `our` at `now`; a run in progress goes on untouched.
    /// Rows are written one by one, then flushed once before it returns:
    /// a store failure midway leaves the rows before it written (running
    /// the import again sets the same values).
    pub async fn import_contacts(
        &self,
        our: &str,
        rows: &[ContactRow],
        now: i64,
    ) -> Result<ImportSummary, StoreError> {
        let epoch = self.store.epoch();
        let mut summary = ImportSummary {
            rows: rows.len(),
            ..ImportSummary::default()
        };
        let flows = self.flows.load();
        for row in rows {
            let key = ConvKey::new(our, row.phone.clone());
            let guard = self.lock(&key).await?;
            let stored = self.store.load(&key)?;
            let mut conversation = self.conversation_of(&key, &stored)?;
            let before = conversation.contact.clone();
            conversation
                .contact
                .extend(row.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            if stored.conversation.is_none() {
                summary.created += 1;
            } else if conversation.contact == before {
                summary.unchanged += 1;
                continue;
            } else {
                summary.updated += 1;
            }
            if conversation == Conversation::default() {
                continue; // a row with no fields for a new contact
            }
            let due = self.due_of(&flows, &key, &conversation, now);
            let bytes = conversation.to_stored();
            self.store.commit_state(StateCommit {
                key: &key,
                conversation: Some(&bytes),
                ended: conversation.is_ended(due),
                due,
                recent: &stored.recent,
                at: now,
                results: &[],
            })?;
            drop(guard);
            self.timers.set(due);
        }
        self.store.flush(epoch).await?;
        Ok(summary)
    }

    /// The contacts of our number `our` with their fields, by number.
    pub fn contacts_of(&self, our: &str) -> Result<Vec<Contact>, StoreError> {
        let mut out = Vec::new();
        for (from, stored) in self.store.conversations_of(our)? {
            let key = ConvKey::new(our, from.clone());
            let conversation = self.conversation_of(&key, &stored)?;
            out.push((from, conversation.contact));
        }
        Ok(out)
    }
}
