-- A webhook's own retry schedule (gateway/src/domain/values.rs, RetrySchedule):
-- its delays joined by commas; NULL: the server's WASMHOOK_RETRY_SCHEDULE.
ALTER TABLE webhooks ADD COLUMN retry_schedule TEXT;
