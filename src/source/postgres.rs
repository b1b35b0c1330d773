//! The postgres source: the auth server's own `mcp_request_log` and refused keys in
//! `auth_audit_log`, read in (`created_at`, id) order with a durable keyset cursor.
//!
//! Owns the cursor and the look-back window. Each table is polled for rows after the cursor
//! (keyset pages), and for rows of the window `[cursor time - look-back, cursor]` it has not
//! counted: a row committed late, with a `created_at` before rows already read, is counted
//! when it appears, and only once, because the ids counted within the window are remembered
//! (`kw_source_seen`, written in the same transaction as their counts). A row that becomes
//! visible more than the look-back after rows newer than it is missed: size the look-back
//! above the auth server's longest transaction. It only moves rows (as request-log lines)
//! and never writes to the auth server's tables.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Checkpoint, CheckpointReader, Chunk, SeenRow, SourceError};
use crate::store::{AuthLog, AuthTable, LogRow, Store};

/// Rows per keyset page (and so per chunk at most).
const PAGE: i64 = 5_000;
/// How often rows past the look-back are forgotten in the database.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Settings of the postgres source, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Where the auth server's tables are.
    pub url: String,
    /// On a first start (no cursor yet), begin here instead of at the oldest row.
    pub since: Option<DateTime<Utc>>,
    /// How long before the cursor a late-committed row is still found and counted.
    pub lookback: Duration,
    /// How often the tables are polled once caught up.
    pub poll: Duration,
}

/// A keyset position: (`created_at`, id).
type Cursor = (DateTime<Utc>, Uuid);

fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The cursor as the checkpoint's `path` holds it: `created_at|id|floor`, where `floor` is
/// where the first start began (nothing before it is ever read, late or not).
fn cursor_text(c: Cursor, floor: DateTime<Utc>) -> String {
    format!("{}|{}|{}", time_text(c.0), c.1, time_text(floor))
}

fn parse_cursor(s: &str) -> Option<(Cursor, DateTime<Utc>)> {
    let mut parts = s.split('|');
    let t = crate::event::parse_timestamp(parts.next()?).ok()?;
    let id = Uuid::parse_str(parts.next()?).ok()?;
    let floor = crate::event::parse_timestamp(parts.next()?).ok()?;
    Some(((t, id), floor))
}

/// Reads both tables into `tx` until `shutdown`. A database that is down is retried and
/// logged, never fatal.
pub async fn run_postgres(
    opts: PostgresOptions,
    store: Store,
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
    health: super::Health,
) -> Result<(), SourceError> {
    let mut tasks = tokio::task::JoinSet::new();
    for table in AuthTable::ALL {
        tasks.spawn(run_table(
            opts.clone(),
            table,
            store.clone(),
            tx.clone(),
            shutdown.clone(),
            health.clone(),
        ));
    }
    drop(tx);
    super::first_error(tasks, "postgres source task").await
}

/// One table's position: the cursor, the rows counted within the window, lines so far.
struct TableState {
    table: AuthTable,
    source: Arc<str>,
    cursor: Cursor,
    /// Where the first start began: the look-back never reaches before it.
    floor: DateTime<Utc>,
    seen: HashMap<Uuid, DateTime<Utc>>,
    lines: u64,
    lookback: chrono::Duration,
}

impl TableState {
    fn window_start(&self) -> DateTime<Utc> {
        (self.cursor.0 - self.lookback).max(self.floor)
    }

    /// Hands `rows` to the pipeline with the position after them.
    async fn send(&mut self, rows: Vec<LogRow>, tx: &Sender<Chunk>) -> Result<(), SourceError> {
        let Some(newest) = rows.iter().map(|r| (r.created_at, r.id)).max() else {
            return Ok(());
        };
        self.cursor = self.cursor.max(newest);
        let first_line_no = self.lines + 1;
        let mut data = Vec::new();
        let mut seen = Vec::with_capacity(rows.len());
        for r in rows {
            // A row's JSON holds no newline (PostgreSQL escapes them); one line per row.
            data.extend_from_slice(r.line.as_bytes());
            data.push(b'\n');
            self.lines += 1;
            self.seen.insert(r.id, r.created_at);
            seen.push(SeenRow {
                id: r.id.to_string(),
                created_at: r.created_at,
            });
        }
        let chunk = Chunk {
            source: Arc::clone(&self.source),
            data,
            first_line_no,
            checkpoint: Some(Checkpoint {
                fingerprint: self.source.to_string(),
                path: cursor_text(self.cursor, self.floor),
                offset: 0,
                line_no: self.lines,
                seen,
            }),
            ack: None,
            read_at: std::time::Instant::now(),
        };
        tx.send(chunk)
            .await
            .map_err(|_| SourceError::PipelineClosed)?;
        let start = self.window_start();
        self.seen.retain(|_, t| *t >= start);
        Ok(())
    }

    /// One poll: late rows of the window, then every row after the cursor.
    async fn poll(&mut self, log: &AuthLog, tx: &Sender<Chunk>) -> Result<(), SourceError> {
        let window = log
            .ids_between(self.table, self.window_start(), self.cursor)
            .await?;
        let missing: Vec<Uuid> = window
            .into_iter()
            .filter(|(id, _)| !self.seen.contains_key(id))
            .map(|(id, _)| id)
            .collect();
        if !missing.is_empty() {
            tracing::debug!(source = %self.source, rows = missing.len(), "Counting rows committed late.");
            for ids in missing.chunks(PAGE as usize) {
                let rows = log.rows_by_id(self.table, ids).await?;
                self.send(rows, tx).await?;
            }
        }
        loop {
            let rows = log.rows_after(self.table, self.cursor, PAGE).await?;
            let full = rows.len() as i64 == PAGE;
            self.send(rows, tx).await?;
            if !full {
                return Ok(());
            }
        }
    }
}

async fn run_table(
    opts: PostgresOptions,
    table: AuthTable,
    store: Store,
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
    health: super::Health,
) -> Result<(), SourceError> {
    let name = table.source_name();
    let start = store.checkpoint(name).await?;
    let lookback = chrono::Duration::from_std(opts.lookback).unwrap_or(chrono::Duration::zero());
    let first_start = opts.since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let (cursor, floor) = start
        .as_ref()
        .and_then(|c| parse_cursor(&c.path))
        .unwrap_or(((first_start, Uuid::nil()), first_start));
    let mut state = TableState {
        table,
        source: Arc::from(name),
        cursor,
        floor,
        seen: HashMap::new(),
        lines: start.as_ref().map_or(0, |c| c.line_no),
        lookback,
    };
    for r in store.seen_rows(name, state.window_start()).await? {
        if let Ok(id) = Uuid::parse_str(&r.id) {
            state.seen.insert(id, r.created_at);
        }
    }
    tracing::info!(source = name, cursor = %cursor_text(cursor, floor), "Reading the auth server's log.");
    let mut log = None;
    let mut pruned = tokio::time::Instant::now();
    let mut delay = opts.poll;
    loop {
        let result = match &log {
            Some(l) => state.poll(l, &tx).await,
            None => AuthLog::connect(&opts.url)
                .await
                .map(|l| {
                    log = Some(l);
                })
                .map_err(SourceError::from),
        };
        match result {
            Ok(()) => {
                health.up(name);
                delay = opts.poll;
            }
            Err(SourceError::PipelineClosed) => return Err(SourceError::PipelineClosed),
            Err(e) => {
                health.down(name, e.to_string());
                tracing::warn!(source = name, error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot read the auth server's log; will retry.");
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            // A minute's margin: the window moves while rows are in flight to the pipeline.
            let before = state.window_start() - chrono::Duration::minutes(1);
            if let Err(e) = store.prune_seen(name, before).await {
                tracing::warn!(source = name, error = %e, "Could not forget rows past the look-back.");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_to_the_microsecond() {
        let t = DateTime::parse_from_rfc3339("2026-11-20T12:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = Uuid::new_v4();
        let floor = DateTime::<Utc>::UNIX_EPOCH;
        assert_eq!(
            parse_cursor(&cursor_text((t, id), floor)),
            Some(((t, id), floor))
        );
        assert_eq!(parse_cursor("garbage"), None);
    }
}
