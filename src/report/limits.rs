//! Limits: per organization, month-to-date usage against the monthly limit with a forecast
//! of when the limit is reached at the current rate; per key, the busiest minute against
//! `rate_limit_rpm` and the 429s.
//!
//! Owns the forecast arithmetic. Reads usage only through [`super::usage`] and
//! [`super::month_to_date`], so these numbers are the usage report's numbers.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{GroupBy, UsageQuery};
use crate::keys::{KeyCache, LimitSource};
use crate::store::{Store, StoreError};
use crate::usage::month_of;

/// An organization's month so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrgLimit {
    pub org_id: Uuid,
    pub org_name: String,
    pub tier: String,
    pub month_to_date: u64,
    /// `None`: unlimited.
    pub monthly_limit: Option<u64>,
    pub limit_source: LimitSource,
    pub percent_used: Option<f64>,
    /// When the limit is reached at this month's average rate, if it is reached this month.
    pub forecast_limit_at: Option<DateTime<Utc>>,
}

/// A key's busiest minute this month against its per-minute limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyLimit {
    pub key_id: Uuid,
    pub key_prefix: String,
    pub key_name: String,
    pub org_id: Uuid,
    pub rate_limit_rpm: u32,
    pub peak_rpm: u64,
    pub percent_of_rpm: f64,
    /// Requests answered 429 this month.
    pub rate_limited: u64,
}

/// The limits report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    pub month_start: DateTime<Utc>,
    pub at: DateTime<Utc>,
    pub organizations: Vec<OrgLimit>,
    pub keys: Vec<KeyLimit>,
}

/// When `used` requests, made at a constant rate since `start`, reach `limit`; `None` when
/// the rate is zero, the limit is already reached before `now` is counted, or the date falls
/// after `end` (the month's end: usage restarts then).
pub fn forecast(
    start: DateTime<Utc>,
    now: DateTime<Utc>,
    end: DateTime<Utc>,
    used: u64,
    limit: u64,
) -> Option<DateTime<Utc>> {
    let elapsed = (now - start).num_seconds();
    if used == 0 || elapsed <= 0 {
        return None;
    }
    if used >= limit {
        return Some(now);
    }
    let rate = used as f64 / elapsed as f64;
    let secs = ((limit - used) as f64 / rate).ceil();
    let at = now + chrono::Duration::seconds(secs.min(1e12) as i64);
    // A forecast is no more precise than its minute.
    (at < end).then(|| crate::usage::Granularity::Minute.truncate(at))
}

/// Limits at `now` for one organization, or every organization with `org` `None`.
pub async fn limits(
    store: &Store,
    cache: &KeyCache,
    org: Option<Uuid>,
    mcps: Option<Vec<String>>,
    now: DateTime<Utc>,
) -> Result<Limits, StoreError> {
    let (month_start, month_end) = month_of(now);
    let mtd = super::month_to_date(store, now).await?;
    let mut organizations: Vec<OrgLimit> = cache
        .orgs()
        .filter(|o| org.is_none_or(|id| id == o.id))
        .map(|o| {
            let used = mtd.get(&o.id).copied().unwrap_or(0);
            let (limit, source) = o.monthly_limit();
            OrgLimit {
                org_id: o.id,
                org_name: o.name.clone(),
                tier: o.tier.clone(),
                month_to_date: used,
                monthly_limit: limit,
                limit_source: source,
                percent_used: limit
                    .filter(|&l| l > 0)
                    .map(|l| (used as f64 * 1000.0 / l as f64).round() / 10.0),
                forecast_limit_at: limit
                    .and_then(|l| forecast(month_start, now, month_end, used, l)),
            }
        })
        .collect();
    organizations.sort_by(|a, b| {
        b.percent_used
            .unwrap_or(-1.0)
            .total_cmp(&a.percent_used.unwrap_or(-1.0))
            .then(a.org_id.cmp(&b.org_id))
    });
    let q = UsageQuery {
        org,
        mcps,
        from: month_start,
        until: now,
        group_by: GroupBy::Key,
        ..UsageQuery::all_time(now)
    };
    let mut keys: Vec<KeyLimit> = super::usage(store, cache, &q)
        .await?
        .into_iter()
        .filter_map(|r| {
            let k = cache.key(&r.key_id?)?;
            let peak = r.peak_rpm.unwrap_or(0);
            Some(KeyLimit {
                key_id: k.id,
                key_prefix: k.prefix.clone(),
                key_name: k.name.clone(),
                org_id: k.org_id,
                rate_limit_rpm: k.rate_limit_rpm,
                peak_rpm: peak,
                percent_of_rpm: (peak as f64 * 1000.0 / f64::from(k.rate_limit_rpm.max(1))).round()
                    / 10.0,
                rate_limited: r.counters.err_rate_limited,
            })
        })
        .collect();
    keys.sort_by(|a, b| {
        b.percent_of_rpm
            .total_cmp(&a.percent_of_rpm)
            .then(a.key_id.cmp(&b.key_id))
    });
    Ok(Limits {
        month_start,
        at: now,
        organizations,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn forecast_at_the_month_average_rate() {
        let (start, end) = (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"));
        // 500 of 1000 in 10 days: the other 500 take 10 more days.
        assert_eq!(
            forecast(start, t("2026-11-11T00:00:00Z"), end, 500, 1000),
            Some(t("2026-11-21T00:00:00Z"))
        );
        // At this rate the month ends first.
        assert_eq!(
            forecast(start, t("2026-11-11T00:00:00Z"), end, 100, 1000),
            None
        );
        assert_eq!(
            forecast(start, t("2026-11-11T00:00:00Z"), end, 0, 1000),
            None
        );
        let now = t("2026-11-11T00:00:00Z");
        assert_eq!(forecast(start, now, end, 1000, 1000), Some(now));
    }
}
