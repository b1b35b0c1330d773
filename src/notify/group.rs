//! Grouping, with Alertmanager's timers, and the per-receiver rate limit: a pure state machine of
//! alert changes and an injected `now`.
//!
//! Each route puts an alert into the group of its `group_by` label values. A new group waits
//! `group_wait` for its siblings before the first notification; after that, a group that has
//! news (an alert new or more severe, or resolved) is told at most every `group_interval`, and
//! an unchanged group that still fires is told again every `repeat_interval`. A notification
//! says what is new, what is still firing and what resolved. Silenced and inhibited alerts are
//! left out (and told later, as new, if the silence ends while they fire). Above a receiver's
//! hourly limit, notifications are held and sent as one digest when the hour allows.
//!
//! The whole state is serialisable: the dispatcher saves it in the same transaction as the
//! notifications it produced, so a restart neither repeats nor forgets.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::AlertChange;
use super::route::{Route, Router, label};
use crate::detect::Severity;

/// One alert in a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAlert {
    /// The latest change.
    pub change: AlertChange,
    pub firing: bool,
    /// The severity the receiver was last told it fires at; `None`: not told yet.
    pub told: Option<Severity>,
}

/// One group of one route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The route's id (`route`, `routes.N`).
    pub route: String,
    pub receiver: String,
    pub labels: Vec<(String, String)>,
    pub alerts: BTreeMap<String, GroupAlert>,
    pub created_at: DateTime<Utc>,
    pub last_sent_at: Option<DateTime<Utc>>,
}

/// What a notification is to say, before rendering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Draft {
    pub receiver: String,
    /// The route it came from (`route`, `routes.N`); empty for a digest, which goes to the
    /// receiver's own recipients.
    #[serde(default)]
    pub route: String,
    pub group_key: String,
    pub labels: Vec<(String, String)>,
    pub new: Vec<AlertChange>,
    pub still_firing: Vec<AlertChange>,
    pub resolved: Vec<AlertChange>,
    /// For a digest: how many notifications it replaces (0 for a plain one).
    pub digest_of: usize,
}

/// A receiver's recent sends and held drafts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limiter {
    pub recent: Vec<DateTime<Utc>>,
    pub held: Vec<Draft>,
}

/// Decides whether an alert is left out of notifications at `now` (silenced or inhibited).
pub type Muted<'a> = &'a dyn Fn(&AlertChange) -> bool;

fn std(d: std::time::Duration) -> Duration {
    Duration::from_std(d).unwrap_or(Duration::MAX)
}

impl Group {
    fn has_news(&self, route: &Route, muted: Muted<'_>) -> bool {
        self.alerts.values().any(|a| {
            !muted(&a.change)
                && if a.firing {
                    a.told.is_none_or(|t| t < a.change.severity)
                } else {
                    route.send_resolved && a.told.is_some()
                }
        })
    }

    fn any_visible_firing(&self, muted: Muted<'_>) -> bool {
        self.alerts.values().any(|a| a.firing && !muted(&a.change))
    }

    /// When this group is next to be told something, if ever.
    pub fn next_due(&self, route: &Route, muted: Muted<'_>) -> Option<DateTime<Utc>> {
        match self.last_sent_at {
            None => self
                .has_news(route, muted)
                .then(|| self.created_at + std(route.group_wait)),
            Some(last) if self.has_news(route, muted) => Some(last + std(route.group_interval)),
            Some(last) if self.any_visible_firing(muted) => Some(last + std(route.repeat_interval)),
            Some(_) => None,
        }
    }

    /// The notification due at `now`, if any, and the group's state after telling it.
    fn flush(
        &mut self,
        key: &str,
        route: &Route,
        now: DateTime<Utc>,
        muted: Muted<'_>,
    ) -> Option<Draft> {
        let due = self.next_due(route, muted)?;
        if now < due {
            return None;
        }
        let mut d = Draft {
            receiver: self.receiver.clone(),
            route: self.route.clone(),
            group_key: key.to_owned(),
            labels: self.labels.clone(),
            new: vec![],
            still_firing: vec![],
            resolved: vec![],
            digest_of: 0,
        };
        for a in self.alerts.values_mut() {
            if muted(&a.change) {
                continue;
            }
            if a.firing {
                if a.told.is_none_or(|t| t < a.change.severity) {
                    d.new.push(a.change.clone());
                } else {
                    d.still_firing.push(a.change.clone());
                }
                a.told = Some(a.change.severity);
            } else if a.told.is_some() && route.send_resolved {
                d.resolved.push(a.change.clone());
            }
        }
        // Resolved alerts leave the group once told (or when they will never be told).
        self.alerts.retain(|_, a| {
            a.firing || (muted(&a.change) && a.told.is_some() && route.send_resolved)
        });
        self.last_sent_at = Some(now);
        (!d.new.is_empty() || !d.resolved.is_empty() || !d.still_firing.is_empty()).then_some(d)
    }
}

/// Every group, and every receiver's rate limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Grouper {
    pub groups: BTreeMap<String, Group>,
    pub limiters: BTreeMap<String, Limiter>,
}

impl Grouper {
    /// Puts a change into the groups of every route it goes to.
    pub fn add(&mut self, router: &Router, a: &AlertChange, now: DateTime<Utc>) {
        for (id, route) in router.route(a) {
            let labels: Vec<(String, String)> = route
                .group_by
                .iter()
                .map(|l| (l.clone(), label(a, l)))
                .collect();
            let key = format!(
                "{}/{}/{}",
                id.key(),
                route.receiver,
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let g = self.groups.entry(key.clone()).or_insert_with(|| Group {
                route: id.key(),
                receiver: route.receiver.clone(),
                labels,
                alerts: BTreeMap::new(),
                created_at: now,
                last_sent_at: None,
            });
            let firing = a.kind != super::ChangeKind::Resolved;
            match g.alerts.get_mut(&a.fingerprint) {
                Some(ga) => {
                    ga.change = a.clone();
                    ga.firing = firing;
                    // A resolution nobody is to be told of ends the alert's part in the group.
                    if !firing && (ga.told.is_none() || !route.send_resolved) {
                        g.alerts.remove(&a.fingerprint);
                    }
                }
                None if firing => {
                    g.alerts.insert(
                        a.fingerprint.clone(),
                        GroupAlert {
                            change: a.clone(),
                            firing,
                            told: None,
                        },
                    );
                }
                None => {}
            }
            if g.alerts.is_empty() {
                self.groups.remove(&key);
            }
        }
    }

    /// Everything due at `now`: notifications (and digests of held ones), in order. Groups
    /// with nothing left are dropped.
    pub fn step(
        &mut self,
        router: &Router,
        now: DateTime<Utc>,
        muted: Muted<'_>,
        limit: &dyn Fn(&str) -> u32,
    ) -> Vec<Draft> {
        // Groups of a route that no longer exists (alerts.toml changed) are forgotten.
        self.groups.retain(|_, g| {
            router
                .get(&g.route)
                .is_some_and(|r| r.receiver == g.receiver)
        });
        let mut drafts = Vec::new();
        for (key, g) in self.groups.iter_mut() {
            let Some(route) = router.get(&g.route) else {
                continue;
            };
            if let Some(d) = g.flush(key, route, now, muted) {
                drafts.push(d);
            }
        }
        self.groups.retain(|_, g| !g.alerts.is_empty());
        let hour = Duration::hours(1);
        let mut out = Vec::new();
        for d in drafts {
            let l = self.limiters.entry(d.receiver.clone()).or_default();
            l.recent.retain(|t| now - *t < hour);
            if l.held.is_empty() && (l.recent.len() as u32) < limit(&d.receiver) {
                l.recent.push(now);
                out.push(d);
            } else {
                l.held.push(d);
            }
        }
        for (receiver, l) in self.limiters.iter_mut() {
            l.recent.retain(|t| now - *t < hour);
            if !l.held.is_empty() && (l.recent.len() as u32) < limit(receiver) {
                l.recent.push(now);
                out.push(digest(receiver, std::mem::take(&mut l.held)));
            }
        }
        self.limiters
            .retain(|_, l| !l.recent.is_empty() || !l.held.is_empty());
        out
    }

    /// When `step` next has something to do.
    pub fn next_deadline(&self, router: &Router, muted: Muted<'_>) -> Option<DateTime<Utc>> {
        let groups = self
            .groups
            .values()
            .filter_map(|g| g.next_due(router.get(&g.route)?, muted));
        let held = self
            .limiters
            .values()
            .filter(|l| !l.held.is_empty())
            .filter_map(|l| l.recent.iter().min().map(|t| *t + Duration::hours(1)));
        groups.chain(held).min()
    }
}

/// One draft that says everything the held ones said, newest state of each alert.
fn digest(receiver: &str, held: Vec<Draft>) -> Draft {
    let n = held.len();
    let mut new: BTreeMap<String, AlertChange> = BTreeMap::new();
    let mut still: BTreeMap<String, AlertChange> = BTreeMap::new();
    let mut resolved: BTreeMap<String, AlertChange> = BTreeMap::new();
    for d in held {
        for a in d.new {
            resolved.remove(&a.fingerprint);
            new.insert(a.fingerprint.clone(), a);
        }
        for a in d.still_firing {
            if !new.contains_key(&a.fingerprint) {
                still.insert(a.fingerprint.clone(), a);
            }
        }
        for a in d.resolved {
            new.remove(&a.fingerprint);
            still.remove(&a.fingerprint);
            resolved.insert(a.fingerprint.clone(), a);
        }
    }
    Draft {
        receiver: receiver.to_owned(),
        route: String::new(),
        group_key: format!("digest/{receiver}"),
        labels: vec![],
        new: new.into_values().collect(),
        still_firing: still.into_values().collect(),
        resolved: resolved.into_values().collect(),
        digest_of: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::ChangeKind;
    use crate::notify::route::Route;

    fn t0() -> DateTime<Utc> {
        "2026-12-01T10:00:00Z".parse().unwrap()
    }

    fn change(t: &str, key: &str, sev: Severity, kind: ChangeKind) -> AlertChange {
        AlertChange {
            kind,
            fingerprint: format!("{t}/key:{key}"),
            alert_type: t.into(),
            severity: sev,
            key_id: Some(key.into()),
            key_prefix: None,
            key_name: None,
            org_id: Some("org1".into()),
            source_ip: None,
            started_at: t0(),
            at: t0(),
            summary: format!("{t} on {key}"),
            evidence: serde_json::Value::Null,
        }
    }

    fn router() -> Router {
        Router {
            default: Route::default(),
            routes: vec![],
        }
    }

    const NONE: &dyn Fn(&AlertChange) -> bool = &|_| false;
    const LIMIT: &dyn Fn(&str) -> u32 = &|_| 20;

    fn fps(v: &[AlertChange]) -> Vec<&str> {
        v.iter().map(|a| a.fingerprint.as_str()).collect()
    }

    #[test]
    fn a_group_waits_then_says_what_is_new_still_firing_and_resolved() {
        let r = router();
        let mut g = Grouper::default();
        let s = |secs| t0() + Duration::seconds(secs);
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Opened),
            s(0),
        );
        assert!(
            g.step(&r, s(10), NONE, LIMIT).is_empty(),
            "group_wait is 30 s"
        );
        g.add(
            &r,
            &change("rate_spike", "b", Severity::Medium, ChangeKind::Opened),
            s(20),
        );
        assert_eq!(g.next_deadline(&r, NONE), Some(s(30)));
        let d = g.step(&r, s(30), NONE, LIMIT);
        assert_eq!(d.len(), 1, "one notification for the group");
        assert_eq!(fps(&d[0].new), ["rate_spike/key:a", "rate_spike/key:b"]);
        // Nothing new: the next message is the repeat, 4 h later.
        assert_eq!(g.next_deadline(&r, NONE), Some(s(30 + 4 * 3600)));
        g.add(
            &r,
            &change("rate_spike", "c", Severity::Low, ChangeKind::Opened),
            s(60),
        );
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Resolved),
            s(70),
        );
        assert!(
            g.step(&r, s(200), NONE, LIMIT).is_empty(),
            "group_interval is 5 min"
        );
        let d = g.step(&r, s(330), NONE, LIMIT);
        assert_eq!(fps(&d[0].new), ["rate_spike/key:c"]);
        assert_eq!(fps(&d[0].still_firing), ["rate_spike/key:b"]);
        assert_eq!(fps(&d[0].resolved), ["rate_spike/key:a"]);
        // The repeat tells what still fires, and nothing as new.
        let d = g.step(&r, s(330 + 4 * 3600), NONE, LIMIT);
        assert_eq!(d.len(), 1);
        assert!(d[0].new.is_empty());
        assert_eq!(
            fps(&d[0].still_firing),
            ["rate_spike/key:b", "rate_spike/key:c"]
        );
        // A raised severity is news again.
        g.add(
            &r,
            &change(
                "rate_spike",
                "b",
                Severity::Critical,
                ChangeKind::SeverityRaised,
            ),
            s(20_000),
        );
        let d = g.step(&r, s(330 + 4 * 3600 + 300), NONE, LIMIT);
        assert_eq!(fps(&d[0].new), ["rate_spike/key:b"]);
    }

    #[test]
    fn groups_split_by_type_and_an_alert_resolved_before_its_first_message_is_never_sent() {
        let r = router();
        let mut g = Grouper::default();
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Opened),
            t0(),
        );
        g.add(
            &r,
            &change("new_country", "a", Severity::High, ChangeKind::Opened),
            t0(),
        );
        g.add(
            &r,
            &change("new_country", "a", Severity::High, ChangeKind::Resolved),
            t0(),
        );
        let d = g.step(&r, t0() + Duration::seconds(30), NONE, LIMIT);
        assert_eq!(d.len(), 1);
        assert_eq!(fps(&d[0].new), ["rate_spike/key:a"]);
        assert_eq!(g.groups.len(), 1, "the empty group is gone");
        // Resolving the last alert sends the resolution, then the group is gone.
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Resolved),
            t0(),
        );
        let d = g.step(&r, t0() + Duration::minutes(6), NONE, LIMIT);
        assert_eq!(fps(&d[0].resolved), ["rate_spike/key:a"]);
        assert!(g.groups.is_empty());
        assert_eq!(g.next_deadline(&r, NONE), None);
    }

    #[test]
    fn send_resolved_false_keeps_resolutions_quiet() {
        let mut r = router();
        r.default.send_resolved = false;
        let mut g = Grouper::default();
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Opened),
            t0(),
        );
        assert_eq!(
            g.step(&r, t0() + Duration::seconds(30), NONE, LIMIT).len(),
            1
        );
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Resolved),
            t0(),
        );
        assert!(
            g.step(&r, t0() + Duration::hours(5), NONE, LIMIT)
                .is_empty()
        );
        assert!(g.groups.is_empty());
    }

    #[test]
    fn muted_alerts_are_left_out_and_told_as_new_when_the_silence_ends() {
        let r = router();
        let mut g = Grouper::default();
        let silenced = std::cell::Cell::new(true);
        let muted = |a: &AlertChange| silenced.get() && a.alert_type == "rate_spike";
        g.add(
            &r,
            &change("rate_spike", "a", Severity::High, ChangeKind::Opened),
            t0(),
        );
        assert!(
            g.step(&r, t0() + Duration::seconds(30), &muted, LIMIT)
                .is_empty()
        );
        assert_eq!(
            g.next_deadline(&r, &muted),
            None,
            "nothing to do while silenced"
        );
        silenced.set(false);
        let d = g.step(&r, t0() + Duration::seconds(60), &muted, LIMIT);
        assert_eq!(fps(&d[0].new), ["rate_spike/key:a"]);
    }

    #[test]
    fn above_the_hourly_limit_one_digest_is_sent_when_the_hour_allows() {
        let mut r = router();
        r.default.group_by = vec!["fingerprint".into()];
        r.default.group_wait = std::time::Duration::ZERO;
        let mut g = Grouper::default();
        let limit: &dyn Fn(&str) -> u32 = &|_| 2;
        let mut sent = 0;
        for i in 0..5 {
            let at = t0() + Duration::minutes(i);
            g.add(
                &r,
                &change(
                    "rate_spike",
                    &format!("k{i}"),
                    Severity::High,
                    ChangeKind::Opened,
                ),
                at,
            );
            sent += g.step(&r, at, NONE, limit).len();
        }
        assert_eq!(sent, 2, "two within the hour");
        assert_eq!(g.next_deadline(&r, NONE), Some(t0() + Duration::hours(1)));
        let d = g.step(&r, t0() + Duration::hours(1), NONE, limit);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].digest_of, 3);
        assert_eq!(d[0].new.len(), 3);
        // The state survives a round trip through JSON (the dispatcher stores it).
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<Grouper>(&json).unwrap(), g);
    }
}
