//! The sender: delivers queued notifications, and marks one sent only after its receiver says
//! the server accepted it. A retryable failure is tried again after an exponential backoff with
//! jitter ([`backoff`]: from `retry_initial`, doubling, at most `retry_max`), until
//! `give_up_after` has passed since it was queued; then it is marked failed, logged and counted.
//! A restart resumes whatever is pending. (A crash between "accepted" and "marked sent" sends
//! that one message again, with the same Message-ID.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{Clock, NotifySettings, Receiver};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The wait before attempt `attempt + 1`, after `attempt` failures: `initial × 2^(attempt-1)`,
/// at most `max`, scaled by a jitter factor from `jitter` in [0, 1) to between half and all of
/// it (so retries of many messages spread out).
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = initial.saturating_mul(1u32 << exp).min(max);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// What the sender does with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Try again at this time.
    Retry(DateTime<Utc>),
    /// Stop trying.
    Fail,
}

/// Decides about a failure of attempt number `attempts` of a notification queued at `queued`.
pub fn after_failure(
    settings: &NotifySettings,
    retryable: bool,
    attempts: u32,
    queued: DateTime<Utc>,
    now: DateTime<Utc>,
    jitter: f64,
) -> Outcome {
    let give_up =
        chrono::Duration::from_std(settings.give_up_after).unwrap_or(chrono::Duration::MAX);
    if !retryable || now - queued >= give_up {
        return Outcome::Fail;
    }
    let wait = backoff(attempts, settings.retry_initial, settings.retry_max, jitter);
    Outcome::Retry(now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1)))
}

/// Delivers from the outbox.
pub struct Sender {
    pub store: Store,
    pub settings: Arc<NotifySettings>,
    pub receivers: HashMap<String, Arc<dyn Receiver>>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
}

impl Sender {
    /// Tries every notification due now once. Returns how many were sent.
    pub async fn step(&self) -> Result<usize, StoreError> {
        self.deliver_due(None).await
    }

    /// [`Sender::step`], starting no delivery once `stop` is cancelled (the one under way
    /// finishes, or is abandoned by whoever bounds the stop).
    async fn deliver_due(&self, stop: Option<&CancellationToken>) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut sent = 0;
        for q in self.store.due_notifications(now, 50).await? {
            if stop.is_some_and(CancellationToken::is_cancelled) {
                break;
            }
            let n = &q.notification;
            let attempts = q.attempts + 1;
            let result = match self.receivers.get(&n.receiver) {
                Some(r) => r.deliver(n).await,
                None => Err(super::DeliveryError::Permanent(format!(
                    "there is no receiver {:?} in alerts.toml any more",
                    n.receiver
                ))),
            };
            let now = self.clock.now();
            match result {
                Ok(()) => {
                    self.store
                        .record_attempt(n.id, "sent", attempts, now, None, now)
                        .await?;
                    self.metrics.notification(&n.receiver, "sent");
                    tracing::info!(receiver = %n.receiver, message_id = %n.message_id(), attempts, subject = %n.subject, "Delivered a notification.");
                    sent += 1;
                }
                Err(e) => {
                    let msg = e.to_string();
                    match after_failure(
                        &self.settings,
                        e.is_retryable(),
                        attempts,
                        n.created_at,
                        now,
                        rand::random::<f64>(),
                    ) {
                        Outcome::Retry(at) => {
                            self.store
                                .record_attempt(n.id, "pending", attempts, at, Some(&msg), now)
                                .await?;
                            self.metrics.notification(&n.receiver, "retried");
                            tracing::warn!(receiver = %n.receiver, message_id = %n.message_id(), attempts, retry_at = %at.to_rfc3339(), error = %msg, "Could not deliver a notification; will retry.");
                        }
                        Outcome::Fail => {
                            self.store
                                .record_attempt(n.id, "failed", attempts, now, Some(&msg), now)
                                .await?;
                            self.metrics.notification(&n.receiver, "failed");
                            tracing::error!(receiver = %n.receiver, message_id = %n.message_id(), attempts, error = %msg, "Gave up delivering a notification.");
                        }
                    }
                }
            }
        }
        if let Ok(d) = self.store.outbox_depth().await {
            self.metrics.outbox_depth(d.changes + d.pending);
            let age = d
                .oldest
                .map_or(0.0, |o| (now - o).num_milliseconds().max(0) as f64 / 1e3);
            self.metrics.outbox_oldest_age(age);
        }
        Ok(sent)
    }

    /// Runs until `shutdown`, logging errors and trying again.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let wait = match self.deliver_due(Some(&shutdown)).await {
                Ok(_) => match self.store.next_notification_at().await {
                    Ok(Some(t)) => (t - self.clock.now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .min(super::dispatch::POLL),
                    _ => super::dispatch::POLL,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "Could not read or update the outbox; will retry.");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_30_s_to_an_hour_with_jitter() {
        let (i, m) = (Duration::from_secs(30), Duration::from_secs(3600));
        assert_eq!(backoff(1, i, m, 0.999_999).as_secs(), 29);
        assert_eq!(backoff(1, i, m, 0.0).as_secs(), 15);
        assert_eq!(backoff(2, i, m, 1.0).as_secs(), 60);
        assert_eq!(backoff(8, i, m, 1.0).as_secs(), 3600);
        assert_eq!(backoff(1000, i, m, 1.0).as_secs(), 3600);
    }

    #[test]
    fn a_failure_is_retried_until_24_h_then_failed() {
        let s = NotifySettings {
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(86_400),
            timeout: Duration::from_secs(30),
            receivers: vec![],
            router: Default::default(),
            silences: vec![],
        };
        let t0: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().unwrap();
        let clock = super::super::ManualClock::new(t0);
        let mut now = clock.now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match after_failure(&s, true, attempts, t0, now, 1.0) {
                Outcome::Retry(at) => {
                    assert!(at > now);
                    clock.advance(at - now);
                    now = clock.now();
                }
                Outcome::Fail => break,
            }
        }
        assert!(now - t0 >= chrono::Duration::hours(24));
        assert!(now - t0 < chrono::Duration::hours(25));
        assert!(attempts < 40, "{attempts}");
        assert_eq!(after_failure(&s, false, 1, t0, t0, 0.5), Outcome::Fail);
    }
}
