//! Reading usage back: sums of the rollup tables over one time segment, grouped as asked.
//!
//! The query layer (`crate::report`) splits a time range into segments that whole buckets of
//! one granularity cover, and merges the sums; this file only runs one segment's query.

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};

use super::keys::DbTime;
use super::{COUNTER_COLUMNS, QueryContext, Store, StoreError, with_pool};
use crate::usage::{Counters, Granularity, LATENCY_BUCKETS, latency_columns};

/// One segment's query: a table, a half-open time range, filters and grouping.
#[derive(Debug, Clone)]
pub struct SegmentQuery {
    pub granularity: Granularity,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Organization id (hyphenated), or '' for refused keys without one.
    pub org: Option<String>,
    /// Key id (hyphenated), or '' for refused keys that match no key.
    pub key: Option<String>,
    pub mcp: Option<String>,
    /// Only these MCPs (what a key limited to some MCPs may see); none at all when empty.
    pub mcps: Option<Vec<String>>,
    pub by_key: bool,
    pub by_org: bool,
    pub by_mcp: bool,
    pub by_bucket: bool,
}

/// The sums of one group in one segment. Grouping columns not asked for are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageAggregate {
    pub key_id: Option<String>,
    pub org_id: Option<String>,
    pub mcp: Option<String>,
    pub bucket_start: Option<DateTime<Utc>>,
    pub counters: Counters,
}

impl SegmentQuery {
    fn group_columns(&self) -> Vec<&'static str> {
        let mut cols = Vec::new();
        if self.by_key {
            cols.push("key_id");
        }
        if self.by_org {
            cols.push("org_id");
        }
        if self.by_mcp {
            cols.push("mcp");
        }
        if self.by_bucket {
            cols.push("bucket_start");
        }
        cols
    }
}

/// Builds the filtered WHERE clause shared by the usage queries.
macro_rules! push_filters {
    ($qb:expr, $q:expr) => {{
        $qb.push(" WHERE bucket_start >= ")
            .push_bind(DbTime($q.from))
            .push(" AND bucket_start < ")
            .push_bind(DbTime($q.until));
        if let Some(org) = &$q.org {
            $qb.push(" AND org_id = ").push_bind(org.clone());
        }
        if let Some(key) = &$q.key {
            $qb.push(" AND key_id = ").push_bind(key.clone());
        }
        if let Some(mcp) = &$q.mcp {
            $qb.push(" AND mcp = ").push_bind(mcp.clone());
        }
        match &$q.mcps {
            Some(mcps) if mcps.is_empty() => {
                $qb.push(" AND 1 = 0");
            }
            Some(mcps) => {
                let mut sep = $qb.push(" AND mcp IN (").separated(", ");
                for m in mcps {
                    sep.push_bind(m.clone());
                }
                $qb.push(")");
            }
            None => {}
        }
    }};
}

impl Store {
    /// Sums the usage of one segment.
    pub async fn usage_segment(&self, q: &SegmentQuery) -> Result<Vec<UsageAggregate>, StoreError> {
        let groups = q.group_columns();
        let mut select: Vec<String> = groups
            .iter()
            .map(|c| format!("CAST({c} AS TEXT)"))
            .collect();
        select.extend(
            COUNTER_COLUMNS
                .iter()
                .map(|c| c.to_string())
                .chain(latency_columns())
                .map(|c| format!("CAST(SUM({c}) AS BIGINT)")),
        );
        let head = format!(
            "SELECT {} FROM kw_usage_{}",
            select.join(", "),
            q.granularity.as_str()
        );
        let ng = groups.len();
        with_pool!(self, p => {
            let mut qb = QueryBuilder::new(head);
            push_filters!(qb, q);
            if !groups.is_empty() {
                qb.push(" GROUP BY ").push(groups.join(", "));
            }
            let rows = qb.build().fetch_all(p).await.context("summing usage")?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let text = |i: usize| -> Result<String, StoreError> {
                    row.try_get::<String, _>(i).context("reading a usage row")
                };
                let mut agg = UsageAggregate {
                    key_id: None,
                    org_id: None,
                    mcp: None,
                    bucket_start: None,
                    counters: Counters::default(),
                };
                for (i, col) in groups.iter().enumerate() {
                    let v = text(i)?;
                    match *col {
                        "key_id" => agg.key_id = Some(v),
                        "org_id" => agg.org_id = Some(v),
                        "mcp" => agg.mcp = Some(v),
                        _ => agg.bucket_start = crate::event::parse_timestamp(&v).ok(),
                    }
                }
                let n = |i: usize| -> Result<u64, StoreError> {
                    Ok(row
                        .try_get::<Option<i64>, _>(ng + i)
                        .context("reading a usage sum")?
                        .unwrap_or(0)
                        .max(0) as u64)
                };
                let c = &mut agg.counters;
                c.requests = n(0)?;
                c.err_auth = n(1)?;
                c.err_rate_limited = n(2)?;
                c.err_client = n(3)?;
                c.err_server = n(4)?;
                c.latency_ms_sum = n(5)?;
                c.bytes_in = n(6)?;
                c.bytes_out = n(7)?;
                for b in 0..LATENCY_BUCKETS {
                    c.latency[b] = n(COUNTER_COLUMNS.len() + b)?;
                }
                if c.requests > 0 || ng > 0 {
                    out.push(agg);
                }
            }
            Ok(out)
        })
    }

    /// The busiest minute of each key in a range: key id and its requests in that minute.
    pub async fn peak_minutes(&self, q: &SegmentQuery) -> Result<Vec<(String, u64)>, StoreError> {
        let mut minute = q.clone();
        minute.granularity = Granularity::Minute;
        with_pool!(self, p => {
            let mut qb = QueryBuilder::new(
                "SELECT key_id, MAX(r) FROM (SELECT key_id, bucket_start, \
                 CAST(SUM(requests) AS BIGINT) AS r FROM kw_usage_minute",
            );
            push_filters!(qb, minute);
            qb.push(" GROUP BY key_id, bucket_start) per_minute GROUP BY key_id");
            let rows = qb.build().fetch_all(p).await.context("finding peak minutes")?;
            rows.iter()
                .map(|row| {
                    Ok((
                        row.try_get::<String, _>(0).context("reading a peak minute")?,
                        row.try_get::<Option<i64>, _>(1)
                            .context("reading a peak minute")?
                            .unwrap_or(0)
                            .max(0) as u64,
                    ))
                })
                .collect()
        })
    }
}

impl Store {
    /// The newest hour in which each key was used (key id and the hour's start).
    pub async fn keys_last_used(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows: Vec<(String, Option<String>)> = with_pool!(self, p => sqlx::query_as(
            "SELECT key_id, CAST(MAX(bucket_start) AS TEXT) FROM kw_usage_hour \
             WHERE key_id <> '' GROUP BY key_id",
        )
        .fetch_all(p)
        .await)
        .context("reading when keys were last used")?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, t)| Some((k, crate::event::parse_timestamp(&t?).ok()?)))
            .collect())
    }

    /// The start of the newest minute holding any count: how far ingestion has got in event
    /// time (what a restarted detector resumes from).
    pub async fn latest_minute(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let v: Option<String> = with_pool!(self, p => sqlx::query_scalar(
            "SELECT CAST(MAX(bucket_start) AS TEXT) FROM kw_usage_minute",
        )
        .fetch_one(p)
        .await)
        .context("reading the newest usage minute")?;
        Ok(v.and_then(|s| crate::event::parse_timestamp(&s).ok()))
    }
}

/// One facet value of a key's activity over a window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActivityRow {
    pub facet: String,
    pub value: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub requests: u64,
}

impl Store {
    /// A key's activity on the days overlapping `[from, until)`, busiest first.
    pub async fn key_activity(
        &self,
        key_id: uuid::Uuid,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<ActivityRow>, StoreError> {
        let rows: Vec<(String, String, String, String, i64)> =
            with_pool!(self, p => sqlx::query_as(
            "SELECT facet, value, CAST(MIN(first_seen) AS TEXT), CAST(MAX(last_seen) AS TEXT), \
             CAST(SUM(requests) AS BIGINT) FROM kw_key_activity \
             WHERE key_id = $1 AND day >= $2 AND day < $3 \
             GROUP BY facet, value ORDER BY facet, 5 DESC, value",
        )
        .bind(key_id.hyphenated().to_string())
        .bind(DbTime(Granularity::Day.truncate(from)))
        .bind(DbTime(until))
        .fetch_all(p)
        .await)
            .context("reading key activity")?;
        let t = |s: &str| crate::event::parse_timestamp(s).unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|(facet, value, first, last, n)| ActivityRow {
                facet,
                value,
                first_seen: t(&first),
                last_seen: t(&last),
                requests: n.max(0) as u64,
            })
            .collect())
    }
}
