//! `rate_spike` and `rate_drop`, per key and per organization: the request rate in a short
//! window against an hour-of-week baseline learned from the subject's own history.
//!
//! Owns the per-subject rings of counts and the robust statistics (median, MAD, modified
//! z-score). Decides nothing about keys it cannot see in the key cache.
//!
//! The baseline of an hour of the week is the *median over past weeks* of two numbers of that
//! same hour: its total (which says whether the subject is busy enough to judge, and what a
//! drop is measured against) and its busiest 5-minute window (what a spike is measured
//! against). Comparing a window with past *busiest* windows, not with the hourly mean / 12, is
//! what keeps a CI job that bursts at the top of every hour quiet: the burst is the peak of
//! every past week's same hour. A short-term *level* (the last 24 complete hours against what
//! the baseline expected for them, clamped) scales the expectation, so steady growth, which
//! leaves the weekly medians behind, is the baseline and not a spike.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, LATENESS_SECS, Observation,
    Severity, Subject, fingerprint, minute_of,
};

/// Hours in a week.
const WEEK_HOURS: i64 = 168;
/// Weeks of hourly slots kept per subject: the current week being written and three past
/// weeks, so a baseline is the median of up to three samples (robust to one odd week).
const RING_WEEKS: i64 = 4;
const RING_HOURS: usize = (RING_WEEKS * WEEK_HOURS) as usize;
/// Per-minute counts kept: enough for a 30-minute drop window and the current minute.
const RING_MINUTES: usize = 32;

/// Scale from MAD to a standard deviation for normal data (Iglewicz and Hoaglin's 0.6745).
const MAD_TO_SIGMA: f64 = 1.4826;

/// Settings of `rate_spike` and `rate_drop`; defaults are issue 3's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateSettings {
    /// Whether the detector runs at all.
    pub enabled: bool,
    /// Also judge each organization's total rate.
    pub per_org: bool,
    /// The short window a spike is measured over, in minutes (1 to 30).
    pub window_minutes: u32,
    /// Modified z-score a window must exceed.
    pub spike_z: f64,
    /// And at least this multiple of the expected value (1.5 is +50%).
    pub spike_min_ratio: f64,
    /// And at least this many requests above the expected value in the window.
    pub spike_min_excess: u32,
    /// An open spike stays open while z stays above this.
    pub recovery_z: f64,
    /// Minutes of (near) silence that make a drop (1 to 30).
    pub drop_minutes: u32,
    /// A drop needs the subject to be expected to make at least this many requests a minute.
    pub drop_min_expected_rpm: f64,
    /// "Nearly silent": at most this fraction of the expected requests.
    pub drop_max_fraction: f64,
    /// Subjects expected below this many requests a minute (averaged over the hour) are not
    /// judged on rate.
    pub min_volume_rpm: f64,
    /// History needed before seasonal alerts.
    pub warmup_days: u32,
    /// Cold start (before warm-up): every minute of the window at or above this fraction of
    /// the key's `rate_limit_rpm` is a spike.
    pub cold_start_fraction: f64,
    /// How long an episode must stay below its recovery threshold to resolve.
    pub recovery_minutes: u32,
    /// How often an open episode is re-sent with fresh numbers.
    pub reemit_minutes: u32,
}

impl Default for RateSettings {
    fn default() -> RateSettings {
        RateSettings {
            enabled: true,
            per_org: true,
            window_minutes: 5,
            spike_z: 3.5,
            spike_min_ratio: 1.5,
            spike_min_excess: 30,
            recovery_z: 2.0,
            drop_minutes: 30,
            drop_min_expected_rpm: 5.0,
            drop_max_fraction: 0.1,
            min_volume_rpm: 5.0,
            warmup_days: 7,
            cold_start_fraction: 0.9,
            recovery_minutes: 15,
            reemit_minutes: 60,
        }
    }
}

/// The median of `v` (sorted in place); `None` with no samples.
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median and median absolute deviation of `samples`; `None` with no samples. One sample has
/// a MAD of zero: callers must floor the spread (see [`robust_z`]).
pub fn median_mad(samples: &[f64]) -> Option<(f64, f64)> {
    // Baselines have a handful of samples: sort on the stack, not in a fresh Vec per request.
    let mut buf = [0.0f64; 16];
    let mut heap;
    let v: &mut [f64] = if samples.len() <= buf.len() {
        &mut buf[..samples.len()]
    } else {
        heap = vec![0.0; samples.len()];
        &mut heap
    };
    v.copy_from_slice(samples);
    let m = median(v)?;
    for x in v.iter_mut() {
        *x = (*x - m).abs();
    }
    let mad = median(v)?;
    Some((m, mad))
}

/// The modified z-score of `x` against a median and MAD, with the spread floored at the
/// Poisson noise of a count of that size (√median, at least 1). Without the floor a baseline
/// of identical weeks (MAD 0) would make one extra request infinitely surprising.
pub fn robust_z(x: f64, median: f64, mad: f64) -> f64 {
    let sigma = (MAD_TO_SIGMA * mad).max(median.max(0.0).sqrt()).max(1.0);
    (x - median) / sigma
}

/// The expectation for one hour of the week.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Baseline {
    /// Median hourly total.
    total: f64,
    /// Median and MAD of the busiest window of the hour.
    peak: f64,
    peak_mad: f64,
    samples: u32,
}

/// How many hours of a rate finding's history its evidence carries (the email's chart).
const CHART_HOURS: i64 = 12;

/// The counts of one subject.
///
/// Memory: `totals` 672 × 4 B + `peaks` 672 × 2 B = 4,032 B, `minutes` 32 × 2 B = 64 B, and
/// about 56 B of scalars: roughly 4.2 KB per key (and per organization), plus the hash map
/// entry. Window peaks are `u16`: the highest `rate_limit_rpm` (10,000) allows 50,000
/// requests in 5 minutes, below 65,535; counts saturate rather than wrap all the same.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Series {
    first_hour: i64,
    /// Newest hour index (hours since the epoch) written.
    hour: i64,
    totals: Box<[u32]>,
    peaks: Box<[u16]>,
    /// Newest minute index written.
    minute: i64,
    minutes: [u16; RING_MINUTES],
    /// The key's `rate_limit_rpm`; 0 for organizations or unknown.
    rpm: u32,
    level: f64,
    level_hour: i64,
}

impl Series {
    fn new(at: DateTime<Utc>) -> Series {
        let minute = minute_of(at);
        let hour = minute.div_euclid(60);
        Series {
            first_hour: hour,
            hour,
            totals: vec![0; RING_HOURS].into_boxed_slice(),
            peaks: vec![0; RING_HOURS].into_boxed_slice(),
            minute,
            minutes: [0; RING_MINUTES],
            rpm: 0,
            level: 1.0,
            level_hour: i64::MIN,
        }
    }

    fn slot(h: i64) -> usize {
        h.rem_euclid(RING_HOURS as i64) as usize
    }

    fn mslot(m: i64) -> usize {
        m.rem_euclid(RING_MINUTES as i64) as usize
    }

    /// Moves the newest minute (and hour) forward to `m`, clearing what the rings reuse.
    fn advance(&mut self, m: i64) {
        if m <= self.minute {
            return;
        }
        let from = (self.minute + 1).max(m - RING_MINUTES as i64 + 1);
        for mm in from..=m {
            self.minutes[Self::mslot(mm)] = 0;
        }
        self.minute = m;
        let h = m.div_euclid(60);
        if h > self.hour {
            let from = (self.hour + 1).max(h - RING_HOURS as i64 + 1);
            for hh in from..=h {
                self.totals[Self::slot(hh)] = 0;
                self.peaks[Self::slot(hh)] = 0;
            }
            self.hour = h;
        }
    }

    /// Counts one request at minute `m`. Late requests land in their own minute when it is
    /// still in the ring, else only in their hour; older than the ring, nowhere.
    fn record(&mut self, m: i64) {
        self.advance(m);
        let h = m.div_euclid(60);
        if h <= self.hour - RING_HOURS as i64 {
            return;
        }
        let t = &mut self.totals[Self::slot(h)];
        *t = t.saturating_add(1);
        if m > self.minute - RING_MINUTES as i64 {
            let c = &mut self.minutes[Self::mslot(m)];
            *c = c.saturating_add(1);
        }
        let w = self.window_sum(self.minute, 5);
        let p = &mut self.peaks[Self::slot(self.hour)];
        *p = (*p).max(w.min(u32::from(u16::MAX)) as u16);
    }

    /// Requests in the `len` minutes ending with minute `end` (inclusive).
    fn window_sum(&self, end: i64, len: u32) -> u32 {
        (0..i64::from(len))
            .map(|i| end - i)
            .filter(|&mm| mm > self.minute - RING_MINUTES as i64 && mm <= self.minute)
            .map(|mm| u32::from(self.minutes[Self::mslot(mm)]))
            .sum()
    }

    /// The last `hours` hours (the current one last, partial): start of the hour in Unix
    /// seconds, requests counted, and what the baseline expected of a whole hour (scaled by
    /// `level`), for the picture in a notification.
    fn recent_hours(&self, hours: i64, level: f64) -> Vec<(i64, u32, Option<f64>)> {
        let from = (self.hour - hours + 1).max(self.first_hour);
        (from..=self.hour)
            .map(|h| {
                let expected = self.baseline(h).map(|b| b.total * level);
                (h * 3600, self.totals[Self::slot(h)], expected)
            })
            .collect()
    }

    fn warm(&self, warmup_hours: i64) -> bool {
        self.hour - self.first_hour >= warmup_hours
    }

    /// The baseline of hour `h` from the same hour in past weeks still in the ring.
    fn baseline(&self, h: i64) -> Option<Baseline> {
        let mut totals = [0.0; RING_WEEKS as usize];
        let mut peaks = [0.0; RING_WEEKS as usize];
        let mut n = 0;
        for k in 1..RING_WEEKS {
            let hh = h - k * WEEK_HOURS;
            // The first hour is partial (the subject appeared in it): not a fair sample.
            if hh <= self.first_hour || hh <= self.hour - RING_HOURS as i64 {
                break;
            }
            totals[n] = f64::from(self.totals[Self::slot(hh)]);
            peaks[n] = f64::from(self.peaks[Self::slot(hh)]);
            n += 1;
        }
        let (total, _) = median_mad(&totals[..n])?;
        let (peak, peak_mad) = median_mad(&peaks[..n])?;
        Some(Baseline {
            total,
            peak,
            peak_mad,
            samples: n as u32,
        })
    }

    /// The short-term level: the median, over the last 24 complete hours, of each hour's
    /// total against its baseline, clamped to [0.5, 3]. A median, so that a few hours of
    /// outage or of incident do not rewrite the expectation (the traffic returning after a
    /// three-hour drop is not a spike), while steady growth, which lifts every hour, does.
    fn level(&mut self) -> f64 {
        if self.level_hour == self.hour {
            return self.level;
        }
        let mut ratios = [0.0; 24];
        let (mut n, mut expected) = (0, 0.0);
        for hh in (self.hour - 24)..self.hour {
            // Hours expected to hold only a handful of requests say nothing about the level.
            if let Some(b) = self.baseline(hh).filter(|b| b.total >= 10.0) {
                ratios[n] = f64::from(self.totals[Self::slot(hh)]) / b.total;
                expected += b.total;
                n += 1;
            }
        }
        // Below a few hundred requests a day, or a few judged hours, the ratio is noise.
        self.level = match median_mad(&ratios[..n]) {
            Some((m, _)) if expected >= 300.0 && n >= 6 => m.clamp(0.5, 3.0),
            _ => 1.0,
        };
        self.level_hour = self.hour;
        self.level
    }

    /// Whether the subject's traffic comes in bursts: its busiest 5 minutes of this hour of
    /// the week usually carry more than a quarter of the hour (a CI job at the top of the
    /// hour). Such a subject is silent most minutes of every hour, so only whole hours can
    /// tell a drop.
    fn bursty(b: &Baseline) -> bool {
        b.peak * 4.0 > b.total
    }
}

/// Detects rate spikes and drops. See the module documentation.
#[derive(Debug)]
pub struct RateDetector {
    s: RateSettings,
    series: HashMap<Subject, Series>,
    episodes: Episodes,
    /// Every series is advanced to at least this minute: the last sweep's, or `i64::MIN`
    /// once a series appears behind it. Lines of one minute come in many chunks, and only
    /// the first tick of a minute has series to advance and drops to judge.
    swept: i64,
}

impl RateDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: RateSettings) -> RateDetector {
        let episodes = Episodes::new(
            Duration::minutes(i64::from(s.recovery_minutes)),
            Duration::minutes(i64::from(s.reemit_minutes)),
        );
        RateDetector {
            s,
            series: HashMap::new(),
            episodes,
            swept: i64::MIN,
        }
    }

    /// The learned series, as JSON (see [`super::Detectors::save_state`]).
    pub fn save_state(&self) -> String {
        let mut v: Vec<(&Subject, &Series)> = self.series.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::to_string(&v).unwrap_or_default()
    }

    /// Takes back [`RateDetector::save_state`]'s output; subjects already seen keep theirs.
    pub fn restore_state(&mut self, json: &str) -> Result<(), serde_json::Error> {
        let v: Vec<(Subject, Series)> = serde_json::from_str(json)?;
        for (subject, series) in v {
            // A ring of another size (a different keywatch) would index out of bounds.
            if series.totals.len() == RING_HOURS && series.peaks.len() == RING_HOURS {
                self.series.entry(subject).or_insert(series);
            }
        }
        self.swept = i64::MIN;
        Ok(())
    }

    /// Subjects with state (for metrics and memory accounting).
    pub fn subjects(&self) -> usize {
        self.series.len()
    }

    fn warmup_hours(&self) -> i64 {
        i64::from(self.s.warmup_days) * 24
    }

    fn judge_spike(&mut self, subject: &Subject, obs: &Observation) -> Option<Finding> {
        let warmup = self.warmup_hours();
        let s = &self.s;
        let win = s.window_minutes.clamp(1, 30);
        let series = self.series.get_mut(subject)?;
        let level = series.level();
        let x = f64::from(series.window_sum(series.minute, win));
        let base = if series.warm(warmup) {
            series.baseline(series.hour)
        } else {
            None
        };
        let Some(b) = base else {
            return cold_start(s, series, subject, obs, &mut self.episodes);
        };
        if b.total * level / 60.0 < s.min_volume_rpm {
            return None;
        }
        // The baseline peak is of 5-minute windows; other windows scale it.
        let scale = f64::from(win) / 5.0;
        let expected = b.peak * level * scale;
        let mad = b.peak_mad * level * scale;
        let z = robust_z(x, expected, mad);
        let fire = z > s.spike_z
            && x >= s.spike_min_ratio * expected
            && x - expected >= f64::from(s.spike_min_excess);
        if !fire {
            if z > s.recovery_z && x > expected {
                self.episodes
                    .hold(&fingerprint(AlertType::RateSpike, subject, None), obs.at);
            }
            return None;
        }
        let ratio = x / expected.max(1.0);
        let severity = if ratio >= 5.0 {
            Severity::High
        } else {
            Severity::Medium
        };
        let summary = format!(
            "{} made {x:.0} requests in {win} minutes, {ratio:.1}× the {expected:.0} expected at this hour of the week.",
            describe(subject, obs)
        );
        let ev = Evidence {
            observed: x,
            expected: Some(expected),
            threshold: Some(
                (expected + s.spike_z * sigma(expected, mad))
                    .max(s.spike_min_ratio * expected)
                    .max(expected + f64::from(s.spike_min_excess)),
            ),
            method: "modified z-score against the hour-of-week median/MAD of past weeks' busiest window",
            window_secs: u64::from(win) * 60,
            samples: u64::from(b.samples),
            score: Some(z),
            hourly: series.recent_hours(CHART_HOURS, level),
            ..Evidence::default()
        };
        let f = Finding::new(
            AlertType::RateSpike,
            severity,
            subject.clone(),
            obs.at,
            summary,
            ev,
        );
        self.episodes.raise(with_ids(f, subject, obs))
    }

    /// Evaluates a drop over the complete minutes before the subject's newest one.
    fn judge_drop(&mut self, subject: &Subject, at: DateTime<Utc>) -> Option<Finding> {
        let warmup = self.warmup_hours();
        let s = &self.s;
        let len = s.drop_minutes.clamp(1, 30);
        let series = self.series.get_mut(subject)?;
        if !series.warm(warmup + 1) {
            return None;
        }
        let level = series.level();
        let end = series.minute - 1; // complete minutes only
        let (mut expected, mut bursty) = (0.0, false);
        for mm in (end - i64::from(len) + 1)..=end {
            let b = series.baseline(mm.div_euclid(60))?;
            bursty |= Series::bursty(&b);
            expected += b.total * level / 60.0;
        }
        let (mut seen, mut len) = (f64::from(series.window_sum(end, len)), len);
        if bursty {
            // The last complete hour against its baseline instead.
            let h = series.hour - 1;
            expected = series.baseline(h)?.total * level;
            seen = f64::from(series.totals[Series::slot(h)]);
            len = 60;
        }
        if expected / f64::from(len) < s.drop_min_expected_rpm.max(s.min_volume_rpm) {
            return None;
        }
        if seen > s.drop_max_fraction * expected {
            // Still well short of normal: the drop goes on. A quarter of normal is the recovery
            // threshold, so one stray request does not close it.
            if seen < 0.25 * expected {
                self.episodes
                    .hold(&fingerprint(AlertType::RateDrop, subject, None), at);
            }
            return None;
        }
        let summary = format!(
            "{} made {seen:.0} requests in the last {len} minutes where about {expected:.0} were expected at this hour of the week.",
            subject_label(subject)
        );
        let ev = Evidence {
            observed: seen,
            expected: Some(expected),
            threshold: Some(s.drop_max_fraction * expected),
            method: "count against the hour-of-week median of past weeks' totals",
            window_secs: u64::from(len) * 60,
            samples: u64::from(series.baseline(series.hour).map_or(0, |b| b.samples)),
            hourly: series.recent_hours(CHART_HOURS, level),
            ..Evidence::default()
        };
        let mut f = Finding::new(
            AlertType::RateDrop,
            Severity::Medium,
            subject.clone(),
            at,
            summary,
            ev,
        );
        match subject {
            Subject::Key(k) => f.key_id = Some(*k),
            Subject::Org(o) => f.org_id = Some(*o),
            _ => {}
        }
        self.episodes.raise(f)
    }
}

fn sigma(median: f64, mad: f64) -> f64 {
    (MAD_TO_SIGMA * mad).max(median.max(0.0).sqrt()).max(1.0)
}

/// Before warm-up there is no seasonal baseline; only use sustained near the key's own
/// `rate_limit_rpm` is unusual enough to report.
fn cold_start(
    s: &RateSettings,
    series: &Series,
    subject: &Subject,
    obs: &Observation,
    episodes: &mut Episodes,
) -> Option<Finding> {
    if series.rpm == 0 {
        return None;
    }
    let win = s.window_minutes.clamp(1, 30);
    let floor = (s.cold_start_fraction * f64::from(series.rpm)).ceil() as u32;
    // Complete minutes only: the current one is still filling.
    let busy = (1..=i64::from(win))
        .map(|i| series.minute - i)
        .filter(|&mm| mm >= series.first_hour * 60)
        .filter(|&mm| u32::from(series.minutes[Series::mslot(mm)]) >= floor)
        .count() as u32;
    if busy < win {
        if busy > 0 {
            episodes.hold(&fingerprint(AlertType::RateSpike, subject, None), obs.at);
        }
        return None;
    }
    let x = f64::from(series.window_sum(series.minute - 1, win));
    let summary = format!(
        "{} has run at {:.0} requests a minute for {win} minutes, near its limit of {}, before it has a week of history.",
        describe(subject, obs),
        x / f64::from(win),
        series.rpm
    );
    let ev = Evidence {
        observed: x,
        expected: None,
        threshold: Some(f64::from(floor) * f64::from(win)),
        method: "cold start: every minute of the window at or above a fraction of rate_limit_rpm",
        window_secs: u64::from(win) * 60,
        samples: u64::from(win),
        ..Evidence::default()
    };
    let f = Finding::new(
        AlertType::RateSpike,
        Severity::Low,
        subject.clone(),
        obs.at,
        summary,
        ev,
    );
    episodes.raise(with_ids(f, subject, obs))
}

fn with_ids(f: Finding, subject: &Subject, obs: &Observation) -> Finding {
    let mut f = f.about(obs);
    if let Subject::Org(_) = subject {
        // An organization's spike is not about the key of the request that tipped it.
        f.key_id = None;
        f.key_prefix = None;
        f.source_ip = None;
    }
    f
}

fn subject_label(subject: &Subject) -> String {
    match subject {
        Subject::Key(k) => format!("Key {k}"),
        Subject::Org(o) => format!("Organization {o}"),
        other => other.to_string(),
    }
}

fn describe(subject: &Subject, obs: &Observation) -> String {
    match (subject, &obs.key_prefix) {
        (Subject::Key(_), Some(p)) => format!("Key {p}"),
        _ => subject_label(subject),
    }
}

impl Detector for RateDetector {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let mut out = Vec::new();
        // Only keys and organizations in the key tables: ids on log lines come from anyone.
        let Some(key) = ctx.key else {
            return out;
        };
        let mut subjects = vec![(Subject::Key(key.id), key.rate_limit_rpm)];
        if self.s.per_org {
            subjects.push((Subject::Org(key.org_id), 0));
        }
        let m = minute_of(obs.at);
        for (subject, rpm) in subjects {
            let mut created = false;
            let series = self.series.entry(subject.clone()).or_insert_with(|| {
                created = true;
                Series::new(obs.at)
            });
            if created && m < self.swept {
                self.swept = i64::MIN;
            }
            series.rpm = rpm;
            let newest = series.minute;
            if m < newest - LATENESS_SECS / 60 {
                // Beyond the lateness bound: still counted in its hour, never judged.
                series.record(m);
                continue;
            }
            series.record(m);
            if m > newest {
                out.extend(self.judge_drop(&subject, obs.at));
            }
            out.extend(self.judge_spike(&subject, obs));
        }
        out
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let m = minute_of(now);
        let mut out = Vec::new();
        if m > self.swept {
            let mut subjects: Vec<Subject> = self.series.keys().cloned().collect();
            subjects.sort();
            for subject in subjects {
                let Some(series) = self.series.get_mut(&subject) else {
                    continue;
                };
                if m <= series.minute {
                    continue;
                }
                series.advance(m);
                out.extend(self.judge_drop(&subject, now));
            }
            self.swept = m;
        }
        out.extend(self.episodes.sweep(now));
        out
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::detect::testutil::*;
    use crate::keys::KeyInfo;

    #[test]
    fn median_and_mad_at_the_edges() {
        assert_eq!(median_mad(&[]), None, "zero history has no baseline");
        assert_eq!(median_mad(&[7.0]), Some((7.0, 0.0)), "one sample: MAD 0");
        assert_eq!(median_mad(&[1.0, 3.0]), Some((2.0, 1.0)));
        // One burst does not poison the baseline, as a mean and standard deviation would.
        assert_eq!(median_mad(&[10.0, 11.0, 1000.0]), Some((11.0, 1.0)));
    }

    #[test]
    fn robust_z_floors_the_spread() {
        // MAD 0 (identical weeks): one more request than usual is not infinitely surprising.
        assert!((robust_z(101.0, 100.0, 0.0) - 0.1).abs() < 1e-9);
        // Zero history and zero MAD: the floor is 1.
        assert_eq!(robust_z(5.0, 0.0, 0.0), 5.0);
        assert!((robust_z(40.0, 10.0, 10.0) - 30.0 / 14.826).abs() < 1e-9);
    }

    /// Feeds `per_min(minute_index)` requests in each minute from `from` for `minutes`.
    fn feed(
        d: &mut RateDetector,
        key: &KeyInfo,
        from: DateTime<Utc>,
        minutes: i64,
        mut per_min: impl FnMut(i64, DateTime<Utc>) -> u32,
    ) -> Vec<Finding> {
        let ctx = Context {
            key: Some(key),
            org: None,
        };
        let mut out = Vec::new();
        for i in 0..minutes {
            let t = from + Duration::minutes(i);
            let n = per_min(i, t);
            for j in 0..n {
                let at = t + Duration::milliseconds(i64::from(j) * 59_000 / i64::from(n));
                out.extend(d.observe(&ok(at, key.id), &ctx));
            }
            out.extend(d.tick(t + Duration::seconds(59)));
        }
        out
    }

    fn weekly(t: DateTime<Utc>) -> f64 {
        use chrono::{Datelike, Timelike};
        let weekend = t.weekday().number_from_monday() >= 6;
        let day = (8..20).contains(&t.hour());
        match (weekend, day) {
            (false, true) => 20.0,
            (false, false) => 8.0,
            (true, _) => 6.0,
        }
    }

    fn start() -> DateTime<Utc> {
        t("2026-10-05T00:00:00Z") // a Monday
    }

    fn detector() -> RateDetector {
        RateDetector::new(RateSettings {
            per_org: false,
            ..RateSettings::default()
        })
    }

    #[test]
    fn a_clear_spike_fires_once_and_resolves() {
        let key = key_info(Uuid::from_u128(1), 600);
        let mut d = detector();
        let mut rng = Rng(1);
        let quiet = feed(&mut d, &key, start(), 21 * 1440 + 600, |_, t| {
            rng.poisson(weekly(t))
        });
        assert!(
            quiet.is_empty(),
            "three noisy weeks raise nothing: {quiet:?}"
        );
        // Monday 10:00 of the fourth week: 8× the usual rate for 20 minutes.
        let at = start() + Duration::days(21) + Duration::hours(10);
        let mut out = feed(&mut d, &key, at, 20, |_, _| 160);
        out.extend(feed(
            &mut d,
            &key,
            at + Duration::minutes(20),
            60,
            |_, t| rng.poisson(weekly(t)),
        ));
        let opened: Vec<_> = out.iter().filter(|f| !f.resolved).collect();
        assert_eq!(opened[0].alert_type, AlertType::RateSpike);
        assert_eq!(opened[0].subject, Subject::Key(key.id));
        assert!(opened[0].at - at <= Duration::minutes(5));
        assert!(opened.iter().all(|f| f.alert_type == AlertType::RateSpike));
        assert!(
            opened.len() <= 2,
            "one alert, perhaps one escalation: {opened:?}"
        );
        let resolved: Vec<_> = out.iter().filter(|f| f.resolved).collect();
        assert_eq!(resolved.len(), 1);
    }

    #[test]
    fn an_hourly_ci_burst_after_warm_up_stays_quiet() {
        let key = key_info(Uuid::from_u128(2), 600);
        let mut d = detector();
        let mut rng = Rng(2);
        // The weekly rhythm plus 200 requests in the first two minutes of every hour.
        let out = feed(&mut d, &key, start(), 28 * 1440, |i, t| {
            let burst = if i % 60 < 2 { 100.0 } else { 0.0 };
            rng.poisson(weekly(t) + burst)
        });
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_key_that_only_bursts_is_judged_on_whole_hours() {
        let key = key_info(Uuid::from_u128(12), 600);
        let mut d = detector();
        let mut rng = Rng(12);
        // A CI job: 420 requests in the first three minutes of every hour, almost nothing
        // between, so every hour holds 57 silent minutes. Three weeks of it are quiet.
        let ci = |rng: &mut Rng, i: i64| rng.poisson(if i % 60 < 3 { 140.0 } else { 0.3 });
        let quiet = feed(&mut d, &key, start(), 21 * 1440, |i, _| ci(&mut rng, i));
        assert!(quiet.is_empty(), "{quiet:?}");
        // Then the job stops: the whole hour after the missing burst is the drop.
        let stop = start() + Duration::days(21);
        let out = feed(&mut d, &key, stop, 130, |_, _| 0);
        let drops: Vec<_> = out
            .iter()
            .filter(|f| f.alert_type == AlertType::RateDrop && f.started_at == f.at)
            .collect();
        assert_eq!(drops.len(), 1, "{out:?}");
        assert!(
            drops[0].at - stop <= Duration::minutes(62),
            "{:?}",
            drops[0].at
        );
        assert_eq!(drops[0].evidence.window_secs, 3600);
    }

    #[test]
    fn traffic_returning_after_an_outage_is_not_a_spike() {
        let key = key_info(Uuid::from_u128(13), 600);
        let mut d = detector();
        let mut rng = Rng(13);
        let quiet = feed(&mut d, &key, start(), 21 * 1440 + 10 * 60, |_, t| {
            rng.poisson(weekly(t))
        });
        assert!(quiet.is_empty(), "{quiet:?}");
        // Three hours of silence, then the usual rhythm again for the rest of the day.
        let gone = start() + Duration::days(21) + Duration::hours(10);
        let mut out = feed(&mut d, &key, gone, 180, |_, _| 0);
        out.extend(feed(
            &mut d,
            &key,
            gone + Duration::hours(3),
            600,
            |_, t| rng.poisson(weekly(t)),
        ));
        // One episode (re-sent hourly while it lasts, as every open episode is), no spike.
        let opened: Vec<_> = out
            .iter()
            .filter(|f| f.started_at == f.at)
            .map(|f| f.alert_type)
            .collect();
        assert_eq!(opened, [AlertType::RateDrop], "{out:?}");
        assert!(out.iter().all(|f| f.alert_type == AlertType::RateDrop));
    }

    #[test]
    fn steady_growth_stays_quiet() {
        let key = key_info(Uuid::from_u128(9), 6000);
        let mut d = detector();
        let mut rng = Rng(9);
        // 3% more traffic every day for five weeks: 2.8× by the end, far past the medians.
        let out = feed(&mut d, &key, start(), 35 * 1440, |i, t| {
            rng.poisson(weekly(t) * 1.03f64.powf(i as f64 / 1440.0))
        });
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_busy_key_going_silent_is_a_drop() {
        let key = key_info(Uuid::from_u128(3), 600);
        let mut d = detector();
        let mut rng = Rng(3);
        let quiet = feed(&mut d, &key, start(), 21 * 1440 + 10 * 60, |_, t| {
            rng.poisson(weekly(t))
        });
        assert!(quiet.is_empty(), "{quiet:?}");
        let gone = start() + Duration::days(21) + Duration::hours(10);
        let out = feed(&mut d, &key, gone, 40, |_, _| 0);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].alert_type, AlertType::RateDrop);
        assert_eq!(out[0].subject, Subject::Key(key.id));
        assert!(out[0].at - gone <= Duration::minutes(32));
    }

    #[test]
    fn low_volume_and_young_keys_are_not_judged() {
        let key = key_info(Uuid::from_u128(4), 600);
        let mut d = detector();
        let mut rng = Rng(4);
        // 1 request a minute for three weeks, then a burst of 60 in a minute: below the
        // minimum volume, so not a rate alert (the other detectors may still care).
        let mut out = feed(&mut d, &key, start(), 21 * 1440, |_, _| rng.poisson(1.0));
        out.extend(feed(
            &mut d,
            &key,
            start() + Duration::days(21),
            1,
            |_, _| 60,
        ));
        assert!(out.is_empty(), "{out:?}");
        // A key created yesterday with a burst far below its limit: no baseline, no alert.
        let young = key_info(Uuid::from_u128(5), 600);
        let out = feed(
            &mut d,
            &young,
            start(),
            60,
            |i, _| if i == 30 { 300 } else { 5 },
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn cold_start_fires_only_near_the_limit() {
        let key = key_info(Uuid::from_u128(6), 60);
        let mut d = detector();
        let out = feed(&mut d, &key, start(), 10, |_, _| 58);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].severity, Severity::Low);
        assert_eq!(out[0].alert_type, AlertType::RateSpike);
    }

    #[test]
    fn late_requests_within_the_bound_count_in_their_minute() {
        let key = key_info(Uuid::from_u128(7), 60);
        let mut d = detector();
        let ctx = Context {
            key: Some(&key),
            org: None,
        };
        let t0 = start() + Duration::minutes(10);
        d.observe(&ok(t0, key.id), &ctx);
        // The clock goes back four minutes: still inside the ring, in its own minute.
        d.observe(&ok(t0 - Duration::minutes(4), key.id), &ctx);
        let s = &d.series[&Subject::Key(key.id)];
        assert_eq!(
            s.minute,
            minute_of(t0),
            "a late request never moves time back"
        );
        assert_eq!(s.window_sum(s.minute, 5), 2);
        assert_eq!(s.window_sum(s.minute, 4), 1);
        // Far older than the ring: counted in its hour only, never panics.
        d.observe(&ok(t0 - Duration::days(40), key.id), &ctx);
    }

    #[test]
    fn an_organization_is_judged_on_its_total() {
        let key = key_info(Uuid::from_u128(8), 60);
        let mut d = RateDetector::new(RateSettings::default());
        let out = feed(&mut d, &key, start(), 10, |_, _| 58);
        assert!(out.iter().any(|f| f.subject == Subject::Key(key.id)));
        assert!(d.series.contains_key(&Subject::Org(key.org_id)));
    }
}
