-- Per key and day, what the activity report shows: IPs, countries, cities, networks (ASN)
-- and user agents, each with first and last sight and requests. Bounded by src/activity.rs:
-- at most 50 values of each facet per key and day (the rest under '(other)'), values cut to
-- 200 characters, days older than 90 deleted at commit. Numbered 0010 (0011 is taken).
CREATE TABLE IF NOT EXISTS kw_key_activity (
    key_id TEXT NOT NULL,
    day TIMESTAMPTZ NOT NULL,
    facet TEXT NOT NULL,
    value TEXT NOT NULL,
    first_seen TIMESTAMPTZ NOT NULL,
    last_seen TIMESTAMPTZ NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day, facet, value)
);
CREATE INDEX IF NOT EXISTS kw_key_activity_day ON kw_key_activity (day);
