-- Alerts raised by the detectors: one row per fingerprint (type + subject), updated while the
-- anomaly persists and marked resolved when it recovers, so a persisting anomaly stays one
-- alert. Written in the same transaction as the counts whose lines raised it.
CREATE TABLE IF NOT EXISTS kw_alerts (
    fingerprint TEXT PRIMARY KEY NOT NULL,
    alert_type TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    key_id TEXT,
    key_prefix TEXT,
    org_id TEXT,
    source_ip TEXT,
    started_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    resolved_at TEXT,
    summary TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS kw_alerts_started ON kw_alerts (started_at);
