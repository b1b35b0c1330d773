//! Anomaly detection: deciding, from requests and their event time alone, whether something
//! about a key, an organization, an address or an MCP is anomalous.
//!
//! Owns the detectors (one file per family), what they remember per key, and the shape of a
//! [`Finding`]. Every detector is a synchronous state machine driven by event time:
//! [`Detector::observe`] takes one request, [`Detector::tick`] advances event time when no
//! request comes (that is how silences, drops and resolutions are noticed). So a replayed log
//! gives exactly the findings live traffic gave. This module must not do I/O, read the wall
//! clock, store, redact or send anything: it only returns findings, and the alert stage
//! decides what to store and whom to tell.
//!
//! # One finding per anomaly (hysteresis)
//!
//! A finding is identified by its [`Finding::fingerprint`] (type and subject). A detector
//! *opens* it when the trigger condition holds (for example z > 3.5), keeps it open for as long
//! as a weaker *recovery* condition holds (for example z > 2), and resolves it only after a
//! whole recovery period (per detector, minutes to a day) spent below the recovery threshold.
//! While open it is re-sent only when its severity rises or after `reemit` (a summary with
//! fresh numbers, same fingerprint), so a flapping rate stays one alert and pages once. The
//! gap between the trigger and the recovery thresholds is what stops flapping; the recovery
//! period is what stops a single quiet minute inside an incident from closing it.

pub mod allow;
pub mod auth;
pub mod errors;
pub mod exposure;
pub mod lifecycle;
pub mod location;
pub mod quota;
pub mod rate;
pub mod secrets;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::keys::{KeyInfo, OrgInfo};

/// How far behind the newest event time a request may arrive and still be counted where it
/// belongs; the pipeline's lateness bound has the same default.
pub const LATENESS_SECS: i64 = 300;

/// One request as the detectors see it: what the log line said, resolved against the key
/// cache and GeoIP by the caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Event time: when the auth server handled the request.
    pub at: DateTime<Utc>,
    /// The key, as the key cache resolved it (by id, or by an unambiguous prefix).
    pub key_id: Option<Uuid>,
    /// The key's organization, else the one on the line.
    pub org_id: Option<Uuid>,
    /// The presented prefix: the 20-character stored form, or the 12 characters presented
    /// for a refused key.
    pub key_prefix: Option<String>,
    /// The HTTP status the auth server answered.
    pub status: u16,
    /// The client's address; `None` where the line had none.
    pub source_ip: Option<IpAddr>,
    /// ISO country code, as two ASCII letters.
    pub country: Option<[u8; 2]>,
    /// City name, where a City database is configured.
    pub city: Option<String>,
    /// Latitude and longitude in degrees.
    pub lat_lon: Option<(f64, f64)>,
    /// GeoIP's accuracy radius around `lat_lon`.
    pub accuracy_km: Option<f64>,
    /// Autonomous system number of the address, where an ASN database is configured.
    pub asn: Option<u32>,
    /// The request's `User-Agent`.
    pub user_agent: Option<String>,
    /// The request's `Origin` header.
    pub origin: Option<String>,
    /// The MCP server name.
    pub mcp: Option<String>,
    /// The auth server's error code (`unauthorized`, `expired_key`, `revoked_key`, ...).
    pub error_code: Option<String>,
    /// The auth server's `rate_limit_hit` flag.
    pub rate_limit_hit: bool,
}

/// What detectors may read besides the request: the key and organization it resolved to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// The key, when it is in the key tables.
    pub key: Option<&'a KeyInfo>,
    /// The organization, when it is in the key tables.
    pub org: Option<&'a OrgInfo>,
}

/// How urgently a person should look, lowest first (variants as their names say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// The alert `type` values of issue 3; each variant is the type [`AlertType::as_str`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertType {
    RateSpike,
    RateDrop,
    NewCountry,
    NewNetwork,
    ImpossibleTravel,
    ErrorSpike,
    AuthFailureBurst,
    ExpiredKeyUse,
    RevokedKeyUse,
    QuotaThreshold,
    RateLimitSaturation,
    ClientSideExposure,
    KeyInLogs,
}

impl AlertType {
    /// Every type, in the order of the issue.
    pub const ALL: [AlertType; 13] = [
        AlertType::RateSpike,
        AlertType::RateDrop,
        AlertType::NewCountry,
        AlertType::NewNetwork,
        AlertType::ImpossibleTravel,
        AlertType::ErrorSpike,
        AlertType::AuthFailureBurst,
        AlertType::ExpiredKeyUse,
        AlertType::RevokedKeyUse,
        AlertType::QuotaThreshold,
        AlertType::RateLimitSaturation,
        AlertType::ClientSideExposure,
        AlertType::KeyInLogs,
    ];

    /// The stable snake_case name used in storage, config and fingerprints.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertType::RateSpike => "rate_spike",
            AlertType::RateDrop => "rate_drop",
            AlertType::NewCountry => "new_country",
            AlertType::NewNetwork => "new_network",
            AlertType::ImpossibleTravel => "impossible_travel",
            AlertType::ErrorSpike => "error_spike",
            AlertType::AuthFailureBurst => "auth_failure_burst",
            AlertType::ExpiredKeyUse => "expired_key_use",
            AlertType::RevokedKeyUse => "revoked_key_use",
            AlertType::QuotaThreshold => "quota_threshold",
            AlertType::RateLimitSaturation => "rate_limit_saturation",
            AlertType::ClientSideExposure => "client_side_exposure",
            AlertType::KeyInLogs => "key_in_logs",
        }
    }

    /// The type named `s`, as [`AlertType::as_str`] spells it.
    pub fn parse(s: &str) -> Option<AlertType> {
        AlertType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for AlertType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an anomaly is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum Subject {
    /// A key, by id.
    Key(Uuid),
    /// An organization, by id.
    Org(Uuid),
    /// A source address.
    Ip(IpAddr),
    /// A presented key prefix that matches no key (or a key only known by its prefix).
    Prefix(String),
    /// An MCP server, by name.
    Mcp(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Key(id) => write!(f, "key:{id}"),
            Subject::Org(id) => write!(f, "org:{id}"),
            Subject::Ip(ip) => write!(f, "ip:{ip}"),
            Subject::Prefix(p) => write!(f, "prefix:{p}"),
            Subject::Mcp(m) => write!(f, "mcp:{m}"),
        }
    }
}

/// The numbers behind a finding, enough for a person to judge it without the raw log.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Evidence {
    /// What was measured (a count, a fraction, a speed in km/h, a percentage).
    pub observed: f64,
    /// What the baseline expected, where there is one.
    pub expected: Option<f64>,
    /// The value `observed` had to pass.
    pub threshold: Option<f64>,
    /// How it was decided, in a few words (for example "modified z-score, median/MAD").
    pub method: &'static str,
    /// The window the observation covers.
    pub window_secs: u64,
    /// How many samples the decision rests on (requests in the window, baseline weeks).
    pub samples: u64,
    /// Top contributors (IPs, countries, networks, MCPs, user agents, fields) with counts.
    pub top: Vec<(String, u64)>,
    /// A statistic beside `observed` where the method has one (a z-score, a p-value).
    pub score: Option<f64>,
    /// When a trend reaches its limit at the current rate (quota forecasts).
    pub forecast_at: Option<DateTime<Utc>>,
    /// Requests per hour up to the finding (rate findings), oldest first: the hour's start in
    /// Unix seconds, the count, and what the baseline expected of the whole hour. Error
    /// findings leave it empty: the pipeline fills their hours from the usage rollups.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hourly: Vec<(i64, u32, Option<f64>)>,
    /// The country the finding is about (location findings): what marking it benign teaches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

/// One anomaly, opened, updated or resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The alert `type`.
    pub alert_type: AlertType,
    /// The severity now; an update can raise it, never lower it.
    pub severity: Severity,
    /// What the anomaly is about.
    pub subject: Subject,
    /// Event time of the first evidence of this episode.
    pub started_at: DateTime<Utc>,
    /// Event time of the evidence this finding reports (of the resolution, when resolved).
    pub at: DateTime<Utc>,
    /// One sentence a person understands.
    pub summary: String,
    /// The numbers behind it.
    pub evidence: Evidence,
    /// The key involved, where there is one (the alert's `key_id`).
    pub key_id: Option<Uuid>,
    /// The organization involved (the alert's `org_id`).
    pub org_id: Option<Uuid>,
    /// The key's prefix, never the key (the alert's `key_prefix`).
    pub key_prefix: Option<String>,
    /// The address of the evidence, where one address matters (the alert's `source_ip`).
    pub source_ip: Option<IpAddr>,
    /// What part of the subject, where one subject has independent anomalies of one type:
    /// only `error_spike` uses it (`5xx`, `auth`, `429`), because its classes are judged
    /// separately and mean different things (an MCP failing, a key refused, a limit hit).
    pub facet: Option<&'static str>,
    /// True on the finding that closes the episode.
    pub resolved: bool,
}

impl Finding {
    /// A new open finding at `at` with no identifying fields beyond the subject.
    pub fn new(
        alert_type: AlertType,
        severity: Severity,
        subject: Subject,
        at: DateTime<Utc>,
        summary: String,
        evidence: Evidence,
    ) -> Finding {
        Finding {
            alert_type,
            severity,
            subject,
            started_at: at,
            at,
            summary,
            evidence,
            key_id: None,
            org_id: None,
            key_prefix: None,
            source_ip: None,
            facet: None,
            resolved: false,
        }
    }

    /// This finding with anything that looks like a full key cut to its stored prefix. The
    /// detectors see log lines as they came, and a client may put its key where a prefix,
    /// user agent or origin belongs; alerts, emails and webhooks must never carry it.
    pub fn without_keys(mut self) -> Finding {
        let redact = |s: &mut String| {
            if let Some(r) = crate::keys::redact_keys(s) {
                *s = r;
            }
        };
        redact(&mut self.summary);
        if let Some(p) = &mut self.key_prefix {
            redact(p);
        }
        for (label, _) in &mut self.evidence.top {
            redact(label);
        }
        if let Some(c) = &mut self.evidence.country {
            redact(c);
        }
        self
    }

    /// Fills the identifying fields from the request the evidence came from.
    pub fn about(mut self, obs: &Observation) -> Finding {
        self.key_id = obs.key_id;
        self.org_id = obs.org_id;
        self.key_prefix = obs.key_prefix.clone();
        self.source_ip = obs.source_ip;
        self
    }

    /// Type and subject (and facet, where there is one): stable across updates and restarts,
    /// so the alert stage can merge the updates of one anomaly.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.alert_type, &self.subject, self.facet)
    }
}

/// The fingerprint of an anomaly: `type/subject`, or `type/subject/facet`.
pub fn fingerprint(t: AlertType, s: &Subject, facet: Option<&str>) -> String {
    match facet {
        Some(f) => format!("{t}/{s}/{f}"),
        None => format!("{t}/{s}"),
    }
}

/// A detector: a synchronous state machine over event time.
pub trait Detector {
    /// Takes one request; returns findings it opened, updated or resolved.
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding>;
    /// Advances event time to `now` without a request; returns drops and resolutions due.
    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding>;
}

/// Open episodes of one detector, by fingerprint: the shared hysteresis (see the module
/// documentation).
#[derive(Debug, Clone)]
pub(crate) struct Episodes {
    /// How long an episode must stay below its recovery threshold to resolve.
    recovery: Duration,
    /// How often an unchanged open episode is re-sent with fresh numbers.
    reemit: Duration,
    open: HashMap<String, Episode>,
}

#[derive(Debug, Clone)]
struct Episode {
    last: Finding,
    /// Last event time the recovery condition failed (the anomaly was still there).
    held_at: DateTime<Utc>,
    emitted_at: DateTime<Utc>,
}

impl Episodes {
    pub(crate) fn new(recovery: Duration, reemit: Duration) -> Episodes {
        Episodes {
            recovery,
            reemit,
            open: HashMap::new(),
        }
    }

    pub(crate) fn is_open(&self, fp: &str) -> bool {
        self.open.contains_key(fp)
    }

    /// The trigger condition holds: opens the episode, or updates it. Returns the finding to
    /// send: always for a new episode, for an open one only when severity rose or `reemit`
    /// passed.
    pub(crate) fn raise(&mut self, mut f: Finding) -> Option<Finding> {
        let k = f.fingerprint();
        match self.open.get_mut(&k) {
            None => {
                self.open.insert(
                    k,
                    Episode {
                        last: f.clone(),
                        held_at: f.at,
                        emitted_at: f.at,
                    },
                );
                Some(f)
            }
            Some(ep) => {
                f.started_at = ep.last.started_at;
                let rose = f.severity > ep.last.severity;
                f.severity = f.severity.max(ep.last.severity);
                ep.held_at = ep.held_at.max(f.at);
                let due = f.at - ep.emitted_at >= self.reemit;
                ep.last = f.clone();
                if rose || due {
                    ep.emitted_at = f.at;
                    Some(f)
                } else {
                    None
                }
            }
        }
    }

    /// The anomaly is still above its recovery threshold at `at`: keeps the episode open.
    pub(crate) fn hold(&mut self, fp: &str, at: DateTime<Utc>) {
        if let Some(ep) = self.open.get_mut(fp) {
            ep.held_at = ep.held_at.max(at);
        }
    }

    /// Resolves every episode whose last hold is a whole recovery period before `now`.
    pub(crate) fn sweep(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let recovery = self.recovery;
        let mut done: Vec<String> = self
            .open
            .iter()
            .filter(|(_, ep)| now - ep.held_at >= recovery)
            .map(|(k, _)| k.clone())
            .collect();
        // Deterministic output order whatever the hash map's.
        done.sort();
        done.into_iter()
            .filter_map(|k| self.open.remove(&k))
            .map(|ep| {
                let mut f = ep.last;
                f.at = ep.held_at + recovery;
                f.resolved = true;
                f.summary = format!("Resolved: {}", f.summary);
                f
            })
            .collect()
    }

    /// Resolves one episode now, whatever its recovery period (a month ended).
    pub(crate) fn close(&mut self, fp: &str, at: DateTime<Utc>) -> Option<Finding> {
        self.open.remove(fp).map(|ep| {
            let mut f = ep.last;
            f.at = at;
            f.resolved = true;
            f.summary = format!("Resolved: {}", f.summary);
            f
        })
    }
}

/// Counts by label, for an evidence's `top` list; bounded so that labels from log lines
/// (user agents, origins) cannot grow it without limit.
#[derive(Debug, Clone, Default)]
pub(crate) struct TopCounts {
    entries: Vec<(String, u64)>,
}

impl TopCounts {
    const CAP: usize = 16;

    pub(crate) fn add(&mut self, label: &str) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == label) {
            e.1 += 1;
        } else if self.entries.len() < Self::CAP {
            self.entries.push((truncate(label, 80), 1));
        }
    }

    /// The `n` largest, largest first, ties by label so output is deterministic.
    pub(crate) fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut v = self.entries.clone();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A two-letter country code as text.
pub(crate) fn country_str(c: [u8; 2]) -> String {
    String::from_utf8_lossy(&c).into_owned()
}

/// FNV-1a: a small stable hash, so sets of strings can be kept as `u64`s with bounded size
/// and the same result on every run and platform.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Minutes since the Unix epoch (floor), the index every per-minute ring uses.
pub(crate) fn minute_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(60)
}

/// The settings of every detector, each with its issue-3 defaults: the `[detectors.*]`
/// tables of `alerts.toml`, one per family, each setting named as its field.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `rate_spike`, `rate_drop`.
    pub rate: rate::RateSettings,
    /// `new_country`, `new_network`, `impossible_travel`.
    pub location: location::LocationSettings,
    /// `error_spike`.
    pub errors: errors::ErrorSettings,
    /// `auth_failure_burst`.
    pub auth: auth::AuthSettings,
    /// `expired_key_use`, `revoked_key_use`.
    pub lifecycle: lifecycle::LifecycleSettings,
    /// `quota_threshold`, `rate_limit_saturation`.
    pub quota: quota::QuotaSettings,
    /// `client_side_exposure`.
    pub exposure: exposure::ExposureSettings,
    /// `key_in_logs`.
    pub secrets: secrets::SecretSettings,
    /// Known-good places (`[[allow]]` in `alerts.toml`, beside the detector tables).
    #[serde(skip)]
    pub allow: allow::Allowlist,
}

/// A detector setting outside what it can be.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{table}.{setting} {message}")]
pub struct InvalidSetting {
    /// The detector family's table (`rate`, `errors`, ...).
    pub table: &'static str,
    /// The setting's name in that table.
    pub setting: &'static str,
    /// What it must be, as the end of a sentence ("must be from 1 to 30").
    pub message: String,
}

/// Checks one number against its range: `Err` names the setting and the range.
fn within<T: PartialOrd + fmt::Display>(
    table: &'static str,
    setting: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), InvalidSetting> {
    if v >= lo && v <= hi {
        Ok(())
    } else {
        Err(InvalidSetting {
            table,
            setting,
            message: format!("must be from {lo} to {hi}, not {v}"),
        })
    }
}

impl Settings {
    /// The first setting outside its range. Ranges are where a detector still means what its
    /// documentation says (a window longer than its ring of minutes would silently shrink).
    pub fn check(&self) -> Result<(), InvalidSetting> {
        let r = &self.rate;
        within("rate", "window_minutes", r.window_minutes, 1, 30)?;
        within("rate", "drop_minutes", r.drop_minutes, 1, 30)?;
        within("rate", "spike_z", r.spike_z, 0.5, 100.0)?;
        within("rate", "recovery_z", r.recovery_z, 0.0, r.spike_z)?;
        within("rate", "spike_min_ratio", r.spike_min_ratio, 1.0, 100.0)?;
        within("rate", "drop_max_fraction", r.drop_max_fraction, 0.0, 0.9)?;
        within("rate", "min_volume_rpm", r.min_volume_rpm, 0.0, 1e9)?;
        within(
            "rate",
            "drop_min_expected_rpm",
            r.drop_min_expected_rpm,
            0.0,
            1e9,
        )?;
        within("rate", "warmup_days", r.warmup_days, 1, 28)?;
        within(
            "rate",
            "cold_start_fraction",
            r.cold_start_fraction,
            0.1,
            10.0,
        )?;
        within("rate", "recovery_minutes", r.recovery_minutes, 1, 1440)?;
        within("rate", "reemit_minutes", r.reemit_minutes, 1, 10080)?;
        let l = &self.location;
        within("location", "learning_hours", l.learning_hours, 0, 24 * 28)?;
        within("location", "max_speed_kmh", l.max_speed_kmh, 1.0, 1e6)?;
        within(
            "location",
            "default_accuracy_km",
            l.default_accuracy_km,
            0.0,
            5000.0,
        )?;
        within("location", "recovery_hours", l.recovery_hours, 1, 24 * 28)?;
        let e = &self.errors;
        within("errors", "window_minutes", e.window_minutes, 1, 7)?;
        within("errors", "min_ratio", e.min_ratio, 1.0, 100.0)?;
        within("errors", "min_excess", e.min_excess, 0.0, 1.0)?;
        within("errors", "max_p_value", e.max_p_value, 1e-300, 0.5)?;
        within(
            "errors",
            "baseline_half_life_hours",
            e.baseline_half_life_hours,
            0.1,
            1e4,
        )?;
        within("errors", "prior_rate", e.prior_rate, 0.0, 0.99)?;
        within("errors", "prior_weight", e.prior_weight, 0.0, 1e9)?;
        within("errors", "recovery_minutes", e.recovery_minutes, 1, 1440)?;
        let a = &self.auth;
        within("auth", "window_minutes", a.window_minutes, 1, 60)?;
        within("auth", "distinct_prefixes", a.distinct_prefixes, 2, 128)?;
        within("auth", "distinct_ips", a.distinct_ips, 2, 128)?;
        within("auth", "failures", a.failures, 1, u32::MAX)?;
        within("auth", "recovery_minutes", a.recovery_minutes, 1, 1440)?;
        within("auth", "max_subjects", a.max_subjects, 10, 10_000_000)?;
        within(
            "lifecycle",
            "recovery_hours",
            self.lifecycle.recovery_hours,
            1,
            24 * 28,
        )?;
        within(
            "lifecycle",
            "reemit_hours",
            self.lifecycle.reemit_hours,
            1,
            24 * 28,
        )?;
        let q = &self.quota;
        if let Some(bad) = q.levels.windows(2).find(|w| w[0] >= w[1]) {
            return Err(InvalidSetting {
                table: "quota",
                setting: "levels",
                message: format!(
                    "must be increasing percentages, like [75, 90, 100, 120] ({} is not below {})",
                    bad[0], bad[1]
                ),
            });
        }
        for &lvl in &q.levels {
            within("quota", "levels", lvl, 1, 1000)?;
        }
        within("quota", "saturated_minutes", q.saturated_minutes, 1, 60)?;
        within(
            "quota",
            "saturation_fraction",
            q.saturation_fraction,
            0.1,
            10.0,
        )?;
        within(
            "quota",
            "saturation_recovery_minutes",
            q.saturation_recovery_minutes,
            1,
            1440,
        )?;
        within(
            "exposure",
            "min_addresses",
            self.exposure.min_addresses,
            2,
            10_000,
        )?;
        within(
            "exposure",
            "period_hours",
            self.exposure.period_hours,
            1,
            24 * 7,
        )?;
        within(
            "secrets",
            "recovery_hours",
            self.secrets.recovery_hours,
            1,
            24 * 28,
        )?;
        Ok(())
    }
}

/// Every detector, each present when enabled in its settings (fields as in [`Settings`]).
/// Findings come out in a fixed detector order, so the output is deterministic.
pub struct Detectors {
    /// The settings they were built with (see [`Detectors::reconfigure`]).
    settings: Settings,
    pub rate: Option<rate::RateDetector>,
    pub location: Option<location::LocationDetector>,
    pub errors: Option<errors::ErrorDetector>,
    pub auth: Option<auth::AuthDetector>,
    pub lifecycle: Option<lifecycle::LifecycleDetector>,
    pub quota: Option<quota::QuotaDetector>,
    pub exposure: Option<exposure::ExposureDetector>,
    pub secrets: Option<secrets::SecretDetector>,
}

impl Detectors {
    /// Builds the enabled detectors.
    pub fn new(s: &Settings) -> Detectors {
        Detectors {
            settings: s.clone(),
            rate: s
                .rate
                .enabled
                .then(|| rate::RateDetector::new(s.rate.clone())),
            location: (s.location.new_country
                || s.location.new_network
                || s.location.impossible_travel)
                .then(|| {
                    location::LocationDetector::new(s.location.clone())
                        .with_allowlist(s.allow.clone())
                }),
            errors: s
                .errors
                .enabled
                .then(|| errors::ErrorDetector::new(s.errors.clone())),
            auth: s
                .auth
                .enabled
                .then(|| auth::AuthDetector::new(s.auth.clone())),
            lifecycle: (s.lifecycle.expired || s.lifecycle.revoked)
                .then(|| lifecycle::LifecycleDetector::new(s.lifecycle.clone())),
            quota: (s.quota.threshold || s.quota.saturation)
                .then(|| quota::QuotaDetector::new(s.quota.clone())),
            exposure: s
                .exposure
                .enabled
                .then(|| exposure::ExposureDetector::new(s.exposure.clone())),
            secrets: s
                .secrets
                .enabled
                .then(|| secrets::SecretDetector::new(s.secrets.clone())),
        }
    }

    /// Applies new settings (alerts.toml reloaded): a detector whose settings changed is built
    /// anew and takes back what it had learned (as across a restart: its open episodes start
    /// over), the others carry on untouched, and a new `[[allow]]` list applies at once.
    /// Returns the names of the detectors rebuilt.
    pub fn reconfigure(&mut self, s: &Settings) -> Vec<&'static str> {
        let learned = self.save_state();
        let mut fresh = Detectors::new(s);
        let old = std::mem::replace(&mut self.settings, s.clone());
        let mut rebuilt = Vec::new();
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if old.$field == s.$field {
                    fresh.$field = self.$field.take();
                } else {
                    rebuilt.push(stringify!($field));
                }
            )*};
        }
        keep!(
            rate, location, errors, auth, lifecycle, quota, exposure, secrets
        );
        for (name, json) in learned {
            if rebuilt.contains(&name)
                && let Err(e) = fresh.restore_state(name, &json)
            {
                tracing::warn!(detector = name, error = %e, "What the detector had learned does not fit its new settings; it starts over.");
            }
        }
        if let Some(loc) = fresh.location.as_mut()
            && old.allow != s.allow
        {
            loc.set_allowlist(s.allow.clone());
        }
        fresh.settings = s.clone();
        *self = fresh;
        rebuilt
    }

    /// What the detectors have learned that takes days to learn again: the rate baselines
    /// and the places keys are used from, as `(name, JSON)` for the store to keep across
    /// restarts. Open episodes are not kept: an anomaly still there after a restart is raised
    /// again, as a new episode.
    pub fn save_state(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = &self.rate {
            out.push(("rate", r.save_state()));
        }
        if let Some(l) = &self.location {
            out.push(("location", l.save_state()));
        }
        out
    }

    /// Takes back what [`Detectors::save_state`] saved under `name`; state of a detector that
    /// is off now, or of an unknown name, is ignored.
    pub fn restore_state(&mut self, name: &str, json: &str) -> Result<(), serde_json::Error> {
        match name {
            "rate" => self.rate.as_mut().map_or(Ok(()), |r| r.restore_state(json)),
            "location" => self
                .location
                .as_mut()
                .map_or(Ok(()), |l| l.restore_state(json)),
            _ => Ok(()),
        }
    }

    fn each(&mut self) -> [Option<&mut dyn Detector>; 8] {
        [
            self.rate.as_mut().map(|d| d as &mut dyn Detector),
            self.location.as_mut().map(|d| d as &mut dyn Detector),
            self.errors.as_mut().map(|d| d as &mut dyn Detector),
            self.auth.as_mut().map(|d| d as &mut dyn Detector),
            self.lifecycle.as_mut().map(|d| d as &mut dyn Detector),
            self.quota.as_mut().map(|d| d as &mut dyn Detector),
            self.exposure.as_mut().map(|d| d as &mut dyn Detector),
            self.secrets.as_mut().map(|d| d as &mut dyn Detector),
        ]
    }
}

impl Detector for Detectors {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        self.each()
            .into_iter()
            .flatten()
            .flat_map(|d| d.observe(obs, ctx))
            .map(Finding::without_keys)
            .collect()
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        self.each()
            .into_iter()
            .flatten()
            .flat_map(|d| d.tick(now))
            .map(Finding::without_keys)
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builders shared by the detectors' tests.
    use super::*;

    pub fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    pub fn ok(at: DateTime<Utc>, key: Uuid) -> Observation {
        Observation {
            at,
            key_id: Some(key),
            org_id: Some(Uuid::from_u128(0x0a)),
            key_prefix: Some("pmcp_019a41c2e7f0...".into()),
            status: 200,
            source_ip: Some("81.2.69.160".parse().unwrap()),
            mcp: Some("github".into()),
            ..Observation::default()
        }
    }

    pub fn key_info(id: Uuid, rpm: u32) -> KeyInfo {
        KeyInfo::for_test(id, Uuid::from_u128(0x0a), "pmcp_019a41c2e7f0...", rpm)
    }

    /// A tiny deterministic PRNG (SplitMix64): tests need noise, not a dependency.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        pub fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// A Poisson draw (Knuth's method; fine for the small means tests use).
        pub fn poisson(&mut self, mean: f64) -> u32 {
            if mean > 30.0 {
                // Normal approximation for big means keeps the loop short.
                let u1 = self.unit().max(1e-12);
                let u2 = self.unit();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                return (mean + z * mean.sqrt()).round().max(0.0) as u32;
            }
            let l = (-mean).exp();
            let mut k = 0;
            let mut p = 1.0;
            loop {
                p *= self.unit();
                if p <= l {
                    return k;
                }
                k += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn finding(at: DateTime<Utc>, sev: Severity) -> Finding {
        Finding::new(
            AlertType::RateSpike,
            sev,
            Subject::Key(Uuid::from_u128(1)),
            at,
            "x".into(),
            Evidence::default(),
        )
    }

    #[test]
    fn names_are_the_issue_names() {
        for t in AlertType::ALL {
            assert_eq!(AlertType::parse(t.as_str()), Some(t));
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
        assert!(Severity::Info < Severity::Low && Severity::High < Severity::Critical);
    }

    #[test]
    fn fingerprint_is_type_and_subject() {
        let f = finding(t("2026-11-20T12:00:00Z"), Severity::Low);
        assert_eq!(
            f.fingerprint(),
            "rate_spike/key:00000000-0000-0000-0000-000000000001"
        );
    }

    #[test]
    fn an_episode_is_one_finding_until_it_recovers() {
        let mut e = Episodes::new(Duration::minutes(15), Duration::hours(1));
        let t0 = t("2026-11-20T12:00:00Z");
        assert!(e.raise(finding(t0, Severity::Low)).is_some());
        // Flapping: raised again a minute later, then quiet for 10 minutes, raised again.
        assert!(
            e.raise(finding(t0 + Duration::minutes(1), Severity::Low))
                .is_none()
        );
        assert!(e.sweep(t0 + Duration::minutes(11)).is_empty());
        assert!(
            e.raise(finding(t0 + Duration::minutes(12), Severity::Low))
                .is_none()
        );
        // Severity rising is news.
        let up = e
            .raise(finding(t0 + Duration::minutes(13), Severity::High))
            .unwrap();
        assert_eq!(up.started_at, t0);
        // A whole recovery period after the last hold it resolves, once.
        assert!(e.sweep(t0 + Duration::minutes(27)).is_empty());
        let done = e.sweep(t0 + Duration::minutes(28));
        assert_eq!(done.len(), 1);
        assert!(done[0].resolved);
        assert_eq!(done[0].at, t0 + Duration::minutes(28));
        assert!(e.sweep(t0 + Duration::hours(5)).is_empty());
    }

    /// A day of one key's ordinary traffic with three incidents mixed in, through every
    /// detector: each incident once with its type and subject, nothing else, and the same
    /// findings on a second run (replay gives what live traffic gave).
    fn mixed_day() -> Vec<Finding> {
        let mut d = Detectors::new(&Settings::default());
        let id = Uuid::from_u128(0x1d);
        let mut info = key_info(id, 600);
        info.expires_at = Some(t("2026-11-20T18:00:00Z"));
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let t0 = t("2026-11-20T00:00:00Z");
        let mut rng = Rng(42);
        let mut out = Vec::new();
        for minute in 0..(20 * 60) {
            let at = t0 + Duration::minutes(minute);
            for j in 0..rng.poisson(3.0) {
                let mut o = ok(at + Duration::seconds(i64::from(j) * 7), id);
                o.country = Some(*b"GB");
                if minute == 600 && j == 0 {
                    o.user_agent = Some(format!("bot/1 pmcp_01{}{}", id.simple(), "0f".repeat(24)));
                }
                if at >= info.expires_at.unwrap() {
                    o.status = 401;
                    o.error_code = Some("expired_key".into());
                }
                out.extend(d.observe(&o, &ctx));
            }
            if (720..722).contains(&minute) {
                for j in 0..40 {
                    let o = Observation {
                        at: at + Duration::seconds(j),
                        status: 401,
                        source_ip: Some("203.0.113.50".parse().unwrap()),
                        key_prefix: Some(format!("pmcp_01{:05x}", minute * 100 + j)),
                        ..Observation::default()
                    };
                    out.extend(d.observe(&o, &Context::default()));
                }
            }
            out.extend(d.tick(at + Duration::seconds(59)));
        }
        out
    }

    #[test]
    fn every_detector_together_is_deterministic_and_quiet_but_for_the_incidents() {
        let out = mixed_day();
        let opened: Vec<(AlertType, Subject)> = out
            .iter()
            .filter(|f| !f.resolved)
            .map(|f| (f.alert_type, f.subject.clone()))
            .collect();
        let id = Uuid::from_u128(0x1d);
        assert_eq!(
            opened,
            [
                (AlertType::KeyInLogs, Subject::Key(id)),
                (
                    AlertType::AuthFailureBurst,
                    Subject::Ip("203.0.113.50".parse().unwrap())
                ),
                (AlertType::ExpiredKeyUse, Subject::Key(id)),
                (AlertType::ExpiredKeyUse, Subject::Key(id)),
            ],
            "{out:#?}"
        );
        assert_eq!(mixed_day(), out);
    }

    #[test]
    fn every_detector_is_on_by_default_except_new_network() {
        let s = Settings::default();
        let d = Detectors::new(&s);
        assert!(d.rate.is_some() && d.location.is_some() && d.errors.is_some());
        assert!(d.auth.is_some() && d.lifecycle.is_some() && d.quota.is_some());
        assert!(d.exposure.is_some() && d.secrets.is_some());
        assert!(!s.location.new_network);
    }
}
