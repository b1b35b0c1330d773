-- The postgres source's memory of the auth server's rows it counted within its look-back
-- window: the keyset cursor alone (kw_checkpoints) cannot tell a row committed late with an
-- earlier created_at from one already counted. Written in the same transaction as the rows'
-- counts; rows older than the window are pruned. Numbered 0011 (0010 is taken elsewhere).
CREATE TABLE IF NOT EXISTS kw_source_seen (
    source TEXT NOT NULL,
    row_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (source, row_id)
);
CREATE INDEX IF NOT EXISTS idx_kw_source_seen_created ON kw_source_seen (source, created_at);
