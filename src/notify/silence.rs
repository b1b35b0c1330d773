//! Silences and inhibition: which alerts are recorded but not sent. A silence mutes alerts that
//! match its matchers until it expires (from `alerts.toml` or `keywatch silence add`). A firing
//! critical alert for a key (`revoked_key_use`, for example) inhibits the lesser alerts of that
//! key: the person already has the one that matters. Pure: `now` is passed in.

use chrono::{DateTime, Utc};

use super::AlertChange;
use super::route::Matchers;
use crate::detect::Severity;

/// One silence.
#[derive(Debug, Clone, PartialEq)]
pub struct Silence {
    /// A uuid for stored silences, `alerts.toml#N` for the file's.
    pub id: String,
    pub matchers: Matchers,
    pub reason: String,
    pub expires_at: DateTime<Utc>,
}

impl Silence {
    /// Whether this silence mutes `a` at `now`.
    pub fn mutes(&self, a: &AlertChange, now: DateTime<Utc>) -> bool {
        now < self.expires_at && self.matchers.matches(a)
    }
}

/// Whether `a` is an inhibiting alert: critical, or a revoked key in use.
pub fn inhibits_others(a: &AlertChange) -> bool {
    a.severity >= Severity::Critical || a.alert_type == "revoked_key_use"
}

/// The keys with a firing inhibiting alert, which hold back that key's other alerts.
#[derive(Debug, Default, Clone)]
pub struct Inhibitors {
    keys: std::collections::HashMap<String, std::collections::HashSet<String>>,
}

impl Inhibitors {
    /// Notes that `a` fires (or resolved): only inhibiting alerts with a key count.
    pub fn observe(&mut self, a: &AlertChange) {
        let Some(key) = a.key_id.as_ref().or(a.key_prefix.as_ref()) else {
            return;
        };
        if !inhibits_others(a) {
            return;
        }
        let set = self.keys.entry(key.clone()).or_default();
        if a.kind == super::ChangeKind::Resolved {
            set.remove(&a.fingerprint);
            if set.is_empty() {
                self.keys.remove(key);
            }
        } else {
            set.insert(a.fingerprint.clone());
        }
    }

    /// Whether `a` is held back by an inhibiting alert of the same key (never an inhibiting
    /// alert itself).
    pub fn inhibits(&self, a: &AlertChange) -> bool {
        if inhibits_others(a) {
            return false;
        }
        [a.key_id.as_ref(), a.key_prefix.as_ref()]
            .into_iter()
            .flatten()
            .any(|k| self.keys.get(k).is_some_and(|s| !s.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::ChangeKind;
    use crate::notify::test_support::change;

    #[test]
    fn a_silence_mutes_until_it_expires() {
        let now = Utc::now();
        let s = Silence {
            id: "x".into(),
            matchers: Matchers {
                types: vec!["rate_spike".into()],
                ..Matchers::default()
            },
            reason: "load test".into(),
            expires_at: now + chrono::Duration::hours(1),
        };
        let a = change("rate_spike", Severity::High, ChangeKind::Opened);
        assert!(s.mutes(&a, now));
        assert!(!s.mutes(&a, now + chrono::Duration::hours(2)));
        assert!(!s.mutes(
            &change("new_country", Severity::High, ChangeKind::Opened),
            now
        ));
    }

    #[test]
    fn a_critical_alert_inhibits_lesser_alerts_of_its_key_until_it_resolves() {
        let mut i = Inhibitors::default();
        let spike = change("rate_spike", Severity::High, ChangeKind::Opened);
        assert!(!i.inhibits(&spike));
        i.observe(&change(
            "revoked_key_use",
            Severity::Critical,
            ChangeKind::Opened,
        ));
        assert!(i.inhibits(&spike));
        assert!(!i.inhibits(&change(
            "key_in_logs",
            Severity::Critical,
            ChangeKind::Opened
        )));
        i.observe(&change(
            "revoked_key_use",
            Severity::Critical,
            ChangeKind::Resolved,
        ));
        assert!(!i.inhibits(&spike));
        // revoked_key_use inhibits at the severity the lifecycle detector gives it.
        i.observe(&change(
            "revoked_key_use",
            Severity::Medium,
            ChangeKind::Opened,
        ));
        assert!(i.inhibits(&spike));
        let mut other_key = spike.clone();
        other_key.key_id = Some("k2".into());
        other_key.key_prefix = Some("pmcp_k2".into());
        assert!(!i.inhibits(&other_key));
    }
}
