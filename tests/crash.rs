//! Crashes and stops of the real binary with every kind of source, and alert delivery across
//! them.
//!
//! - `kill -9` at [`KILLS`] random moments during ingestion, per source kind (a file followed by
//!   `run`, a file read by `ingest` restarts, HTTP pushes retried until acknowledged, NATS
//!   JetStream, the auth server's PostgreSQL tables): after the last restart the usage per key
//!   and per organization equals the input, counted here by the oracle of `tests/common`. The
//!   kill offsets come from a seeded RNG; the seed is printed and `KEYWATCH_CRASH_SEED=N`
//!   replays it.
//! - stdin cannot be replayed after a kill (the pipe's unread lines die with the process), so
//!   what is promised there is that what was committed is exact: a prefix of what was written,
//!   never a line twice; and `ingest -` to the end of its input counts all of it.
//! - SIGTERM with an SMTP server that never answers: keywatch exits 0 within
//!   `--shutdown-timeout`, with what it read committed; the unconfirmed message is sent again at
//!   the next start, with the same Message-ID.
//! - Receivers down, slow (the connection accepted, never answered) or failing, then keywatch
//!   killed: once they are back, the restarted keywatch delivers each queued alert exactly once.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::smtp::*;
use common::*;
use serde_json::Value;

/// Kills per source kind.
const KILLS: usize = 20;

/// The test's RNG: seeded by `KEYWATCH_CRASH_SEED` or the clock, and the seed printed.
fn rng(test: &str) -> Rng {
    let seed = match std::env::var("KEYWATCH_CRASH_SEED") {
        Ok(s) => s.parse().expect("KEYWATCH_CRASH_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (KEYWATCH_CRASH_SEED={seed} replays it)");
    Rng(seed)
}

/// PostgreSQL when it is configured, else SQLite: the sources whose state lives in a database
/// get the shared back end where there is one.
fn postgres_or_sqlite() -> TestDb {
    TestDb::new(Backend::Postgres).unwrap_or_else(|| TestDb::new(Backend::Sqlite).unwrap())
}

/// `n` simulated lines (their keys created in `db`), as text.
fn simulated(db: &TestDb, n: u64, seed: u64) -> Vec<String> {
    let log = db.path(&format!("simulated-{seed}.log"));
    simulate(
        db,
        &log,
        &[
            "--keys",
            "40",
            "--lines",
            &n.to_string(),
            "--seed",
            &seed.to_string(),
        ],
    );
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Writes `lines` to `name` in the test's directory; returns its path.
fn write_lines(db: &TestDb, name: &str, lines: &[String]) -> PathBuf {
    let p = db.path(name);
    let _ = std::fs::remove_file(&p);
    append(&p, lines);
    p
}

/// `keywatch run` on `db`, listening on `listen`, with `args` after it.
fn daemon(db: &TestDb, listen: &str, args: &[&str]) -> KillOnDrop {
    KillOnDrop(
        keywatch()
            .args(["--database-url", &db.url, "run", "--listen", listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("daemon starts"),
    )
}

fn local_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Stops `d` with SIGTERM and checks it exits 0.
fn stop(mut d: KillOnDrop) {
    d.signal("TERM");
    let status = d
        .wait_for(Duration::from_secs(60))
        .expect("exits after SIGTERM");
    assert!(status.success(), "a clean stop exits 0: {status}");
}

/// Waits until `db` reports `want` requests, then checks it stays there.
fn settles_at(db: &TestDb, want: u64) {
    let reached = wait_until(Duration::from_secs(120), || total_requests(db) >= want);
    assert!(
        reached,
        "reported {} of {want} requests",
        total_requests(db)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(total_requests(db), want, "nothing counted twice");
}

/// Checks the usage per key and per organization against the oracle's count of `lines`.
fn assert_exact(db: &TestDb, lines: &[String]) {
    let all = write_lines(db, "expected.log", lines);
    let (by_key, by_org) = oracle(&all);
    assert_eq!(
        reported(db, "key"),
        by_key,
        "usage per key equals the input"
    );
    assert_eq!(
        reported(db, "org"),
        by_org,
        "usage per organization equals the input"
    );
}

/// The last start after the kills: `start` must count every one of `lines`, once, and stop
/// cleanly.
fn last_start(db: &TestDb, lines: &[String], start: impl FnOnce() -> KillOnDrop) {
    let last = start();
    settles_at(db, lines.len() as u64);
    stop(last);
    assert_exact(db, lines);
}

/// What the kills of one test saw.
#[derive(Debug, Default)]
struct Kills {
    /// Kills that left lines fed but not yet counted: the process died mid-ingestion.
    mid_ingestion: usize,
}

/// Runs [`KILLS`] cycles of: `feed(i)` (returns how many lines were fed so far), start keywatch
/// with `start`, kill it with SIGKILL after a random offset. After each kill the reported total
/// must not exceed what was fed.
fn kill_cycles(
    db: &TestDb,
    rng: &mut Rng,
    mut feed: impl FnMut(usize) -> u64,
    mut start: impl FnMut() -> KillOnDrop,
) -> Kills {
    let mut kills = Kills::default();
    for i in 0..KILLS {
        let fed = feed(i);
        let d = start();
        // Mostly within the first commit interval (lines read but not committed), sometimes
        // during the start-up itself. Three kills in four come within 400 ms: a one-shot
        // ingest of a slice can finish within a second, and kills after it test nothing.
        let within = if rng.below(4) == 0 { 1_500 } else { 400 };
        std::thread::sleep(Duration::from_millis(rng.below(within)));
        d.kill_9();
        let counted = total_requests(db);
        assert!(
            counted <= fed,
            "kill {i}: {counted} requests counted of {fed} fed"
        );
        if counted < fed {
            kills.mid_ingestion += 1;
        }
    }
    eprintln!("{kills:?} of {KILLS}");
    assert!(
        kills.mid_ingestion >= 3,
        "too few kills hit ingestion to test anything: {kills:?}"
    );
    kills
}

/// The simulated lines cut into one slice per kill, and a last one for the final start.
fn slices(lines: &[String]) -> Vec<&[String]> {
    lines.chunks(lines.len().div_ceil(KILLS + 1)).collect()
}

#[test]
fn kill_9_while_run_follows_a_file() {
    let mut rng = rng("kill_9_while_run_follows_a_file");
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let lines = simulated(&db, 84_000, 61);
    let parts = slices(&lines);
    let log = db.path("requests.log");
    let source = format!("file:{}", log.display());
    let mut fed = 0;
    kill_cycles(
        &db,
        &mut rng,
        |i| {
            append(&log, parts[i]);
            fed += parts[i].len() as u64;
            fed
        },
        || daemon(&db, "127.0.0.1:0", &["--source", &source]),
    );
    append(&log, parts[KILLS]);
    last_start(&db, &lines, || {
        daemon(&db, "127.0.0.1:0", &["--source", &source])
    });
}

#[test]
fn kill_9_during_ingest_restarts() {
    let mut rng = rng("kill_9_during_ingest_restarts");
    let db = postgres_or_sqlite();
    let lines = simulated(&db, 84_000, 62);
    let parts = slices(&lines);
    let log = db.path("requests.log");
    let mut fed = 0;
    let ingest = || {
        KillOnDrop(
            keywatch()
                .args(["--database-url", &db.url, "ingest", "--no-progress"])
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("ingest starts"),
        )
    };
    kill_cycles(
        &db,
        &mut rng,
        |i| {
            append(&log, parts[i]);
            fed += parts[i].len() as u64;
            fed
        },
        ingest,
    );
    append(&log, parts[KILLS]);
    kw_ok(&db, &["ingest", "--no-progress", log.to_str().unwrap()]);
    assert_eq!(total_requests(&db), lines.len() as u64);
    assert_exact(&db, &lines);
}

const TOKEN: &str = "crash-test-ingest-token";

fn token_sha256() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
}

/// One push of `body` with `Idempotency-Key: key`: the status and the JSON answer, or `None`
/// when no answer came (keywatch down or killed mid-request).
fn push(addr: &str, key: &str, body: &str) -> Option<(u16, Value)> {
    let request = format!(
        "POST /v1/ingest HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Idempotency-Key: {key}\r\nContent-Type: application/x-ndjson\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, answer) = http(addr, &request)?;
    Some((status, serde_json::from_str(&answer).unwrap_or(Value::Null)))
}

#[test]
fn kill_9_while_http_clients_push_and_retry() {
    let mut rng = rng("kill_9_while_http_clients_push_and_retry");
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let lines = simulated(&db, 60_000, 63);
    let batches: Vec<String> = lines.chunks(1_000).map(|c| c.join("\n") + "\n").collect();
    let addr = local_addr();
    let (acked, sent, duplicates) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let args = ["--source", "http", "--ingest-token-sha256", &token_sha256()];
    std::thread::scope(|s| {
        // Clients that send each batch until it is acknowledged, with the same key each time.
        for t in 0..8 {
            let (batches, addr) = (&batches, &addr);
            let (acked, sent, duplicates) = (&acked, &sent, &duplicates);
            s.spawn(move || {
                for (i, b) in batches.iter().enumerate().skip(t).step_by(8) {
                    let n = b.lines().count() as u64;
                    sent.fetch_add(n, Ordering::SeqCst);
                    loop {
                        match push(addr, &format!("crash-batch-{i}"), b) {
                            Some((200, v)) => {
                                if v["data"]["duplicate"] == true {
                                    duplicates.fetch_add(1, Ordering::SeqCst);
                                } else {
                                    assert_eq!(v["data"]["accepted"], n, "{v}");
                                }
                                acked.fetch_add(n, Ordering::SeqCst);
                                break;
                            }
                            Some((503, _)) | None => std::thread::sleep(Duration::from_millis(50)),
                            Some((status, v)) => panic!("push answered {status}: {v}"),
                        }
                    }
                }
            });
        }
        let mut mid_ingestion = 0;
        for i in 0..KILLS {
            let d = daemon(&db, &addr, &args);
            std::thread::sleep(Duration::from_millis(rng.below(1_500)));
            let acked_before = acked.load(Ordering::SeqCst);
            d.kill_9();
            let counted = total_requests(&db);
            assert!(
                counted >= acked_before,
                "kill {i}: an acknowledged push was lost ({counted} counted, {acked_before} acknowledged)"
            );
            assert!(
                counted <= sent.load(Ordering::SeqCst),
                "kill {i}: more than was sent"
            );
            if counted < sent.load(Ordering::SeqCst) {
                mid_ingestion += 1;
            }
        }
        assert!(mid_ingestion >= 3, "only {mid_ingestion} kills hit pushes");
        let mut last = daemon(&db, &addr, &args);
        assert!(
            wait_until(Duration::from_secs(120), || acked.load(Ordering::SeqCst)
                == lines.len() as u64),
            "every push acknowledged in the end"
        );
        // The pushes may all have been acknowledged before the last kill: the last daemon
        // must be listening before the duplicate is sent.
        wait_healthy(&mut last, &addr);
        // A push sent again after its answer came is a duplicate too.
        let (status, v) = push(&addr, "crash-batch-0", &batches[0]).expect("answered");
        assert_eq!(
            (status, &v["data"]["duplicate"]),
            (200, &Value::Bool(true)),
            "{v}"
        );
        assert_eq!(v["data"]["accepted"], 0, "{v}");
        stop(last);
    });
    eprintln!(
        "{} pushes answered as duplicates of a push committed before a kill",
        duplicates.into_inner()
    );
    assert_eq!(total_requests(&db), lines.len() as u64);
    assert_exact(&db, &lines);
}

#[test]
fn kill_9_while_consuming_nats() {
    let Some(stream) = TestStream::new() else {
        return;
    };
    let mut rng = rng("kill_9_while_consuming_nats");
    let db = postgres_or_sqlite();
    let lines = simulated(&db, 84_000, 64);
    let parts = slices(&lines);
    let source = stream.url("&partitions=0-7&of=8");
    let mut fed = 0;
    let mut publish = |i: usize| {
        let part = write_lines(&db, "part.log", parts[i]);
        stream.publish(&db, 8, &part);
        fed += parts[i].len() as u64;
        fed
    };
    kill_cycles(&db, &mut rng, &mut publish, || {
        daemon(&db, &local_addr(), &["--source", &source])
    });
    publish(KILLS);
    last_start(&db, &lines, || {
        daemon(&db, &local_addr(), &["--source", &source])
    });
}

#[test]
fn kill_9_while_reading_the_auth_servers_tables() {
    let Some(db) = TestDb::new(Backend::Postgres) else {
        return;
    };
    let mut rng = rng("kill_9_while_reading_the_auth_servers_tables");
    db.exec(AUTH_LOG_TABLES);
    let mut rows: Vec<Value> = simulated(&db, 42_000, 65)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    rows.sort_by(|a, b| a["created_at"].as_str().cmp(&b["created_at"].as_str()));
    for v in rows.iter_mut().filter(|v| !v["api_key_id"].is_string()) {
        // A refused key is an audit row: keywatch makes it a 401 without sizes or organization.
        for field in [
            "organization_id",
            "request_size_bytes",
            "response_size_bytes",
        ] {
            v[field] = Value::Null;
        }
        v["http_status_code"] = 401.into();
    }
    let lines: Vec<String> = rows.iter().map(Value::to_string).collect();
    let parts: Vec<&[Value]> = rows.chunks(rows.len().div_ceil(KILLS + 1)).collect();
    let args = ["--source", "postgres", "--postgres-poll", "1s"];
    let mut fed = 0;
    let mut insert = |i: usize| {
        insert_auth_log(&db, parts[i]);
        fed += parts[i].len() as u64;
        fed
    };
    kill_cycles(&db, &mut rng, &mut insert, || {
        daemon(&db, &local_addr(), &args)
    });
    insert(KILLS);
    last_start(&db, &lines, || daemon(&db, &local_addr(), &args));
}

#[test]
fn kill_9_with_stdin_keeps_an_exact_prefix() {
    let mut rng = rng("kill_9_with_stdin_keeps_an_exact_prefix");
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let lines = simulated(&db, 63_000, 66);
    let parts = slices(&lines);
    // What keywatch committed of each part: the first `n` lines of it.
    let mut committed: Vec<String> = Vec::new();
    let mut mid_ingestion = 0;
    for (i, part) in parts.iter().take(KILLS).enumerate() {
        let before = total_requests(&db);
        let mut d = KillOnDrop(
            keywatch()
                .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
                .args(["--source", "stdin"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("daemon starts"),
        );
        let mut stdin = d.0.stdin.take().unwrap();
        let text = part.join("\n") + "\n";
        let writer = std::thread::spawn(move || {
            // In pieces, so the kill can fall between them; the pipe breaks at the kill.
            for piece in text.as_bytes().chunks(text.len() / 10 + 1) {
                if stdin.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        std::thread::sleep(Duration::from_millis(rng.below(1_500)));
        d.kill_9();
        let _ = writer.join();
        let n = (total_requests(&db) - before) as usize;
        assert!(
            n <= part.len(),
            "kill {i}: {n} counted of {} written",
            part.len()
        );
        if n < part.len() {
            mid_ingestion += 1;
        }
        committed.extend_from_slice(&part[..n]);
        assert_exact(&db, &committed);
    }
    assert!(
        mid_ingestion >= 3,
        "only {mid_ingestion} kills hit ingestion"
    );
    // `ingest -` reads to the end of its input and commits all of it.
    let mut ingest = keywatch()
        .args(["--database-url", &db.url, "ingest", "--no-progress", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = ingest.stdin.take().unwrap();
    stdin
        .write_all((parts[KILLS].join("\n") + "\n").as_bytes())
        .unwrap();
    drop(stdin);
    assert!(ingest.wait().unwrap().success());
    committed.extend_from_slice(parts[KILLS]);
    assert_exact(&db, &committed);
}

/// Lines that open one `auth_failure_burst` alert: 60 refused attempts from `ip` in 3 minutes,
/// just after the simulated traffic ends.
fn probe(ip: &str) -> Vec<String> {
    (0..60)
        .map(|i| {
            serde_json::json!({
                "created_at": format!("2026-11-20T12:0{}:{:02}Z", i / 20, (i % 20) * 3),
                "api_key_id": null, "organization_id": null,
                "key_prefix": format!("pmcp_probe{i:03}"),
                "http_status_code": 401, "error_code": "unauthorized", "source_ip": ip,
            })
            .to_string()
        })
        .collect()
}

/// A sink of `tests/data` (`smtp_sink.py`, `webhook_sink.py`) on `port`, keeping what it
/// receives in `dir`; returns once it listens.
fn sink(script: &'static str, port: u16, dir: &Path, args: &[&str]) -> Sink {
    let mut s = Sink::new(dir.to_path_buf(), port).with(script, args);
    s.start();
    s
}

/// (receiver, status, attempts) of every notification.
fn notifications(db: &TestDb) -> Vec<(String, String, u64)> {
    db.query(
        "SELECT receiver, status, CAST(attempts AS TEXT) FROM kw_notifications ORDER BY receiver",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap(),
            r[1].clone().unwrap(),
            r[2].as_deref().unwrap().parse().unwrap(),
        )
    })
    .collect()
}

/// A TCP server that accepts connections and never says a word: a receiver that hangs.
struct BlackHole {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn new() -> BlackHole {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        BlackHole {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BlackHole {
    /// Closes the listener and every connection it held, freeing the port.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn sigterm_with_an_smtp_server_that_never_answers_exits_0_within_the_bound() {
    if !python_module("aiosmtpd", "aiosmtpd", "SIGTERM delivery test") {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let port = free_port();
    let mail = db.path("mail");
    // The server keeps each message, then waits a minute before answering.
    let slow = sink("smtp_sink.py", port, &mail, &["--reply-delay", "60"]);
    let cfg = db.path("alerts.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[delivery]
timeout = "60s"
retry_initial = "1s"
retry_max = "2s"

[[receivers]]
name = "security"
type = "email"
url = "smtp://127.0.0.1:{port}"
to = ["sec@example.com"]

[route]
group_by = ["fingerprint"]
group_wait = "0s"

# Only the probe's alert is sent (the simulated traffic nears an organization's limit).
[[silences]]
types = ["quota_threshold"]
expires = 2099-01-01T00:00:00Z
"#
        ),
    )
    .unwrap();
    // The probe first (its alert is the message), then simulated traffic, the last of it
    // appended just before the signal.
    let mut lines = probe("89.160.20.112");
    lines.extend(simulated(&db, 5_000, 67));
    let log = db.path("requests.log");
    append(&log, &lines[..4_000]);
    let addr = local_addr();
    let args = [
        "--alerts",
        cfg.to_str().unwrap(),
        "--source",
        &format!("file:{}", log.display()),
        "--shutdown-timeout",
        "3s",
    ];
    let mut d = daemon(&db, &addr, &args);
    assert!(
        wait_until(Duration::from_secs(60), || !received(&mail).is_empty()),
        "the message reached the server"
    );
    // Lines read just before the signal: the stop, not the periodic commit, must commit them.
    append(&log, &lines[4_000..]);
    let read = |want: u64| {
        get(&addr, "/metrics", "text/plain").is_some_and(|(_, _, body)| {
            body.lines()
                .filter(|l| l.starts_with("keywatch_lines_ingested_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
                >= want as f64
        })
    };
    assert!(wait_until(Duration::from_secs(60), || read(
        lines.len() as u64
    )));
    let signalled = Instant::now();
    d.signal("TERM");
    let status = d
        .wait_for(Duration::from_secs(20))
        .expect("exits long before the server answers");
    let took = signalled.elapsed();
    assert!(status.success(), "a bounded stop is a clean stop: {status}");
    eprintln!("stopped {took:?} after SIGTERM (--shutdown-timeout 3s)");
    assert_eq!(
        total_requests(&db),
        lines.len() as u64,
        "what was read is committed"
    );
    let states = notifications(&db);
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(
        states[0].1, "pending",
        "unconfirmed, so still queued: {states:?}"
    );

    // Restarted with a server that answers: nothing is read again, and the unconfirmed
    // message goes again, recognisable by its Message-ID.
    drop(slow);
    let _fast = sink("smtp_sink.py", port, &mail, &[]);
    let d = daemon(&db, &addr, &args);
    assert!(wait_until(Duration::from_secs(60), || notifications(&db)
        [0]
    .1 == "sent"));
    std::thread::sleep(Duration::from_secs(2));
    stop(d);
    assert_eq!(
        total_requests(&db),
        lines.len() as u64,
        "nothing read twice"
    );
    assert_exact(&db, &lines);
    let msgs = received(&mail);
    assert_eq!(msgs.len(), 2, "the unconfirmed one once more: {msgs:?}");
    assert_eq!(msgs[0]["message_id"], msgs[1]["message_id"]);
}

/// Receivers down, hanging and failing while an alert is queued, keywatch killed, the
/// receivers back, keywatch restarted: each receiver gets the alert exactly once.
fn queued_alerts_survive_a_kill(db: TestDb) {
    if !python_module("aiosmtpd", "aiosmtpd", "receiver outage tests") {
        return;
    }
    kw_ok(&db, &["migrate"]);
    let (down_port, failing_port) = (free_port(), free_port());
    let (mail_slow, hook_slow) = (BlackHole::new(), BlackHole::new());
    let (mail_slow_port, hook_slow_port) = (mail_slow.port, hook_slow.port);
    let failing = sink(
        "webhook_sink.py",
        failing_port,
        &db.path("failed"),
        &["--fail-first", "1000000"],
    );
    let cfg = db.path("alerts.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[delivery]
timeout = "2s"
retry_initial = "1s"
retry_max = "2s"

[[receivers]]
name = "mail-down"
type = "email"
url = "smtp://127.0.0.1:{down_port}"
to = ["sec@example.com"]

[[receivers]]
name = "mail-slow"
type = "email"
url = "smtp://127.0.0.1:{mail_slow_port}"
to = ["sec@example.com"]

[[receivers]]
name = "hook-failing"
type = "webhook"
url = "http://127.0.0.1:{failing_port}/hook"

[[receivers]]
name = "hook-slow"
type = "webhook"
url = "http://127.0.0.1:{hook_slow_port}/hook"

[route]
receiver = "mail-down"
group_by = ["fingerprint"]
group_wait = "0s"

[[routes]]
receiver = "mail-down"
continue = true

[[routes]]
receiver = "mail-slow"
continue = true

[[routes]]
receiver = "hook-failing"
continue = true

[[routes]]
receiver = "hook-slow"
"#
        ),
    )
    .unwrap();
    let log = write_lines(&db, "probe.log", &probe("81.2.69.160"));
    let args = [
        "--alerts",
        cfg.to_str().unwrap(),
        "--source",
        &format!("file:{}", log.display()),
    ];
    let d = daemon(&db, &local_addr(), &args);
    let tried = wait_until(Duration::from_secs(60), || {
        let n = notifications(&db);
        n.len() == 4 && n.iter().all(|(_, s, a)| s == "pending" && *a >= 1)
    });
    assert!(
        tried,
        "every receiver tried and failed: {:?}",
        notifications(&db)
    );
    d.kill_9();
    let failed_ids: Vec<Value> = received(&db.path("failed"))
        .iter()
        .map(|m| m["headers"]["x-keywatch-notification-id"].clone())
        .collect();
    assert!(!failed_ids.is_empty());

    // The receivers come back, on the same addresses.
    drop((mail_slow, hook_slow, failing));
    let _sinks = [
        sink("smtp_sink.py", down_port, &db.path("mail-down"), &[]),
        sink("smtp_sink.py", mail_slow_port, &db.path("mail-slow"), &[]),
        sink(
            "webhook_sink.py",
            failing_port,
            &db.path("hook-failing"),
            &[],
        ),
        sink(
            "webhook_sink.py",
            hook_slow_port,
            &db.path("hook-slow"),
            &[],
        ),
    ];
    let d = daemon(&db, &local_addr(), &args);
    let sent = wait_until(Duration::from_secs(60), || {
        notifications(&db).iter().all(|(_, s, _)| s == "sent")
    });
    // Long enough for a second delivery to show if there were one.
    std::thread::sleep(Duration::from_secs(3));
    stop(d);
    assert!(sent, "{:?}", notifications(&db));
    for name in ["mail-down", "mail-slow", "hook-failing", "hook-slow"] {
        let got = received(&db.path(name));
        assert_eq!(got.len(), 1, "{name} got the alert exactly once: {got:?}");
    }
    let hook = &received(&db.path("hook-failing"))[0];
    assert_eq!(hook["body"]["alerts"][0]["type"], "auth_failure_burst");
    assert!(
        failed_ids.contains(&hook["headers"]["x-keywatch-notification-id"]),
        "the notification delivered is the one that failed before the kill"
    );
}

#[test]
fn queued_alerts_survive_a_kill_on_sqlite() {
    queued_alerts_survive_a_kill(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn queued_alerts_survive_a_kill_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        queued_alerts_survive_a_kill(db);
    }
}
