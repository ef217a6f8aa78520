-- Rate limits: deliveries per second a webhook's endpoint receives at
-- most, across every process, and how many may arrive at once (NULL: no
-- limit). See `Gcra` in gateway/src/domain/lane.rs.
ALTER TABLE webhooks ADD COLUMN rate_limit INTEGER;
ALTER TABLE webhooks ADD COLUMN rate_limit_burst INTEGER;
-- The lane's rate state (the theoretical arrival time of its next
-- delivery, in microseconds), and its hold: no claim looks at the lane
-- before `held_until`.
ALTER TABLE webhook_lanes ADD COLUMN rate_tat INTEGER;
ALTER TABLE webhook_lanes ADD COLUMN held_until INTEGER;
