//! The query layer behind `keywatch report` and the HTTP API (`/v1`): usage per key,
//! organization or MCP over a time range, with limits beside it; and, in its submodules,
//! limits and forecasts, alerts, a key's activity and key hygiene.
//!
//! Owns how a range is answered exactly from the rollups: it is cut into segments that whole
//! buckets cover (days in the middle, hours at the edges, minutes at the very ends), each
//! summed by the store, then merged. It reads through the store and the key cache only and
//! never formats output for a terminal (that is `cli`'s job).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

pub mod activity;
pub mod alerts;
pub mod csv;
pub mod hygiene;
pub mod limits;

use crate::keys::KeyCache;
use crate::store::{SegmentQuery, Store, StoreError};
use crate::usage::{Counters, Granularity, month_of};

/// What to group usage by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    Key,
    Org,
    Mcp,
}

/// Which key to report on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFilter {
    Id(Uuid),
    /// Refused keys that match no key.
    Unknown,
}

/// A usage question.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub org: Option<Uuid>,
    pub key: Option<KeyFilter>,
    pub mcp: Option<String>,
    /// Only these MCPs (a key limited to some MCPs asking); `None` for no such limit.
    pub mcps: Option<Vec<String>>,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// The instant month-to-date is computed at: `until` when one was given, else now.
    pub month_at: DateTime<Utc>,
    pub group_by: GroupBy,
    pub bucket: Option<Granularity>,
}

impl UsageQuery {
    /// All of time, grouped by key.
    pub fn all_time(now: DateTime<Utc>) -> UsageQuery {
        UsageQuery {
            org: None,
            key: None,
            mcp: None,
            mcps: None,
            from: beginning(),
            until: end_of_time(),
            month_at: now,
            group_by: GroupBy::Key,
            bucket: None,
        }
    }
}

/// The earliest instant a report covers.
pub fn beginning() -> DateTime<Utc> {
    Utc.timestamp_opt(0, 0).single().unwrap_or_default()
}

/// An instant after every event keywatch accepts.
pub fn end_of_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub key_id: Option<Uuid>,
    pub key_prefix: Option<String>,
    pub key_name: Option<String>,
    pub org_id: Option<Uuid>,
    pub org_name: Option<String>,
    pub mcp: Option<String>,
    pub bucket_start: Option<DateTime<Utc>>,
    pub counters: Counters,
    /// Key rows: the key's limit and its busiest minute in the range.
    pub rate_limit_rpm: Option<u32>,
    pub peak_rpm: Option<u64>,
    /// Organization rows: month-to-date against the monthly limit.
    pub month_to_date: Option<u64>,
    pub monthly_limit: Option<u64>,
    pub limit_source: Option<crate::keys::LimitSource>,
}

impl UsageRow {
    /// Percent of the monthly limit used this month, for organization rows with a limit.
    pub fn percent_used(&self) -> Option<f64> {
        match (self.month_to_date, self.monthly_limit) {
            (Some(m), Some(l)) if l > 0 => Some(m as f64 * 100.0 / l as f64),
            _ => None,
        }
    }

    /// The row as the JSON API documents it: identifiers of the grouping, then the numbers.
    pub fn to_json(&self, group_by: GroupBy) -> Value {
        let c = &self.counters;
        let mut o = serde_json::Map::new();
        match group_by {
            GroupBy::Key => {
                o.insert("key_id".into(), json!(self.key_id));
                o.insert("key_prefix".into(), json!(self.key_prefix));
                o.insert("key_name".into(), json!(self.key_name));
                o.insert("org_id".into(), json!(self.org_id));
            }
            GroupBy::Org => {
                o.insert("org_id".into(), json!(self.org_id));
                o.insert("org_name".into(), json!(self.org_name));
            }
            GroupBy::Mcp => {
                o.insert("mcp".into(), json!(self.mcp));
            }
        }
        if let Some(b) = self.bucket_start {
            o.insert("bucket_start".into(), json!(b));
        }
        o.insert("requests".into(), json!(c.requests));
        o.insert(
            "errors".into(),
            json!({
                "auth": c.err_auth,
                "rate_limited": c.err_rate_limited,
                "client": c.err_client,
                "server": c.err_server,
            }),
        );
        let round = |v: Option<f64>| v.map(|x| (x * 10.0).round() / 10.0);
        o.insert(
            "latency_ms".into(),
            json!({"p50": round(c.latency_quantile(0.5)), "p95": round(c.latency_quantile(0.95))}),
        );
        o.insert("bytes_in".into(), json!(c.bytes_in));
        o.insert("bytes_out".into(), json!(c.bytes_out));
        if group_by == GroupBy::Key {
            o.insert("rate_limit_rpm".into(), json!(self.rate_limit_rpm));
            o.insert("peak_rpm".into(), json!(self.peak_rpm));
        }
        if group_by == GroupBy::Org {
            o.insert("month_to_date".into(), json!(self.month_to_date));
            o.insert("monthly_limit".into(), json!(self.monthly_limit));
            o.insert("limit_source".into(), json!(self.limit_source));
            o.insert("percent_used".into(), json!(round(self.percent_used())));
        }
        Value::Object(o)
    }
}

/// Cuts `[from, until)` into segments that whole buckets cover, never coarser than `coarsest`.
pub fn segments(
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    coarsest: Granularity,
) -> Vec<(Granularity, DateTime<Utc>, DateTime<Utc>)> {
    fn cut(
        g: Granularity,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        coarsest: Granularity,
        out: &mut Vec<(Granularity, DateTime<Utc>, DateTime<Utc>)>,
    ) {
        if from >= until {
            return;
        }
        let finer = match g {
            Granularity::Day => Granularity::Hour,
            Granularity::Hour => Granularity::Minute,
            Granularity::Minute => {
                out.push((g, from, until));
                return;
            }
        };
        if g > coarsest {
            return cut(finer, from, until, coarsest, out);
        }
        let (a, b) = (g.ceil(from), g.truncate(until));
        if a < b {
            cut(finer, from, a, coarsest, out);
            out.push((g, a, b));
            cut(finer, b, until, coarsest, out);
        } else {
            cut(finer, from, until, coarsest, out);
        }
    }
    // Minutes are the finest resolution: the range is taken to whole minutes.
    let (from, until) = (
        Granularity::Minute.truncate(from),
        Granularity::Minute.ceil(until),
    );
    let mut out = Vec::new();
    cut(Granularity::Day, from, until, coarsest, &mut out);
    out
}

type GroupKey = (Option<String>, Option<DateTime<Utc>>);

fn parse_id(s: &str) -> Option<Uuid> {
    if s.is_empty() {
        None
    } else {
        Uuid::try_parse(s).ok()
    }
}

/// Answers a usage question exactly from the rollups.
pub async fn usage(
    store: &Store,
    cache: &KeyCache,
    q: &UsageQuery,
) -> Result<Vec<UsageRow>, StoreError> {
    let base = SegmentQuery {
        granularity: Granularity::Day,
        from: q.from,
        until: q.until,
        org: q.org.map(|o| o.hyphenated().to_string()),
        key: q.key.map(|k| match k {
            KeyFilter::Id(id) => id.hyphenated().to_string(),
            KeyFilter::Unknown => String::new(),
        }),
        mcp: q.mcp.clone(),
        mcps: q.mcps.clone(),
        by_key: q.group_by == GroupBy::Key,
        by_org: q.group_by == GroupBy::Org,
        by_mcp: q.group_by == GroupBy::Mcp,
        by_bucket: q.bucket.is_some(),
    };
    let mut merged: BTreeMap<GroupKey, Counters> = BTreeMap::new();
    for (g, from, until) in segments(q.from, q.until, q.bucket.unwrap_or(Granularity::Day)) {
        let seg = SegmentQuery {
            granularity: g,
            from,
            until,
            ..base.clone()
        };
        for agg in store.usage_segment(&seg).await? {
            let group = agg.key_id.or(agg.org_id).or(agg.mcp);
            let bucket = match (q.bucket, agg.bucket_start) {
                (Some(b), Some(t)) => Some(b.truncate(t)),
                _ => None,
            };
            merged
                .entry((group, bucket))
                .or_default()
                .merge(&agg.counters);
        }
    }
    let peaks: BTreeMap<String, u64> = if q.group_by == GroupBy::Key {
        store.peak_minutes(&base).await?.into_iter().collect()
    } else {
        BTreeMap::new()
    };
    let mut rows = Vec::with_capacity(merged.len());
    for ((group, bucket_start), counters) in merged {
        let group = group.unwrap_or_default();
        let mut row = UsageRow {
            key_id: None,
            key_prefix: None,
            key_name: None,
            org_id: None,
            org_name: None,
            mcp: None,
            bucket_start,
            counters,
            rate_limit_rpm: None,
            peak_rpm: None,
            month_to_date: None,
            monthly_limit: None,
            limit_source: None,
        };
        match q.group_by {
            GroupBy::Key => {
                row.key_id = parse_id(&group);
                row.peak_rpm = peaks.get(&group).copied();
                if let Some(k) = row.key_id.and_then(|id| cache.key(&id)) {
                    row.key_prefix = Some(k.prefix.clone());
                    row.key_name = Some(k.name.clone());
                    row.org_id = Some(k.org_id);
                    row.rate_limit_rpm = Some(k.rate_limit_rpm);
                }
            }
            GroupBy::Org => {
                row.org_id = parse_id(&group);
                if let Some(o) = row.org_id.and_then(|id| cache.org(&id)) {
                    row.org_name = Some(o.name.clone());
                    let (limit, source) = o.monthly_limit();
                    row.monthly_limit = limit;
                    row.limit_source = Some(source);
                }
            }
            GroupBy::Mcp => row.mcp = Some(group),
        }
        rows.push(row);
    }
    if q.group_by == GroupBy::Org {
        let mtd = month_to_date(store, q.month_at).await?;
        for row in &mut rows {
            if let Some(org) = row.org_id {
                row.month_to_date = Some(mtd.get(&org).copied().unwrap_or(0));
            }
        }
    }
    rows.sort_by(|a, b| {
        b.bucket_start
            .is_none()
            .cmp(&a.bucket_start.is_none())
            .then(a.bucket_start.cmp(&b.bucket_start))
            .then(b.counters.requests.cmp(&a.counters.requests))
            .then(a.key_id.cmp(&b.key_id))
            .then(a.org_id.cmp(&b.org_id))
            .then(a.mcp.cmp(&b.mcp))
    });
    Ok(rows)
}

/// Which group a usage row is: its key, organization and MCP (those not grouped by are
/// `None`), so the same group can be found in a bucketed answer to the same question.
pub type RowId = (Option<Uuid>, Option<Uuid>, Option<String>);

/// A usage row's group.
pub fn row_id(r: &UsageRow) -> RowId {
    (r.key_id, r.org_id, r.mcp.clone())
}

/// Most buckets a sparkline shows (the latest).
const SPARK_WIDTH: usize = 30;

/// Values as block characters, scaled to the largest.
pub fn sparkline(values: &[u64]) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    values
        .iter()
        .map(|&v| {
            if v == 0 {
                ' '
            } else {
                BLOCKS[((v * 8).div_ceil(max) as usize).clamp(1, 8) - 1]
            }
        })
        .collect()
}

/// Each group's requests over the question's period, as a sparkline: days, or hours when
/// the requests fall on at most three days; the latest [`SPARK_WIDTH`] buckets with any.
pub async fn trends(
    store: &Store,
    cache: &KeyCache,
    q: &UsageQuery,
) -> Result<BTreeMap<RowId, String>, StoreError> {
    let by = |g: Granularity, from: DateTime<Utc>| UsageQuery {
        bucket: Some(g),
        from,
        ..q.clone()
    };
    let mut rows = usage(store, cache, &by(Granularity::Day, q.from)).await?;
    let mut axis: Vec<DateTime<Utc>> = rows.iter().filter_map(|r| r.bucket_start).collect();
    axis.sort();
    axis.dedup();
    if let (1..=3, Some(first)) = (axis.len(), axis.first()) {
        // Few days: hours show more. The first day's bucket may start before the range.
        rows = usage(store, cache, &by(Granularity::Hour, q.from.max(*first))).await?;
        axis = rows.iter().filter_map(|r| r.bucket_start).collect();
        axis.sort();
        axis.dedup();
    }
    let axis = &axis[axis.len().saturating_sub(SPARK_WIDTH)..];
    let mut series: BTreeMap<RowId, Vec<u64>> = BTreeMap::new();
    for r in &rows {
        let Some(i) = r
            .bucket_start
            .and_then(|b| axis.iter().position(|a| *a == b))
        else {
            continue;
        };
        series
            .entry(row_id(r))
            .or_insert_with(|| vec![0; axis.len()])[i] += r.counters.requests;
    }
    Ok(series
        .into_iter()
        .map(|(id, v)| (id, sparkline(&v)))
        .collect())
}

/// Requests per organization in the calendar month holding `at`, up to `at`.
pub async fn month_to_date(
    store: &Store,
    at: DateTime<Utc>,
) -> Result<BTreeMap<Uuid, u64>, StoreError> {
    let (start, _) = month_of(at);
    let mut out = BTreeMap::new();
    for (g, from, until) in segments(start, at, Granularity::Day) {
        let seg = SegmentQuery {
            granularity: g,
            from,
            until,
            org: None,
            key: None,
            mcp: None,
            mcps: None,
            by_key: false,
            by_org: true,
            by_mcp: false,
            by_bucket: false,
        };
        for agg in store.usage_segment(&seg).await? {
            if let Some(org) = agg.org_id.as_deref().and_then(parse_id) {
                *out.entry(org).or_default() += agg.counters.requests;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn segments_use_the_coarsest_whole_buckets() {
        let s = segments(
            t("2026-11-20T10:30:00Z"),
            t("2026-11-23T02:15:00Z"),
            Granularity::Day,
        );
        assert_eq!(
            s,
            vec![
                (
                    Granularity::Minute,
                    t("2026-11-20T10:30:00Z"),
                    t("2026-11-20T11:00:00Z")
                ),
                (
                    Granularity::Hour,
                    t("2026-11-20T11:00:00Z"),
                    t("2026-11-21T00:00:00Z")
                ),
                (
                    Granularity::Day,
                    t("2026-11-21T00:00:00Z"),
                    t("2026-11-23T00:00:00Z")
                ),
                (
                    Granularity::Hour,
                    t("2026-11-23T00:00:00Z"),
                    t("2026-11-23T02:00:00Z")
                ),
                (
                    Granularity::Minute,
                    t("2026-11-23T02:00:00Z"),
                    t("2026-11-23T02:15:00Z")
                ),
            ]
        );
    }

    #[test]
    fn segments_respect_the_bucket_and_cover_the_range_once() {
        let from = t("2026-11-20T10:30:00Z");
        let until = t("2026-11-22T02:15:00Z");
        let s = segments(from, until, Granularity::Hour);
        assert!(s.iter().all(|(g, _, _)| *g <= Granularity::Hour));
        assert_eq!(s.first().unwrap().1, from);
        assert_eq!(s.last().unwrap().2, until);
        for w in s.windows(2) {
            assert_eq!(w[0].2, w[1].1, "segments are contiguous");
        }
        let minutes = segments(from, until, Granularity::Minute);
        assert_eq!(minutes, vec![(Granularity::Minute, from, until)]);
        assert!(segments(until, from, Granularity::Day).is_empty());
    }

    #[test]
    fn sparklines_scale_to_the_largest() {
        assert_eq!(sparkline(&[0, 1, 4, 8]), " ▁▄█");
        assert_eq!(sparkline(&[5, 5]), "██");
        assert_eq!(sparkline(&[]), "");
    }

    #[test]
    fn all_time_is_mostly_days() {
        let s = segments(beginning(), end_of_time(), Granularity::Day);
        assert_eq!(s, vec![(Granularity::Day, beginning(), end_of_time())]);
    }
}
