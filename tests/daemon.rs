//! `keywatch run` as a daemon: it follows a file through appends, rename-rotation and
//! copy-truncate, and a `kill -9` at any moment neither loses nor double-counts a request.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

fn start_daemon(db: &TestDb, log: &Path) -> Child {
    keywatch()
        .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
        .arg("--source")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts")
}

fn stop(mut child: Child) {
    // SIGTERM: a clean stop commits what was read.
    unsafe_kill(child.id(), "TERM");
    let _ = child.wait();
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

fn generated_lines(db: &TestDb, n: u64, seed: &str) -> Vec<String> {
    let log = db.path(&format!("gen-{seed}.log"));
    simulate(
        db,
        &log,
        &["--keys", "10", "--lines", &n.to_string(), "--seed", seed],
    );
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits for the reported total to reach `want`, then checks it stays there.
fn assert_settles_at(db: &TestDb, want: u64) {
    let reached = wait_until(Duration::from_secs(60), || total_requests(db) >= want);
    let got = total_requests(db);
    assert!(reached, "reported {got} of {want} requests");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(total_requests(db), want, "nothing counted twice");
}

fn follows_rotation(db: TestDb) {
    let lines = generated_lines(&db, 5_000, "11");
    let log = db.path("app.log");
    let parts: Vec<&[String]> = vec![
        &lines[..1000],
        &lines[1000..2000],
        &lines[2000..2500],
        &lines[2500..3500],
        &lines[3500..],
    ];
    append(&log, parts[0]);
    let daemon = start_daemon(&db, &log);
    assert_settles_at(&db, 1000);

    // Rename-rotation: the writer appends to the renamed file before opening a new one.
    append(&log, parts[1]);
    let rotated = db.path("app.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    append(&rotated, parts[2]);
    append(&log, parts[3]);
    assert_settles_at(&db, 3500);

    // Copy-truncate (as logrotate's copytruncate does), once keywatch has caught up.
    std::fs::copy(&log, db.path("app.log.2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    append(&log, parts[4]);
    assert_settles_at(&db, 5000);
    stop(daemon);

    let (by_key, _) = oracle_of(&lines, &db);
    assert_eq!(
        reported(&db, "key"),
        by_key,
        "per-key totals exact after rotations"
    );
}

fn oracle_of(
    lines: &[String],
    db: &TestDb,
) -> (
    std::collections::BTreeMap<Option<String>, Tally>,
    std::collections::BTreeMap<Option<String>, Tally>,
) {
    let all = db.path("all-lines.log");
    std::fs::write(&all, lines.join("\n") + "\n").unwrap();
    oracle(&all)
}

#[test]
fn rotation_on_sqlite() {
    follows_rotation(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn rotation_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        follows_rotation(db);
    }
}

fn survives_kill_9(db: TestDb) {
    let log = db.path("big.log");
    simulate(
        &db,
        &log,
        &["--keys", "50", "--lines", "300000", "--seed", "5"],
    );
    let (by_key, by_org) = oracle(&log);
    let total: u64 = by_key.values().map(|t| t.requests).sum();
    // A pseudo-random but reproducible schedule of kills.
    let mut state = 0x2545_f491_u64;
    let mut kills = 0;
    for _ in 0..6 {
        let daemon = start_daemon(&db, &log);
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::thread::sleep(Duration::from_millis(300 + state % 700));
        unsafe_kill(daemon.id(), "KILL");
        let mut daemon = daemon;
        let _ = daemon.wait();
        kills += 1;
        assert!(
            total_requests(&db) <= total,
            "never more than the file holds"
        );
    }
    assert_eq!(kills, 6);
    let daemon = start_daemon(&db, &log);
    assert_settles_at(&db, total);
    stop(daemon);
    assert_eq!(reported(&db, "key"), by_key);
    assert_eq!(reported(&db, "org"), by_org);
}

#[test]
fn kill_9_on_sqlite() {
    survives_kill_9(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn kill_9_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        survives_kill_9(db);
    }
}

#[test]
fn sigterm_exits_cleanly_and_commits() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let lines = generated_lines(&db, 2_000, "13");
    let log = db.path("t.log");
    append(&log, &lines);
    let mut daemon = start_daemon(&db, &log);
    assert_settles_at(&db, 2_000);
    unsafe_kill(daemon.id(), "TERM");
    let status = daemon.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
}
