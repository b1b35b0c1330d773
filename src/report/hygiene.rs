//! Key hygiene: the auth server documentation's "security best practices", checked against
//! what keys are and how they were used.
//!
//! Owns the rules and their thresholds, as a pure function of keys, usage facts and `now`
//! ([`findings`]); [`hygiene`] only gathers those facts from the store.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::keys::{KeyCache, KeyInfo};
use crate::store::{SegmentQuery, Store, StoreError};
use crate::usage::Granularity;

/// The documentation's longest recommended lifetime ("Long-term: 1 year max").
const MAX_LIFETIME_DAYS: i64 = 365;
/// How soon an expiry must be for a key still in use to be flagged.
const EXPIRY_WARNING_DAYS: i64 = 7;
/// The window of "unused" and of "MCPs used".
const USE_WINDOW_DAYS: i64 = 30;
/// A key with access to all MCPs that used at most this many is worth narrowing.
const NARROW_AT_MOST: usize = 2;

/// One broken practice of one key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub key_id: Uuid,
    pub key_prefix: String,
    pub key_name: String,
    pub org_id: Uuid,
    /// `no_expiry`, `long_lived`, `expiring_in_use`, `unused`, `narrow_mcps` or
    /// `rotation_unfinished`.
    pub check: &'static str,
    pub detail: String,
    /// For `narrow_mcps`: the MCPs to narrow the key to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub suggested_mcps: Vec<String>,
}

/// What was seen of a key's use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyUse {
    /// The start of the newest hour with a request.
    pub last_used: Option<DateTime<Utc>>,
    /// MCPs used in the last [`USE_WINDOW_DAYS`] days.
    pub recent_mcps: BTreeSet<String>,
}

fn is_live(k: &KeyInfo, now: DateTime<Utc>) -> bool {
    k.status == "active" && k.revoked_at.is_none() && k.expires_at.is_none_or(|e| e > now)
}

/// The hygiene findings of `keys`, given their use, at `now`. Revoked and expired keys are
/// not checked: nothing can be done with them any more.
pub fn findings(
    keys: &[&KeyInfo],
    uses: &BTreeMap<Uuid, KeyUse>,
    now: DateTime<Utc>,
) -> Vec<Finding> {
    let none = KeyUse::default();
    let mut out = Vec::new();
    let window = now - Duration::days(USE_WINDOW_DAYS);
    for k in keys.iter().copied().filter(|k| is_live(k, now)) {
        let u = uses.get(&k.id).unwrap_or(&none);
        let mut push = |check: &'static str, detail: String, suggested_mcps: Vec<String>| {
            out.push(Finding {
                key_id: k.id,
                key_prefix: k.prefix.clone(),
                key_name: k.name.clone(),
                org_id: k.org_id,
                check,
                detail,
                suggested_mcps,
            })
        };
        match (k.expires_at, k.created_at) {
            (None, _) => push(
                "no_expiry",
                "the key never expires; set an expiry (90 days for regular rotation)".into(),
                vec![],
            ),
            (Some(e), Some(c)) if e - c > Duration::days(MAX_LIFETIME_DAYS) => push(
                "long_lived",
                format!(
                    "the key is valid for {} days, more than the recommended 1 year",
                    (e - c).num_days()
                ),
                vec![],
            ),
            _ => {}
        }
        if let Some(e) = k.expires_at
            && e - now <= Duration::days(EXPIRY_WARNING_DAYS)
            && u.last_used
                .is_some_and(|l| l >= now - Duration::days(EXPIRY_WARNING_DAYS))
        {
            push(
                "expiring_in_use",
                format!(
                    "the key expires at {} and is still in use; rotate it now",
                    e.to_rfc3339()
                ),
                vec![],
            );
        }
        if k.created_at.is_none_or(|c| c <= window) && u.last_used.is_none_or(|l| l < window) {
            push(
                "unused",
                format!("the key has not been used for {USE_WINDOW_DAYS} days; revoke it"),
                vec![],
            );
        }
        if k.mcp_access_mode == "all"
            && u.last_used.is_some_and(|l| l >= window)
            && u.recent_mcps.len() <= NARROW_AT_MOST
        {
            let mcps: Vec<String> = u.recent_mcps.iter().cloned().collect();
            push(
                "narrow_mcps",
                format!(
                    "the key may use every MCP but used only {} in {USE_WINDOW_DAYS} days; limit it to those",
                    if mcps.is_empty() {
                        "none by name".to_owned()
                    } else {
                        mcps.join(", ")
                    }
                ),
                mcps,
            );
        }
        let newer = keys.iter().filter(|n| {
            n.id != k.id
                && n.org_id == k.org_id
                && n.name == k.name
                && is_live(n, now)
                && matches!((n.created_at, k.created_at), (Some(a), Some(b)) if a > b)
        });
        if let Some(n) = newer.max_by_key(|n| n.created_at)
            && let (Some(created), Some(last)) = (n.created_at, u.last_used)
            && last >= Granularity::Hour.truncate(created)
        {
            push(
                "rotation_unfinished",
                format!(
                    "a newer key with the same name ({}) was created at {}, but this one is still in use; move the rest of its users and revoke it",
                    n.prefix,
                    created.to_rfc3339()
                ),
                vec![],
            );
        }
    }
    out
}

/// The hygiene findings of one organization's keys (every key with `org` `None`) at `now`.
pub async fn hygiene(
    store: &Store,
    cache: &KeyCache,
    org: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<Vec<Finding>, StoreError> {
    let mut keys: Vec<&KeyInfo> = cache
        .keys()
        .map(|k| &**k)
        .filter(|k| org.is_none_or(|o| o == k.org_id))
        .collect();
    keys.sort_by(|a, b| {
        a.org_id
            .cmp(&b.org_id)
            .then(a.name.cmp(&b.name))
            .then(a.id.cmp(&b.id))
    });
    let mut uses: BTreeMap<Uuid, KeyUse> = BTreeMap::new();
    for (k, at) in store.keys_last_used().await? {
        if let Ok(id) = Uuid::try_parse(&k) {
            uses.entry(id).or_default().last_used = Some(at);
        }
    }
    let from = now - Duration::days(USE_WINDOW_DAYS);
    for (g, from, until) in super::segments(from, now, Granularity::Day) {
        let seg = SegmentQuery {
            granularity: g,
            from,
            until,
            org: org.map(|o| o.hyphenated().to_string()),
            key: None,
            mcp: None,
            mcps: None,
            by_key: true,
            by_org: false,
            by_mcp: true,
            by_bucket: false,
        };
        for agg in store.usage_segment(&seg).await? {
            if let (Some(Ok(id)), Some(mcp)) = (agg.key_id.as_deref().map(Uuid::try_parse), agg.mcp)
                && agg.counters.requests > 0
                && !mcp.is_empty()
            {
                uses.entry(id).or_default().recent_mcps.insert(mcp);
            }
        }
    }
    Ok(findings(&keys, &uses, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn each_practice_is_checked() {
        let now = t("2026-11-20T12:00:00Z");
        let org = Uuid::new_v4();
        let mk = |name: &str, created: &str, expires: Option<&str>| {
            let mut k = KeyInfo::for_test(Uuid::new_v4(), org, "pmcp_01aaaaaaaaaaa...", 60);
            k.name = name.into();
            k.created_at = Some(t(created));
            k.expires_at = expires.map(t);
            k
        };
        let forever = mk("forever", "2026-01-01T00:00:00Z", None);
        let long = mk("long", "2026-01-01T00:00:00Z", Some("2027-06-01T00:00:00Z"));
        let soon = mk("soon", "2026-09-01T00:00:00Z", Some("2026-11-23T00:00:00Z"));
        let old = mk("ci", "2026-08-01T00:00:00Z", Some("2026-12-30T00:00:00Z"));
        let new = mk("ci", "2026-11-10T00:00:00Z", Some("2027-02-01T00:00:00Z"));
        let mut revoked = mk("gone", "2026-01-01T00:00:00Z", None);
        revoked.revoked_at = Some(t("2026-02-01T00:00:00Z"));
        let used = |at: &str, mcps: &[&str]| KeyUse {
            last_used: Some(t(at)),
            recent_mcps: mcps.iter().map(|m| m.to_string()).collect(),
        };
        let uses: BTreeMap<Uuid, KeyUse> = [
            (forever.id, used("2026-11-20T10:00:00Z", &["a", "b", "c"])),
            (soon.id, used("2026-11-19T10:00:00Z", &["github"])),
            (old.id, used("2026-11-19T00:00:00Z", &["a", "b", "c"])),
            (new.id, used("2026-11-20T00:00:00Z", &["a", "b", "c"])),
        ]
        .into_iter()
        .collect();
        let keys = [&forever, &long, &soon, &old, &new, &revoked];
        let got: Vec<(String, &str)> = findings(&keys, &uses, now)
            .into_iter()
            .map(|f| (f.key_name, f.check))
            .collect();
        let want: Vec<(String, &str)> = [
            ("forever", "no_expiry"),
            ("long", "long_lived"),
            ("long", "unused"),
            ("soon", "expiring_in_use"),
            ("soon", "narrow_mcps"),
            ("ci", "rotation_unfinished"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b))
        .collect();
        assert_eq!(got, want);
        let narrow = findings(&[&soon], &uses, now);
        assert_eq!(narrow[1].suggested_mcps, vec!["github".to_owned()]);
    }
}
