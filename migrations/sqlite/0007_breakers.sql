-- Each lane's circuit breaker (see `Breaker` in
-- gateway/src/domain/lane.rs): since when it is open (NULL: closed), the
-- wait before its next probe, and the attempts and failures of its
-- current window.
ALTER TABLE webhook_lanes ADD COLUMN breaker_open_since INTEGER;
ALTER TABLE webhook_lanes ADD COLUMN probe_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_lanes ADD COLUMN window_start INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_lanes ADD COLUMN window_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_lanes ADD COLUMN window_failures INTEGER NOT NULL DEFAULT 0;
