//! The HTTP source: `POST /v1/ingest` takes NDJSON request-log lines pushed by a client.
//!
//! Owns the ingest endpoint: the ingest token's check, the body's bounds (size before and
//! after gzip, requests in flight), backpressure, and the answer, which is sent only once the
//! pipeline says the lines' counts are committed. It only moves bytes: the pipeline parses and
//! counts the lines, and tells it (through the chunk's [`CommitAck`]) which it refused. It may
//! not touch the rest of the API (`crate::api` merges [`router`] beside its own routes).
//!
//! A request's lines are one chunk, numbered after every line this process took before, so
//! each line's dead letter is unique within the `http` source; the answer numbers lines from 1
//! within the request.
//!
//! A push may carry an `Idempotency-Key`: the key is committed with the push's counts (as a row
//! the source counted, like the postgres source's), so a client that lost the answer (keywatch
//! killed, connection cut) and sends the same push again with the same key gets it answered as
//! a duplicate instead of counted twice. Keys are remembered for `app::PUSH_IDS_KEPT`.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;

use super::{Checkpoint, Chunk, CommitAck, SeenRow};

/// The source's name in metrics and dead letters.
pub const SOURCE_NAME: &str = "http";
/// At most this many refused lines are listed in one answer (all are counted).
const MAX_LISTED_REJECTS: usize = 1_000;
/// What a client is told to wait before retrying a refused push.
const RETRY_AFTER_SECONDS: u64 = 1;
/// The longest `Idempotency-Key` taken.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Settings of the HTTP source, validated.
#[derive(Clone)]
pub struct HttpSettings {
    /// SHA-256 of the ingest token; clients send the token as `Authorization: Bearer TOKEN`.
    pub token_sha256: [u8; 32],
    /// The largest body taken, counted after gzip decoding too; larger ones get 413.
    pub max_body_bytes: usize,
    /// Requests read or waiting for their commit at once; more get 503. With
    /// `max_body_bytes`, this bounds the memory pushes can hold.
    pub max_in_flight: usize,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// A bad HTTP source setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpConfigError {
    #[error(
        "--ingest-token-sha256 {0:?} is not a SHA-256 in hex (64 characters); make one with `printf %s \"$TOKEN\" | sha256sum`"
    )]
    BadTokenHash(String),
    #[error(
        "--source http needs an ingest token: set --ingest-token-sha256 (KEYWATCH_INGEST_TOKEN_SHA256)"
    )]
    NoToken,
}

/// Parses the hex SHA-256 of the ingest token.
pub fn parse_token_sha256(hex_text: &str) -> Result<[u8; 32], HttpConfigError> {
    let bytes = hex::decode(hex_text.trim())
        .map_err(|_| HttpConfigError::BadTokenHash(hex_text.to_owned()))?;
    bytes
        .try_into()
        .map_err(|_| HttpConfigError::BadTokenHash(hex_text.to_owned()))
}

/// The HTTP source's shared state: the settings, and the pipeline's channel while a
/// pipeline runs (`None` before it starts and after it stops: pushes then get 503).
pub struct HttpIngest {
    settings: HttpSettings,
    tx: Mutex<Option<Sender<Chunk>>>,
    in_flight: Semaphore,
    /// Lines taken by this process so far, for the numbering of dead letters.
    lines: AtomicU64,
    /// Where committed `Idempotency-Key`s are looked up; without it they are refused.
    store: Option<crate::store::Store>,
    /// The `Idempotency-Key`s of pushes waiting for their commit now.
    pending_keys: Mutex<std::collections::HashSet<String>>,
}

impl HttpIngest {
    /// The source's state; with `store`, pushes may carry an `Idempotency-Key` (the keys
    /// already committed are looked up there), without it such pushes are refused.
    pub fn new(settings: HttpSettings, store: Option<crate::store::Store>) -> Arc<HttpIngest> {
        Arc::new(HttpIngest {
            in_flight: Semaphore::new(settings.max_in_flight.max(1)),
            settings,
            tx: Mutex::new(None),
            lines: AtomicU64::new(0),
            store,
            pending_keys: Mutex::default(),
        })
    }

    /// Starts handing pushed lines to the pipeline behind `tx`.
    pub fn attach(&self, tx: Sender<Chunk>) {
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Stops taking pushes, dropping the channel so the pipeline can finish.
    pub fn detach(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn sender(&self) -> Option<Sender<Chunk>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        presented.ct_eq(&self.settings.token_sha256).into()
    }
}

/// `POST /v1/ingest` on `ingest`, ready to merge into the API's router (whatever its state).
pub fn router<S: Clone + Send + Sync + 'static>(ingest: Arc<HttpIngest>) -> Router<S> {
    Router::new()
        .route("/v1/ingest", post(ingest_handler))
        .with_state(ingest)
}

/// Runs the source until `shutdown`: pushes reach the pipeline behind `tx` meanwhile.
pub async fn run_http(
    ingest: Arc<HttpIngest>,
    tx: Sender<Chunk>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    ingest.attach(tx);
    shutdown.cancelled().await;
    ingest.detach();
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = json!({"success": false, "error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

fn busy(message: &str) -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        format!("{message}; retry after {RETRY_AFTER_SECONDS} s"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    r
}

fn too_large(limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "the body is over {limit} bytes (after gzip decoding); send fewer lines per request"
        ),
    )
}

/// What the body's `Content-Encoding` says to do.
enum Encoding {
    Identity,
    Gzip,
}

/// The body's encoding, or the `Content-Encoding` value that names none keywatch reads.
fn encoding(headers: &HeaderMap) -> Result<Encoding, String> {
    match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("" | "identity") => Ok(Encoding::Identity),
        Some("gzip" | "x-gzip") => Ok(Encoding::Gzip),
        Some(other) => Err(other.to_owned()),
    }
}

/// Decodes gzip into at most `limit` bytes; `None` when it decodes to more.
fn gunzip(data: &[u8], limit: usize) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)?;
    Ok((out.len() <= limit).then_some(out))
}

async fn ingest_handler(
    State(ingest): State<Arc<HttpIngest>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !ingest.authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong ingest token; send Authorization: Bearer TOKEN".into(),
        );
    }
    let push_key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_idempotency_key", message),
    };
    let limit = ingest.settings.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit);
    }
    let encoding = match encoding(&headers) {
        Ok(e) => e,
        Err(other) => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                format!("Content-Encoding {other:?} is not supported; send identity or gzip"),
            );
        }
    };
    // Held until the answer: with the body limit, it bounds what pushes hold in memory.
    let Ok(_permit) = ingest.in_flight.try_acquire() else {
        return busy("too many ingest requests in flight");
    };
    let raw = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(limit),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body: {e}"),
            );
        }
    };
    let data = match encoding {
        Encoding::Identity => raw.to_vec(),
        Encoding::Gzip => match tokio::task::spawn_blocking(move || gunzip(&raw, limit)).await {
            Ok(Ok(Some(d))) => d,
            Ok(Ok(None)) => return too_large(limit),
            Ok(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_gzip",
                    format!("the body is not valid gzip: {e}"),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("gzip decoding failed: {e}"),
                );
            }
        },
    };
    let lines = line_count(&data);
    if lines == 0 {
        return accepted(0, 0, ChunkOutcomeView::default());
    }
    // Held until the answer, so a resend cannot be counted while its original commits.
    let _pending = match &push_key {
        Some(key) => match ingest.check_push(key).await {
            Ok(p) => Some(p),
            Err(answer) => return answer(lines),
        },
        None => None,
    };
    let Some(tx) = ingest.sender() else {
        return busy("keywatch is not reading pushes now (starting or stopping)");
    };
    // A full channel means the pipeline is behind: refusing now keeps memory bounded, and the
    // client keeps the lines until it retries.
    let permit = match tx.try_reserve() {
        Ok(p) => p,
        Err(TrySendError::Full(())) => return busy("the pipeline is full"),
        Err(TrySendError::Closed(())) => return busy("keywatch is stopping"),
    };
    let first_line_no = ingest.lines.fetch_add(lines, Ordering::Relaxed) + 1;
    let (ack, committed) = CommitAck::new();
    // A push has no place to resume from; its checkpoint only carries its key, so that the key
    // is committed with the push's counts.
    let checkpoint = push_key.map(|id| Checkpoint {
        fingerprint: SOURCE_NAME.into(),
        path: SOURCE_NAME.into(),
        offset: 0,
        line_no: first_line_no + lines - 1,
        seen: vec![SeenRow {
            id,
            created_at: chrono::Utc::now(),
        }],
    });
    permit.send(Chunk {
        source: Arc::from(SOURCE_NAME),
        data,
        first_line_no,
        checkpoint,
        ack: Some(ack),
        read_at: std::time::Instant::now(),
    });
    match committed.await {
        Ok(outcome) => accepted(
            lines,
            first_line_no,
            ChunkOutcomeView {
                accepted: outcome.accepted,
                rejected: outcome
                    .rejected
                    .into_iter()
                    .map(|r| (r.line_no, r.reason, r.detail))
                    .collect(),
                duplicate: false,
            },
        ),
        // Dropped unsent: the pipeline stopped without committing these lines.
        Err(_) => busy("keywatch stopped before committing these lines; send them again"),
    }
}

/// The `Idempotency-Key` header: `None` when absent, the reason when it is not one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str().map(str::trim) {
        Ok(k)
            if !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k.to_owned()))
        }
        _ => Err(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters without spaces; a UUID per push is a good one"
        )),
    }
}

/// A push's `Idempotency-Key` reserved while the push is committed; released when dropped.
struct PendingPush<'a> {
    ingest: &'a HttpIngest,
    key: String,
}

impl Drop for PendingPush<'_> {
    fn drop(&mut self) {
        let mut keys = self
            .ingest
            .pending_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.key);
    }
}

/// The answer to a push that must not be counted now, given its line count.
type Refusal = Box<dyn FnOnce(u64) -> Response + Send>;

impl HttpIngest {
    /// Reserves `key` for a push about to be counted, or says why it must not be: the same key
    /// is being committed now (retry), or was committed already (a duplicate, answered 200).
    async fn check_push(&self, key: &str) -> Result<PendingPush<'_>, Refusal> {
        let Some(store) = &self.store else {
            return Err(Box::new(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_idempotency_key",
                    "this endpoint does not take Idempotency-Key".into(),
                )
            }));
        };
        {
            let mut keys = self.pending_keys.lock().unwrap_or_else(|e| e.into_inner());
            if !keys.insert(key.to_owned()) {
                return Err(Box::new(|_| {
                    busy("a push with this Idempotency-Key is being committed now")
                }));
            }
        }
        let pending = PendingPush {
            ingest: self,
            key: key.to_owned(),
        };
        match store.has_seen(SOURCE_NAME, key).await {
            Ok(false) => Ok(pending),
            Ok(true) => Err(Box::new(|lines| {
                let duplicate = ChunkOutcomeView {
                    duplicate: true,
                    ..ChunkOutcomeView::default()
                };
                accepted(lines, 0, duplicate)
            })),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot look up an Idempotency-Key; the push is refused for now.");
                Err(Box::new(|_| {
                    busy("keywatch cannot check the Idempotency-Key now")
                }))
            }
        }
    }
}

#[derive(Default)]
struct ChunkOutcomeView {
    accepted: u64,
    rejected: Vec<(u64, &'static str, String)>,
    /// The push's `Idempotency-Key` was committed before: nothing was counted now.
    duplicate: bool,
}

fn accepted(lines: u64, first_line_no: u64, outcome: ChunkOutcomeView) -> Response {
    let rejected_count = outcome.rejected.len();
    let listed: Vec<_> = outcome
        .rejected
        .into_iter()
        .take(MAX_LISTED_REJECTS)
        .map(|(line_no, reason, detail)| {
            json!({"line": line_no + 1 - first_line_no, "reason": reason, "detail": detail})
        })
        .collect();
    let body = json!({
        "success": true,
        "data": {
            "lines": lines,
            "accepted": outcome.accepted,
            "rejected_count": rejected_count,
            "rejected": listed,
            "duplicate": outcome.duplicate,
        }
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Lines as the pipeline numbers them: every `\n`, and a last line without one.
fn line_count(data: &[u8]) -> u64 {
    let newlines = memchr::memchr_iter(b'\n', data).count() as u64;
    newlines + u64::from(!data.is_empty() && !data.ends_with(b"\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_as_the_pipeline_numbers_them() {
        assert_eq!(line_count(b""), 0);
        assert_eq!(line_count(b"a"), 1);
        assert_eq!(line_count(b"a\n"), 1);
        assert_eq!(line_count(b"a\n\nb"), 3);
    }

    #[test]
    fn token_hashes_parse_strictly() {
        let h = "a".repeat(64);
        assert_eq!(parse_token_sha256(&h), Ok([0xaa; 32]));
        assert_eq!(
            parse_token_sha256("abc").unwrap_err().to_string(),
            "--ingest-token-sha256 \"abc\" is not a SHA-256 in hex (64 characters); make one with `printf %s \"$TOKEN\" | sha256sum`"
        );
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b'x'; 1 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        assert!(gz.len() < 10_000);
        assert_eq!(gunzip(&gz, 1000).unwrap(), None);
        assert_eq!(
            gunzip(&gz, 1 << 20).unwrap().map(|d| d.len()),
            Some(1 << 20)
        );
    }

    #[test]
    fn only_the_right_token_passes() {
        let ingest = HttpIngest::new(
            HttpSettings {
                token_sha256: Sha256::digest(b"s3cret").into(),
                max_body_bytes: 10,
                max_in_flight: 1,
            },
            None,
        );
        let mut h = HeaderMap::new();
        assert!(!ingest.authorized(&h));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer nope"),
        );
        assert!(!ingest.authorized(&h));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(ingest.authorized(&h));
    }
}
