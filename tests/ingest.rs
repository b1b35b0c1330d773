//! `keywatch ingest` end to end on both back ends: usage totals equal the file's own counts,
//! re-running counts nothing twice, and bad lines are counted, kept and explained.

mod common;

use std::io::Write;

use common::*;

fn exact_totals(db: TestDb) {
    let log = db.path("requests.log");
    simulate(&db, &log, &["--keys", "20", "--days", "1", "--seed", "7"]);
    let (by_key, by_org) = oracle(&log);
    let lines: u64 = by_key.values().map(|t| t.requests).sum();
    assert!(lines > 1_000, "the simulation has traffic: {lines}");
    assert!(
        by_key.contains_key(&None),
        "the simulation has refused keys"
    );

    let summary = kw_ok(&db, &["ingest", "--format", "json", log.to_str().unwrap()]);
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["data"]["accepted"].as_u64(), Some(lines));
    assert_eq!(summary["data"]["rejected"].as_u64(), Some(0));

    assert_eq!(
        reported(&db, "key"),
        by_key,
        "per-key totals equal the file's"
    );
    assert_eq!(
        reported(&db, "org"),
        by_org,
        "per-organization totals equal the file's"
    );

    // Again over the same file: nothing new, nothing counted twice.
    let again = kw_ok(&db, &["ingest", "--format", "json", log.to_str().unwrap()]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["data"]["accepted"].as_u64(), Some(0));
    assert_eq!(reported(&db, "key"), by_key);

    // Appended lines are picked up where the last run stopped.
    let text = std::fs::read_to_string(&log).unwrap();
    let extra: Vec<&str> = text.lines().take(250).collect();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    for l in &extra {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    let (by_key2, by_org2) = oracle(&log);
    let third = kw_ok(&db, &["ingest", "--format", "json", log.to_str().unwrap()]);
    let third: serde_json::Value = serde_json::from_str(&third).unwrap();
    assert_eq!(third["data"]["accepted"].as_u64(), Some(250));
    assert_eq!(reported(&db, "key"), by_key2);
    assert_eq!(reported(&db, "org"), by_org2);
}

#[test]
fn usage_is_exact_on_sqlite() {
    exact_totals(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn usage_is_exact_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        exact_totals(db);
    }
}

/// Good lines with every kind of bad one between them.
fn mixed_file(db: &TestDb) -> (std::path::PathBuf, u64, Vec<(u64, &'static str)>) {
    let log = db.path("good.log");
    simulate(db, &log, &["--keys", "3", "--lines", "40", "--seed", "3"]);
    let good: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let long = format!(
        r#"{{"created_at":"2026-11-20T11:00:00Z","http_status_code":200,"user_agent":"{}"}}"#,
        "a".repeat(70_000)
    );
    let bad: Vec<(Vec<u8>, &'static str)> = vec![
        (b"this is not json".to_vec(), "not_json"),
        (br#"{"http_status_code":200}"#.to_vec(), "missing_field"),
        (br#"{"created_at":"2026-11-20T11:00:00Z","http_status_code":"ok"}"#.to_vec(), "wrong_type"),
        (br#"{"created_at":"last tuesday","http_status_code":200}"#.to_vec(), "bad_timestamp"),
        (br#"{"created_at":"2026-11-20T11:00:00Z","http_status_code":200,"source_ip":"300.1.2.3"}"#.to_vec(), "bad_ip"),
        (long.into_bytes(), "too_long"),
        (b"{\"created_at\":\"2026-11-20T11:00:00Z\",\"http_status_code\":200,\"user_agent\":\"\xc3\x28\"}".to_vec(), "invalid_utf8"),
        (br#"{"created_at":"2026-11-20T11:00:00Z","http_status_code":7000}"#.to_vec(), "out_of_range"),
    ];
    let mut out = Vec::new();
    let mut expected = Vec::new();
    let mut line_no = 0u64;
    let mut bad_iter = bad.into_iter();
    for (i, g) in good.iter().enumerate() {
        if i % 5 == 2
            && let Some((b, reason)) = bad_iter.next()
        {
            out.extend_from_slice(&b);
            out.push(b'\n');
            line_no += 1;
            expected.push((line_no, reason));
        }
        out.extend_from_slice(g.as_bytes());
        out.push(b'\n');
        line_no += 1;
    }
    assert!(bad_iter.next().is_none(), "every bad kind was placed");
    let mixed = db.path("mixed.log");
    std::fs::write(&mixed, out).unwrap();
    (mixed, good.len() as u64, expected)
}

fn bad_lines_are_kept_with_reason_and_line(db: TestDb) {
    let (mixed, good, expected) = mixed_file(&db);
    let (by_key, _) = oracle(&mixed);
    let out = kw(
        &db,
        &["ingest", "--format", "json", mixed.to_str().unwrap()],
    );
    assert!(out.status.success(), "bad lines never stop ingestion");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["data"]["accepted"].as_u64(), Some(good));
    assert_eq!(
        summary["data"]["rejected"].as_u64(),
        Some(expected.len() as u64)
    );
    for (_, reason) in &expected {
        assert_eq!(
            summary["data"]["rejected_by_reason"][reason].as_u64(),
            Some(1),
            "{reason}"
        );
    }
    // The oracle skips what serde_json cannot read; the two lines it can read but keywatch
    // refuses (bad timestamp, bad IP, out of range) must not be counted by keywatch.
    let reported = reported(&db, "key");
    let reported_total: u64 = reported.values().map(|t| t.requests).sum();
    assert_eq!(reported_total, good);
    let oracle_total: u64 = by_key.values().map(|t| t.requests).sum();
    assert!(oracle_total >= good);

    let rejects = kw_ok(&db, &["report", "rejected", "--format", "json"]);
    let rejects: serde_json::Value = serde_json::from_str(&rejects).unwrap();
    let rows = rejects["data"].as_array().unwrap();
    let got: Vec<(u64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = expected.iter().map(|(l, r)| (*l, r.to_string())).collect();
    assert_eq!(
        got, want,
        "each bad line reported with its reason and line number"
    );
    for r in rows {
        assert!(r["source"].as_str().unwrap().ends_with("mixed.log"));
        assert!(!r["detail"].as_str().unwrap().is_empty());
    }
}

#[test]
fn bad_lines_on_sqlite() {
    bad_lines_are_kept_with_reason_and_line(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn bad_lines_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        bad_lines_are_kept_with_reason_and_line(db);
    }
}

#[test]
fn full_keys_in_refused_lines_are_redacted() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let org = kw_ok(&db, &["orgs", "create", "--name", "Leaky", "--tier", "pro"]);
    let key = kw_ok(
        &db,
        &["keys", "create", "--org", org.trim(), "--name", "leak"],
    );
    let key = key.trim();
    let log = db.path("leak.log");
    std::fs::write(
        &log,
        format!("{{\"created_at\":\"2026-11-20T11:00:00Z\",\"user_agent\":\"{key}\"}}\n"),
    )
    .unwrap();
    kw_ok(&db, &["ingest", log.to_str().unwrap()]);
    let rejects = kw_ok(&db, &["report", "rejected", "--format", "json"]);
    assert!(
        rejects.contains(&key[..17]),
        "the prefix is kept: {rejects}"
    );
    assert!(!rejects.contains(key), "the full key is never stored");
    let raw = std::fs::read(db.path("keywatch.db")).unwrap();
    assert!(
        !raw.windows(key.len()).any(|w| w == key.as_bytes()),
        "the full key is nowhere in the database file"
    );
}

/// Key probing from one address: many refused prefixes in a few minutes is one alert, stored
/// with the address, and `report alerts` lists it.
fn probing_raises_one_alert(db: TestDb) {
    let log = db.path("probe.log");
    let mut lines = String::new();
    for i in 0..60u32 {
        lines.push_str(&format!(
            r#"{{"request_id":"{}","created_at":"2026-11-20T10:0{}:{:02}Z","api_key_id":null,"organization_id":null,"key_prefix":"pmcp_01{:05x}","http_status_code":401,"error_code":"unauthorized","source_ip":"89.160.20.112","user_agent":"python-requests/2.31"}}"#,
            uuid::Uuid::new_v4(),
            i / 20,
            (i % 20) * 3,
            i * 7919
        ));
        lines.push('\n');
    }
    std::fs::write(&log, lines).unwrap();
    kw_ok(&db, &["ingest", log.to_str().unwrap()]);
    let out = kw_ok(
        &db,
        &[
            "report",
            "alerts",
            "--type",
            "auth_failure_burst",
            "--format",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let alerts = v["data"].as_array().unwrap();
    let by_ip: Vec<_> = alerts
        .iter()
        .filter(|a| a["source_ip"] == "89.160.20.112")
        .collect();
    assert_eq!(by_ip.len(), 1, "one alert for the probing address: {out}");
    let a = by_ip[0];
    assert_eq!(a["type"], "auth_failure_burst");
    assert!(
        a["started_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-20T10:0"),
        "{a}"
    );
    assert!(!a["summary"].as_str().unwrap().is_empty());
    let bad = kw(&db, &["report", "alerts", "--type", "rate_spik"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("rate_spike"),
        "lists the valid types"
    );
}

#[test]
fn probing_on_sqlite() {
    probing_raises_one_alert(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn probing_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        probing_raises_one_alert(db);
    }
}
