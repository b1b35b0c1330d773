//! `error_spike`, per key and per MCP: the error fraction of a short window against the
//! subject's own baseline, one class at a time (5xx, 401/403, 429).
//!
//! Owns the per-subject minute counts, the slowly decaying baseline, and the exact binomial
//! tail. A normal approximation would call 10 errors in 30 requests against a 1% baseline
//! either impossible or ordinary depending on how it is cut; the exact tail is honest at the
//! small counts where a quiet key's alerts are decided.
//!
//! The baseline learns only from minutes that have left the window and only while no episode
//! of that class is open, so an incident does not teach itself as normal while it lasts.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    fingerprint, minute_of,
};
use crate::event::StatusClass;

/// Per-minute counts kept: the window (at most 5 minutes by default) and a few late minutes.
const RING_MINUTES: usize = 8;
/// MCP names come from log lines, so from anyone: this many MCP series at most.
const MAX_MCP_SERIES: usize = 10_000;

/// The classes judged, with their facet names.
const CLASSES: [(StatusClass, &str); 3] = [
    (StatusClass::Server, "5xx"),
    (StatusClass::Auth, "auth"),
    (StatusClass::RateLimited, "429"),
];

/// Settings of `error_spike`; defaults are issue 3's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErrorSettings {
    /// Whether the detector runs at all.
    pub enabled: bool,
    /// Also judge each MCP over all keys (an MCP failing shows there first).
    pub per_mcp: bool,
    /// Window, in minutes (1 to 7).
    pub window_minutes: u32,
    /// Floors: requests and errors in the window.
    pub min_requests: u32,
    /// Errors of the class in the window.
    pub min_errors: u32,
    /// And the window's fraction at least `baseline × min_ratio + min_excess`.
    pub min_ratio: f64,
    /// The absolute part of that floor, as a fraction (0.05 is 5 percentage points).
    pub min_excess: f64,
    /// And the binomial tail probability below this.
    pub max_p_value: f64,
    /// Half-life of the baseline, in hours.
    pub baseline_half_life_hours: f64,
    /// The baseline before any history: this error fraction, worth this many requests.
    pub prior_rate: f64,
    /// How many requests the prior is worth: it fades as real history comes in.
    pub prior_weight: f64,
    /// How long an episode must stay below its recovery threshold to resolve.
    pub recovery_minutes: u32,
}

impl Default for ErrorSettings {
    fn default() -> ErrorSettings {
        ErrorSettings {
            enabled: true,
            per_mcp: true,
            window_minutes: 5,
            min_requests: 30,
            min_errors: 10,
            min_ratio: 2.0,
            min_excess: 0.05,
            max_p_value: 1e-5,
            baseline_half_life_hours: 72.0,
            prior_rate: 0.01,
            prior_weight: 100.0,
            recovery_minutes: 10,
        }
    }
}

/// P(X ≥ k) for X ~ Binomial(n, p), exactly (summed in log-safe steps from k upwards).
/// Edge cases: k = 0 is 1; k > n is 0; p = 0 is 0 for any k > 0; p = 1 is 1.
pub fn binomial_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln C(n, k) as a sum: exact enough, and no gamma function needed.
    let ln_choose: f64 = (1..=k)
        .map(|i| ((n - k + i) as f64).ln() - (i as f64).ln())
        .sum();
    let mut ln_term = ln_choose + k as f64 * lp + (n - k) as f64 * lq;
    let mut sum = 0.0f64;
    let odds = (p / (1.0 - p)).ln();
    for j in k..=n {
        let term = ln_term.exp();
        sum += term;
        // Past the mode the terms shrink geometrically; stop once they no longer matter.
        if (j as f64) > n as f64 * p && term < sum * 1e-17 {
            break;
        }
        if j < n {
            ln_term += ((n - j) as f64).ln() - ((j + 1) as f64).ln() + odds;
        }
    }
    sum.min(1.0)
}

/// Counts and baseline of one subject. Memory: 8 × 4 × 2 B of minute counts, 6 × 8 B of
/// baseline, 2 × 8 B of minute indices: about 130 B per key and per MCP.
#[derive(Debug, Clone)]
struct ErrSeries {
    minute: i64,
    /// Per minute: requests, then errors of each class in [`CLASSES`] order.
    ring: [[u16; 4]; RING_MINUTES],
    base_req: [f64; 3],
    base_err: [f64; 3],
    /// Newest minute folded into the baseline.
    folded: i64,
}

impl ErrSeries {
    fn new(m: i64) -> ErrSeries {
        ErrSeries {
            minute: m,
            ring: [[0; 4]; RING_MINUTES],
            base_req: [0.0; 3],
            base_err: [0.0; 3],
            folded: m - 1,
        }
    }

    fn slot(m: i64) -> usize {
        m.rem_euclid(RING_MINUTES as i64) as usize
    }

    /// Moves to minute `m`, folding minutes that leave the window into the baseline unless
    /// their class has an open episode (`open[c]`).
    fn advance(&mut self, m: i64, window: u32, decay_per_min: f64, open: [bool; 3]) {
        if m <= self.minute {
            return;
        }
        let last_to_fold = m - i64::from(window);
        for mm in (self.folded + 1).max(self.minute - RING_MINUTES as i64 + 1)..=last_to_fold {
            if mm > self.minute {
                break;
            }
            let c = self.ring[Self::slot(mm)];
            // One minute after the last fold, as it nearly always is: the factor itself.
            let decay = match mm - self.folded {
                1 => decay_per_min,
                d => decay_per_min.powf(d as f64),
            };
            for i in 0..3 {
                self.base_req[i] *= decay;
                self.base_err[i] *= decay;
                if !open[i] {
                    self.base_req[i] += f64::from(c[0]);
                    self.base_err[i] += f64::from(c[1 + i]);
                }
            }
            self.folded = mm;
        }
        self.folded = self.folded.max(last_to_fold);
        let from = (self.minute + 1).max(m - RING_MINUTES as i64 + 1);
        for mm in from..=m {
            self.ring[Self::slot(mm)] = [0; 4];
        }
        self.minute = m;
    }

    fn window(&self, len: u32) -> [u32; 4] {
        let mut w = [0u32; 4];
        for i in 0..i64::from(len) {
            let c = self.ring[Self::slot(self.minute - i)];
            for (a, b) in w.iter_mut().zip(c) {
                *a += u32::from(b);
            }
        }
        w
    }
}

/// Detects error spikes. See the module documentation.
#[derive(Debug)]
pub struct ErrorDetector {
    s: ErrorSettings,
    series: HashMap<Subject, ErrSeries>,
    mcp_series: usize,
    episodes: Episodes,
    /// The subjects that may have an open episode. Formatting a fingerprint costs more than
    /// the rest of a line's error detection, so subjects outside this set skip it.
    maybe_open: HashSet<Subject>,
    /// Every series is advanced to at least this minute (see the rate detector's twin): a
    /// tick within the same minute has nothing to advance.
    swept: i64,
}

impl ErrorDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: ErrorSettings) -> ErrorDetector {
        let episodes = Episodes::new(
            Duration::minutes(i64::from(s.recovery_minutes)),
            Duration::hours(1),
        );
        ErrorDetector {
            s,
            series: HashMap::new(),
            mcp_series: 0,
            episodes,
            maybe_open: HashSet::new(),
            swept: i64::MIN,
        }
    }

    fn decay_per_min(&self) -> f64 {
        0.5f64.powf(1.0 / (self.s.baseline_half_life_hours.max(1.0) * 60.0))
    }

    fn open_classes(&self, subject: &Subject) -> [bool; 3] {
        open_classes(&self.episodes, &self.maybe_open, subject)
    }

    fn judge(&mut self, subject: &Subject, obs: &Observation) -> Vec<Finding> {
        let s = &self.s;
        let win = s.window_minutes.clamp(1, RING_MINUTES as u32 - 1);
        let Some(series) = self.series.get(subject) else {
            return Vec::new();
        };
        let w = series.window(win);
        let n = w[0];
        let maybe_open = self.maybe_open.contains(subject);
        let mut out = Vec::new();
        for (i, (_, facet)) in CLASSES.iter().enumerate() {
            let k = w[1 + i];
            let p = (series.base_err[i] + s.prior_rate * s.prior_weight)
                / (series.base_req[i] + s.prior_weight);
            let frac = if n == 0 {
                0.0
            } else {
                f64::from(k) / f64::from(n)
            };
            // Only an open episode can be held.
            let fp = || fingerprint(AlertType::ErrorSpike, subject, Some(facet));
            let floor = s.min_ratio * p + s.min_excess;
            if n < s.min_requests || k < s.min_errors || frac < floor {
                // Recovery threshold: half-way between the baseline and the trigger floor.
                if maybe_open && k >= 5 && frac >= (p + floor) / 2.0 {
                    self.episodes.hold(&fp(), obs.at);
                }
                continue;
            }
            let pv = binomial_tail(u64::from(n), u64::from(k), p);
            if pv > s.max_p_value {
                if maybe_open {
                    self.episodes.hold(&fp(), obs.at);
                }
                continue;
            }
            let severity = match (i, frac >= 0.5) {
                (2, _) => Severity::Low,
                (_, true) => Severity::High,
                _ => Severity::Medium,
            };
            let what = match i {
                0 => "server errors (5xx)",
                1 => "authentication failures (401/403)",
                _ => "rate-limit refusals (429)",
            };
            let summary = format!(
                "{} got {k} {what} in {n} requests over {win} minutes ({:.0}%), against a usual {:.1}%.",
                match subject {
                    Subject::Mcp(m) => format!("MCP {m}"),
                    _ => format!(
                        "Key {}",
                        obs.key_prefix
                            .clone()
                            .unwrap_or_else(|| subject.to_string())
                    ),
                },
                frac * 100.0,
                p * 100.0
            );
            let ev = Evidence {
                observed: frac,
                expected: Some(p),
                threshold: Some(floor),
                method: "exact binomial tail against the subject's decayed baseline, with floors",
                window_secs: u64::from(win) * 60,
                samples: u64::from(n),
                score: Some(pv),
                top: vec![(facet.to_string(), u64::from(k))],
                ..Evidence::default()
            };
            let mut f = Finding::new(
                AlertType::ErrorSpike,
                severity,
                subject.clone(),
                obs.at,
                summary,
                ev,
            )
            .about(obs);
            f.facet = Some(facet);
            if let Subject::Mcp(_) = subject {
                f.key_id = None;
                f.key_prefix = None;
                f.source_ip = None;
            }
            self.maybe_open.insert(subject.clone());
            out.extend(self.episodes.raise(f));
        }
        out
    }
}

/// Which of `subject`'s classes have an open episode.
fn open_classes(
    episodes: &Episodes,
    maybe_open: &HashSet<Subject>,
    subject: &Subject,
) -> [bool; 3] {
    if !maybe_open.contains(subject) {
        return [false; 3];
    }
    CLASSES.map(|(_, f)| episodes.is_open(&fingerprint(AlertType::ErrorSpike, subject, Some(f))))
}

impl Detector for ErrorDetector {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let mut subjects = Vec::with_capacity(2);
        if let Some(k) = ctx.key {
            subjects.push(Subject::Key(k.id));
        }
        if self.s.per_mcp
            && let Some(m) = obs.mcp.as_deref().filter(|m| !m.is_empty())
        {
            subjects.push(Subject::Mcp(super::truncate(m, 255)));
        }
        let m = minute_of(obs.at);
        let class = CLASSES
            .iter()
            .position(|(c, _)| *c == StatusClass::of(obs.status));
        let win = self.s.window_minutes.clamp(1, RING_MINUTES as u32 - 1);
        let decay = self.decay_per_min();
        let mut out = Vec::new();
        for subject in subjects {
            let open = self.open_classes(&subject);
            if !self.series.contains_key(&subject) {
                if let Subject::Mcp(_) = subject {
                    if self.mcp_series >= MAX_MCP_SERIES {
                        continue;
                    }
                    self.mcp_series += 1;
                }
                self.series.insert(subject.clone(), ErrSeries::new(m));
                if m < self.swept {
                    self.swept = i64::MIN;
                }
            }
            let Some(series) = self.series.get_mut(&subject) else {
                continue;
            };
            series.advance(m, win, decay, open);
            if m <= series.minute - RING_MINUTES as i64 {
                continue; // too late to place: ignored rather than counted in the wrong minute
            }
            let c = &mut series.ring[ErrSeries::slot(m)];
            c[0] = c[0].saturating_add(1);
            if let Some(i) = class {
                c[1 + i] = c[1 + i].saturating_add(1);
            }
            out.extend(self.judge(&subject, obs));
        }
        out
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let m = minute_of(now);
        let win = self.s.window_minutes.clamp(1, RING_MINUTES as u32 - 1);
        let decay = self.decay_per_min();
        if m > self.swept {
            for (subject, s) in self.series.iter_mut() {
                s.advance(
                    m,
                    win,
                    decay,
                    open_classes(&self.episodes, &self.maybe_open, subject),
                );
            }
            self.swept = m;
        }
        let resolved = self.episodes.sweep(now);
        if !resolved.is_empty() {
            let episodes = &self.episodes;
            self.maybe_open.retain(|subject| {
                CLASSES.iter().any(|(_, f)| {
                    episodes.is_open(&fingerprint(AlertType::ErrorSpike, subject, Some(f)))
                })
            });
        }
        resolved
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::detect::testutil::*;

    #[test]
    fn binomial_tail_at_the_edges() {
        assert_eq!(binomial_tail(0, 0, 0.5), 1.0, "zero requests, zero errors");
        assert_eq!(binomial_tail(1, 1, 0.3), 0.3, "one sample");
        assert_eq!(binomial_tail(10, 11, 0.3), 0.0);
        assert_eq!(
            binomial_tail(30, 30, 1.0),
            1.0,
            "all errors are expected at p = 1"
        );
        assert_eq!(binomial_tail(30, 1, 0.0), 0.0);
        assert!((binomial_tail(30, 30, 0.5) - 0.5f64.powi(30)).abs() < 1e-20);
        // Against a direct sum.
        let direct: f64 = (3..=10i32)
            .map(|j| {
                let c: f64 = (1..=j)
                    .map(|i| f64::from(10 - j + i) / f64::from(i))
                    .product();
                c * 0.2f64.powi(j) * 0.8f64.powi(10 - j)
            })
            .sum();
        assert!((binomial_tail(10, 3, 0.2) - direct).abs() < 1e-12);
        // Large n stays finite and sensible.
        let big = binomial_tail(50_000, 550, 0.01);
        assert!(big > 1e-3 && big < 5e-2, "{big}");
        assert!(binomial_tail(50_000, 2_000, 0.01) < 1e-100);
    }

    fn run(
        d: &mut ErrorDetector,
        key: Uuid,
        from: DateTime<Utc>,
        minutes: i64,
        mut per_min: impl FnMut(i64) -> (u32, u32),
    ) -> Vec<Finding> {
        let info = key_info(key, 600);
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let mut out = Vec::new();
        for i in 0..minutes {
            let t = from + Duration::minutes(i);
            let (n, errors) = per_min(i);
            for j in 0..n {
                let mut o = ok(t + Duration::milliseconds(i64::from(j) * 50), key);
                if j < errors {
                    o.status = 502;
                }
                out.extend(d.observe(&o, &ctx));
            }
            out.extend(d.tick(t + Duration::seconds(59)));
        }
        out
    }

    #[test]
    fn a_clear_5xx_spike_fires_per_key_and_per_mcp_and_resolves() {
        let mut d = ErrorDetector::new(ErrorSettings::default());
        let key = Uuid::from_u128(1);
        let t0 = t("2026-11-20T00:00:00Z");
        let mut rng = Rng(7);
        let before = run(&mut d, key, t0, 600, |_| {
            let n = rng.poisson(20.0);
            (n, u32::from(rng.unit() < 0.3) * rng.poisson(0.5).min(n))
        });
        assert!(before.is_empty(), "{before:?}");
        let t1 = t0 + Duration::minutes(600);
        let out = run(&mut d, key, t1, 20, |_| (20, 8));
        let open: Vec<_> = out.iter().filter(|f| !f.resolved).collect();
        assert_eq!(open.len(), 2, "{open:?}");
        assert_eq!(open[0].subject, Subject::Key(key));
        assert_eq!(open[1].subject, Subject::Mcp("github".into()));
        assert!(
            open.iter()
                .all(|f| f.facet == Some("5xx") && f.alert_type == AlertType::ErrorSpike)
        );
        assert!(open[0].at - t1 < Duration::minutes(3));
        let after = run(&mut d, key, t1 + Duration::minutes(20), 30, |_| (20, 0));
        assert_eq!(after.iter().filter(|f| f.resolved).count(), 2);
    }

    #[test]
    fn a_low_volume_key_with_a_few_errors_stays_quiet() {
        let mut d = ErrorDetector::new(ErrorSettings {
            per_mcp: false,
            ..ErrorSettings::default()
        });
        let key = Uuid::from_u128(2);
        let t0 = t("2026-11-20T00:00:00Z");
        // 3 requests a minute, and a bad 5 minutes where half fail: under the floors.
        let out = run(&mut d, key, t0, 600, |i| {
            (3, if (300..305).contains(&i) { 2 } else { 0 })
        });
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_key_failing_for_hours_is_one_alert_not_one_per_window() {
        let mut d = ErrorDetector::new(ErrorSettings {
            per_mcp: false,
            ..ErrorSettings::default()
        });
        let key = Uuid::from_u128(3);
        let t0 = t("2026-11-20T00:00:00Z");
        // All errors from the first minute: the first window fires (zero history, prior 1%),
        // then the baseline cannot learn while the episode is open, so it stays one finding.
        let out = run(&mut d, key, t0, 120, |_| (20, 20));
        assert_eq!(
            out.len(),
            2,
            "one open, one escalation-free re-send an hour later: {out:?}"
        );
        assert!(out.iter().all(|f| !f.resolved));
    }

    #[test]
    fn a_baseline_of_all_errors_never_fires() {
        let mut d = ErrorDetector::new(ErrorSettings {
            per_mcp: false,
            ..ErrorSettings::default()
        });
        let key = Uuid::from_u128(5);
        let t0 = t("2026-11-20T00:00:00Z");
        let mut s = ErrSeries::new(minute_of(t0));
        s.base_req = [10_000.0; 3];
        s.base_err = [10_000.0; 3];
        d.series.insert(Subject::Key(key), s);
        let out = run(&mut d, key, t0, 30, |_| (20, 20));
        assert!(out.is_empty(), "twice the baseline is past 100%: {out:?}");
    }

    #[test]
    fn classes_are_judged_separately() {
        let mut d = ErrorDetector::new(ErrorSettings {
            per_mcp: false,
            ..ErrorSettings::default()
        });
        let key = Uuid::from_u128(4);
        let info = key_info(key, 600);
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let t0 = t("2026-11-20T00:00:00Z");
        let mut out = Vec::new();
        for i in 0..40 {
            let mut o = ok(t0 + Duration::seconds(i), key);
            o.status = if i % 2 == 0 { 401 } else { 200 };
            out.extend(d.observe(&o, &ctx));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].facet, Some("auth"));
        assert_eq!(out[0].fingerprint(), format!("error_spike/key:{key}/auth"));
    }

    #[test]
    fn late_minutes_within_the_bound_are_counted_where_they_belong() {
        let mut s = ErrSeries::new(100);
        s.advance(104, 5, 1.0, [false; 3]);
        s.ring[ErrSeries::slot(101)][0] = 3;
        s.advance(103, 5, 1.0, [false; 3]); // backwards: no effect
        assert_eq!(s.minute, 104);
        assert_eq!(s.window(5)[0], 3);
        s.advance(107, 5, 1.0, [false; 3]);
        assert_eq!(
            s.base_req[0], 3.0,
            "minute 101 left the window and was learned"
        );
    }
}
