//! Alert delivery's tables: the outbox of alert changes (written by `commit_batch`), the
//! notifications and their delivery state, the grouping stage's saved state and the silences.

use chrono::{DateTime, Utc};

use super::keys::DbTime;
use super::{QueryContext, Store, StoreError, with_pool};
use crate::notify::{AlertChange, Notification};

/// Inside a batch transaction, before its alerts are upserted: how the database holds each
/// alert that `$changes` change, keyed by fingerprint. On PostgreSQL each fingerprint is first
/// locked for the rest of the transaction (in sorted order, so two instances cannot deadlock
/// on them), so that two instances committing the same change at once judge it in turn.
macro_rules! stored_states {
    ($tx:expr, $changes:expr, $postgres:expr) => {{
        let mut states: std::collections::HashMap<&str, Option<$crate::notify::StoredState>> =
            std::collections::HashMap::new();
        let mut firsts: Vec<&$crate::notify::AlertChange> = Vec::new();
        for c in $changes {
            if !firsts.iter().any(|f| f.fingerprint == c.fingerprint) {
                firsts.push(c);
            }
        }
        firsts.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        let failed = |source| $crate::store::StoreError::Query {
            context: "reading the alerts a batch changes",
            source,
        };
        for c in firsts {
            if $postgres {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(&c.fingerprint)
                    .execute(&mut **$tx)
                    .await
                    .map_err(failed)?;
            }
            let row: Option<(String, String, i32)> = sqlx::query_as(
                "SELECT status, severity, CASE WHEN last_seen_at < $2 THEN 1 ELSE 0 END \
                 FROM kw_alerts WHERE fingerprint = $1",
            )
            .bind(&c.fingerprint)
            .bind($crate::store::keys::DbTime(c.started_at))
            .fetch_optional(&mut **$tx)
            .await
            .map_err(failed)?;
            let state = row.map(|(status, severity, later)| $crate::notify::StoredState {
                status: $crate::notify::StoredStatus::parse(&status),
                severity: $crate::notify::route::parse_severity(&severity)
                    .unwrap_or($crate::detect::Severity::Info),
                later_episode: later != 0,
            });
            states.insert(c.fingerprint.as_str(), state);
        }
        Ok::<_, $crate::store::StoreError>(states)
    }};
}
pub(crate) use stored_states;

/// Writes alert changes into the outbox inside a batch transaction: each as it still reads
/// against `$states` (from [`stored_states`]), so that a change the database already holds
/// (another instance announced it) or that an admin silenced by marking the episode benign is
/// not queued again.
macro_rules! insert_changes {
    ($tx:expr, $changes:expr, $states:expr, $now:expr) => {{
        let mut states = $states;
        for c in $changes {
            let Some(kind) = states
                .get_mut(c.fingerprint.as_str())
                .and_then(|s| c.against(s))
            else {
                continue;
            };
            let mut c = c.clone();
            c.kind = kind;
            sqlx::query(
                "INSERT INTO kw_outbox (fingerprint, change, payload, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&c.fingerprint)
            .bind(c.kind.as_str())
            .bind(serde_json::to_string(&c).unwrap_or_else(|_| "{}".into()))
            .bind($crate::store::keys::DbTime($now))
            .execute(&mut **$tx)
            .await
            .map_err(|source| $crate::store::StoreError::Query {
                context: "queueing a notification",
                source,
            })?;
        }
        Ok::<(), $crate::store::StoreError>(())
    }};
}
pub(crate) use insert_changes;

/// The PostgreSQL advisory lock (scoped to keywatch's database) that the delivering instance
/// holds: "kwnotify" in ASCII.
const DELIVERY_LOCK: i64 = 0x6b77_6e6f_7469_6679;

/// The right to deliver notifications, held while this lives. With several instances on one
/// PostgreSQL database, exactly one holds it: the grouping state and the queue of
/// notifications are one per database, so two deliverers would send twice. It is a session
/// lock on a connection of its own, so a killed instance's lease ends with its connection and
/// a standing-by instance takes over. On SQLite (one process per file) it always holds.
pub struct DeliveryLease {
    conn: Option<sqlx::PgConnection>,
}

impl DeliveryLease {
    /// Whether the lease still holds: its connection answers (a lost connection took the lock
    /// with it).
    pub async fn holds(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(c) => sqlx::query("SELECT 1").execute(&mut *c).await.is_ok(),
        }
    }
}

impl Store {
    /// The delivery lease if no other instance holds it now.
    pub async fn try_delivery_lease(&self) -> Result<Option<DeliveryLease>, StoreError> {
        let p = match &self.pool {
            super::Pool::Sqlite(_) => return Ok(Some(DeliveryLease { conn: None })),
            super::Pool::Postgres(p) => p,
        };
        // Detached: a pooled connection would go back to the pool still holding the lock.
        let mut conn = p
            .acquire()
            .await
            .context("opening a connection for the delivery lock")?
            .detach();
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(DELIVERY_LOCK)
            .fetch_one(&mut conn)
            .await
            .context("taking the delivery lock")?;
        Ok(got.then_some(DeliveryLease { conn: Some(conn) }))
    }
}

/// A notification waiting for delivery, with how often it was tried.
#[derive(Debug, Clone)]
pub struct QueuedNotification {
    pub notification: Notification,
    pub attempts: u32,
}

/// A silence as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredSilence {
    pub id: String,
    pub matchers: crate::notify::config::StoredMatchers,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// How many notifications are in each state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxDepth {
    /// Alert changes not yet routed and grouped.
    pub changes: u64,
    /// Notifications waiting for delivery (including retries).
    pub pending: u64,
    /// When the oldest of either was queued.
    pub oldest: Option<DateTime<Utc>>,
}

impl Store {
    /// Up to `limit` alert changes not yet dispatched, oldest first.
    pub async fn pending_changes(&self, limit: i64) -> Result<Vec<(i64, AlertChange)>, StoreError> {
        let rows: Vec<(i64, String)> = with_pool!(self, p => sqlx::query_as(
            "SELECT id, payload FROM kw_outbox WHERE dispatched_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(p)
        .await)
        .context("reading the outbox")?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, payload)| match serde_json::from_str(&payload) {
                Ok(c) => Some((id, c)),
                Err(e) => {
                    tracing::warn!(id, error = %e, "Skipping an outbox row that does not parse.");
                    None
                }
            })
            .collect())
    }

    /// The grouping stage's saved state, if any.
    pub async fn notify_state(&self) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = with_pool!(self, p => sqlx::query_as(
            "SELECT state FROM kw_notify_groups WHERE id = 'grouper'",
        )
        .fetch_optional(p)
        .await)
        .context("reading the notification groups")?;
        Ok(row.map(|r| r.0))
    }

    /// In one transaction: marks the changes `ids` dispatched, saves the grouping state and
    /// queues `notifications` for delivery.
    pub async fn commit_dispatch(
        &self,
        ids: &[i64],
        state: &str,
        notifications: &[Notification],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        with_pool!(self, p => {
            let mut tx = p.begin().await.context("starting a transaction")?;
            for id in ids {
                let done = sqlx::query(
                    "UPDATE kw_outbox SET dispatched_at = $2 WHERE id = $1 AND dispatched_at IS NULL",
                )
                .bind(id)
                .bind(DbTime(now))
                .execute(&mut *tx)
                .await
                .context("marking an alert change dispatched")?;
                if done.rows_affected() == 0 {
                    // Another keywatch dispatched it first: keep nothing of this pass.
                    return Err(StoreError::Invalid(format!(
                        "alert change {id} was dispatched by another keywatch process; run one delivering process per database"
                    )));
                }
            }
            sqlx::query(
                "INSERT INTO kw_notify_groups (id, state) VALUES ('grouper', $1) \
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state",
            )
            .bind(state)
            .execute(&mut *tx)
            .await
            .context("saving the notification groups")?;
            for n in notifications {
                sqlx::query(
                    "INSERT INTO kw_notifications (id, receiver, group_key, payload, status, attempts, \
                     next_attempt_at, created_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)",
                )
                .bind(n.id.to_string())
                .bind(&n.receiver)
                .bind(&n.group_key)
                .bind(serde_json::to_string(n).unwrap_or_else(|_| "{}".into()))
                .bind(DbTime(n.created_at))
                .execute(&mut *tx)
                .await
                .context("queueing a notification")?;
            }
            tx.commit().await.context("committing dispatched notifications")
        })
    }

    /// Pending notifications due at `now`, oldest first.
    pub async fn due_notifications(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<QueuedNotification>, StoreError> {
        let rows: Vec<(String, i64)> = with_pool!(self, p => sqlx::query_as(
            "SELECT payload, attempts FROM kw_notifications WHERE status = 'pending' \
             AND next_attempt_at <= $1 ORDER BY next_attempt_at, created_at LIMIT $2",
        )
        .bind(DbTime(now))
        .bind(limit)
        .fetch_all(p)
        .await)
        .context("reading due notifications")?;
        Ok(rows
            .into_iter()
            .filter_map(|(payload, attempts)| {
                Some(QueuedNotification {
                    notification: serde_json::from_str(&payload).ok()?,
                    attempts: attempts as u32,
                })
            })
            .collect())
    }

    /// The earliest retry time of a pending notification.
    pub async fn next_notification_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row: (Option<String>,) = with_pool!(self, p => sqlx::query_as(
            "SELECT CAST(MIN(next_attempt_at) AS TEXT) FROM kw_notifications WHERE status = 'pending'",
        )
        .fetch_one(p)
        .await)
        .context("reading the next notification time")?;
        Ok(row.0.and_then(|s| crate::event::parse_timestamp(&s).ok()))
    }

    /// Records the outcome of one attempt: `sent`, `failed`, or `pending` again at `next`.
    pub async fn record_attempt(
        &self,
        id: uuid::Uuid,
        status: &str,
        attempts: u32,
        next: DateTime<Utc>,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        with_pool!(self, p => sqlx::query(
            "UPDATE kw_notifications SET status = $2, attempts = $3, next_attempt_at = $4, \
             last_error = $5, sent_at = CASE WHEN $2 = 'sent' THEN $6 ELSE sent_at END WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(status)
        .bind(i64::from(attempts))
        .bind(DbTime(next))
        .bind(error)
        .bind(DbTime(now))
        .execute(p)
        .await
        .map(|_| ()))
        .context("recording a delivery attempt")
    }

    /// What is waiting in the outbox.
    pub async fn outbox_depth(&self) -> Result<OutboxDepth, StoreError> {
        let row: (i64, i64, Option<String>, Option<String>) = with_pool!(self, p => sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM kw_outbox WHERE dispatched_at IS NULL), \
             (SELECT COUNT(*) FROM kw_notifications WHERE status = 'pending'), \
             (SELECT CAST(MIN(created_at) AS TEXT) FROM kw_outbox WHERE dispatched_at IS NULL), \
             (SELECT CAST(MIN(created_at) AS TEXT) FROM kw_notifications WHERE status = 'pending')",
        )
        .fetch_one(p)
        .await)
        .context("counting the outbox")?;
        let t = |s: Option<String>| s.and_then(|s| crate::event::parse_timestamp(&s).ok());
        Ok(OutboxDepth {
            changes: row.0.max(0) as u64,
            pending: row.1.max(0) as u64,
            oldest: t(row.2).into_iter().chain(t(row.3)).min(),
        })
    }

    /// Fingerprints and severities of the alerts stored as firing (or benign and open): what
    /// has already been announced.
    pub async fn open_alerts(&self) -> Result<Vec<(String, String)>, StoreError> {
        with_pool!(self, p => sqlx::query_as(
            "SELECT fingerprint, severity FROM kw_alerts WHERE resolved_at IS NULL",
        )
        .fetch_all(p)
        .await)
        .context("reading open alerts")
    }

    /// Stores a silence.
    pub async fn add_silence(&self, s: &StoredSilence) -> Result<(), StoreError> {
        with_pool!(self, p => sqlx::query(
            "INSERT INTO kw_silences (id, matchers, reason, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&s.id)
        .bind(serde_json::to_string(&s.matchers).unwrap_or_else(|_| "{}".into()))
        .bind(&s.reason)
        .bind(DbTime(s.created_at))
        .bind(DbTime(s.expires_at))
        .execute(p)
        .await
        .map(|_| ()))
        .context("adding a silence")
    }

    /// Silences, newest first; only those not expired at `now` unless `all`.
    pub async fn silences(
        &self,
        now: DateTime<Utc>,
        all: bool,
    ) -> Result<Vec<StoredSilence>, StoreError> {
        let rows: Vec<(String, String, String, String, String)> =
            with_pool!(self, p => sqlx::query_as(
            "SELECT id, matchers, reason, CAST(created_at AS TEXT), CAST(expires_at AS TEXT) \
             FROM kw_silences WHERE $1 OR expires_at > $2 ORDER BY created_at DESC, id",
        )
        .bind(all)
        .bind(DbTime(now))
        .fetch_all(p)
        .await)
            .context("reading silences")?;
        let t = |s: &str| crate::event::parse_timestamp(s).unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|(id, m, reason, c, e)| StoredSilence {
                id,
                matchers: serde_json::from_str(&m).unwrap_or_default(),
                reason,
                created_at: t(&c),
                expires_at: t(&e),
            })
            .collect())
    }

    /// Ends the silence `id` now; `false` when there is no such silence.
    pub async fn expire_silence(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = with_pool!(self, p => sqlx::query(
            "UPDATE kw_silences SET expires_at = $2 WHERE id = $1 AND expires_at > $2",
        )
        .bind(id)
        .bind(DbTime(now))
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .context("expiring a silence")?;
        Ok(n > 0)
    }

    /// Sets the address an organization's alerts also go to (routes with `to_org`).
    pub async fn set_org_alert_email(
        &self,
        org_id: &str,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        with_pool!(self, p => sqlx::query(
            "INSERT INTO kw_org_contacts (org_id, alert_email, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (org_id) DO UPDATE SET alert_email = excluded.alert_email, updated_at = excluded.updated_at",
        )
        .bind(org_id)
        .bind(email)
        .bind(DbTime(now))
        .execute(p)
        .await
        .map(|_| ()))
        .context("setting an organization's alert address")
    }

    /// The address an organization's alerts also go to, if it set one.
    pub async fn org_alert_email(&self, org_id: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = with_pool!(self, p => sqlx::query_as(
            "SELECT alert_email FROM kw_org_contacts WHERE org_id = $1",
        )
        .bind(org_id)
        .fetch_optional(p)
        .await)
        .context("reading an organization's alert address")?;
        Ok(row.map(|r| r.0))
    }
}
