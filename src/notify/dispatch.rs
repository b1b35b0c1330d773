//! The dispatcher: reads alert changes from the outbox, runs them through routing, grouping,
//! silences, inhibition and the rate limit ([`Grouper`]), renders what is due and queues it for
//! the sender, marking the changes dispatched and saving the grouping state in the same
//! transaction. A thin async shell: every decision is in the pure stages.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::group::Grouper;
use super::silence::{Inhibitors, Silence};
use super::{AlertChange, Clock, NotifySettings};
use crate::store::{Store, StoreError};

/// How often the outbox is looked at when no timer is due sooner.
pub const POLL: Duration = Duration::from_secs(1);

/// The dispatcher's state: the groups, as last committed.
pub struct Dispatcher {
    store: Store,
    settings: Arc<NotifySettings>,
    clock: Arc<dyn Clock>,
    grouper: Grouper,
    /// Changes taken per step (1 when a replay's clock follows them).
    pub batch: i64,
}

impl Dispatcher {
    /// Loads the saved grouping state.
    pub async fn load(
        store: Store,
        settings: Arc<NotifySettings>,
        clock: Arc<dyn Clock>,
    ) -> Result<Dispatcher, StoreError> {
        let grouper = saved(&store).await?;
        Ok(Dispatcher {
            store,
            settings,
            clock,
            grouper,
            batch: 500,
        })
    }

    /// One pass: takes new changes, sends what is due. Returns when it next has work.
    pub async fn step(&mut self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let now = self.clock.now();
        let changes = self.store.pending_changes(self.batch).await?;
        let router = &self.settings.router;
        for (_, c) in &changes {
            self.grouper.add(router, c, now);
        }
        let silences = self.silences(now).await?;
        let inhibitors = inhibitors(&self.grouper);
        let muted =
            |a: &AlertChange| inhibitors.inhibits(a) || silences.iter().any(|s| s.mutes(a, now));
        let limits: std::collections::HashMap<&str, u32> = self
            .settings
            .receivers
            .iter()
            .map(|r| (r.name.as_str(), r.rate_limit_per_hour))
            .collect();
        let limit = |r: &str| limits.get(r).copied().unwrap_or(20);
        let drafts = self.grouper.step(router, now, &muted, &limit);
        let next = self.grouper.next_deadline(router, &muted);
        if changes.is_empty() && drafts.is_empty() {
            return Ok(next);
        }
        let mut notes = Vec::with_capacity(drafts.len());
        for d in &drafts {
            let mut n = super::render::render(d, now);
            (n.to, n.also_to) = self.recipients(d).await?;
            notes.push(n);
        }
        let ids: Vec<i64> = changes.iter().map(|(id, _)| *id).collect();
        let state = serde_json::to_string(&self.grouper).unwrap_or_else(|_| "{}".into());
        if let Err(e) = self.store.commit_dispatch(&ids, &state, &notes, now).await {
            // What was not committed did not happen: start again from the saved state.
            self.grouper = saved(&self.store).await.unwrap_or_default();
            return Err(e);
        }
        for n in &notes {
            tracing::info!(receiver = %n.receiver, subject = %n.subject, "Queued a notification.");
        }
        Ok(next)
    }

    /// The email recipients `d`'s route chose: its `to` (replacing the receiver's), and with
    /// `to_org` the address the organization stored, added when every alert in the group is
    /// that one organization's. A digest (no route) goes to the receiver's own.
    async fn recipients(
        &self,
        d: &super::group::Draft,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let Some(route) = self.settings.router.get(&d.route) else {
            return Ok((vec![], vec![]));
        };
        if !route.to_org {
            return Ok((route.to.clone(), vec![]));
        }
        let mut orgs = d
            .new
            .iter()
            .chain(&d.still_firing)
            .chain(&d.resolved)
            .map(|a| a.org_id.as_deref());
        let first = orgs.next().flatten();
        let org = first.filter(|o| orgs.all(|x| x == Some(*o)));
        let also = match org {
            Some(o) => self.store.org_alert_email(o).await?.into_iter().collect(),
            None => vec![],
        };
        Ok((route.to.clone(), also))
    }

    async fn silences(&self, now: DateTime<Utc>) -> Result<Vec<Silence>, StoreError> {
        let mut out = self.settings.silences.clone();
        for s in self.store.silences(now, false).await? {
            match s.matchers.check() {
                Ok(m) => out.push(Silence {
                    id: s.id,
                    matchers: m,
                    reason: s.reason,
                    expires_at: s.expires_at,
                }),
                Err(e) => tracing::warn!(silence = %s.id, error = %e, "Ignoring a stored silence."),
            }
        }
        Ok(out)
    }

    /// Runs until `shutdown`, logging errors and trying again.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let wait = match self.step().await {
                Ok(next) => next
                    .map(|t| (t - self.clock.now()).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(POLL)
                    .min(POLL),
                Err(e) => {
                    tracing::warn!(error = %e, "Could not dispatch notifications; will retry.");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            }
        }
    }
}

async fn saved(store: &Store) -> Result<Grouper, StoreError> {
    Ok(match store.notify_state().await? {
        Some(s) => serde_json::from_str(&s).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "The saved notification groups do not parse; starting afresh.");
            Grouper::default()
        }),
        None => Grouper::default(),
    })
}

/// The critical alerts firing in any group.
fn inhibitors(g: &Grouper) -> Inhibitors {
    let mut i = Inhibitors::default();
    for group in g.groups.values() {
        for a in group.alerts.values().filter(|a| a.firing) {
            i.observe(&a.change);
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Severity;
    use crate::notify::ChangeKind;
    use crate::notify::route::Router;
    use crate::notify::test_support::change;

    #[test]
    fn a_firing_critical_alert_of_a_key_holds_back_its_lesser_alerts_in_every_group() {
        let r = Router::default();
        let t0: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let mut g = Grouper::default();
        g.add(
            &r,
            &change("revoked_key_use", Severity::Critical, ChangeKind::Opened),
            t0,
        );
        g.add(
            &r,
            &change("rate_spike", Severity::High, ChangeKind::Opened),
            t0,
        );
        let inh = inhibitors(&g);
        let muted = |a: &AlertChange| inh.inhibits(a);
        let drafts = g.step(&r, t0 + chrono::Duration::seconds(30), &muted, &|_| 20);
        let told: Vec<&str> = drafts
            .iter()
            .flat_map(|d| d.new.iter().map(|a| a.alert_type.as_str()))
            .collect();
        assert_eq!(told, ["revoked_key_use"]);
        // Once the critical alert resolves, the held-back alert is told as new.
        g.add(
            &r,
            &change("revoked_key_use", Severity::Critical, ChangeKind::Resolved),
            t0,
        );
        let inh = inhibitors(&g);
        let muted = |a: &AlertChange| inh.inhibits(a);
        let drafts = g.step(&r, t0 + chrono::Duration::minutes(6), &muted, &|_| 20);
        let new: Vec<&str> = drafts
            .iter()
            .flat_map(|d| d.new.iter().map(|a| a.alert_type.as_str()))
            .collect();
        let resolved: Vec<&str> = drafts
            .iter()
            .flat_map(|d| d.resolved.iter().map(|a| a.alert_type.as_str()))
            .collect();
        assert_eq!(new, ["rate_spike"]);
        assert_eq!(resolved, ["revoked_key_use"]);
    }

    #[tokio::test]
    async fn the_groups_survive_a_restart_neither_repeating_nor_forgetting() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kw.db").display());
        let store = Store::open(&url).await.unwrap();
        let t0: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let clock = crate::notify::ManualClock::new(t0);
        let settings = Arc::new(
            crate::config::AlertsConfig::default()
                .notify_settings()
                .unwrap(),
        );
        let batch = crate::store::Batch {
            changes: vec![change("rate_spike", Severity::High, ChangeKind::Opened)],
            ..Default::default()
        };
        store.commit_batch(&batch).await.unwrap();
        let queued = |store: Store, at: DateTime<Utc>| async move {
            store.due_notifications(at, 100).await.unwrap().len()
        };
        let start = |c: &crate::notify::ManualClock| {
            Dispatcher::load(store.clone(), Arc::clone(&settings), Arc::new(c.clone()))
        };
        let mut d = start(&clock).await.unwrap();
        assert_eq!(
            d.step().await.unwrap(),
            Some(t0 + chrono::Duration::seconds(30))
        );
        assert_eq!(queued(store.clone(), t0).await, 0, "group_wait first");
        drop(d);
        clock.advance(chrono::Duration::seconds(30));
        let mut d = start(&clock).await.unwrap();
        d.step().await.unwrap();
        let far = t0 + chrono::Duration::days(1);
        assert_eq!(
            queued(store.clone(), far).await,
            1,
            "after a restart, the wait still ends"
        );
        drop(d);
        clock.advance(chrono::Duration::hours(1));
        let mut d = start(&clock).await.unwrap();
        d.step().await.unwrap();
        assert_eq!(queued(store.clone(), far).await, 1, "no repeat before 4 h");
        clock.advance(chrono::Duration::hours(3));
        d.step().await.unwrap();
        assert_eq!(queued(store.clone(), far).await, 2, "the repeat");
        assert_eq!(store.outbox_depth().await.unwrap().changes, 0);
    }
}
