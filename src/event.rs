//! The request-log record and its pure parser.
//!
//! Owns the shape of one line of the auth server's request log (the `mcp_request_log` row as
//! JSON plus the presented `key_prefix`) and the reasons a line is refused. Parsing is a pure
//! function of bytes: it does no I/O, knows nothing of keys, storage or time, and never panics
//! on any input, so every source can share it and tests can feed it literals.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

/// Longest line keywatch accepts, in bytes, without its newline. Longer lines are refused
/// with [`RejectReason::TooLong`]; sources keep only this much of them in memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// One parsed request-log line. Strings borrow from the input where they need no unescaping.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    /// Event time: when the auth server handled the request. Everything is computed from it.
    pub created_at: DateTime<Utc>,
    pub request_id: Option<Uuid>,
    pub organization_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    /// The prefix the client presented: 20 characters (`pmcp_` + 12 hex + `...`) for a known
    /// key, or the first 12 characters of what was presented for a refused one.
    pub key_prefix: Option<Cow<'a, str>>,
    pub mcp_server_name: Option<Cow<'a, str>>,
    pub http_method: Option<Cow<'a, str>>,
    pub endpoint_path: Option<Cow<'a, str>>,
    pub http_status_code: u16,
    pub latency_ms: u32,
    pub request_size_bytes: u64,
    pub response_size_bytes: u64,
    pub source_ip: Option<IpAddr>,
    pub user_agent: Option<Cow<'a, str>>,
    pub error_code: Option<Cow<'a, str>>,
    pub rate_limit_hit: bool,
    pub quota_exceeded: bool,
    /// `metadata.origin`: the request's `Origin` header, where there was one.
    pub origin: Option<Cow<'a, str>>,
}

/// Why a line was refused. The `as_str` names are stable: they appear in summaries, the
/// dead-letter table and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    NotJson,
    MissingField,
    WrongType,
    OutOfRange,
    DuplicateField,
    BadTimestamp,
    BadIp,
    BadId,
    TooLong,
    InvalidUtf8,
}

impl RejectReason {
    /// Every reason, in the order summaries list them.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::NotJson,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::OutOfRange,
        RejectReason::DuplicateField,
        RejectReason::BadTimestamp,
        RejectReason::BadIp,
        RejectReason::BadId,
        RejectReason::TooLong,
        RejectReason::InvalidUtf8,
    ];

    /// The stable snake_case name of this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotJson => "not_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::DuplicateField => "duplicate_field",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::BadIp => "bad_ip",
            RejectReason::BadId => "bad_id",
            RejectReason::TooLong => "too_long",
            RejectReason::InvalidUtf8 => "invalid_utf8",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused line: the reason and a one-sentence detail that quotes the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct ParseError {
    pub reason: RejectReason,
    pub detail: String,
}

impl ParseError {
    fn new(reason: RejectReason, detail: impl Into<String>) -> ParseError {
        ParseError {
            reason,
            detail: detail.into(),
        }
    }
}

/// The line as serde sees it: every field optional so that "missing" is ours to report.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow, default, deserialize_with = "opt_str")]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    created_at: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    organization_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    api_key_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    key_prefix: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    mcp_server_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    endpoint_path: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    http_method: Option<Cow<'a, str>>,
    #[serde(default)]
    http_status_code: Option<i64>,
    #[serde(default)]
    latency_ms: Option<i64>,
    #[serde(default)]
    request_size_bytes: Option<i64>,
    #[serde(default)]
    response_size_bytes: Option<i64>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    source_ip: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    user_agent: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    error_code: Option<Cow<'a, str>>,
    #[serde(default)]
    rate_limit_hit: Option<bool>,
    #[serde(default)]
    quota_exceeded: Option<bool>,
    #[serde(borrow, default)]
    metadata: Option<RawMetadata<'a>>,
}

/// Deserializes an optional string, borrowing it from the input when it has no escapes
/// (serde's own `Option<Cow<str>>` always copies).
fn opt_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

#[derive(Deserialize)]
struct RawMetadata<'a> {
    #[serde(borrow, default, deserialize_with = "opt_str")]
    origin: Option<Cow<'a, str>>,
}

/// The fields whose JSON type the parser checks, with the type each must have. Used only on
/// the error path, to name the field serde refused.
const TYPED_FIELDS: &[(&str, JsonType)] = &[
    ("request_id", JsonType::String),
    ("created_at", JsonType::String),
    ("organization_id", JsonType::String),
    ("api_key_id", JsonType::String),
    ("key_prefix", JsonType::String),
    ("mcp_server_name", JsonType::String),
    ("endpoint_path", JsonType::String),
    ("http_method", JsonType::String),
    ("http_status_code", JsonType::Integer),
    ("latency_ms", JsonType::Integer),
    ("request_size_bytes", JsonType::Integer),
    ("response_size_bytes", JsonType::Integer),
    ("source_ip", JsonType::String),
    ("user_agent", JsonType::String),
    ("error_code", JsonType::String),
    ("rate_limit_hit", JsonType::Bool),
    ("quota_exceeded", JsonType::Bool),
    ("metadata", JsonType::Object),
];

#[derive(Clone, Copy)]
enum JsonType {
    String,
    Integer,
    Bool,
    Object,
}

impl JsonType {
    fn accepts(self, v: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (self, v) {
            (_, Value::Null) => true,
            (JsonType::String, Value::String(_)) => true,
            (JsonType::Integer, Value::Number(n)) => n.is_i64(),
            (JsonType::Bool, Value::Bool(_)) => true,
            (JsonType::Object, Value::Object(_)) => true,
            _ => false,
        }
    }

    fn name(self) -> &'static str {
        match self {
            JsonType::String => "a string",
            JsonType::Integer => "an integer",
            JsonType::Bool => "a boolean",
            JsonType::Object => "an object",
        }
    }
}

/// Parses one line (without its newline; a trailing `\r` is tolerated).
pub fn parse_line(line: &[u8]) -> Result<Record<'_>, ParseError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE_BYTES {
        return Err(ParseError::new(
            RejectReason::TooLong,
            format!(
                "line is longer than {} KiB (at least {} bytes)",
                MAX_LINE_BYTES / 1024,
                line.len()
            ),
        ));
    }
    let text = std::str::from_utf8(line).map_err(|e| {
        ParseError::new(
            RejectReason::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let raw: RawLine<'_> = serde_json::from_str(text).map_err(|e| classify_serde_error(text, e))?;
    build(raw)
}

fn classify_serde_error(text: &str, err: serde_json::Error) -> ParseError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Io | Category::Syntax | Category::Eof => {
            ParseError::new(RejectReason::NotJson, format!("not a JSON object ({err})"))
        }
        Category::Data => {
            let msg = err.to_string();
            if let Some(rest) = msg.strip_prefix("duplicate field `") {
                let field = rest.split('`').next().unwrap_or("");
                return ParseError::new(
                    RejectReason::DuplicateField,
                    format!("field \"{field}\" appears more than once"),
                );
            }
            // Rare path: find the field with the wrong type by looking at the generic value.
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(map)) => {
                    for (field, ty) in TYPED_FIELDS {
                        if let Some(v) = map.get(*field)
                            && !ty.accepts(v)
                        {
                            return ParseError::new(
                                RejectReason::WrongType,
                                format!(
                                    "field \"{field}\" must be {} or null, found {}",
                                    ty.name(),
                                    short_json(v)
                                ),
                            );
                        }
                    }
                    ParseError::new(RejectReason::WrongType, msg)
                }
                Ok(other) => ParseError::new(
                    RejectReason::NotJson,
                    format!("a line must be a JSON object, found {}", short_json(&other)),
                ),
                Err(_) => ParseError::new(RejectReason::WrongType, msg),
            }
        }
    }
}

/// A value quoted for an error message, cut short so a huge field cannot flood a log.
fn short_json(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 60 {
        let mut end = 57;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn build(raw: RawLine<'_>) -> Result<Record<'_>, ParseError> {
    let created_at = raw
        .created_at
        .as_deref()
        .ok_or_else(|| missing("created_at"))
        .and_then(parse_timestamp)?;
    let status = raw
        .http_status_code
        .ok_or_else(|| missing("http_status_code"))?;
    if !(100..=599).contains(&status) {
        return Err(ParseError::new(
            RejectReason::OutOfRange,
            format!("http_status_code {status} is not an HTTP status (100 to 599)"),
        ));
    }
    let source_ip = match raw.source_ip.as_deref() {
        None | Some("") => None,
        Some(s) => Some(parse_ip(s)?),
    };
    Ok(Record {
        created_at,
        request_id: opt_uuid("request_id", raw.request_id.as_deref())?,
        organization_id: opt_uuid("organization_id", raw.organization_id.as_deref())?,
        api_key_id: opt_uuid("api_key_id", raw.api_key_id.as_deref())?,
        key_prefix: non_empty(raw.key_prefix),
        mcp_server_name: non_empty(raw.mcp_server_name),
        http_method: non_empty(raw.http_method),
        endpoint_path: non_empty(raw.endpoint_path),
        http_status_code: status as u16,
        latency_ms: non_negative("latency_ms", raw.latency_ms, u32::MAX as i64)? as u32,
        request_size_bytes: non_negative("request_size_bytes", raw.request_size_bytes, i64::MAX)?
            as u64,
        response_size_bytes: non_negative("response_size_bytes", raw.response_size_bytes, i64::MAX)?
            as u64,
        source_ip,
        user_agent: non_empty(raw.user_agent),
        error_code: non_empty(raw.error_code),
        rate_limit_hit: raw.rate_limit_hit.unwrap_or(false),
        quota_exceeded: raw.quota_exceeded.unwrap_or(false),
        origin: non_empty(raw.metadata.and_then(|m| m.origin)),
    })
}

fn missing(field: &str) -> ParseError {
    ParseError::new(
        RejectReason::MissingField,
        format!("required field \"{field}\" is missing or null"),
    )
}

fn non_empty(s: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    s.filter(|s| !s.is_empty())
}

fn non_negative(field: &str, v: Option<i64>, max: i64) -> Result<i64, ParseError> {
    match v {
        None => Ok(0),
        Some(n) if (0..=max).contains(&n) => Ok(n),
        Some(n) => Err(ParseError::new(
            RejectReason::OutOfRange,
            format!("field \"{field}\" is {n}, outside 0 to {max}"),
        )),
    }
}

fn opt_uuid(field: &str, s: Option<&str>) -> Result<Option<Uuid>, ParseError> {
    match s {
        None | Some("") => Ok(None),
        Some(s) => Uuid::try_parse(s).map(Some).map_err(|_| {
            ParseError::new(
                RejectReason::BadId,
                format!("field \"{field}\" is not a UUID: {}", quote_short(s)),
            )
        }),
    }
}

/// Parses an event time: RFC 3339, as the auth server writes it, or PostgreSQL's text form
/// (`2026-11-20 12:00:00.123+00`), as `row_to_json` exports of its table write it.
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, ParseError> {
    let parsed = DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .map_err(|_| {
            ParseError::new(
                RejectReason::BadTimestamp,
                format!(
                    "\"created_at\" is not an RFC 3339 timestamp: {}",
                    quote_short(s)
                ),
            )
        })?;
    // Reports, rollups and retention all start at the Unix epoch: an event before it could be
    // counted but never reported, so it is refused instead.
    if parsed.timestamp() < 0 {
        return Err(ParseError::new(
            RejectReason::BadTimestamp,
            format!("\"created_at\" is before 1970: {}", quote_short(s)),
        ));
    }
    Ok(parsed.with_timezone(&Utc))
}

fn parse_ip(s: &str) -> Result<IpAddr, ParseError> {
    let ip: IpAddr = s.parse().map_err(|_| {
        ParseError::new(
            RejectReason::BadIp,
            format!("\"source_ip\" is not an IP address: {}", quote_short(s)),
        )
    })?;
    // An IPv4-mapped IPv6 address is the IPv4 client behind a dual-stack socket.
    Ok(match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    })
}

fn quote_short(s: &str) -> String {
    short_json(&serde_json::Value::String(s.to_owned()))
}

/// The error classes keywatch counts, from the status code alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    /// 1xx, 2xx, 3xx.
    Ok,
    /// 401 and 403: the key was refused or lacks permission.
    Auth,
    /// 429: over the key's `rate_limit_rpm` or the organization's quota.
    RateLimited,
    /// Any other 4xx.
    Client,
    /// 5xx: the MCP or the server failed.
    Server,
}

impl StatusClass {
    /// The class of an HTTP status code.
    pub fn of(status: u16) -> StatusClass {
        match status {
            401 | 403 => StatusClass::Auth,
            429 => StatusClass::RateLimited,
            400..=499 => StatusClass::Client,
            500..=599 => StatusClass::Server,
            _ => StatusClass::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"request_id":"6f1c0a52-8d1e-4c55-9c0b-111111111111","created_at":"2026-11-20T12:00:00.123Z","organization_id":"0b7e5f0e-9b1a-4c55-9c0b-222222222222","api_key_id":"9a41c2e7-f0aa-4c55-9c0b-333333333333","key_prefix":"pmcp_019a41c2e7f0...","mcp_server_name":"github","endpoint_path":"/mcp","http_method":"POST","http_status_code":200,"latency_ms":42,"request_size_bytes":512,"response_size_bytes":2048,"tokens_used":null,"source_ip":"81.2.69.160","user_agent":"plexmcp-python/1.4.0","error_code":null,"rate_limit_hit":false,"quota_exceeded":false,"metadata":{"tool_name":"search_issues","origin":"https://app.example.com"}}"#;

    fn reason(line: &str) -> RejectReason {
        parse_line(line.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn parses_the_documented_example() {
        let r = parse_line(GOOD.as_bytes()).unwrap();
        assert_eq!(r.http_status_code, 200);
        assert_eq!(r.latency_ms, 42);
        assert_eq!(r.mcp_server_name.as_deref(), Some("github"));
        assert_eq!(r.key_prefix.as_deref(), Some("pmcp_019a41c2e7f0..."));
        assert_eq!(r.origin.as_deref(), Some("https://app.example.com"));
        assert_eq!(r.source_ip, Some("81.2.69.160".parse().unwrap()));
        assert_eq!(
            r.created_at,
            "2026-11-20T12:00:00.123Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert!(matches!(r.mcp_server_name, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn refused_key_line_has_no_ids() {
        let line = r#"{"created_at":"2026-11-20T12:00:00Z","api_key_id":null,"organization_id":null,"key_prefix":"pmcp_01ffff","http_status_code":401,"source_ip":"::ffff:81.2.69.160"}"#;
        let r = parse_line(line.as_bytes()).unwrap();
        assert_eq!(r.api_key_id, None);
        assert_eq!(r.http_status_code, 401);
        assert_eq!(r.source_ip, Some("81.2.69.160".parse().unwrap()));
    }

    #[test]
    fn each_bad_line_gets_its_reason() {
        assert_eq!(reason("not json"), RejectReason::NotJson);
        assert_eq!(reason("[1,2]"), RejectReason::NotJson);
        assert_eq!(
            reason(r#"{"created_at":"2026-11-20T12:00:00Z""#),
            RejectReason::NotJson
        );
        assert_eq!(
            reason(r#"{"http_status_code":200}"#),
            RejectReason::MissingField
        );
        assert_eq!(
            reason(r#"{"created_at":"2026-11-20T12:00:00Z"}"#),
            RejectReason::MissingField
        );
        assert_eq!(
            reason(r#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":"200"}"#),
            RejectReason::WrongType
        );
        assert_eq!(
            reason(r#"{"created_at":"yesterday","http_status_code":200}"#),
            RejectReason::BadTimestamp
        );
        assert_eq!(
            reason(
                r#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"source_ip":"999.1.1.1"}"#
            ),
            RejectReason::BadIp
        );
        assert_eq!(
            reason(
                r#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"api_key_id":"abc"}"#
            ),
            RejectReason::BadId
        );
        assert_eq!(
            reason(r#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":1000}"#),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(
                r#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"latency_ms":-1}"#
            ),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(
                r#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"http_status_code":500}"#
            ),
            RejectReason::DuplicateField
        );
        let long = format!(r#"{{"created_at":"{}"}}"#, "x".repeat(MAX_LINE_BYTES));
        assert_eq!(reason(&long), RejectReason::TooLong);
        let bad_utf8 = b"{\"created_at\":\"2026-11-20T12:00:00Z\",\"user_agent\":\"\xff\"}";
        assert_eq!(
            parse_line(bad_utf8).unwrap_err().reason,
            RejectReason::InvalidUtf8
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse_line(
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"latency_ms":"fast"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.detail,
            "field \"latency_ms\" must be an integer or null, found \"fast\""
        );
    }

    #[test]
    fn accepts_postgres_timestamp_text() {
        let r = parse_line(br#"{"created_at":"2026-11-20 12:00:00.5+00","http_status_code":204}"#)
            .unwrap();
        assert_eq!(r.created_at.timestamp_millis() % 1000, 500);
    }

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(200), StatusClass::Ok);
        assert_eq!(StatusClass::of(401), StatusClass::Auth);
        assert_eq!(StatusClass::of(403), StatusClass::Auth);
        assert_eq!(StatusClass::of(429), StatusClass::RateLimited);
        assert_eq!(StatusClass::of(404), StatusClass::Client);
        assert_eq!(StatusClass::of(503), StatusClass::Server);
    }
}
