-- wasmhook schema for PostgreSQL: the same tables as migrations/sqlite
-- (both schemas at their latest version). Times are unix milliseconds (UTC).

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Tenants: one per customer of the publisher.
CREATE TABLE apps (
    id         TEXT PRIMARY KEY,
    uid        TEXT UNIQUE,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- App keys are stored as SHA-256 hashes; the key itself is shown once.
CREATE TABLE app_keys (
    id         TEXT PRIMARY KEY,
    app_id     TEXT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    key_hash   TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE INDEX app_keys_app ON app_keys (app_id);

-- WebAssembly transform plugins.
CREATE TABLE plugins (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    size         BIGINT NOT NULL,
    wasm         BYTEA NOT NULL,
    -- Precompiled machine code, valid only for the engine described by
    -- artifact_key; anything else is recompiled from `wasm`.
    artifact     BYTEA,
    artifact_key TEXT,
    created_at   BIGINT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX plugins_sha256 ON plugins (sha256);

CREATE TABLE webhooks (
    id                         TEXT PRIMARY KEY,
    app_id                     TEXT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    url                        TEXT NOT NULL,
    description                TEXT NOT NULL DEFAULT '',
    event_types                TEXT,              -- JSON array; NULL subscribes to every type
    enabled                    BOOLEAN NOT NULL,
    disabled_reason            TEXT,
    headers                    TEXT NOT NULL DEFAULT '{}',
    raw_payload                BOOLEAN NOT NULL DEFAULT FALSE,
    secret                     TEXT NOT NULL,
    previous_secret            TEXT,              -- still signs until previous_secret_expires_at
    previous_secret_expires_at BIGINT,
    failing_since              BIGINT,            -- first failed attempt since the last success
    plugin_id                  TEXT REFERENCES plugins (id),
    plugin_config              TEXT,
    created_at                 BIGINT NOT NULL,
    updated_at                 BIGINT NOT NULL
);
CREATE INDEX webhooks_app ON webhooks (app_id, id);
CREATE INDEX webhooks_plugin ON webhooks (plugin_id) WHERE plugin_id IS NOT NULL;

CREATE TABLE events (
    app_id          TEXT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    id              TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    idempotency_key TEXT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (app_id, id)
);
CREATE UNIQUE INDEX events_idempotency ON events (app_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The queue. `due_at` is when a worker may claim the delivery next: for
-- `pending` and `failed` the scheduled attempt, for `sending` the end of the
-- claiming worker's lease (after which another worker takes it over), and
-- NULL once the delivery is final. The claim query (FOR UPDATE SKIP LOCKED)
-- orders by it and the partial index below serves exactly that query.
CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    app_id           TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    webhook_id       TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    due_at           BIGINT,
    claim_token      TEXT,
    last_attempt_at  BIGINT,
    last_status_code BIGINT,
    last_error       TEXT,
    skip_reason      TEXT,                        -- why a plugin skipped it (status `skipped`)
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    FOREIGN KEY (app_id, event_id) REFERENCES events (app_id, id) ON DELETE CASCADE
);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_event ON deliveries (app_id, event_id);
CREATE INDEX deliveries_webhook ON deliveries (webhook_id, id);

CREATE TABLE attempts (
    id            TEXT PRIMARY KEY,
    delivery_id   TEXT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt       BIGINT NOT NULL,
    started_at    BIGINT NOT NULL,
    duration_ms   BIGINT NOT NULL,
    outcome       TEXT NOT NULL,
    status_code   BIGINT,
    response_body TEXT,
    error         TEXT,
    -- For attempts that failed in the plugin: timeout, memory_limit,
    -- stack_overflow, trap, invalid_output or plugin_error.
    plugin_error  TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, attempt);
