//! `--source nats://...` and `keywatch publish` against the real NATS JetStream server at
//! 127.0.0.1:4222: a published file is counted exactly once, a restart counts nothing twice,
//! and two instances splitting the partitions of one stream into one PostgreSQL database,
//! one of them killed with SIGKILL mid-stream and restarted, count every request once, judge an
//! organization's monthly quota on the sum of their counts, and email each alert once (one
//! instance delivers; the other takes over when it dies).
//!
//! Without a NATS server these tests print `skipped:` and pass; with `CI` set they fail.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::smtp::*;
use common::*;
use serde_json::Value;

fn start(db: &TestDb, source: &str) -> Child {
    start_with(db, source, &[])
}

/// `keywatch run` reading `source`, with `extra` arguments of `run`.
fn start_with(db: &TestDb, source: &str, extra: &[&str]) -> Child {
    keywatch()
        .args(["--database-url", &db.url, "run", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--source", source])
        .args(extra)
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

/// The organization whose traffic is split most evenly between partitions 0-3 and 4-7 of 8,
/// with its total: neither instance alone sees 75% of it.
fn evenly_split_org(log: &std::path::Path) -> (String, u64) {
    let mut halves: std::collections::BTreeMap<String, [u64; 2]> = Default::default();
    for line in std::fs::read_to_string(log).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if let (Some(key), Some(org)) = (v["api_key_id"].as_str(), v["organization_id"].as_str()) {
            halves.entry(org.to_owned()).or_default()[usize::from(fnv1a(key) % 8 >= 4)] += 1;
        }
    }
    let (org, [low, high]) = halves
        .into_iter()
        .filter(|(_, [l, h])| *l.max(h) * 4 < (l + h) * 3)
        .max_by_key(|(_, [l, h])| l + h)
        .expect("an organization with keys on both instances");
    (org, low + high)
}

/// FNV-1a 32-bit, the partition function publishers use (README "Running at scale").
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn counts_once_with_a_peer_killed(db: TestDb) {
    let Some(stream) = TestStream::new() else {
        return;
    };
    if !aiosmtpd_available() {
        return;
    }
    let mut sink = Sink::new(db.path("mail"), free_port());
    sink.start();
    let alerts = db.path("alerts.toml");
    std::fs::write(
        &alerts,
        format!(
            r#"
[delivery]
retry_initial = "1s"
retry_max = "2s"

[[receivers]]
name = "security"
type = "email"
url = "smtp://127.0.0.1:{}"
from = "keywatch <keywatch@example.com>"
to = ["sec@example.com"]
rate_limit_per_hour = 10000

[route]
group_by = ["fingerprint"]
group_wait = "0s"
group_interval = "1s"
"#,
            sink.port
        ),
    )
    .unwrap();
    let (first, second) = (db.path("first.log"), db.path("second.log"));
    let all = split_simulated(&db, 30_000, 15_000, &first, &second);
    let (by_key, by_org) = oracle(&all);
    let total: u64 = by_key.values().map(|t| t.requests).sum();
    // A monthly limit that only the two instances' counts together reach.
    let (org, org_total) = evenly_split_org(&all);
    db.exec(&format!(
        "UPDATE organizations SET custom_max_requests_monthly = {org_total} WHERE id = '{org}'"
    ));

    stream.publish(&db, 8, &first);
    let low = stream.url("&partitions=0-3&of=8");
    let high = stream.url("&partitions=4-7&of=8");
    let deliver = ["--alerts", alerts.to_str().unwrap()];
    let mut a = start_with(&db, &low, &deliver);
    let b = start_with(&db, &high, &deliver);
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
    let a = start_with(&db, &low, &deliver);
    assert_settles_at(&db, total);
    eprintln!("killed A at {at_kill} of {total} requests counted");
    assert_eq!(reported(&db, "key"), by_key, "every request counted once");
    assert_eq!(reported(&db, "org"), by_org);

    // The organization's month to date is the sum of both instances' counts: 100% is crossed.
    let quota = || {
        db.query(&format!(
            "SELECT evidence FROM kw_alerts WHERE alert_type = 'quota_threshold' AND org_id = '{org}'"
        ))
    };
    let crossed = wait_until(Duration::from_secs(60), || {
        quota().first().is_some_and(|r| {
            serde_json::from_str::<Value>(r[0].as_deref().unwrap())
                .is_ok_and(|e| e["score"] == 100.0)
        })
    });
    assert!(crossed, "the quota alert reached 100%: {:?}", quota());

    // Every change was queued once, delivered, and arrived once (at most one resend, with the
    // same Message-ID, of a message whose sender was killed before it could mark it sent).
    let settled = wait_until(Duration::from_secs(60), || {
        db.query(
            "SELECT CAST((SELECT COUNT(*) FROM kw_outbox WHERE dispatched_at IS NULL) \
             + (SELECT COUNT(*) FROM kw_notifications WHERE status <> 'sent') AS TEXT)",
        )[0][0]
            .as_deref()
            == Some("0")
    });
    stop(a);
    stop(b);
    assert!(
        settled,
        "every notification was delivered: {:?} {:?}",
        db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_outbox WHERE dispatched_at IS NULL"),
        db.query("SELECT status, CAST(attempts AS TEXT), last_error FROM kw_notifications WHERE status <> 'sent'")
    );
    let mut changes: Vec<(String, String, String, String)> = db
        .query("SELECT payload FROM kw_outbox")
        .into_iter()
        .map(|r| {
            let c: Value = serde_json::from_str(r[0].as_deref().unwrap()).unwrap();
            let f = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (f("fingerprint"), f("started_at"), f("kind"), f("severity"))
        })
        .collect();
    let queued = changes.len();
    changes.sort();
    changes.dedup();
    assert_eq!(changes.len(), queued, "no alert change was queued twice");
    let quota_fp = db.query(&format!(
        "SELECT fingerprint FROM kw_alerts WHERE alert_type = 'quota_threshold' AND org_id = '{org}'"
    ))[0][0]
        .clone()
        .unwrap();
    let quota_changes: Vec<&str> = changes
        .iter()
        .filter(|c| c.0 == quota_fp)
        .map(|c| c.2.as_str())
        .collect();
    assert_eq!(
        quota_changes,
        ["opened", "severity_raised", "severity_raised"],
        "75%, 90% and 100%, each once"
    );
    let notifications: Vec<String> = db
        .query("SELECT id FROM kw_notifications")
        .into_iter()
        .map(|r| r[0].clone().unwrap().replace('-', ""))
        .collect();
    let mut received: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            let headers = m["headers"].as_array().unwrap();
            let id = headers
                .iter()
                .find(|h| {
                    h[0].as_str()
                        .is_some_and(|k| k.eq_ignore_ascii_case("message-id"))
                })
                .and_then(|h| h[1].as_str())
                .expect("a Message-ID");
            id.trim_matches(['<', '>', ' '])
                .trim_end_matches("@keywatch")
                .to_owned()
        })
        .collect();
    let arrived = received.len();
    eprintln!(
        "{queued} alert changes queued, {} notifications, {arrived} messages received",
        notifications.len()
    );
    received.sort();
    received.dedup();
    let mut sent = notifications.clone();
    sent.sort();
    assert_eq!(received, sent, "every notification arrived");
    assert!(
        arrived <= notifications.len() + 1,
        "{arrived} messages for {} notifications",
        notifications.len()
    );
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
