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
    pub summary: String,
    pub evidence: serde_json::Value,
}

pub(crate) const UPSERT: &str = "INSERT INTO kw_alerts (fingerprint, alert_type, severity, status, key_id, \
     key_prefix, org_id, source_ip, started_at, last_seen_at, resolved_at, summary, evidence) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
     ON CONFLICT (fingerprint) DO UPDATE SET severity = excluded.severity, \
     status = excluded.status, key_prefix = COALESCE(excluded.key_prefix, kw_alerts.key_prefix), \
     source_ip = COALESCE(excluded.source_ip, kw_alerts.source_ip), \
     started_at = CASE WHEN kw_alerts.status = 'resolved' AND excluded.status = 'firing' \
     THEN excluded.started_at ELSE kw_alerts.started_at END, \
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
);

impl Store {
    /// Alerts whose episode started in `[from, until)`, oldest first.
    pub async fn alerts(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let rows: Vec<AlertRow> = with_pool!(self, p => sqlx::query_as(
            "SELECT fingerprint, alert_type, severity, status, key_id, key_prefix, org_id, source_ip, \
             CAST(started_at AS TEXT), CAST(last_seen_at AS TEXT), CAST(resolved_at AS TEXT), summary, evidence \
             FROM kw_alerts WHERE started_at >= $1 AND started_at < $2 ORDER BY started_at, fingerprint",
        )
        .bind(DbTime(from))
        .bind(DbTime(until))
        .fetch_all(p)
        .await)
        .context("reading alerts")?;
        let t = |s: &str| crate::event::parse_timestamp(s).unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|r| StoredAlert {
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
                summary: r.11,
                evidence: serde_json::from_str(&r.12).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }
}
