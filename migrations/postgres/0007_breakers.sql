-- Each lane's circuit breaker (see `Breaker` in
-- gateway/src/domain/lane.rs): since when it is open (NULL: closed), the
-- wait before its next probe, and the attempts and failures of its
-- current window.
ALTER TABLE webhook_lanes ADD COLUMN breaker_open_since BIGINT;
ALTER TABLE webhook_lanes ADD COLUMN probe_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_lanes ADD COLUMN window_start BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_lanes ADD COLUMN window_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_lanes ADD COLUMN window_failures BIGINT NOT NULL DEFAULT 0;
