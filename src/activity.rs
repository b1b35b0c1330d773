//! Who used a key from where: per key and day, the IPs, countries, cities, networks and user
//! agents seen, each with its first and last time and its requests.
//!
//! Owns the bound on what is kept: at most [`VALUES_PER_DAY`] distinct values of each facet
//! per key and day (the rest count under [`OTHER`]), values cut to [`MAX_VALUE_LEN`]
//! characters, and days older than [`RETENTION_DAYS`] deleted at commit. It is pure: the
//! pipeline feeds it and the store writes what it collected.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::usage::Granularity;

/// Distinct values of one facet kept per key and day.
pub const VALUES_PER_DAY: usize = 50;
/// The value the rest of a day's values count under, once the bound is reached.
pub const OTHER: &str = "(other)";
/// Longest value kept, in characters (user agents can be long).
pub const MAX_VALUE_LEN: usize = 200;
/// Days of activity kept.
pub const RETENTION_DAYS: i64 = 90;

/// What is recorded of each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Facet {
    Ip,
    Country,
    City,
    Network,
    UserAgent,
}

impl Facet {
    pub const ALL: [Facet; 5] = [
        Facet::Ip,
        Facet::Country,
        Facet::City,
        Facet::Network,
        Facet::UserAgent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Facet::Ip => "ip",
            Facet::Country => "country",
            Facet::City => "city",
            Facet::Network => "network",
            Facet::UserAgent => "user_agent",
        }
    }

    pub fn parse(s: &str) -> Option<Facet> {
        Facet::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// One row of the activity table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActivityKey {
    pub key_id: Uuid,
    pub day: DateTime<Utc>,
    pub facet: Facet,
    /// Shared with the tracker's set of kept values: counting a value seen before allocates
    /// nothing.
    pub value: Arc<str>,
}

/// What a row adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub requests: u64,
}

/// The hash of the per-line maps here: seeded, and far cheaper than SipHash.
type Hash = foldhash::quality::RandomState;

/// The values one key-day keeps of one facet.
type Kept = HashSet<Arc<str>, Hash>;

/// Activity counted since the last commit.
pub type Activity = HashMap<ActivityKey, Seen, Hash>;

/// Remembers which values each key-day already keeps, across commits, so the bound holds
/// for a whole day and not only for one batch.
#[derive(Debug)]
pub struct ActivityTracker {
    kept: HashMap<(Uuid, DateTime<Utc>, Facet), Kept, Hash>,
    other: Arc<str>,
}

impl Default for ActivityTracker {
    fn default() -> ActivityTracker {
        ActivityTracker {
            kept: HashMap::default(),
            other: Arc::from(OTHER),
        }
    }
}

impl ActivityTracker {
    /// Counts one request of `key_id` at `at` with `value` for `facet` into `out`.
    pub fn record(
        &mut self,
        out: &mut Activity,
        key_id: Uuid,
        at: DateTime<Utc>,
        facet: Facet,
        value: &str,
    ) {
        let day = Granularity::Day.truncate(at);
        // User agents come from clients, and some paste their key into them.
        let redacted = crate::keys::redact_keys(value);
        let value = redacted.as_deref().unwrap_or(value);
        let value = match value.char_indices().nth(MAX_VALUE_LEN) {
            Some((end, _)) => &value[..end],
            None => value,
        };
        let kept = self.kept.entry((key_id, day, facet)).or_default();
        let value = match kept.get(value) {
            Some(v) => Arc::clone(v),
            None if kept.len() < VALUES_PER_DAY => {
                let v: Arc<str> = Arc::from(value);
                kept.insert(Arc::clone(&v));
                v
            }
            None => Arc::clone(&self.other),
        };
        out.entry(ActivityKey {
            key_id,
            day,
            facet,
            value,
        })
        .and_modify(|s| {
            s.first = s.first.min(at);
            s.last = s.last.max(at);
            s.requests += 1;
        })
        .or_insert(Seen {
            first: at,
            last: at,
            requests: 1,
        });
    }

    /// Forgets the days more than two days before `watermark`: late lines for them still
    /// count, but without the bound's memory (the store's retention bounds them too).
    pub fn forget_before(&mut self, watermark: DateTime<Utc>) {
        let cutoff = Granularity::Day.truncate(watermark) - Duration::days(2);
        self.kept.retain(|(_, day, _), _| *day >= cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_day_keeps_a_bounded_set_of_values() {
        let mut t = ActivityTracker::default();
        let mut out = Activity::default();
        let key = Uuid::new_v4();
        let at: DateTime<Utc> = "2026-11-20T12:00:00Z".parse().unwrap();
        for i in 0..VALUES_PER_DAY + 10 {
            t.record(&mut out, key, at, Facet::Ip, &format!("10.0.0.{i}"));
        }
        // A value already kept keeps counting under its own name after the bound.
        t.record(
            &mut out,
            key,
            at + Duration::minutes(5),
            Facet::Ip,
            "10.0.0.0",
        );
        assert_eq!(out.len(), VALUES_PER_DAY + 1);
        let other = ActivityKey {
            key_id: key,
            day: Granularity::Day.truncate(at),
            facet: Facet::Ip,
            value: OTHER.into(),
        };
        assert_eq!(out[&other].requests, 10);
        let first = ActivityKey {
            value: "10.0.0.0".into(),
            ..other.clone()
        };
        assert_eq!(out[&first].requests, 2);
        assert_eq!(out[&first].last, at + Duration::minutes(5));
        // A new day starts a new set.
        let mut next = Activity::default();
        t.record(
            &mut next,
            key,
            at + Duration::days(1),
            Facet::Ip,
            "10.9.9.9",
        );
        assert_eq!(next.len(), 1);
        t.forget_before(at + Duration::days(5));
        assert!(t.kept.is_empty());
        let long = "x".repeat(MAX_VALUE_LEN * 2);
        t.record(&mut next, key, at, Facet::UserAgent, &long);
        assert!(next.keys().any(|k| k.value.len() == MAX_VALUE_LEN));
    }
}
