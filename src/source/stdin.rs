//! Reading request-log lines from standard input.
//!
//! This module owns turning stdin into chunks of whole lines until it closes. It never parses
//! or counts lines' contents, and it cannot resume: its chunks carry no checkpoint, so
//! nothing is ever committed on its behalf.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::lines::LineSplitter;
use super::{Chunk, SourceError};

/// Reads stdin to its end into `tx` as chunks of whole lines (about `chunk_bytes` each), the
/// last one possibly without a trailing `\n`. Returns the number of lines sent.
///
/// On cancellation it returns `Ok` at once with the lines sent so far, sending nothing more.
pub async fn run_stdin(
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
    chunk_bytes: usize,
) -> Result<u64, SourceError> {
    run_reader(tokio::io::stdin(), "stdin", tx, shutdown, chunk_bytes).await
}

/// [`run_stdin`] over any reader, so tests need not own the process's stdin.
async fn run_reader(
    reader: impl AsyncRead + Unpin,
    name: &str,
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
    chunk_bytes: usize,
) -> Result<u64, SourceError> {
    let mut sent = 0;
    // Cancelling by dropping the reading future: a read blocked on a quiet terminal or pipe,
    // or a send waiting on a full channel, simply never completes.
    let outcome = tokio::select! {
        biased;
        () = shutdown.cancelled() => Ok(()),
        result = read_all(reader, name, &tx, chunk_bytes, &mut sent) => result,
    };
    outcome.map(|()| sent)
}

async fn read_all(
    mut reader: impl AsyncRead + Unpin,
    name: &str,
    tx: &Sender<Chunk>,
    chunk_bytes: usize,
    sent: &mut u64,
) -> Result<(), SourceError> {
    let source: Arc<str> = Arc::from(name);
    let mut splitter = LineSplitter::new(0, 0);
    let mut buf = vec![0; chunk_bytes.max(1)];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(SourceError::Io {
                    path: name.to_owned(),
                    source,
                });
            }
        };
        let first_line_no = splitter.lines() + 1;
        let mut data = Vec::new();
        if n == 0 {
            splitter.finish(&mut data);
        } else {
            splitter.push(&buf[..n], &mut data);
        }
        if !data.is_empty() {
            let chunk = Chunk {
                source: Arc::clone(&source),
                data,
                first_line_no,
                checkpoint: None,
                ack: None,
                read_at: std::time::Instant::now(),
            };
            tx.send(chunk)
                .await
                .map_err(|_| SourceError::PipelineClosed)?;
            *sent = splitter.lines();
        }
        if n == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    async fn read(input: &'static [u8], chunk_bytes: usize) -> (Vec<Chunk>, u64) {
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run_reader(
            input,
            "stdin",
            tx,
            CancellationToken::new(),
            chunk_bytes,
        ));
        let mut chunks = Vec::new();
        while let Some(chunk) = timeout(WAIT, rx.recv()).await.expect("hung") {
            chunks.push(chunk);
        }
        let lines = task.await.expect("task panicked").expect("read failed");
        (chunks, lines)
    }

    #[tokio::test]
    async fn reads_lines_and_a_final_unterminated_one() {
        let (chunks, lines) = read(b"one\ntwo\nthree", 5).await;
        assert_eq!(lines, 3);
        let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, b"one\ntwo\nthree");
        let mut next = 1;
        for chunk in &chunks {
            assert_eq!(&*chunk.source, "stdin");
            assert_eq!(chunk.checkpoint, None);
            assert_eq!(chunk.first_line_no, next);
            next += chunk
                .data
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count() as u64;
        }
        assert_eq!(
            chunks.last().map(|c| c.data.as_slice()),
            Some(&b"three"[..])
        );
    }

    #[tokio::test]
    async fn empty_input_sends_nothing() {
        let (chunks, lines) = read(b"", 16).await;
        assert!(chunks.is_empty());
        assert_eq!(lines, 0);
    }

    #[tokio::test]
    async fn shutdown_interrupts_a_quiet_input() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_reader(reader, "stdin", tx, stop.clone(), 64));
        writer.write_all(b"a\nb").await.expect("write");
        let chunk = timeout(WAIT, rx.recv())
            .await
            .expect("hung")
            .expect("chunk");
        assert_eq!(chunk.data, b"a\n");
        stop.cancel();
        let lines = timeout(WAIT, task)
            .await
            .expect("did not stop")
            .expect("panicked");
        assert_eq!(lines.expect("read failed"), 1);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_closed_pipeline_stops_the_source() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let result = run_reader(&b"a\n"[..], "stdin", tx, CancellationToken::new(), 16).await;
        assert!(
            matches!(result, Err(SourceError::PipelineClosed)),
            "{result:?}"
        );
    }
}
