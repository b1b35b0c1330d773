//! Tailing one log file by name, with `tail -F` semantics.
//!
//! This module owns a file's identity (a fingerprint of its first line), where reading
//! resumes (a committed checkpoint, looked up by fingerprint), and the follow loop: appends,
//! copy-truncate, rename-rotation, deletion and odd things appearing at the path. It sends
//! whole lines with the checkpoint after them and nothing else: it never parses or counts
//! lines' contents, and it never writes a checkpoint (the pipeline commits one together with
//! the counts of the lines before it).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::lines::LineSplitter;
use super::{Checkpoint, CheckpointReader, Chunk, SourceError};
use crate::event::MAX_LINE_BYTES;

/// How many files' last sent positions a source remembers (see `Tailer::sent`).
const SENT_REMEMBERED: usize = 16;
/// The longest wait between two attempts to read a checkpoint from a failing database.
const MAX_CHECKPOINT_RETRY: Duration = Duration::from_secs(5);

/// How much of the first line goes into the fingerprint. A first line at least this long is
/// identified by its first 8 KiB, which no later write can change.
const FINGERPRINT_BYTES: usize = 8 * 1024;

/// How a file source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// Keep reading as the file grows and follow it across rotation (`tail -F`); otherwise
    /// read to the end once and stop.
    pub follow: bool,
    /// For a file that has no checkpoint and is at the path when the source starts, skip the
    /// lines already in it. Files rotated in later are always read from their beginning.
    pub start_at_end: bool,
    /// How often to look for new data, truncation and rotation once at the end of the file.
    pub poll_interval: Duration,
    /// Roughly how many bytes of lines go into one [`Chunk`].
    pub chunk_bytes: usize,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            follow: true,
            start_at_end: false,
            poll_interval: Duration::from_millis(200),
            chunk_bytes: 1024 * 1024,
        }
    }
}

/// What a file source did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSummary {
    /// Bytes read from files (including bytes of over-long lines that were cut away).
    pub bytes_read: u64,
    /// Lines sent down the channel.
    pub lines: u64,
    /// Files opened at the path: 1, plus one per rotation or re-creation.
    pub files_opened: u64,
}

/// Reads the file at `path` into `tx` as chunks of whole lines, each with the checkpoint
/// after it, until the end of the file (batch mode) or until `shutdown` is cancelled
/// (follow mode).
///
/// Reading starts where the checkpoint for the file's fingerprint says, if `checkpoints` has
/// one. Missing or unusable paths are waited for in follow mode and are an error in batch
/// mode. On cancellation it returns `Ok` at once, without sending anything more.
pub async fn run_file(
    path: PathBuf,
    opts: FileOptions,
    checkpoints: Arc<impl CheckpointReader>,
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
) -> Result<FileSummary, SourceError> {
    let mut tailer = Tailer::new(path, opts, checkpoints, tx);
    // Cancelling by dropping the reading future means every await inside it is a prompt
    // stopping point, and a send that was waiting on a full channel never happens.
    let outcome = tokio::select! {
        biased;
        () = shutdown.cancelled() => Ok(()),
        result = tailer.run() => result,
    };
    outcome.map(|()| tailer.summary)
}

/// What the path currently names, as last logged, so that a lasting condition is logged
/// once rather than at every poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathState {
    Usable,
    Missing,
    Unusable(io::ErrorKind),
}

/// The open file being read.
struct Open {
    file: Arc<File>,
    dev: u64,
    ino: u64,
    /// Next byte to read.
    pos: u64,
    /// Set once the file has a fingerprint and reading has started.
    track: Option<Track>,
    /// Whether `start_at_end` applies to this file (it was at the path at startup).
    start_at_end: bool,
    /// The fingerprint the file had before it was truncated: its checkpoints describe the
    /// old content, so they must not place us in the new one.
    stale_fingerprint: Option<String>,
}

struct Track {
    fingerprint: String,
    splitter: LineSplitter,
    /// The fingerprint was taken from content known to be final (batch mode, or a file
    /// rotated away), possibly without a complete first line: nothing will rewrite it.
    final_content: bool,
}

impl Open {
    /// Forgets the old content of a file that was truncated or rewritten in place.
    fn start_over(&mut self) {
        self.stale_fingerprint = self.track.take().map(|t| t.fingerprint);
        self.pos = 0;
        self.start_at_end = false;
    }
}

/// What to do after one pass over the open file.
enum Next {
    /// The path names another file now: open it.
    Reopen,
    /// Batch mode reached the end.
    Done,
}

struct Tailer<C> {
    path: PathBuf,
    /// The path as given, for logs and checkpoints.
    display: String,
    source: Arc<str>,
    opts: FileOptions,
    checkpoints: Arc<C>,
    tx: Sender<Chunk>,
    summary: FileSummary,
    path_state: PathState,
    /// Read buffer, reused across reads.
    buf: Vec<u8>,
    /// Where the last line sent of each recent file ends (fingerprint, offset, line number).
    /// Sent lines are in the pipeline and will be committed, so a file opened again within
    /// this process (after a read error, or put back at the path) resumes after them rather
    /// than at its committed checkpoint, which lags behind by up to a batch.
    sent: std::collections::VecDeque<(String, u64, u64)>,
}

impl<C: CheckpointReader> Tailer<C> {
    fn new(path: PathBuf, mut opts: FileOptions, checkpoints: Arc<C>, tx: Sender<Chunk>) -> Self {
        opts.chunk_bytes = opts.chunk_bytes.max(1);
        let display = path.display().to_string();
        Tailer {
            source: Arc::from(format!("file:{display}")),
            path,
            display,
            opts,
            checkpoints,
            tx,
            summary: FileSummary::default(),
            path_state: PathState::Usable,
            buf: Vec::new(),
            sent: Default::default(),
        }
    }

    async fn run(&mut self) -> Result<(), SourceError> {
        let mut at_startup = true;
        loop {
            let open = self.open_path(at_startup).await?;
            at_startup = false;
            match self.read_file(open).await {
                Ok(Next::Reopen) => continue,
                Ok(Next::Done) => return Ok(()),
                Err(SourceError::Io { source, .. }) if self.opts.follow => {
                    // The open file failed to read (a disk error, a file system going away):
                    // open the path again, which resumes after the last line sent when it
                    // still names the same file.
                    self.note_path(state_of(&source), Some(&source));
                    tokio::time::sleep(self.opts.poll_interval).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The committed checkpoint of `fingerprint`. Following, a database that does not answer
    /// is waited for (logged once): the pipeline holds back meanwhile anyway.
    async fn committed(&mut self, fingerprint: &str) -> Result<Option<Checkpoint>, SourceError> {
        let mut delay = Duration::from_millis(250);
        let mut failed = false;
        loop {
            match self.checkpoints.checkpoint(fingerprint).await {
                Ok(cp) => {
                    if failed {
                        tracing::info!(path = %self.display, "Read the file's checkpoint; reading resumes.");
                    }
                    return Ok(cp);
                }
                Err(e) if !self.opts.follow => return Err(e.into()),
                Err(e) => {
                    if !failed {
                        tracing::warn!(path = %self.display, error = %e, "Cannot read the file's checkpoint; retrying until the database answers.");
                        failed = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_CHECKPOINT_RETRY);
                }
            }
        }
    }

    /// The later of the committed checkpoint `cp` and where this process last sent lines of
    /// the file up to.
    fn resume_point(&self, fingerprint: &str, cp: Option<Checkpoint>) -> Option<Checkpoint> {
        let sent = self.sent.iter().find(|s| s.0 == fingerprint);
        match (cp, sent) {
            (Some(cp), Some(s)) if cp.offset >= s.1 => Some(cp),
            (cp, Some((fp, offset, line_no))) => Some(Checkpoint {
                fingerprint: fp.clone(),
                path: self.display.clone(),
                offset: *offset,
                line_no: *line_no,
                seen: cp.map(|c| c.seen).unwrap_or_default(),
            }),
            (cp, None) => cp,
        }
    }

    /// Remembers that lines of `fingerprint` were sent up to `offset`.
    fn note_sent(&mut self, fingerprint: &str, offset: u64, line_no: u64) {
        self.forget_sent(fingerprint);
        if self.sent.len() >= SENT_REMEMBERED {
            self.sent.pop_front();
        }
        self.sent
            .push_back((fingerprint.to_owned(), offset, line_no));
    }

    fn forget_sent(&mut self, fingerprint: &str) {
        self.sent.retain(|s| s.0 != fingerprint);
    }

    /// Opens the regular file at the path, waiting for one in follow mode.
    async fn open_path(&mut self, at_startup: bool) -> Result<Open, SourceError> {
        let mut waited = false;
        loop {
            match open_regular(self.path.clone()).await {
                Ok((file, dev, ino)) => {
                    self.note_path(PathState::Usable, None);
                    self.summary.files_opened += 1;
                    tracing::debug!(path = %self.display, "Opened the file.");
                    return Ok(Open {
                        file: Arc::new(file),
                        dev,
                        ino,
                        pos: 0,
                        track: None,
                        start_at_end: self.opts.start_at_end && at_startup && !waited,
                        stale_fingerprint: None,
                    });
                }
                Err(e) if !self.opts.follow => return Err(self.io_error(e)),
                Err(e) => {
                    self.note_path(state_of(&e), Some(&e));
                    waited = true;
                    tokio::time::sleep(self.opts.poll_interval).await;
                }
            }
        }
    }

    /// Reads one open file until the end (batch) or until the path names another file.
    async fn read_file(&mut self, mut f: Open) -> Result<Next, SourceError> {
        loop {
            if f.track.is_none() {
                let tracked = self.start_tracking(&mut f, !self.opts.follow).await?;
                if !tracked && !self.opts.follow {
                    // Batch mode accepts a partial first line, so only an empty file is left.
                    return Ok(Next::Done);
                }
            }
            if !self.drain(&mut f).await? {
                continue;
            }
            if !self.opts.follow {
                self.finish(&mut f).await?;
                return Ok(Next::Done);
            }

            if self.path_replaced(&f).await {
                // The writer has moved on to the new file, so whatever the old one holds now
                // is all it will ever hold, including an unterminated last line.
                if f.track.is_none() {
                    self.start_tracking(&mut f, true).await?;
                }
                self.drain(&mut f).await?;
                self.finish(&mut f).await?;
                tracing::info!(path = %self.display, "File was rotated; reading the new file.");
                return Ok(Next::Reopen);
            }

            tokio::time::sleep(self.opts.poll_interval).await;
            self.check_truncated(&mut f).await?;
        }
    }

    /// Gives the file its fingerprint and decides where reading starts. Returns false while
    /// it cannot have one yet (no complete first line, unless `allow_partial`).
    async fn start_tracking(
        &mut self,
        f: &mut Open,
        allow_partial: bool,
    ) -> Result<bool, SourceError> {
        let fingerprint = match fingerprint(&f.file, allow_partial).await {
            Ok(Some(fp)) => fp,
            Ok(None) => return Ok(false),
            Err(e) => return Err(self.io_error(e)),
        };
        let len = file_len(&f.file).await.map_err(|e| self.io_error(e))?;
        let found = if f.stale_fingerprint.as_deref() == Some(fingerprint.as_str()) {
            None
        } else {
            let committed = self.committed(&fingerprint).await?;
            self.resume_point(&fingerprint, committed)
        };
        let (offset, line_no) = match found {
            Some(cp) if cp.offset <= len => {
                tracing::info!(
                    path = %self.display,
                    offset = cp.offset,
                    line_no = cp.line_no,
                    "Resuming the file from its checkpoint."
                );
                (cp.offset, cp.line_no)
            }
            Some(cp) => {
                // Same first line but less content than we had read: a different file that
                // happens to start the same way, or one truncated while we were not running.
                tracing::warn!(
                    path = %self.display,
                    offset = cp.offset,
                    len,
                    "Checkpoint is past the end of the file; reading it from the start."
                );
                (0, 0)
            }
            None if f.start_at_end => {
                let start = end_of_last_line(&f.file, len)
                    .await
                    .map_err(|e| self.io_error(e))?;
                (start, 0)
            }
            None => (0, 0),
        };
        f.pos = offset;
        f.track = Some(Track {
            fingerprint,
            splitter: LineSplitter::new(offset, line_no),
            final_content: allow_partial,
        });
        Ok(true)
    }

    /// Reads and sends everything up to the current end of the file. Returns false if it
    /// found the file rewritten in place instead (and reset `f` to read the new content).
    async fn drain(&mut self, f: &mut Open) -> Result<bool, SourceError> {
        let Some(track) = f.track.as_mut() else {
            return Ok(true);
        };
        loop {
            let buf = std::mem::take(&mut self.buf);
            let (buf, read) = read_at(&f.file, f.pos, buf, self.opts.chunk_bytes).await;
            self.buf = buf;
            let n = read.map_err(|e| self.io_error(e))?;
            if n == 0 {
                return Ok(true);
            }
            if !track.final_content {
                // Truncated and refilled past our offset between two polls, the file looks
                // merely grown; only its first line tells. Checked after the read, so bytes
                // of new content read at the old offset are never sent.
                let now = fingerprint(&f.file, false)
                    .await
                    .map_err(|e| self.io_error(e))?;
                if now.as_deref() != Some(track.fingerprint.as_str()) {
                    tracing::warn!(path = %self.display, "File was rewritten in place; reading it again from the start.");
                    let old = track.fingerprint.clone();
                    self.forget_sent(&old);
                    f.start_over();
                    return Ok(false);
                }
            }
            f.pos += n as u64;
            self.summary.bytes_read += n as u64;
            let first_line_no = track.splitter.lines() + 1;
            let mut data = Vec::with_capacity(n);
            if track.splitter.push(&self.buf[..n], &mut data) > 0 {
                self.send(track, data, first_line_no).await?;
            }
        }
    }

    /// Sends the unterminated last line of a file that will not grow any more.
    async fn finish(&mut self, f: &mut Open) -> Result<(), SourceError> {
        let Some(track) = f.track.as_mut() else {
            return Ok(());
        };
        let first_line_no = track.splitter.lines() + 1;
        let mut data = Vec::new();
        if track.splitter.finish(&mut data) {
            self.send(track, data, first_line_no).await?;
        }
        Ok(())
    }

    async fn send(
        &mut self,
        track: &Track,
        data: Vec<u8>,
        first_line_no: u64,
    ) -> Result<(), SourceError> {
        let line_no = track.splitter.lines();
        let chunk = Chunk {
            source: Arc::clone(&self.source),
            data,
            first_line_no,
            checkpoint: Some(Checkpoint {
                fingerprint: track.fingerprint.clone(),
                path: self.display.clone(),
                offset: track.splitter.offset(),
                line_no,
                seen: Vec::new(),
            }),
            ack: None,
            read_at: std::time::Instant::now(),
        };
        self.tx
            .send(chunk)
            .await
            .map_err(|_| SourceError::PipelineClosed)?;
        self.note_sent(&track.fingerprint, track.splitter.offset(), line_no);
        self.summary.lines += line_no + 1 - first_line_no;
        Ok(())
    }

    /// Notices copy-truncate (the file is now shorter than what we read) and starts over
    /// on the new content.
    async fn check_truncated(&mut self, f: &mut Open) -> Result<(), SourceError> {
        if f.track.is_none() {
            return Ok(());
        }
        let len = file_len(&f.file).await.map_err(|e| self.io_error(e))?;
        if len < f.pos {
            tracing::warn!(path = %self.display, len, offset = f.pos, "File was truncated; reading it again from the start.");
            if let Some(t) = &f.track {
                let old = t.fingerprint.clone();
                self.forget_sent(&old);
            }
            f.start_over();
        }
        Ok(())
    }

    /// Whether the path now names a different regular file than the one open. Logs, once
    /// per change, a path that is missing or unusable; the open file keeps being read.
    async fn path_replaced(&mut self, f: &Open) -> bool {
        match tokio::fs::metadata(&self.path).await {
            Ok(meta) if meta.is_file() => {
                if (meta.dev(), meta.ino()) == (f.dev, f.ino) {
                    self.note_path(PathState::Usable, None);
                    false
                } else {
                    true
                }
            }
            Ok(meta) => {
                let e = not_regular(&meta);
                self.note_path(state_of(&e), Some(&e));
                false
            }
            Err(e) => {
                self.note_path(state_of(&e), Some(&e));
                false
            }
        }
    }

    fn note_path(&mut self, state: PathState, error: Option<&io::Error>) {
        if state == self.path_state {
            return;
        }
        self.path_state = state;
        match (state, error) {
            (PathState::Usable, _) => {
                tracing::info!(path = %self.display, "Path names a readable file again.");
            }
            (PathState::Missing, _) => {
                tracing::warn!(path = %self.display, "File is missing; waiting for it to appear.");
            }
            (PathState::Unusable(_), Some(e)) => {
                tracing::warn!(path = %self.display, error = %e, "Cannot read the path; retrying.");
            }
            (PathState::Unusable(_), None) => {
                tracing::warn!(path = %self.display, "Cannot read the path; retrying.");
            }
        }
    }

    fn io_error(&self, source: io::Error) -> SourceError {
        SourceError::Io {
            path: self.display.clone(),
            source,
        }
    }
}

fn state_of(e: &io::Error) -> PathState {
    match e.kind() {
        io::ErrorKind::NotFound => PathState::Missing,
        kind => PathState::Unusable(kind),
    }
}

fn not_regular(meta: &std::fs::Metadata) -> io::Error {
    if meta.is_dir() {
        io::Error::new(io::ErrorKind::IsADirectory, "the path is a directory")
    } else {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path is not a regular file",
        )
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// Opens the path, refusing anything but a regular file (a directory or FIFO there would
/// fail or block later instead). Returns the file with its device and inode.
async fn open_regular(path: PathBuf) -> io::Result<(File, u64, u64)> {
    blocking(move || {
        // Looked at before opening too: opening a FIFO for reading would block until a
        // writer comes.
        let before = std::fs::metadata(&path)?;
        if !before.is_file() {
            return Err(not_regular(&before));
        }
        let file = File::open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(not_regular(&meta));
        }
        Ok((file, meta.dev(), meta.ino()))
    })
    .await
}

async fn file_len(file: &Arc<File>) -> io::Result<u64> {
    let file = Arc::clone(file);
    blocking(move || Ok(file.metadata()?.len())).await
}

/// Reads up to `want` bytes at `pos` into `buf` (resized to `want`); returns the buffer
/// back for reuse along with the count. Positioned reads keep no cursor in the handle, so
/// our own offset is the only truth about where we are.
async fn read_at(
    file: &Arc<File>,
    pos: u64,
    mut buf: Vec<u8>,
    want: usize,
) -> (Vec<u8>, io::Result<usize>) {
    let file = Arc::clone(file);
    let joined = tokio::task::spawn_blocking(move || {
        buf.resize(want, 0);
        let read = loop {
            match file.read_at(&mut buf, pos) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        (buf, read)
    })
    .await;
    joined.unwrap_or_else(|e| (Vec::new(), Err(io::Error::other(e))))
}

/// Reads up to `len` bytes at `pos`, fewer only at the end of the file.
async fn read_up_to(file: &Arc<File>, pos: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = Arc::clone(file);
    blocking(move || {
        let mut buf = vec![0; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut buf[got..], pos + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    })
    .await
}

/// The file's identity: the hex of the first 16 bytes of the SHA-256 of its first line
/// (without the `\n`, at most [`FINGERPRINT_BYTES`] of it). `None` while the first line is
/// incomplete, unless `allow_partial` says the content is final (then any non-empty
/// content will do).
async fn fingerprint(file: &Arc<File>, allow_partial: bool) -> io::Result<Option<String>> {
    let head = read_up_to(file, 0, FINGERPRINT_BYTES).await?;
    let first_line = match memchr::memchr(b'\n', &head) {
        Some(i) => &head[..i],
        None if head.len() == FINGERPRINT_BYTES => &head[..],
        None if allow_partial && !head.is_empty() => &head[..],
        None => return Ok(None),
    };
    Ok(Some(fingerprint_of(first_line)))
}

fn fingerprint_of(first_line: &[u8]) -> String {
    let digest = Sha256::digest(first_line);
    hex::encode(&digest[..16])
}

/// Where to start when skipping existing content: just after the last complete line, so
/// a line being written right now is read whole. If no newline is found within a line's
/// length of the end, the line in progress is over-long anyway and we start at the end.
async fn end_of_last_line(file: &Arc<File>, len: u64) -> io::Result<u64> {
    let window = (MAX_LINE_BYTES as u64 + 1).min(len);
    let start = len - window;
    let tail = read_up_to(file, start, window as usize).await?;
    Ok(match memchr::memrchr(b'\n', &tail) {
        Some(i) => start + i as u64 + 1,
        None if start == 0 => 0,
        None => len,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::future::Future;
    use std::io::Write;
    use std::path::Path;
    use std::sync::Mutex;

    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;
    use crate::store::StoreError;

    const POLL: Duration = Duration::from_millis(20);
    const WAIT: Duration = Duration::from_secs(5);

    #[derive(Default)]
    struct MapCheckpoints(Mutex<HashMap<String, Checkpoint>>);

    impl MapCheckpoints {
        fn insert(&self, cp: Checkpoint) {
            if let Ok(mut map) = self.0.lock() {
                map.insert(cp.fingerprint.clone(), cp);
            }
        }
    }

    impl CheckpointReader for MapCheckpoints {
        fn checkpoint(
            &self,
            fingerprint: &str,
        ) -> impl Future<Output = Result<Option<Checkpoint>, StoreError>> + Send {
            let found = self.0.lock().ok().and_then(|m| m.get(fingerprint).cloned());
            async move { Ok(found) }
        }
    }

    /// One received line: its number, its text (without `\n`), and the fingerprint of the
    /// chunk it came in.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Line {
        no: u64,
        text: String,
        fingerprint: String,
    }

    fn opts(follow: bool) -> FileOptions {
        FileOptions {
            follow,
            start_at_end: false,
            poll_interval: POLL,
            chunk_bytes: 16,
        }
    }

    /// Checks a chunk's invariants and splits it into lines.
    fn lines_of(chunk: &Chunk, path: &Path) -> Vec<Line> {
        assert_eq!(&*chunk.source, format!("file:{}", path.display()));
        let cp = chunk
            .checkpoint
            .as_ref()
            .expect("file chunks carry a checkpoint");
        assert_eq!(cp.path, path.display().to_string());
        let mut texts: Vec<&[u8]> = chunk.data.split(|&b| b == b'\n').collect();
        if chunk.data.ends_with(b"\n") {
            texts.pop();
        }
        assert!(!texts.is_empty(), "empty chunk");
        assert_eq!(cp.line_no, chunk.first_line_no + texts.len() as u64 - 1);
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Line {
                no: chunk.first_line_no + i as u64,
                text: String::from_utf8_lossy(t).into_owned(),
                fingerprint: cp.fingerprint.clone(),
            })
            .collect()
    }

    fn texts(lines: &[Line]) -> Vec<(u64, &str)> {
        lines.iter().map(|l| (l.no, l.text.as_str())).collect()
    }

    /// Runs a batch read to completion and returns its chunks and summary.
    async fn batch(
        path: &Path,
        cps: &Arc<MapCheckpoints>,
    ) -> (Vec<Chunk>, Result<FileSummary, SourceError>) {
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run_file(
            path.to_path_buf(),
            opts(false),
            Arc::clone(cps),
            tx,
            CancellationToken::new(),
        ));
        let mut chunks = Vec::new();
        let collect = async {
            while let Some(c) = rx.recv().await {
                chunks.push(c);
            }
        };
        timeout(WAIT, collect).await.expect("batch read hung");
        let result = timeout(WAIT, task)
            .await
            .expect("batch read hung")
            .expect("task panicked");
        (chunks, result)
    }

    fn all_lines(chunks: &[Chunk], path: &Path) -> Vec<Line> {
        chunks.iter().flat_map(|c| lines_of(c, path)).collect()
    }

    /// A follow-mode source running in the background.
    struct Follower {
        rx: mpsc::Receiver<Chunk>,
        path: PathBuf,
        stop: CancellationToken,
        task: JoinHandle<Result<FileSummary, SourceError>>,
        last: Option<Checkpoint>,
    }

    impl Follower {
        fn start(path: &Path, opts: FileOptions, cps: Arc<MapCheckpoints>) -> Self {
            let (tx, rx) = mpsc::channel(8);
            let stop = CancellationToken::new();
            let task = tokio::spawn(run_file(path.to_path_buf(), opts, cps, tx, stop.clone()));
            Follower {
                rx,
                path: path.to_path_buf(),
                stop,
                task,
                last: None,
            }
        }

        /// Receives exactly `n` lines (failing after a timeout).
        async fn lines(&mut self, n: usize) -> Vec<Line> {
            let mut got = Vec::new();
            while got.len() < n {
                let chunk = timeout(WAIT, self.rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("timed out with {got:?}"))
                    .expect("source stopped");
                got.extend(lines_of(&chunk, &self.path));
                self.last = chunk.checkpoint;
            }
            assert_eq!(got.len(), n, "more lines than expected: {got:?}");
            got
        }

        /// Asserts nothing more arrives for a few polls.
        async fn quiet(&mut self) {
            if let Ok(Some(chunk)) = timeout(POLL * 8, self.rx.recv()).await {
                panic!("unexpected lines: {:?}", lines_of(&chunk, &self.path));
            }
        }

        async fn stop(self) -> FileSummary {
            self.stop.cancel();
            timeout(WAIT, self.task)
                .await
                .expect("source did not stop")
                .expect("task panicked")
                .expect("source failed")
        }
    }

    fn write(path: &Path, data: &[u8]) {
        std::fs::write(path, data).expect("write file");
    }

    fn append(path: &Path, data: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open for append");
        f.write_all(data).expect("append");
    }

    fn fresh() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        (dir, path)
    }

    #[tokio::test]
    async fn batch_reads_a_file_with_a_trailing_newline() {
        let (_dir, path) = fresh();
        let content = b"first line\nsecond line, a bit longer than a chunk\nthird\n";
        write(&path, content);
        let (chunks, result) = batch(&path, &Arc::default()).await;
        let summary = result.expect("batch read");
        let lines = all_lines(&chunks, &path);
        assert_eq!(
            texts(&lines),
            [
                (1, "first line"),
                (2, "second line, a bit longer than a chunk"),
                (3, "third")
            ]
        );
        assert!(chunks.len() > 1, "chunk_bytes should split the input");
        for chunk in &chunks {
            assert!(chunk.data.ends_with(b"\n"));
        }
        let last = chunks
            .last()
            .and_then(|c| c.checkpoint.clone())
            .expect("checkpoint");
        assert_eq!((last.offset, last.line_no), (content.len() as u64, 3));
        assert_eq!(last.fingerprint, fingerprint_of(b"first line"));
        assert_eq!(
            summary,
            FileSummary {
                bytes_read: content.len() as u64,
                lines: 3,
                files_opened: 1
            }
        );
    }

    #[tokio::test]
    async fn batch_reads_a_last_line_without_a_newline() {
        let (_dir, path) = fresh();
        write(&path, b"a\nb\nunterminated");
        let (chunks, result) = batch(&path, &Arc::default()).await;
        assert_eq!(result.expect("batch read").lines, 3);
        let lines = all_lines(&chunks, &path);
        assert_eq!(texts(&lines), [(1, "a"), (2, "b"), (3, "unterminated")]);
        let last = chunks.last().expect("chunks");
        assert_eq!(last.data, b"unterminated");
        assert_eq!(last.checkpoint.as_ref().map(|c| c.offset), Some(16));
    }

    #[tokio::test]
    async fn batch_reads_a_file_without_any_newline_as_one_line() {
        let (_dir, path) = fresh();
        write(&path, b"only");
        let (chunks, result) = batch(&path, &Arc::default()).await;
        result.expect("batch read");
        let lines = all_lines(&chunks, &path);
        assert_eq!(texts(&lines), [(1, "only")]);
        assert_eq!(lines[0].fingerprint, fingerprint_of(b"only"));
    }

    #[tokio::test]
    async fn batch_reads_nothing_from_an_empty_file() {
        let (_dir, path) = fresh();
        write(&path, b"");
        let (chunks, result) = batch(&path, &Arc::default()).await;
        assert!(chunks.is_empty());
        assert_eq!(result.expect("batch read").lines, 0);
    }

    #[tokio::test]
    async fn batch_fails_on_a_missing_file_or_a_directory() {
        let (dir, path) = fresh();
        let (_, result) = batch(&path, &Arc::default()).await;
        assert!(matches!(result, Err(SourceError::Io { .. })), "{result:?}");
        let (_, result) = batch(dir.path(), &Arc::default()).await;
        assert!(matches!(result, Err(SourceError::Io { .. })), "{result:?}");
    }

    #[tokio::test]
    async fn resumes_from_a_checkpoint() {
        let (_dir, path) = fresh();
        write(&path, b"one\ntwo\nthree\n");
        let cps = Arc::new(MapCheckpoints::default());
        let (chunks, result) = batch(&path, &cps).await;
        result.expect("first read");
        cps.insert(
            chunks
                .last()
                .and_then(|c| c.checkpoint.clone())
                .expect("checkpoint"),
        );

        let (chunks, result) = batch(&path, &cps).await;
        assert!(
            chunks.is_empty(),
            "re-emitted {:?}",
            all_lines(&chunks, &path)
        );
        assert_eq!(result.expect("unchanged read").bytes_read, 0);

        append(&path, b"four\nfive\n");
        let (chunks, result) = batch(&path, &cps).await;
        result.expect("read after append");
        assert_eq!(
            texts(&all_lines(&chunks, &path)),
            [(4, "four"), (5, "five")]
        );
        let last = chunks
            .last()
            .and_then(|c| c.checkpoint.clone())
            .expect("checkpoint");
        assert_eq!((last.offset, last.line_no), (24, 5));
    }

    #[tokio::test]
    async fn ignores_a_checkpoint_past_the_end_of_the_file() {
        let (_dir, path) = fresh();
        write(&path, b"one\ntwo\n");
        let cps = Arc::new(MapCheckpoints::default());
        cps.insert(Checkpoint {
            fingerprint: fingerprint_of(b"one"),
            path: path.display().to_string(),
            offset: 1000,
            line_no: 50,
            seen: Vec::new(),
        });
        let (chunks, result) = batch(&path, &cps).await;
        result.expect("batch read");
        assert_eq!(texts(&all_lines(&chunks, &path)), [(1, "one"), (2, "two")]);
    }

    #[tokio::test]
    async fn cuts_a_line_longer_than_the_limit() {
        let (_dir, path) = fresh();
        let mut content = b"{\"first\":1}\n".to_vec();
        content.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE_BYTES));
        content.extend_from_slice(b"\nafter\n");
        write(&path, &content);
        let (tx, mut rx) = mpsc::channel(64);
        let options = FileOptions {
            chunk_bytes: 4096,
            ..opts(false)
        };
        let task = tokio::spawn(run_file(
            path.clone(),
            options,
            Arc::new(MapCheckpoints::default()),
            tx,
            CancellationToken::new(),
        ));
        let mut data = Vec::new();
        let mut last = None;
        while let Some(chunk) = timeout(WAIT, rx.recv()).await.expect("hung") {
            data.extend_from_slice(&chunk.data);
            last = chunk.checkpoint;
        }
        let summary = task.await.expect("task panicked").expect("batch read");
        let got: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], b"{\"first\":1}");
        assert_eq!(got[1].len(), MAX_LINE_BYTES + 1);
        assert_eq!(got[2], b"after");
        let last = last.expect("checkpoint");
        assert_eq!((last.offset, last.line_no), (content.len() as u64, 3));
        assert_eq!(summary.bytes_read, content.len() as u64);
    }

    #[tokio::test]
    async fn follows_appends_and_waits_for_whole_lines() {
        let (_dir, path) = fresh();
        write(&path, b"a\nb\n");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        assert_eq!(texts(&f.lines(2).await), [(1, "a"), (2, "b")]);
        append(&path, b"half");
        f.quiet().await;
        append(&path, b" and half\nd\n");
        assert_eq!(texts(&f.lines(2).await), [(3, "half and half"), (4, "d")]);
        f.quiet().await;
        let summary = f.stop().await;
        assert_eq!(
            (summary.lines, summary.bytes_read, summary.files_opened),
            (4, 20, 1)
        );
    }

    #[tokio::test]
    async fn waits_for_the_first_line_before_reading() {
        let (_dir, path) = fresh();
        write(&path, b"");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        f.quiet().await;
        append(&path, b"partial first");
        f.quiet().await;
        append(&path, b" line\nsecond\n");
        let lines = f.lines(2).await;
        assert_eq!(texts(&lines), [(1, "partial first line"), (2, "second")]);
        assert_eq!(lines[0].fingerprint, fingerprint_of(b"partial first line"));
        f.stop().await;
    }

    #[tokio::test]
    async fn start_at_end_skips_existing_lines_but_not_a_partial_one() {
        let (_dir, path) = fresh();
        write(&path, b"old 1\nold 2\nnew ");
        let options = FileOptions {
            start_at_end: true,
            ..opts(true)
        };
        let mut f = Follower::start(&path, options, Arc::default());
        f.quiet().await;
        append(&path, b"1\nnew 2\n");
        assert_eq!(texts(&f.lines(2).await), [(1, "new 1"), (2, "new 2")]);
        assert_eq!(f.last.as_ref().map(|c| c.offset), Some(24));
        f.stop().await;
    }

    #[tokio::test]
    async fn follow_resumes_from_a_checkpoint() {
        let (_dir, path) = fresh();
        write(&path, b"one\ntwo\n");
        let cps = Arc::new(MapCheckpoints::default());
        cps.insert(Checkpoint {
            fingerprint: fingerprint_of(b"one"),
            path: path.display().to_string(),
            offset: 4,
            line_no: 1,
            seen: Vec::new(),
        });
        let options = FileOptions {
            start_at_end: true,
            ..opts(true)
        };
        let mut f = Follower::start(&path, options, cps);
        assert_eq!(texts(&f.lines(1).await), [(2, "two")]);
        f.quiet().await;
        f.stop().await;
    }

    #[tokio::test]
    async fn follows_rename_rotation() {
        let (dir, path) = fresh();
        write(&path, b"old 1\nold 2\n");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        let first = f.lines(2).await;
        assert_eq!(texts(&first), [(1, "old 1"), (2, "old 2")]);

        // The writer keeps its handle across the rename until the new file exists.
        let mut writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open writer");
        std::fs::rename(&path, dir.path().join("access.log.1")).expect("rename");
        tokio::time::sleep(POLL * 3).await;
        writer
            .write_all(b"old 3\nold 4 unterminated")
            .expect("write old");
        drop(writer);
        write(&path, b"new 1\n");
        let rest = f.lines(3).await;
        assert_eq!(
            texts(&rest),
            [(3, "old 3"), (4, "old 4 unterminated"), (1, "new 1")]
        );
        assert_eq!(rest[0].fingerprint, first[0].fingerprint);
        assert_eq!(rest[1].fingerprint, first[0].fingerprint);
        assert_eq!(rest[2].fingerprint, fingerprint_of(b"new 1"));

        append(&path, b"new 2\n");
        assert_eq!(texts(&f.lines(1).await), [(2, "new 2")]);
        f.quiet().await;
        let summary = f.stop().await;
        assert_eq!((summary.lines, summary.files_opened), (6, 2));
    }

    #[tokio::test]
    async fn rotation_is_noticed_while_the_old_file_is_still_written() {
        let (dir, path) = fresh();
        write(&path, b"old 1\n");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        f.lines(1).await;
        std::fs::rename(&path, dir.path().join("access.log.1")).expect("rename");
        write(&path, b"new 1\n");
        append(&dir.path().join("access.log.1"), b"old 2\n");
        let lines = f.lines(2).await;
        assert_eq!(texts(&lines), [(2, "old 2"), (1, "new 1")]);
        f.quiet().await;
        f.stop().await;
    }

    #[tokio::test]
    async fn follows_copy_truncate() {
        let (_dir, path) = fresh();
        write(&path, b"before truncation 1\nbefore truncation 2\n");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        f.lines(2).await;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(0).expect("truncate");
        drop(file);
        append(&path, b"after 1\nafter 2\n");
        let lines = f.lines(2).await;
        assert_eq!(texts(&lines), [(1, "after 1"), (2, "after 2")]);
        assert_eq!(lines[0].fingerprint, fingerprint_of(b"after 1"));
        append(&path, b"after 3\n");
        assert_eq!(texts(&f.lines(1).await), [(3, "after 3")]);
        f.quiet().await;
        assert_eq!(f.last.as_ref().map(|c| c.offset), Some(24));
        f.stop().await;
    }

    #[tokio::test]
    async fn notices_a_rewrite_that_outgrew_the_old_content() {
        let (_dir, path) = fresh();
        write(&path, b"short\n");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        f.lines(1).await;
        // Truncated and refilled past the old length between two polls.
        write(&path, b"a much longer first line\nand a second\n");
        let lines = f.lines(2).await;
        assert_eq!(
            texts(&lines),
            [(1, "a much longer first line"), (2, "and a second")]
        );
        f.quiet().await;
        f.stop().await;
    }

    #[tokio::test]
    async fn truncation_to_the_same_first_line_ignores_the_old_checkpoint() {
        let (_dir, path) = fresh();
        write(&path, b"# header\nrow 1\nrow 2\n");
        let cps = Arc::new(MapCheckpoints::default());
        let mut f = Follower::start(&path, opts(true), Arc::clone(&cps));
        f.lines(3).await;
        cps.insert(f.last.clone().expect("checkpoint"));
        write(&path, b"# header\n");
        tokio::time::sleep(POLL * 4).await;
        append(&path, b"row A\nrow B\nrow C\n");
        let lines = f.lines(4).await;
        assert_eq!(
            texts(&lines),
            [(1, "# header"), (2, "row A"), (3, "row B"), (4, "row C")]
        );
        f.quiet().await;
        f.stop().await;
    }

    #[tokio::test]
    async fn follows_a_file_deleted_then_recreated() {
        let (_dir, path) = fresh();
        write(&path, b"first 1\n");
        let mut f = Follower::start(&path, opts(true), Arc::default());
        f.lines(1).await;
        std::fs::remove_file(&path).expect("remove");
        f.quiet().await;
        write(&path, b"second 1\nsecond 2\n");
        let lines = f.lines(2).await;
        assert_eq!(texts(&lines), [(1, "second 1"), (2, "second 2")]);
        f.quiet().await;
        let summary = f.stop().await;
        assert_eq!(summary.files_opened, 2);
    }

    #[tokio::test]
    async fn waits_through_a_missing_path_and_a_directory() {
        let (_dir, path) = fresh();
        let options = FileOptions {
            start_at_end: true,
            ..opts(true)
        };
        let mut f = Follower::start(&path, options, Arc::default());
        f.quiet().await;
        std::fs::create_dir(&path).expect("mkdir");
        f.quiet().await;
        std::fs::remove_dir(&path).expect("rmdir");
        // Appeared after startup, so it is read from its beginning despite start_at_end.
        write(&path, b"one\n");
        assert_eq!(texts(&f.lines(1).await), [(1, "one")]);

        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("mkdir");
        f.quiet().await;
        std::fs::remove_dir(&path).expect("rmdir");
        write(&path, b"two\n");
        assert_eq!(texts(&f.lines(1).await), [(1, "two")]);
        assert!(!f.task.is_finished());
        f.stop().await;
    }

    #[tokio::test]
    async fn follows_a_long_line_written_in_pieces() {
        let (_dir, path) = fresh();
        write(&path, b"start\n");
        let options = FileOptions {
            chunk_bytes: 8192,
            ..opts(true)
        };
        let mut f = Follower::start(&path, options, Arc::default());
        f.lines(1).await;
        for _ in 0..5 {
            append(&path, &b"y".repeat(MAX_LINE_BYTES / 2));
            tokio::time::sleep(POLL).await;
        }
        append(&path, b"\nend\n");
        let lines = f.lines(2).await;
        assert_eq!(lines[0].no, 2);
        assert_eq!(lines[0].text.len(), MAX_LINE_BYTES + 1);
        assert_eq!((lines[1].no, lines[1].text.as_str()), (3, "end"));
        let expected_offset = 6 + 5 * (MAX_LINE_BYTES / 2) as u64 + 5;
        assert_eq!(f.last.as_ref().map(|c| c.offset), Some(expected_offset));
        f.stop().await;
    }

    #[tokio::test]
    async fn shutdown_returns_promptly_even_when_the_pipeline_is_full() {
        let (_dir, path) = fresh();
        write(&path, &b"line\n".repeat(1000));
        let (tx, mut rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_file(
            path.clone(),
            opts(true),
            Arc::new(MapCheckpoints::default()),
            tx,
            stop.clone(),
        ));
        // Let the source fill the channel and block on the next send.
        tokio::time::sleep(POLL * 3).await;
        stop.cancel();
        let summary = timeout(WAIT, task)
            .await
            .expect("source did not stop")
            .expect("task panicked")
            .expect("source failed");
        let mut received = 0;
        while let Ok(chunk) = rx.try_recv() {
            received += lines_of(&chunk, &path).len() as u64;
        }
        assert_eq!(received, summary.lines);
        assert!(summary.lines < 1000);
    }

    #[tokio::test]
    async fn a_closed_pipeline_stops_the_source() {
        let (_dir, path) = fresh();
        write(&path, b"a\n");
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let result = timeout(
            WAIT,
            run_file(
                path,
                opts(true),
                Arc::new(MapCheckpoints::default()),
                tx,
                CancellationToken::new(),
            ),
        )
        .await
        .expect("hung");
        assert!(
            matches!(result, Err(SourceError::PipelineClosed)),
            "{result:?}"
        );
    }

    #[test]
    fn the_source_future_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let (tx, _rx) = mpsc::channel(1);
        let fut = run_file(
            PathBuf::from("x"),
            FileOptions::default(),
            Arc::new(MapCheckpoints::default()),
            tx,
            CancellationToken::new(),
        );
        assert_send(&fut);
    }
}
