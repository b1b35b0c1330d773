//! Routing: which receivers an alert change goes to, with Alertmanager's semantics. The routes
//! of `[[routes]]` are tried in order; the first that matches takes the alert, and matching stops
//! there unless that route says `continue = true`. An alert no route took goes to the default
//! route (`[route]`). Pure: no I/O, no clock.

use std::time::Duration;

use crate::detect::Severity;

use super::AlertChange;

/// What a route or silence matches. Each non-empty list must contain the alert's value; an
/// empty list matches anything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matchers {
    pub types: Vec<String>,
    pub severities: Vec<Severity>,
    pub orgs: Vec<String>,
    /// Key ids or key prefixes.
    pub keys: Vec<String>,
}

impl Matchers {
    /// Whether nothing is constrained.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
            && self.severities.is_empty()
            && self.orgs.is_empty()
            && self.keys.is_empty()
    }

    /// Whether `a` satisfies every matcher.
    pub fn matches(&self, a: &AlertChange) -> bool {
        let any = |list: &[String], v: Option<&str>| {
            list.is_empty() || v.is_some_and(|v| list.iter().any(|x| x.eq_ignore_ascii_case(v)))
        };
        any(&self.types, Some(&a.alert_type))
            && (self.severities.is_empty() || self.severities.contains(&a.severity))
            && any(&self.orgs, a.org_id.as_deref())
            && (any(&self.keys, a.key_id.as_deref()) || any(&self.keys, a.key_prefix.as_deref()))
    }
}

/// The severity named `s`.
pub fn parse_severity(s: &str) -> Option<Severity> {
    [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ]
    .into_iter()
    .find(|v| v.as_str() == s)
}

/// One route, validated: where its alerts go and how they are grouped and timed.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub receiver: String,
    pub matchers: Matchers,
    pub continue_matching: bool,
    pub group_by: Vec<String>,
    /// How long a new group waits for more alerts before its first notification.
    pub group_wait: Duration,
    /// How long a group waits after a notification before telling what changed.
    pub group_interval: Duration,
    /// How often an unchanged, still-firing group is told again.
    pub repeat_interval: Duration,
    pub send_resolved: bool,
    /// Email addresses that replace the receiver's `to` for this route's notifications.
    pub to: Vec<String>,
    /// Also send each group to the address its organization stored
    /// (`keywatch orgs set-alert-email`); such a route groups by organization.
    pub to_org: bool,
}

impl Default for Route {
    fn default() -> Route {
        Route {
            receiver: "email".into(),
            matchers: Matchers::default(),
            continue_matching: false,
            group_by: vec!["org".into(), "type".into()],
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(300),
            repeat_interval: Duration::from_secs(4 * 3600),
            send_resolved: true,
            to: vec![],
            to_org: false,
        }
    }
}

/// Where a route is in the configuration: the default route, or the n-th of `[[routes]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Default,
    Child(usize),
}

impl RouteId {
    /// A short stable name, part of a group's key.
    pub fn key(self) -> String {
        match self {
            RouteId::Default => "route".into(),
            RouteId::Child(i) => format!("routes.{i}"),
        }
    }
}

/// The routing tree: ordered child routes and the default route.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Router {
    pub default: Route,
    pub routes: Vec<Route>,
}

impl Router {
    /// The routes `a` goes to, in order.
    pub fn route(&self, a: &AlertChange) -> Vec<(RouteId, &Route)> {
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.matchers.matches(a) {
                out.push((RouteId::Child(i), r));
                if !r.continue_matching {
                    return out;
                }
            }
        }
        if out.is_empty() {
            out.push((RouteId::Default, &self.default));
        }
        out
    }

    /// The route `id` names, if it still exists.
    pub fn get(&self, id: &str) -> Option<&Route> {
        if id == "route" {
            return Some(&self.default);
        }
        let i: usize = id.strip_prefix("routes.")?.parse().ok()?;
        self.routes.get(i)
    }
}

/// The value of a group label for `a`.
pub fn label(a: &AlertChange, name: &str) -> String {
    match name {
        "org" => a.org_id.clone().unwrap_or_default(),
        "type" => a.alert_type.clone(),
        "key" => a
            .key_id
            .clone()
            .or_else(|| a.key_prefix.clone())
            .unwrap_or_default(),
        "severity" => a.severity.as_str().to_owned(),
        "fingerprint" => a.fingerprint.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::ChangeKind;

    pub(crate) fn change(t: &str, sev: Severity, key: &str) -> AlertChange {
        AlertChange {
            kind: ChangeKind::Opened,
            fingerprint: format!("{t}/key:{key}"),
            alert_type: t.into(),
            severity: sev,
            key_id: Some(key.into()),
            key_prefix: Some(format!("pmcp_{key}")),
            key_name: None,
            org_id: Some("org1".into()),
            source_ip: None,
            started_at: chrono::Utc::now(),
            at: chrono::Utc::now(),
            summary: "s".into(),
            evidence: serde_json::Value::Null,
        }
    }

    fn route(receiver: &str, types: &[&str], cont: bool) -> Route {
        Route {
            receiver: receiver.into(),
            matchers: Matchers {
                types: types.iter().map(|s| s.to_string()).collect(),
                ..Matchers::default()
            },
            continue_matching: cont,
            ..Route::default()
        }
    }

    #[test]
    fn first_match_wins_unless_continue() {
        let r = Router {
            default: route("default", &[], false),
            routes: vec![
                route("a", &["rate_spike"], false),
                route("b", &["rate_spike", "new_country"], false),
            ],
        };
        let names = |a: &AlertChange| {
            r.route(a)
                .into_iter()
                .map(|(_, r)| r.receiver.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&change("rate_spike", Severity::Low, "k")), ["a"]);
        assert_eq!(names(&change("new_country", Severity::Low, "k")), ["b"]);
        assert_eq!(
            names(&change("key_in_logs", Severity::Low, "k")),
            ["default"]
        );
        let mut r2 = r.clone();
        r2.routes[0].continue_matching = true;
        let got: Vec<_> = r2
            .route(&change("rate_spike", Severity::Low, "k"))
            .into_iter()
            .map(|(id, r)| (id, r.receiver.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (RouteId::Child(0), "a".to_string()),
                (RouteId::Child(1), "b".to_string())
            ]
        );
    }

    #[test]
    fn matchers_on_severity_org_and_key() {
        let m = Matchers {
            severities: vec![Severity::High, Severity::Critical],
            keys: vec!["pmcp_k".into()],
            ..Matchers::default()
        };
        assert!(m.matches(&change("rate_spike", Severity::High, "k")));
        assert!(!m.matches(&change("rate_spike", Severity::Low, "k")));
        assert!(!m.matches(&change("rate_spike", Severity::High, "other")));
        let o = Matchers {
            orgs: vec!["org2".into()],
            ..Matchers::default()
        };
        assert!(!o.matches(&change("rate_spike", Severity::High, "k")));
    }
}
