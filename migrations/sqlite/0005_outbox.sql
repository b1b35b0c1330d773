-- Alert delivery (src/notify). kw_outbox: one row per alert change worth telling someone about
-- (opened, severity raised, resolved), written in the same transaction as the alert upsert, so a
-- crash can neither lose a change nor record one twice. The dispatcher routes and groups them
-- into kw_notifications (one message for one receiver) and marks them dispatched in one
-- transaction; the sender marks a notification sent only after the server accepted it.
CREATE TABLE IF NOT EXISTS kw_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    change TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    dispatched_at TEXT
);
CREATE INDEX IF NOT EXISTS kw_outbox_pending ON kw_outbox (dispatched_at, id);

CREATE TABLE IF NOT EXISTS kw_notifications (
    id TEXT PRIMARY KEY NOT NULL,
    receiver TEXT NOT NULL,
    group_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    sent_at TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS kw_notifications_due ON kw_notifications (status, next_attempt_at);

-- The grouping stage's state (one JSON document per group), so a restart neither repeats a
-- notification nor forgets what a group already said.
CREATE TABLE IF NOT EXISTS kw_notify_groups (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL
);

-- Silences made with `keywatch silence add`: matchers (JSON), until expires_at.
CREATE TABLE IF NOT EXISTS kw_silences (
    id TEXT PRIMARY KEY NOT NULL,
    matchers TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
