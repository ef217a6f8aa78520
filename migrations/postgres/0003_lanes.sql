-- Per-webhook lanes of the delivery queue. A claim walks the lanes that
-- have due work, oldest first, and takes from each only as many
-- deliveries as its in-flight limit leaves room for, so an endpoint that
-- hangs holds at most its own share of the workers' slots.

-- Attempts in flight at once to this webhook, across every process
-- (NULL: the server's default).
ALTER TABLE webhooks ADD COLUMN max_in_flight BIGINT;

-- One lane per webhook. `next_due_at` is the earliest time it may have
-- something to claim (NULL: nothing queued). A lane at its limit is
-- `parked` with `next_due_at` at its first lease end: only a finished
-- attempt (or that lease running out) makes room.
CREATE TABLE webhook_lanes (
    webhook_id  TEXT PRIMARY KEY REFERENCES webhooks (id) ON DELETE CASCADE,
    next_due_at BIGINT,
    parked      BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX webhook_lanes_due ON webhook_lanes (next_due_at) WHERE next_due_at IS NOT NULL;

-- A lane's due deliveries in due order, and its attempts in flight.
CREATE INDEX deliveries_webhook_due ON deliveries (webhook_id, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_in_flight ON deliveries (webhook_id, due_at) WHERE status = 'sending';
-- The queue is walked by lane now.
DROP INDEX deliveries_due;

INSERT INTO webhook_lanes (webhook_id, next_due_at)
    SELECT w.id, (SELECT MIN(d.due_at) FROM deliveries d WHERE d.webhook_id = w.id AND d.due_at IS NOT NULL)
    FROM webhooks w;
