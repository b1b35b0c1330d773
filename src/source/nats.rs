//! The NATS JetStream source, and the partition function publishers must share with it.
//!
//! Owns reading a stream's partitions (subjects `<subject>.<partition>`) through one durable
//! pull consumer each, and acking a message only after the pipeline committed the counts it
//! contributes to. It only moves bytes: it never parses a line's fields (except in
//! [`partition_of`], for publishers) and never writes a checkpoint itself.
//!
//! Exactly once, across crashes: each partition's checkpoint (fingerprint `nats:STREAM/P`)
//! holds the stream sequence of the last message committed, in the same transaction as its
//! counts. A message JetStream delivers again (a crash between the commit and the ack, an
//! ack lost) at or below that sequence is acked and skipped. Acks use JetStream's `AckAll`, so
//! one ack after a commit covers every earlier message of the partition.
//!
//! One instance at a time per partition: the checkpoint is per partition, so another instance
//! can take a partition over (same stream, same durable consumer) once its owner is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::{Checkpoint, CheckpointReader, Chunk, CommitAck, SourceError};

/// The stream read when the URL names none.
pub const DEFAULT_STREAM: &str = "PLEXMCP_REQUESTS";
/// Subjects are `<prefix>.<partition>`.
pub const DEFAULT_SUBJECT: &str = "plexmcp.requests";
/// Messages gathered into one chunk at most.
const CHUNK_MESSAGES: usize = 2_000;
/// How long a chunk waits for more messages once it has one.
const CHUNK_WAIT: Duration = Duration::from_millis(50);
/// A message not acked in this long is delivered again; well above a commit's worst case
/// while the database is reachable, and redeliveries are skipped by the checkpoint anyway.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Messages delivered and not yet acked, per partition: the chunks in the pipeline's
/// channel and the batch being committed must fit.
const MAX_ACK_PENDING: i64 = 100_000;

/// FNV-1a, 32 bits: the partition function publishers and keywatch share.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition of a request-log line among `of`: FNV-1a 32-bit of its `api_key_id` (as
/// a lowercase hyphenated UUID), or when that is null or absent of its `key_prefix` as
/// written, or of the empty string; modulo `of`. A line that is not JSON goes to the
/// partition of the empty string (it is refused and kept as a dead letter there).
pub fn partition_of(line: &[u8], of: u32) -> u32 {
    let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
    let key = match v.get("api_key_id").and_then(|k| k.as_str()) {
        Some(id) => match uuid::Uuid::parse_str(id) {
            Ok(u) => u.hyphenated().to_string(),
            Err(_) => id.to_owned(),
        },
        None => v
            .get("key_prefix")
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .to_owned(),
    };
    fnv1a_32(key.as_bytes()) % of.max(1)
}

/// What `nats://HOST:PORT?stream=S&partitions=A-B&of=N` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSpec {
    /// The server, `nats://HOST:PORT`.
    pub server: String,
    pub stream: String,
    /// Subjects are `<subject>.<partition>`.
    pub subject: String,
    /// The partitions this instance reads, in `0..of`.
    pub partitions: Vec<u32>,
    /// How many partitions the stream has.
    pub of: u32,
}

/// A `nats://` source that does not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NatsSpecError {
    #[error("--source {url:?}: {why}")]
    Bad { url: String, why: String },
}

impl NatsSpec {
    /// Parses the URL form. `of` defaults to 8, the partitions to all of them.
    pub fn parse(url: &str) -> Result<NatsSpec, NatsSpecError> {
        let bad = |why: String| NatsSpecError::Bad {
            url: url.to_owned(),
            why,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        if parsed.scheme() != "nats" {
            return Err(bad("the scheme must be nats://".into()));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| bad("no server host".into()))?;
        let server = format!("nats://{host}:{}", parsed.port().unwrap_or(4222));
        let (mut stream, mut subject) = (DEFAULT_STREAM.to_owned(), DEFAULT_SUBJECT.to_owned());
        let (mut range, mut of) = (None, 8u32);
        for (k, v) in parsed.query_pairs() {
            match &*k {
                "stream" => stream = v.into_owned(),
                "subject" => subject = v.into_owned(),
                "of" => {
                    of = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=4096).contains(n))
                        .ok_or_else(|| bad(format!("of={v:?} must be 1 to 4096")))?
                }
                "partitions" => range = Some(v.into_owned()),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?}; use stream, subject, partitions, of"
                    )));
                }
            }
        }
        if stream.is_empty() || stream.contains(['.', ' ', '*', '>']) {
            return Err(bad(format!("stream={stream:?} is not a stream name")));
        }
        if subject.is_empty() || subject.contains([' ', '*', '>']) {
            return Err(bad(format!("subject={subject:?} is not a subject prefix")));
        }
        let partitions = match range {
            None => (0..of).collect(),
            Some(r) => parse_range(&r, of).map_err(bad)?,
        };
        Ok(NatsSpec {
            server,
            stream,
            subject,
            partitions,
            of,
        })
    }

    /// The subject of `partition`.
    pub fn subject_of(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subject)
    }

    /// The source's name (and checkpoint fingerprint) for one partition.
    pub fn source_name(&self, partition: u32) -> String {
        format!("nats:{}/{partition}", self.stream)
    }
}

/// `3`, `0-3` or `0-1,4-5`: partitions within `0..of`.
fn parse_range(r: &str, of: u32) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in r.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let n = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("partitions={r:?} is not a range like 0-3"))
        };
        let (a, b) = (n(a)?, n(b)?);
        if a > b || b >= of {
            return Err(format!("partitions={r:?} must lie within 0-{}", of - 1));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A failure talking to NATS, worded for the person running keywatch.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot reach NATS at {server}: {why}")]
    Connect { server: String, why: String },
    #[error("NATS JetStream {what}: {why}")]
    JetStream { what: String, why: String },
}

fn js_err(what: impl Into<String>) -> impl FnOnce(String) -> NatsError {
    let what = what.into();
    move |why| NatsError::JetStream { what, why }
}

/// Connects and makes sure the stream exists (subjects `<subject>.*`, on disk).
pub async fn connect(
    spec: &NatsSpec,
) -> Result<(jetstream::Context, jetstream::stream::Stream), NatsError> {
    let client = async_nats::connect(&spec.server)
        .await
        .map_err(|e| NatsError::Connect {
            server: spec.server.clone(),
            why: e.to_string(),
        })?;
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: spec.stream.clone(),
            subjects: vec![format!("{}.*", spec.subject)],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(format!("stream {:?}", spec.stream))(e.to_string()))?;
    Ok((js, stream))
}

/// Reads every partition of `spec` into `tx` until `shutdown`. NATS being unreachable is
/// retried (and logged), never fatal: the daemon keeps its other sources going meanwhile.
pub async fn run_nats(
    spec: NatsSpec,
    checkpoints: Arc<impl CheckpointReader>,
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
    health: super::Health,
) -> Result<(), SourceError> {
    let mut tasks = tokio::task::JoinSet::new();
    for p in spec.partitions.clone() {
        tasks.spawn(run_partition(
            spec.clone(),
            p,
            Arc::clone(&checkpoints),
            tx.clone(),
            shutdown.clone(),
            health.clone(),
        ));
    }
    drop(tx);
    super::first_error(tasks, "nats partition task").await
}

/// Where one partition stands.
struct Position {
    /// Stream sequence of the last message committed (read at start, then raised as commits
    /// are acknowledged): redeliveries at or below it are acked and skipped.
    committed: Arc<AtomicU64>,
    /// Stream sequence of the last message handed to the pipeline (committed or not).
    sent: u64,
    /// Lines handed over so far (the line numbers of dead letters).
    lines: u64,
}

async fn run_partition(
    spec: NatsSpec,
    partition: u32,
    checkpoints: Arc<impl CheckpointReader>,
    tx: Sender<Chunk>,
    shutdown: CancellationToken,
    health: super::Health,
) -> Result<(), SourceError> {
    let name = spec.source_name(partition);
    let start = checkpoints.checkpoint(&name).await?;
    let mut pos = Position {
        committed: Arc::new(AtomicU64::new(start.as_ref().map_or(0, |c| c.offset))),
        sent: start.as_ref().map_or(0, |c| c.offset),
        lines: start.as_ref().map_or(0, |c| c.line_no),
    };
    let source: Arc<str> = Arc::from(name.as_str());
    let mut delay = Duration::from_millis(500);
    loop {
        let outcome = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            r = consume(&spec, partition, &source, &mut pos, &tx, &health) => r,
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(ConsumeError::PipelineClosed) => return Err(SourceError::PipelineClosed),
            Err(ConsumeError::Nats(e)) => {
                health.down(&name, e.to_string());
                tracing::warn!(source = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "NATS partition unavailable; will retry.");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

enum ConsumeError {
    Nats(NatsError),
    PipelineClosed,
}

impl From<NatsError> for ConsumeError {
    fn from(e: NatsError) -> ConsumeError {
        ConsumeError::Nats(e)
    }
}

/// Consumes one partition until the connection or consumer fails.
async fn consume(
    spec: &NatsSpec,
    partition: u32,
    source: &Arc<str>,
    pos: &mut Position,
    tx: &Sender<Chunk>,
    health: &super::Health,
) -> Result<(), ConsumeError> {
    let (_js, stream) = connect(spec).await?;
    let durable = format!("keywatch-p{partition}");
    let subject = spec.subject_of(partition);
    // The committed sequence in keywatch's database is the truth, not the consumer's ack
    // floor: a consumer left by a killed instance holds messages delivered to it and never
    // committed, and with AckAll the first ack of a later message would drop them. So the
    // consumer is made anew at every start, delivering in order from just after the commit.
    let committed = pos.committed.load(Ordering::Relaxed);
    if let Err(e) = stream.delete_consumer(&durable).await {
        tracing::debug!(source = %source, error = %e, "No consumer to replace (a first start).");
    }
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.clone()),
            filter_subject: subject.clone(),
            ack_policy: AckPolicy::All,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            deliver_policy: if committed == 0 {
                jetstream::consumer::DeliverPolicy::All
            } else {
                jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: committed + 1,
                }
            },
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(format!("consumer {durable:?}"))(e.to_string()))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(CHUNK_MESSAGES)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| js_err(format!("pulling from {durable:?}"))(e.to_string()))?;
    health.up(source);
    tracing::info!(source = %source, subject = %subject, from_sequence = pos.committed.load(Ordering::Relaxed), "Reading a NATS partition.");
    loop {
        // Wait for one message, then gather what follows it closely into the same chunk.
        let Some(first) = messages.next().await else {
            return Err(js_err("pull stream")("ended".into()).into());
        };
        let mut batch = vec![first];
        let gather_until = tokio::time::Instant::now() + CHUNK_WAIT;
        while batch.len() < CHUNK_MESSAGES {
            match tokio::time::timeout_at(gather_until, messages.next()).await {
                Ok(Some(m)) => batch.push(m),
                Ok(None) | Err(_) => break,
            }
        }
        let mut data = Vec::new();
        let first_line_no = pos.lines + 1;
        let mut last = None;
        for m in batch {
            let m = m.map_err(|e| js_err("message")(e.to_string()))?;
            let seq = m
                .info()
                .map_err(|e| js_err("message info")(e.to_string()))?
                .stream_sequence;
            if seq <= pos.sent {
                // Already handed over. At or below the committed sequence it is safe to ack
                // now; above it, the ack of its first delivery's chunk covers it.
                if seq <= pos.committed.load(Ordering::Relaxed)
                    && let Err(e) = m.ack().await
                {
                    tracing::debug!(source = %source, error = %e, "Could not ack a redelivered message.");
                }
                continue;
            }
            pos.sent = seq;
            pos.lines += append_lines(&mut data, &m.payload);
            last = Some(m);
        }
        let Some(last) = last else { continue };
        let (ack, committed) = CommitAck::new();
        let chunk = Chunk {
            source: Arc::clone(source),
            data,
            first_line_no,
            checkpoint: Some(Checkpoint {
                fingerprint: source.to_string(),
                path: subject.clone(),
                offset: pos.sent,
                line_no: pos.lines,
                seen: Vec::new(),
            }),
            ack: Some(ack),
            read_at: std::time::Instant::now(),
        };
        tx.send(chunk)
            .await
            .map_err(|_| ConsumeError::PipelineClosed)?;
        let (source, done, seq) = (Arc::clone(source), Arc::clone(&pos.committed), pos.sent);
        tokio::spawn(async move {
            // Unsent (the pipeline stopped first): no ack, JetStream delivers it again.
            if committed.await.is_err() {
                return;
            }
            done.fetch_max(seq, Ordering::Relaxed);
            if let Err(e) = last.ack().await {
                tracing::debug!(source = %source, error = %e, "Could not ack; the message will be delivered again and skipped.");
            }
        });
    }
}

/// Appends a message's lines, ending the last with `\n`; returns how many lines it held.
fn append_lines(data: &mut Vec<u8>, payload: &[u8]) -> u64 {
    if payload.is_empty() {
        data.push(b'\n');
        return 1;
    }
    data.extend_from_slice(payload);
    if !payload.ends_with(b"\n") {
        data.push(b'\n');
    }
    memchr::memchr_iter(b'\n', payload).count() as u64 + u64::from(!payload.ends_with(b"\n"))
}

/// What `keywatch publish` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    pub lines: u64,
    pub per_partition: Vec<u64>,
}

/// Publishes each line of `input` to the subject of its partition among `of`, one message
/// per line, waiting for JetStream's acknowledgement of every one (in windows, for speed).
pub async fn publish(
    spec: &NatsSpec,
    of: u32,
    input: impl tokio::io::AsyncBufRead + Unpin,
) -> Result<Published, PublishError> {
    use tokio::io::AsyncBufReadExt;
    let (js, _stream) = connect(spec).await?;
    let mut out = Published {
        lines: 0,
        per_partition: vec![0; of as usize],
    };
    let mut pending = std::collections::VecDeque::new();
    let mut lines = input.split(b'\n');
    while let Some(line) = lines.next_segment().await.map_err(PublishError::Read)? {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let p = partition_of(&line, of);
        let ack = js
            .publish(spec.subject_of(p), Bytes::from(line))
            .await
            .map_err(|e| js_err("publish")(e.to_string()))?;
        pending.push_back(ack);
        out.lines += 1;
        out.per_partition[p as usize] += 1;
        if pending.len() >= 1_000 {
            for a in pending.drain(..) {
                a.await.map_err(|e| js_err("publish ack")(e.to_string()))?;
            }
        }
    }
    for a in pending {
        a.await.map_err(|e| js_err("publish ack")(e.to_string()))?;
    }
    Ok(out)
}

/// Why `keywatch publish` stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Nats(#[from] NatsError),
    #[error("cannot read the input: {0}")]
    Read(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn partitions_follow_the_key_id_then_the_prefix() {
        let id = "9a41c2e7-f0aa-4bb1-8c3d-0123456789ab";
        let by_id = format!(r#"{{"api_key_id":"{id}","key_prefix":"pmcp_01x"}}"#);
        let upper = format!(r#"{{"api_key_id":"{}"}}"#, id.to_uppercase());
        assert_eq!(
            partition_of(by_id.as_bytes(), 8),
            fnv1a_32(id.as_bytes()) % 8
        );
        assert_eq!(
            partition_of(upper.as_bytes(), 8),
            partition_of(by_id.as_bytes(), 8)
        );
        let refused = br#"{"api_key_id":null,"key_prefix":"pmcp_01ab2c3d"}"#;
        assert_eq!(partition_of(refused, 8), fnv1a_32(b"pmcp_01ab2c3d") % 8);
        assert_eq!(partition_of(b"not json", 8), fnv1a_32(b"") % 8);
    }

    #[test]
    fn urls_parse_with_their_defaults() {
        let s =
            NatsSpec::parse("nats://127.0.0.1:4222?stream=PLEXMCP_REQUESTS&partitions=0-3&of=8")
                .unwrap();
        assert_eq!(s.server, "nats://127.0.0.1:4222");
        assert_eq!(s.partitions, vec![0, 1, 2, 3]);
        assert_eq!(s.of, 8);
        assert_eq!(s.subject_of(3), "plexmcp.requests.3");
        assert_eq!(s.source_name(3), "nats:PLEXMCP_REQUESTS/3");
        let all = NatsSpec::parse("nats://nats.internal").unwrap();
        assert_eq!(all.partitions, (0..8).collect::<Vec<_>>());
        assert_eq!(all.server, "nats://nats.internal:4222");
        assert_eq!(
            NatsSpec::parse("nats://h?partitions=6-9&of=8")
                .unwrap_err()
                .to_string(),
            "--source \"nats://h?partitions=6-9&of=8\": partitions=\"6-9\" must lie within 0-7"
        );
        assert!(NatsSpec::parse("nats://h?bogus=1").is_err());
    }

    #[test]
    fn message_lines_are_counted_and_terminated() {
        let mut d = Vec::new();
        assert_eq!(append_lines(&mut d, b"a"), 1);
        assert_eq!(append_lines(&mut d, b"b\nc\n"), 2);
        assert_eq!(d, b"a\nb\nc\n");
    }
}
