//! Retention: deleting usage rollup rows older than each granularity's retention, and the HTTP
//! source's remembered push ids past their window.
//!
//! Owns the statements that prune and the cut-off they prune before; when to run them is the
//! daemon's choice (`app`). Age is measured from the newest counted minute, capped at the wall
//! clock — not from the wall clock alone — so a backfill or a replay of an old log keeps its
//! minute rows exactly as long as live traffic would, a database whose ingestion stopped keeps
//! its last week of minutes for the investigation, and a line dated in the future (accepted up
//! to a day ahead) cannot make anything go early. Pruning never touches a bucket that still
//! overlaps the retained span.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::keys::DbTime;
use super::{QueryContext, Store, StoreError, with_pool};
use crate::usage::Granularity;

/// Distinct buckets deleted per statement: each statement is its own short transaction, so a
/// first prune of years of minute rows never holds SQLite's write lock for long while the
/// pipeline waits to commit.
const BUCKETS_PER_STATEMENT: i64 = 60;

/// How long each granularity's rollup rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub minute: Duration,
    pub hour: Duration,
    pub day: Duration,
}

impl Default for Retention {
    /// Minute buckets 7 days, hour buckets 90 days, day buckets 2 years.
    fn default() -> Retention {
        Retention {
            minute: Duration::from_secs(7 * 86_400),
            hour: Duration::from_secs(90 * 86_400),
            day: Duration::from_secs(2 * 365 * 86_400),
        }
    }
}

/// A retention that would break what keywatch reads back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error(
        "--retain-{granularity}-buckets {given} is too short: month-to-date usage and limits read {granularity} rows of the last {minimum}; keep them at least that long"
    )]
    TooShort {
        granularity: &'static str,
        given: String,
        minimum: &'static str,
    },
    #[error(
        "--retain-{coarser}-buckets {coarse} is shorter than --retain-{finer}-buckets {fine}; keep coarser buckets at least as long as finer ones (reports read them for the middle of a range)"
    )]
    Inverted {
        finer: &'static str,
        fine: String,
        coarser: &'static str,
        coarse: String,
    },
}

/// The shortest retention of each granularity: reports of the month to date (and the quota
/// detector's seed) read the current month from day rows, today from hour rows and the current
/// hour from minute rows.
const MINIMUMS: [(Granularity, u64, &str); 3] = [
    (Granularity::Minute, 3_600, "hour"),
    (Granularity::Hour, 2 * 86_400, "2 days"),
    (Granularity::Day, 62 * 86_400, "62 days"),
];

impl Retention {
    /// Checks the retention against what reports need.
    pub fn validate(self) -> Result<Retention, RetentionError> {
        let shown = |d: Duration| humantime_secs(d.as_secs());
        for (g, min, minimum) in MINIMUMS {
            let given = self.of(g);
            if given.as_secs() < min {
                return Err(RetentionError::TooShort {
                    granularity: g.as_str(),
                    given: shown(given),
                    minimum,
                });
            }
        }
        for (finer, coarser) in [
            (Granularity::Minute, Granularity::Hour),
            (Granularity::Hour, Granularity::Day),
        ] {
            if self.of(coarser) < self.of(finer) {
                return Err(RetentionError::Inverted {
                    finer: finer.as_str(),
                    fine: shown(self.of(finer)),
                    coarser: coarser.as_str(),
                    coarse: shown(self.of(coarser)),
                });
            }
        }
        Ok(self)
    }

    /// How long rows of `g` are kept.
    pub fn of(&self, g: Granularity) -> Duration {
        match g {
            Granularity::Minute => self.minute,
            Granularity::Hour => self.hour,
            Granularity::Day => self.day,
        }
    }

    /// The first bucket start of `g` that is kept when the newest data is at `reference`:
    /// buckets starting before it ended more than the retention ago.
    pub fn keep_from(&self, g: Granularity, reference: DateTime<Utc>) -> DateTime<Utc> {
        let keep = chrono::Duration::from_std(self.of(g)).unwrap_or(chrono::Duration::MAX);
        let edge = reference
            .checked_sub_signed(keep)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        g.truncate(edge)
    }
}

/// `90061` as `1d1h1m1s`, the way the flags are written.
fn humantime_secs(mut s: u64) -> String {
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if s >= n {
            out.push_str(&format!("{}{unit}", s / n));
            s %= n;
        }
    }
    out
}

/// What one pass deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// The time ages were measured from (`None`: nothing counted yet, nothing pruned).
    pub reference: Option<DateTime<Utc>>,
    /// Rows deleted from the minute, hour and day tables.
    pub minute_rows: u64,
    pub hour_rows: u64,
    pub day_rows: u64,
    /// HTTP push ids forgotten.
    pub push_ids: u64,
}

impl Pruned {
    /// Rows deleted from the rollup tables.
    pub fn rollup_rows(&self) -> u64 {
        self.minute_rows + self.hour_rows + self.day_rows
    }
}

impl Store {
    /// Deletes the rollup rows older than `retention` allows, ages measured from the newest
    /// counted minute or `now`, whichever is earlier; and the HTTP source's push ids received
    /// more than `push_ids_for` before `now`.
    pub async fn prune(
        &self,
        retention: &Retention,
        push_ids_for: Duration,
        now: DateTime<Utc>,
    ) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let forget_before =
            now - chrono::Duration::from_std(push_ids_for).unwrap_or(chrono::Duration::zero());
        pruned.push_ids = self
            .prune_seen(crate::source::http::SOURCE_NAME, forget_before)
            .await?;
        let Some(newest) = self.latest_minute().await? else {
            return Ok(pruned);
        };
        let reference = (newest + chrono::Duration::minutes(1)).min(now);
        pruned.reference = Some(reference);
        for g in Granularity::ALL {
            let before = retention.keep_from(g, reference);
            let n = self.prune_rollup(g, before).await?;
            match g {
                Granularity::Minute => pruned.minute_rows = n,
                Granularity::Hour => pruned.hour_rows = n,
                Granularity::Day => pruned.day_rows = n,
            }
        }
        Ok(pruned)
    }

    /// Deletes the rows of `g` whose bucket starts before `before`, a few buckets per
    /// statement. Returns how many rows went.
    async fn prune_rollup(&self, g: Granularity, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let table = format!("kw_usage_{}", g.as_str());
        // The primary key leads with bucket_start, so both the subquery and the delete are
        // range scans of it.
        let sql = format!(
            "DELETE FROM {table} WHERE bucket_start IN (SELECT DISTINCT bucket_start FROM {table} \
             WHERE bucket_start < $1 ORDER BY bucket_start LIMIT {BUCKETS_PER_STATEMENT})"
        );
        let mut total = 0;
        loop {
            let n = with_pool!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(DbTime(before))
                .execute(p)
                .await
                .map(|r| r.rows_affected()))
            .context("pruning old usage rows")?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn kept_buckets_start_at_the_bucket_holding_the_edge() {
        let r = Retention::default();
        let at = t("2026-12-01T10:30:20Z");
        assert_eq!(
            r.keep_from(Granularity::Minute, at),
            t("2026-11-24T10:30:00Z")
        );
        assert_eq!(
            r.keep_from(Granularity::Hour, at),
            t("2026-09-02T10:00:00Z")
        );
        assert_eq!(r.keep_from(Granularity::Day, at), t("2024-12-01T00:00:00Z"));
    }

    #[test]
    fn retention_too_short_or_inverted_is_refused_with_the_flag() {
        let d = |s: u64| Duration::from_secs(s);
        assert_eq!(Retention::default().validate(), Ok(Retention::default()));
        let short = Retention {
            minute: d(600),
            ..Retention::default()
        };
        assert_eq!(
            short.validate().unwrap_err().to_string(),
            "--retain-minute-buckets 10m is too short: month-to-date usage and limits read minute rows of the last hour; keep them at least that long"
        );
        let inverted = Retention {
            minute: d(30 * 86_400),
            hour: d(7 * 86_400),
            ..Retention::default()
        };
        assert_eq!(
            inverted.validate().unwrap_err().to_string(),
            "--retain-hour-buckets 7d is shorter than --retain-minute-buckets 30d; keep coarser buckets at least as long as finer ones (reports read them for the middle of a range)"
        );
        assert_eq!(humantime_secs(90_061), "1d1h1m1s");
    }
}
