//! Every metric keywatch exports, its labels and their bounds, in one place.
//!
//! Owns the metric names, help texts and label sets, the exact counters behind the per-key,
//! per-organization and per-MCP families, and the rendering of `/metrics` (Prometheus text or
//! OpenMetrics). The rest of the code calls the methods of [`Metrics`] and never touches the
//! registry; this module never changes what the pipeline counts, does no I/O and stores
//! nothing.
//!
//! # Bounds
//!
//! Labels come only from bounded sets: source names (as configured), reject reasons and
//! status classes (fixed enums), alert types and severities (fixed enums), GeoIP files (as
//! configured), and per-entity labels for at most [`Limits`]' top K keys, organizations and
//! MCPs plus one `other` series each (see [`topk`] for how the top K is chosen without
//! breaking `rate()`). Per-key series carry the key's stored prefix and name, never a key.
//! Organizations and MCPs are separate families: no cross product of key, organization and
//! MCP exists anywhere.
//!
//! # Where the numbers come from
//!
//! Request counters (per class, per entity, bytes, month-to-date) are taken from each batch
//! *after* it is committed, so `/metrics` never shows a count the database does not have.
//! Latency histograms and ingest lag are taken as chunks are read. Alerts firing and raised
//! are derived from the findings the pipeline commits (the detectors expose no such counts);
//! keys in warm-up and keys tracked are the pipeline's view (keys seen since start, and those
//! first seen less than the rate detector's warm-up ago by event time), beside the rate
//! detector's own count of subjects with state.

pub mod openmetrics;
pub mod topk;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use uuid::Uuid;

use crate::detect::{AlertType, Severity};
use crate::event::{RejectReason, StatusClass};
use crate::geo::GeoDb;
use crate::keys::{KeyCache, redact_keys};
use crate::store::Batch;
use crate::usage::{Counters, Granularity, LATENCY_BOUNDS_MS, month_of};
use topk::{CLASSES, ClassCounts, TopK};

/// The `status_class` label values, in [`class_index`] order.
pub const STATUS_CLASSES: [&str; CLASSES] = ["ok", "auth", "rate_limited", "client", "server"];

/// The label value of the series that carries every entity outside the top K.
pub const OTHER: &str = "other";
/// The label value for "no organization" and "no MCP name".
pub const NONE: &str = "none";
/// The label value of the key group of refused keys that match no key.
pub const UNKNOWN: &str = "unknown";
/// The longest entity label value, in characters; longer names are cut.
pub const MAX_LABEL_CHARS: usize = 64;
/// Keys whose first-seen time is remembered, at most (for keys tracked and in warm-up).
const MAX_FIRST_SEEN: usize = 2_000_000;
/// Upper bounds of `keywatch_alert_decision_seconds`, 1 ms to 10 s: fine around the 50 ms
/// target, coarse where only "how far behind" matters.
const ALERT_DECISION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Thresholds of `keywatch_organizations_month_usage_over_ratio`.
const USAGE_THRESHOLDS: [(&str, f64); 3] = [("0.8", 0.8), ("0.9", 0.9), ("1", 1.0)];

/// How many entities get series of their own, and when an idle one loses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys with series of their own (the busiest by recent traffic).
    pub top_keys: usize,
    /// Organizations with series of their own.
    pub top_orgs: usize,
    /// MCPs with series of their own.
    pub top_mcps: usize,
    /// An entity without requests for this long loses its series.
    pub idle_expiry: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            top_keys: 100,
            top_orgs: 200,
            top_mcps: 100,
            idle_expiry: Duration::from_secs(24 * 3_600),
        }
    }
}

impl Limits {
    /// The most series these limits allow for the per-entity families (each entity and the
    /// `other` series), before the fixed families and the per-source ones: 7 per key, 8 per
    /// organization, 5 per MCP.
    pub fn entity_series(&self) -> usize {
        7 * (self.top_keys + 1) + 8 * (self.top_orgs + 1) + 5 * (self.top_mcps + 1)
    }
}

/// What can go wrong rendering the metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] prometheus::Error),
    #[error("the encoded metrics are not UTF-8: {0}")]
    NotUtf8(#[from] std::string::FromUtf8Error),
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if openmetrics::wanted(a) => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => openmetrics::CONTENT_TYPE,
        }
    }
}

/// One family of the custom collector: name, help, type and label names.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

macro_rules! family {
    ($id:ident, $name:literal, $kind:ident, [$($l:literal),*], $help:literal) => {
        const $id: Family = Family {
            name: $name,
            help: $help,
            kind: MetricType::$kind,
            labels: &[$($l),*],
        };
    };
}

family!(
    REQUESTS,
    "keywatch_requests_total",
    COUNTER,
    ["status_class"],
    "Requests counted (committed), by status class: ok (1xx-3xx), auth (401, 403), rate_limited (429), client (other 4xx), server (5xx)."
);
family!(
    REQUEST_DURATION,
    "keywatch_request_duration_seconds",
    HISTOGRAM,
    ["status_class"],
    "Latency the auth server logged for each request, by status class; the buckets of keywatch's own usage histogram."
);
family!(
    REQUEST_BYTES,
    "keywatch_request_bytes_total",
    COUNTER,
    [],
    "Request body bytes of the requests counted."
);
family!(
    RESPONSE_BYTES,
    "keywatch_response_bytes_total",
    COUNTER,
    [],
    "Response body bytes of the requests counted."
);
family!(
    ORG_REQUESTS,
    "keywatch_organization_requests_total",
    COUNTER,
    ["organization", "status_class"],
    "Requests by organization (slug; the top K by recent traffic, the rest as \"other\", none for lines without one) and status class."
);
family!(
    MCP_REQUESTS,
    "keywatch_mcp_requests_total",
    COUNTER,
    ["mcp", "status_class"],
    "Requests by MCP server name (the top K by recent traffic, the rest as \"other\", none for lines without one) and status class."
);
family!(
    KEY_REQUESTS,
    "keywatch_key_requests_total",
    COUNTER,
    ["key_prefix", "key_name", "status_class"],
    "Requests by API key (stored prefix and name of the top K keys by recent traffic, the rest as \"other\", refused keys matching no key as \"unknown\") and status class."
);
family!(
    KEY_RPM,
    "keywatch_key_requests_per_minute",
    GAUGE,
    ["key_prefix", "key_name"],
    "Requests of a top-K key in the busier of the newest event-time minute and the one before."
);
family!(
    KEY_RPM_LIMIT,
    "keywatch_key_rate_limit_requests_per_minute",
    GAUGE,
    ["key_prefix", "key_name"],
    "The rate_limit_rpm of a top-K key."
);
family!(
    ORG_MONTH,
    "keywatch_organization_month_requests",
    GAUGE,
    ["organization"],
    "Requests of a top-K organization in the current calendar month (UTC, event time), including what was committed before this process started."
);
family!(
    ORG_LIMIT,
    "keywatch_organization_monthly_limit_requests",
    GAUGE,
    ["organization"],
    "The monthly request limit of a top-K organization (absent when unlimited)."
);
family!(
    ORG_RATIO,
    "keywatch_organization_month_usage_ratio",
    GAUGE,
    ["organization"],
    "Month-to-date requests over the monthly limit of a top-K organization (absent when unlimited)."
);
family!(
    ORGS_OVER,
    "keywatch_organizations_month_usage_over_ratio",
    GAUGE,
    ["threshold"],
    "Organizations (all of them, not only the top K) whose month-to-date requests are at least this fraction of their monthly limit."
);
family!(
    ALERTS_FIRING,
    "keywatch_alerts_firing",
    GAUGE,
    ["alert_type", "severity"],
    "Alerts open now (opened and not yet resolved by the detectors in this process), by type and severity."
);
family!(
    ALERTS_RAISED,
    "keywatch_alerts_raised_total",
    COUNTER,
    ["alert_type"],
    "Alerts opened (new episodes) by type."
);
family!(
    ALERTS_RESOLVED,
    "keywatch_alerts_resolved_total",
    COUNTER,
    ["alert_type"],
    "Alerts resolved by type."
);
family!(
    KEYS_TRACKED,
    "keywatch_detection_keys_tracked",
    GAUGE,
    [],
    "Keys the detectors have seen since this process started (as the pipeline counts them)."
);
family!(
    KEYS_WARMUP,
    "keywatch_detection_keys_in_warmup",
    GAUGE,
    [],
    "Keys first seen less than the rate detector's warm-up (7 days of event time) before the newest request: no seasonal baseline yet."
);
family!(
    DETECTOR_SUBJECTS,
    "keywatch_detection_subjects",
    GAUGE,
    ["detector"],
    "Subjects a detector keeps state for, as the detector reports it: keys and organizations (rate), addresses and presented key prefixes of refused keys (auth)."
);
family!(
    STATE_EVICTIONS,
    "keywatch_state_evictions_total",
    COUNTER,
    ["state"],
    "Entries forgotten to keep state bounded against a flood of distinct values from log lines: auth_subjects (addresses and presented prefixes of refused keys, [detectors.auth] max_subjects)."
);
family!(
    SERIES_FOLDED,
    "keywatch_metrics_series_folded_total",
    COUNTER,
    ["family"],
    "Entities whose traffic went to the \"other\" series instead of one of their own: first seen with the top K full, or evicted from it."
);
family!(
    ENTITIES_TRACKED,
    "keywatch_metrics_entities_tracked",
    GAUGE,
    ["family"],
    "Entities with requests within the idle expiry, exported or not."
);
family!(
    ENTITIES_EXPORTED,
    "keywatch_metrics_entities_exported",
    GAUGE,
    ["family"],
    "Entities with series of their own (at most the configured top K)."
);
family!(
    TOP_LIMIT,
    "keywatch_metrics_top_limit",
    GAUGE,
    ["family"],
    "The configured top K of each family."
);
family!(
    INGEST_LAG,
    "keywatch_ingest_lag_seconds",
    GAUGE,
    ["source"],
    "Wall clock minus the newest event time of the last chunk read from the source."
);
family!(
    SOURCE_NEWEST,
    "keywatch_source_newest_event_timestamp_seconds",
    GAUGE,
    ["source"],
    "Newest event time read from the source, as a Unix time."
);
family!(
    SOURCE_READ,
    "keywatch_source_last_read_timestamp_seconds",
    GAUGE,
    ["source"],
    "When the source last delivered lines, as a Unix time."
);
family!(
    KEY_CACHE_AGE,
    "keywatch_key_cache_age_seconds",
    GAUGE,
    [],
    "Time since the key cache was last loaded."
);
family!(
    GEOIP_BUILD,
    "keywatch_geoip_database_build_timestamp_seconds",
    GAUGE,
    ["file", "database_type"],
    "When a GeoIP database in use was built, as a Unix time (from its metadata)."
);
family!(
    GEOIP_AGE,
    "keywatch_geoip_database_age_seconds",
    GAUGE,
    ["file", "database_type"],
    "Time since a GeoIP database in use was built."
);
family!(
    BUILD_INFO,
    "keywatch_build_info",
    GAUGE,
    ["version"],
    "Always 1; the version of the running keywatch."
);

const CUSTOM: &[&Family] = &[
    &REQUESTS,
    &REQUEST_DURATION,
    &REQUEST_BYTES,
    &RESPONSE_BYTES,
    &ORG_REQUESTS,
    &MCP_REQUESTS,
    &KEY_REQUESTS,
    &KEY_RPM,
    &KEY_RPM_LIMIT,
    &ORG_MONTH,
    &ORG_LIMIT,
    &ORG_RATIO,
    &ORGS_OVER,
    &ALERTS_FIRING,
    &ALERTS_RAISED,
    &ALERTS_RESOLVED,
    &KEYS_TRACKED,
    &KEYS_WARMUP,
    &DETECTOR_SUBJECTS,
    &STATE_EVICTIONS,
    &SERIES_FOLDED,
    &ENTITIES_TRACKED,
    &ENTITIES_EXPORTED,
    &TOP_LIMIT,
    &INGEST_LAG,
    &SOURCE_NEWEST,
    &SOURCE_READ,
    &KEY_CACHE_AGE,
    &GEOIP_BUILD,
    &GEOIP_AGE,
    &BUILD_INFO,
];

/// The index of a status code's class in [`STATUS_CLASSES`].
pub fn class_index(status: u16) -> usize {
    match StatusClass::of(status) {
        StatusClass::Ok => 0,
        StatusClass::Auth => 1,
        StatusClass::RateLimited => 2,
        StatusClass::Client => 3,
        StatusClass::Server => 4,
    }
}

/// What one chunk of lines adds to the metrics that follow reading (latency, lag). The
/// pipeline fills one per chunk and hands it to [`Metrics::chunk_read`].
#[derive(Debug, Default)]
pub struct ChunkTally {
    by_class: [Counters; CLASSES],
    newest: Option<DateTime<Utc>>,
}

impl ChunkTally {
    /// Counts one accepted request.
    pub fn request(&mut self, at: DateTime<Utc>, status: u16, latency_ms: u32) {
        self.by_class[class_index(status)].add(status, latency_ms, 0, 0);
        self.newest = Some(self.newest.map_or(at, |n| n.max(at)));
    }
}

/// The two newest event-time minutes of a key, for its requests per minute.
#[derive(Debug, Default, Clone, Copy)]
struct Minutes([(u32, u32); 2]);

impl Minutes {
    fn add(&mut self, minute: u32, n: u64) {
        let slot = &mut self.0[(minute % 2) as usize];
        if slot.0 != minute {
            if minute < slot.0 {
                return; // older than what this slot holds: a late line
            }
            *slot = (minute, 0);
        }
        slot.1 = slot.1.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// The busier of minutes `newest - 1` and `newest`.
    fn busiest(&self, newest: u32) -> u32 {
        self.0
            .iter()
            .filter(|(m, _)| *m <= newest && m.saturating_add(1) >= newest)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
struct SourceSeen {
    newest: DateTime<Utc>,
    lag_secs: f64,
    read_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct GeoSeen {
    file: String,
    database_type: String,
    built: i64,
}

/// The state behind the custom collector.
/// MCP names remembered for /metrics. Unlike key and organization ids, which only the key
/// tables can make valid, any log line can name a new MCP; a deployment has at most a few
/// thousand, so names beyond this are counted in `other` at once (and as folded) instead of
/// each costing memory for a day (`--metrics-idle-expiry`).
fn mcps_tracked(top_mcps: usize) -> usize {
    (2 * top_mcps).max(10_000)
}

struct Traffic {
    keys: TopK<Option<Uuid>, Minutes>,
    orgs: TopK<Option<Uuid>>,
    mcps: TopK<Arc<str>>,
    requests: ClassCounts,
    bytes_in: u64,
    bytes_out: u64,
    latency: [Counters; CLASSES],
    newest_minute: u32,
    month: Option<(DateTime<Utc>, DateTime<Utc>)>,
    month_requests: HashMap<Uuid, u64>,
    key_first_seen: HashMap<Uuid, u32>,
    alerts_open: HashMap<String, (AlertType, Severity)>,
    alerts_raised: [u64; AlertType::ALL.len()],
    alerts_resolved: [u64; AlertType::ALL.len()],
    sources: BTreeMap<String, SourceSeen>,
    rate_subjects: Option<usize>,
    /// The refused-key detector's subjects and evictions since start.
    auth_state: Option<(usize, u64)>,
    cache: Option<Arc<KeyCache>>,
    geo: Vec<GeoSeen>,
}

impl Traffic {
    fn new(l: &Limits) -> Traffic {
        let idle = u32::try_from(l.idle_expiry.as_secs()).unwrap_or(u32::MAX);
        Traffic {
            keys: TopK::new(l.top_keys, idle),
            orgs: TopK::new(l.top_orgs, idle),
            mcps: TopK::new(l.top_mcps, idle).with_max_tracked(mcps_tracked(l.top_mcps)),
            requests: [0; CLASSES],
            bytes_in: 0,
            bytes_out: 0,
            latency: Default::default(),
            newest_minute: 0,
            month: None,
            month_requests: HashMap::new(),
            key_first_seen: HashMap::new(),
            alerts_open: HashMap::new(),
            alerts_raised: [0; AlertType::ALL.len()],
            alerts_resolved: [0; AlertType::ALL.len()],
            sources: BTreeMap::new(),
            rate_subjects: None,
            auth_state: None,
            cache: None,
            geo: Vec::new(),
        }
    }

    /// Adds a committed batch.
    fn absorb(&mut self, batch: &Batch, now: u32) {
        for (sk, c) in batch.rollup.series(Granularity::Minute) {
            let counts: ClassCounts = [
                c.requests - c.errors(),
                c.err_auth,
                c.err_rate_limited,
                c.err_client,
                c.err_server,
            ];
            for (t, n) in self.requests.iter_mut().zip(&counts) {
                *t += n;
            }
            self.bytes_in += c.bytes_in;
            self.bytes_out += c.bytes_out;
            let minute = u32::try_from(sk.bucket_start.timestamp().div_euclid(60)).unwrap_or(0);
            self.newest_minute = self.newest_minute.max(minute);
            if let Some(m) = self.keys.add(&sk.key_id, &counts, now) {
                m.add(minute, c.requests);
            }
            self.orgs.add(&sk.org_id, &counts, now);
            self.mcps.add(&sk.mcp, &counts, now);
            if let Some(k) = sk.key_id {
                let len = self.key_first_seen.len();
                match self.key_first_seen.get_mut(&k) {
                    Some(first) => *first = (*first).min(minute),
                    None if len < MAX_FIRST_SEEN => {
                        self.key_first_seen.insert(k, minute);
                    }
                    None => {}
                }
            }
            if let Some(org) = sk.org_id {
                self.count_month(org, sk.bucket_start, c.requests);
            }
        }
        for f in &batch.findings {
            let i = alert_index(f.alert_type);
            let fp = f.fingerprint();
            if f.resolved {
                if self.alerts_open.remove(&fp).is_some() {
                    self.alerts_resolved[i] += 1;
                }
            } else {
                match self.alerts_open.get_mut(&fp) {
                    Some(open) => open.1 = open.1.max(f.severity),
                    None => {
                        self.alerts_open.insert(fp, (f.alert_type, f.severity));
                        self.alerts_raised[i] += 1;
                    }
                }
            }
        }
    }

    fn count_month(&mut self, org: Uuid, at: DateTime<Utc>, n: u64) {
        match self.month {
            Some((start, _)) if at < start => return, // a late line of a past month
            Some((_, end)) if at < end => {}
            _ => {
                self.month = Some(month_of(at));
                self.month_requests.clear();
            }
        }
        *self.month_requests.entry(org).or_default() += n;
    }

    /// Renders every family, then re-chooses the top K for what comes next: deciding after
    /// rendering means every increment counted into an entity's own series is shown at least
    /// once (at this scrape) before an eviction hides that series.
    fn families(&mut self, now: u32, wall: DateTime<Utc>) -> Vec<MetricFamily> {
        let out = self.render(wall);
        self.keys.rebalance(now);
        self.orgs.rebalance(now);
        self.mcps.rebalance(now);
        out
    }

    fn render(&self, wall: DateTime<Utc>) -> Vec<MetricFamily> {
        let mut out = Vec::with_capacity(CUSTOM.len());
        let class_series = |labels: &[(&str, &str)], c: &ClassCounts| {
            c.iter()
                .zip(STATUS_CLASSES)
                .map(|(n, class)| {
                    let mut l = labels.to_vec();
                    l.push(("status_class", class));
                    sample(MetricType::COUNTER, &l, *n as f64)
                })
                .collect::<Vec<_>>()
        };
        out.push(family(&REQUESTS, class_series(&[], &self.requests)));
        out.push(family(
            &REQUEST_DURATION,
            self.latency
                .iter()
                .zip(STATUS_CLASSES)
                .map(|(c, class)| histogram(&[("status_class", class)], c))
                .collect(),
        ));
        out.push(family(
            &REQUEST_BYTES,
            vec![sample(MetricType::COUNTER, &[], self.bytes_in as f64)],
        ));
        out.push(family(
            &RESPONSE_BYTES,
            vec![sample(MetricType::COUNTER, &[], self.bytes_out as f64)],
        ));

        let cache = self.cache.clone().unwrap_or_default();
        // Keys.
        let mut keys: Vec<_> = self.keys.exported().collect();
        keys.sort_by_key(|(k, _, _)| **k);
        let mut used = HashSet::from([(OTHER.to_owned(), OTHER.to_owned())]);
        let (mut reqs, mut rpm, mut rpm_limit) = (Vec::new(), Vec::new(), Vec::new());
        for (k, shown, minutes) in keys {
            let info = k.and_then(|id| cache.key(&id));
            let (prefix, name) = match (k, info) {
                (None, _) => (UNKNOWN.to_owned(), "unknown keys".to_owned()),
                (Some(id), None) => (UNKNOWN.to_owned(), format!("id {}", short_id(*id))),
                (Some(_), Some(i)) => (label_value(&i.prefix), label_value(&i.name)),
            };
            let tags = k.map(|id| [short_id(id), id.simple().to_string()]);
            let name = claim_pair(&mut used, &prefix, name, tags);
            let l = [("key_prefix", prefix.as_str()), ("key_name", name.as_str())];
            reqs.extend(class_series(&l, shown));
            rpm.push(sample(
                MetricType::GAUGE,
                &l,
                f64::from(minutes.busiest(self.newest_minute)),
            ));
            if let Some(i) = info {
                rpm_limit.push(sample(MetricType::GAUGE, &l, f64::from(i.rate_limit_rpm)));
            }
        }
        let other = [("key_prefix", OTHER), ("key_name", OTHER)];
        reqs.extend(class_series(&other, self.keys.other()));
        out.push(family(&KEY_REQUESTS, reqs));
        out.push(family(&KEY_RPM, rpm));
        out.push(family(&KEY_RPM_LIMIT, rpm_limit));

        // Organizations.
        let mut orgs: Vec<_> = self.orgs.exported().collect();
        orgs.sort_by_key(|(k, _, _)| **k);
        let mut used = HashSet::from([OTHER.to_owned(), NONE.to_owned()]);
        let (mut reqs, mut month, mut limit, mut ratio) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut exported_month = 0u64;
        for (k, shown, ()) in orgs {
            let Some(id) = *k else {
                reqs.extend(class_series(&[("organization", NONE)], shown));
                continue;
            };
            let info = cache.org(&id);
            let slug =
                info.map_or_else(|| format!("id-{}", short_id(id)), |o| label_value(&o.slug));
            let slug = claim(&mut used, slug, [short_id(id), id.simple().to_string()]);
            let l = [("organization", slug.as_str())];
            reqs.extend(class_series(&l, shown));
            let mtd = self.month_requests.get(&id).copied().unwrap_or(0);
            exported_month += mtd;
            month.push(sample(MetricType::GAUGE, &l, mtd as f64));
            if let Some(lim) = info.and_then(|o| o.monthly_limit().0) {
                limit.push(sample(MetricType::GAUGE, &l, lim as f64));
                if lim > 0 {
                    ratio.push(sample(MetricType::GAUGE, &l, mtd as f64 / lim as f64));
                }
            }
        }
        reqs.extend(class_series(&[("organization", OTHER)], self.orgs.other()));
        let all_month: u64 = self.month_requests.values().sum();
        month.push(sample(
            MetricType::GAUGE,
            &[("organization", OTHER)],
            all_month.saturating_sub(exported_month) as f64,
        ));
        out.push(family(&ORG_REQUESTS, reqs));
        out.push(family(&ORG_MONTH, month));
        out.push(family(&ORG_LIMIT, limit));
        out.push(family(&ORG_RATIO, ratio));
        let mut over = [0u64; USAGE_THRESHOLDS.len()];
        for o in cache.orgs() {
            if let Some(lim) = o.monthly_limit().0.filter(|&l| l > 0) {
                let r = self.month_requests.get(&o.id).copied().unwrap_or(0) as f64 / lim as f64;
                for (n, (_, t)) in over.iter_mut().zip(USAGE_THRESHOLDS) {
                    *n += u64::from(r >= t);
                }
            }
        }
        out.push(family(
            &ORGS_OVER,
            USAGE_THRESHOLDS
                .iter()
                .zip(over)
                .map(|((t, _), n)| sample(MetricType::GAUGE, &[("threshold", t)], n as f64))
                .collect(),
        ));

        // MCPs.
        let mut mcps: Vec<_> = self.mcps.exported().collect();
        mcps.sort_by(|a, b| a.0.cmp(b.0));
        let mut used = HashSet::from([OTHER.to_owned(), NONE.to_owned()]);
        let mut reqs = Vec::new();
        for (name, shown, ()) in mcps {
            let value = if name.is_empty() {
                NONE.to_owned()
            } else {
                let tag = format!("{:016x}", crate::detect::fnv1a(name.as_bytes()));
                claim(&mut used, label_value(name), [tag[..8].to_owned(), tag])
            };
            reqs.extend(class_series(&[("mcp", value.as_str())], shown));
        }
        reqs.extend(class_series(&[("mcp", OTHER)], self.mcps.other()));
        out.push(family(&MCP_REQUESTS, reqs));

        // Detection.
        let mut firing: BTreeMap<(usize, Severity), u64> = BTreeMap::new();
        for (t, s) in self.alerts_open.values() {
            *firing.entry((alert_index(*t), *s)).or_default() += 1;
        }
        let severities = [
            Severity::Info,
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ];
        let mut f = Vec::new();
        for (i, t) in AlertType::ALL.iter().enumerate() {
            for s in severities {
                let n = firing.get(&(i, s)).copied().unwrap_or(0);
                let l = [("alert_type", t.as_str()), ("severity", s.as_str())];
                f.push(sample(MetricType::GAUGE, &l, n as f64));
            }
        }
        out.push(family(&ALERTS_FIRING, f));
        for (fam, counts) in [
            (&ALERTS_RAISED, &self.alerts_raised),
            (&ALERTS_RESOLVED, &self.alerts_resolved),
        ] {
            let m = AlertType::ALL
                .iter()
                .zip(counts.iter())
                .map(|(t, n)| {
                    sample(
                        MetricType::COUNTER,
                        &[("alert_type", t.as_str())],
                        *n as f64,
                    )
                })
                .collect();
            out.push(family(fam, m));
        }
        let warmup_minutes = crate::detect::rate::RateSettings::default().warmup_days * 1_440;
        let fresh_after = self.newest_minute.saturating_sub(warmup_minutes);
        let in_warmup = self
            .key_first_seen
            .values()
            .filter(|&&m| m > fresh_after)
            .count();
        out.push(family(
            &KEYS_TRACKED,
            vec![sample(
                MetricType::GAUGE,
                &[],
                self.key_first_seen.len() as f64,
            )],
        ));
        out.push(family(
            &KEYS_WARMUP,
            vec![sample(MetricType::GAUGE, &[], in_warmup as f64)],
        ));
        let mut subjects = Vec::new();
        if let Some(n) = self.rate_subjects {
            subjects.push(sample(MetricType::GAUGE, &[("detector", "rate")], n as f64));
        }
        if let Some((n, evicted)) = self.auth_state {
            subjects.push(sample(MetricType::GAUGE, &[("detector", "auth")], n as f64));
            out.push(family(
                &STATE_EVICTIONS,
                vec![sample(
                    MetricType::COUNTER,
                    &[("state", "auth_subjects")],
                    evicted as f64,
                )],
            ));
        }
        if !subjects.is_empty() {
            out.push(family(&DETECTOR_SUBJECTS, subjects));
        }

        // The bounds themselves.
        let fams: [(&str, [f64; 4]); 3] = [
            ("key", stats(&self.keys)),
            ("organization", stats(&self.orgs)),
            ("mcp", stats(&self.mcps)),
        ];
        let per = |kind: MetricType, i: usize| {
            fams.iter()
                .map(|(name, s)| sample(kind, &[("family", name)], s[i]))
                .collect::<Vec<_>>()
        };
        out.push(family(&SERIES_FOLDED, per(MetricType::COUNTER, 0)));
        out.push(family(&ENTITIES_TRACKED, per(MetricType::GAUGE, 1)));
        out.push(family(&ENTITIES_EXPORTED, per(MetricType::GAUGE, 2)));
        out.push(family(&TOP_LIMIT, per(MetricType::GAUGE, 3)));

        // keywatch itself.
        let (mut lag, mut newest, mut read) = (Vec::new(), Vec::new(), Vec::new());
        for (name, s) in &self.sources {
            let l = [("source", name.as_str())];
            lag.push(sample(MetricType::GAUGE, &l, s.lag_secs));
            newest.push(sample(MetricType::GAUGE, &l, unix(s.newest)));
            read.push(sample(MetricType::GAUGE, &l, unix(s.read_at)));
        }
        out.push(family(&INGEST_LAG, lag));
        out.push(family(&SOURCE_NEWEST, newest));
        out.push(family(&SOURCE_READ, read));
        if let Some(at) = cache.loaded_at() {
            let age = (unix(wall) - unix(at)).max(0.0);
            out.push(family(
                &KEY_CACHE_AGE,
                vec![sample(MetricType::GAUGE, &[], age)],
            ));
        }
        let (mut built, mut age) = (Vec::new(), Vec::new());
        for g in &self.geo {
            let l = [
                ("file", g.file.as_str()),
                ("database_type", g.database_type.as_str()),
            ];
            built.push(sample(MetricType::GAUGE, &l, g.built as f64));
            let a = (wall.timestamp() - g.built).max(0) as f64;
            age.push(sample(MetricType::GAUGE, &l, a));
        }
        out.push(family(&GEOIP_BUILD, built));
        out.push(family(&GEOIP_AGE, age));
        out.push(family(
            &BUILD_INFO,
            vec![sample(
                MetricType::GAUGE,
                &[("version", env!("CARGO_PKG_VERSION"))],
                1.0,
            )],
        ));
        out.retain(|f| !f.get_metric().is_empty());
        out
    }
}

/// Series folded, entities tracked, entities exported, the configured K.
fn stats<K: std::hash::Hash + Eq + Clone, E: Default>(t: &TopK<K, E>) -> [f64; 4] {
    [
        t.folded() as f64,
        t.tracked() as f64,
        t.exported_count() as f64,
        t.limit() as f64,
    ]
}

fn alert_index(t: AlertType) -> usize {
    AlertType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

fn unix(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn short_id(id: Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}

/// A name from the key tables or a log line as a label value: keys in it redacted, cut to
/// [`MAX_LABEL_CHARS`].
fn label_value(s: &str) -> String {
    let s = redact_keys(s).unwrap_or_else(|| s.to_owned());
    s.chars().take(MAX_LABEL_CHARS).collect()
}

/// `value`, or `value~tag` with the first tag that makes it unique, claimed in `used`.
fn claim(used: &mut HashSet<String>, value: String, tags: [String; 2]) -> String {
    let mut v = value.clone();
    for tag in tags {
        if !used.contains(&v) {
            break;
        }
        v = format!("{value}~{tag}");
    }
    used.insert(v.clone());
    v
}

/// [`claim`] for a key's (prefix, name) pair: the name takes the tag.
fn claim_pair(
    used: &mut HashSet<(String, String)>,
    prefix: &str,
    name: String,
    tags: Option<[String; 2]>,
) -> String {
    let mut n = name.clone();
    for tag in tags.into_iter().flatten() {
        if !used.contains(&(prefix.to_owned(), n.clone())) {
            break;
        }
        n = format!("{name}~{tag}");
    }
    used.insert((prefix.to_owned(), n.clone()));
    n
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

fn sample(kind: MetricType, pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut m = Metric::from_label(labels(pairs));
    match kind {
        MetricType::COUNTER => {
            let mut c = proto::Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
        _ => {
            let mut g = proto::Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
    }
    m
}

fn histogram(pairs: &[(&str, &str)], c: &Counters) -> Metric {
    let mut m = Metric::from_label(labels(pairs));
    let mut h = proto::Histogram::default();
    let mut cumulative = 0u64;
    let buckets = LATENCY_BOUNDS_MS
        .iter()
        .zip(c.latency.iter())
        .map(|(bound, n)| {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(f64::from(*bound) / 1000.0);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    h.set_bucket(buckets);
    h.set_sample_count(c.latency.iter().sum());
    h.set_sample_sum(c.latency_ms_sum as f64 / 1000.0);
    m.set_histogram(h);
    m
}

fn family(f: &Family, metrics: Vec<Metric>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(f.name.to_owned());
    mf.set_help(f.help.to_owned());
    mf.set_field_type(f.kind);
    mf.set_metric(metrics);
    mf
}

/// The custom collector: renders [`Traffic`] at each scrape.
struct TrafficCollector {
    state: Arc<Mutex<Traffic>>,
    started: Instant,
    descs: Vec<Desc>,
}

impl Collector for TrafficCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = elapsed_secs(self.started);
        let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        t.families(now, Utc::now())
    }
}

fn elapsed_secs(started: Instant) -> u32 {
    u32::try_from(started.elapsed().as_secs()).unwrap_or(u32::MAX)
}

/// The metrics of one keywatch process. Cheap to clone: every field is a handle.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    lines: IntCounterVec,
    rejected: IntCounterVec,
    commit_seconds: Histogram,
    alert_decision: HistogramVec,
    commit_failures: IntCounter,
    commits_blocked: IntGauge,
    key_cache_keys: IntGauge,
    key_cache_orgs: IntGauge,
    key_cache_loaded: IntGauge,
    outbox_depth: IntGauge,
    outbox_oldest_age: prometheus::Gauge,
    notifications: IntCounterVec,
    traffic: Arc<Mutex<Traffic>>,
    started: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Metrics with the default [`Limits`].
    pub fn new() -> Metrics {
        Metrics::with_limits(Limits::default())
    }

    /// Metrics whose per-entity families are bounded by `limits`.
    pub fn with_limits(limits: Limits) -> Metrics {
        let registry = Registry::new();
        let lines = IntCounterVec::new(
            Opts::new(
                "keywatch_lines_ingested_total",
                "Request-log lines accepted, by source.",
            ),
            &["source"],
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "keywatch_lines_rejected_total",
                "Request-log lines refused, by source and reason.",
            ),
            &["source", "reason"],
        )
        .expect("valid metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "keywatch_batch_commit_seconds",
                "Time to commit one batch of counts and checkpoints.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let alert_decision = HistogramVec::new(
            HistogramOpts::new(
                "keywatch_alert_decision_seconds",
                "Time from reading the chunk that held a line to a detector's finding on it (raised, updated or resolved), by alert type; includes the time the chunk waited for the pipeline.",
            )
            .buckets(ALERT_DECISION_BUCKETS.to_vec()),
            &["alert_type"],
        )
        .expect("valid metric");
        // Every series exists from start-up, at 0: the label set is the fixed enum, and a
        // rate() over a series that appears with its first finding misses that finding.
        for t in AlertType::ALL {
            alert_decision.with_label_values(&[t.as_str()]);
        }
        let commit_failures = IntCounter::new(
            "keywatch_batch_commit_failures_total",
            "Batch commits that failed and were retried.",
        )
        .expect("valid metric");
        let commits_blocked = IntGauge::new(
            "keywatch_commits_blocked",
            "1 while batch commits fail and are retried: the sources are held back (nothing more is read once the pipeline's few buffered chunks are full); 0 otherwise.",
        )
        .expect("valid metric");
        let key_cache_keys = IntGauge::new("keywatch_key_cache_keys", "API keys in the key cache.")
            .expect("valid metric");
        let key_cache_orgs = IntGauge::new(
            "keywatch_key_cache_organizations",
            "Organizations in the key cache.",
        )
        .expect("valid metric");
        let key_cache_loaded = IntGauge::new(
            "keywatch_key_cache_loaded_timestamp_seconds",
            "When the key cache was last loaded, as a Unix time.",
        )
        .expect("valid metric");
        let outbox_depth = IntGauge::new(
            "keywatch_notify_outbox_depth",
            "Alert changes and notifications waiting in the outbox (not yet delivered).",
        )
        .expect("valid metric");
        let outbox_oldest_age = prometheus::Gauge::new(
            "keywatch_notify_outbox_oldest_age_seconds",
            "How long the oldest alert change or notification in the outbox has waited (0 when it is empty).",
        )
        .expect("valid metric");
        let notifications = IntCounterVec::new(
            Opts::new(
                "keywatch_notifications_total",
                "Delivery attempts by receiver and outcome: sent, retried (a retryable failure), failed (given up).",
            ),
            &["receiver", "outcome"],
        )
        .expect("valid metric");
        let traffic = Arc::new(Mutex::new(Traffic::new(&limits)));
        let started = Instant::now();
        let collector = TrafficCollector {
            state: Arc::clone(&traffic),
            started,
            descs: CUSTOM
                .iter()
                .map(|f| {
                    let labels = f.labels.iter().map(|l| (*l).to_owned()).collect();
                    Desc::new(f.name.to_owned(), f.help.to_owned(), labels, HashMap::new())
                        .expect("valid metric")
                })
                .collect(),
        };
        for c in [
            Box::new(lines.clone()) as Box<dyn Collector>,
            Box::new(rejected.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(alert_decision.clone()),
            Box::new(commit_failures.clone()),
            Box::new(commits_blocked.clone()),
            Box::new(key_cache_keys.clone()),
            Box::new(key_cache_orgs.clone()),
            Box::new(key_cache_loaded.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(outbox_oldest_age.clone()),
            Box::new(notifications.clone()),
            Box::new(collector),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        Metrics {
            registry,
            lines,
            rejected,
            commit_seconds,
            alert_decision,
            commit_failures,
            commits_blocked,
            key_cache_keys,
            key_cache_orgs,
            key_cache_loaded,
            outbox_depth,
            outbox_oldest_age,
            notifications,
            traffic,
            started,
        }
    }

    /// Creates the delivery series of every configured receiver at 0, so they exist from
    /// start-up (the set of receivers is bounded by the configuration).
    pub fn notify_receivers<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            for outcome in ["sent", "retried", "failed"] {
                self.notifications.with_label_values(&[n, outcome]);
            }
        }
    }

    /// Counts one delivery attempt of `receiver` (`sent`, `retried` or `failed`).
    pub fn notification(&self, receiver: &str, outcome: &'static str) {
        self.notifications
            .with_label_values(&[receiver, outcome])
            .inc();
    }

    /// Sets how much waits in the outbox.
    pub fn outbox_depth(&self, n: u64) {
        self.outbox_depth.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets how long the oldest entry of the outbox has waited, in seconds.
    pub fn outbox_oldest_age(&self, secs: f64) {
        self.outbox_oldest_age.set(secs);
    }

    fn traffic(&self) -> std::sync::MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts lines accepted from `source`.
    pub fn lines_accepted(&self, source: &str, n: u64) {
        if n > 0 {
            self.lines.with_label_values(&[source]).inc_by(n);
        }
    }

    /// Counts a line refused from `source`.
    pub fn line_rejected(&self, source: &str, reason: RejectReason) {
        self.rejected
            .with_label_values(&[source, reason.as_str()])
            .inc();
    }

    /// Records a commit attempt: how long it took and whether it succeeded.
    pub fn batch_committed(&self, took: Duration, ok: bool) {
        self.commit_seconds.observe(took.as_secs_f64());
        if !ok {
            self.commit_failures.inc();
        }
    }

    /// Records one finding of a detector: `since_read` is how long after its source read the
    /// line's chunk the detector decided (issue 8's target: 50 ms at p99 under load).
    pub fn alert_decided(&self, alert_type: AlertType, since_read: Duration) {
        self.alert_decision
            .with_label_values(&[alert_type.as_str()])
            .observe(since_read.as_secs_f64());
    }

    /// Records whether commits are failing (and the sources held back).
    pub fn commits_blocked(&self, blocked: bool) {
        self.commits_blocked.set(i64::from(blocked));
    }

    /// Takes the counts and findings of a batch that was just committed.
    pub fn absorb(&self, batch: &Batch) {
        let now = elapsed_secs(self.started);
        self.traffic().absorb(batch, now);
    }

    /// Takes what a chunk read from `source` adds (latency by class, ingest lag).
    pub fn chunk_read(&self, source: &str, tally: &ChunkTally) {
        let wall = Utc::now();
        let mut t = self.traffic();
        for (sum, c) in t.latency.iter_mut().zip(&tally.by_class) {
            sum.merge(c);
        }
        if let Some(newest) = tally.newest {
            let lag_secs = ((wall - newest).num_milliseconds() as f64 / 1000.0).max(0.0);
            let seen = t.sources.entry(source.to_owned()).or_insert(SourceSeen {
                newest,
                lag_secs,
                read_at: wall,
            });
            seen.newest = seen.newest.max(newest);
            seen.lag_secs = lag_secs;
            seen.read_at = wall;
        }
    }

    /// The rate detector's count of subjects with state, when detection is on.
    pub fn detector_subjects(&self, rate: Option<usize>) {
        self.traffic().rate_subjects = rate;
    }

    /// The refused-key detector's subjects and evictions since start, when it runs.
    pub fn auth_detector_state(&self, subjects_and_evictions: Option<(usize, u64)>) {
        self.traffic().auth_state = subjects_and_evictions;
    }

    /// Starts month-to-date from what the store already holds for the month of `at`. Call it
    /// before the pipeline commits anything; a month already being counted is left alone.
    pub fn seed_month_to_date(&self, at: DateTime<Utc>, counts: &BTreeMap<Uuid, u64>) {
        let mut t = self.traffic();
        let month = month_of(at);
        if t.month.is_some_and(|(start, _)| start >= month.0) {
            return;
        }
        t.month = Some(month);
        t.month_requests = counts.iter().map(|(k, v)| (*k, *v)).collect();
    }

    /// Records the key cache just loaded: its size, when, and the names labels come from.
    pub fn key_cache_loaded(&self, cache: &Arc<KeyCache>) {
        self.key_cache_keys.set(cache.key_count() as i64);
        self.key_cache_orgs.set(cache.org_count() as i64);
        if let Some(t) = cache.loaded_at() {
            self.key_cache_loaded.set(t.timestamp());
        }
        self.traffic().cache = Some(Arc::clone(cache));
    }

    /// Records the GeoIP databases in use.
    pub fn geoip_loaded(&self, geo: &GeoDb) {
        self.traffic().geo = geo
            .files()
            .iter()
            .map(|f| GeoSeen {
                file: f
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| f.path.display().to_string()),
                database_type: f.database_type().to_owned(),
                built: i64::try_from(f.build_epoch()).unwrap_or(i64::MAX),
            })
            .collect();
    }

    /// Every metric, in `format`.
    pub fn render(&self, format: Format) -> Result<String, MetricsError> {
        let families = self.registry.gather();
        match format {
            Format::OpenMetrics => Ok(openmetrics::encode(&families)),
            Format::Prometheus => {
                let mut buf = Vec::with_capacity(64 * 1024);
                TextEncoder::new().encode(&families, &mut buf)?;
                Ok(String::from_utf8(buf)?)
            }
        }
    }
}
