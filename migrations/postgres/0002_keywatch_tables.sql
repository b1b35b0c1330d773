-- keywatch's own tables. Usage rollups: one row per (bucket, key, organization, MCP) and
-- granularity, with additive counters only, so that batches (and, with PostgreSQL, several
-- instances) merge by addition and never overwrite each other. `key_id` and `org_id` are ''
-- for a refused key that matches no key. Latency is a histogram: `lat_le_N` counts requests
-- that took more than the previous bound and at most N ms (the bounds are `LATENCY_BOUNDS_MS`
-- in src/usage.rs). Reports read minute and hour rows only for the edges of a range (and
-- the primary key, led by bucket_start, serves those), so only the day table has indexes by
-- organization and key: every index is one more B-tree write per counted request.

CREATE TABLE IF NOT EXISTS kw_usage_minute (
    bucket_start TIMESTAMPTZ NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    org_id TEXT NOT NULL DEFAULT '',
    mcp TEXT NOT NULL DEFAULT '',
    requests BIGINT NOT NULL DEFAULT 0,
    err_auth BIGINT NOT NULL DEFAULT 0,
    err_rate_limited BIGINT NOT NULL DEFAULT 0,
    err_client BIGINT NOT NULL DEFAULT 0,
    err_server BIGINT NOT NULL DEFAULT 0,
    latency_ms_sum BIGINT NOT NULL DEFAULT 0,
    bytes_in BIGINT NOT NULL DEFAULT 0,
    bytes_out BIGINT NOT NULL DEFAULT 0,
    lat_le_1 BIGINT NOT NULL DEFAULT 0,
    lat_le_2 BIGINT NOT NULL DEFAULT 0,
    lat_le_3 BIGINT NOT NULL DEFAULT 0,
    lat_le_5 BIGINT NOT NULL DEFAULT 0,
    lat_le_7 BIGINT NOT NULL DEFAULT 0,
    lat_le_10 BIGINT NOT NULL DEFAULT 0,
    lat_le_15 BIGINT NOT NULL DEFAULT 0,
    lat_le_20 BIGINT NOT NULL DEFAULT 0,
    lat_le_30 BIGINT NOT NULL DEFAULT 0,
    lat_le_50 BIGINT NOT NULL DEFAULT 0,
    lat_le_70 BIGINT NOT NULL DEFAULT 0,
    lat_le_100 BIGINT NOT NULL DEFAULT 0,
    lat_le_150 BIGINT NOT NULL DEFAULT 0,
    lat_le_200 BIGINT NOT NULL DEFAULT 0,
    lat_le_300 BIGINT NOT NULL DEFAULT 0,
    lat_le_500 BIGINT NOT NULL DEFAULT 0,
    lat_le_700 BIGINT NOT NULL DEFAULT 0,
    lat_le_1000 BIGINT NOT NULL DEFAULT 0,
    lat_le_1500 BIGINT NOT NULL DEFAULT 0,
    lat_le_2000 BIGINT NOT NULL DEFAULT 0,
    lat_le_3000 BIGINT NOT NULL DEFAULT 0,
    lat_le_5000 BIGINT NOT NULL DEFAULT 0,
    lat_le_7000 BIGINT NOT NULL DEFAULT 0,
    lat_le_10000 BIGINT NOT NULL DEFAULT 0,
    lat_le_15000 BIGINT NOT NULL DEFAULT 0,
    lat_le_20000 BIGINT NOT NULL DEFAULT 0,
    lat_le_30000 BIGINT NOT NULL DEFAULT 0,
    lat_le_60000 BIGINT NOT NULL DEFAULT 0,
    lat_le_inf BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, key_id, org_id, mcp)
);

CREATE TABLE IF NOT EXISTS kw_usage_hour (
    bucket_start TIMESTAMPTZ NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    org_id TEXT NOT NULL DEFAULT '',
    mcp TEXT NOT NULL DEFAULT '',
    requests BIGINT NOT NULL DEFAULT 0,
    err_auth BIGINT NOT NULL DEFAULT 0,
    err_rate_limited BIGINT NOT NULL DEFAULT 0,
    err_client BIGINT NOT NULL DEFAULT 0,
    err_server BIGINT NOT NULL DEFAULT 0,
    latency_ms_sum BIGINT NOT NULL DEFAULT 0,
    bytes_in BIGINT NOT NULL DEFAULT 0,
    bytes_out BIGINT NOT NULL DEFAULT 0,
    lat_le_1 BIGINT NOT NULL DEFAULT 0,
    lat_le_2 BIGINT NOT NULL DEFAULT 0,
    lat_le_3 BIGINT NOT NULL DEFAULT 0,
    lat_le_5 BIGINT NOT NULL DEFAULT 0,
    lat_le_7 BIGINT NOT NULL DEFAULT 0,
    lat_le_10 BIGINT NOT NULL DEFAULT 0,
    lat_le_15 BIGINT NOT NULL DEFAULT 0,
    lat_le_20 BIGINT NOT NULL DEFAULT 0,
    lat_le_30 BIGINT NOT NULL DEFAULT 0,
    lat_le_50 BIGINT NOT NULL DEFAULT 0,
    lat_le_70 BIGINT NOT NULL DEFAULT 0,
    lat_le_100 BIGINT NOT NULL DEFAULT 0,
    lat_le_150 BIGINT NOT NULL DEFAULT 0,
    lat_le_200 BIGINT NOT NULL DEFAULT 0,
    lat_le_300 BIGINT NOT NULL DEFAULT 0,
    lat_le_500 BIGINT NOT NULL DEFAULT 0,
    lat_le_700 BIGINT NOT NULL DEFAULT 0,
    lat_le_1000 BIGINT NOT NULL DEFAULT 0,
    lat_le_1500 BIGINT NOT NULL DEFAULT 0,
    lat_le_2000 BIGINT NOT NULL DEFAULT 0,
    lat_le_3000 BIGINT NOT NULL DEFAULT 0,
    lat_le_5000 BIGINT NOT NULL DEFAULT 0,
    lat_le_7000 BIGINT NOT NULL DEFAULT 0,
    lat_le_10000 BIGINT NOT NULL DEFAULT 0,
    lat_le_15000 BIGINT NOT NULL DEFAULT 0,
    lat_le_20000 BIGINT NOT NULL DEFAULT 0,
    lat_le_30000 BIGINT NOT NULL DEFAULT 0,
    lat_le_60000 BIGINT NOT NULL DEFAULT 0,
    lat_le_inf BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, key_id, org_id, mcp)
);

CREATE TABLE IF NOT EXISTS kw_usage_day (
    bucket_start TIMESTAMPTZ NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    org_id TEXT NOT NULL DEFAULT '',
    mcp TEXT NOT NULL DEFAULT '',
    requests BIGINT NOT NULL DEFAULT 0,
    err_auth BIGINT NOT NULL DEFAULT 0,
    err_rate_limited BIGINT NOT NULL DEFAULT 0,
    err_client BIGINT NOT NULL DEFAULT 0,
    err_server BIGINT NOT NULL DEFAULT 0,
    latency_ms_sum BIGINT NOT NULL DEFAULT 0,
    bytes_in BIGINT NOT NULL DEFAULT 0,
    bytes_out BIGINT NOT NULL DEFAULT 0,
    lat_le_1 BIGINT NOT NULL DEFAULT 0,
    lat_le_2 BIGINT NOT NULL DEFAULT 0,
    lat_le_3 BIGINT NOT NULL DEFAULT 0,
    lat_le_5 BIGINT NOT NULL DEFAULT 0,
    lat_le_7 BIGINT NOT NULL DEFAULT 0,
    lat_le_10 BIGINT NOT NULL DEFAULT 0,
    lat_le_15 BIGINT NOT NULL DEFAULT 0,
    lat_le_20 BIGINT NOT NULL DEFAULT 0,
    lat_le_30 BIGINT NOT NULL DEFAULT 0,
    lat_le_50 BIGINT NOT NULL DEFAULT 0,
    lat_le_70 BIGINT NOT NULL DEFAULT 0,
    lat_le_100 BIGINT NOT NULL DEFAULT 0,
    lat_le_150 BIGINT NOT NULL DEFAULT 0,
    lat_le_200 BIGINT NOT NULL DEFAULT 0,
    lat_le_300 BIGINT NOT NULL DEFAULT 0,
    lat_le_500 BIGINT NOT NULL DEFAULT 0,
    lat_le_700 BIGINT NOT NULL DEFAULT 0,
    lat_le_1000 BIGINT NOT NULL DEFAULT 0,
    lat_le_1500 BIGINT NOT NULL DEFAULT 0,
    lat_le_2000 BIGINT NOT NULL DEFAULT 0,
    lat_le_3000 BIGINT NOT NULL DEFAULT 0,
    lat_le_5000 BIGINT NOT NULL DEFAULT 0,
    lat_le_7000 BIGINT NOT NULL DEFAULT 0,
    lat_le_10000 BIGINT NOT NULL DEFAULT 0,
    lat_le_15000 BIGINT NOT NULL DEFAULT 0,
    lat_le_20000 BIGINT NOT NULL DEFAULT 0,
    lat_le_30000 BIGINT NOT NULL DEFAULT 0,
    lat_le_60000 BIGINT NOT NULL DEFAULT 0,
    lat_le_inf BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, key_id, org_id, mcp)
);
CREATE INDEX IF NOT EXISTS kw_usage_day_org ON kw_usage_day (org_id, bucket_start);
CREATE INDEX IF NOT EXISTS kw_usage_day_key ON kw_usage_day (key_id, bucket_start);

-- Where each file source stands, committed in the same transaction as the counts it covers.
CREATE TABLE IF NOT EXISTS kw_checkpoints (
    fingerprint TEXT PRIMARY KEY NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    byte_offset BIGINT NOT NULL,
    line_no BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Lines that could not be ingested, with why and where; full keys are redacted first.
CREATE TABLE IF NOT EXISTS kw_dead_letters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source TEXT NOT NULL,
    line_no BIGINT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    line TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS kw_dead_letters_source ON kw_dead_letters (source, line_no);
