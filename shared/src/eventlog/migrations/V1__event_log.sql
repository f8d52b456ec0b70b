-- The event log: append-only rows, partitioned by the day the event was received, so that
-- retention drops whole partitions (never a DELETE scan).
--
-- An event row is written when its envelope is stored (by the normalizer), or for an Ecwid event
-- that reached no envelope, its raw-stage outcome. An attempt row is written after every delivery
-- attempt, and for a status change without an attempt (dead-lettered before one was made, a
-- redelivery requested). A record's status is the newest attempt row's, or its event row's.

CREATE SEQUENCE event_log_seq;

CREATE TABLE event_log_events (
    -- The page cursor (`next` / `after`), in receipt order: the receipt in unix milliseconds
    -- shifted left 20 bits, and the low 20 bits from a sequence (so rows of one millisecond keep
    -- the order they were written in). A time window is then a range of seq, which the indexes
    -- on (…, seq) answer directly.
    seq bigint NOT NULL,
    id text NOT NULL,
    received_at timestamptz NOT NULL,
    -- NULL for a raw-stage outcome.
    instance_id text,
    store_id text NOT NULL,
    object_type text NOT NULL,
    object_id text NOT NULL,
    event_type text NOT NULL,
    ecwid_event_id text NOT NULL,
    format text NOT NULL,
    verified boolean NOT NULL,
    request_id text NOT NULL,
    -- pending for an envelope; filtered or dead for a raw-stage outcome.
    status text NOT NULL,
    error text,
    envelope_seq bigint,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);

CREATE TABLE event_log_attempts (
    event_id text NOT NULL,
    -- The event's, so that an event and its attempts are dropped together.
    received_at timestamptz NOT NULL,
    -- Unique per row, made by the writer: a row written twice (a spooled batch written again)
    -- is kept once.
    key text NOT NULL,
    store_id text NOT NULL,
    -- false: a status change without an attempt.
    attempted boolean NOT NULL,
    started_at timestamptz NOT NULL,
    settled_at timestamptz NOT NULL,
    duration_ms integer NOT NULL,
    -- The record's status after this row: retrying, delivered, dead, pending.
    status text NOT NULL,
    http_status integer,
    error_class text,
    error text,
    response text NOT NULL DEFAULT '',
    next_attempt_at timestamptz,
    envelope_seq bigint,
    PRIMARY KEY (event_id, received_at, key)
) PARTITION BY RANGE (received_at);

-- Rows whose day has no partition (a clock far off, an event older than the oldest partition)
-- land here; retention deletes its old rows (few) instead of dropping it.
CREATE TABLE event_log_events_default PARTITION OF event_log_events DEFAULT;
CREATE TABLE event_log_attempts_default PARTITION OF event_log_attempts DEFAULT;
