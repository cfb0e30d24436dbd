-- smsflow's PostgreSQL schema, version 2: flow results, message texts,
-- per-broadcast outbox tallies, erasure by contact (issue 20 and the
-- broadcast tallies; sled's `r\0` and `g\0` records).

-- What each ended flow run collected (sled: `r\0`), one row per run,
-- written in the transaction of the step that ended it. Named by flow,
-- start time, conversation and position in its commit, as in sled: the
-- same step handled again writes the same row (replaced, not doubled).
CREATE TABLE results (
    flow        text     COLLATE "C" NOT NULL,
    started_at  bigint   NOT NULL,
    to_number   text     COLLATE "C" NOT NULL,
    from_number text     COLLATE "C" NOT NULL,
    position    smallint NOT NULL,
    -- Unix seconds the run ended (exports and retention read by it).
    ended_at    bigint   NOT NULL,
    -- The versioned JSON RunResult.
    record      bytea    NOT NULL,
    PRIMARY KEY (flow, started_at, to_number, from_number, position)
);
CREATE INDEX results_ended ON results (ended_at);
CREATE INDEX results_contact ON results (from_number);

-- The texts of the message and of our replies, only when the operator
-- chose `store_message_text` (else NULL and empty).
ALTER TABLE message_log ADD COLUMN body text;
ALTER TABLE message_log ADD COLUMN replies text[] NOT NULL DEFAULT '{}';
CREATE INDEX message_log_from ON message_log (from_number);

-- Erasure finds a contact's conversations by their number.
CREATE INDEX conversations_from ON conversations (from_number);

-- The broadcast an outbox entry counts toward (`store::tally_of`), NULL
-- for the others. Tallies are not stored counters here: `outbox_tallies`
-- counts the entries by tally and state with one GROUP BY over this
-- index, so they change in the same transaction as the entries.
ALTER TABLE outbox ADD COLUMN tally text COLLATE "C";
UPDATE outbox SET tally = substring(key FROM '^broadcast:([^:]+):.+$')
    WHERE key LIKE 'broadcast:%';
UPDATE outbox SET tally = substring(key FROM '^start:broadcast:([^:]+):.+:0$')
    WHERE key LIKE 'start:broadcast:%';
CREATE INDEX outbox_tally ON outbox (tally, state) WHERE tally IS NOT NULL;
