//! Usage counting: exact per-key, per-organization and per-MCP counters in minute, hour and day
//! buckets of event time, and the latency histogram behind the percentiles.
//!
//! Owns what a request adds to usage and how buckets are cut. It is plain synchronous data:
//! the pipeline records into a [`Rollup`], the store merges a rollup into its tables by
//! addition, and reports read the sums back. It never reads the wall clock and never does I/O.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use uuid::Uuid;

use crate::event::StatusClass;

/// Upper bounds (inclusive, in ms) of the latency histogram's buckets; a last bucket takes
/// everything slower. The store has one column per bucket (`lat_le_N`, `lat_le_inf`).
pub const LATENCY_BOUNDS_MS: [u32; 28] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 1500, 2000, 3000,
    5000, 7000, 10000, 15000, 20000, 30000, 60000,
];
/// Number of histogram buckets, the overflow bucket included.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The column names of the histogram buckets, in order.
pub fn latency_columns() -> impl Iterator<Item = String> {
    LATENCY_BOUNDS_MS
        .iter()
        .map(|b| format!("lat_le_{b}"))
        .chain(std::iter::once("lat_le_inf".to_owned()))
}

fn latency_bucket(ms: u32) -> usize {
    LATENCY_BOUNDS_MS.partition_point(|&b| b < ms)
}

/// The additive counters of one series in one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    /// 401 and 403.
    pub err_auth: u64,
    /// 429.
    pub err_rate_limited: u64,
    /// Other 4xx.
    pub err_client: u64,
    /// 5xx.
    pub err_server: u64,
    pub latency_ms_sum: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            requests: 0,
            err_auth: 0,
            err_rate_limited: 0,
            err_client: 0,
            err_server: 0,
            latency_ms_sum: 0,
            bytes_in: 0,
            bytes_out: 0,
            latency: [0; LATENCY_BUCKETS],
        }
    }
}

impl Counters {
    /// Counts one request.
    pub fn add(&mut self, status: u16, latency_ms: u32, bytes_in: u64, bytes_out: u64) {
        self.requests += 1;
        match StatusClass::of(status) {
            StatusClass::Ok => {}
            StatusClass::Auth => self.err_auth += 1,
            StatusClass::RateLimited => self.err_rate_limited += 1,
            StatusClass::Client => self.err_client += 1,
            StatusClass::Server => self.err_server += 1,
        }
        self.latency_ms_sum += u64::from(latency_ms);
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
        self.latency[latency_bucket(latency_ms)] += 1;
    }

    /// Adds another series' counts to this one.
    pub fn merge(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.err_auth += other.err_auth;
        self.err_rate_limited += other.err_rate_limited;
        self.err_client += other.err_client;
        self.err_server += other.err_server;
        self.latency_ms_sum += other.latency_ms_sum;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            *a += b;
        }
    }

    pub fn errors(&self) -> u64 {
        self.err_auth + self.err_rate_limited + self.err_client + self.err_server
    }

    /// The `q` quantile (0..=1) of latency in ms, interpolated linearly inside its histogram
    /// bucket as Prometheus' `histogram_quantile` does; `None` with no requests. Requests over
    /// the last bound report that bound.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &n) in self.latency.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let lower = if i == 0 {
                    0.0
                } else {
                    f64::from(LATENCY_BOUNDS_MS[i - 1])
                };
                let Some(&upper) = LATENCY_BOUNDS_MS.get(i) else {
                    return Some(lower);
                };
                let within = (rank - seen as f64) / n as f64;
                return Some(lower + (f64::from(upper) - lower) * within);
            }
            seen += n;
        }
        Some(f64::from(LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1]))
    }
}

/// A bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn seconds(self) -> i64 {
        match self {
            Granularity::Minute => 60,
            Granularity::Hour => 3_600,
            Granularity::Day => 86_400,
        }
    }

    /// The start of the bucket holding `t`.
    pub fn truncate(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let s = t.timestamp().div_euclid(self.seconds()) * self.seconds();
        Utc.timestamp_opt(s, 0).single().unwrap_or(t)
    }

    /// The first bucket start at or after `t`.
    pub fn ceil(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let start = self.truncate(t);
        if start == t {
            t
        } else {
            start + chrono::Duration::seconds(self.seconds())
        }
    }
}

/// The calendar month (UTC) holding `t`: its first instant and the first instant of the next.
pub fn month_of(t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(t);
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    let end = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or(t);
    (start, end)
}

/// What a series is counted under: the key (none for a refused key that matches no key), its
/// organization and the MCP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub bucket_start: DateTime<Utc>,
    pub key_id: Option<Uuid>,
    pub org_id: Option<Uuid>,
    pub mcp: Arc<str>,
}

/// The series of one granularity in a [`Rollup`].
pub type SeriesMap = HashMap<SeriesKey, Counters, foldhash::quality::RandomState>;

/// Counts accumulated since the last commit, per granularity.
#[derive(Debug, Default)]
pub struct Rollup {
    buckets: [SeriesMap; 3],
    requests: u64,
}

impl Rollup {
    /// Counts one request at event time `at` in every granularity.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        at: DateTime<Utc>,
        key_id: Option<Uuid>,
        org_id: Option<Uuid>,
        mcp: &Arc<str>,
        status: u16,
        latency_ms: u32,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        self.requests += 1;
        for (g, map) in Granularity::ALL.iter().zip(self.buckets.iter_mut()) {
            let key = SeriesKey {
                bucket_start: g.truncate(at),
                key_id,
                org_id,
                mcp: Arc::clone(mcp),
            };
            map.entry(key)
                .or_default()
                .add(status, latency_ms, bytes_in, bytes_out);
        }
    }

    /// Requests recorded since the rollup was made.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0
    }

    /// The series of one granularity.
    pub fn series(&self, g: Granularity) -> &SeriesMap {
        &self.buckets[g as usize]
    }

    /// Number of rows a commit of this rollup writes.
    pub fn row_count(&self) -> usize {
        self.buckets.iter().map(SeriesMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn buckets_follow_event_time() {
        let at = t("2026-11-30T23:59:59.999Z");
        assert_eq!(Granularity::Minute.truncate(at), t("2026-11-30T23:59:00Z"));
        assert_eq!(Granularity::Hour.truncate(at), t("2026-11-30T23:00:00Z"));
        assert_eq!(Granularity::Day.truncate(at), t("2026-11-30T00:00:00Z"));
        assert_eq!(Granularity::Hour.ceil(at), t("2026-12-01T00:00:00Z"));
        let exact = t("2026-12-01T00:00:00Z");
        assert_eq!(Granularity::Day.ceil(exact), exact);
        assert_eq!(
            month_of(at),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            month_of(t("2026-12-15T00:00:00Z")),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn counters_split_errors_by_class() {
        let mut c = Counters::default();
        for s in [200, 201, 401, 403, 429, 404, 400, 500, 503] {
            c.add(s, 10, 1, 2);
        }
        assert_eq!(c.requests, 9);
        assert_eq!(
            (c.err_auth, c.err_rate_limited, c.err_client, c.err_server),
            (2, 1, 2, 2)
        );
        assert_eq!(c.errors(), 7);
        assert_eq!((c.bytes_in, c.bytes_out), (9, 18));
    }

    #[test]
    fn quantiles_at_the_edges() {
        let mut c = Counters::default();
        assert_eq!(c.latency_quantile(0.5), None, "no requests, no percentile");
        c.add(200, 42, 0, 0);
        let p = c.latency_quantile(0.5).unwrap();
        assert!(
            (30.0..=50.0).contains(&p),
            "one sample lands in its bucket: {p}"
        );
        let mut slow = Counters::default();
        slow.add(200, 90_000, 0, 0);
        assert_eq!(slow.latency_quantile(0.95), Some(60_000.0));
        let mut zero = Counters::default();
        zero.add(200, 0, 0, 0);
        assert!(zero.latency_quantile(0.5).unwrap() <= 1.0);
    }

    #[test]
    fn quantiles_of_a_spread() {
        let mut c = Counters::default();
        for ms in 1..=1000 {
            c.add(200, ms, 0, 0);
        }
        let p50 = c.latency_quantile(0.5).unwrap();
        let p95 = c.latency_quantile(0.95).unwrap();
        assert!((450.0..=550.0).contains(&p50), "{p50}");
        assert!((900.0..=1000.0).contains(&p95), "{p95}");
    }

    #[test]
    fn rollup_counts_each_granularity_once() {
        let mut r = Rollup::default();
        let mcp: Arc<str> = Arc::from("github");
        let key = Some(Uuid::new_v4());
        r.record(t("2026-11-20T12:00:10Z"), key, None, &mcp, 200, 5, 1, 1);
        r.record(t("2026-11-20T12:00:50Z"), key, None, &mcp, 500, 5, 1, 1);
        r.record(t("2026-11-20T12:01:00Z"), key, None, &mcp, 200, 5, 1, 1);
        assert_eq!(r.series(Granularity::Minute).len(), 2);
        assert_eq!(r.series(Granularity::Hour).len(), 1);
        let hour = r.series(Granularity::Hour).values().next().unwrap();
        assert_eq!((hour.requests, hour.err_server), (3, 1));
        assert_eq!(r.row_count(), 4);
    }
}
