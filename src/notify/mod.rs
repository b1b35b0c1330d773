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
    /// The key's name in the key tables (redacted of anything that looks like a key), for
    /// people: subjects say `key "ci-deploy" (pmcp_...)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
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
            key_name: None,
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

/// An alert as the database held it when a batch came to record a change of it: what the
/// change is checked against, so that instances sharing a database (each with its own
/// [`ChangeTracker`]) announce each change once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredState {
    /// `firing`, `acknowledged`, `benign` or `resolved`.
    pub status: StoredStatus,
    pub severity: Severity,
    /// The change's episode started after the stored alert's last evidence: a new episode.
    pub later_episode: bool,
}

/// An alert's stored status, as far as announcing changes goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredStatus {
    /// Firing or acknowledged: open, and worth telling about when it gets worse or ends.
    Open,
    /// Marked benign by an admin: nothing more is said of this episode.
    Benign,
    Resolved,
}

impl StoredStatus {
    /// The status column's value; an unknown one counts as open.
    pub fn parse(s: &str) -> StoredStatus {
        match s {
            "benign" => StoredStatus::Benign,
            "resolved" => StoredStatus::Resolved,
            _ => StoredStatus::Open,
        }
    }
}

impl AlertChange {
    /// What this change still says given the alert as stored (`None`: no row), or `None` when
    /// the store already knows it: another instance announced it, or an admin marked the
    /// episode benign. Returns the kind to announce, and updates `stored` to the state after
    /// it, so that several changes of one alert in a batch are judged in turn.
    pub fn against(&self, stored: &mut Option<StoredState>) -> Option<ChangeKind> {
        let open = |severity| StoredState {
            status: StoredStatus::Open,
            severity,
            later_episode: false,
        };
        let said = match (*stored, self.kind) {
            (None, ChangeKind::Resolved) => None,
            (Some(s), ChangeKind::Resolved) => {
                (s.status == StoredStatus::Open).then_some(ChangeKind::Resolved)
            }
            (Some(s), _) if s.status == StoredStatus::Benign && !s.later_episode => None,
            (Some(s), _) if s.status == StoredStatus::Open => {
                (self.severity > s.severity).then_some(ChangeKind::SeverityRaised)
            }
            // No row, resolved, or a new episode of a benign one: news.
            _ => Some(ChangeKind::Opened),
        };
        match said {
            Some(ChangeKind::Resolved) => {
                if let Some(s) = stored.as_mut() {
                    s.status = StoredStatus::Resolved;
                }
            }
            Some(_) => *stored = Some(open(self.severity)),
            None => {}
        }
        said
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
    while let Some(mut lease) = delivery_lease(&store, &shutdown).await {
        let this = shutdown.child_token();
        // Loaded only now: a previous holder may have changed the groups until a moment ago.
        let dispatcher =
            dispatch::Dispatcher::load(store.clone(), Arc::clone(&settings), Arc::clone(&clock))
                .await?;
        let sender = send::Sender {
            store: store.clone(),
            settings: Arc::clone(&settings),
            receivers: receivers.clone(),
            clock: Arc::clone(&clock),
            metrics: metrics.clone(),
        };
        let work = async {
            tokio::join!(dispatcher.run(this.clone()), sender.run(this.clone()));
        };
        tokio::pin!(work);
        let lost = async {
            loop {
                tokio::time::sleep(LEASE_CHECK_EVERY).await;
                if !lease.holds().await {
                    return;
                }
            }
        };
        tokio::select! {
            _ = &mut work => return Ok(()),
            _ = lost => {
                tracing::warn!("Lost the database lock that lets this instance deliver notifications (its connection failed); delivery pauses until it is taken again.");
                this.cancel();
                work.await;
            }
        }
    }
    Ok(())
}

/// How often the delivering instance checks that it still holds the delivery lease, and a
/// standing-by one tries to take it.
const LEASE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits for the delivery lease (see [`crate::store::DeliveryLease`]); `None` at shutdown.
async fn delivery_lease(
    store: &crate::store::Store,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<crate::store::DeliveryLease> {
    let mut said = false;
    loop {
        match store.try_delivery_lease().await {
            Ok(Some(lease)) => {
                if said {
                    tracing::info!("This instance now delivers the notifications.");
                }
                return Some(lease);
            }
            Ok(None) if !said => {
                said = true;
                tracing::info!(
                    "Another keywatch instance delivers this database's notifications; this one stands by and takes over if it stops."
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "Could not take the delivery lock; will retry."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(LEASE_CHECK_EVERY) => {}
        }
    }
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
            key_name: None,
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

    #[test]
    fn a_change_the_store_already_knows_is_not_announced_again() {
        let f = Finding::new(
            crate::detect::AlertType::QuotaThreshold,
            Severity::Low,
            crate::detect::Subject::Org(uuid::Uuid::from_u128(1)),
            "2026-11-20T12:00:00Z".parse().unwrap(),
            "s".into(),
            Default::default(),
        );
        let change = |kind, severity| {
            let mut c = AlertChange::from_finding(kind, &f);
            c.severity = severity;
            c
        };
        let state = |status, severity| {
            Some(StoredState {
                status,
                severity,
                later_episode: false,
            })
        };
        // Two instances raise the same organization alert: the second says nothing.
        let mut stored = None;
        let opened = change(ChangeKind::Opened, Severity::Low);
        assert_eq!(opened.against(&mut stored), Some(ChangeKind::Opened));
        assert_eq!(opened.against(&mut stored), None);
        // More severe is news, once; to the other instance it is an opening it never saw.
        let worse = change(ChangeKind::Opened, Severity::Medium);
        assert_eq!(worse.against(&mut stored), Some(ChangeKind::SeverityRaised));
        assert_eq!(worse.against(&mut stored), None);
        let resolved = change(ChangeKind::Resolved, Severity::Medium);
        assert_eq!(resolved.against(&mut stored), Some(ChangeKind::Resolved));
        assert_eq!(resolved.against(&mut stored), None);
        assert_eq!(resolved.against(&mut None), None);
        // A benign episode stays quiet, however it changes, until a new episode starts.
        let raised = change(ChangeKind::SeverityRaised, Severity::High);
        let mut benign = state(StoredStatus::Benign, Severity::Low);
        assert_eq!(raised.against(&mut benign), None);
        assert_eq!(resolved.against(&mut benign), None);
        let mut later = benign.map(|s| StoredState {
            later_episode: true,
            ..s
        });
        assert_eq!(opened.against(&mut later), Some(ChangeKind::Opened));
        // A resolved alert that fires again is a new opening.
        let mut done = state(StoredStatus::Resolved, Severity::High);
        assert_eq!(raised.against(&mut done), Some(ChangeKind::Opened));
    }
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
