//! `auth_failure_burst`: many refused keys in a short window, per source address and per
//! presented prefix — key probing or brute force.
//!
//! Owns the per-address and per-prefix failure counts. A refusal is a 401 that is not a
//! known key's expiry or revocation (those are `lifecycle`'s): unknown keys, bad formats, bad
//! signatures. Per address it counts failures and distinct prefixes tried; per prefix,
//! failures and distinct addresses trying it.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    fingerprint, fnv1a, minute_of,
};

/// Distinct values remembered per subject; enough to count to any sane threshold (the
/// failure count, kept separately, is exact).
const MAX_DISTINCT: usize = 128;

/// Settings of `auth_failure_burst`; defaults are issue 3's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Whether the detector runs at all.
    pub enabled: bool,
    /// Also count failures per presented prefix, whatever the address.
    pub per_prefix: bool,
    /// The sliding window, in minutes.
    pub window_minutes: u32,
    /// From one address: this many distinct prefixes tried...
    pub distinct_prefixes: u32,
    /// ...or this many failures.
    pub failures: u32,
    /// For one prefix: this many distinct addresses trying it, or `failures`.
    pub distinct_ips: u32,
    /// How long an episode must stay below its recovery threshold to resolve.
    pub recovery_minutes: u32,
    /// Addresses and prefixes with failures remembered at once. Both come from anyone, so a
    /// flood of distinct ones must not grow memory: when full, the tenth that failed least
    /// recently is forgotten (`keywatch_state_evictions_total{state="auth_subjects"}`).
    pub max_subjects: u32,
}

impl Default for AuthSettings {
    fn default() -> AuthSettings {
        AuthSettings {
            enabled: true,
            per_prefix: true,
            window_minutes: 5,
            distinct_prefixes: 20,
            failures: 50,
            distinct_ips: 20,
            recovery_minutes: 15,
            max_subjects: 100_000,
        }
    }
}

/// Failures of one subject in the window. Memory: up to 128 × 16 B of (minute, hash) and a
/// top list of up to 16 labels: at most about 3 KB, and only while the subject is failing
/// (idle subjects are dropped on tick).
#[derive(Debug, Clone, Default)]
struct Failures {
    /// (minute, hash of the other side: prefix for an address, address for a prefix).
    recent: VecDeque<(i64, u64)>,
    /// Exact failures per minute in the window (minute, count).
    per_minute: VecDeque<(i64, u32)>,
    top: super::TopCounts,
    newest: i64,
}

impl Failures {
    fn add(&mut self, m: i64, other: u64, label: &str, window: i64) {
        self.newest = self.newest.max(m);
        match self.per_minute.iter_mut().find(|(mm, _)| *mm == m) {
            Some(e) => e.1 += 1,
            None => self.per_minute.push_back((m, 1)),
        }
        if self.recent.len() == MAX_DISTINCT {
            self.recent.pop_front();
        }
        self.recent.push_back((m, other));
        self.top.add(label);
        self.expire(self.newest - window);
    }

    /// Forgets what is older than `oldest` minutes. Out-of-order entries (late lines) are
    /// kept until they reach the front, which only delays forgetting them.
    fn expire(&mut self, oldest: i64) {
        while self.recent.front().is_some_and(|e| e.0 <= oldest) {
            self.recent.pop_front();
        }
        self.per_minute.retain(|e| e.0 > oldest);
    }

    fn failures(&self) -> u32 {
        self.per_minute.iter().map(|e| e.1).sum()
    }

    fn distinct(&self) -> u32 {
        let mut v: Vec<u64> = self.recent.iter().map(|e| e.1).collect();
        v.sort_unstable();
        v.dedup();
        v.len() as u32
    }
}

/// Whether a request is a refused key, as this detector counts them.
pub fn is_refusal(obs: &Observation, ctx: &Context<'_>) -> bool {
    if obs.status != 401 {
        return false;
    }
    if matches!(
        obs.error_code.as_deref(),
        Some("expired_key" | "revoked_key")
    ) {
        return false;
    }
    // A known key refused for its expiry or status is lifecycle's, not probing.
    !ctx.key.is_some_and(|k| {
        k.status != "active"
            || k.revoked_at.is_some_and(|r| r <= obs.at)
            || k.expires_at.is_some_and(|e| e <= obs.at)
    })
}

/// Detects bursts of refused keys. See the module documentation.
#[derive(Debug)]
pub struct AuthDetector {
    s: AuthSettings,
    subjects: HashMap<Subject, Failures>,
    episodes: Episodes,
    /// Subjects forgotten to stay within `max_subjects`, since start.
    evicted: u64,
}

impl AuthDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: AuthSettings) -> AuthDetector {
        let episodes = Episodes::new(
            Duration::minutes(i64::from(s.recovery_minutes)),
            Duration::hours(1),
        );
        AuthDetector {
            s,
            subjects: HashMap::new(),
            episodes,
            evicted: 0,
        }
    }

    /// Addresses and prefixes with failures in the window.
    pub fn subjects(&self) -> usize {
        self.subjects.len()
    }

    /// Subjects forgotten to stay within `max_subjects`, since start.
    pub fn evictions(&self) -> u64 {
        self.evicted
    }

    /// Makes room for one more subject: forgets the tenth of them whose newest failure is
    /// oldest. Forgetting in batches keeps the cost per new subject constant on average,
    /// where finding the single oldest would scan every subject for each one.
    fn make_room(&mut self) {
        let cap = self.s.max_subjects.max(1) as usize;
        if self.subjects.len() < cap {
            return;
        }
        let drop = (cap / 10).max(1);
        let mut ages: Vec<(i64, Subject)> = self
            .subjects
            .iter()
            .map(|(k, f)| (f.newest, k.clone()))
            .collect();
        ages.select_nth_unstable_by(drop - 1, |a, b| a.0.cmp(&b.0));
        for (_, k) in ages.into_iter().take(drop) {
            self.subjects.remove(&k);
        }
        self.evicted += drop as u64;
    }

    fn count(
        &mut self,
        subject: Subject,
        m: i64,
        other: &str,
        label: &str,
        obs: &Observation,
    ) -> Option<Finding> {
        let window = i64::from(self.s.window_minutes.max(1));
        if !self.subjects.contains_key(&subject) {
            self.make_room();
        }
        let f = self.subjects.entry(subject.clone()).or_default();
        f.add(m, fnv1a(other.as_bytes()), label, window);
        let (failures, distinct) = (f.failures(), f.distinct());
        let (distinct_needed, what) = match subject {
            Subject::Ip(_) => (self.s.distinct_prefixes, "prefixes"),
            _ => (self.s.distinct_ips, "addresses"),
        };
        let fp = fingerprint(AlertType::AuthFailureBurst, &subject, None);
        if failures < self.s.failures && distinct < distinct_needed {
            // Half the thresholds keeps an open burst open.
            if failures * 2 >= self.s.failures || distinct * 2 >= distinct_needed {
                self.episodes.hold(&fp, obs.at);
            }
            return None;
        }
        let top = f.top.top(5);
        let (observed, threshold) = if distinct >= distinct_needed {
            (distinct, distinct_needed)
        } else {
            (failures, self.s.failures)
        };
        let summary = match &subject {
            Subject::Ip(ip) => format!(
                "{ip} was refused {failures} times in {window} minutes, trying {distinct} different key prefixes."
            ),
            other => format!(
                "Key prefix {} was refused {failures} times in {window} minutes from {distinct} different {what}.",
                match other {
                    Subject::Prefix(p) => p.clone(),
                    o => o.to_string(),
                }
            ),
        };
        let ev = Evidence {
            observed: f64::from(observed),
            threshold: Some(f64::from(threshold)),
            method: "refused keys counted in a sliding window",
            window_secs: window as u64 * 60,
            samples: u64::from(failures),
            top,
            ..Evidence::default()
        };
        let severity = if failures >= 10 * self.s.failures {
            Severity::Critical
        } else {
            Severity::High
        };
        let mut f = Finding::new(
            AlertType::AuthFailureBurst,
            severity,
            subject.clone(),
            obs.at,
            summary,
            ev,
        );
        match subject {
            Subject::Ip(ip) => f.source_ip = Some(ip),
            Subject::Prefix(p) => f.key_prefix = Some(p),
            _ => {}
        }
        self.episodes.raise(f)
    }
}

impl Detector for AuthDetector {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let mut out = Vec::new();
        if !is_refusal(obs, ctx) {
            return out;
        }
        let m = minute_of(obs.at);
        let prefix = obs
            .key_prefix
            .as_deref()
            .map(|p| super::truncate(p, 20))
            .unwrap_or_default();
        if let Some(ip) = obs.source_ip {
            out.extend(self.count(Subject::Ip(ip), m, &prefix, &prefix, obs));
        }
        if self.s.per_prefix && !prefix.is_empty() {
            let ip = obs.source_ip.map(|i| i.to_string()).unwrap_or_default();
            out.extend(self.count(Subject::Prefix(prefix), m, &ip, &ip, obs));
        }
        out
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let oldest = minute_of(now) - i64::from(self.s.window_minutes.max(1));
        self.subjects.retain(|_, f| {
            f.expire(oldest);
            !f.per_minute.is_empty()
        });
        self.episodes.sweep(now)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::detect::testutil::*;

    fn refused(at: DateTime<Utc>, ip: &str, prefix: String) -> Observation {
        Observation {
            at,
            status: 401,
            source_ip: Some(ip.parse().unwrap()),
            key_prefix: Some(prefix),
            error_code: Some("unauthorized".into()),
            ..Observation::default()
        }
    }

    #[test]
    fn many_prefixes_from_one_address_is_a_burst() {
        let mut d = AuthDetector::new(AuthSettings::default());
        let t0 = t("2026-11-20T12:00:00Z");
        let mut out = Vec::new();
        for i in 0..30 {
            let o = refused(
                t0 + Duration::seconds(i * 5),
                "203.0.113.9",
                format!("pmcp_01{i:05x}"),
            );
            out.extend(d.observe(&o, &Context::default()));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(out[0].subject, Subject::Ip(ip));
        assert_eq!(out[0].alert_type, AlertType::AuthFailureBurst);
        assert_eq!(out[0].evidence.observed, 20.0);
        assert_eq!(d.tick(t0 + Duration::minutes(30)).len(), 1, "resolves");
    }

    #[test]
    fn one_prefix_hammered_is_a_burst_of_that_prefix_and_address() {
        let mut d = AuthDetector::new(AuthSettings::default());
        let t0 = t("2026-11-20T12:00:00Z");
        let mut out = Vec::new();
        for i in 0..60 {
            let o = refused(
                t0 + Duration::seconds(i * 4),
                "203.0.113.9",
                "pmcp_01abcdef".into(),
            );
            out.extend(d.observe(&o, &Context::default()));
        }
        let subjects: Vec<_> = out.iter().map(|f| f.subject.clone()).collect();
        assert_eq!(
            subjects,
            [
                Subject::Ip("203.0.113.9".parse().unwrap()),
                Subject::Prefix("pmcp_01abcdef".into())
            ]
        );
    }

    #[test]
    fn a_few_typos_and_expired_keys_are_not_probing() {
        let mut d = AuthDetector::new(AuthSettings::default());
        let t0 = t("2026-11-20T12:00:00Z");
        let mut out = Vec::new();
        // A developer mistyping a key now and then, for hours.
        for i in 0..100 {
            let o = refused(
                t0 + Duration::minutes(i * 3),
                "81.2.69.160",
                "pmcp_01deadbe".into(),
            );
            out.extend(d.observe(&o, &Context::default()));
            out.extend(d.tick(t0 + Duration::minutes(i * 3)));
        }
        // A CI job hammering with its expired key is lifecycle's business.
        for i in 0..100 {
            let mut o = refused(
                t0 + Duration::seconds(i),
                "81.2.69.161",
                "pmcp_01feedbe".into(),
            );
            o.error_code = Some("expired_key".into());
            out.extend(d.observe(&o, &Context::default()));
        }
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_flood_of_addresses_is_bounded_and_the_burst_after_it_still_fires() {
        let s = AuthSettings {
            max_subjects: 1_000,
            ..AuthSettings::default()
        };
        let mut d = AuthDetector::new(s);
        let t0 = t("2026-11-20T12:00:00Z");
        for i in 0..5_000u32 {
            let ip = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i));
            let o = refused(t0, &ip.to_string(), format!("pmcp_01{i:06x}"));
            assert!(d.observe(&o, &Context::default()).is_empty());
            assert!(d.subjects() <= 1_000);
        }
        assert!(d.evictions() >= 8_000, "{}", d.evictions());
        // The attack that the flood was meant to hide is still seen.
        let mut out = Vec::new();
        for i in 0..30 {
            let o = refused(
                t0 + Duration::seconds(i),
                "203.0.113.9",
                format!("pmcp_01{i:05x}"),
            );
            out.extend(d.observe(&o, &Context::default()));
        }
        assert!(
            out.iter()
                .any(|f| f.subject == Subject::Ip("203.0.113.9".parse().unwrap())),
            "{out:?}"
        );
    }

    #[test]
    fn late_failures_within_the_bound_still_count() {
        let mut d = AuthDetector::new(AuthSettings::default());
        let t0 = t("2026-11-20T12:05:00Z");
        let mut out = Vec::new();
        for i in 0..50 {
            // Alternating between now and four minutes ago: the window still holds all 50.
            let at = if i % 2 == 0 {
                t0
            } else {
                t0 - Duration::minutes(4)
            };
            out.extend(d.observe(
                &refused(at, "203.0.113.7", "pmcp_01aaaaaa".into()),
                &Context::default(),
            ));
        }
        assert!(
            out.iter()
                .any(|f| f.subject == Subject::Ip("203.0.113.7".parse().unwrap()))
        );
    }
}
