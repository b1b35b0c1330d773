//! `--source http`: `POST /v1/ingest` against the real binary. Good, bad, oversized and gzip
//! bodies get the answer they should; the answer comes only once the lines are committed (so
//! `report usage` shows them at once); under concurrent pushes every line is counted once.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "test-ingest-token";
/// `printf %s test-ingest-token | sha256sum`
fn token_sha256() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
}

struct Daemon {
    child: Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(db: &TestDb, extra: &[&str]) -> Daemon {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", &addr])
        .args(["--source", "http", "--ingest-token-sha256", &token_sha256()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("daemon starts");
    let d = Daemon { child, addr };
    assert!(
        wait_until(Duration::from_secs(30), || get(&d.addr, "/healthz", "*/*")
            .is_some_and(|(s, _, _)| s == 200)),
        "the daemon did not come up on {}",
        d.addr
    );
    d
}

/// One HTTP/1.0 POST with raw bytes: status, head and JSON body.
fn post(addr: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Value) {
    post_declared(addr, headers, body.len(), body)
}

/// A POST whose Content-Length says `declared` bytes, of which `body` is sent.
fn post_declared(
    addr: &str,
    headers: &[(&str, &str)],
    declared: usize,
    body: &[u8],
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "POST /v1/ingest HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {declared}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_owned(), json)
}

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

fn lines(db: &TestDb, n: u64, seed: &str) -> Vec<String> {
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

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn good_and_bad_lines_are_answered_line_by_line() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let good = lines(&db, 100, "1");
    let d = start(&db, &[]);
    let mut body: Vec<String> = good[..50].to_vec();
    body.push("this is not json".into());
    body.extend_from_slice(&good[50..]);
    body.push(r#"{"created_at":"2026-11-20T12:00:00Z"}"#.into());
    body.push(String::new());
    body.push(r#"{"created_at":"yesterday","http_status_code":200}"#.into());
    let (status, _, v) = post(
        &d.addr,
        &[("Authorization", &auth())],
        body.join("\n").as_bytes(),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["data"]["lines"], 104);
    assert_eq!(v["data"]["accepted"], 100);
    assert_eq!(v["data"]["rejected_count"], 3);
    let rejected = v["data"]["rejected"].as_array().unwrap();
    let got: Vec<(u64, &str)> = rejected
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (51, "not_json"),
            (102, "missing_field"),
            (104, "bad_timestamp")
        ]
    );
    assert!(
        rejected
            .iter()
            .all(|r| !r["detail"].as_str().unwrap().is_empty())
    );
    // Answered only after the commit: the counts are there already.
    assert_eq!(total_requests(&db), 100);
    let kept = kw_ok(
        &db,
        &["report", "rejected", "--source", "http", "--format", "json"],
    );
    assert_eq!(kept.matches("not_json").count(), 1, "{kept}");
}

#[test]
fn a_push_without_the_right_token_is_refused() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let good = lines(&db, 5, "2");
    let d = start(&db, &[]);
    let body = good.join("\n");
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", TOKEN)],
    ] {
        let (status, _, v) = post(&d.addr, &headers, body.as_bytes());
        assert_eq!(status, 401, "{headers:?}: {v}");
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    assert_eq!(total_requests(&db), 0);
}

#[test]
fn oversized_bodies_get_413_before_and_after_gzip() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let good = lines(&db, 200, "3");
    let d = start(&db, &["--ingest-max-body", "20000"]);
    let big = good.join("\n");
    assert!(big.len() > 20_000);
    // Refused on its Content-Length, before any of it is read (so none is sent here).
    let (status, _, v) = post_declared(&d.addr, &[("Authorization", &auth())], big.len(), b"");
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    // Small on the wire, too large decoded: a gzip bomb is cut off at the limit.
    let bomb = gzip(&vec![b'\n'; 5_000_000]);
    assert!(bomb.len() < 20_000);
    let (status, _, v) = post(
        &d.addr,
        &[("Authorization", &auth()), ("Content-Encoding", "gzip")],
        &bomb,
    );
    assert_eq!(status, 413, "{v}");
    // A body under the limit still goes through afterwards.
    let small = good[..20].join("\n");
    let (status, _, v) = post(&d.addr, &[("Authorization", &auth())], small.as_bytes());
    assert_eq!(status, 200, "{v}");
    assert_eq!(total_requests(&db), 20);
}

#[test]
fn gzip_bodies_count_like_plain_ones() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let good = lines(&db, 1000, "4");
    let d = start(&db, &[]);
    let plain = good.join("\n") + "\n";
    let (status, _, v) = post(
        &d.addr,
        &[("Authorization", &auth()), ("Content-Encoding", "gzip")],
        &gzip(plain.as_bytes()),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["accepted"], 1000);
    let all = db.path("all.log");
    std::fs::write(&all, &plain).unwrap();
    let (by_key, _) = oracle(&all);
    assert_eq!(reported(&db, "key"), by_key);
    // Not gzip at all.
    let (status, _, v) = post(
        &d.addr,
        &[("Authorization", &auth()), ("Content-Encoding", "gzip")],
        b"plain text",
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_gzip");
}

#[test]
fn a_full_daemon_answers_503_with_retry_after() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let good = lines(&db, 10, "5");
    let d = start(&db, &["--ingest-max-in-flight", "1"]);
    // One push that never finishes its body holds the only slot.
    let mut slow = TcpStream::connect(&d.addr).unwrap();
    write!(
        slow,
        "POST /v1/ingest HTTP/1.0\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 100000\r\n\r\n{{",
        auth()
    )
    .unwrap();
    slow.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (status, head, v) = post(&d.addr, &[("Authorization", &auth())], b"{}\n");
    assert_eq!(status, 503, "a push while the slot is held: {head}\n{v}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert_eq!(v["error"]["code"], "busy");
    let body = good.join("\n");
    drop(slow);
    let ok = wait_until(Duration::from_secs(10), || {
        post(&d.addr, &[("Authorization", &auth())], body.as_bytes()).0 == 200
    });
    assert!(ok, "the slot frees when the slow client goes");
    assert_eq!(total_requests(&db), 10);
}

fn concurrent_pushes(db: TestDb) {
    let all = lines(&db, 20_000, "6");
    let d = start(&db, &["--ingest-max-in-flight", "4"]);
    let batches: Vec<String> = all.chunks(250).map(|c| c.join("\n") + "\n").collect();
    let retries = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (batches, addr, retries) = (&batches, &d.addr, &retries);
            s.spawn(move || {
                for b in batches.iter().skip(t).step_by(8) {
                    loop {
                        let (status, _, v) =
                            post(addr, &[("Authorization", &auth())], b.as_bytes());
                        match status {
                            200 => {
                                assert_eq!(v["data"]["accepted"], 250);
                                break;
                            }
                            503 => {
                                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            other => panic!("unexpected {other}: {v}"),
                        }
                    }
                }
            });
        }
    });
    eprintln!(
        "{} pushes, {} answered 503 and retried",
        batches.len(),
        retries.into_inner()
    );
    let path = db.path("all.log");
    std::fs::write(&path, all.join("\n") + "\n").unwrap();
    let (by_key, by_org) = oracle(&path);
    assert_eq!(
        reported(&db, "key"),
        by_key,
        "every pushed line counted once"
    );
    assert_eq!(reported(&db, "org"), by_org);
}

#[test]
fn concurrent_pushes_count_every_line_once_on_sqlite() {
    concurrent_pushes(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn concurrent_pushes_count_every_line_once_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        concurrent_pushes(db);
    }
}

#[test]
fn http_without_a_token_does_not_start() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let out = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
        .args(["--source", "http"])
        .env_remove("KEYWATCH_INGEST_TOKEN_SHA256")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ingest-token-sha256"), "{err}");
}
