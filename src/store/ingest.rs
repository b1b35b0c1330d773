//! Committing what the pipeline counted: usage rollups, source checkpoints and dead letters, in
//! one transaction, so that a crash at any moment neither loses nor double-counts a request.

use std::sync::LazyLock;

use chrono::Utc;
use sqlx::QueryBuilder;

use super::keys::DbTime;
use super::{COUNTER_COLUMNS, QueryContext, Store, StoreError, with_pool};
use crate::source::{Checkpoint, CheckpointReader};
use crate::usage::{Counters, Granularity, Rollup, SeriesKey, latency_columns};

/// Rows per multi-row upsert: 200 rows of 41 parameters stay far below both databases'
/// parameter limits while cutting round trips to PostgreSQL by two orders of magnitude.
const ROWS_PER_STATEMENT: usize = 200;

/// A refused line, kept with where it came from and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub source: String,
    pub line_no: u64,
    pub reason: &'static str,
    pub detail: String,
    /// The line as text (lossy where it was not UTF-8), keys redacted, cut to a few KiB.
    pub line: String,
}

/// Which batch of which pipeline a commit is: a pipeline numbers its batches from 1 under a
/// random writer id, and each commit records its number in the same transaction, so a batch
/// retried after a commit whose answer was lost is recognised and not counted twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitMarker {
    pub writer: String,
    pub seq: i64,
}

/// How long the marker of a pipeline that no longer commits is kept.
const MARKER_RETENTION_DAYS: i64 = 7;

/// Everything one commit writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Set by the pipeline before the first attempt to commit the batch, kept across retries.
    pub marker: Option<CommitMarker>,
    pub rollup: Rollup,
    /// The newest checkpoint of each file source covered by the batch.
    pub checkpoints: Vec<(String, Checkpoint)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Alerts opened, updated or resolved by the lines of the batch.
    pub findings: Vec<crate::detect::Finding>,
    /// The changes among them worth a notification, queued in the outbox with them.
    pub changes: Vec<crate::notify::AlertChange>,
    /// Where keys were used from (bounded by `crate::activity`).
    pub activity: crate::activity::Activity,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.rollup.is_empty()
            && self.checkpoints.is_empty()
            && self.dead_letters.is_empty()
            && self.findings.is_empty()
            && self.changes.is_empty()
            && self.activity.is_empty()
    }
}

/// The column list after the key columns, as the upsert writes it.
static ALL_COLUMNS: LazyLock<Vec<String>> = LazyLock::new(|| {
    COUNTER_COLUMNS
        .into_iter()
        .map(str::to_owned)
        .chain(latency_columns())
        .collect()
});

fn upsert_head(g: Granularity) -> String {
    format!(
        "INSERT INTO kw_usage_{} (bucket_start, key_id, org_id, mcp, {}) ",
        g.as_str(),
        ALL_COLUMNS.join(", ")
    )
}

fn upsert_tail(g: Granularity) -> String {
    let table = format!("kw_usage_{}", g.as_str());
    let sets: Vec<String> = ALL_COLUMNS
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    format!(
        " ON CONFLICT (bucket_start, key_id, org_id, mcp) DO UPDATE SET {}",
        sets.join(", ")
    )
}

fn counter_values(c: &Counters) -> impl Iterator<Item = i64> + '_ {
    [
        c.requests,
        c.err_auth,
        c.err_rate_limited,
        c.err_client,
        c.err_server,
        c.latency_ms_sum,
        c.bytes_in,
        c.bytes_out,
    ]
    .into_iter()
    .chain(c.latency.iter().copied())
    .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn id_text(id: Option<uuid::Uuid>) -> String {
    id.map(|u| u.hyphenated().to_string()).unwrap_or_default()
}

/// Adds `rows` to a query builder as one VALUES list of an upsert.
macro_rules! push_usage_rows {
    ($qb:expr, $rows:expr) => {
        $qb.push_values($rows, |mut b, (k, c): (&SeriesKey, &Counters)| {
            b.push_bind(DbTime(k.bucket_start))
                .push_bind(id_text(k.key_id))
                .push_bind(id_text(k.org_id))
                .push_bind(k.mcp.to_string());
            for v in counter_values(c) {
                b.push_bind(v);
            }
        })
    };
}

impl Store {
    /// Commits a batch atomically: usage added to the rollup tables, checkpoints replaced,
    /// dead letters appended, alerts upserted and their changes queued in the outbox.
    pub async fn commit_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        let now = Utc::now();
        let postgres = matches!(self.pool, super::Pool::Postgres(_));
        with_pool!(self, p => {
            let mut tx = p.begin().await.context("starting a transaction")?;
            if let Some(m) = &batch.marker {
                // First, so that a retry waits on the row lock of an attempt whose COMMIT is
                // still in flight, then sees its number.
                let newer = sqlx::query(
                    "INSERT INTO kw_commit_markers (writer, seq, committed_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, \
                     committed_at = excluded.committed_at WHERE kw_commit_markers.seq < excluded.seq",
                )
                .bind(&m.writer)
                .bind(m.seq)
                .bind(DbTime(now))
                .execute(&mut *tx)
                .await
                .context("numbering a batch")?
                .rows_affected();
                if newer == 0 {
                    tracing::info!(writer = %m.writer, seq = m.seq, "The batch was committed by an attempt whose answer was lost; not counting it again.");
                    return tx.rollback().await.context("committing a batch");
                }
                if m.seq == 1 {
                    sqlx::query("DELETE FROM kw_commit_markers WHERE committed_at < $1")
                        .bind(DbTime(now - chrono::Duration::days(MARKER_RETENTION_DAYS)))
                        .execute(&mut *tx)
                        .await
                        .context("forgetting old batch numbers")?;
                }
            }
            for g in Granularity::ALL {
                let mut rows: Vec<(&SeriesKey, &Counters)> = batch.rollup.series(g).iter().collect();
                if postgres {
                    // Two instances adding to the same rows (refused keys, shared MCPs) lock
                    // them in one order, so neither waits on the other in a cycle (a deadlock
                    // PostgreSQL would break by failing one commit, to be retried).
                    rows.sort_unstable_by(|(a, _), (b, _)| {
                        (a.bucket_start, a.key_id, a.org_id, &*a.mcp)
                            .cmp(&(b.bucket_start, b.key_id, b.org_id, &*b.mcp))
                    });
                }
                for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::new(upsert_head(g));
                    push_usage_rows!(qb, chunk.iter().copied());
                    qb.push(upsert_tail(g));
                    qb.build().execute(&mut *tx).await.context("adding usage counts")?;
                }
            }
            for (source, cp) in &batch.checkpoints {
                sqlx::query(
                    "INSERT INTO kw_checkpoints (fingerprint, source, path, byte_offset, line_no, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (fingerprint) DO UPDATE SET \
                     source = excluded.source, path = excluded.path, byte_offset = excluded.byte_offset, \
                     line_no = excluded.line_no, updated_at = excluded.updated_at",
                )
                .bind(&cp.fingerprint)
                .bind(source)
                .bind(&cp.path)
                .bind(cp.offset as i64)
                .bind(cp.line_no as i64)
                .bind(DbTime(now))
                .execute(&mut *tx)
                .await
                .context("saving a checkpoint")?;
                super::auth_log::insert_seen!(tx, cp.fingerprint.as_str(), &cp.seen)
                    .context("remembering the rows a source counted")?;
            }
            for d in &batch.dead_letters {
                sqlx::query(
                    "INSERT INTO kw_dead_letters (source, line_no, reason, detail, line, recorded_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&d.source)
                .bind(d.line_no as i64)
                .bind(d.reason)
                .bind(&d.detail)
                .bind(&d.line)
                .bind(DbTime(now))
                .execute(&mut *tx)
                .await
                .context("keeping a refused line")?;
            }
            let activity: Vec<_> = batch.activity.iter().collect();
            for chunk in activity.chunks(ROWS_PER_STATEMENT) {
                let mut qb = QueryBuilder::new(
                    "INSERT INTO kw_key_activity (key_id, day, facet, value, first_seen, last_seen, requests) ",
                );
                qb.push_values(chunk.iter().copied(), |mut b, (k, seen)| {
                    b.push_bind(k.key_id.hyphenated().to_string())
                        .push_bind(DbTime(k.day))
                        .push_bind(k.facet.as_str())
                        .push_bind(k.value.to_string())
                        .push_bind(DbTime(seen.first))
                        .push_bind(DbTime(seen.last))
                        .push_bind(i64::try_from(seen.requests).unwrap_or(i64::MAX));
                });
                qb.push(
                    " ON CONFLICT (key_id, day, facet, value) DO UPDATE SET \
                     first_seen = CASE WHEN excluded.first_seen < kw_key_activity.first_seen \
                     THEN excluded.first_seen ELSE kw_key_activity.first_seen END, \
                     last_seen = CASE WHEN excluded.last_seen > kw_key_activity.last_seen \
                     THEN excluded.last_seen ELSE kw_key_activity.last_seen END, \
                     requests = kw_key_activity.requests + excluded.requests",
                );
                qb.build().execute(&mut *tx).await.context("recording key activity")?;
            }
            if !batch.activity.is_empty() {
                let cutoff = now - chrono::Duration::days(crate::activity::RETENTION_DAYS);
                sqlx::query("DELETE FROM kw_key_activity WHERE day < $1")
                    .bind(DbTime(cutoff))
                    .execute(&mut *tx)
                    .await
                    .context("forgetting old key activity")?;
            }
            let states = super::notify::stored_states!(&mut tx, &batch.changes, postgres)?;
            super::alerts::upsert_findings!(&mut tx, &batch.findings)?;
            super::notify::insert_changes!(&mut tx, &batch.changes, states, now)?;
            tx.commit().await.context("committing a batch")
        })
    }

    /// Dead letters of one source (all sources with `None`), oldest first.
    pub async fn dead_letters(&self, source: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let rows: Vec<(String, i64, String, String, String)> =
            with_pool!(self, p => sqlx::query_as(
            "SELECT source, line_no, reason, detail, line FROM kw_dead_letters \
             WHERE ($1 IS NULL OR source = $1) ORDER BY id",
        )
        .bind(source)
        .fetch_all(p)
        .await)
            .context("reading refused lines")?;
        Ok(rows
            .into_iter()
            .map(|(source, line_no, reason, detail, line)| DeadLetter {
                source,
                line_no: line_no as u64,
                reason: crate::event::RejectReason::ALL
                    .into_iter()
                    .find(|r| r.as_str() == reason)
                    .map(|r| r.as_str())
                    .unwrap_or("unknown"),
                detail,
                line,
            })
            .collect())
    }
}

impl CheckpointReader for Store {
    async fn checkpoint(&self, fingerprint: &str) -> Result<Option<Checkpoint>, StoreError> {
        let row: Option<(String, i64, i64)> = with_pool!(self, p => sqlx::query_as(
            "SELECT path, byte_offset, line_no FROM kw_checkpoints WHERE fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(p)
        .await)
        .context("reading a checkpoint")?;
        Ok(row.map(|(path, offset, line_no)| Checkpoint {
            fingerprint: fingerprint.to_owned(),
            path,
            offset: offset as u64,
            line_no: line_no as u64,
            seen: Vec::new(),
        }))
    }
}
