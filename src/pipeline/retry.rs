//! Committing while the database fails: retry with backoff, hold the sources back, say so.
//!
//! Owns what the pipeline does when a commit fails. A failure that passes (the server
//! restarting or unreachable, a lock) is retried with backoff, for ever in the daemon and for
//! a bounded time in a batch run. Meanwhile nothing more is taken from the channel, so once
//! its few chunks are full every source waits: a file is not read further, a push gets 503, a
//! NATS message stays unacked. Nothing is dropped and memory stays bounded. The state is
//! logged when it starts and when it ends, exported as `keywatch_commits_blocked` and reported
//! by `/readyz`. A failure that does not pass (a SQLite file on a full disk, read-only or
//! damaged) stops the pipeline at once with one sentence saying so; the last committed
//! checkpoint is intact, so a restart continues from it.
//!
//! Each batch carries a number ([`CommitMarker`]) committed with it, so a retry after a COMMIT
//! whose answer was lost is recognised by the store and not counted twice.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Pipeline;
use crate::source::Health;
use crate::store::{CommitMarker, StoreError};

/// The first wait after a failed commit; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two attempts: once the database is back, counting resumes within
/// this (plus the connection pool's own connect timeout).
const MAX_RETRY: Duration = Duration::from_secs(5);

/// How this pipeline numbers its batches, and where it reports that commits fail.
#[derive(Debug)]
pub(super) struct Commits {
    writer: String,
    next_seq: i64,
    health: Option<Health>,
}

impl Default for Commits {
    fn default() -> Commits {
        Commits {
            writer: uuid::Uuid::new_v4().simple().to_string(),
            next_seq: 1,
            health: None,
        }
    }
}

impl Pipeline {
    /// Reports failing commits in `health` (`/readyz`).
    pub fn with_health(mut self, health: Health) -> Pipeline {
        self.commits.health = Some(health);
        self
    }

    /// Commits, retrying with backoff while the failure may pass, until it succeeds, until
    /// `give_up` has passed, or (after one more attempt) until `shutdown`. While it retries
    /// nothing is read, so the sources wait.
    pub(super) async fn flush_with_retry(
        &mut self,
        give_up: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut delay = FIRST_RETRY;
        let mut blocked_since: Option<Instant> = None;
        loop {
            if self.batch.marker.is_none() {
                self.batch.marker = Some(CommitMarker {
                    writer: self.commits.writer.clone(),
                    seq: self.commits.next_seq,
                });
                self.commits.next_seq += 1;
            }
            let e = match self.flush().await {
                Ok(()) => {
                    if let Some(since) = blocked_since {
                        self.set_blocked(None);
                        tracing::info!(
                            blocked_ms = since.elapsed().as_millis() as u64,
                            "Commits succeed again; reading resumes."
                        );
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            if e.permanent().is_some() {
                self.set_blocked(None);
                return Err(e.unwritable(self.store.url()));
            }
            if give_up.is_some_and(|g| started.elapsed() >= g) || shutdown.is_cancelled() {
                self.set_blocked(None);
                return Err(e);
            }
            if blocked_since.is_none() {
                blocked_since = Some(Instant::now());
                tracing::error!(error = %e, uncommitted_lines = self.pending_lines, "Cannot commit counts; holding the sources back and retrying until the database answers.");
            } else {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Still cannot commit counts; will retry.");
            }
            self.set_blocked(Some(e.to_string()));
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    fn set_blocked(&self, why: Option<String>) {
        self.metrics.commits_blocked(why.is_some());
        if let Some(h) = &self.commits.health {
            h.commits(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::store::{Batch, CommitMarker, Store};

    /// A batch committed twice under the same number (a retry after a COMMIT whose answer was
    /// lost) is counted once; the next number is counted again.
    #[tokio::test]
    async fn a_batch_retried_after_its_commit_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kw.db").display());
        let store = Store::open(&url).await.unwrap();
        let at: chrono::DateTime<chrono::Utc> = "2026-11-20T10:00:00Z".parse().unwrap();
        let org = uuid::Uuid::new_v4();
        let batch = |seq| {
            let mut b = Batch {
                marker: Some(CommitMarker {
                    writer: "w".into(),
                    seq,
                }),
                ..Batch::default()
            };
            let mcp: Arc<str> = Arc::from("search");
            b.rollup.record(at, None, Some(org), &mcp, 200, 5, 10, 20);
            b
        };
        let counted = || async {
            let later = at + chrono::Duration::hours(1);
            let mtd = crate::report::month_to_date(&store, later).await.unwrap();
            mtd.get(&org).copied().unwrap_or(0)
        };
        store.commit_batch(&batch(1)).await.unwrap();
        assert_eq!(counted().await, 1);
        store.commit_batch(&batch(1)).await.unwrap();
        assert_eq!(counted().await, 1, "the retried batch is not counted again");
        store.commit_batch(&batch(2)).await.unwrap();
        assert_eq!(counted().await, 2);
    }
}
