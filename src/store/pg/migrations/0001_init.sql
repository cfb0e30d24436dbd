-- smsflow's PostgreSQL schema, version 1: the same records as the sled
-- store (src/store.rs has the table of them). Records that are versioned
-- JSON in sled are the same bytes here (the `record` columns), beside the
-- columns the queries need (text keys in byte order, COLLATE "C", as
-- sled orders them); the conversation and its recent answers are
-- the caller's bytes, as in sled's conversation record.

-- One row per (our number, their number): the conversation, its next
-- timer's due time and the answers recently given (replayed on a retried
-- MessageSid), written together by one statement.
CREATE TABLE conversations (
    to_number    text    COLLATE "C" NOT NULL,
    from_number  text    COLLATE "C" NOT NULL,
    -- Unix seconds the record was last touched.
    at           bigint  NOT NULL,
    -- No flow running (purgeable when idle).
    ended        boolean NOT NULL,
    -- NULL: no state kept (only recent answers).
    conversation bytea,
    -- Unix seconds the next timer is due; NULL: none pending.
    due          bigint,
    -- Encoded recent answers (see records.rs, RecentAnswers).
    recent       bytea   NOT NULL DEFAULT ''::bytea,
    PRIMARY KEY (to_number, from_number)
);
CREATE INDEX conversations_due ON conversations (due) WHERE due IS NOT NULL;

-- The inbound message log (sled: messages.jsonl): one row per message
-- answered, without the TwiML.
CREATE TABLE message_log (
    id          bigserial PRIMARY KEY,
    sid         text   COLLATE "C" NOT NULL,
    at          bigint NOT NULL,
    from_number text   NOT NULL,
    to_number   text   NOT NULL,
    outcome     text   NOT NULL,
    flow        text,
    step        text
);
CREATE INDEX message_log_sid ON message_log (sid);
CREATE INDEX message_log_at ON message_log (at);

-- The latest delivery status of a message we sent (monotonic by rank).
CREATE TABLE delivery_status (
    message_sid text     COLLATE "C" PRIMARY KEY,
    rank        smallint NOT NULL,
    updated_at  bigint   NOT NULL,
    record      bytea    NOT NULL
);

-- Every status callback received, in arrival order.
CREATE TABLE status_events (
    id          bigserial PRIMARY KEY,
    message_sid text   NOT NULL,
    at          bigint NOT NULL,
    record      bytea  NOT NULL
);
CREATE INDEX status_events_sid ON status_events (message_sid, id);

-- Current consent state per (scope, number), and every change (never
-- purged).
CREATE TABLE consent (
    scope  text  NOT NULL,
    number text  NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (scope, number)
);
CREATE TABLE consent_audit (
    id     bigserial PRIMARY KEY,
    at     bigint NOT NULL,
    record bytea  NOT NULL
);
CREATE INDEX consent_audit_at ON consent_audit (at, id);

-- The outbox: messages we send on our own, recorded before they are sent.
-- `state` and `not_before` mirror the record, for the due and in-flight
-- queries (sled's y\0 and y\x01 indexes).
CREATE TABLE outbox (
    key        text   COLLATE "C" PRIMARY KEY,
    state      text   NOT NULL,
    not_before bigint,
    record     bytea  NOT NULL
);
CREATE INDEX outbox_due ON outbox (not_before, key) WHERE state = 'pending';
CREATE INDEX outbox_sending ON outbox (key) WHERE state = 'sending';

-- After-answer HTTP calls, recorded before the answer.
CREATE TABLE call_jobs (
    key        text   COLLATE "C" PRIMARY KEY,
    -- Set while pending: when it is due.
    not_before bigint,
    record     bytea  NOT NULL
);
CREATE INDEX call_jobs_due ON call_jobs (not_before, key) WHERE not_before IS NOT NULL;

-- Flow starts by idempotency key.
CREATE TABLE starts (
    key    text  COLLATE "C" PRIMARY KEY,
    record bytea NOT NULL
);

-- Records that did not decode (a newer release's, damaged), kept aside
-- before anything replaces them (sled: quarantine/).
CREATE TABLE quarantine (
    id     bigserial PRIMARY KEY,
    at     bigint NOT NULL,
    kind   text   NOT NULL,
    key    text   NOT NULL,
    reason text   NOT NULL,
    record bytea  NOT NULL
);
