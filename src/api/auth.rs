//! Who is asking: `Authorization: ApiKey pmcp_...` checked against the shared `api_keys`
//! table exactly as the auth server documents it, or `Authorization: Bearer <token>` for the
//! security team's admin tokens; and what that principal may see.
//!
//! Owns authentication (format, HMAC signature, SHA-256 lookup, expiry, status), the per-IP
//! limit on failed attempts, and the authorization rules (organization, MCP access, scopes).
//! The key format itself is [`crate::keys`]'; this module never logs or stores a presented
//! key, only refuses or accepts it. It reads the key row at every request (so a revocation
//! applies at once) and writes nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::ApiError;
use crate::keys::{KeyInfo, PresentedKey};
use crate::store::{Store, StoreError};

/// The auth server's HMAC secret is at least this long.
const MIN_HMAC_SECRET_LEN: usize = 32;
/// IPs whose failures are remembered at once; beyond it, expired windows are dropped first,
/// then the oldest.
const MAX_TRACKED_IPS: usize = 10_000;
/// The window of the failed-attempt limit.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// A scope of the key's `scopes` array that grants part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Usage, limits, alerts, activity, hygiene.
    ReportsRead,
    /// Acknowledge, resolve, mark benign; silences.
    AlertsWrite,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ReportsRead => "reports:read",
            Scope::AlertsWrite => "alerts:write",
        }
    }
}

/// Why the authentication settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "the HMAC secret (KEYWATCH_API_KEY_HMAC_SECRET) is {0} characters; the auth server's is at least 32"
    )]
    ShortSecret(usize),
    #[error(
        "admin token hash {0:?} is not 64 hex characters (the SHA-256 of the token, as `sha256sum` prints it)"
    )]
    BadAdminHash(String),
    #[error(
        "metrics token hash {0:?} is not 64 hex characters (the SHA-256 of the token, as `sha256sum` prints it)"
    )]
    BadMetricsHash(String),
    #[error(
        "--listen {0} is not a loopback address, so /metrics would be open to anyone who can reach it: set --metrics-token-sha256 (KEYWATCH_METRICS_TOKEN_SHA256) to require a bearer token, or --metrics-public (KEYWATCH_METRICS_PUBLIC) to serve it to anyone on purpose"
    )]
    OpenMetrics(std::net::SocketAddr),
}

/// Validated authentication settings.
#[derive(Clone, Default)]
pub struct AuthSettings {
    hmac_secret: Option<Vec<u8>>,
    admin_hashes: Vec<[u8; 32]>,
    /// SHA-256 of the bearer token `/metrics` requires; `None` serves it to anyone.
    metrics_hash: Option<[u8; 32]>,
    /// `/metrics` without a token was asked for, so a non-loopback `--listen` may serve it.
    metrics_public: bool,
    /// Failed attempts allowed per IP and minute before 429.
    pub failures_per_minute: u32,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("hmac_secret", &self.hmac_secret.as_ref().map(|_| "***"))
            .field("admin_tokens", &self.admin_hashes.len())
            .field("metrics_token", &self.metrics_hash.is_some())
            .field("metrics_public", &self.metrics_public)
            .field("failures_per_minute", &self.failures_per_minute)
            .finish()
    }
}

impl AuthSettings {
    /// Checks the HMAC secret's length and each admin token hash (hex SHA-256).
    pub fn new(
        hmac_secret: Option<&str>,
        admin_token_sha256: &[String],
        failures_per_minute: u32,
    ) -> Result<AuthSettings, AuthConfigError> {
        let hmac_secret = match hmac_secret.filter(|s| !s.is_empty()) {
            Some(s) if s.len() < MIN_HMAC_SECRET_LEN => {
                return Err(AuthConfigError::ShortSecret(s.len()));
            }
            other => other.map(|s| s.as_bytes().to_vec()),
        };
        let admin_hashes = admin_token_sha256
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
            .map(|h| parse_sha256(h).ok_or_else(|| AuthConfigError::BadAdminHash(h.to_owned())))
            .collect::<Result<_, _>>()?;
        Ok(AuthSettings {
            hmac_secret,
            admin_hashes,
            metrics_hash: None,
            metrics_public: false,
            failures_per_minute: failures_per_minute.max(1),
        })
    }

    /// Protects `/metrics` with the bearer token whose SHA-256 is `token_sha256`, or, with
    /// `public`, records that it is served to anyone on purpose.
    pub fn with_metrics_access(
        mut self,
        token_sha256: Option<&str>,
        public: bool,
    ) -> Result<AuthSettings, AuthConfigError> {
        self.metrics_hash = match token_sha256.map(str::trim).filter(|h| !h.is_empty()) {
            Some(h) => {
                Some(parse_sha256(h).ok_or_else(|| AuthConfigError::BadMetricsHash(h.to_owned()))?)
            }
            None => None,
        };
        self.metrics_public = public;
        Ok(self)
    }

    /// Refuses a non-loopback `listen` while `/metrics` is neither protected nor explicitly
    /// public. `/v1` needs an API key or admin token and `POST /v1/ingest` its token
    /// wherever it listens; `/metrics` is the one route that would otherwise be open.
    pub fn check_listen(&self, listen: std::net::SocketAddr) -> Result<(), AuthConfigError> {
        if listen.ip().is_loopback() || self.metrics_hash.is_some() || self.metrics_public {
            Ok(())
        } else {
            Err(AuthConfigError::OpenMetrics(listen))
        }
    }
}

/// A SHA-256 hash as `sha256sum` prints it (either case).
fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.to_ascii_lowercase(), &mut out).ok()?;
    Some(out)
}

/// What an authenticated request may see.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    /// An admin token: every organization, every scope.
    Admin,
    /// An API key of one organization.
    Key(Box<KeyInfo>),
}

impl Principal {
    /// Refuses a key without `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Key(k) if k.scopes.iter().any(|s| s == scope.as_str()) => Ok(()),
            Principal::Key(_) => Err(ApiError::Forbidden),
        }
    }

    /// The organization a key is limited to; `None` for an admin.
    pub fn org(&self) -> Option<Uuid> {
        match self {
            Principal::Admin => None,
            Principal::Key(k) => Some(k.org_id),
        }
    }

    /// Refuses data of an organization other than the key's.
    pub fn may_see_org(&self, org: Option<Uuid>) -> Result<(), ApiError> {
        match self.org() {
            Some(mine) if org != Some(mine) => Err(ApiError::Forbidden),
            _ => Ok(()),
        }
    }

    /// The MCP names this principal's usage is limited to: `None` for no limit (an admin,
    /// or a key with `mcp_access_mode` `all`), the names of its `allowed_mcp_ids` for
    /// `selected`, and none at all for `none` or a mode keywatch does not know.
    pub async fn mcp_limit(&self, store: &Store) -> Result<Option<Vec<String>>, StoreError> {
        match self {
            Principal::Admin => Ok(None),
            Principal::Key(k) => match k.mcp_access_mode.as_str() {
                "all" => Ok(None),
                "selected" => Ok(Some(store.mcp_names(&k.allowed_mcp_ids).await?)),
                _ => Ok(Some(Vec::new())),
            },
        }
    }
}

/// Equality in time that depends only on the length, so a comparison reveals nothing of
/// where two secrets differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Failed attempts per IP in fixed one-minute windows.
#[derive(Debug, Default)]
struct FailureLimiter {
    by_ip: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    /// Seconds until `ip` may try again, when it is over the limit.
    fn blocked(&self, ip: IpAddr, limit: u32, now: Instant) -> Option<u64> {
        let (start, n) = self.by_ip.get(&ip)?;
        let end = *start + FAILURE_WINDOW;
        (*n >= limit && now < end).then(|| (end - now).as_secs().max(1))
    }

    fn fail(&mut self, ip: IpAddr, now: Instant) {
        if self.by_ip.len() >= MAX_TRACKED_IPS && !self.by_ip.contains_key(&ip) {
            self.by_ip
                .retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
            if self.by_ip.len() >= MAX_TRACKED_IPS
                && let Some(oldest) = self.by_ip.iter().min_by_key(|(_, v)| v.0).map(|(k, _)| *k)
            {
                self.by_ip.remove(&oldest);
            }
        }
        let e = self.by_ip.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= FAILURE_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

/// Refused credentials waiting for the pipeline; beyond it they are dropped (and logged),
/// never waited for.
pub const REFUSED_EVENTS_QUEUE: usize = 1024;
/// The MCP name refused API requests are counted under, apart from the auth server's.
pub const API_MCP_NAME: &str = "keywatch-api";
/// Characters of a presented key kept in a refused-key event, as the auth server's
/// `auth_audit_log` keeps them: never enough to use.
const REFUSED_PREFIX_CHARS: usize = 12;

/// A refusal, with the key and organization when the key was known (expired, revoked).
struct Refusal {
    error: ApiError,
    key: Option<(Uuid, Uuid)>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Refusal {
        Refusal { error, key: None }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        ApiError::from(e).into()
    }
}

/// What a refused request looked like, for its request-log line.
pub struct Attempt<'a> {
    pub ip: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
}

/// Authenticates requests; shared by every handler.
#[derive(Debug, Default)]
pub struct Authenticator {
    settings: AuthSettings,
    failures: Mutex<FailureLimiter>,
    refused: Option<tokio::sync::mpsc::Sender<crate::source::Chunk>>,
    line_no: AtomicU64,
}

impl Authenticator {
    pub fn new(settings: AuthSettings) -> Authenticator {
        Authenticator {
            settings,
            ..Authenticator::default()
        }
    }

    /// Sends each refused credential to `tx` as a request-log line (status 401, the
    /// presented key's first 12 characters), so the detectors see attacks on the API.
    pub fn with_refused_events(
        mut self,
        tx: Option<tokio::sync::mpsc::Sender<crate::source::Chunk>>,
    ) -> Authenticator {
        self.refused = tx;
        self
    }

    fn report_refusal(
        &self,
        headers: &HeaderMap,
        attempt: &Attempt<'_>,
        r: &Refusal,
        now: DateTime<Utc>,
    ) {
        let Some(tx) = &self.refused else { return };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' ').map(|(_, k)| k.trim_start()))
            .filter(|k| k.starts_with(crate::keys::KEY_PREFIX))
            .map(|k| k.chars().take(REFUSED_PREFIX_CHARS).collect::<String>());
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|u| {
                u.chars()
                    .take(crate::activity::MAX_VALUE_LEN)
                    .collect::<String>()
            });
        let line = serde_json::json!({
            "created_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "api_key_id": r.key.map(|k| k.0),
            "organization_id": r.key.map(|k| k.1),
            "key_prefix": presented,
            "mcp_server_name": API_MCP_NAME,
            "endpoint_path": attempt.path.chars().take(200).collect::<String>(),
            "http_method": attempt.method,
            "http_status_code": 401,
            "latency_ms": 0,
            "source_ip": attempt.ip.map(|ip| ip.to_string()),
            "user_agent": user_agent,
            "error_code": r.error.code(),
        });
        let mut data = line.to_string().into_bytes();
        data.push(b'\n');
        let chunk = crate::source::Chunk {
            source: Arc::from("api"),
            data,
            first_line_no: self.line_no.fetch_add(1, Ordering::Relaxed) + 1,
            checkpoint: None,
            ack: None,
            read_at: std::time::Instant::now(),
        };
        if tx.try_send(chunk).is_err() {
            tracing::warn!("The pipeline is behind; a refused API credential was not recorded.");
        }
    }

    /// The principal of a request from `ip` (unknown without a socket), or why it is refused.
    /// An IP over the failure limit is refused with 429 whatever it presents, so guessing
    /// cannot go on behind the limit.
    pub async fn authenticate(
        &self,
        store: &Store,
        headers: &HeaderMap,
        attempt: &Attempt<'_>,
        now: DateTime<Utc>,
    ) -> Result<Principal, ApiError> {
        let limit = self.settings.failures_per_minute;
        // A dual-stack listener shows IPv4 clients as ::ffff:a.b.c.d: one client, one count.
        let attempt = &Attempt {
            ip: attempt.ip.map(|ip| ip.to_canonical()),
            ..*attempt
        };
        if let Some(ip) = attempt.ip {
            let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(retry_after) = failures.blocked(ip, limit, Instant::now()) {
                return Err(ApiError::RateLimited { retry_after });
            }
        }
        match self.check(store, headers, now).await {
            Ok(p) => Ok(p),
            Err(r) => {
                if r.error.is_auth_failure() {
                    tracing::info!(ip = ?attempt.ip, reason = r.error.code(), "Refused an API request's credentials.");
                    if let Some(ip) = attempt.ip {
                        self.failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .fail(ip, Instant::now());
                    }
                    self.report_refusal(headers, attempt, &r, now);
                }
                Err(r.error)
            }
        }
    }

    async fn check(
        &self,
        store: &Store,
        headers: &HeaderMap,
        now: DateTime<Utc>,
    ) -> Result<Principal, Refusal> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        if let Some(token) = value.strip_prefix("Bearer ") {
            return Ok(self.admin(token)?);
        }
        // Exactly the documented form: scheme `ApiKey`, one space, the key.
        let presented = value
            .strip_prefix("ApiKey ")
            .ok_or(ApiError::Unauthorized)?;
        let key = PresentedKey::parse(presented).map_err(|_| ApiError::Unauthorized)?;
        let signature_ok = self
            .settings
            .hmac_secret
            .as_deref()
            .is_none_or(|s| key.signature_valid(s));
        // The lookup runs whether or not the signature verified, so a wrong signature and an
        // unknown key take the same time and give the same answer.
        let row = store.key_by_hash(&key.hash()).await?;
        let k = match row {
            Some(k) if signature_ok => k,
            _ => return Err(ApiError::Unauthorized.into()),
        };
        let known = Some((k.id, k.org_id));
        if k.status != "active" || k.revoked_at.is_some() {
            return Err(Refusal {
                error: ApiError::RevokedKey,
                key: known,
            });
        }
        if k.expires_at.is_some_and(|e| e <= now) {
            return Err(Refusal {
                error: ApiError::ExpiredKey,
                key: known,
            });
        }
        Ok(Principal::Key(Box::new(k)))
    }

    /// Whether a `/metrics` request may be answered: always without a metrics token, else
    /// only with `Authorization: Bearer TOKEN` (compared by hash, in constant time).
    pub fn metrics_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.settings.metrics_hash else {
            return true;
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let digest = Sha256::digest(token.as_bytes());
        ct_eq(want, &digest) && !token.is_empty()
    }

    fn admin(&self, token: &str) -> Result<Principal, ApiError> {
        let digest = Sha256::digest(token.as_bytes());
        // Every configured hash is compared, matched or not: no early exit.
        let matched = self
            .settings
            .admin_hashes
            .iter()
            .fold(false, |m, h| ct_eq(h, &digest) | m);
        if matched && !token.is_empty() {
            Ok(Principal::Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert_eq!(
            AuthSettings::new(Some("short"), &[], 10).unwrap_err(),
            AuthConfigError::ShortSecret(5)
        );
        assert_eq!(
            AuthSettings::new(None, &["abc".into()], 10).unwrap_err(),
            AuthConfigError::BadAdminHash("abc".into())
        );
        let h = hex::encode(Sha256::digest(b"token"));
        let s = AuthSettings::new(None, &[format!(" {h} "), String::new()], 10).unwrap();
        assert_eq!(s.admin_hashes.len(), 1);
        assert!(!format!("{s:?}").contains(&h));
    }

    #[test]
    fn admin_tokens_match_by_hash() {
        let h = hex::encode(Sha256::digest(b"token"));
        let a = Authenticator::new(AuthSettings::new(None, &[h], 10).unwrap());
        assert!(matches!(a.admin("token"), Ok(Principal::Admin)));
        assert!(a.admin("token ").is_err());
        assert!(a.admin("").is_err());
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn failures_are_limited_per_ip_and_window() {
        let mut l = FailureLimiter::default();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let other: IpAddr = "10.1.2.4".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.blocked(ip, 3, t0), None);
            l.fail(ip, t0);
        }
        assert_eq!(l.blocked(ip, 3, t0), Some(60));
        assert_eq!(l.blocked(other, 3, t0), None);
        assert_eq!(l.blocked(ip, 3, t0 + FAILURE_WINDOW), None);
        l.fail(ip, t0 + FAILURE_WINDOW);
        assert_eq!(l.blocked(ip, 3, t0 + FAILURE_WINDOW), None, "a new window");
    }
}
