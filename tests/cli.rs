//! The command line as a person meets it: keys printed once and only on stdout, errors as
//! one clear sentence and a non-zero exit, and a demo that shows real numbers.

mod common;

use common::*;

fn one_sentence_error(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "a failure exits non-zero");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert!(!err.contains("backtrace"), "no backtrace: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].starts_with("keywatch: "), "{err}");
    err
}

#[test]
fn keys_create_prints_the_key_once_and_stores_only_its_hash() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let org = kw_ok(
        &db,
        &["orgs", "create", "--name", "Acme Corp", "--tier", "team"],
    );
    let org = org.trim();
    assert!(
        uuid::Uuid::try_parse(org).is_ok(),
        "orgs create prints the id alone: {org:?}"
    );
    let out = keywatch()
        .args([
            "--database-url",
            &db.url,
            "keys",
            "create",
            "--org",
            "acme-corp",
            "--name",
            "ci-deploy",
        ])
        .args([
            "--expires-in",
            "90d",
            "--rpm",
            "600",
            "--scopes",
            "reports:read",
        ])
        .env(
            "KEYWATCH_API_KEY_HMAC_SECRET",
            "0123456789abcdef0123456789abcdef",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.trim_end_matches('\n');
    assert!(!key.contains('\n'), "the key alone on stdout");
    assert_eq!(key.len(), 87);
    assert!(key.starts_with("pmcp_01"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&key[..17]),
        "details on stderr name the prefix: {stderr}"
    );
    assert!(!stderr.contains(key), "stderr never repeats the key");

    let list = kw_ok(&db, &["keys", "list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let row = &v["data"][0];
    assert_eq!(row["prefix"], format!("{}...", &key[..17]));
    assert_eq!(row["rpm"], "600");
    assert_eq!(row["org"], "acme-corp");
    let hashes = db.query("SELECT key_hash, key_prefix FROM api_keys");
    use sha2::Digest;
    assert_eq!(
        hashes[0][0].as_deref(),
        Some(hex::encode(sha2::Sha256::digest(key.as_bytes())).as_str())
    );
    let raw = std::fs::read(db.path("keywatch.db")).unwrap();
    let wal = std::fs::read(db.path("keywatch.db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "no full key on disk"
        );
    }
}

#[test]
fn unreachable_database_is_one_sentence() {
    let out = keywatch()
        .args([
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "report",
            "usage",
        ])
        .output()
        .unwrap();
    let err = one_sentence_error(&out);
    assert!(err.contains("--database-url"), "names the setting: {err}");
    assert!(err.contains("127.0.0.1:1"), "names the server: {err}");
}

#[test]
fn unsupported_database_url_names_the_forms() {
    let out = keywatch()
        .args(["--database-url", "mysql://x/y", "migrate"])
        .output()
        .unwrap();
    let err = one_sentence_error(&out);
    assert!(err.contains("sqlite://PATH"), "{err}");
}

#[test]
fn missing_log_file_is_one_sentence() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let out = kw(&db, &["ingest", "/nonexistent/requests.log"]);
    let err = one_sentence_error(&out);
    assert!(err.contains("/nonexistent/requests.log"), "{err}");
}

#[test]
fn bad_source_names_the_valid_ones() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let out = kw(
        &db,
        &["run", "--source", "kafka:topic", "--listen", "127.0.0.1:0"],
    );
    let err = one_sentence_error(&out);
    assert!(err.contains("file:PATH or stdin"), "{err}");
}

#[test]
fn unknown_org_in_a_report_says_where_to_look() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let out = kw(&db, &["report", "usage", "--org", "no-such-org"]);
    let err = one_sentence_error(&out);
    assert!(err.contains("keywatch orgs list"), "{err}");
}

#[test]
fn help_reads_well() {
    let out = keywatch().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "run", "ingest", "migrate", "keys", "orgs", "report", "demo", "simulate",
    ] {
        assert!(help.contains(cmd), "--help lists {cmd}");
    }
    let out = keywatch()
        .args(["report", "usage", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--group-by") && help.contains("--bucket") && help.contains("--since"));
}

#[test]
fn stdin_ingest_counts_everything() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("s.log");
    simulate(&db, &log, &["--keys", "4", "--lines", "500"]);
    let out = keywatch()
        .args(["--database-url", &db.url, "ingest", "--format", "json", "-"])
        .stdin(std::fs::File::open(&log).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(total_requests(&db), 500);
}

#[test]
fn demo_shows_real_numbers_from_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = keywatch()
        .args(["demo", "--no-serve", "--keys", "8"])
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Ingested"), "{stderr}");
    assert!(
        stdout.contains("Organizations") && stdout.contains("Keys:") && stdout.contains("MCPs:")
    );
    assert!(
        stdout.contains('%'),
        "month-to-date against the limit: {stdout}"
    );
    assert!(
        stdout.contains("Alerts raised by the detectors"),
        "the demo shows its alerts: {stdout}"
    );
    // The numbers in the demo are the database's: ask it directly.
    let db_url = format!("sqlite://{}", dir.path().join("demo/keywatch.db").display());
    let report = keywatch()
        .args([
            "--database-url",
            &db_url,
            "report",
            "usage",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let total: u64 = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    let log = std::fs::read_to_string(dir.path().join("demo/requests.log")).unwrap();
    assert_eq!(total, log.lines().count() as u64);
    assert!(total > 1000);
}

/// The demo has no token for /metrics, so it refuses to serve beyond this machine, before it
/// does any work.
#[test]
fn demo_refuses_a_non_loopback_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = keywatch()
        .args(["demo", "--listen", "0.0.0.0:9464", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let err = one_sentence_error(&out);
    assert!(
        err.contains("loopback") && err.contains("--listen"),
        "{err}"
    );
    assert!(!dir.path().join("demo").exists(), "nothing was generated");
}
