//! Reading the auth server's own logs for the postgres source: `mcp_request_log` and the
//! refused keys of `auth_audit_log`, each row turned into a request-log line, in
//! (`created_at`, id) order; and keywatch's memory of the rows it counted (`kw_source_seen`).
//!
//! Only reads the auth server's tables (never alters them, never adds an index to them) and
//! decides nothing about cursors or windows: the source does.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use uuid::Uuid;

use super::keys::DbTime;
use super::{QueryContext, Store, StoreError, redact_url, with_pool};
use crate::source::SeenRow;

/// One of the auth server's logs the postgres source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthTable {
    /// `mcp_request_log`: one row per proxied request (id: `request_id`).
    Requests,
    /// `auth_audit_log` rows with `event_type = 'login_failed'` and `auth_method = 'api_key'`:
    /// refused keys, which never reach `mcp_request_log`.
    RefusedKeys,
}

impl AuthTable {
    pub const ALL: [AuthTable; 2] = [AuthTable::Requests, AuthTable::RefusedKeys];

    /// The source's name, and its checkpoint's fingerprint.
    pub fn source_name(self) -> &'static str {
        match self {
            AuthTable::Requests => "postgres:mcp_request_log",
            AuthTable::RefusedKeys => "postgres:auth_audit_log",
        }
    }

    /// `SELECT id, created_at, line FROM ... WHERE <filter> AND ` — the caller adds the rest.
    fn select(self) -> &'static str {
        match self {
            AuthTable::Requests => {
                "SELECT r.request_id AS id, r.created_at, CAST(row_to_json(r) AS TEXT) AS line \
                 FROM mcp_request_log r WHERE TRUE"
            }
            // The audit row as the request-log line a refused key makes: 401, the presented
            // prefix, and the reason turned into the error code the detectors know.
            AuthTable::RefusedKeys => {
                "SELECT a.id, a.created_at, CAST(json_build_object(\
                   'request_id', a.id, 'created_at', a.created_at, 'api_key_id', NULL, \
                   'organization_id', NULL, 'key_prefix', a.metadata->>'key_prefix', \
                   'http_status_code', 401, 'source_ip', a.ip_address, 'user_agent', a.user_agent, \
                   'endpoint_path', a.metadata->>'endpoint', \
                   'error_code', CASE WHEN a.metadata->>'reason' = 'key_expired' THEN 'expired_key' \
                     WHEN a.metadata->>'reason' = 'key_status_revoked' THEN 'revoked_key' \
                     ELSE 'unauthorized' END, \
                   'metadata', json_build_object('reason', a.metadata->>'reason')) AS TEXT) AS line \
                 FROM auth_audit_log a \
                 WHERE a.event_type = 'login_failed' AND a.auth_method = 'api_key'"
            }
        }
    }

    fn id_column(self) -> &'static str {
        match self {
            AuthTable::Requests => "r.request_id",
            AuthTable::RefusedKeys => "a.id",
        }
    }

    fn time_column(self) -> &'static str {
        match self {
            AuthTable::Requests => "r.created_at",
            AuthTable::RefusedKeys => "a.created_at",
        }
    }
}

/// A row of an auth log as a request-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub line: String,
}

/// A read-only connection to the auth server's database.
#[derive(Debug, Clone)]
pub struct AuthLog {
    pool: PgPool,
}

impl AuthLog {
    /// Connects to the PostgreSQL database at `url`.
    pub async fn connect(url: &str) -> Result<AuthLog, StoreError> {
        let connect_err = |source| StoreError::Connect {
            url: redact_url(url),
            source,
        };
        let opts = PgConnectOptions::from_str(url).map_err(connect_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(connect_err)?;
        Ok(AuthLog { pool })
    }

    /// Up to `limit` rows after `(created_at, id)`, in that order.
    pub async fn rows_after(
        &self,
        table: AuthTable,
        after: (DateTime<Utc>, Uuid),
        limit: i64,
    ) -> Result<Vec<LogRow>, StoreError> {
        let (t, id) = (table.time_column(), table.id_column());
        let sql = format!(
            "{} AND ({t}, {id}) > ($1, $2) ORDER BY {t}, {id} LIMIT $3",
            table.select()
        );
        let rows: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(after.0)
            .bind(after.1)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .context("reading the auth server's log")?;
        Ok(rows.into_iter().map(log_row).collect())
    }

    /// Ids and times of the rows from `from` up to and including `to` (the look-back window).
    pub async fn ids_between(
        &self,
        table: AuthTable,
        from: DateTime<Utc>,
        to: (DateTime<Utc>, Uuid),
    ) -> Result<Vec<(Uuid, DateTime<Utc>)>, StoreError> {
        let (t, id) = (table.time_column(), table.id_column());
        let where_ = match table {
            AuthTable::Requests => "WHERE TRUE",
            AuthTable::RefusedKeys => {
                "WHERE a.event_type = 'login_failed' AND a.auth_method = 'api_key'"
            }
        };
        let from_ = match table {
            AuthTable::Requests => "mcp_request_log r",
            AuthTable::RefusedKeys => "auth_audit_log a",
        };
        let sql = format!(
            "SELECT {id}, {t} FROM {from_} {where_} AND {t} >= $1 AND ({t}, {id}) <= ($2, $3)"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(from)
            .bind(to.0)
            .bind(to.1)
            .fetch_all(&self.pool)
            .await
            .context("reading the auth server's log window")
    }

    /// The rows with these ids.
    pub async fn rows_by_id(
        &self,
        table: AuthTable,
        ids: &[Uuid],
    ) -> Result<Vec<LogRow>, StoreError> {
        let (t, id) = (table.time_column(), table.id_column());
        let sql = format!("{} AND {id} = ANY($1) ORDER BY {t}, {id}", table.select());
        let rows: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .context("reading late rows of the auth server's log")?;
        Ok(rows.into_iter().map(log_row).collect())
    }
}

fn log_row((id, created_at, line): (Uuid, DateTime<Utc>, String)) -> LogRow {
    LogRow {
        id,
        created_at,
        line,
    }
}

impl Store {
    /// The rows `source` counted at or after `since`.
    pub async fn seen_rows(
        &self,
        source: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<SeenRow>, StoreError> {
        let rows: Vec<(String, String)> = with_pool!(self, p => sqlx::query_as(
            "SELECT row_id, CAST(created_at AS TEXT) FROM kw_source_seen \
             WHERE source = $1 AND created_at >= $2",
        )
        .bind(source)
        .bind(DbTime(since))
        .fetch_all(p)
        .await)
        .context("reading the rows a source counted")?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, t)| {
                Some(SeenRow {
                    id,
                    created_at: crate::event::parse_timestamp(&t).ok()?,
                })
            })
            .collect())
    }

    /// Whether `source` counted the row `row_id` (and has not forgotten it yet).
    pub async fn has_seen(&self, source: &str, row_id: &str) -> Result<bool, StoreError> {
        let n: i64 = with_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM kw_source_seen WHERE source = $1 AND row_id = $2",
        )
        .bind(source)
        .bind(row_id)
        .fetch_one(p)
        .await)
        .context("looking up a row a source counted")?;
        Ok(n > 0)
    }

    /// Forgets the rows of `source` older than `before` (outside its look-back window, so
    /// never consulted again: this needs no transaction with the counts); returns how many.
    pub async fn prune_seen(&self, source: &str, before: DateTime<Utc>) -> Result<u64, StoreError> {
        with_pool!(self, p => sqlx::query(
            "DELETE FROM kw_source_seen WHERE source = $1 AND created_at < $2",
        )
        .bind(source)
        .bind(DbTime(before))
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .context("forgetting rows past the look-back")
    }
}

/// Adds the rows a checkpoint says were counted, inside the batch's transaction.
macro_rules! insert_seen {
    ($tx:expr, $source:expr, $rows:expr) => {{
        let mut result = Ok(());
        for chunk in $rows.chunks(300) {
            let mut qb =
                sqlx::QueryBuilder::new("INSERT INTO kw_source_seen (source, row_id, created_at) ");
            qb.push_values(chunk, |mut b, r: &$crate::source::SeenRow| {
                b.push_bind($source)
                    .push_bind(r.id.clone())
                    .push_bind($crate::store::keys::DbTime(r.created_at));
            });
            qb.push(" ON CONFLICT (source, row_id) DO NOTHING");
            if let Err(e) = qb.build().execute(&mut *$tx).await {
                result = Err(e);
                break;
            }
        }
        result
    }};
}
pub(crate) use insert_seen;
