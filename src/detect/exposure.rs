//! `client_side_exposure`: a key used from browsers at many addresses — the documentation's
//! "never expose keys in client code".
//!
//! Owns, per key, the distinct addresses of its browser requests over a sliding period. A
//! request is from a browser when it carries an `Origin` header (servers and SDKs do not send
//! one) or a browser user agent. One developer trying the API from a browser is one address;
//! a key shipped in a web page is called from its visitors' addresses, many of them.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    TopCounts, fnv1a,
};

/// Addresses remembered per key: enough to count past any sane threshold.
const MAX_ADDRESSES: usize = 64;

/// Settings of `client_side_exposure`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExposureSettings {
    /// Whether the detector runs at all.
    pub enabled: bool,
    /// Distinct addresses with browser requests that make an exposure.
    pub min_addresses: u32,
    /// Over this many hours.
    pub period_hours: u32,
}

impl Default for ExposureSettings {
    fn default() -> ExposureSettings {
        ExposureSettings {
            enabled: true,
            min_addresses: 10,
            period_hours: 24,
        }
    }
}

/// Whether a request came from a browser.
pub fn is_browser(obs: &Observation) -> bool {
    let origin = obs
        .origin
        .as_deref()
        .is_some_and(|o| o != "null" && (o.starts_with("https://") || o.starts_with("http://")));
    let ua = obs.user_agent.as_deref().is_some_and(|ua| {
        // Every mainstream browser's UA starts with "Mozilla/5.0"; tools that copy it say
        // what they are further on.
        ua.starts_with("Mozilla/5.0")
            && ![
                "curl",
                "python",
                "node-fetch",
                "axios",
                "Go-http-client",
                "bot",
                "Bot",
            ]
            .iter()
            .any(|t| ua.contains(t))
    });
    origin || ua
}

/// Browser use of one key. Memory: up to 64 × 16 B of (address hash, last seen) and two top
/// lists (~1 KB), only for keys with browser requests.
#[derive(Debug, Clone, Default)]
struct Browsers {
    addresses: Vec<(u64, DateTime<Utc>)>,
    origins: TopCounts,
    ips: TopCounts,
}

/// Detects keys used from browsers at many addresses. See the module documentation.
#[derive(Debug)]
pub struct ExposureDetector {
    s: ExposureSettings,
    keys: HashMap<Uuid, Browsers>,
    episodes: Episodes,
}

impl ExposureDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: ExposureSettings) -> ExposureDetector {
        let period = Duration::hours(i64::from(s.period_hours.max(1)));
        ExposureDetector {
            s,
            keys: HashMap::new(),
            episodes: Episodes::new(period, Duration::hours(24)),
        }
    }
}

impl Detector for ExposureDetector {
    fn observe(&mut self, obs: &Observation, _ctx: &Context<'_>) -> Vec<Finding> {
        let (Some(key), Some(ip)) = (obs.key_id, obs.source_ip) else {
            return Vec::new();
        };
        if !is_browser(obs) {
            return Vec::new();
        }
        let period = Duration::hours(i64::from(self.s.period_hours.max(1)));
        let b = self.keys.entry(key).or_default();
        let h = fnv1a(ip.to_string().as_bytes());
        b.addresses.retain(|(_, seen)| obs.at - *seen < period);
        if let Some(e) = b.addresses.iter_mut().find(|(a, _)| *a == h) {
            e.1 = e.1.max(obs.at);
        } else if b.addresses.len() < MAX_ADDRESSES {
            b.addresses.push((h, obs.at));
        }
        if let Some(o) = &obs.origin {
            b.origins.add(o);
        }
        b.ips.add(&ip.to_string());
        let n = b.addresses.len() as u32;
        if n < self.s.min_addresses {
            return Vec::new();
        }
        let mut top = b.origins.top(5);
        top.extend(b.ips.top(5));
        let summary = format!(
            "Key {} was used from a browser at {n} different addresses in {} hours{}: it is probably in client-side code.",
            obs.key_prefix.clone().unwrap_or_else(|| key.to_string()),
            self.s.period_hours,
            b.origins
                .top(1)
                .first()
                .map(|(o, _)| format!(" (origin {o})"))
                .unwrap_or_default()
        );
        let ev = Evidence {
            observed: f64::from(n),
            threshold: Some(f64::from(self.s.min_addresses)),
            method: "distinct addresses of requests with an Origin header or a browser user agent",
            window_secs: u64::from(self.s.period_hours) * 3600,
            samples: u64::from(n),
            top,
            ..Evidence::default()
        };
        let f = Finding::new(
            AlertType::ClientSideExposure,
            Severity::High,
            Subject::Key(key),
            obs.at,
            summary,
            ev,
        )
        .about(obs);
        self.episodes.raise(f).into_iter().collect()
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let period = Duration::hours(i64::from(self.s.period_hours.max(1)));
        self.keys.retain(|_, b| {
            b.addresses.retain(|(_, seen)| now - *seen < period);
            !b.addresses.is_empty()
        });
        self.episodes.sweep(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";

    #[test]
    fn browser_requests_from_many_addresses_fire() {
        let mut d = ExposureDetector::new(ExposureSettings::default());
        let key = Uuid::from_u128(1);
        let t0 = t("2026-11-20T12:00:00Z");
        let mut out = Vec::new();
        for i in 0..30u8 {
            let mut o = ok(t0 + Duration::minutes(i64::from(i)), key);
            o.source_ip = Some(format!("81.2.69.{}", 100 + i).parse().unwrap());
            o.origin = Some("https://shop.example.com".into());
            out.extend(d.observe(&o, &Context::default()));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].alert_type, AlertType::ClientSideExposure);
        assert_eq!(out[0].subject, Subject::Key(key));
        assert_eq!(out[0].evidence.top[0].0, "https://shop.example.com");
        assert_eq!(d.tick(t0 + Duration::hours(50)).len(), 1);
    }

    #[test]
    fn one_developer_in_a_browser_and_servers_stay_quiet() {
        let mut d = ExposureDetector::new(ExposureSettings::default());
        let key = Uuid::from_u128(2);
        let t0 = t("2026-11-20T12:00:00Z");
        let mut out = Vec::new();
        for i in 0..500u32 {
            let mut o = ok(t0 + Duration::minutes(i64::from(i)), key);
            if i % 2 == 0 {
                o.user_agent = Some(FIREFOX.into());
            } else {
                // An SDK on many servers: no Origin, not a browser.
                o.user_agent = Some("plexmcp-python/1.4.0".into());
                o.source_ip = Some(format!("81.2.{}.{}", i % 7, i % 200).parse().unwrap());
            }
            out.extend(d.observe(&o, &Context::default()));
        }
        assert!(out.is_empty(), "{out:?}");
        let mut curl = ok(t0, key);
        curl.user_agent = Some("Mozilla/5.0 (compatible; curl)".into());
        assert!(!is_browser(&curl));
    }
}
