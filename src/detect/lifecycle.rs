//! `expired_key_use` and `revoked_key_use`: a client still calling with a key after its
//! `expires_at`, or after it was revoked (its `status` or `revoked_at`, or refused with the
//! `revoked_key` code).
//!
//! Owns, per key, one running account of such calls: since when, how many, how many failed
//! and from where, so each key has one alert that says all of it. It also remembers the
//! countries each key was used from while it was valid: a revoked key used from a country it
//! never knew is high severity (someone else has it).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    TopCounts, country_str,
};

/// Countries remembered per key while it is valid.
const MAX_COUNTRIES: usize = 16;

/// Settings of `expired_key_use` and `revoked_key_use`; defaults are issue 3's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleSettings {
    /// Raise `expired_key_use`.
    pub expired: bool,
    /// Raise `revoked_key_use`.
    pub revoked: bool,
    /// An alert closes after this long without another call.
    pub recovery_hours: u32,
    /// How often an open alert is re-sent with its running count.
    pub reemit_hours: u32,
}

impl Default for LifecycleSettings {
    fn default() -> LifecycleSettings {
        LifecycleSettings {
            expired: true,
            revoked: true,
            recovery_hours: 24,
            reemit_hours: 1,
        }
    }
}

/// Calls after the end of a key's life. Memory while open: ~64 B and two top lists of up to
/// 16 labels (~1 KB); per valid key only the country list, up to 32 B.
#[derive(Debug, Clone)]
struct Account {
    since: DateTime<Utc>,
    calls: u64,
    failed: u64,
    accepted: u64,
    from_new_place: bool,
    ips: TopCounts,
    countries: TopCounts,
}

/// Detects use of expired and revoked keys. See the module documentation.
#[derive(Debug)]
pub struct LifecycleDetector {
    s: LifecycleSettings,
    valid_countries: HashMap<Uuid, Vec<[u8; 2]>>,
    accounts: HashMap<(AlertType, Uuid), Account>,
    episodes: Episodes,
}

impl LifecycleDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: LifecycleSettings) -> LifecycleDetector {
        let episodes = Episodes::new(
            Duration::hours(i64::from(s.recovery_hours)),
            Duration::hours(i64::from(s.reemit_hours.max(1))),
        );
        LifecycleDetector {
            s,
            valid_countries: HashMap::new(),
            accounts: HashMap::new(),
            episodes,
        }
    }
}

/// Which end of life a call is past, if any: revocation wins over expiry (it was deliberate).
fn past_end(obs: &Observation, ctx: &Context<'_>) -> Option<AlertType> {
    let code = obs.error_code.as_deref();
    let revoked = code == Some("revoked_key")
        || ctx
            .key
            // With a revocation time, calls before it were legitimate (a replayed history);
            // without one, the status is all there is to go by.
            .is_some_and(|k| match k.revoked_at {
                Some(r) => r <= obs.at,
                None => k.status != "active",
            });
    let expired = code == Some("expired_key")
        || ctx
            .key
            .and_then(|k| k.expires_at)
            .is_some_and(|e| e <= obs.at);
    if revoked {
        Some(AlertType::RevokedKeyUse)
    } else if expired {
        Some(AlertType::ExpiredKeyUse)
    } else {
        None
    }
}

impl Detector for LifecycleDetector {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let Some(key) = ctx.key.map(|k| k.id).or(obs.key_id) else {
            return Vec::new();
        };
        let Some(t) = past_end(obs, ctx) else {
            // Only keys in the key tables: ids on log lines come from anyone.
            if let (Some(c), Some(_)) = (obs.country, ctx.key) {
                let v = self.valid_countries.entry(key).or_default();
                if !v.contains(&c) && v.len() < MAX_COUNTRIES {
                    v.push(c);
                }
            }
            return Vec::new();
        };
        let on = match t {
            AlertType::RevokedKeyUse => self.s.revoked,
            _ => self.s.expired,
        };
        if !on {
            return Vec::new();
        }
        let new_place = obs.country.is_some_and(|c| {
            self.valid_countries
                .get(&key)
                .is_some_and(|v| !v.is_empty() && !v.contains(&c))
        });
        let a = self.accounts.entry((t, key)).or_insert_with(|| Account {
            since: obs.at,
            calls: 0,
            failed: 0,
            accepted: 0,
            from_new_place: false,
            ips: TopCounts::default(),
            countries: TopCounts::default(),
        });
        a.since = a.since.min(obs.at);
        a.calls += 1;
        if obs.status >= 400 {
            a.failed += 1;
        } else {
            a.accepted += 1;
        }
        a.from_new_place |= new_place;
        if let Some(ip) = obs.source_ip {
            a.ips.add(&ip.to_string());
        }
        if let Some(c) = obs.country {
            a.countries.add(&country_str(c));
        }
        let severity = match t {
            AlertType::RevokedKeyUse if a.from_new_place || a.accepted > 0 => Severity::High,
            AlertType::RevokedKeyUse => Severity::Medium,
            _ if a.accepted > 0 => Severity::Medium,
            _ => Severity::Low,
        };
        let who = obs
            .key_prefix
            .clone()
            .or_else(|| ctx.key.map(|k| k.prefix.clone()))
            .unwrap_or_else(|| key.to_string());
        let state = if t == AlertType::RevokedKeyUse {
            "revoked"
        } else {
            "expired"
        };
        let from = a
            .countries
            .top(3)
            .iter()
            .map(|c| c.0.clone())
            .collect::<Vec<_>>()
            .join(", ");
        let summary = format!(
            "Key {who} has been used {} times since it {state} (first at {}), {} of them refused{}{}.",
            a.calls,
            a.since.format("%Y-%m-%d %H:%M UTC"),
            a.failed,
            if from.is_empty() {
                String::new()
            } else {
                format!(", from {from}")
            },
            if a.from_new_place {
                ", including a country it was never used from while valid"
            } else {
                ""
            }
        );
        let mut top = a.ips.top(5);
        top.extend(a.countries.top(5));
        let ev = Evidence {
            observed: a.calls as f64,
            threshold: Some(1.0),
            method: match t {
                AlertType::RevokedKeyUse => {
                    "calls after revocation (status, revoked_at or revoked_key)"
                }
                _ => "calls after expires_at (or refused with expired_key)",
            },
            window_secs: (obs.at - a.since).num_seconds().max(0) as u64,
            samples: a.calls,
            top,
            ..Evidence::default()
        };
        let mut f = Finding::new(t, severity, Subject::Key(key), obs.at, summary, ev).about(obs);
        f.started_at = a.since;
        f.key_id = Some(key);
        self.episodes.raise(f).into_iter().collect()
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let done = self.episodes.sweep(now);
        for f in &done {
            if let Subject::Key(k) = f.subject {
                self.accounts.remove(&(f.alert_type, k));
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    #[test]
    fn an_expired_key_gets_one_alert_with_its_count() {
        let mut d = LifecycleDetector::new(LifecycleSettings::default());
        let id = Uuid::from_u128(1);
        let mut info = key_info(id, 60);
        let t0 = t("2026-11-20T12:00:00Z");
        info.expires_at = Some(t0);
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let mut before = ok(t0 - Duration::minutes(1), id);
        before.country = Some(*b"GB");
        assert!(d.observe(&before, &ctx).is_empty(), "still valid");
        let mut out = Vec::new();
        for i in 0..90 {
            let mut o = ok(t0 + Duration::minutes(i), id);
            o.status = 401;
            o.error_code = Some("expired_key".into());
            out.extend(d.observe(&o, &ctx));
        }
        assert_eq!(out.len(), 2, "opened, then one hourly update: {out:?}");
        assert_eq!(out[0].alert_type, AlertType::ExpiredKeyUse);
        assert_eq!(out[0].subject, Subject::Key(id));
        assert_eq!(out[0].severity, Severity::Low);
        assert_eq!(out[1].evidence.observed, 61.0);
        assert_eq!(out[1].started_at, t0);
        assert!(out[1].summary.contains("61 times"), "{}", out[1].summary);
        let done = d.tick(t0 + Duration::hours(26));
        assert_eq!(done.len(), 1);
        assert!(done[0].resolved);
    }

    #[test]
    fn a_revoked_key_from_a_new_country_is_high() {
        let mut d = LifecycleDetector::new(LifecycleSettings::default());
        let id = Uuid::from_u128(2);
        let t0 = t("2026-11-20T12:00:00Z");
        let mut info = key_info(id, 60);
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let mut o = ok(t0, id);
        o.country = Some(*b"GB");
        assert!(d.observe(&o, &ctx).is_empty());
        info.status = "revoked".into();
        info.revoked_at = Some(t0 + Duration::hours(1));
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        let mut o = ok(t0 + Duration::hours(2), id);
        o.status = 401;
        o.error_code = Some("revoked_key".into());
        o.country = Some(*b"GB");
        let out = d.observe(&o, &ctx);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].alert_type, AlertType::RevokedKeyUse);
        assert_eq!(out[0].severity, Severity::Medium);
        o.at += Duration::minutes(1);
        o.country = Some(*b"CN");
        let out = d.observe(&o, &ctx);
        assert_eq!(out.len(), 1, "escalation is sent");
        assert_eq!(out[0].severity, Severity::High);
    }

    #[test]
    fn a_valid_key_raises_nothing() {
        let mut d = LifecycleDetector::new(LifecycleSettings::default());
        let id = Uuid::from_u128(3);
        let mut info = key_info(id, 60);
        let t0 = t("2026-11-20T12:00:00Z");
        info.expires_at = Some(t0 + Duration::days(1));
        let ctx = Context {
            key: Some(&info),
            org: None,
        };
        for i in 0..100 {
            assert!(
                d.observe(&ok(t0 + Duration::minutes(i), id), &ctx)
                    .is_empty()
            );
        }
    }
}
