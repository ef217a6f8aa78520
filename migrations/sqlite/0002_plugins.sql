-- WebAssembly transform plugins.

CREATE TABLE plugins (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    wasm         BLOB NOT NULL,
    -- Precompiled machine code, valid only for the engine described by
    -- artifact_key; anything else is recompiled from `wasm`.
    artifact     BLOB,
    artifact_key TEXT,
    created_at   INTEGER NOT NULL,
    UNIQUE (name, version)
);

-- A webhook's plugin; deleting a plugin in use is refused by the API.
ALTER TABLE webhooks ADD COLUMN plugin_id TEXT REFERENCES plugins (id);
ALTER TABLE webhooks ADD COLUMN plugin_config TEXT;
CREATE INDEX webhooks_plugin ON webhooks (plugin_id) WHERE plugin_id IS NOT NULL;

-- Why a plugin skipped a delivery (status `skipped`).
ALTER TABLE deliveries ADD COLUMN skip_reason TEXT;

-- For attempts that failed in the plugin: timeout, memory_limit,
-- stack_overflow, trap, invalid_output or plugin_error.
ALTER TABLE attempts ADD COLUMN plugin_error TEXT;
