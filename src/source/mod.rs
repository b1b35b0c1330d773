//! Sources: where request-log lines come from (tailed files, stdin, HTTP pushes, NATS
//! JetStream, the auth server's own tables).
//!
//! A source only moves bytes. It cuts its input into [`Chunk`]s of whole lines, says where it
//! stands after each chunk (a [`Checkpoint`]), and sends the chunks down a bounded channel, so a
//! slow pipeline holds the source back instead of filling memory. It never parses, resolves or
//! counts, and never writes a checkpoint itself: the pipeline commits a chunk's checkpoint in
//! the same transaction as the counts of its lines. A source that must answer someone once
//! its lines are safe (an HTTP client, a NATS ack) puts a [`CommitAck`] on the chunk; the
//! pipeline fires it after the transaction holding the chunk's counts committed.

pub mod file;
pub mod http;
pub mod lines;
pub mod nats;
pub mod postgres;
pub mod stdin;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

/// Where a source stands: committed together with the counts of every line before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Identifies the file's content independently of its name: a hash of its first line, so
    /// that a renamed (rotated) file keeps its place.
    pub fingerprint: String,
    /// The path the file had when it was last read, for people reading the table.
    pub path: String,
    /// Byte offset just after the last line counted.
    pub offset: u64,
    /// Number of lines counted so far (the line number of the last one).
    pub line_no: u64,
    /// Rows of a keyset source (the postgres source) that this chunk counts, remembered
    /// with the checkpoint so that a row committed late is counted once. Empty elsewhere.
    pub seen: Vec<SeenRow>,
}

/// A row a keyset source counted: its id, and its time (to forget it past the look-back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRow {
    pub id: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A run of whole lines from one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The source's display name: `file:/path` or `stdin`.
    pub source: Arc<str>,
    /// Whole lines, each ending in `\n`, except possibly the last of a file read to its end
    /// in batch mode. A line longer than [`crate::event::MAX_LINE_BYTES`] is cut to one byte
    /// more than that, so the parser refuses it as too long without holding all of it.
    pub data: Vec<u8>,
    /// 1-based line number of the first line in `data`.
    pub first_line_no: u64,
    /// Where the source stands after the last line of `data`; `None` for sources that
    /// cannot resume (stdin).
    pub checkpoint: Option<Checkpoint>,
    /// Fired once the counts of `data` are committed; `None` when nobody waits for that.
    pub ack: Option<CommitAck>,
    /// When the source had read `data`, taken before it waits for room in the channel, so
    /// that the alert-decision latency (`keywatch_alert_decision_seconds`) includes the time
    /// a chunk queues behind a busy pipeline.
    pub read_at: Instant,
}

/// A line of a chunk that the parser refused, as the pipeline tells the chunk's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedLine {
    /// The line's number as the chunk numbered it (see [`Chunk::first_line_no`]).
    pub line_no: u64,
    /// The reason, as `keywatch report rejected` names it (`not_json`, `missing_field`, ...).
    pub reason: &'static str,
    /// What was wrong, keys redacted.
    pub detail: String,
}

/// What became of a chunk's lines, sent once they are committed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// Lines parsed and counted (blank lines are neither accepted nor rejected).
    pub accepted: u64,
    /// Lines refused, in order; they are also kept in `kw_dead_letters`.
    pub rejected: Vec<RejectedLine>,
}

/// The pipeline's promise to tell a source when a chunk's transaction committed.
///
/// Cloneable because [`Chunk`] is; only the first [`CommitAck::send`] delivers. Dropping every
/// clone unsent (the pipeline stopped before committing) closes the receiver, which the source
/// must read as "not committed".
#[derive(Clone)]
pub struct CommitAck(Arc<Mutex<Option<oneshot::Sender<ChunkOutcome>>>>);

impl CommitAck {
    /// A handle for one chunk, and the receiver its source waits on.
    pub fn new() -> (CommitAck, oneshot::Receiver<ChunkOutcome>) {
        let (tx, rx) = oneshot::channel();
        (CommitAck(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Tells the source its chunk is committed. A source that stopped waiting is not an
    /// error: the counts are committed all the same.
    pub fn send(&self, outcome: ChunkOutcome) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(outcome);
        }
    }
}

impl std::fmt::Debug for CommitAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitAck")
    }
}

impl PartialEq for CommitAck {
    fn eq(&self, other: &CommitAck) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for CommitAck {}

/// Looks up a committed checkpoint by fingerprint. The store implements it; tests use a map.
pub trait CheckpointReader: Send + Sync + 'static {
    fn checkpoint(
        &self,
        fingerprint: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, crate::store::StoreError>> + Send;
}

/// A checkpoint reader that knows no checkpoints: every file is new (a dry run).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCheckpoints;

impl CheckpointReader for NoCheckpoints {
    async fn checkpoint(
        &self,
        _fingerprint: &str,
    ) -> Result<Option<Checkpoint>, crate::store::StoreError> {
        Ok(None)
    }
}

/// An error that stops a source. Transient conditions (a file missing for a while, a
/// permission error during rotation) are retried inside the source and only logged.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the pipeline stopped before the source finished")]
    PipelineClosed,
    #[error("the {0} source cannot run here (only `keywatch run` starts it)")]
    Unavailable(String),
}

/// Which sources are reading, for `/readyz`: a source is down, with the reason, while it
/// retries a server it cannot reach and once it has stopped; up while it reads. Also whether
/// the pipeline's commits fail (which holds every source back).
#[derive(Debug, Clone, Default)]
pub struct Health {
    sources: Arc<Mutex<std::collections::BTreeMap<String, Option<String>>>>,
    /// Why commits fail, and since when, while the pipeline retries them.
    commits: Arc<Mutex<Option<(std::time::Instant, String)>>>,
}

impl Health {
    /// `name` is reading.
    pub fn up(&self, name: &str) {
        self.set(name, None);
    }

    /// `name` is not reading, because of `reason`.
    pub fn down(&self, name: &str, reason: String) {
        self.set(name, Some(reason));
    }

    fn set(&self, name: &str, state: Option<String>) {
        let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(name) {
            Some(s) => *s = state,
            None => {
                m.insert(name.to_owned(), state);
            }
        }
    }

    /// Commits fail because of `why` (`None`: they succeed again).
    pub fn commits(&self, why: Option<String>) {
        let mut c = self.commits.lock().unwrap_or_else(|e| e.into_inner());
        *c = why.map(|w| (c.as_ref().map_or_else(std::time::Instant::now, |c| c.0), w));
    }

    /// How long commits have been failing, and why, while they do.
    pub fn commits_failing(&self) -> Option<(std::time::Duration, String)> {
        let c = self.commits.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()))
    }

    /// The sources that are down, with why.
    pub fn failing(&self) -> Vec<(String, String)> {
        let m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter_map(|(n, s)| Some((n.clone(), s.clone()?)))
            .collect()
    }
}

/// Waits for every task of a source that runs several (NATS partitions, auth-server tables)
/// and returns the first error; a task that panicked counts as failed, named by `what`.
pub(crate) async fn first_error(
    mut tasks: tokio::task::JoinSet<Result<(), SourceError>>,
    what: &str,
) -> Result<(), SourceError> {
    let mut first = Ok(());
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap_or_else(|e| {
            Err(SourceError::Io {
                path: what.into(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        if let (Err(e), true) = (r, first.is_ok()) {
            first = Err(e);
        }
    }
    first
}
