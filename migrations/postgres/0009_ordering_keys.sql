-- Ordered delivery, PostgreSQL form (see gateway/src/store/postgres/ordering.rs):
-- one row per (webhook, key) holds the key's last place given out and the
-- place up to which every delivery has ended, in order. A publish takes its
-- place with an upsert and a record moves `done_seq` on with an update;
-- both act on the row's latest version and lock it until they commit,
-- which is what serialises them (the advisory locks and the function of
-- 0008 did it with an extra statement per publish and per record).
CREATE TABLE ordering_keys (
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    ordering_key TEXT NOT NULL,
    last_seq BIGINT NOT NULL,
    done_seq BIGINT NOT NULL,
    PRIMARY KEY (webhook_id, ordering_key)
);

-- Keys already queued: every place before the first unfinished delivery
-- has ended.
INSERT INTO ordering_keys (webhook_id, ordering_key, last_seq, done_seq)
SELECT webhook_id, ordering_key, MAX(ordering_seq),
       COALESCE(MIN(ordering_seq) FILTER (WHERE status IN ('pending', 'failed', 'sending')) - 1,
                MAX(ordering_seq))
FROM deliveries WHERE ordering_key IS NOT NULL
GROUP BY webhook_id, ordering_key;

DROP FUNCTION wasmhook_publish_keyed;
