-- Ordered delivery (see gateway/src/domain/ordering.rs): an event's
-- ordering key, copied to its deliveries with their place in the key's
-- order per webhook. A delivery waiting for an earlier one of its key is
-- `pending` with no due time, so no claim ever looks at it.
ALTER TABLE events ADD COLUMN ordering_key TEXT;
ALTER TABLE deliveries ADD COLUMN ordering_key TEXT;
ALTER TABLE deliveries ADD COLUMN ordering_seq BIGINT;
CREATE INDEX deliveries_ordering ON deliveries (webhook_id, ordering_key, ordering_seq)
    WHERE ordering_key IS NOT NULL;
