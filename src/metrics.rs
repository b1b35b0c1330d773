//! Every metric keywatch exports, its labels and their bounds, in one place.
//!
//! Labels here come only from bounded sets: source names (as configured), reject reasons (a
//! fixed enum) and commit results. Nothing per key or per organization is labelled here
//! without a bound decided in this file. The rest of the code calls the methods below and
//! never touches the registry.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::event::RejectReason;
use crate::keys::KeyCache;

/// The metrics of one keywatch process. Cheap to clone: every field is a handle.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    lines: IntCounterVec,
    rejected: IntCounterVec,
    commit_seconds: Histogram,
    commit_failures: IntCounter,
    key_cache_keys: IntGauge,
    key_cache_orgs: IntGauge,
    key_cache_loaded: IntGauge,
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
    pub fn new() -> Metrics {
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
        let commit_failures = IntCounter::new(
            "keywatch_batch_commit_failures_total",
            "Batch commits that failed and were retried.",
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
        for c in [
            Box::new(lines.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rejected.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(commit_failures.clone()),
            Box::new(key_cache_keys.clone()),
            Box::new(key_cache_orgs.clone()),
            Box::new(key_cache_loaded.clone()),
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
            commit_failures,
            key_cache_keys,
            key_cache_orgs,
            key_cache_loaded,
        }
    }

    pub fn lines_accepted(&self, source: &str, n: u64) {
        if n > 0 {
            self.lines.with_label_values(&[source]).inc_by(n);
        }
    }

    pub fn line_rejected(&self, source: &str, reason: RejectReason) {
        self.rejected
            .with_label_values(&[source, reason.as_str()])
            .inc();
    }

    pub fn batch_committed(&self, took: Duration, ok: bool) {
        self.commit_seconds.observe(took.as_secs_f64());
        if !ok {
            self.commit_failures.inc();
        }
    }

    pub fn key_cache_loaded(&self, cache: &KeyCache) {
        self.key_cache_keys.set(cache.key_count() as i64);
        self.key_cache_orgs.set(cache.org_count() as i64);
        if let Some(t) = cache.loaded_at() {
            self.key_cache_loaded.set(t.timestamp());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
