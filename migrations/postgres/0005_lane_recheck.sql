-- A claim reads the queue in a snapshot taken when it starts, so work a
-- publish commits during the claim is invisible to it. A claim that
-- leaves a lane with room therefore looks at it again a moment later,
-- and a look that finds nothing marks the lane `emptied` and looks once
-- more before idling it; publishes wake an emptied lane as if it were
-- idle. See `EMPTIED_LANE_RECHECK` in gateway/src/store/postgres/mod.rs.
ALTER TABLE webhook_lanes ADD COLUMN emptied BOOLEAN NOT NULL DEFAULT FALSE;
