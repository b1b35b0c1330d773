//! Sources: where request-log lines come from (tailed files, stdin).
//!
//! A source only moves bytes. It cuts its input into [`Chunk`]s of whole lines, says where it
//! stands after each chunk (a [`Checkpoint`]), and sends the chunks down a bounded channel, so a
//! slow pipeline holds the source back instead of filling memory. It never parses, resolves or
//! counts, and never writes a checkpoint itself: the pipeline commits a chunk's checkpoint in
//! the same transaction as the counts of its lines.

pub mod file;
pub mod lines;
pub mod stdin;

use std::future::Future;
use std::sync::Arc;

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
}

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
}
