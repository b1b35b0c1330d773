//! Alerts in the database: upserted by fingerprint in the batch transaction, read back for
//! reports.

use chrono::{DateTime, Utc};

use super::keys::DbTime;
use super::{QueryContext, Store, StoreError, with_pool};

/// An alert as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredAlert {
    pub id: String,
    #[serde(rename = "type")]
    pub alert_type: String,
    pub severity: String,
    pub status: String,
    pub key_id: Option<String>,
    pub key_prefix: Option<String>,
    pub org_id: Option<String>,
    pub source_ip: Option<String>,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// Event time at which the episode was first raised (detection delay is this minus the
    /// start of the anomaly).
    pub detected_at: DateTime<Utc>,
    pub summary: String,
    /// The level crossed, for threshold alerts (`quota_threshold`: the percentage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    pub evidence: serde_json::Value,
}

impl StoredAlert {
    /// The alert a finding makes, as the store would show it after writing only this one.
    pub fn from_finding(f: &crate::detect::Finding) -> StoredAlert {
        StoredAlert {
            id: f.fingerprint(),
            alert_type: f.alert_type.as_str().to_owned(),
            severity: f.severity.as_str().to_owned(),
            status: if f.resolved { "resolved" } else { "firing" }.to_owned(),
            key_id: f.key_id.map(|k| k.to_string()),
            key_prefix: f.key_prefix.clone(),
            org_id: f.org_id.map(|o| o.to_string()),
            source_ip: f.source_ip.map(|ip| ip.to_string()),
            started_at: f.started_at,
            last_seen_at: f.at,
            resolved_at: f.resolved.then_some(f.at),
            detected_at: f.at,
            summary: f.summary.clone(),
            threshold: f.evidence.threshold,
            evidence: serde_json::to_value(&f.evidence).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A finding whose episode started after the stored alert's last evidence is a new episode
/// of the same fingerprint (the old one resolved, or its process stopped before it could
/// resolve it): it restarts `started_at`, `detected_at` and the status. Within one episode
/// `started_at` never changes, so it is never later than the stored `last_seen_at`.
pub(crate) const UPSERT: &str = "INSERT INTO kw_alerts (fingerprint, alert_type, severity, status, key_id, \
     key_prefix, org_id, source_ip, started_at, last_seen_at, resolved_at, summary, evidence, \
     detected_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $10) \
     ON CONFLICT (fingerprint) DO UPDATE SET severity = excluded.severity, \
     status = CASE WHEN kw_alerts.status IN ('benign', 'acknowledged') AND excluded.status = 'firing' \
     AND excluded.started_at <= kw_alerts.last_seen_at THEN kw_alerts.status ELSE excluded.status END, \
     key_prefix = COALESCE(excluded.key_prefix, kw_alerts.key_prefix), \
     source_ip = COALESCE(excluded.source_ip, kw_alerts.source_ip), \
     started_at = CASE WHEN excluded.started_at > kw_alerts.last_seen_at \
     THEN excluded.started_at ELSE kw_alerts.started_at END, \
     detected_at = CASE WHEN excluded.started_at > kw_alerts.last_seen_at \
     THEN excluded.detected_at ELSE COALESCE(kw_alerts.detected_at, excluded.detected_at) END, \
     last_seen_at = excluded.last_seen_at, resolved_at = excluded.resolved_at, \
     summary = excluded.summary, evidence = excluded.evidence";

/// Writes findings inside a batch transaction.
macro_rules! upsert_findings {
    ($tx:expr, $findings:expr) => {{
        for f in $findings {
            let status = if f.resolved { "resolved" } else { "firing" };
            sqlx::query($crate::store::alerts::UPSERT)
                .bind(f.fingerprint())
                .bind(f.alert_type.as_str())
                .bind(f.severity.as_str())
                .bind(status)
                .bind(f.key_id.map(|k| k.to_string()))
                .bind(f.key_prefix.clone())
                .bind(f.org_id.map(|o| o.to_string()))
                .bind(f.source_ip.map(|ip| ip.to_string()))
                .bind($crate::store::keys::DbTime(f.started_at))
                .bind($crate::store::keys::DbTime(f.at))
                .bind(f.resolved.then_some($crate::store::keys::DbTime(f.at)))
                .bind(f.summary.clone())
                .bind(serde_json::to_string(&f.evidence).unwrap_or_else(|_| "{}".into()))
                .execute(&mut **$tx)
                .await
                .map_err(|source| $crate::store::StoreError::Query {
                    context: "recording an alert",
                    source,
                })?;
        }
        Ok::<(), $crate::store::StoreError>(())
    }};
}

pub(crate) use upsert_findings;

type AlertRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
);

/// Which alerts to read: every filter is optional and parameterized; `after` is the keyset
/// cursor (start time and id of the last alert of the previous page).
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub from: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub status: Option<String>,
    pub alert_type: Option<String>,
    pub severity: Option<String>,
    pub org: Option<String>,
    /// A key id, or `Some("")` for alerts about no known key.
    pub key: Option<String>,
    pub id: Option<String>,
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: Option<i64>,
}

const ALERT_COLUMNS: &str = "SELECT fingerprint, alert_type, severity, status, key_id, key_prefix, org_id, \
     source_ip, CAST(started_at AS TEXT), CAST(last_seen_at AS TEXT), CAST(resolved_at AS TEXT), \
     summary, evidence, CAST(COALESCE(detected_at, started_at) AS TEXT) FROM kw_alerts WHERE 1 = 1";

fn alert_from_row(r: AlertRow) -> StoredAlert {
    let t = |s: &str| crate::event::parse_timestamp(s).unwrap_or_default();
    let evidence: serde_json::Value =
        serde_json::from_str(&r.12).unwrap_or(serde_json::Value::Null);
    StoredAlert {
        id: r.0,
        alert_type: r.1,
        severity: r.2,
        status: r.3,
        key_id: r.4,
        key_prefix: r.5,
        org_id: r.6,
        source_ip: r.7,
        started_at: t(&r.8),
        last_seen_at: t(&r.9),
        resolved_at: r.10.as_deref().map(t),
        detected_at: t(&r.13),
        summary: r.11,
        threshold: evidence
            .get("threshold")
            .and_then(serde_json::Value::as_f64),
        evidence,
    }
}

impl Store {
    /// Alerts whose episode started in `[from, until)`, oldest first.
    pub async fn alerts(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.alerts_matching(&AlertFilter {
            from: Some(from),
            until: Some(until),
            ..AlertFilter::default()
        })
        .await
    }

    /// Alerts matching `f`, by start time then id.
    pub async fn alerts_matching(&self, f: &AlertFilter) -> Result<Vec<StoredAlert>, StoreError> {
        with_pool!(self, p => {
            let mut qb = sqlx::QueryBuilder::new(ALERT_COLUMNS);
            if let Some(from) = f.from {
                qb.push(" AND started_at >= ").push_bind(DbTime(from));
            }
            if let Some(until) = f.until {
                qb.push(" AND started_at < ").push_bind(DbTime(until));
            }
            for (col, v) in [
                ("status", &f.status),
                ("alert_type", &f.alert_type),
                ("severity", &f.severity),
                ("org_id", &f.org),
                ("fingerprint", &f.id),
            ] {
                if let Some(v) = v {
                    qb.push(format!(" AND {col} = ")).push_bind(v.clone());
                }
            }
            match f.key.as_deref() {
                Some("") => {
                    qb.push(" AND key_id IS NULL");
                }
                Some(k) => {
                    qb.push(" AND key_id = ").push_bind(k.to_owned());
                }
                None => {}
            }
            if let Some((at, id)) = &f.after {
                qb.push(" AND (started_at > ")
                    .push_bind(DbTime(*at))
                    .push(" OR (started_at = ")
                    .push_bind(DbTime(*at))
                    .push(" AND fingerprint > ")
                    .push_bind(id.clone())
                    .push("))");
            }
            qb.push(" ORDER BY started_at, fingerprint");
            if let Some(n) = f.limit {
                qb.push(" LIMIT ").push_bind(n);
            }
            let rows: Vec<AlertRow> = qb
                .build_query_as()
                .fetch_all(p)
                .await
                .context("reading alerts")?;
            Ok(rows.into_iter().map(alert_from_row).collect())
        })
    }

    /// One alert by id.
    pub async fn alert(&self, id: &str) -> Result<Option<StoredAlert>, StoreError> {
        Ok(self
            .alerts_matching(&AlertFilter {
                id: Some(id.to_owned()),
                ..AlertFilter::default()
            })
            .await?
            .pop())
    }
}

/// What a person can do with an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertAction {
    Ack,
    Resolve,
    Benign,
}

impl AlertAction {
    /// The status the alert takes.
    pub fn status(self) -> &'static str {
        match self {
            AlertAction::Ack => "acknowledged",
            AlertAction::Resolve => "resolved",
            AlertAction::Benign => "benign",
        }
    }
}

/// A country a person said is fine for a key, from an alert marked benign.
#[derive(Debug, Clone, PartialEq)]
pub struct BenignPlace {
    pub key_id: uuid::Uuid,
    pub country: [u8; 2],
    pub since: DateTime<Utc>,
}

impl Store {
    /// Marks the alert `id` benign with `reason`; `false` when there is no such alert.
    pub async fn mark_benign(&self, id: &str, reason: &str) -> Result<bool, StoreError> {
        self.set_alert_status(id, AlertAction::Benign, reason, Utc::now())
            .await
    }

    /// Records what a person did with the alert `id` (the note is kept with it); `false`
    /// when there is no such alert. A resolved alert gets `resolved_at`; acknowledged and
    /// benign alerts keep their status while the same episode goes on (see [`UPSERT`]).
    pub async fn set_alert_status(
        &self,
        id: &str,
        action: AlertAction,
        note: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = with_pool!(self, p => sqlx::query(
            "UPDATE kw_alerts SET status = $2, note = $3, \
             resolved_at = CASE WHEN $2 = 'resolved' THEN COALESCE(resolved_at, $4) ELSE resolved_at END \
             WHERE fingerprint = $1",
        )
        .bind(id)
        .bind(action.status())
        .bind(note)
        .bind(DbTime(now))
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .context("changing an alert's status")?;
        Ok(done > 0)
    }

    /// The places of every location alert marked benign: the location detector learns them
    /// at start, so a person's "this is fine" outlives a restart.
    pub async fn benign_places(&self) -> Result<Vec<BenignPlace>, StoreError> {
        let rows: Vec<(Option<String>, String, String)> = with_pool!(self, p => sqlx::query_as(
            "SELECT key_id, evidence, CAST(started_at AS TEXT) FROM kw_alerts \
             WHERE status = 'benign' AND alert_type IN ('new_country', 'impossible_travel')",
        )
        .fetch_all(p)
        .await)
        .context("reading benign alerts")?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, evidence, at)| {
                let key_id = key?.parse().ok()?;
                let ev: serde_json::Value = serde_json::from_str(&evidence).ok()?;
                let c = ev.get("country")?.as_str()?.as_bytes();
                let country = [*c.first()?, *c.get(1)?];
                let since = crate::event::parse_timestamp(&at).ok()?;
                Some(BenignPlace {
                    key_id,
                    country,
                    since,
                })
            })
            .collect())
    }
}

impl Store {
    /// Saves each detector's learned state (see `Detectors::save_state`), replacing the last.
    pub async fn save_detector_state(
        &self,
        states: &[(&'static str, String)],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        for (name, state) in states {
            with_pool!(self, p => sqlx::query(
                "INSERT INTO kw_detector_state (name, state, saved_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET state = excluded.state, saved_at = excluded.saved_at",
            )
            .bind(*name)
            .bind(state)
            .bind(DbTime(at))
            .execute(p)
            .await
            .map(|_| ()))
            .context("saving detector state")?;
        }
        Ok(())
    }

    /// The detectors' saved states, by name.
    pub async fn detector_state(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> = with_pool!(self, p => sqlx::query_as(
            "SELECT name, state FROM kw_detector_state ORDER BY name",
        )
        .fetch_all(p)
        .await)
        .context("reading detector state")?;
        Ok(rows)
    }
}
