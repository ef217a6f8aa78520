-- Ordered delivery (see gateway/src/domain/ordering.rs): an event's
-- ordering key, copied to its deliveries with their place in the key's
-- order per webhook. A delivery waiting for an earlier one of its key is
-- `pending` with no due time, so no claim ever looks at it.
ALTER TABLE events ADD COLUMN ordering_key TEXT;
ALTER TABLE deliveries ADD COLUMN ordering_key TEXT;
ALTER TABLE deliveries ADD COLUMN ordering_seq BIGINT;
CREATE INDEX deliveries_ordering ON deliveries (webhook_id, ordering_key, ordering_seq)
    WHERE ordering_key IS NOT NULL;

-- publish of a keyed event (gateway/src/store/postgres/ordering.rs): takes
-- the locks of its (webhook, key) pairs, then, in statements that read the
-- queue after the locks (a PL/pgSQL statement takes a new snapshot), stores
-- the event and queues its deliveries, each after the last of its key on
-- its webhook: due now unless that one is unfinished (the rule of
-- `Place::after` in gateway/src/domain/ordering.rs). Returns each queued
-- delivery's webhook and due time. An event whose id or idempotency key
-- is taken queues nothing and returns nothing, or, `p_strict`, fails with
-- the unique violation (a publish that checked for a repeat and raced).
CREATE FUNCTION wasmhook_publish_keyed(
    p_app TEXT, p_event TEXT, p_type TEXT, p_payload TEXT, p_idempotency_key TEXT,
    p_now BIGINT, p_ids TEXT[], p_webhooks TEXT[], p_key TEXT, p_strict BOOLEAN)
RETURNS TABLE (webhook_id TEXT, due_at BIGINT) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(k) FROM (
        SELECT DISTINCT hashtextextended(w || '/' || p_key, 0) AS k
        FROM UNNEST(p_webhooks) AS w ORDER BY k) locks;
    IF p_strict THEN
        INSERT INTO events (app_id, id, event_type, payload, idempotency_key, ordering_key, created_at)
        VALUES (p_app, p_event, p_type, p_payload, p_idempotency_key, p_key, p_now);
    ELSE
        INSERT INTO events (app_id, id, event_type, payload, idempotency_key, ordering_key, created_at)
        VALUES (p_app, p_event, p_type, p_payload, p_idempotency_key, p_key, p_now)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY
    INSERT INTO deliveries AS n (id, app_id, event_id, webhook_id, status, due_at, created_at,
                                 updated_at, ordering_key, ordering_seq)
    SELECT d.id, p_app, p_event, d.webhook_id, 'pending',
           CASE WHEN last.status IN ('pending', 'failed', 'sending') THEN NULL ELSE p_now END,
           p_now, p_now, p_key, COALESCE(last.ordering_seq, 0) + 1
    FROM UNNEST(p_ids, p_webhooks) AS d(id, webhook_id)
    LEFT JOIN LATERAL (
        SELECT x.ordering_seq, x.status FROM deliveries x
        WHERE x.webhook_id = d.webhook_id AND x.ordering_key = p_key
        ORDER BY x.ordering_seq DESC LIMIT 1) last ON TRUE
    RETURNING n.webhook_id, n.due_at;
END $$;
