-- smsflow's PostgreSQL schema, version 3: no table changes. The column
-- conversations.recent now holds recent answers whose TwiML is stored
-- without its constant parts (flags in the length field; sled's record
-- layout version 3). A release from before this migration would misread
-- such answers; the version recorded here makes it refuse the database
-- ("migrated by a newer release") instead.
COMMENT ON COLUMN conversations.recent IS
    'recent answers for retries: per entry time, sid, outcome, TwiML (constant parts elided; see records.rs)';
