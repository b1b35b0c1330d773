//! `quota_threshold` (an organization's month-to-date requests crossing 75, 90, 100 and 120%
//! of its monthly limit) and `rate_limit_saturation` (a key spending most minutes of an hour
//! at or over its `rate_limit_rpm`, or being answered 429).
//!
//! Owns the month-to-date count per organization and the per-minute saturation ring per key.
//! The month is the calendar month in UTC, as the auth server counts it. A detector started
//! mid-month must be told what the month already holds ([`QuotaDetector::seed`]): it never
//! reads the store itself.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    fingerprint, minute_of,
};
use crate::keys::OrgInfo;
use crate::usage::month_of;

/// Minutes of saturation history per key: an hour and a few minutes of lateness.
const RING_MINUTES: usize = 64;

/// Settings of `quota_threshold` and `rate_limit_saturation`; defaults are issue 3's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaSettings {
    /// Raise `quota_threshold`.
    pub threshold: bool,
    /// Percentages of the monthly limit, each reported once a month.
    pub levels: Vec<u32>,
    /// Raise `rate_limit_saturation`.
    pub saturation: bool,
    /// Saturated minutes in the last hour that make saturation ("most minutes").
    pub saturated_minutes: u32,
    /// A minute at or over this fraction of `rate_limit_rpm` is saturated.
    pub saturation_fraction: f64,
    /// Minutes without a saturated minute before saturation resolves.
    pub saturation_recovery_minutes: u32,
}

impl Default for QuotaSettings {
    fn default() -> QuotaSettings {
        QuotaSettings {
            threshold: true,
            levels: vec![75, 90, 100, 120],
            saturation: true,
            saturated_minutes: 31,
            saturation_fraction: 1.0,
            saturation_recovery_minutes: 15,
        }
    }
}

/// Month-to-date use of one organization. Memory: ~48 B per organization.
#[derive(Debug, Clone)]
struct Month {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    count: u64,
    /// Bit i set: `levels[i]` already reported this month.
    crossed: u32,
    opened_at: Option<DateTime<Utc>>,
}

/// Per-minute counts of one key. Memory: 64 × 2 B + 8 B bitmask + 12 B: about 150 B per key.
#[derive(Debug, Clone)]
struct Minutes {
    minute: i64,
    counts: [u16; RING_MINUTES],
    /// Bit `m % 64`: minute m had a 429 or `rate_limit_hit`.
    limited: u64,
    rpm: u32,
}

impl Minutes {
    fn slot(m: i64) -> usize {
        m.rem_euclid(RING_MINUTES as i64) as usize
    }

    fn advance(&mut self, m: i64) {
        if m <= self.minute {
            return;
        }
        for mm in (self.minute + 1).max(m - RING_MINUTES as i64 + 1)..=m {
            self.counts[Self::slot(mm)] = 0;
            self.limited &= !(1u64 << Self::slot(mm));
        }
        self.minute = m;
    }

    fn saturated(&self, m: i64, fraction: f64) -> bool {
        let s = Self::slot(m);
        self.limited & (1u64 << s) != 0
            || (self.rpm > 0 && f64::from(self.counts[s]) >= fraction * f64::from(self.rpm))
    }

    /// Saturated minutes among the `n` complete minutes before the current one.
    fn saturated_in(&self, n: i64, fraction: f64) -> u32 {
        (1..=n)
            .filter(|i| self.saturated(self.minute - i, fraction))
            .count() as u32
    }
}

/// Detects quota thresholds and rate-limit saturation. See the module documentation.
#[derive(Debug)]
pub struct QuotaDetector {
    s: QuotaSettings,
    months: HashMap<Uuid, Month>,
    keys: HashMap<Uuid, Minutes>,
    episodes: Episodes,
    saturation: Episodes,
}

impl QuotaDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: QuotaSettings) -> QuotaDetector {
        let saturation = Episodes::new(
            Duration::minutes(i64::from(s.saturation_recovery_minutes)),
            Duration::hours(1),
        );
        QuotaDetector {
            s,
            months: HashMap::new(),
            keys: HashMap::new(),
            // Quota episodes close when the month ends, never by recovery.
            episodes: Episodes::new(Duration::days(400), Duration::days(400)),
            saturation,
        }
    }

    /// Tells the detector that `org` had already made `count` requests in the month holding
    /// `at` (from the store's rollups), and which levels were already reported.
    pub fn seed(&mut self, org: Uuid, at: DateTime<Utc>, count: u64, reported_levels: &[u32]) {
        let (start, end) = month_of(at);
        let crossed = self
            .s
            .levels
            .iter()
            .take(32)
            .enumerate()
            .filter(|(_, l)| reported_levels.contains(l))
            .fold(0u32, |acc, (i, _)| acc | (1 << i));
        self.months.insert(
            org,
            Month {
                start,
                end,
                count,
                crossed,
                opened_at: None,
            },
        );
    }

    fn quota(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let Some(org) = ctx.org else {
            return Vec::new();
        };
        let Some(mut out) = self.roll_month(org, obs.at) else {
            return Vec::new();
        };
        if let Some(m) = self.months.get_mut(&org.id) {
            m.count += 1;
        }
        out.extend(self.crossed_levels(org, obs.at));
        out
    }

    /// Tells the detector that the shared store holds `total` requests of `org` for the month
    /// holding `at`, everything this detector saw included: with several instances sharing a
    /// database, each sees only its own partitions, and this is how their counts add up to the
    /// organization's month to date. A total below the detector's own count (a snapshot taken
    /// before its latest lines were committed) changes nothing; levels the total crosses are
    /// reported as if the line that crossed them had been seen here.
    pub fn sync_month_to_date(
        &mut self,
        org: &OrgInfo,
        at: DateTime<Utc>,
        total: u64,
    ) -> Vec<Finding> {
        if !self.s.threshold {
            return Vec::new();
        }
        let Some(mut out) = self.roll_month(org, at) else {
            return Vec::new();
        };
        if let Some(m) = self.months.get_mut(&org.id) {
            m.count = m.count.max(total);
        }
        out.extend(self.crossed_levels(org, at));
        out
    }

    /// Makes sure `org`'s month is the one holding `at`, closing the previous month's episode
    /// (its findings are returned); `None` when `at` falls in a month already closed or the
    /// organization has no monthly limit.
    fn roll_month(&mut self, org: &OrgInfo, at: DateTime<Utc>) -> Option<Vec<Finding>> {
        let (Some(limit), _) = org.monthly_limit() else {
            return None;
        };
        if limit == 0 {
            return None;
        }
        let mut out = Vec::new();
        let (start, end) = month_of(at);
        let m = self.months.entry(org.id).or_insert(Month {
            start,
            end,
            count: 0,
            crossed: 0,
            opened_at: None,
        });
        if start > m.start {
            let fp = fingerprint(AlertType::QuotaThreshold, &Subject::Org(org.id), None);
            out.extend(self.episodes.close(&fp, start));
            *m = Month {
                start,
                end,
                count: 0,
                crossed: 0,
                opened_at: None,
            };
        } else if start < m.start {
            return None; // a late line from last month: that month is closed
        }
        Some(out)
    }

    /// The levels `org`'s month-to-date count has newly crossed at `at`, each reported once.
    fn crossed_levels(&mut self, org: &OrgInfo, at: DateTime<Utc>) -> Vec<Finding> {
        let mut out = Vec::new();
        let (Some(limit), _) = org.monthly_limit() else {
            return out;
        };
        let Some(m) = self.months.get_mut(&org.id) else {
            return out;
        };
        // The crossed set is a 32-bit mask: levels past the 32nd are ignored.
        for (i, &level) in self.s.levels.iter().take(32).enumerate() {
            let needed = (u128::from(limit) * u128::from(level)).div_ceil(100) as u64;
            if m.count < needed || m.crossed & (1 << i) != 0 {
                continue;
            }
            m.crossed |= 1 << i;
            let elapsed = (at - m.start).num_seconds().max(60) as f64;
            let rate = m.count as f64 / elapsed; // requests per second, month to date
            let forecast_at = (m.count < limit)
                .then(|| at + Duration::seconds(((limit - m.count) as f64 / rate) as i64));
            let month_total = rate * (m.end - m.start).num_seconds() as f64;
            let severity = match level {
                0..=89 => Severity::Info,
                90..=99 => Severity::Low,
                100..=119 => Severity::Medium,
                _ => Severity::High,
            };
            let when = match forecast_at {
                Some(f) if f < m.end => format!(
                    "; at this month's rate it reaches the limit around {}",
                    f.format("%Y-%m-%d %H:%M UTC")
                ),
                Some(_) => "; at this month's rate it stays under the limit this month".to_owned(),
                None => format!(
                    "; at this month's rate the month ends near {:.0} ({:.0}%)",
                    month_total,
                    month_total * 100.0 / limit as f64
                ),
            };
            let summary = format!(
                "Organization {} crossed {level}% of its monthly limit ({} of {limit} requests) at {}{when}.",
                org.name,
                m.count,
                at.format("%Y-%m-%d %H:%M UTC")
            );
            let ev = Evidence {
                observed: m.count as f64,
                expected: Some(month_total),
                threshold: Some(needed as f64),
                method: "month-to-date count against the monthly limit; forecast at the month's mean rate",
                window_secs: (at - m.start).num_seconds().max(0) as u64,
                samples: m.count,
                score: Some(f64::from(level)),
                forecast_at,
                ..Evidence::default()
            };
            let mut f = Finding::new(
                AlertType::QuotaThreshold,
                severity,
                Subject::Org(org.id),
                at,
                summary,
                ev,
            );
            f.org_id = Some(org.id);
            if let Some(s) = m.opened_at {
                f.started_at = s;
            } else {
                m.opened_at = Some(at);
            }
            // Each level is news even at equal severity: send it whatever the episode says.
            let raised = self.episodes.raise(f.clone());
            out.push(raised.unwrap_or(f));
        }
        out
    }

    fn saturation(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let Some(key) = ctx.key else {
            return Vec::new();
        };
        let m = minute_of(obs.at);
        let k = self.keys.entry(key.id).or_insert(Minutes {
            minute: m,
            counts: [0; RING_MINUTES],
            limited: 0,
            rpm: 0,
        });
        k.rpm = key.rate_limit_rpm;
        let rolled = m > k.minute;
        k.advance(m);
        if m > k.minute - RING_MINUTES as i64 {
            let s = Minutes::slot(m);
            k.counts[s] = k.counts[s].saturating_add(1);
            if obs.status == 429 || obs.rate_limit_hit {
                k.limited |= 1 << s;
            }
        }
        if !rolled {
            return Vec::new();
        }
        self.judge_saturation(key.id, obs.at, obs)
    }

    fn judge_saturation(
        &mut self,
        key: Uuid,
        at: DateTime<Utc>,
        obs: &Observation,
    ) -> Vec<Finding> {
        let Some(k) = self.keys.get(&key) else {
            return Vec::new();
        };
        let frac = self.s.saturation_fraction;
        let n = k.saturated_in(60, frac);
        let subject = Subject::Key(key);
        let fp = fingerprint(AlertType::RateLimitSaturation, &subject, None);
        if n < self.s.saturated_minutes {
            if k.saturated_in(5, frac) > 0 {
                self.saturation.hold(&fp, at);
            }
            return Vec::new();
        }
        let limited = (1..=60)
            .filter(|i| k.limited & (1u64 << Minutes::slot(k.minute - i)) != 0)
            .count() as u64;
        let summary = format!(
            "Key {} spent {n} of the last 60 minutes at or over its limit of {} requests a minute{}.",
            obs.key_prefix.clone().unwrap_or_else(|| key.to_string()),
            k.rpm,
            if limited > 0 {
                format!(", and was answered 429 in {limited} of them")
            } else {
                String::new()
            }
        );
        let ev = Evidence {
            observed: f64::from(n),
            expected: None,
            threshold: Some(f64::from(self.s.saturated_minutes)),
            method: "minutes at or over rate_limit_rpm, or answered 429, in the last hour",
            window_secs: 3600,
            samples: 60,
            top: vec![("minutes_429".into(), limited)],
            ..Evidence::default()
        };
        let severity = if n >= 55 {
            Severity::Medium
        } else {
            Severity::Low
        };
        let mut f = Finding::new(
            AlertType::RateLimitSaturation,
            severity,
            subject,
            at,
            summary,
            ev,
        )
        .about(obs);
        f.key_id = Some(key);
        self.saturation.raise(f).into_iter().collect()
    }
}

impl Detector for QuotaDetector {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let mut out = Vec::new();
        if self.s.threshold {
            out.extend(self.quota(obs, ctx));
        }
        if self.s.saturation {
            out.extend(self.saturation(obs, ctx));
        }
        out
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let mut out = Vec::new();
        let m = minute_of(now);
        let (start, _) = month_of(now);
        let mut orgs: Vec<Uuid> = self
            .months
            .iter()
            .filter(|(_, mo)| mo.start < start)
            .map(|(o, _)| *o)
            .collect();
        orgs.sort();
        for o in orgs {
            let fp = fingerprint(AlertType::QuotaThreshold, &Subject::Org(o), None);
            out.extend(self.episodes.close(&fp, start));
            self.months.remove(&o);
        }
        for k in self.keys.values_mut() {
            k.advance(m);
        }
        // A key that stopped calling entirely no longer holds its saturation open.
        self.keys.retain(|_, k| k.counts.iter().any(|&c| c > 0));
        out.extend(self.saturation.sweep(now));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;
    use crate::keys::OrgInfo;

    fn org(limit: i64) -> OrgInfo {
        OrgInfo {
            id: Uuid::from_u128(0x0a),
            name: "acme".into(),
            slug: "acme".into(),
            tier: "free".into(),
            custom_max_requests_monthly: Some(limit),
        }
    }

    #[test]
    fn instances_sharing_a_store_add_up_to_the_month_to_date() {
        // Two instances each see half of an organization's traffic (their partitions); the
        // store's month-to-date total is what crosses the levels, once.
        let o = org(1000);
        let ctx = Context {
            key: None,
            org: Some(&o),
        };
        let mut a = QuotaDetector::new(QuotaSettings::default());
        let mut b = QuotaDetector::new(QuotaSettings::default());
        let t0 = t("2026-11-02T00:00:00Z");
        let mut raised = Vec::new();
        for i in 0..400 {
            let at = t0 + Duration::minutes(i);
            raised.extend(a.observe(&ok(at, Uuid::from_u128(1)), &ctx));
            raised.extend(b.observe(&ok(at, Uuid::from_u128(2)), &ctx));
        }
        assert!(raised.is_empty(), "400 of 1000 each: no level seen alone");
        let at = t0 + Duration::minutes(400);
        let from_a = a.sync_month_to_date(&o, at, 800);
        let levels: Vec<f64> = from_a.iter().map(|f| f.evidence.score.unwrap()).collect();
        assert_eq!(levels, [75.0]);
        assert_eq!(from_a[0].evidence.observed, 800.0);
        // A snapshot older than what the detector counted itself changes nothing.
        assert!(a.sync_month_to_date(&o, at, 10).is_empty());
        // The other instance learns the same total and raises the same alert (same
        // fingerprint: the store keeps one), and its own next lines count on from there.
        let from_b = b.sync_month_to_date(&o, at, 800);
        assert_eq!(from_b[0].fingerprint(), from_a[0].fingerprint());
        let mut later = Vec::new();
        for i in 0..100 {
            later.extend(b.observe(&ok(at + Duration::seconds(i), Uuid::from_u128(2)), &ctx));
        }
        let levels: Vec<f64> = later.iter().map(|f| f.evidence.score.unwrap()).collect();
        assert_eq!(levels, [90.0]);
    }

    #[test]
    fn each_level_is_reported_once_a_month_with_a_forecast() {
        let o = org(1000);
        let key = Uuid::from_u128(1);
        let ctx = Context {
            key: None,
            org: Some(&o),
        };
        let mut d = QuotaDetector::new(QuotaSettings::default());
        let t0 = t("2026-11-01T00:00:00Z");
        let mut out = Vec::new();
        // 100 requests a day: 75% on day 8, 90% on day 9, 100% on day 10, 120% on day 12.
        for i in 0..1300 {
            out.extend(d.observe(&ok(t0 + Duration::minutes(i * 864 / 60), key), &ctx));
        }
        let levels: Vec<f64> = out.iter().map(|f| f.evidence.score.unwrap()).collect();
        assert_eq!(levels, [75.0, 90.0, 100.0, 120.0]);
        assert!(
            out.iter()
                .all(|f| f.subject == Subject::Org(o.id) && !f.resolved)
        );
        let f75 = &out[0];
        assert_eq!(f75.evidence.observed, 750.0);
        let forecast = f75.evidence.forecast_at.unwrap();
        let expect = t("2026-11-11T00:00:00Z");
        assert!((forecast - expect).num_hours().abs() <= 1, "{forecast}");
        assert_eq!(out[3].severity, Severity::High);
        assert_eq!(out[3].started_at, out[0].at);
        // The month ends: the episode resolves, and December starts from zero.
        let done = d.tick(t("2026-12-01T00:00:30Z"));
        assert_eq!(done.len(), 1);
        assert!(done[0].resolved);
        let again = d.observe(&ok(t("2026-12-01T00:01:00Z"), key), &ctx);
        assert!(again.is_empty());
    }

    #[test]
    fn unlimited_and_seeded_organizations() {
        let mut ent = org(0);
        ent.custom_max_requests_monthly = None;
        ent.tier = "enterprise".into();
        let key = Uuid::from_u128(1);
        let mut d = QuotaDetector::new(QuotaSettings::default());
        let t0 = t("2026-11-15T00:00:00Z");
        let ctx = Context {
            key: None,
            org: Some(&ent),
        };
        for i in 0..5000 {
            assert!(
                d.observe(&ok(t0 + Duration::seconds(i), key), &ctx)
                    .is_empty()
            );
        }
        let o = org(1000);
        d.seed(o.id, t0, 899, &[75]);
        let ctx = Context {
            key: None,
            org: Some(&o),
        };
        let out = d.observe(&ok(t0, key), &ctx);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].evidence.score, Some(90.0));
    }

    #[test]
    fn saturation_needs_most_minutes_of_an_hour() {
        let key = Uuid::from_u128(2);
        let info = key_info(key, 10);
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let mut d = QuotaDetector::new(QuotaSettings::default());
        let t0 = t("2026-11-20T12:00:00Z");
        let mut out = Vec::new();
        // 30 minutes at the limit, then 30 at half of it: not most of the hour.
        for i in 0..90 {
            let n = if i % 2 == 0 { 10 } else { 5 };
            for j in 0..n {
                out.extend(d.observe(
                    &ok(t0 + Duration::minutes(i) + Duration::seconds(j), key),
                    &ctx,
                ));
            }
        }
        assert!(out.is_empty(), "{out:?}");
        // Now answered 429 every minute.
        let t1 = t0 + Duration::minutes(90);
        for i in 0..40 {
            let mut o = ok(t1 + Duration::minutes(i), key);
            o.status = 429;
            o.rate_limit_hit = true;
            out.extend(d.observe(&o, &ctx));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].alert_type, AlertType::RateLimitSaturation);
        assert_eq!(out[0].subject, Subject::Key(key));
        assert_eq!(
            d.tick(t1 + Duration::minutes(70)).len(),
            1,
            "resolves when it stops"
        );
    }
}
