//! `--source postgres` against the auth server's own tables (created here as the auth server
//! creates them): rows inserted out of order and committed late (with a `created_at` before
//! rows already read) are each counted once, across a SIGKILL and restart; refused keys
//! come from `auth_audit_log`; `--postgres-since` starts a first run at a given time.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The daemon, killed when the test ends (also when it fails).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(db: &TestDb, extra: &[&str]) -> Daemon {
    Daemon(
        keywatch()
            .args(["--database-url", &db.url, "run", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--source", "postgres", "--postgres-poll", "1s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("daemon starts"),
    )
}

/// Requests per key id (`None`: refused keys).
fn requests_by_key(lines: &[Value]) -> BTreeMap<Option<String>, u64> {
    let mut m = BTreeMap::new();
    for v in lines {
        *m.entry(v["api_key_id"].as_str().map(str::to_owned))
            .or_default() += 1;
    }
    m
}

fn reported_requests(db: &TestDb) -> BTreeMap<Option<String>, u64> {
    reported(db, "key")
        .into_iter()
        .map(|(k, t)| (k, t.requests))
        .collect()
}

fn settles_at(db: &TestDb, want: u64) {
    let reached = wait_until(Duration::from_secs(60), || total_requests(db) >= want);
    assert!(reached, "reported {} of {want}", total_requests(db));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(total_requests(db), want, "nothing counted twice");
}

fn simulated(db: &TestDb, n: u64) -> Vec<Value> {
    let log = db.path("requests.log");
    simulate(
        db,
        &log,
        &["--keys", "15", "--lines", &n.to_string(), "--seed", "51"],
    );
    let mut lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by(|a, b| a["created_at"].as_str().cmp(&b["created_at"].as_str()));
    lines
}

#[test]
fn late_and_out_of_order_rows_are_counted_once() {
    let Some(db) = TestDb::new(Backend::Postgres) else {
        return;
    };
    db.exec(AUTH_LOG_TABLES);
    let lines = simulated(&db, 3_000);
    assert!(
        lines.iter().any(|v| !v["api_key_id"].is_string()),
        "refused keys too"
    );
    // Rows come in three parts: the first 2,000 (inserted in reverse, so out of order), then
    // every fifth of those held back until the daemon has read past them, then the rest.
    let (first, rest) = lines.split_at(2_000);
    let held_back = |i: usize| i.is_multiple_of(5) && i > 0;
    let late: Vec<Value> = (0..first.len())
        .filter(|&i| held_back(i))
        .map(|i| first[i].clone())
        .collect();
    let mut early: Vec<Value> = (0..first.len())
        .filter(|&i| !held_back(i))
        .map(|i| first[i].clone())
        .collect();
    early.reverse();
    insert_auth_log(&db, &early);
    let daemon = start(&db, &["--postgres-lookback", "7d"]);
    settles_at(&db, early.len() as u64);

    insert_auth_log(&db, &late);
    settles_at(&db, (early.len() + late.len()) as u64);

    // A SIGKILL and restart: the cursor and the remembered rows are where the counts are.
    drop(daemon);
    insert_auth_log(&db, rest);
    let daemon = start(&db, &["--postgres-lookback", "7d"]);
    settles_at(&db, lines.len() as u64);
    drop(daemon);
    assert_eq!(reported_requests(&db), requests_by_key(&lines));
    let (by_key, _) = {
        let all = db.path("all.log");
        let text: Vec<String> = lines.iter().map(Value::to_string).collect();
        std::fs::write(&all, text.join("\n")).unwrap();
        oracle(&all)
    };
    let got = reported(&db, "key");
    for (k, want) in by_key.iter().filter(|(k, _)| k.is_some()) {
        assert_eq!(got.get(k), Some(want), "key {k:?} counted exactly");
    }
    let kept = db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_source_seen");
    let kept: u64 = kept[0][0].as_deref().unwrap().parse().unwrap();
    assert!(kept > 0, "the rows of the look-back window are remembered");
}

#[test]
fn a_first_start_can_begin_at_a_given_time() {
    let Some(db) = TestDb::new(Backend::Postgres) else {
        return;
    };
    db.exec(AUTH_LOG_TABLES);
    let lines = simulated(&db, 1_000);
    insert_auth_log(&db, &lines);
    let at = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap()
    };
    let since = lines[600]["created_at"].as_str().unwrap().to_owned();
    let want = lines.iter().filter(|v| at(v) >= at(&lines[600])).count() as u64;
    let daemon = start(&db, &["--postgres-since", &since]);
    settles_at(&db, want);
    drop(daemon);
}
