-- Each lane keeps its webhook's streak of attempts: consecutive successes
-- (positive) or failures (negative). A webhook without a success streak
-- starts with two attempts in flight, doubling with each success up to
-- its limit; one that keeps failing is paced (one attempt in flight, a
-- growing pause after each, the lane parked until it ends) until its
-- first success. See gateway/src/domain/pacing.rs.
ALTER TABLE webhook_lanes ADD COLUMN streak BIGINT NOT NULL DEFAULT 0;
