//! `key_in_logs`: a full key (the 87-character format) in any logged string field.
//!
//! Owns recognising a full key and naming the field it was in. It does not redact: the
//! pipeline redacts every field (`keys::redact_keys`) before anything is stored or sent, and
//! this detector runs on the observation before that, so the finding carries only the key's
//! stored prefix and id, never the key.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    TopCounts,
};
use crate::keys::{KEY_LEN, KEY_PREFIX, STORED_PREFIX_LEN};

/// Hex characters after `pmcp_` in a full key.
const KEY_HEX: usize = KEY_LEN - KEY_PREFIX.len();

/// Settings of `key_in_logs`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretSettings {
    /// Whether the detector runs at all.
    pub enabled: bool,
    /// An alert closes after this long without another sighting.
    pub recovery_hours: u32,
}

impl Default for SecretSettings {
    fn default() -> SecretSettings {
        SecretSettings {
            enabled: true,
            recovery_hours: 24,
        }
    }
}

/// A full key found in text: its stored prefix and, where the payload carries one, its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundKey {
    /// The key's stored prefix: safe to show.
    pub prefix: String,
    /// The key id the payload embeds.
    pub key_id: Option<Uuid>,
}

/// The first full key in `text`: `pmcp_` and 82 lowercase hex characters. A longer hex run
/// still counts (a key glued to other hex is still a leaked key); a shorter one is a prefix
/// and does not.
pub fn find_full_key(text: &str) -> Option<FoundKey> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(pos) = text[from..].find(KEY_PREFIX) {
        let start = from + pos;
        let hex_start = start + KEY_PREFIX.len();
        let run = bytes[hex_start..]
            .iter()
            .take_while(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .count();
        if run >= KEY_HEX {
            let key = &text[start..start + KEY_LEN];
            // Payload: 2 version characters, then the key id as 32 hex.
            let key_id = Uuid::try_parse(&key[KEY_PREFIX.len() + 2..KEY_PREFIX.len() + 34]).ok();
            return Some(FoundKey {
                prefix: format!("{}...", &key[..STORED_PREFIX_LEN - 3]),
                key_id,
            });
        }
        from = hex_start + run;
    }
    None
}

/// Detects full keys in logged fields. See the module documentation.
#[derive(Debug)]
pub struct SecretDetector {
    episodes: Episodes,
    fields: HashMap<Subject, TopCounts>,
}

impl SecretDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: SecretSettings) -> SecretDetector {
        SecretDetector {
            episodes: Episodes::new(
                Duration::hours(i64::from(s.recovery_hours.max(1))),
                Duration::hours(24),
            ),
            fields: HashMap::new(),
        }
    }
}

impl Detector for SecretDetector {
    fn observe(&mut self, obs: &Observation, _ctx: &Context<'_>) -> Vec<Finding> {
        let fields: [(&'static str, Option<&str>); 6] = [
            ("key_prefix", obs.key_prefix.as_deref()),
            ("user_agent", obs.user_agent.as_deref()),
            ("origin", obs.origin.as_deref()),
            ("mcp_server_name", obs.mcp.as_deref()),
            ("error_code", obs.error_code.as_deref()),
            ("city", obs.city.as_deref()),
        ];
        let mut out = Vec::new();
        for (field, value) in fields {
            let Some(found) = value.and_then(find_full_key) else {
                continue;
            };
            let subject = match found.key_id.or(obs.key_id) {
                Some(id) => Subject::Key(id),
                None => Subject::Prefix(found.prefix.clone()),
            };
            let counts = self.fields.entry(subject.clone()).or_default();
            counts.add(field);
            let seen: u64 = counts.top(16).iter().map(|e| e.1).sum();
            let summary = format!(
                "A full API key ({}) appeared in the {field} field of a logged request; treat it as exposed and rotate it.",
                found.prefix
            );
            let ev = Evidence {
                observed: seen as f64,
                threshold: Some(1.0),
                method: "pmcp_ followed by 82 lowercase hex characters in a logged field",
                samples: seen,
                top: counts.top(6),
                ..Evidence::default()
            };
            let mut f = Finding::new(
                AlertType::KeyInLogs,
                Severity::High,
                subject,
                obs.at,
                summary,
                ev,
            )
            .about(obs);
            f.key_id = found.key_id.or(obs.key_id);
            f.key_prefix = Some(found.prefix);
            out.extend(self.episodes.raise(f));
        }
        out
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        let done = self.episodes.sweep(now);
        for f in &done {
            self.fields.remove(&f.subject);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    fn full_key(id: Uuid) -> String {
        format!("pmcp_01{}{}", id.simple(), "ab".repeat(24))
    }

    #[test]
    fn finds_only_full_keys() {
        let id = Uuid::from_u128(0x9a41_c2e7_f0aa_4c55_9c0b_3333_3333_3333);
        let key = full_key(id);
        assert_eq!(key.len(), KEY_LEN);
        let found = find_full_key(&format!("curl/8 token={key};")).unwrap();
        assert_eq!(found.key_id, Some(id));
        assert_eq!(found.prefix, format!("{}...", &key[..17]));
        assert_eq!(
            find_full_key("pmcp_019a41c2e7f0..."),
            None,
            "a stored prefix"
        );
        assert_eq!(find_full_key(&key[..86]), None, "one character short");
        assert_eq!(
            find_full_key(&key.to_uppercase().replace("PMCP_", "pmcp_")),
            None
        );
        assert!(find_full_key(&format!("pmcp_ pmcp_12 {key}")).is_some());
        assert_eq!(find_full_key(""), None);
    }

    #[test]
    fn a_key_in_the_user_agent_names_the_field_and_not_the_key() {
        let mut d = SecretDetector::new(SecretSettings::default());
        let id = Uuid::from_u128(5);
        let key = full_key(id);
        let t0 = t("2026-11-20T12:00:00Z");
        let mut o = ok(t0, Uuid::from_u128(99));
        o.user_agent = Some(format!("my-script/1.0 (key {key})"));
        let out = d.observe(&o, &Context::default());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].alert_type, AlertType::KeyInLogs);
        assert_eq!(out[0].subject, Subject::Key(id));
        assert!(out[0].summary.contains("user_agent"));
        let json = serde_json::to_string(&out[0]).unwrap();
        assert!(
            !json.contains(&key[20..]),
            "the finding never carries the key"
        );
        // Seen again: still one alert.
        o.at += Duration::minutes(1);
        assert!(d.observe(&o, &Context::default()).is_empty());
        assert_eq!(d.tick(t0 + Duration::hours(25)).len(), 1);
        // Ordinary traffic: nothing.
        assert!(d.observe(&ok(t0, id), &Context::default()).is_empty());
    }
}
