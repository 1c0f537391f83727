-- The notify-gateway transactional outbox (docs/outbox.md). Running it again changes nothing.
-- `notify outbox init` runs it with the table name of NOTIFY_OUTBOX_TABLE in place of
-- notify_outbox; teams with their own migrations can copy it as it is.
--
-- The backend inserts one row per domain event, in the transaction that makes the change:
--   INSERT INTO notify_outbox (event_id, event_type, key, payload, topic)
--   VALUES ($1, $2, $3, $4, $5)
-- Every other column is the relay's.

CREATE TABLE IF NOT EXISTS notify_outbox (
    -- Orders one student's rows: the relay handles them by id, per lane.
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     text        NOT NULL UNIQUE,
    event_type   text        NOT NULL,
    -- The studentId: the Kafka message key, and the lane.
    key          text        NOT NULL,
    -- The envelope the bridge accepts from Kafka (docs/events.md).
    payload      jsonb       NOT NULL,
    -- The Kafka topic to forward the envelope to; NULL: notify only.
    topic        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- One of 64 lanes: a lane is relayed by one relay at a time, in id order, so a
    -- student's rows keep their order however many relays run.
    lane         smallint    NOT NULL
                 GENERATED ALWAYS AS ((hashtextextended(key, 0) & 63)::smallint) STORED,
    notified_at  timestamptz,
    forwarded_at timestamptz,
    -- Times Redis rejected the row's work (it is failed at the third).
    attempts     integer     NOT NULL DEFAULT 0,
    -- Set aside for good, with why: never retried, never blocks the rows behind it.
    failed_at    timestamptz,
    failure      text
);

CREATE INDEX IF NOT EXISTS notify_outbox_to_notify ON notify_outbox (lane, id)
    WHERE notified_at IS NULL AND failed_at IS NULL;
CREATE INDEX IF NOT EXISTS notify_outbox_to_forward ON notify_outbox (lane, id)
    WHERE forwarded_at IS NULL AND topic IS NOT NULL AND failed_at IS NULL;
CREATE INDEX IF NOT EXISTS notify_outbox_failed ON notify_outbox (id)
    WHERE failed_at IS NOT NULL;

-- Wakes the relays (LISTEN on the table's name) when a transaction that inserted rows
-- commits; a rolled-back one wakes nobody. Relays also poll, so this is an optimisation.
CREATE OR REPLACE FUNCTION notify_outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notify_outbox_wake AFTER INSERT ON notify_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox_wake();
