//! `--source nats://...` and `keywatch publish` against the real NATS JetStream server at
//! 127.0.0.1:4222: a published file is counted exactly once, a restart counts nothing twice,
//! and two instances splitting the partitions of one stream into one PostgreSQL database,
//! one of them killed with SIGKILL mid-stream and restarted, count every request once.
//!
//! Without a NATS server these tests print `skipped:` and pass; with `CI` set they fail.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

fn start(db: &TestDb, source: &str) -> Child {
    keywatch()
        .args(["--database-url", &db.url, "run", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--source", source])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("daemon starts")
}

fn stop(mut child: Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Simulates `n` lines (and their keys) once, and splits them after `at` into two files;
/// returns the whole log's path.
fn split_simulated(
    db: &TestDb,
    n: u64,
    at: usize,
    a: &std::path::Path,
    b: &std::path::Path,
) -> std::path::PathBuf {
    let all = db.path("simulated.log");
    simulate(
        db,
        &all,
        &["--keys", "30", "--lines", &n.to_string(), "--seed", "31"],
    );
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(a, lines[..at].join("\n") + "\n").unwrap();
    std::fs::write(b, lines[at..].join("\n") + "\n").unwrap();
    all
}

fn assert_settles_at(db: &TestDb, want: u64) {
    let reached = wait_until(Duration::from_secs(90), || total_requests(db) >= want);
    let got = total_requests(db);
    assert!(reached, "reported {got} of {want} requests");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(total_requests(db), want, "nothing counted twice");
}

#[test]
fn a_published_file_is_counted_once_across_a_restart() {
    let Some(stream) = TestStream::new() else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let (log, more) = (db.path("requests.log"), db.path("more.log"));
    split_simulated(&db, 5_700, 5_000, &log, &more);
    std::fs::write(
        db.path("bad.log"),
        "not json\n{\"created_at\":\"2026-11-20T12:00:00Z\"}\n",
    )
    .unwrap();
    stream.publish(&db, 4, &log);
    stream.publish(&db, 4, &db.path("bad.log"));
    let (by_key, by_org) = oracle(&log);

    let daemon = start(&db, &stream.url("&partitions=0-3&of=4"));
    assert_settles_at(&db, 5000);
    stop(daemon);
    assert_eq!(reported(&db, "key"), by_key);
    assert_eq!(reported(&db, "org"), by_org);
    let rejected = kw_ok(&db, &["report", "rejected", "--format", "json"]);
    assert!(rejected.contains("not_json"), "{rejected}");
    assert!(
        rejected.contains(&format!("nats:{}/", stream.name)),
        "{rejected}"
    );

    // Restarted: the durable consumers and checkpoints resume; nothing is read twice, and
    // what was published meanwhile is counted.
    stream.publish(&db, 4, &more);
    let daemon = start(&db, &stream.url("&partitions=0-3&of=4"));
    assert_settles_at(&db, 5700);
    stop(daemon);
}

fn counts_once_with_a_peer_killed(db: TestDb) {
    let Some(stream) = TestStream::new() else {
        return;
    };
    let (first, second) = (db.path("first.log"), db.path("second.log"));
    let all = split_simulated(&db, 30_000, 15_000, &first, &second);
    let (by_key, by_org) = oracle(&all);
    let total: u64 = by_key.values().map(|t| t.requests).sum();

    stream.publish(&db, 8, &first);
    let low = stream.url("&partitions=0-3&of=8");
    let high = stream.url("&partitions=4-7&of=8");
    let mut a = start(&db, &low);
    let b = start(&db, &high);
    // Kill A with SIGKILL as soon as it has counted some but (very likely) not all of its
    // share, then publish more while it is down.
    assert!(
        wait_until(Duration::from_secs(60), || total_requests(&db) > 2_000),
        "the instances started counting"
    );
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let at_kill = total_requests(&db);
    stream.publish(&db, 8, &second);
    std::thread::sleep(Duration::from_secs(1));
    let a = start(&db, &low);
    assert_settles_at(&db, total);
    stop(a);
    stop(b);
    eprintln!("killed A at {at_kill} of {total} requests counted");
    assert_eq!(reported(&db, "key"), by_key, "every request counted once");
    assert_eq!(reported(&db, "org"), by_org);
}

#[test]
fn two_instances_and_a_sigkill_count_every_request_once_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        counts_once_with_a_peer_killed(db);
    }
}

#[test]
fn partition_takeover_needs_only_the_partitions_flag() {
    // One instance reads every partition that two instances shared before.
    let Some(stream) = TestStream::new() else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("requests.log");
    simulate(
        &db,
        &log,
        &["--keys", "12", "--lines", "3000", "--seed", "41"],
    );
    let (by_key, _) = oracle(&log);
    stream.publish(&db, 8, &log);
    let a = start(&db, &stream.url("&partitions=0-3&of=8"));
    assert!(wait_until(Duration::from_secs(60), || total_requests(&db) > 0));
    stop(a);
    let all = start(&db, &stream.url("&partitions=0-7&of=8"));
    assert_settles_at(&db, 3000);
    stop(all);
    assert_eq!(reported(&db, "key"), by_key);
}

#[test]
fn readyz_says_which_source_is_not_reading() {
    // A NATS server that is not there: the daemon runs, retries, and is not ready.
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let dead = free_port();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut daemon = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", &addr])
        .arg("--source")
        .arg(format!(
            "nats://127.0.0.1:{dead}?stream=KW_NOWHERE&partitions=0-1&of=2"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let mut last = None;
    let unready = wait_until(Duration::from_secs(30), || {
        last = get(&addr, "/readyz", "text/plain");
        last.as_ref().is_some_and(|(code, _, body)| {
            *code == 503 && body.contains("source nats:KW_NOWHERE/0 is not reading")
        })
    });
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(unready, "{last:?}");
    // With sources that read, it is ready.
    let Some(stream) = TestStream::new() else {
        return;
    };
    let mut daemon = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", &addr])
        .arg("--source")
        .arg(stream.url("&partitions=0-1&of=2"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let ready = wait_until(Duration::from_secs(30), || {
        last = get(&addr, "/readyz", "text/plain");
        last.as_ref().is_some_and(|(code, _, _)| *code == 200)
    });
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(ready, "{last:?}");
}
