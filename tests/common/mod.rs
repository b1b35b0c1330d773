//! Helpers shared by the integration tests: the real binary, a fresh database per test (a
//! SQLite file, or a new PostgreSQL database on the server named by
//! `KEYWATCH_TEST_POSTGRES_URL`), and an oracle that counts a log file independently of
//! keywatch's own parser.

#![allow(dead_code)]

pub mod fuzz;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod smtp;

/// The keywatch binary built for these tests.
pub fn keywatch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keywatch"));
    c.env_remove("KEYWATCH_DATABASE_URL")
        .env_remove("KEYWATCH_SOURCE")
        .env_remove("KEYWATCH_SMTP_URL")
        .env(
            "KEYWATCH_ALERTS",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/alerts-test.toml"),
        )
        .env("KEYWATCH_LOG", "warn");
    c
}

/// Runs keywatch against `db`, asserting success, and returns stdout.
pub fn kw_ok(db: &TestDb, args: &[&str]) -> String {
    let out = kw(db, args);
    assert!(
        out.status.success(),
        "keywatch {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

pub fn kw(db: &TestDb, args: &[&str]) -> Output {
    keywatch()
        .arg("--database-url")
        .arg(&db.url)
        .args(args)
        .output()
        .expect("keywatch runs")
}

/// Which back end a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of the test's own, removed when the test ends.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pg_admin: Option<(String, String)>,
}

impl TestDb {
    /// A fresh database on `backend`, or `None` (with a note) when PostgreSQL is not
    /// configured. Under CI a missing server is a failure, never a skip.
    pub fn new(backend: Backend) -> Option<TestDb> {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => Some(TestDb {
                url: format!("sqlite://{}", dir.path().join("keywatch.db").display()),
                backend,
                dir,
                pg_admin: None,
            }),
            Backend::Postgres => {
                let Ok(admin) = std::env::var("KEYWATCH_TEST_POSTGRES_URL") else {
                    assert!(
                        std::env::var("CI").is_err(),
                        "CI is set but KEYWATCH_TEST_POSTGRES_URL is not: the PostgreSQL tests must run"
                    );
                    eprintln!(
                        "skipped: PostgreSQL test (set KEYWATCH_TEST_POSTGRES_URL to run it)"
                    );
                    return None;
                };
                let name = format!("kw_test_{}", uuid::Uuid::new_v4().simple());
                pg_exec(&admin, &format!("CREATE DATABASE {name}"));
                let url = match admin.rsplit_once('/') {
                    Some((base, _)) => format!("{base}/{name}"),
                    None => panic!("KEYWATCH_TEST_POSTGRES_URL must end in /DATABASE"),
                };
                Some(TestDb {
                    url,
                    backend,
                    dir,
                    pg_admin: Some((admin, name)),
                })
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs SQL statements directly against this database.
    pub fn exec(&self, sql: &str) {
        match self.backend {
            Backend::Postgres => pg_exec(&self.url, sql),
            Backend::Sqlite => block_on(async {
                use sqlx::Connection;
                let mut c = sqlx::SqliteConnection::connect(&format!("{}?mode=rwc", self.url))
                    .await
                    .expect("sqlite connects");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&mut c)
                    .await
                    .expect("sql runs");
            }),
        }
    }

    /// Runs a query returning text rows.
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        block_on(async {
            use sqlx::{Connection, Row};
            let sql = sqlx::AssertSqlSafe(sql.to_owned());
            match self.backend {
                Backend::Sqlite => {
                    let mut c = sqlx::SqliteConnection::connect(&self.url)
                        .await
                        .expect("connects");
                    let rows = sqlx::query(sql)
                        .fetch_all(&mut c)
                        .await
                        .expect("query runs");
                    rows.iter()
                        .map(|r| {
                            (0..r.len())
                                .map(|i| r.try_get::<Option<String>, _>(i).ok().flatten())
                                .collect()
                        })
                        .collect()
                }
                Backend::Postgres => {
                    let mut c = sqlx::PgConnection::connect(&self.url)
                        .await
                        .expect("connects");
                    let rows = sqlx::query(sql)
                        .fetch_all(&mut c)
                        .await
                        .expect("query runs");
                    rows.iter()
                        .map(|r| {
                            (0..r.len())
                                .map(|i| r.try_get::<Option<String>, _>(i).ok().flatten())
                                .collect()
                        })
                        .collect()
                }
            }
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.pg_admin {
            let _ = std::panic::catch_unwind(|| {
                pg_exec(
                    admin,
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                )
            });
        }
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn pg_exec(url: &str, sql: &str) {
    block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    })
}

/// Both back ends, PostgreSQL only where configured.
pub fn backends() -> Vec<TestDb> {
    [Backend::Sqlite, Backend::Postgres]
        .into_iter()
        .filter_map(TestDb::new)
        .collect()
}

/// The counts of one group, as the oracle and the report both give them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub auth: u64,
    pub rate_limited: u64,
    pub client: u64,
    pub server: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Tally {
    fn add_status(&mut self, status: u64, bytes_in: u64, bytes_out: u64) {
        self.requests += 1;
        match status {
            401 | 403 => self.auth += 1,
            429 => self.rate_limited += 1,
            400..=499 => self.client += 1,
            500..=599 => self.server += 1,
            _ => {}
        }
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
    }
}

/// Counts a request log with serde_json alone, per key id (`None` for lines without one)
/// and per organization id. Lines that are not JSON objects with a status are skipped.
pub fn oracle(
    path: &Path,
) -> (
    BTreeMap<Option<String>, Tally>,
    BTreeMap<Option<String>, Tally>,
) {
    let bytes = std::fs::read(path).expect("log readable");
    let mut keys: BTreeMap<Option<String>, Tally> = BTreeMap::new();
    let mut orgs: BTreeMap<Option<String>, Tally> = BTreeMap::new();
    for line in bytes.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let Some(status) = v["http_status_code"].as_u64() else {
            continue;
        };
        let s = |f: &str| v[f].as_str().map(str::to_owned);
        let n = |f: &str| v[f].as_u64().unwrap_or(0);
        keys.entry(s("api_key_id")).or_default().add_status(
            status,
            n("request_size_bytes"),
            n("response_size_bytes"),
        );
        orgs.entry(s("organization_id")).or_default().add_status(
            status,
            n("request_size_bytes"),
            n("response_size_bytes"),
        );
    }
    (keys, orgs)
}

/// `report usage --format json` grouped by `group` ("key" or "org"), as tallies by id.
pub fn reported(db: &TestDb, group: &str) -> BTreeMap<Option<String>, Tally> {
    reported_with(db, group, &[])
}

/// [`reported`] with more arguments of `report usage` (a range: `--from`, `--until`).
pub fn reported_with(db: &TestDb, group: &str, extra: &[&str]) -> BTreeMap<Option<String>, Tally> {
    let mut args = vec!["report", "usage", "--group-by", group, "--format", "json"];
    args.extend_from_slice(extra);
    let out = kw_ok(db, &args);
    let v: Value = serde_json::from_str(&out).expect("report is JSON");
    assert_eq!(v["success"], true);
    let id_field = if group == "key" { "key_id" } else { "org_id" };
    let mut out = BTreeMap::new();
    for row in v["data"].as_array().expect("data is a list") {
        let e = &row["errors"];
        let t = Tally {
            requests: row["requests"].as_u64().unwrap(),
            auth: e["auth"].as_u64().unwrap(),
            rate_limited: e["rate_limited"].as_u64().unwrap(),
            client: e["client"].as_u64().unwrap(),
            server: e["server"].as_u64().unwrap(),
            bytes_in: row["bytes_in"].as_u64().unwrap(),
            bytes_out: row["bytes_out"].as_u64().unwrap(),
        };
        let prev = out.insert(row[id_field].as_str().map(str::to_owned), t);
        assert!(prev.is_none(), "one row per group");
    }
    out
}

/// Total requests reported.
pub fn total_requests(db: &TestDb) -> u64 {
    reported(db, "key").values().map(|t| t.requests).sum()
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Generates a log with `keywatch simulate` (and its keys in `db`).
pub fn simulate(db: &TestDb, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "simulate",
        "--out",
        out.to_str().unwrap(),
        "--end",
        "2026-11-20T12:00:00Z",
    ];
    args.extend_from_slice(extra);
    kw_ok(db, &args);
}

/// Appends `lines`, each with a newline, to the file at `path` (created if missing).
pub fn append(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A minimal HTTP/1.0 request (so no chunked answers): status, headers, body.
pub fn http(addr: &str, request: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_owned(), body.to_owned()))
}

pub fn get(addr: &str, path: &str, accept: &str) -> Option<(u16, String, String)> {
    http(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"),
    )
}

/// `/metrics` in the Prometheus text format.
pub fn scrape(addr: &str) -> String {
    let (status, _, body) = get(addr, "/metrics", "text/plain").expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    body
}

/// SplitMix64: small, fast and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn below_usize(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    pub fn poisson(&mut self, mean: f64) -> u64 {
        if mean <= 0.0 {
            return 0;
        }
        if mean > 40.0 {
            let u1 = self.unit().max(1e-12);
            let u2 = self.unit();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            return (mean + z * mean.sqrt()).round().max(0.0) as u64;
        }
        let l = (-mean).exp();
        let (mut k, mut p) = (0, 1.0);
        loop {
            p *= self.unit();
            if p <= l {
                return k;
            }
            k += 1;
        }
    }
}

/// Whether Python's `module` imports. Without it a test prints `skipped:` and passes, but
/// with `CI` set it fails: CI installs it (`pip install {package}`), so its tests must run.
pub fn python_module(module: &str, package: &str, what: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but Python's {package} is missing (pip install {package}): the {what} must run"
        );
        eprintln!("skipped: {what} (pip install {package} to run it)");
    }
    ok
}

/// A spawned process (a keywatch daemon, a sink) killed with SIGKILL when dropped, so a failing
/// test leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Sends `signal` (`TERM`, `KILL`, `HUP`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0.id().to_string())
            .status();
    }

    /// Waits for the process to exit, at most `timeout`; `None` if it is still running.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill_9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Its peak resident memory so far (`VmHWM`), in KiB: memory-mapped files included.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    /// Its resident anonymous memory now (`RssAnon`: the heap, not mapped files), in KiB.
    pub fn anon_rss_kib(&self) -> u64 {
        self.status_kib("RssAnon")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .expect("the process is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    /// Stops it with SIGTERM and waits; returns its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        self.0.wait().expect("wait for the process")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The auth server's log tables, as it creates them: what `--source postgres` reads.
pub const AUTH_LOG_TABLES: &str = "
CREATE TABLE mcp_request_log (
    request_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    organization_id UUID, api_key_id UUID, user_id UUID, tenant_id UUID, session_id UUID,
    mcp_server_name TEXT, endpoint_path TEXT, http_method TEXT, http_status_code INTEGER,
    request_size_bytes INTEGER, response_size_bytes INTEGER, latency_ms INTEGER,
    tokens_used INTEGER, source_ip TEXT, user_agent TEXT, error_message TEXT, error_code TEXT,
    rate_limit_hit BOOLEAN DEFAULT false, quota_exceeded BOOLEAN DEFAULT false,
    metadata JSONB DEFAULT '{}', processed_at TIMESTAMPTZ
);
CREATE INDEX idx_mcp_request_log_created_at ON mcp_request_log (created_at);
CREATE TABLE auth_audit_log (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_type VARCHAR(50) NOT NULL, severity VARCHAR(20) NOT NULL DEFAULT 'info',
    user_id UUID, ip_address TEXT, user_agent TEXT, auth_method VARCHAR(50),
    metadata JSONB NOT NULL DEFAULT '{}'
);
";

/// Inserts request-log lines into [`AUTH_LOG_TABLES`] as the auth server would have written
/// them: a line with a key as an `mcp_request_log` row, a refused key as a `login_failed`
/// audit row.
pub fn insert_auth_log(db: &TestDb, lines: &[Value]) {
    let (requests, refused): (Vec<&Value>, Vec<&Value>) =
        lines.iter().partition(|v| v["api_key_id"].is_string());
    if !requests.is_empty() {
        let json = serde_json::to_string(&requests).unwrap();
        db.exec(&format!(
            "INSERT INTO mcp_request_log SELECT * FROM json_populate_recordset(NULL::mcp_request_log, $kw${json}$kw$)"
        ));
    }
    for v in refused {
        let meta = serde_json::json!({
            "key_prefix": v["key_prefix"], "reason": "key_not_found", "endpoint": "mcp_proxy"
        });
        db.exec(&format!(
            "INSERT INTO auth_audit_log (id, created_at, event_type, severity, ip_address, user_agent, auth_method, metadata) \
             VALUES ('{}', '{}', 'login_failed', 'warning', {}, 't', 'api_key', $kw${meta}$kw$)",
            v["request_id"].as_str().unwrap(),
            v["created_at"].as_str().unwrap(),
            v["source_ip"].as_str().map_or("NULL".into(), |s| format!("'{s}'")),
        ));
    }
}

/// The NATS JetStream server the tests use.
pub const NATS_SERVER: &str = "127.0.0.1:4222";

/// A NATS stream of the test's own (name and subject prefix), deleted when the test ends.
pub struct TestStream {
    pub name: String,
    pub subject: String,
}

impl TestStream {
    /// `None` (with a note) when no NATS server answers; under CI that is a failure.
    pub fn new() -> Option<TestStream> {
        if TcpStream::connect_timeout(&NATS_SERVER.parse().unwrap(), Duration::from_secs(2))
            .is_err()
        {
            assert!(
                std::env::var("CI").is_err(),
                "CI is set but no NATS server answers at {NATS_SERVER}: the NATS tests must run"
            );
            eprintln!("skipped: NATS test (no NATS JetStream server at {NATS_SERVER})");
            return None;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        Some(TestStream {
            name: format!("KW_TEST_{}", id.to_uppercase()),
            subject: format!("kwtest.{id}"),
        })
    }

    /// The URL `--source` and `publish --nats` take, with `query` appended.
    pub fn url(&self, query: &str) -> String {
        format!(
            "nats://{NATS_SERVER}?stream={}&subject={}{query}",
            self.name, self.subject
        )
    }

    /// `keywatch publish` of `file` to the stream, split into `partitions`.
    pub fn publish(&self, db: &TestDb, partitions: u32, file: &Path) {
        kw_ok(
            db,
            &[
                "publish",
                "--nats",
                &self.url(""),
                "--partitions",
                &partitions.to_string(),
                file.to_str().unwrap(),
            ],
        );
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::panic::catch_unwind(move || {
            block_on(async move {
                if let Ok(c) = async_nats::connect(NATS_SERVER).await {
                    let _ = async_nats::jetstream::new(c).delete_stream(&name).await;
                }
            })
        });
    }
}

/// Polls `addr` until `/healthz` answers (or panics after 30 s, or when `child` has exited).
pub fn wait_healthy(child: &mut KillOnDrop, addr: &str) {
    let up = wait_until(Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("keywatch exited early: {status}");
        }
        get(addr, "/healthz", "text/plain").is_some_and(|(s, _, _)| s == 200)
    });
    assert!(up, "keywatch answers /healthz on {addr}");
}

/// The value of the sample `name_and_labels` (as written in the text format) in `scrape`.
pub fn sample(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}
