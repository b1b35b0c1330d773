//! The HTTP API under /v1, through the real binary on a free port against a fresh database
//! (SQLite, and PostgreSQL where KEYWATCH_TEST_POSTGRES_URL is set): every endpoint,
//! pagination, CSV, the authorization matrix with exact statuses and bodies, injection
//! attempts in the filters, and the OpenAPI document against the routes.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{
    Backend, TestDb, block_on, free_port, http, keywatch, kw_ok, python_module, wait_until,
};
use keywatch::keys::NewKey;
use keywatch::store::{NewKeyRow, NewOrg, Store};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
const ADMIN_TOKEN: &str = "admin-token-for-the-security-team";
const GEOIP: &str = "tests/data/geoip/GeoIP2-City-Test.mmdb";

const ORG_A: Uuid = Uuid::from_u128(0xa000_0000_0000_4000_8000_0000_0000_0001);
const ORG_B: Uuid = Uuid::from_u128(0xb000_0000_0000_4000_8000_0000_0000_0001);
const MCP_GITHUB: Uuid = Uuid::from_u128(0xc000_0000_0000_4000_8000_0000_0000_0001);
const MCP_SLACK: Uuid = Uuid::from_u128(0xc000_0000_0000_4000_8000_0000_0000_0002);

const UNAUTHORIZED: &str =
    r#"{"success":false,"error":{"code":"unauthorized","message":"Invalid or missing API key"}}"#;
const FORBIDDEN: &str = r#"{"success":false,"error":{"code":"forbidden","message":"API key does not have permission for this resource"}}"#;

/// The keys of the fixture, as full secrets (only the test knows them).
struct Keys {
    reader: String,
    writer: String,
    no_scope: String,
    limited: String,
    other_org: String,
    expired: String,
    revoked: String,
    bad_signature: String,
    unknown: String,
    reader_id: Uuid,
    limited_id: Uuid,
    other_id: Uuid,
}

struct Server {
    addr: String,
    child: Child,
    keys: Keys,
    db: TestDb,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

#[allow(clippy::too_many_arguments)]
fn add_key(
    store: &Store,
    org: Uuid,
    name: &str,
    scopes: &[&str],
    mode: &str,
    mcps: Option<Vec<Uuid>>,
    expires_at: Option<DateTime<Utc>>,
    secret: &str,
) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let k = NewKey::generate(id, Some(secret.as_bytes()));
    block_on(store.insert_key(&NewKeyRow {
        id,
        org_id: org,
        name: name.into(),
        key_hash: k.hash.clone(),
        key_prefix: k.prefix.clone(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        rate_limit_rpm: 60,
        expires_at,
        created_at: t("2026-01-01T00:00:00Z"),
        mcp_access_mode: mode.into(),
        allowed_mcp_ids: mcps,
    }))
    .unwrap();
    (id, k.reveal().to_owned())
}

fn line(at: DateTime<Utc>, key: Uuid, org: Uuid, mcp: &str, status: u16, ip: &str) -> String {
    format!(
        r#"{{"created_at":"{}","organization_id":"{org}","api_key_id":"{key}","mcp_server_name":"{mcp}","http_status_code":{status},"latency_ms":40,"request_size_bytes":100,"response_size_bytes":1000,"source_ip":"{ip}","user_agent":"plexmcp-python/1.4.0"}}"#,
        at.to_rfc3339()
    )
}

/// Two organizations, their keys and MCPs, traffic from a minute ago, four alerts, and a
/// daemon serving them.
fn start(backend: Backend, failures_per_minute: u32) -> Option<Server> {
    let db = TestDb::new(backend)?;
    let store = block_on(Store::open(&db.url)).unwrap();
    for (id, name, slug) in [(ORG_A, "Acme", "acme"), (ORG_B, "Beta", "beta")] {
        block_on(store.insert_org(&NewOrg {
            id,
            name: name.into(),
            slug: slug.into(),
            tier: "free".into(),
            custom_max_requests_monthly: None,
            created_at: t("2026-01-01T00:00:00Z"),
        }))
        .unwrap();
    }
    db.exec(&format!(
        "INSERT INTO mcp_instances (id, org_id, name) VALUES ('{MCP_GITHUB}', '{ORG_A}', 'github'), ('{MCP_SLACK}', '{ORG_A}', 'slack')"
    ));
    let read = ["reports:read"];
    let rw = ["reports:read", "alerts:write"];
    let (reader_id, reader) = add_key(&store, ORG_A, "reader", &read, "all", None, None, SECRET);
    let (_, writer) = add_key(&store, ORG_A, "writer", &rw, "all", None, None, SECRET);
    let (_, no_scope) = add_key(&store, ORG_A, "no-scope", &[], "all", None, None, SECRET);
    let (limited_id, limited) = add_key(
        &store,
        ORG_A,
        "limited",
        &read,
        "selected",
        Some(vec![MCP_GITHUB]),
        None,
        SECRET,
    );
    let (other_id, other_org) = add_key(&store, ORG_B, "other", &rw, "all", None, None, SECRET);
    let (_, expired) = add_key(
        &store,
        ORG_A,
        "expired",
        &read,
        "all",
        None,
        Some(t("2026-02-01T00:00:00Z")),
        SECRET,
    );
    let (revoked_id, revoked) = add_key(&store, ORG_A, "revoked", &read, "all", None, None, SECRET);
    db.exec(&format!(
        "UPDATE api_keys SET status = 'revoked', revoked_at = '2026-03-01T00:00:00.000Z' WHERE id = '{revoked_id}'"
    ));
    let (_, bad_signature) = add_key(
        &store,
        ORG_A,
        "other-secret",
        &read,
        "all",
        None,
        None,
        "a different secret, also 32+ chars long",
    );
    let unknown = NewKey::generate(Uuid::new_v4(), Some(SECRET.as_bytes()))
        .reveal()
        .to_owned();
    block_on(store.close());

    // A minute ago: this month, inside every default window.
    let at = Utc::now() - chrono::Duration::minutes(1);
    let mut lines = Vec::new();
    for _ in 0..30 {
        lines.push(line(at, reader_id, ORG_A, "github", 200, "81.2.69.160"));
    }
    for _ in 0..5 {
        lines.push(line(at, reader_id, ORG_A, "slack", 500, "89.160.20.112"));
    }
    for _ in 0..10 {
        lines.push(line(at, limited_id, ORG_A, "github", 200, "81.2.69.160"));
    }
    for _ in 0..4 {
        lines.push(line(at, limited_id, ORG_A, "slack", 429, "81.2.69.160"));
    }
    for _ in 0..7 {
        lines.push(line(at, other_id, ORG_B, "github", 200, "89.160.20.112"));
    }
    let log = db.path("requests.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    kw_ok(
        &db,
        &[
            "--geoip",
            GEOIP,
            "ingest",
            "--no-progress",
            log.to_str().unwrap(),
        ],
    );
    // Alerts of January (away from anything the ingest may raise).
    for (fp, ty, sev, status, key, org, started) in [
        (
            "fp-a1",
            "new_country",
            "medium",
            "firing",
            reader_id,
            ORG_A,
            "2026-01-05T10:00:00.000Z",
        ),
        (
            "fp-a2",
            "error_spike",
            "high",
            "firing",
            reader_id,
            ORG_A,
            "2026-01-06T10:00:00.000Z",
        ),
        (
            "fp-a3",
            "rate_spike",
            "low",
            "resolved",
            limited_id,
            ORG_A,
            "2026-01-07T10:00:00.000Z",
        ),
        (
            "fp-b1",
            "new_country",
            "high",
            "firing",
            other_id,
            ORG_B,
            "2026-01-05T11:00:00.000Z",
        ),
    ] {
        db.exec(&format!(
            "INSERT INTO kw_alerts (fingerprint, alert_type, severity, status, key_id, key_prefix, org_id, \
             source_ip, started_at, last_seen_at, summary, evidence, detected_at) VALUES ('{fp}', '{ty}', \
             '{sev}', '{status}', '{key}', 'pmcp_01', '{org}', '81.2.69.160', '{started}', '{started}', \
             'summary of {fp}', '{{\"country\":\"SE\"}}', '{started}')"
        ));
    }
    let empty = db.path("live.log");
    std::fs::write(&empty, "").unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let admin_hash = hex::encode(Sha256::digest(ADMIN_TOKEN.as_bytes()));
    let child = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", &addr])
        .arg("--source")
        .arg(format!("file:{}", empty.display()))
        .args([
            "--admin-token-sha256",
            &format!("{},{admin_hash}", "0".repeat(64)),
        ])
        .args([
            "--api-auth-failures-per-minute",
            &failures_per_minute.to_string(),
        ])
        .env("KEYWATCH_API_KEY_HMAC_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let server = Server {
        addr: addr.clone(),
        child,
        keys: Keys {
            reader,
            writer,
            no_scope,
            limited,
            other_org,
            expired,
            revoked,
            bad_signature,
            unknown,
            reader_id,
            limited_id,
            other_id,
        },
        db,
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            http(&addr, "GET /healthz HTTP/1.0\r\n\r\n").is_some_and(|r| r.0 == 200)
        }),
        "the daemon answers /healthz"
    );
    Some(server)
}

fn servers(failures_per_minute: u32) -> Vec<Server> {
    [Backend::Sqlite, Backend::Postgres]
        .into_iter()
        .filter_map(|b| start(b, failures_per_minute))
        .collect()
}

/// One request with a raw `Authorization` value (None: no header) and optional extra
/// headers and JSON body.
fn call(
    s: &Server,
    method: &str,
    path: &str,
    auth: Option<&str>,
    extra: &str,
    body: Option<&str>,
) -> (u16, String, String) {
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {}\r\n", s.addr);
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str(extra);
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    http(&s.addr, &req).expect("the server answers")
}

/// GET as `auth`.
fn get(s: &Server, path: &str, auth: &str) -> (u16, String, String) {
    call(s, "GET", path, Some(auth), "", None)
}

fn key_auth(k: &str) -> String {
    format!("ApiKey {k}")
}

fn admin() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

/// GET as `auth`, asserting 200 and the success envelope; returns `data` and `next_cursor`.
fn data(s: &Server, path: &str, auth: &str) -> (Value, Value) {
    let (status, _, body) = call(s, "GET", path, Some(auth), "", None);
    assert_eq!(status, 200, "GET {path}: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["success"], true, "{body}");
    (v["data"].clone(), v["next_cursor"].clone())
}

fn requests_by(rows: &Value, field: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[field].as_str().unwrap_or("").to_owned(),
                r["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn authorization_matrix() {
    for s in servers(1000) {
        let k = &s.keys;
        let usage = "/v1/usage";
        let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
            ("no header", None, 401, UNAUTHORIZED),
            (
                "Bearer with an API key",
                Some(format!("Bearer {}", k.reader)),
                401,
                UNAUTHORIZED,
            ),
            (
                "lowercase apikey",
                Some(format!("apikey {}", k.reader)),
                401,
                UNAUTHORIZED,
            ),
            (
                "two spaces",
                Some(format!("ApiKey  {}", k.reader)),
                401,
                UNAUTHORIZED,
            ),
            (
                "truncated key",
                Some(key_auth(&k.reader[..86])),
                401,
                UNAUTHORIZED,
            ),
            (
                "uppercase hex",
                Some(key_auth(
                    &k.reader.to_uppercase().replacen("PMCP_", "pmcp_", 1),
                )),
                401,
                UNAUTHORIZED,
            ),
            (
                "bad signature",
                Some(key_auth(&k.bad_signature)),
                401,
                UNAUTHORIZED,
            ),
            ("unknown key", Some(key_auth(&k.unknown)), 401, UNAUTHORIZED),
            (
                "wrong admin token",
                Some("Bearer not-the-token".into()),
                401,
                UNAUTHORIZED,
            ),
            (
                "expired",
                Some(key_auth(&k.expired)),
                401,
                r#"{"success":false,"error":{"code":"expired_key","message":"API key has expired"}}"#,
            ),
            (
                "revoked",
                Some(key_auth(&k.revoked)),
                401,
                r#"{"success":false,"error":{"code":"revoked_key","message":"API key has been revoked"}}"#,
            ),
            (
                "key without the report scope",
                Some(key_auth(&k.no_scope)),
                403,
                FORBIDDEN,
            ),
        ];
        for (what, auth, status, body) in &cases {
            let (got, head, got_body) = call(&s, "GET", usage, auth.as_deref(), "", None);
            assert_eq!((got, got_body.as_str()), (*status, *body), "{what}");
            assert!(
                head.contains("content-type: application/json"),
                "{what}: {head}"
            );
        }
        // Trailing whitespace is not part of an HTTP field value (RFC 9110 §5.5): the server
        // never sees it, and the key works.
        let (status, _, _) = call(
            &s,
            "GET",
            usage,
            Some(&format!("{} \t", key_auth(&k.reader))),
            "",
            None,
        );
        assert_eq!(status, 200, "trailing whitespace");

        // Another organization's data, by id, by slug, and a key of it.
        let reader = key_auth(&k.reader);
        for path in [
            format!("/v1/usage?org={ORG_B}"),
            "/v1/usage?org=beta".to_owned(),
            format!("/v1/usage?key={}", k.other_id),
            format!("/v1/keys/{}/activity", k.other_id),
            "/v1/alerts/fp-b1".to_owned(),
            "/v1/limits?org=beta".to_owned(),
            "/v1/usage?key=unknown".to_owned(),
        ] {
            let (status, _, body) = get(&s, &path, &reader);
            assert_eq!((status, body.as_str()), (403, FORBIDDEN), "{path}");
        }
        // An MCP outside the key's access.
        let limited = key_auth(&k.limited);
        let (status, _, body) = get(&s, "/v1/usage?mcp=slack", &limited);
        assert_eq!(
            (status, body.as_str()),
            (403, FORBIDDEN),
            "mcp outside access"
        );
        // Writing without alerts:write.
        let (status, _, body) = call(&s, "POST", "/v1/alerts/fp-a1/ack", Some(&reader), "", None);
        assert_eq!(
            (status, body.as_str()),
            (403, FORBIDDEN),
            "ack without alerts:write"
        );
        let (status, _, body) = get(&s, "/v1/silences", &reader);
        assert_eq!(
            (status, body.as_str()),
            (403, FORBIDDEN),
            "silences without alerts:write"
        );

        // A key of its own organization, its own org asked by slug, and the admin token.
        let (d, _) = data(&s, "/v1/usage?org=acme", &reader);
        assert_eq!(
            requests_by(&d, "key_name"),
            vec![("limited".into(), 14), ("reader".into(), 35)]
        );
        let (d, _) = data(&s, "/v1/usage?group_by=org", &admin());
        assert_eq!(
            requests_by(&d, "org_name"),
            vec![("Acme".into(), 49), ("Beta".into(), 7)]
        );
        // An MCP-limited key asking for everything sees only its MCPs' usage.
        let (d, _) = data(&s, "/v1/usage?group_by=mcp", &limited);
        assert_eq!(requests_by(&d, "mcp"), vec![("github".into(), 40)]);
        let (d, _) = data(&s, "/v1/usage?group_by=mcp", &reader);
        assert_eq!(
            requests_by(&d, "mcp"),
            vec![("github".into(), 40), ("slack".into(), 9)]
        );
        // Nothing of a refused key is written anywhere.
        let stored =
            s.db.query("SELECT CAST(evidence AS TEXT), summary FROM kw_alerts");
        for row in stored {
            for cell in row.into_iter().flatten() {
                assert!(!cell.contains(&k.unknown[20..]));
            }
        }
    }
}

#[test]
fn failed_attempts_are_rate_limited_per_ip() {
    for s in servers(3) {
        for _ in 0..3 {
            let (status, _, _) = call(
                &s,
                "GET",
                "/v1/usage",
                Some(&key_auth(&s.keys.unknown)),
                "",
                None,
            );
            assert_eq!(status, 401);
        }
        // Over the limit even the right key is refused, so guessing cannot go on.
        let (status, head, body) = call(
            &s,
            "GET",
            "/v1/usage",
            Some(&key_auth(&s.keys.reader)),
            "",
            None,
        );
        assert_eq!(status, 429, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        let retry: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .expect("Retry-After")
            .trim()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        // Endpoints without authentication are not affected.
        let (status, _, _) = call(&s, "GET", "/healthz", None, "", None);
        assert_eq!(status, 200);
    }
}

#[test]
fn refused_credentials_reach_the_pipeline_as_refused_key_lines() {
    for s in servers(1000) {
        for k in [&s.keys.unknown, &s.keys.bad_signature, &s.keys.expired] {
            let (status, _, _) = get(&s, "/v1/usage", &key_auth(k));
            assert_eq!(status, 401);
        }
        let admin = admin();
        let refused = || {
            let (d, _) = data(&s, "/v1/usage?mcp=keywatch-api&group_by=mcp", &admin);
            d.as_array()
                .unwrap()
                .first()
                .map_or(0, |r| r["errors"]["auth"].as_u64().unwrap())
        };
        assert!(
            wait_until(Duration::from_secs(30), || refused() == 3),
            "three refused API requests counted, got {}",
            refused()
        );
        // The expired key is known, and the wrongly signed one is found by its 12-character
        // prefix (as the pipeline resolves the auth server's refused lines): both count in
        // their organization; the unknown key in none.
        let (d, _) = data(&s, "/v1/usage?mcp=keywatch-api&group_by=org", &admin);
        assert_eq!(
            requests_by(&d, "org_name"),
            vec![("".into(), 1), ("Acme".into(), 2)]
        );
        // Only 12 characters of a presented key are ever kept.
        for table in ["kw_dead_letters", "kw_alerts", "kw_key_activity"] {
            for row in s.db.query(&format!("SELECT * FROM {table}")) {
                for cell in row.into_iter().flatten() {
                    assert!(!cell.contains(&s.keys.unknown[12..40]), "{table}: {cell}");
                }
            }
        }
    }
}

#[test]
fn usage_filters_buckets_pagination_and_csv() {
    for s in servers(1000) {
        let reader = key_auth(&s.keys.reader);
        let (d, next) = data(&s, &format!("/v1/usage?key={}", s.keys.reader_id), &reader);
        assert_eq!(d.as_array().unwrap().len(), 1);
        let row = &d[0];
        assert_eq!(row["requests"], 35);
        assert_eq!(
            row["errors"],
            json!({"auth": 0, "rate_limited": 0, "client": 0, "server": 5})
        );
        assert_eq!(row["bytes_in"], 3500);
        assert_eq!(row["bytes_out"], 35000);
        assert_eq!(row["peak_rpm"], 35);
        assert_eq!(row["rate_limit_rpm"], 60);
        assert!(row["latency_ms"]["p50"].is_number());
        assert_eq!(next, Value::Null);

        let (d, _) = data(&s, "/v1/usage?mcp=slack&group_by=mcp", &reader);
        assert_eq!(requests_by(&d, "mcp"), vec![("slack".into(), 9)]);
        let (d, _) = data(&s, "/v1/usage?group_by=key&bucket=minute", &reader);
        assert!(
            d.as_array()
                .unwrap()
                .iter()
                .all(|r| r["bucket_start"].is_string())
        );
        let (d, _) = data(&s, "/v1/usage?until=2026-01-01T00:00:00Z", &reader);
        assert_eq!(d, json!([]));

        // Pagination: one row per page, the cursor carries on, the last page has none.
        let (p1, c1) = data(&s, "/v1/usage?limit=1", &reader);
        assert_eq!(p1.as_array().unwrap().len(), 1);
        let c1 = c1.as_str().expect("a next cursor").to_owned();
        let (p2, c2) = data(&s, &format!("/v1/usage?limit=1&cursor={c1}"), &reader);
        assert_eq!(p2.as_array().unwrap().len(), 1);
        assert_ne!(p1[0]["key_id"], p2[0]["key_id"]);
        assert_eq!(c2, Value::Null);

        // CSV, by Accept or by format=csv.
        let (status, head, body) = call(
            &s,
            "GET",
            "/v1/usage?group_by=org",
            Some(&reader),
            "Accept: text/csv\r\n",
            None,
        );
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/csv"), "{head}");
        let mut lines = body.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("{name} in {header:?}"))
        };
        let row: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(row[col("org_name")], "Acme");
        assert_eq!(row[col("requests")], "49");
        assert_eq!(row[col("errors_server")], "5");
        assert!(!row[col("latency_ms_p50")].is_empty());
        assert_eq!(lines.next(), None, "one organization only");
        let (_, _, by_param) = get(&s, "/v1/usage?group_by=org&format=csv", &reader);
        assert_eq!(by_param, body);

        // Bad values are 400 with the documented envelope and the valid choices.
        for (path, msg) in [
            (
                "/v1/usage?bucket=week",
                "bucket \"week\" is not one of minute, hour, day",
            ),
            (
                "/v1/usage?from=yesterday",
                "from \"yesterday\" is not an RFC 3339 time such as 2026-11-20T00:00:00Z",
            ),
            ("/v1/usage?limit=0", "limit 0 is not between 1 and 1000"),
            (
                "/v1/usage?cursor=zz",
                "cursor is not one this server gave; start again without it",
            ),
            (
                "/v1/usage?format=xml",
                "format \"xml\" is not one of json, csv",
            ),
        ] {
            let (status, _, body) = get(&s, path, &reader);
            assert_eq!(status, 400, "{path}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["success"], false);
            assert_eq!(v["error"]["code"], "bad_request");
            assert_eq!(v["error"]["message"], msg, "{path}");
        }
        let (status, _, body) = get(&s, "/v1/usage?colour=red", &reader);
        assert_eq!(status, 400, "unknown parameters are refused: {body}");
    }
}

#[test]
fn limits_and_cli_agree() {
    for s in servers(1000) {
        let (d, _) = data(&s, "/v1/limits", &key_auth(&s.keys.reader));
        let orgs = d["organizations"].as_array().unwrap();
        assert_eq!(orgs.len(), 1, "only its own organization");
        let a = &orgs[0];
        assert_eq!(a["org_name"], "Acme");
        assert_eq!(a["month_to_date"], 49);
        assert_eq!(a["monthly_limit"], 1000);
        assert_eq!(a["limit_source"], "tier");
        assert_eq!(a["percent_used"], 4.9);
        let keys = d["keys"].as_array().unwrap();
        let limited = keys
            .iter()
            .find(|k| k["key_id"] == s.keys.limited_id.to_string())
            .unwrap();
        assert_eq!(limited["rate_limited"], 4);
        assert_eq!(limited["peak_rpm"], 14);
        let (all, _) = data(&s, "/v1/limits", &admin());
        assert_eq!(all["organizations"].as_array().unwrap().len(), 2);

        // The CLI answers from the same query functions: the same numbers.
        let cli: Value =
            serde_json::from_str(&kw_ok(&s.db, &["report", "limits", "--format", "json"])).unwrap();
        // The forecast depends on the instant asked (the rate is per second), so it is
        // compared to the minute.
        let without_forecast = |v: &Value| -> Value {
            let mut v = v.clone();
            for o in v.as_array_mut().unwrap() {
                o.as_object_mut().unwrap().remove("forecast_limit_at");
            }
            v
        };
        assert_eq!(
            without_forecast(&cli["data"]["organizations"]),
            without_forecast(&all["organizations"])
        );
        let f = |v: &Value| {
            v["organizations"][0]["forecast_limit_at"]
                .as_str()
                .map(|s| s[..16].to_owned())
        };
        assert!(
            f(&all).is_some(),
            "Acme reaches its limit this month at this rate"
        );
        assert_eq!(
            f(&cli["data"]).map(|s| s[..13].to_owned()),
            f(&all).map(|s| s[..13].to_owned())
        );
        assert_eq!(cli["data"]["keys"], all["keys"]);
        let cli: Value = serde_json::from_str(&kw_ok(
            &s.db,
            &["report", "usage", "--group-by", "org", "--format", "json"],
        ))
        .unwrap();
        let (api, _) = data(&s, "/v1/usage?group_by=org", &admin());
        assert_eq!(cli["data"], api);
    }
}

#[test]
fn alerts_filter_paginate_and_change_status() {
    for s in servers(1000) {
        let reader = key_auth(&s.keys.reader);
        let writer = key_auth(&s.keys.writer);
        let jan = "until=2026-02-01T00:00:00Z";
        let ids = |d: &Value| -> Vec<String> {
            d.as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let (d, next) = data(&s, &format!("/v1/alerts?{jan}"), &reader);
        assert_eq!(
            ids(&d),
            ["fp-a1", "fp-a2", "fp-a3"],
            "its organization only, oldest first"
        );
        assert_eq!(next, Value::Null);
        let (d, _) = data(&s, &format!("/v1/alerts?{jan}"), &admin());
        assert_eq!(ids(&d), ["fp-a1", "fp-b1", "fp-a2", "fp-a3"]);
        let by_key = format!("key={}", s.keys.limited_id);
        for (filter, want) in [
            ("status=firing", vec!["fp-a1", "fp-a2"]),
            ("type=rate_spike", vec!["fp-a3"]),
            ("severity=high", vec!["fp-a2"]),
            (by_key.as_str(), vec!["fp-a3"]),
            ("since=2026-01-06T00:00:00Z", vec!["fp-a2", "fp-a3"]),
        ] {
            let (d, _) = data(&s, &format!("/v1/alerts?{jan}&{filter}"), &reader);
            assert_eq!(ids(&d), want, "{filter}");
        }
        // Keyset pagination.
        let (p1, c1) = data(&s, &format!("/v1/alerts?{jan}&limit=2"), &reader);
        assert_eq!(ids(&p1), ["fp-a1", "fp-a2"]);
        let (p2, c2) = data(
            &s,
            &format!("/v1/alerts?{jan}&limit=2&cursor={}", c1.as_str().unwrap()),
            &reader,
        );
        assert_eq!(ids(&p2), ["fp-a3"]);
        assert_eq!(c2, Value::Null);
        // CSV.
        let (status, _, csv) = get(&s, &format!("/v1/alerts?{jan}&format=csv"), &reader);
        assert_eq!(status, 200);
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        for c in [
            "id",
            "type",
            "severity",
            "status",
            "started_at",
            "summary",
            "evidence_country",
        ] {
            assert!(header.contains(&c), "{c} in {header:?}");
        }
        assert_eq!(csv.lines().count(), 4);
        // One alert, and a missing one.
        let (a, _) = data(&s, "/v1/alerts/fp-a2", &reader);
        assert_eq!(a["type"], "error_spike");
        assert_eq!(a["summary"], "summary of fp-a2");
        let (status, _, body) = get(&s, "/v1/alerts/nope", &reader);
        assert_eq!(status, 404, "{body}");
        // Ack, resolve, benign.
        for (action, status) in [
            ("ack", "acknowledged"),
            ("resolve", "resolved"),
            ("benign", "benign"),
        ] {
            let (code, _, body) = call(
                &s,
                "POST",
                &format!("/v1/alerts/fp-a1/{action}"),
                Some(&writer),
                "",
                Some(r#"{"note": "travelling"}"#),
            );
            assert_eq!(code, 200, "{action}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["data"]["status"], status, "{action}");
        }
        let note =
            s.db.query("SELECT note FROM kw_alerts WHERE fingerprint = 'fp-a1'");
        assert_eq!(note[0][0].as_deref(), Some("travelling"));
        let (d, _) = data(&s, &format!("/v1/alerts?{jan}&status=benign"), &reader);
        assert_eq!(ids(&d), ["fp-a1"]);
        // Another organization's alert cannot be changed; a malformed body is 400.
        let (code, _, body) = call(&s, "POST", "/v1/alerts/fp-b1/ack", Some(&writer), "", None);
        assert_eq!((code, body.as_str()), (403, FORBIDDEN));
        let (code, _, _) = call(
            &s,
            "POST",
            "/v1/alerts/fp-a2/ack",
            Some(&writer),
            "",
            Some("{not json"),
        );
        assert_eq!(code, 400);
        let big = format!(r#"{{"note": "{}"}}"#, "x".repeat(70_000));
        let (code, _, body) = call(
            &s,
            "POST",
            "/v1/alerts/fp-a2/ack",
            Some(&writer),
            "",
            Some(&big),
        );
        assert_eq!(code, 413, "{body}");
        // The CLI's alert report reads the same rows.
        let cli: Value = serde_json::from_str(&kw_ok(
            &s.db,
            &[
                "report",
                "alerts",
                "--until",
                "2026-02-01T00:00:00Z",
                "--status",
                "benign",
                "--format",
                "json",
            ],
        ))
        .unwrap();
        assert_eq!(ids(&cli["data"]), ["fp-a1"]);
    }
}

#[test]
fn silences_are_added_listed_and_ended_within_an_organization() {
    for s in servers(1000) {
        let writer = key_auth(&s.keys.writer);
        let other = key_auth(&s.keys.other_org);
        let (code, _, body) = call(
            &s,
            "POST",
            "/v1/silences",
            Some(&writer),
            "",
            Some(
                r#"{"types": ["rate_spike"], "orgs": ["beta"], "expires_in": "4h", "reason": "load test"}"#,
            ),
        );
        assert_eq!(
            (code, body.as_str()),
            (403, FORBIDDEN),
            "another organization"
        );
        let (code, _, body) = call(
            &s,
            "POST",
            "/v1/silences",
            Some(&writer),
            "",
            Some(r#"{"types": ["rate_spike"], "expires_in": "4h", "reason": "load test"}"#),
        );
        assert_eq!(code, 201, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let id = v["data"]["id"].as_str().unwrap().to_owned();
        assert_eq!(
            v["data"]["matchers"]["orgs"],
            json!([ORG_A.to_string()]),
            "its own organization"
        );
        let (list, _) = data(&s, "/v1/silences", &writer);
        assert_eq!(list.as_array().unwrap().len(), 1);
        let (list, _) = data(&s, "/v1/silences", &other);
        assert_eq!(list, json!([]), "not seen by another organization");
        let (code, _, body) = call(
            &s,
            "DELETE",
            &format!("/v1/silences/{id}"),
            Some(&other),
            "",
            None,
        );
        assert_eq!((code, body.as_str()), (403, FORBIDDEN));
        // The CLI sees it too, then the owner ends it.
        assert!(kw_ok(&s.db, &["silence", "list"]).contains(&id));
        let end = || {
            call(
                &s,
                "DELETE",
                &format!("/v1/silences/{id}"),
                Some(&writer),
                "",
                None,
            )
            .0
        };
        assert_eq!(end(), 200);
        let (list, _) = data(&s, "/v1/silences", &admin());
        assert_eq!(list, json!([]));
        assert_eq!(end(), 404, "already ended");
        for bad in [
            r#"{"types": ["rate_spike"]}"#,
            r#"{"types": ["no_such_type"], "expires_in": "1h"}"#,
            r#"{"types": ["rate_spike"], "expires_in": "soon"}"#,
            r#"{"types": ["rate_spike"], "expires_in": "1h", "colour": "red"}"#,
        ] {
            let (code, _, body) = call(&s, "POST", "/v1/silences", Some(&writer), "", Some(bad));
            assert_eq!(code, 400, "{bad}: {body}");
        }
    }
}

#[test]
fn key_activity_and_hygiene() {
    for s in servers(1000) {
        let reader = key_auth(&s.keys.reader);
        let (a, _) = data(
            &s,
            &format!("/v1/keys/{}/activity", s.keys.reader_id),
            &reader,
        );
        assert_eq!(a["requests"], 35);
        assert_eq!(a["errors"]["server"], 5);
        let ips: Vec<(String, u64)> = a["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["value"].as_str().unwrap().to_owned(),
                    r["requests"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ips,
            vec![("81.2.69.160".into(), 30), ("89.160.20.112".into(), 5)]
        );
        let countries: Vec<&str> = a["countries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"].as_str().unwrap())
            .collect();
        assert_eq!(countries, ["GB", "SE"]);
        assert_eq!(a["user_agents"][0]["value"], "plexmcp-python/1.4.0");
        assert!(a["ips"][0]["first_seen"].is_string());
        let mcps: Vec<&str> = a["mcps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mcp"].as_str().unwrap())
            .collect();
        assert_eq!(mcps, ["github", "slack"]);
        // An MCP-limited key sees only its MCPs in its own activity too.
        let (a, _) = data(
            &s,
            &format!("/v1/keys/{}/activity", s.keys.limited_id),
            &key_auth(&s.keys.limited),
        );
        assert_eq!(a["requests"], 10);
        // Hygiene: every key of the fixture has no expiry or has expired; the admin sees both
        // organizations, a key only its own.
        let (h, _) = data(&s, "/v1/keys/hygiene", &reader);
        let rows = h.as_array().unwrap();
        assert!(rows.iter().all(|r| r["org_id"] == ORG_A.to_string()));
        let reader_checks: Vec<&str> = rows
            .iter()
            .filter(|r| r["key_id"] == s.keys.reader_id.to_string())
            .map(|r| r["check"].as_str().unwrap())
            .collect();
        assert_eq!(
            reader_checks,
            ["no_expiry", "narrow_mcps"],
            "all MCPs, two used"
        );
        let narrow = rows
            .iter()
            .find(|r| r["key_id"] == s.keys.reader_id.to_string() && r["check"] == "narrow_mcps")
            .unwrap();
        assert_eq!(narrow["suggested_mcps"], json!(["github", "slack"]));
        let limited_checks: Vec<&Value> = rows
            .iter()
            .filter(|r| r["key_id"] == s.keys.limited_id.to_string())
            .collect();
        assert_eq!(
            limited_checks.len(),
            1,
            "a limited key is not told to narrow"
        );
        let (all, _) = data(&s, "/v1/keys/hygiene", &admin());
        let other: Vec<&Value> = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["key_id"] == s.keys.other_id.to_string())
            .collect();
        let checks: Vec<&str> = other.iter().map(|r| r["check"].as_str().unwrap()).collect();
        assert_eq!(checks, ["no_expiry", "narrow_mcps"]);
        assert_eq!(other[1]["suggested_mcps"], json!(["github"]));
        // The CLI reports the same findings.
        let cli: Value =
            serde_json::from_str(&kw_ok(&s.db, &["report", "hygiene", "--format", "json"]))
                .unwrap();
        assert_eq!(cli["data"], all);
        let cli: Value = serde_json::from_str(&kw_ok(
            &s.db,
            &[
                "report",
                "activity",
                "--key",
                &s.keys.reader_id.to_string(),
                "--format",
                "json",
            ],
        ))
        .unwrap();
        assert_eq!(
            cli["data"]["ips"],
            data(
                &s,
                &format!("/v1/keys/{}/activity", s.keys.reader_id),
                &reader
            )
            .0["ips"]
        );
    }
}

#[test]
fn injection_attempts_in_filters_are_inert() {
    for s in servers(1000) {
        let admin = admin();
        let attempts = [
            "%27%20OR%20%271%27%3D%271",
            "1%27%3B%20DROP%20TABLE%20kw_alerts%3B--",
            "%22%29%3B%20DELETE%20FROM%20api_keys%3B--",
            "x%27%20UNION%20SELECT%20key_hash%20FROM%20api_keys--",
        ];
        for a in attempts {
            for param in [
                "org", "key", "mcp", "from", "until", "bucket", "group_by", "cursor",
            ] {
                let (code, _, body) = get(&s, &format!("/v1/usage?{param}={a}"), &admin);
                assert!(
                    matches!(code, 200 | 400 | 404),
                    "{param}={a}: {code} {body}"
                );
                if code == 200 {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(v["data"], json!([]), "{param}={a} matches nothing");
                }
                // Errors quote the value given, and nothing of keywatch's own SQL or errors.
                for leak in [
                    "kw_usage",
                    "FROM kw_",
                    "sqlx",
                    "syntax",
                    "database error",
                    "panicked",
                ] {
                    assert!(!body.contains(leak), "{param}={a}: {body}");
                }
            }
            for param in [
                "status", "type", "severity", "key", "org", "since", "until", "cursor",
            ] {
                let (code, _, body) = get(&s, &format!("/v1/alerts?{param}={a}"), &admin);
                assert!(matches!(code, 400 | 404), "{param}={a}: {code} {body}");
            }
            let (code, _, _) = get(&s, &format!("/v1/alerts/{a}"), &admin);
            assert_eq!(code, 404);
            let (code, _, _) = get(&s, &format!("/v1/keys/{a}/activity"), &admin);
            assert_eq!(code, 404);
        }
        // Everything is still there.
        let (d, _) = data(&s, "/v1/alerts?until=2026-02-01T00:00:00Z", &admin);
        assert_eq!(d.as_array().unwrap().len(), 4);
        let keys = s.db.query("SELECT CAST(COUNT(*) AS TEXT) FROM api_keys");
        assert_eq!(keys[0][0].as_deref(), Some("8"));
    }
}

/// Checks `doc` against the OpenAPI 3 specification with Python's openapi-spec-validator (an
/// implementation of the spec that is not keywatch's): absent, the check is skipped with a
/// note; with `CI` set, it must run.
fn validate_openapi(doc: &str) {
    use std::process::Command;
    if !python_module(
        "openapi_spec_validator",
        "openapi-spec-validator",
        "OpenAPI validation",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc).unwrap();
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the OpenAPI document is not valid OpenAPI 3: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn openapi_document_matches_the_routes() {
    for s in servers(1000) {
        let (code, _, body) = call(&s, "GET", "/v1/openapi.json", None, "", None);
        assert_eq!(code, 200);
        let doc: Value = serde_json::from_str(&body).expect("the document is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        validate_openapi(&body);
        let paths = doc["paths"].as_object().unwrap();
        let mut ops = Vec::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["responses"].is_object(), "{method} {path}");
                ops.push((method.to_uppercase(), path.clone()));
            }
        }
        ops.sort();
        let mut want: Vec<(String, String)> = [
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
            ("GET", "/v1/openapi.json"),
            ("GET", "/v1/usage"),
            ("GET", "/v1/limits"),
            ("GET", "/v1/alerts"),
            ("GET", "/v1/alerts/{id}"),
            ("POST", "/v1/alerts/{id}/ack"),
            ("POST", "/v1/alerts/{id}/resolve"),
            ("POST", "/v1/alerts/{id}/benign"),
            ("GET", "/v1/silences"),
            ("POST", "/v1/silences"),
            ("DELETE", "/v1/silences/{id}"),
            ("GET", "/v1/keys/hygiene"),
            ("GET", "/v1/keys/{id}/activity"),
        ]
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
        want.sort();
        assert_eq!(ops, want);
        // Every documented operation exists on the server (not the router's fallback, not
        // 405), and what it says about authentication holds.
        for (method, path) in &ops {
            let concrete = path.replace("{id}", "fp-a1");
            let body = (method != "GET").then_some("{}");
            let (code, _, text) = call(&s, method, &concrete, Some(&admin()), "", body);
            assert_ne!(code, 405, "{method} {path}");
            assert!(
                !text.contains("no such endpoint"),
                "{method} {path}: {text}"
            );
            let secured = !paths[path][method.to_lowercase()]["security"]
                .as_array()
                .unwrap()
                .is_empty();
            let (code, _, _) = call(&s, method, &concrete, None, "", body);
            assert_eq!(
                code == 401,
                secured,
                "{method} {path} without credentials: {code}"
            );
            for (name, value) in [("format", "json"), ("limit", "1")] {
                let documented = paths[path][method.to_lowercase()]["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == name);
                if method == "GET" && secured {
                    let (code, _, _) = call(
                        &s,
                        method,
                        &format!("{concrete}?{name}={value}"),
                        Some(&admin()),
                        "",
                        None,
                    );
                    assert_eq!(code != 400, documented, "{method} {path}?{name}: {code}");
                }
            }
        }
        // And a path it does not list is the fallback.
        let (code, _, body) = get(&s, "/v1/nothing", &admin());
        assert_eq!(code, 404);
        assert!(body.contains("no such endpoint"));
        let (code, _, _) = call(&s, "PUT", "/v1/usage", Some(&admin()), "", None);
        assert_eq!(code, 405);
    }
}

#[test]
fn readyz_says_the_database_answers() {
    for s in servers(1000) {
        let (code, _, body) = call(&s, "GET", "/readyz", None, "", None);
        assert_eq!((code, body.as_str()), (200, "ready\n"));
    }
}
