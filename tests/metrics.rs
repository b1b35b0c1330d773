//! `/metrics` as Prometheus and Grafana meet it, checked with the real tools: `promtool check
//! metrics` on a scrape of a loaded daemon, `promtool check rules` and `promtool test rules`
//! on the shipped rules, every PromQL expression of the shipped dashboard against a real
//! Prometheus server scraping a running daemon, and a flood of 100,000 keys in 1,000
//! organizations that must stay within the series bounds with exact totals.
//!
//! The tools come from Debian's `prometheus` package (`.ci/run` installs it). Without them
//! these tests say they were skipped; with `CI` set they fail instead.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// A tool from Debian's prometheus package, or `None` (with a note) outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but `{name}` is not on PATH: .ci/run installs Debian's prometheus package"
        );
        eprintln!("skipped: {name} is not installed (apt-get install prometheus)");
    }
    found
}

/// One sample of a text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of a Prometheus text exposition (comments skipped).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let (name, mut rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i + 1..series.len() - 1]),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while let Some((k, after)) = rest.split_once("=\"") {
            let mut v = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => v.push('\n'),
                        Some((_, c)) => v.push(c),
                        None => {}
                    },
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            labels.insert(k.trim_start_matches(',').to_owned(), v);
            rest = &after[end..];
        }
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value: value.parse().expect("numeric value"),
        });
    }
    out
}

fn sum_of(s: &[Sample], name: &str) -> f64 {
    s.iter().filter(|x| x.name == name).map(|x| x.value).sum()
}

/// Every request is in exactly one series of each request family.
fn assert_each_family_sums_to(s: &[Sample], want: u64) {
    for family in [
        "keywatch_requests_total",
        "keywatch_key_requests_total",
        "keywatch_organization_requests_total",
        "keywatch_mcp_requests_total",
    ] {
        assert_eq!(sum_of(s, family), want as f64, "{family} sums to the input");
    }
}

fn count_of(s: &[Sample], name: &str) -> usize {
    s.iter().filter(|x| x.name == name).count()
}

/// A running `keywatch run`, stopped (SIGTERM) when dropped.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(db: &TestDb, log: &Path, extra: &[&str]) -> Daemon {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = keywatch()
            .args(["--database-url", &db.url])
            .arg("--geoip")
            .arg(Path::new(MANIFEST).join("geoip"))
            .args(["run", "--listen", &addr])
            .arg("--source")
            .arg(format!("file:{}", log.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("daemon starts");
        let mut d = Daemon { child, addr };
        let up = wait_until(Duration::from_secs(30), || {
            get(&d.addr, "/healthz", "*/*").is_some_and(|r| r.0 == 200)
        });
        if !up {
            let _ = d.child.kill();
            panic!("keywatch run did not answer /healthz on {}", d.addr);
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Requests committed to the day rollup.
fn committed(db: &TestDb) -> u64 {
    db.query("SELECT CAST(COALESCE(SUM(requests), 0) AS TEXT) FROM kw_usage_day")
        .first()
        .and_then(|r| r[0].clone())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wait_committed(db: &TestDb, want: u64, timeout: Duration) {
    let ok = wait_until(timeout, || committed(db) >= want);
    assert!(ok, "committed {} of {want} requests", committed(db));
    // The metrics take a batch right after its commit returns. Polling /metrics instead
    // would rebalance the top K at each poll, so wait for that moment.
    std::thread::sleep(Duration::from_secs(2));
}

/// Lines the oracle counts (JSON objects with a status): what keywatch must accept.
fn oracle_total(log: &Path) -> u64 {
    oracle(log).0.values().map(|t| t.requests).sum()
}

fn promtool_check_metrics(promtool: &Path, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads");
    let out = child.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}"
    );
    assert_eq!(said.trim(), "", "promtool check metrics warned");
}

#[test]
fn a_scrape_of_a_loaded_daemon_passes_promtool_check_metrics() {
    let promtool = tool("promtool");
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("requests.log");
    simulate(
        &db,
        &log,
        &["--keys", "40", "--lines", "20000", "--seed", "5"],
    );
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(f, "not json\n{{\"created_at\":\"2026-11-20T11:00:00Z\"}}").unwrap();
    drop(f);
    let want = oracle_total(&log);
    let daemon = Daemon::start(&db, &log, &[]);
    wait_committed(&db, want, Duration::from_secs(120));
    let text = scrape(&daemon.addr);
    let s = samples(&text);

    // Every family says what it is.
    for family in [
        "keywatch_requests_total",
        "keywatch_key_requests_total",
        "keywatch_organization_requests_total",
        "keywatch_mcp_requests_total",
        "keywatch_request_duration_seconds",
        "keywatch_lines_rejected_total",
    ] {
        let base = family.trim_end_matches("_total");
        assert!(
            text.contains(&format!("# HELP {family} "))
                && text.contains(&format!("# TYPE {family} ")),
            "{base} has HELP and TYPE"
        );
    }
    assert_each_family_sums_to(&s, want);
    assert_eq!(
        sum_of(&s, "keywatch_request_duration_seconds_count"),
        want as f64
    );
    assert_eq!(sum_of(&s, "keywatch_lines_rejected_total"), 2.0);
    // Never a full key: a key label is the stored 20-character prefix at most.
    for x in s.iter().filter(|x| x.labels.contains_key("key_prefix")) {
        assert!(x.labels["key_prefix"].chars().count() <= 20, "{x:?}");
    }
    assert!(count_of(&s, "keywatch_geoip_database_build_timestamp_seconds") >= 1);
    assert_eq!(count_of(&s, "keywatch_build_info"), 1);

    // OpenMetrics when asked for.
    let (status, head, om) = get(
        &daemon.addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    )
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE keywatch_requests counter\n"));

    if let Some(promtool) = promtool {
        promtool_check_metrics(&promtool, &text);
    }
}

#[test]
fn the_rules_pass_promtool_check_rules_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = Path::new(MANIFEST).join("prometheus");
    for args in [
        ["check", "rules", "keywatch-rules.yml"],
        ["test", "rules", "keywatch-rules.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server of the test's own: random port, temp config and storage, killed when
/// dropped.
struct PrometheusServer {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    fn start(bin: &Path, target: &str) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let rules = Path::new(MANIFEST).join("prometheus/keywatch-rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: keywatch\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let mut p = PrometheusServer {
            child,
            addr,
            _dir: dir,
        };
        let ready = wait_until(Duration::from_secs(60), || {
            get(&p.addr, "/-/ready", "*/*").is_some_and(|r| r.0 == 200)
        });
        if !ready {
            let log = std::fs::read_to_string(p._dir.path().join("prometheus.log"));
            let _ = p.child.kill();
            panic!("prometheus did not become ready: {log:?}");
        }
        p
    }

    /// The result vector of an instant query, or the error Prometheus gave.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let body = format!("query={}", form_encode(promql));
        let req = format!(
            "POST /api/v1/query HTTP/1.0\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let (_, _, body) = http(&self.addr, &req).ok_or("no answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression of the dashboard (panel targets, and variable queries with
/// Grafana's `label_values(metric, label)` turned into PromQL), with the dashboard's
/// variables and Grafana's interval macros replaced as "All" and a short range would.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(MANIFEST).join("dashboards/keywatch.json"))
        .expect("dashboards/keywatch.json");
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            out.push((title, t["expr"].as_str().expect("expr").to_owned()));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().expect("variable query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .expect("label_values(metric, label)");
        let (metric, label) = inner.rsplit_once(',').unwrap();
        out.push((
            format!("variable {}", v["name"]),
            format!("group by ({}) ({metric})", label.trim()),
        ));
    }
    assert!(out.len() >= 20, "the dashboard has its panels");
    out.into_iter()
        .map(|(t, e)| {
            let e = e
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s")
                .replace("$__range", "5m")
                .replace("$instance", ".*")
                .replace("$organization", ".*")
                .replace("$key", ".*");
            (t, e)
        })
        .collect()
}

#[test]
fn every_dashboard_expression_returns_data_from_a_real_prometheus() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).unwrap();
    // A day of traffic ending now, fed to the daemon as it would be written: in slices.
    let source = db.path("simulated.log");
    kw_ok(
        &db,
        &[
            "simulate",
            "--out",
            source.to_str().unwrap(),
            "--keys",
            "60",
            "--lines",
            "60000",
            "--seed",
            "8",
        ],
    );
    let lines: Vec<String> = std::fs::read_to_string(&source)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let log = db.path("requests.log");
    std::fs::write(&log, lines[..2000].join("\n") + "\nnot json\n").unwrap();
    let daemon = Daemon::start(&db, &log, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (stop, log) = (Arc::clone(&stop), log.clone());
        std::thread::spawn(move || {
            for chunk in lines[2000..].chunks(1000) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
                writeln!(f, "{}", chunk.join("\n")).unwrap();
                std::thread::sleep(Duration::from_millis(1000));
            }
        })
    };
    let prom = PrometheusServer::start(&prometheus, &daemon.addr);
    let scraped = wait_until(Duration::from_secs(60), || {
        prom.query("keywatch:requests:rate5m > 0")
            .is_ok_and(|r| !r.is_empty())
    });
    assert!(
        scraped,
        "prometheus scraped keywatch and evaluated the rules"
    );

    let exprs = dashboard_expressions();
    let mut failures = Vec::new();
    let started = Instant::now();
    for (title, expr) in &exprs {
        // Give windowed expressions a few more scrapes before calling them empty.
        let mut last = Err("not run".to_owned());
        while started.elapsed() < Duration::from_secs(90) {
            last = prom.query(expr);
            if last.as_ref().is_ok_and(|r| !r.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        match last {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("{title}: {expr}: no data")),
            Err(e) => failures.push(format!("{title}: {expr}: {e}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = feeder.join();
    assert!(
        failures.is_empty(),
        "{} of {} dashboard expressions failed:\n{}",
        failures.len(),
        exprs.len(),
        failures.join("\n")
    );
}

fn month(t: chrono::DateTime<chrono::Utc>) -> (i32, u32) {
    use chrono::Datelike;
    (t.year(), t.month())
}

/// Organizations and keys straight into the auth server's tables, in one transaction.
fn insert_flood_tables(db: &TestDb, orgs: &[uuid::Uuid], keys: &[(uuid::Uuid, usize)]) {
    let mut sql = String::from("BEGIN;\n");
    let tiers = ["free", "pro", "team", "enterprise"];
    for chunk in orgs.chunks(500).enumerate() {
        let rows: Vec<String> = chunk
            .1
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let n = chunk.0 * 500 + i;
                format!(
                    "('{id}', 'Flood org {n}', 'flood-org-{n}', '{}')",
                    tiers[n % tiers.len()]
                )
            })
            .collect();
        sql.push_str(&format!(
            "INSERT INTO organizations (id, name, slug, subscription_tier) VALUES {};\n",
            rows.join(",")
        ));
    }
    for chunk in keys.chunks(500) {
        let rows: Vec<String> = chunk
            .iter()
            .map(|(id, org)| {
                let hex = id.simple().to_string();
                format!(
                    "('{id}', '{}', 'flood key {}', '{hex}', 'pmcp_{}...', 600)",
                    orgs[*org],
                    &hex[..8],
                    &hex[..12]
                )
            })
            .collect();
        sql.push_str(&format!(
            "INSERT INTO api_keys (id, org_id, name, key_hash, key_prefix, rate_limit_rpm) VALUES {};\n",
            rows.join(",")
        ));
    }
    sql.push_str("COMMIT;\n");
    db.exec(&sql);
}

#[test]
fn a_flood_of_100000_keys_in_1000_organizations_stays_bounded_and_exact() {
    const KEYS: usize = 100_000;
    const ORGS: usize = 1_000;
    const MCPS: usize = 150;
    let db = TestDb::new(Backend::Sqlite).unwrap();
    kw_ok(&db, &["migrate"]);
    let orgs: Vec<uuid::Uuid> = (0..ORGS).map(|_| uuid::Uuid::new_v4()).collect();
    let keys: Vec<(uuid::Uuid, usize)> = (0..KEYS)
        .map(|i| (uuid::Uuid::new_v4(), i % ORGS))
        .collect();
    insert_flood_tables(&db, &orgs, &keys);

    // Two requests for every key, a few refused ones, statuses of every class, event times
    // over the last half hour.
    let log = db.path("flood.log");
    let start = chrono::Utc::now() - chrono::Duration::minutes(30);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
    let mut lines = 0u64;
    for round in 0..2 {
        for (i, (id, org)) in keys.iter().enumerate() {
            let n = round * KEYS + i;
            let at = start + chrono::Duration::milliseconds(n as i64 * 8);
            let status = [200, 200, 200, 200, 200, 200, 404, 429, 401, 503][n % 10];
            writeln!(
                out,
                r#"{{"request_id":"{}","created_at":"{}","organization_id":"{}","api_key_id":"{id}","mcp_server_name":"mcp-{}","http_status_code":{status},"latency_ms":{},"request_size_bytes":100,"response_size_bytes":1000}}"#,
                uuid::Uuid::new_v4(),
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                orgs[*org],
                n % MCPS,
                n % 700,
            )
            .unwrap();
            lines += 1;
        }
    }
    for n in 0..1000 {
        let at = start + chrono::Duration::milliseconds(n * 8);
        writeln!(
            out,
            r#"{{"created_at":"{}","key_prefix":"pmcp_deadbeef00","http_status_code":401}}"#,
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
        .unwrap();
        lines += 1;
    }
    drop(out);

    let daemon = Daemon::start(&db, &log, &[]);
    wait_committed(&db, lines, Duration::from_secs(400));
    let text = scrape(&daemon.addr);
    let s = samples(&text);
    eprintln!(
        "flood: {lines} lines, {KEYS} keys, {ORGS} organizations, {MCPS} MCPs: /metrics has {} series in {} bytes",
        s.len(),
        text.len()
    );
    assert!(s.len() <= 10_000, "{} series", s.len());
    assert!(text.len() <= 3_000_000, "{} bytes", text.len());
    // The per-entity families hold the configured top K and one other series each.
    let classes = 5;
    assert_eq!(
        count_of(&s, "keywatch_key_requests_total"),
        (100 + 1) * classes
    );
    assert_eq!(
        count_of(&s, "keywatch_organization_requests_total"),
        (200 + 1) * classes
    );
    assert_eq!(
        count_of(&s, "keywatch_mcp_requests_total"),
        (100 + 1) * classes
    );
    assert!(count_of(&s, "keywatch_key_requests_per_minute") <= 100);
    assert!(count_of(&s, "keywatch_organization_month_requests") <= 201);
    assert_each_family_sums_to(&s, lines);
    let tracked = |family: &str| {
        s.iter()
            .find(|x| x.name == "keywatch_metrics_entities_tracked" && x.labels["family"] == family)
            .map(|x| x.value)
    };
    assert_eq!(
        tracked("key"),
        Some(KEYS as f64 + 1.0),
        "every key and the unknown group"
    );
    assert_eq!(tracked("organization"), Some(ORGS as f64 + 1.0));
    let folded: f64 = s
        .iter()
        .filter(|x| x.name == "keywatch_metrics_series_folded_total")
        .map(|x| x.value)
        .sum();
    assert!(
        folded >= (KEYS - 100 + ORGS - 200 + MCPS - 100) as f64,
        "{folded}"
    );
    // The month-to-date of every organization is there, top K or other (unless the half
    // hour of traffic straddles a month boundary).
    if crate::month(start) == crate::month(chrono::Utc::now()) {
        assert_eq!(
            sum_of(&s, "keywatch_organization_month_requests"),
            (lines - 1000) as f64
        );
    }

    // The next scrape, after a rebalance, is still within bounds.
    let again = samples(&scrape(&daemon.addr));
    assert_eq!(
        count_of(&again, "keywatch_key_requests_total"),
        101 * classes
    );
    assert!(again.len() <= 10_000);
}
