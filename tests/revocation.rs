//! A key revoked in the database is treated as revoked by a running daemon within 5 s: the
//! key cache polls the key tables (`--key-refresh`, 2 s by default), so the next call with
//! the key raises `revoked_key_use`.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use common::*;

fn line(key_id: &str, org_id: &str, prefix: &str) -> String {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    format!(
        r#"{{"request_id":"{}","created_at":"{now}","organization_id":"{org_id}","api_key_id":"{key_id}","key_prefix":"{prefix}","mcp_server_name":"github","endpoint_path":"/mcp","http_method":"POST","http_status_code":200,"latency_ms":40,"request_size_bytes":100,"response_size_bytes":200,"source_ip":"81.2.69.160","user_agent":"t/1","rate_limit_hit":false,"quota_exceeded":false}}"#,
        uuid::Uuid::new_v4()
    )
}

fn revoked_alerts(db: &TestDb) -> usize {
    let out = kw_ok(
        db,
        &[
            "report",
            "alerts",
            "--type",
            "revoked_key_use",
            "--since",
            "1d",
            "--format",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["data"].as_array().map_or(0, Vec::len)
}

fn revocation_is_seen_within_5_s(db: TestDb) {
    let log = db.path("live.log");
    simulate(&db, &db.path("seed.log"), &["--keys", "3", "--lines", "10"]);
    let rows = db.query(
        "SELECT CAST(id AS TEXT), CAST(org_id AS TEXT), key_prefix FROM api_keys ORDER BY key_prefix LIMIT 1",
    );
    let [id, org, prefix] = &rows[0][..] else {
        panic!("a key: {rows:?}")
    };
    let (id, org, prefix) = (
        id.clone().unwrap(),
        org.clone().unwrap(),
        prefix.clone().unwrap(),
    );
    let append = |l: String| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(f, "{l}").unwrap();
    };
    append(line(&id, &org, &prefix));
    let mut daemon = keywatch()
        .args(["--database-url", &db.url, "run", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--source")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || total_requests(&db) == 1));
    assert_eq!(revoked_alerts(&db), 0, "an active key raises nothing");

    let revoked_at = (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    db.exec(&format!(
        "UPDATE api_keys SET status = 'revoked', revoked_at = '{revoked_at}' WHERE CAST(id AS TEXT) = '{id}'"
    ));
    std::thread::sleep(Duration::from_secs(5));
    append(line(&id, &org, &prefix));
    let seen = wait_until(Duration::from_secs(5), || revoked_alerts(&db) == 1);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        seen,
        "a call 5 s after the revocation raises revoked_key_use"
    );
}

#[test]
fn revocation_is_seen_within_5_s_on_sqlite() {
    revocation_is_seen_within_5_s(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn revocation_is_seen_within_5_s_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        revocation_is_seen_within_5_s(db);
    }
}
