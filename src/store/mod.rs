//! Storage through sqlx, on two real back ends: SQLite (the embedded default) and PostgreSQL
//! (the database the auth server also uses).
//!
//! Owns the connection, the migrations and every SQL statement keywatch runs. The two
//! dialects share their SQL wherever the databases agree (`$N` placeholders, `ON CONFLICT`
//! upserts, `CAST(SUM(..) AS BIGINT)`), so each operation is written once and run on either
//! pool by [`with_pool!`]. Nothing outside this module sees a pool or writes SQL; nothing in
//! here decides what to count or when.

pub(crate) mod alerts;
pub(crate) mod auth_log;
mod ingest;
pub(crate) mod keys;
mod notify;
mod report;
pub mod retention;

pub use alerts::{AlertAction, AlertFilter, BenignPlace, StoredAlert};
pub use auth_log::{AuthLog, AuthTable, LogRow};
pub use ingest::{Batch, CommitMarker, DeadLetter};
pub use keys::{NewKeyRow, NewOrg};
pub use notify::{DeliveryLease, OutboxDepth, QueuedNotification, StoredSilence};
pub use report::{ActivityRow, SegmentQuery, UsageAggregate};
pub use retention::{Pruned, Retention, RetentionError};

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// The table where keywatch records its own migrations. Not sqlx's default
/// `_sqlx_migrations`: the auth server (also built on sqlx) keeps its own there, and each
/// would refuse to start on finding the other's versions.
const MIGRATIONS_TABLE: &str = "keywatch_migrations";

/// The additive counter columns of the usage tables, before the latency histogram's, in the
/// order of `usage::Counters`.
const COUNTER_COLUMNS: [&str; 8] = [
    "requests",
    "err_auth",
    "err_rate_limited",
    "err_client",
    "err_server",
    "latency_ms_sum",
    "bytes_in",
    "bytes_out",
];

/// What went wrong talking to the database, worded for the person running keywatch.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {url:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl { url: String },
    #[error(
        "cannot open the database at {url}: {source}; check --database-url (KEYWATCH_DATABASE_URL) and that the server is running"
    )]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply keywatch's migrations to {url}: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error while {context}: {source}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "cannot open the database at {url}: {why}, and SQLite must write beside the file (its journal)"
    )]
    SqliteDir { url: String, why: String },
    /// A commit failed for a reason waiting will not cure (the SQLite file's disk is full,
    /// the file is read-only or damaged): the daemon stops rather than retry forever.
    #[error(
        "cannot write to the database at {url}: {why} ({source}); keywatch stopped with every count and checkpoint up to its last commit kept, so fix this and start it again to continue from there"
    )]
    Unwritable {
        url: String,
        why: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// Why retrying cannot help, when that is so: a SQLite file whose disk is full, that is
    /// read-only, damaged or cannot be opened, or a statement the database refuses whatever
    /// the moment. `None` for what passes: a server restarting, unreachable or busy, a lock.
    pub fn permanent(&self) -> Option<&'static str> {
        match self {
            StoreError::Query { source, .. } | StoreError::Connect { source, .. } => {
                permanent(source)
            }
            StoreError::Unwritable { why, .. } => Some(why),
            StoreError::UnsupportedUrl { .. } | StoreError::Invalid(_) => {
                Some("the request is invalid")
            }
            StoreError::SqliteDir { .. } => Some("the directory is not writable"),
            StoreError::Migrate { .. } => Some("the migrations do not apply"),
        }
    }

    /// This error as [`StoreError::Unwritable`] for the database at `url`, when it is a
    /// permanent failure of a statement.
    pub fn unwritable(self, url: &str) -> StoreError {
        match (self.permanent(), self) {
            (Some(why), StoreError::Query { source, .. }) => StoreError::Unwritable {
                url: url.to_owned(),
                why,
                source,
            },
            (_, other) => other,
        }
    }
}

/// See [`StoreError::permanent`].
fn permanent(e: &sqlx::Error) -> Option<&'static str> {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => None,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
            if let (true, Ok(extended)) = (sqlite, code.parse::<u32>()) {
                // SQLite result codes (the low byte is the primary code).
                match extended & 0xff {
                    5 | 6 => None, // SQLITE_BUSY, SQLITE_LOCKED
                    13 => Some("the disk is full"),
                    8 => Some("the file is read-only"),
                    10 => Some("the disk failed to read or write"),
                    11 | 26 => Some("the file is damaged or not a database"),
                    3 | 23 => Some("permission denied"),
                    14 => Some("the file cannot be opened"),
                    _ => Some("SQLite refused the write"),
                }
            } else {
                // SQLSTATE classes of PostgreSQL that pass: connection exceptions (08),
                // insufficient resources (53), operator intervention such as a shutdown or
                // restart (57), system errors (58) and rolled-back transactions (40).
                match code.get(..2) {
                    Some("08" | "53" | "57" | "58" | "40") => None,
                    _ => Some("the database refused the batch"),
                }
            }
        }
        _ => Some("the database refused the batch"),
    }
}

/// Adds what a failed statement was for.
pub(crate) trait QueryContext<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> QueryContext<T> for Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { context, source })
    }
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs one body against whichever pool the store has. The body is compiled once per
/// back end, so it may use `$p` as a concrete `SqlitePool` or `PgPool`.
macro_rules! with_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}
pub(crate) use with_pool;

/// A connection pool to keywatch's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    url: String,
}

impl Store {
    /// Opens (and for SQLite, creates) the database at `url`, without migrating.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let shown = redact_url(url);
        let connect_err = |source| StoreError::Connect {
            url: shown.clone(),
            source,
        };
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(connect_err)?
                .create_if_missing(true)
                // WAL with NORMAL sync survives a killed process without losing a commit.
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // The rollup tables are written all over their B-trees; SQLite's default 2 MiB
                // page cache makes every upsert a system call (measured: 70% of ingest time).
                .pragma("cache_size", "-65536")
                .pragma("mmap_size", "268435456");
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await;
            match pool {
                Ok(p) => Pool::Sqlite(p),
                Err(e) => {
                    return Err(match sqlite_dir_unwritable(url) {
                        Some(why) => StoreError::SqliteDir {
                            url: shown.clone(),
                            why,
                        },
                        None => connect_err(e),
                    });
                }
            }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url).map_err(connect_err)?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?,
            )
        } else {
            return Err(StoreError::UnsupportedUrl { url: shown });
        };
        Ok(Store { pool, url: shown })
    }

    /// Opens the database and applies any migrations it lacks.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies keywatch's migrations for this dialect: the shared key tables where they are
    /// missing (never altering existing ones), then keywatch's own tables.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let err = |source| StoreError::Migrate {
            url: self.url.clone(),
            source,
        };
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut m = sqlx::migrate!("migrations/sqlite");
                m.dangerous_set_table_name(MIGRATIONS_TABLE);
                m.run(p).await.map_err(err)
            }
            Pool::Postgres(p) => {
                let mut m = sqlx::migrate!("migrations/postgres");
                m.dangerous_set_table_name(MIGRATIONS_TABLE);
                m.run(p).await.map_err(err)
            }
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.pool {
            Pool::Sqlite(_) => Dialect::Sqlite,
            Pool::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The database URL with any password removed, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))
            .context("checking the connection")
    }

    pub async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }
}

/// Why the directory of the SQLite file at `url` cannot be written, when it cannot: a
/// read-only file system, a permission. Asked only once opening failed, to say which.
fn sqlite_dir_unwritable(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))?;
    let file = std::path::Path::new(rest.split('?').next()?);
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let probe = dir.join(format!(".keywatch-write-test-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(format!(
            "its directory {} is not writable ({e})",
            dir.display()
        )),
    }
}

/// `url` with the password part of its authority replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_appear_in_messages() {
        assert_eq!(
            redact_url("postgres://kw:s3cret@db:5432/auth"),
            "postgres://kw:***@db:5432/auth"
        );
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(redact_url("sqlite://keywatch.db"), "sqlite://keywatch.db");
    }
}
