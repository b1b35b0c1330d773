//! The reports API under `/v1`: its route table (which also feeds the OpenAPI document),
//! the handlers, their parameters, pagination and CSV.
//!
//! Owns how a request becomes a question to [`crate::report`] and how the answer is sent:
//! `{"success": true, "data": ...}` with `next_cursor` for lists. Every handler
//! authenticates first ([`Principal`] is an extractor), then narrows the question to what the
//! principal may see; it never runs SQL itself.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiState;
use super::auth::{Principal, Scope};
use super::error::ApiError;
use crate::keys::KeyCache;
use crate::report::{self, GroupBy, KeyFilter, UsageQuery};
use crate::store::{AlertAction, AlertFilter, StoredAlert, StoredSilence};
use crate::usage::Granularity;

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// The largest `limit`.
pub const MAX_PAGE: usize = 1000;
/// Longest a note or reason may be.
const MAX_NOTE_CHARS: usize = 1000;
/// Longest a silence may last.
const MAX_SILENCE_DAYS: i64 = 365;
/// The activity window without `from`.
const DEFAULT_ACTIVITY_DAYS: i64 = 7;

type Shared = Arc<ApiState>;

/// One operation of the API, as the router mounts it and the OpenAPI document describes it.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// The scope a key needs; `None` for an operation without authentication.
    pub scope: Option<Scope>,
    /// Query parameters: name and description.
    pub params: &'static [(&'static str, &'static str)],
    /// Whether `Accept: text/csv` or `format=csv` gives CSV.
    pub csv: bool,
    /// Whether the operation takes a JSON body.
    pub body: bool,
    pub handler: MethodRouter<Shared>,
}

const PAGE_PARAMS: [(&str, &str); 2] = [
    ("limit", "rows per page (1 to 1000, default 100)"),
    ("cursor", "the next_cursor of the previous page"),
];

/// Every route, in the order the OpenAPI document lists them.
pub fn routes() -> Vec<Route> {
    let r = |method, path, summary, scope, params, csv, body, handler| Route {
        method,
        path,
        summary,
        scope,
        params,
        csv,
        body,
        handler,
    };
    const USAGE: &[(&str, &str)] = &[
        ("org", "organization id or slug"),
        (
            "key",
            "key id or prefix; `unknown` for refused keys (admin only)",
        ),
        ("mcp", "MCP server name"),
        ("from", "start, RFC 3339, inclusive"),
        ("until", "end, RFC 3339, exclusive"),
        ("bucket", "minute, hour or day: split each row into buckets"),
        ("group_by", "key (default), org or mcp"),
        ("format", "json (default) or csv"),
        PAGE_PARAMS[0],
        PAGE_PARAMS[1],
    ];
    const ALERTS: &[(&str, &str)] = &[
        ("status", "firing, acknowledged, resolved or benign"),
        ("type", "alert type, for example new_country"),
        ("severity", "info, low, medium, high or critical"),
        ("key", "key id or prefix"),
        ("org", "organization id or slug"),
        (
            "since",
            "episodes started at or after: RFC 3339, or a duration such as 24h",
        ),
        ("until", "episodes started before, RFC 3339"),
        ("format", "json (default) or csv"),
        PAGE_PARAMS[0],
        PAGE_PARAMS[1],
    ];
    const ORG: &[(&str, &str)] = &[("org", "organization id or slug")];
    const ORG_PAGE: &[(&str, &str)] = &[
        ("org", "organization id or slug"),
        PAGE_PARAMS[0],
        PAGE_PARAMS[1],
    ];
    const ACTIVITY: &[(&str, &str)] = &[
        ("from", "start, RFC 3339 (default 7 days ago)"),
        ("until", "end, RFC 3339 (default now)"),
    ];
    const SILENCES: &[(&str, &str)] = &[
        ("all", "true: expired silences too"),
        PAGE_PARAMS[0],
        PAGE_PARAMS[1],
    ];
    use Scope::{AlertsWrite, ReportsRead};
    vec![
        r(
            "GET",
            "/healthz",
            "Liveness",
            None,
            &[],
            false,
            false,
            get(super::healthz),
        ),
        r(
            "GET",
            "/readyz",
            "Readiness: the database answers",
            None,
            &[],
            false,
            false,
            get(super::readyz),
        ),
        r(
            "GET",
            "/metrics",
            "Prometheus metrics",
            None,
            &[],
            false,
            false,
            get(super::metrics),
        ),
        r(
            "GET",
            "/v1/openapi.json",
            "This document",
            None,
            &[],
            false,
            false,
            get(openapi),
        ),
        r(
            "GET",
            "/v1/usage",
            "Requests, errors by class, latency and bytes",
            Some(ReportsRead),
            USAGE,
            true,
            false,
            get(usage),
        ),
        r(
            "GET",
            "/v1/limits",
            "Month-to-date usage against limits, with a forecast; keys' peak rpm",
            Some(ReportsRead),
            ORG,
            false,
            false,
            get(limits),
        ),
        r(
            "GET",
            "/v1/alerts",
            "Alerts, oldest first",
            Some(ReportsRead),
            ALERTS,
            true,
            false,
            get(alerts),
        ),
        r(
            "GET",
            "/v1/alerts/{id}",
            "One alert",
            Some(ReportsRead),
            &[],
            false,
            false,
            get(alert),
        ),
        r(
            "POST",
            "/v1/alerts/{id}/ack",
            "Acknowledge an alert",
            Some(AlertsWrite),
            &[],
            false,
            true,
            alert_action(AlertAction::Ack),
        ),
        r(
            "POST",
            "/v1/alerts/{id}/resolve",
            "Resolve an alert",
            Some(AlertsWrite),
            &[],
            false,
            true,
            alert_action(AlertAction::Resolve),
        ),
        r(
            "POST",
            "/v1/alerts/{id}/benign",
            "Mark an alert benign (a location is learned by its key)",
            Some(AlertsWrite),
            &[],
            false,
            true,
            alert_action(AlertAction::Benign),
        ),
        r(
            "GET",
            "/v1/silences",
            "Silences in force",
            Some(AlertsWrite),
            SILENCES,
            false,
            false,
            get(silences),
        ),
        r(
            "POST",
            "/v1/silences",
            "Add a silence",
            Some(AlertsWrite),
            &[],
            false,
            true,
            post(add_silence),
        ),
        r(
            "DELETE",
            "/v1/silences/{id}",
            "End a silence now",
            Some(AlertsWrite),
            &[],
            false,
            false,
            delete(expire_silence),
        ),
        r(
            "GET",
            "/v1/keys/hygiene",
            "Keys that break the documented security practices",
            Some(ReportsRead),
            ORG_PAGE,
            false,
            false,
            get(hygiene),
        ),
        r(
            "GET",
            "/v1/keys/{id}/activity",
            "Where and how a key was used",
            Some(ReportsRead),
            ACTIVITY,
            false,
            false,
            get(activity),
        ),
    ]
}

impl FromRequestParts<Shared> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Principal, ApiError> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let attempt = super::auth::Attempt {
            ip,
            method: parts.method.as_str(),
            path: parts.uri.path(),
        };
        s.auth
            .authenticate(&s.store, &parts.headers, &attempt, Utc::now())
            .await
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(&routes()).to_string(),
    )
        .into_response()
}

/// The query string as `T`; unknown parameters are refused, so a typo is not ignored.
fn params<T: DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// A user's value for a message: quoted, and cut so an error never echoes a whole payload.
fn quoted(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    format!("{cut:?}")
}

fn parse_time(name: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    crate::event::parse_timestamp(s).map_err(|_| {
        ApiError::BadRequest(format!(
            "{name} {} is not an RFC 3339 time such as 2026-11-20T00:00:00Z",
            quoted(s)
        ))
    })
}

fn one_of<T: Copy>(name: &str, s: &str, choices: &[(&str, T)]) -> Result<T, ApiError> {
    choices
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            ApiError::BadRequest(format!(
                "{name} {} is not one of {}",
                quoted(s),
                names.join(", ")
            ))
        })
}

/// Whether the answer should be CSV: `format=csv`, or `Accept: text/csv` without `format`.
fn wants_csv(headers: &HeaderMap, format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        Some(f) => one_of("format", f, &[("json", false), ("csv", true)]),
        None => Ok(headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/csv"))),
    }
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit {n} is not between 1 and {MAX_PAGE}"
        ))),
    }
}

fn bad_cursor() -> ApiError {
    ApiError::BadRequest("cursor is not one this server gave; start again without it".into())
}

fn decode_cursor(c: &str) -> Result<String, ApiError> {
    hex::decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad_cursor)
}

/// One page of a list computed whole (usage rows, hygiene findings, silences): the cursor
/// is the offset of the next row.
fn offset_page<T>(
    items: Vec<T>,
    limit: Option<usize>,
    cursor: Option<&str>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let limit = page_limit(limit)?;
    let offset = match cursor {
        None => 0,
        Some(c) => decode_cursor(c)?
            .strip_prefix("o:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(bad_cursor)?,
    };
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(offset).take(limit).collect();
    let next = (offset + page.len() < total).then(|| hex::encode(format!("o:{}", offset + limit)));
    Ok((page, next))
}

/// `{"success": true, "data": ...}`.
fn ok(data: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"success": true, "data": data}).to_string(),
    )
        .into_response()
}

/// A page of a list, as JSON with `next_cursor`, or as CSV with the cursor in `X-Next-Cursor`.
fn list(rows: Vec<Value>, next: Option<String>, csv: bool) -> Response {
    if csv {
        let mut r = (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            report::csv::json_to_csv(&rows),
        )
            .into_response();
        if let Some(n) = next.and_then(|n| n.parse().ok()) {
            r.headers_mut().insert("x-next-cursor", n);
        }
        return r;
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"success": true, "data": rows, "next_cursor": next}).to_string(),
    )
        .into_response()
}

/// The organization a question is about: the key's own (asking for another is 403), or for
/// an admin the one named (by id or slug), or all.
fn resolve_org(
    p: &Principal,
    cache: &KeyCache,
    asked: Option<&str>,
) -> Result<Option<Uuid>, ApiError> {
    let Some(s) = asked else {
        return Ok(p.org());
    };
    let id = Uuid::try_parse(s)
        .ok()
        .or_else(|| cache.orgs().find(|o| o.slug == s).map(|o| o.id));
    match (p, id) {
        (Principal::Key(_), id) => {
            p.may_see_org(id)?;
            Ok(id)
        }
        (Principal::Admin, Some(id)) => Ok(Some(id)),
        (Principal::Admin, None) => Err(ApiError::NotFound(format!(
            "no organization has the id or slug {}",
            quoted(s)
        ))),
    }
}

/// The key a question is about, by id or prefix; a key of another organization is 403.
fn resolve_key(p: &Principal, cache: &KeyCache, asked: &str) -> Result<KeyFilter, ApiError> {
    let filter = if asked == "unknown" {
        Some(KeyFilter::Unknown)
    } else {
        Uuid::try_parse(asked)
            .ok()
            .or_else(|| cache.key_by_prefix(asked))
            .map(KeyFilter::Id)
    };
    match (p.org(), filter) {
        (None, Some(f)) => Ok(f),
        (None, None) => Err(ApiError::NotFound(format!(
            "no single key has the id or prefix {}",
            quoted(asked)
        ))),
        (Some(org), Some(KeyFilter::Id(id))) => match cache.key(&id) {
            Some(k) if k.org_id == org => Ok(KeyFilter::Id(id)),
            // The key asking about itself, created after the cache's last refresh.
            None if matches!(p, Principal::Key(me) if me.id == id) => Ok(KeyFilter::Id(id)),
            _ => Err(ApiError::Forbidden),
        },
        (Some(_), _) => Err(ApiError::Forbidden),
    }
}

/// The MCPs a principal may see, with the one asked for checked against them.
async fn mcp_scope(
    s: &ApiState,
    p: &Principal,
    asked: Option<&str>,
) -> Result<Option<Vec<String>>, ApiError> {
    let limit = p.mcp_limit(&s.store).await?;
    if let (Some(m), Some(allowed)) = (asked, &limit)
        && !allowed.iter().any(|a| a == m)
    {
        return Err(ApiError::Forbidden);
    }
    Ok(limit)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    org: Option<String>,
    key: Option<String>,
    mcp: Option<String>,
    from: Option<String>,
    until: Option<String>,
    bucket: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn usage(
    State(s): State<Shared>,
    p: Principal,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    p.require(Scope::ReportsRead)?;
    let q: UsageParams = params(&uri)?;
    let csv = wants_csv(&headers, q.format.as_deref())?;
    let cache = s.cache().await?;
    let now = Utc::now();
    let mut uq = UsageQuery::all_time(now);
    uq.org = resolve_org(&p, &cache, q.org.as_deref())?;
    uq.key = q
        .key
        .as_deref()
        .map(|k| resolve_key(&p, &cache, k))
        .transpose()?;
    uq.mcps = mcp_scope(&s, &p, q.mcp.as_deref()).await?;
    uq.mcp = q.mcp;
    if let Some(f) = &q.from {
        uq.from = parse_time("from", f)?;
    }
    if let Some(u) = &q.until {
        uq.until = parse_time("until", u)?;
        uq.month_at = uq.until;
    }
    if uq.from >= uq.until {
        return Err(ApiError::BadRequest("from must be before until".into()));
    }
    uq.bucket = q
        .bucket
        .as_deref()
        .map(|b| {
            one_of(
                "bucket",
                b,
                &[
                    ("minute", Granularity::Minute),
                    ("hour", Granularity::Hour),
                    ("day", Granularity::Day),
                ],
            )
        })
        .transpose()?;
    if let Some(g) = &q.group_by {
        uq.group_by = one_of(
            "group_by",
            g,
            &[
                ("key", GroupBy::Key),
                ("org", GroupBy::Org),
                ("mcp", GroupBy::Mcp),
            ],
        )?;
    }
    let rows = report::usage(&s.store, &cache, &uq).await?;
    let json_rows: Vec<Value> = rows.iter().map(|r| r.to_json(uq.group_by)).collect();
    let (page, next) = offset_page(json_rows, q.limit, q.cursor.as_deref())?;
    Ok(list(page, next, csv))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgParams {
    org: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgOnly {
    org: Option<String>,
}

async fn limits(State(s): State<Shared>, p: Principal, uri: Uri) -> Result<Response, ApiError> {
    p.require(Scope::ReportsRead)?;
    let q: OrgOnly = params(&uri)?;
    let cache = s.cache().await?;
    let org = resolve_org(&p, &cache, q.org.as_deref())?;
    let mcps = mcp_scope(&s, &p, None).await?;
    let l = report::limits::limits(&s.store, &cache, org, mcps, Utc::now()).await?;
    Ok(ok(serde_json::to_value(l).unwrap_or(Value::Null)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertParams {
    status: Option<String>,
    #[serde(rename = "type")]
    alert_type: Option<String>,
    severity: Option<String>,
    key: Option<String>,
    org: Option<String>,
    since: Option<String>,
    until: Option<String>,
    format: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn alert_json(a: &StoredAlert) -> Value {
    serde_json::to_value(a).unwrap_or(Value::Null)
}

async fn alerts(
    State(s): State<Shared>,
    p: Principal,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    p.require(Scope::ReportsRead)?;
    let q: AlertParams = params(&uri)?;
    let csv = wants_csv(&headers, q.format.as_deref())?;
    let cache = s.cache().await?;
    let now = Utc::now();
    let limit = page_limit(q.limit)?;
    let mut f = AlertFilter {
        status: q.status,
        alert_type: q.alert_type,
        severity: q.severity,
        org: resolve_org(&p, &cache, q.org.as_deref())?.map(|o| o.to_string()),
        limit: Some(limit as i64 + 1),
        ..AlertFilter::default()
    };
    report::alerts::check(&f).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    f.key = match q
        .key
        .as_deref()
        .map(|k| resolve_key(&p, &cache, k))
        .transpose()?
    {
        Some(KeyFilter::Id(id)) => Some(id.to_string()),
        Some(KeyFilter::Unknown) => Some(String::new()),
        None => None,
    };
    if let Some(since) = &q.since {
        f.from = Some(match crate::cli::parse_duration(since) {
            Ok(d) => chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .ok_or_else(|| ApiError::BadRequest("since is too long ago".into()))?,
            Err(_) => parse_time("since", since)?,
        });
    }
    if let Some(u) = &q.until {
        f.until = Some(parse_time("until", u)?);
    }
    if let Some(c) = &q.cursor {
        let text = decode_cursor(c)?;
        let (at, id) = text
            .strip_prefix("a:")
            .and_then(|t| t.split_once('|'))
            .ok_or_else(bad_cursor)?;
        let at = crate::event::parse_timestamp(at).map_err(|_| bad_cursor())?;
        f.after = Some((at, id.to_owned()));
    }
    let mut found = report::alerts::alerts(&s.store, &f).await?;
    let next = if found.len() > limit {
        found.truncate(limit);
        found
            .last()
            .map(|a| hex::encode(format!("a:{}|{}", a.started_at.to_rfc3339(), a.id)))
    } else {
        None
    };
    Ok(list(found.iter().map(alert_json).collect(), next, csv))
}

/// The alert `id`, if the principal may see it.
async fn visible_alert(s: &ApiState, p: &Principal, id: &str) -> Result<StoredAlert, ApiError> {
    let a = s
        .store
        .alert(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no alert {}", quoted(id))))?;
    p.may_see_org(a.org_id.as_deref().and_then(|o| Uuid::try_parse(o).ok()))?;
    Ok(a)
}

/// The query string of an operation that takes no parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

async fn alert(
    State(s): State<Shared>,
    p: Principal,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    p.require(Scope::ReportsRead)?;
    let _: NoParams = params(&uri)?;
    Ok(ok(alert_json(&visible_alert(&s, &p, &id).await?)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    #[serde(default)]
    note: String,
}

/// A JSON body (an empty body is `T::default()`), refused when too large or malformed.
fn json_body<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(super::MAX_BODY_BYTES),
        _ => ApiError::BadRequest("the request body could not be read".into()),
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!("the request body is not the JSON expected: {e}"))
    })
}

async fn act(
    s: Shared,
    p: Principal,
    id: String,
    body: Result<Bytes, BytesRejection>,
    action: AlertAction,
) -> Result<Response, ApiError> {
    p.require(Scope::AlertsWrite)?;
    let note: NoteBody = json_body(body)?;
    if note.note.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::BadRequest(format!(
            "note is longer than {MAX_NOTE_CHARS} characters"
        )));
    }
    visible_alert(&s, &p, &id).await?;
    s.store
        .set_alert_status(&id, action, &note.note, Utc::now())
        .await?;
    Ok(ok(alert_json(&visible_alert(&s, &p, &id).await?)))
}

/// The POST route of one action on an alert.
fn alert_action(action: AlertAction) -> MethodRouter<Shared> {
    post(
        move |State(s): State<Shared>,
              p: Principal,
              Path(id): Path<String>,
              body: Result<Bytes, BytesRejection>| act(s, p, id, body, action),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceParams {
    all: Option<bool>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Whether a key of `org` may see and end silence `s`: only the silences limited to its
/// organization alone (which are the only ones it can make).
fn silence_visible(p: &Principal, s: &StoredSilence) -> bool {
    match p.org() {
        None => true,
        Some(org) => s.matchers.orgs == [org.to_string()],
    }
}

async fn silences(State(s): State<Shared>, p: Principal, uri: Uri) -> Result<Response, ApiError> {
    p.require(Scope::AlertsWrite)?;
    let q: SilenceParams = params(&uri)?;
    let list: Vec<Value> = s
        .store
        .silences(Utc::now(), q.all.unwrap_or(false))
        .await?
        .into_iter()
        .filter(|x| silence_visible(&p, x))
        .map(|x| serde_json::to_value(x).unwrap_or(Value::Null))
        .collect();
    let (page, next) = offset_page(list, q.limit, q.cursor.as_deref())?;
    Ok(list_json(page, next))
}

fn list_json(rows: Vec<Value>, next: Option<String>) -> Response {
    list(rows, next, false)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    severities: Vec<String>,
    #[serde(default)]
    orgs: Vec<String>,
    #[serde(default)]
    keys: Vec<String>,
    expires_in: Option<String>,
    expires_at: Option<String>,
    #[serde(default)]
    reason: String,
}

async fn add_silence(
    State(s): State<Shared>,
    p: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    p.require(Scope::AlertsWrite)?;
    let b: NewSilence = json_body(body)?;
    let now = Utc::now();
    let cache = s.cache().await?;
    let mut orgs = Vec::with_capacity(b.orgs.len());
    for o in &b.orgs {
        if let Some(id) = resolve_org(&p, &cache, Some(o))? {
            orgs.push(id.to_string());
        }
    }
    if let Some(mine) = p.org() {
        // A key silences its own organization's alerts, never another's.
        orgs = vec![mine.to_string()];
    }
    for k in &b.keys {
        resolve_key(&p, &cache, k)?;
    }
    if b.reason.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::BadRequest(format!(
            "reason is longer than {MAX_NOTE_CHARS} characters"
        )));
    }
    let expires_at = match (&b.expires_in, &b.expires_at) {
        (Some(d), None) => crate::cli::parse_duration(d)
            .ok()
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .and_then(|d| now.checked_add_signed(d))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "expires_in {} is not a duration such as 4h or 7d",
                    quoted(d)
                ))
            })?,
        (None, Some(t)) => parse_time("expires_at", t)?,
        _ => {
            return Err(ApiError::BadRequest(
                "give one of expires_in (such as 4h) or expires_at (RFC 3339)".into(),
            ));
        }
    };
    if expires_at <= now || expires_at - now > chrono::Duration::days(MAX_SILENCE_DAYS) {
        return Err(ApiError::BadRequest(format!(
            "a silence must end in the future and within {MAX_SILENCE_DAYS} days"
        )));
    }
    let matchers = crate::notify::config::StoredMatchers {
        types: b.types,
        severities: b.severities,
        orgs,
        keys: b.keys,
    };
    let checked = matchers.check().map_err(ApiError::BadRequest)?;
    if checked.is_empty() {
        return Err(ApiError::BadRequest(
            "a silence needs at least one matcher: types, severities, orgs or keys".into(),
        ));
    }
    let silence = StoredSilence {
        id: Uuid::new_v4().to_string(),
        matchers,
        reason: b.reason,
        created_at: now,
        expires_at,
    };
    s.store.add_silence(&silence).await?;
    let mut r = ok(serde_json::to_value(&silence).unwrap_or(Value::Null));
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

async fn expire_silence(
    State(s): State<Shared>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    p.require(Scope::AlertsWrite)?;
    let now = Utc::now();
    let found = s
        .store
        .silences(now, false)
        .await?
        .into_iter()
        .find(|x| x.id == id)
        .ok_or_else(|| {
            ApiError::NotFound(format!("there is no silence {} in force", quoted(&id)))
        })?;
    if !silence_visible(&p, &found) {
        return Err(ApiError::Forbidden);
    }
    s.store.expire_silence(&id, now).await?;
    Ok(ok(json!({"id": id, "expired_at": now})))
}

async fn hygiene(State(s): State<Shared>, p: Principal, uri: Uri) -> Result<Response, ApiError> {
    p.require(Scope::ReportsRead)?;
    let q: OrgParams = params(&uri)?;
    let cache = s.cache().await?;
    let org = resolve_org(&p, &cache, q.org.as_deref())?;
    let found = report::hygiene::hygiene(&s.store, &cache, org, Utc::now()).await?;
    let rows: Vec<Value> = found
        .iter()
        .map(|f| serde_json::to_value(f).unwrap_or(Value::Null))
        .collect();
    let (page, next) = offset_page(rows, q.limit, q.cursor.as_deref())?;
    Ok(list_json(page, next))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowParams {
    from: Option<String>,
    until: Option<String>,
}

async fn activity(
    State(s): State<Shared>,
    p: Principal,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    p.require(Scope::ReportsRead)?;
    let q: WindowParams = params(&uri)?;
    let cache = s.cache().await?;
    let KeyFilter::Id(key) = resolve_key(&p, &cache, &id)? else {
        return Err(ApiError::BadRequest(
            "activity needs one key's id or prefix".into(),
        ));
    };
    let until = q
        .until
        .as_deref()
        .map(|u| parse_time("until", u))
        .transpose()?
        .unwrap_or_else(Utc::now);
    let from = match &q.from {
        Some(f) => parse_time("from", f)?,
        None => until - chrono::Duration::days(DEFAULT_ACTIVITY_DAYS),
    };
    if from >= until {
        return Err(ApiError::BadRequest("from must be before until".into()));
    }
    let mcps = mcp_scope(&s, &p, None).await?;
    let a = report::activity::activity(&s.store, &cache, key, mcps, from, until).await?;
    Ok(ok(serde_json::to_value(a).unwrap_or(Value::Null)))
}
