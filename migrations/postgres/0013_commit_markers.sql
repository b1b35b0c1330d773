-- The last batch each pipeline (one per process run, named by a random id) committed, written
-- in the batch's own transaction. A batch retried after a commit whose answer was lost (the
-- connection dropped during COMMIT) finds its number here and is not counted twice.
CREATE TABLE IF NOT EXISTS kw_commit_markers (
    writer TEXT PRIMARY KEY NOT NULL,
    seq BIGINT NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL
);
