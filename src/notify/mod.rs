//! Alert delivery: from the alert changes the pipeline commits to messages a person reads.
//!
//! Owns what happens after an alert is recorded: the stages a change goes through
//! (route → group → silence and inhibit → rate limit → render, in [`dispatch`]), the receivers
//! that deliver a rendered notification ([`Receiver`]: email over SMTP, or a local mbox file),
//! and the retry policy of the sender ([`send`]). Decisions (routing, grouping timers, silences,
//! inhibition, rate limits, backoff) are pure functions of state and an injected `now`; the async
//! loops only read the outbox, call them and write the result.
//!
//! It must not touch detection or the alert rows: data flows one way (detect → alert → notify).
//! Changes arrive through the `kw_outbox` table, written by `store::commit_batch` in the same
//! transaction as the alert upserts, so a change is never lost and never queued twice. All SQL
//! stays in `store`. Delivery timers run on the wall clock ([`Clock`]), never on event time.

pub mod chart;
pub mod config;
pub mod dispatch;
pub mod email;
pub mod group;
pub mod render;
pub mod route;
pub mod send;
pub mod silence;
pub mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::detect::{Finding, Severity};

pub use config::NotifySettings;

/// What an alert change says, for a person: the three changes worth a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A new episode.
    Opened,
    /// An open episode became more severe.
    SeverityRaised,
    /// The episode ended.
    Resolved,
}

impl ChangeKind {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Opened => "opened",
            ChangeKind::SeverityRaised => "severity_raised",
            ChangeKind::Resolved => "resolved",
        }
    }
}

/// One alert change, as the outbox holds it: everything routing and rendering need, so the
/// later stages never read the alert tables. Values that came from log lines (key prefixes,
/// summaries naming user agents or MCPs) are already redacted of full keys upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertChange {
    pub kind: ChangeKind,
    /// The alert's fingerprint (its id in `report alerts`).
    pub fingerprint: String,
    pub alert_type: String,
    pub severity: Severity,
    pub key_id: Option<String>,
    pub key_prefix: Option<String>,
    pub org_id: Option<String>,
    pub source_ip: Option<String>,
    /// Event time of the episode's first evidence.
    pub started_at: DateTime<Utc>,
    /// Event time of this change.
    pub at: DateTime<Utc>,
    pub summary: String,
    /// The finding's evidence, as JSON.
    pub evidence: serde_json::Value,
}

impl AlertChange {
    /// The change `f` makes, of `kind`.
    pub fn from_finding(kind: ChangeKind, f: &Finding) -> AlertChange {
        AlertChange {
            kind,
            fingerprint: f.fingerprint(),
            alert_type: f.alert_type.as_str().to_owned(),
            severity: f.severity,
            key_id: f.key_id.map(|k| k.to_string()),
            key_prefix: f.key_prefix.clone(),
            org_id: f.org_id.map(|o| o.to_string()),
            source_ip: f.source_ip.map(|ip| ip.to_string()),
            started_at: f.started_at,
            at: f.at,
            summary: f.summary.clone(),
            evidence: serde_json::to_value(&f.evidence).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Which changes the open alerts make: the pipeline's memory of each open alert's severity.
/// Seeded at start with the alerts the store holds as firing, so a restart does not announce
/// open alerts again.
#[derive(Debug, Default, Clone)]
pub struct ChangeTracker {
    open: std::collections::HashMap<String, Severity>,
}

impl ChangeTracker {
    /// A tracker that knows `open` (fingerprint, severity) as already announced.
    pub fn new(open: impl IntoIterator<Item = (String, Severity)>) -> ChangeTracker {
        ChangeTracker {
            open: open.into_iter().collect(),
        }
    }

    /// The notification-worthy change `f` makes, if any: a re-sent unchanged finding makes none.
    pub fn observe(&mut self, f: &Finding) -> Option<ChangeKind> {
        let fp = f.fingerprint();
        if f.resolved {
            return self.open.remove(&fp).map(|_| ChangeKind::Resolved);
        }
        match self.open.insert(fp, f.severity) {
            None => Some(ChangeKind::Opened),
            Some(old) if f.severity > old => Some(ChangeKind::SeverityRaised),
            Some(old) => {
                // Severity never goes down within an episode; keep the higher one.
                self.open.insert(f.fingerprint(), old.max(f.severity));
                None
            }
        }
    }
}

/// One message for one receiver: what the grouping stage decided to say, rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable across retries: the Message-ID is made from it.
    pub id: uuid::Uuid,
    pub receiver: String,
    pub group_key: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub created_at: DateTime<Utc>,
    /// What it tells of, as data, for receivers that post JSON (webhook, Alertmanager).
    /// `None` for a test message.
    #[serde(default)]
    pub draft: Option<group::Draft>,
    /// Email recipients chosen by the route (its `to`, its organization's address); empty:
    /// the receiver's own.
    #[serde(default)]
    pub to: Vec<String>,
    /// Email recipients added to those (the organization's stored address).
    #[serde(default)]
    pub also_to: Vec<String>,
}

impl Notification {
    /// The RFC 5322 Message-ID, the same for every attempt.
    pub fn message_id(&self) -> String {
        format!("<{}@keywatch>", self.id.simple())
    }
}

/// Why a delivery failed, and whether trying again could help.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The server or the network failed in a way that may pass (connection refused, timeout,
    /// a 4xx SMTP reply).
    #[error("{0}")]
    Retryable(String),
    /// Trying again cannot help (a 5xx SMTP reply, an address the server refuses, bad settings).
    #[error("{0}")]
    Permanent(String),
}

impl DeliveryError {
    /// Whether the sender should try again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DeliveryError::Retryable(_))
    }
}

/// A boxed future, so receivers can be held as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Somewhere notifications go. A receiver only delivers: it returns once the server accepted the
/// message (`Ok`), or says whether the failure is worth retrying. It keeps no state about what
/// was sent; the outbox does.
pub trait Receiver: Send + Sync {
    /// The receiver's name in `alerts.toml`.
    fn name(&self) -> &str;
    /// Delivers one notification.
    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<(), DeliveryError>>;
}

/// The wall clock delivery timers run on; injectable so tests control time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(at)))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: chrono::Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds the receivers of `settings`, reading the environment variables they name; relative
/// mailbox paths are taken in `mailbox_dir`.
pub fn receivers(
    settings: &NotifySettings,
    mailbox_dir: &std::path::Path,
) -> Result<std::collections::HashMap<String, Arc<dyn Receiver>>, String> {
    use config::ReceiverSettings;
    // Every variable may also be given as a file (NAME_FILE); the first unreadable or exposed
    // one stops the start.
    let refused = std::cell::RefCell::new(None);
    let env = |name: &str| match crate::secret::from_env(name) {
        Ok(v) => v,
        Err(e) => {
            refused.borrow_mut().get_or_insert(e.to_string());
            None
        }
    };
    let resolved = settings.resolve(&env, mailbox_dir);
    if let Some(e) = refused.into_inner() {
        return Err(e);
    }
    let mut out: std::collections::HashMap<String, Arc<dyn Receiver>> = Default::default();
    for s in resolved? {
        let (r, to): (Arc<dyn Receiver>, String) = match s {
            ReceiverSettings::Email(e) => {
                let r = email::EmailReceiver::new(e)?;
                let to = r.destination();
                (Arc::new(r), to)
            }
            ReceiverSettings::Webhook(h) => {
                let to = crate::store::redact_url(h.url.as_str());
                (Arc::new(webhook::Webhook::new(h)?), to)
            }
            ReceiverSettings::Alertmanager(h) => {
                let to = crate::store::redact_url(h.url.as_str());
                (Arc::new(webhook::Alertmanager::new(h)?), to)
            }
        };
        tracing::info!(receiver = r.name(), to = %to, "Alert receiver ready.");
        out.insert(r.name().to_owned(), r);
    }
    Ok(out)
}

/// Runs the dispatcher and the sender until `shutdown`.
pub async fn run_delivery(
    store: crate::store::Store,
    settings: Arc<NotifySettings>,
    receivers: std::collections::HashMap<String, Arc<dyn Receiver>>,
    clock: Arc<dyn Clock>,
    metrics: crate::metrics::Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), crate::store::StoreError> {
    metrics.notify_receivers(receivers.keys().map(String::as_str));
    let dispatcher =
        dispatch::Dispatcher::load(store.clone(), Arc::clone(&settings), Arc::clone(&clock))
            .await?;
    let sender = send::Sender {
        store,
        settings,
        receivers,
        clock,
        metrics,
    };
    tokio::join!(dispatcher.run(shutdown.clone()), sender.run(shutdown));
    Ok(())
}

/// Delivers what the outbox holds now, for batch commands (`ingest --notify`, `demo`): runs the
/// dispatcher and the sender until no change waits and nothing is due within `settle` of the
/// later of now and the last change (on `clock`). Returns how many notifications were
/// delivered; what is left (a retry, a repeat hours later) stays in the outbox for
/// `keywatch run`.
///
/// With `manual` (the same clock), nothing is waited for: the clock follows the changes' event
/// times and jumps to each timer, so a replayed day sends what it would have sent live.
pub async fn drain(
    store: crate::store::Store,
    settings: Arc<NotifySettings>,
    receivers: std::collections::HashMap<String, Arc<dyn Receiver>>,
    clock: Arc<dyn Clock>,
    manual: Option<ManualClock>,
    settle: chrono::Duration,
) -> Result<usize, crate::store::StoreError> {
    let mut dispatcher =
        dispatch::Dispatcher::load(store.clone(), Arc::clone(&settings), Arc::clone(&clock))
            .await?;
    if manual.is_some() {
        dispatcher.batch = 1;
    }
    let sender = send::Sender {
        store: store.clone(),
        settings,
        receivers,
        clock: Arc::clone(&clock),
        metrics: crate::metrics::Metrics::new(),
    };
    let mut sent = 0;
    let mut until = clock.now() + settle;
    // Look at the groups at least once (a silence may have ended since the last run).
    let mut next_group: Option<DateTime<Utc>> = Some(clock.now());
    loop {
        let next_change = store.pending_changes(1).await?.first().map(|(_, c)| c.at);
        let next_send = store.next_notification_at().await?;
        let now = clock.now();
        let next_timer = [next_group, next_send].into_iter().flatten().min();
        match (&manual, next_change) {
            (Some(m), Some(at)) => {
                // Timers due before the next change fire first.
                let t = next_timer.filter(|t| *t < at).unwrap_or(at);
                if t > now {
                    m.advance(t - now);
                }
                until = until.max(clock.now() + settle);
            }
            (Some(m), None) => match next_timer {
                Some(t) if t <= until => {
                    if t > now {
                        m.advance(t - now);
                    }
                }
                _ => break,
            },
            (None, Some(_)) => {}
            (None, None) => match next_timer {
                Some(t) if t <= until => {
                    let wait = (t - now).to_std().unwrap_or_default().min(dispatch::POLL);
                    tokio::time::sleep(wait.max(std::time::Duration::from_millis(20))).await;
                }
                _ => break,
            },
        }
        next_group = dispatcher.step().await?;
        sent += sender.step().await?;
    }
    Ok(sent)
}

/// A change of key `k1` for the dispatch and inhibition tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{AlertChange, ChangeKind};
    use crate::detect::Severity;

    pub(crate) fn change(t: &str, sev: Severity, kind: ChangeKind) -> AlertChange {
        AlertChange {
            kind,
            fingerprint: format!("{t}/key:k1"),
            alert_type: t.into(),
            severity: sev,
            key_id: Some("k1".into()),
            key_prefix: Some("pmcp_k1".into()),
            org_id: Some("o".into()),
            source_ip: None,
            started_at: chrono::Utc::now(),
            at: chrono::Utc::now(),
            summary: String::new(),
            evidence: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{AlertType, Evidence, Subject};

    fn finding(sev: Severity, resolved: bool) -> Finding {
        let mut f = Finding::new(
            AlertType::RateSpike,
            sev,
            Subject::Prefix("pmcp_x".into()),
            Utc::now(),
            "s".into(),
            Evidence::default(),
        );
        f.resolved = resolved;
        f
    }

    #[test]
    fn only_opening_raising_and_resolving_notify() {
        let mut t = ChangeTracker::default();
        assert_eq!(
            t.observe(&finding(Severity::Medium, false)),
            Some(ChangeKind::Opened)
        );
        assert_eq!(t.observe(&finding(Severity::Medium, false)), None);
        assert_eq!(
            t.observe(&finding(Severity::High, false)),
            Some(ChangeKind::SeverityRaised)
        );
        assert_eq!(t.observe(&finding(Severity::Medium, false)), None);
        assert_eq!(
            t.observe(&finding(Severity::High, true)),
            Some(ChangeKind::Resolved)
        );
        assert_eq!(t.observe(&finding(Severity::High, true)), None);
    }

    #[test]
    fn a_restart_does_not_announce_open_alerts_again() {
        let f = finding(Severity::Medium, false);
        let mut t = ChangeTracker::new([(f.fingerprint(), Severity::Medium)]);
        assert_eq!(t.observe(&f), None);
    }
}
