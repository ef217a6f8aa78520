-- Retention deletes the oldest finished events first.
CREATE INDEX events_created ON events (created_at);
