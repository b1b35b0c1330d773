//! Alert delivery through the real binary against a real SMTP server on loopback (Python's
//! aiosmtpd, `tests/data/smtp_sink.py`): an alert arrives once, with its subject, parts and
//! recipients; with the server down, notifications queue and arrive once it is back (none lost,
//! none doubled, across a restart); hostile values from log lines are escaped and inject no
//! header; silences keep an alert recorded but unsent; `keywatch demo` writes its mbox.
//!
//! Without aiosmtpd the SMTP tests print `skipped:` and pass; with `CI` set they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A running SMTP sink; killed when dropped.
struct Sink {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn aiosmtpd_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but Python's aiosmtpd is missing (pip install aiosmtpd): the SMTP tests must run"
        );
        eprintln!("skipped: SMTP test (pip install aiosmtpd to run it)");
    }
    ok
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sink {
    fn new(dir: PathBuf, port: u16) -> Sink {
        std::fs::create_dir_all(&dir).unwrap();
        Sink {
            child: None,
            port,
            dir,
        }
    }

    fn start(&mut self) {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smtp_sink.py"))
            .arg(self.port.to_string())
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP sink started");
        self.child = Some(child);
    }

    fn messages(&self) -> Vec<Value> {
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An alerts.toml sending to `port`, with timers short enough for a test.
fn alerts_toml(db: &TestDb, port: u16, group_by: &str) -> PathBuf {
    let p = db.path("alerts.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[delivery]
retry_initial = "1s"
retry_max = "2s"

[[receivers]]
name = "security"
type = "email"
url = "smtp://127.0.0.1:{port}"
from = "keywatch <keywatch@example.com>"
to = ["sec@example.com", "oncall@example.com"]

[route]
group_by = [{group_by}]
group_wait = "0s"
group_interval = "1s"
"#
        ),
    )
    .unwrap();
    p
}

/// Key probing from each of `ips`: one auth_failure_burst alert per address. The presented
/// prefixes are hostile: markup and a CRLF header injection attempt.
fn probe_log(db: &TestDb, name: &str, ips: &[&str]) -> PathBuf {
    let log = db.path(name);
    let mut lines = String::new();
    for ip in ips {
        for i in 0..60u32 {
            lines.push_str(&format!(
                r#"{{"created_at":"2026-11-20T10:0{}:{:02}Z","api_key_id":null,"organization_id":null,"key_prefix":"pmcp_<b>{i:03}\r\nBcc: victim@evil.test","http_status_code":401,"error_code":"unauthorized","source_ip":"{ip}","user_agent":"<script>alert(1)</script>"}}"#,
                i / 20,
                (i % 20) * 3,
            ));
            lines.push('\n');
        }
    }
    std::fs::write(&log, lines).unwrap();
    log
}

fn notification_states(db: &TestDb) -> Vec<(String, i64)> {
    db.query("SELECT status, CAST(attempts AS TEXT) FROM kw_notifications ORDER BY created_at")
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap(),
                r[1].as_deref().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

fn arrives_once_with_subject_parts_and_recipients(db: TestDb) {
    let mut sink = Sink::new(db.path("mail"), free_port());
    sink.start();
    let cfg = alerts_toml(&db, sink.port, r#""org", "type""#);
    let log = probe_log(&db, "probe.log", &["89.160.20.112"]);
    let cfg = cfg.to_str().unwrap();
    let out = kw(
        &db,
        &["ingest", "--notify", "--alerts", cfg, log.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_until(Duration::from_secs(20), || !sink
        .messages()
        .is_empty()));
    std::thread::sleep(Duration::from_millis(500));
    let msgs = sink.messages();
    assert_eq!(
        msgs.len(),
        1,
        "one message for the one alert group: {msgs:?}"
    );
    let m = &msgs[0];
    assert_eq!(
        m["rcpt_to"],
        serde_json::json!(["sec@example.com", "oncall@example.com"])
    );
    assert_eq!(m["mail_from"], "keywatch@example.com");
    let subject = m["subject"].as_str().unwrap();
    assert!(
        subject.starts_with("[keywatch] HIGH auth failure burst: ip:89.160.20.112")
            || subject.starts_with("[keywatch] MEDIUM auth failure burst: ip:89.160.20.112")
            || subject.contains("auth failure burst"),
        "{subject}"
    );
    assert_eq!(m["content_type"], "multipart/alternative");
    let id = m["message_id"].as_str().unwrap();
    assert!(id.starts_with('<') && id.ends_with("@keywatch>"), "{id}");
    // No header came from a log line's CRLF.
    for h in m["headers"].as_array().unwrap() {
        assert_ne!(h[0].as_str().unwrap().to_ascii_lowercase(), "bcc", "{h}");
    }
    assert_eq!(
        m["rcpt_to"].as_array().unwrap().len(),
        2,
        "no injected recipient"
    );
    let html = m["html"].as_str().unwrap();
    let text = m["text"].as_str().unwrap();
    assert!(
        text.contains("What to do:") && text.contains("keywatch report alerts"),
        "{text}"
    );
    assert!(html.contains("auth_failure_burst"), "{html}");
    assert!(
        !html.contains("<img") && !html.contains("<script"),
        "{html}"
    );
    assert!(!html.contains("<b>0"), "{html}");
    if html.contains("pmcp_") {
        assert!(html.contains("pmcp_&lt;b&gt;"), "{html}");
    }
    assert_eq!(notification_states(&db), [("sent".to_string(), 1)]);
    // `alert test` sends one message now, through the same receiver.
    kw_ok(
        &db,
        &["alert", "test", "--receiver", "security", "--alerts", cfg],
    );
    assert!(wait_until(Duration::from_secs(10), || sink
        .messages()
        .len()
        == 2));
    assert_eq!(sink.messages()[1]["subject"], "[keywatch] TEST message");
    let bad = kw(
        &db,
        &["alert", "test", "--receiver", "pager", "--alerts", cfg],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("defined receivers: [\"security\"]"));
    // Ingesting the same file again raises nothing new and sends nothing.
    let out = kw(
        &db,
        &["ingest", "--notify", "--alerts", cfg, log.to_str().unwrap()],
    );
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.messages().len(), 2);
    // Without --notify, alerts are recorded and nothing is queued.
    let log2 = probe_log(&db, "probe2.log", &["81.2.69.160"]);
    kw_ok(&db, &["ingest", "--alerts", cfg, log2.to_str().unwrap()]);
    assert_eq!(db.query("SELECT fingerprint FROM kw_outbox").len(), 1);
    assert_eq!(
        db.query("SELECT fingerprint FROM kw_alerts WHERE source_ip = '81.2.69.160'")
            .len(),
        1
    );
}

#[test]
fn arrives_once_on_sqlite() {
    if aiosmtpd_available() {
        arrives_once_with_subject_parts_and_recipients(TestDb::new(Backend::Sqlite).unwrap());
    }
}

#[test]
fn arrives_once_on_postgres() {
    if aiosmtpd_available()
        && let Some(db) = TestDb::new(Backend::Postgres)
    {
        arrives_once_with_subject_parts_and_recipients(db);
    }
}

fn queues_while_the_server_is_down(db: TestDb) {
    let mut sink = Sink::new(db.path("mail"), free_port());
    let cfg = alerts_toml(&db, sink.port, r#""fingerprint""#);
    let ips = ["89.160.20.112", "81.2.69.160", "175.16.199.1"];
    let log = probe_log(&db, "probe.log", &ips);
    // The server is down: ingest queues, tries, and leaves the notifications for `run`.
    let out = kw(
        &db,
        &[
            "ingest",
            "--notify",
            "--alerts",
            cfg.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let states = notification_states(&db);
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(
        states.iter().all(|(s, a)| s == "pending" && *a >= 1),
        "tried, failed, kept: {states:?}"
    );
    sink.start();
    let empty = db.path("empty.log");
    std::fs::write(&empty, "").unwrap();
    let mut daemon = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
        .arg("--alerts")
        .arg(&cfg)
        .arg("--source")
        .arg(format!("file:{}", empty.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let arrived = wait_until(Duration::from_secs(30), || sink.messages().len() >= 3);
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    let _ = daemon.wait();
    let msgs = sink.messages();
    assert!(arrived, "{} of 3 arrived", msgs.len());
    assert_eq!(msgs.len(), 3, "none doubled");
    let mut ids: Vec<&str> = msgs
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    for ip in ips {
        assert!(
            msgs.iter()
                .any(|m| m["subject"].as_str().unwrap().contains(ip)),
            "{ip} arrived"
        );
    }
    assert!(notification_states(&db).iter().all(|(s, _)| s == "sent"));
}

#[test]
fn queues_while_the_server_is_down_on_sqlite() {
    if aiosmtpd_available() {
        queues_while_the_server_is_down(TestDb::new(Backend::Sqlite).unwrap());
    }
}

#[test]
fn queues_while_the_server_is_down_on_postgres() {
    if aiosmtpd_available()
        && let Some(db) = TestDb::new(Backend::Postgres)
    {
        queues_while_the_server_is_down(db);
    }
}

/// An alerts.toml whose one receiver writes to a mailbox file (no server).
fn mbox_toml(db: &TestDb) -> (PathBuf, PathBuf) {
    let mbox = db.path("alerts.mbox");
    let p = db.path("alerts.toml");
    std::fs::write(
        &p,
        format!(
            "[[receivers]]\nname = \"box\"\ntype = \"email\"\nmailbox = \"{}\"\n\n[route]\ngroup_wait = \"0s\"\n",
            mbox.display()
        ),
    )
    .unwrap();
    (p, mbox)
}

fn silences_record_but_do_not_send(db: TestDb) {
    let (cfg, mbox) = mbox_toml(&db);
    let cfg = cfg.to_str().unwrap();
    let id = kw_ok(
        &db,
        &[
            "silence",
            "add",
            "--type",
            "auth_failure_burst",
            "--expires-in",
            "1h",
            "--reason",
            "pen test",
        ],
    );
    let id = id.trim();
    let list = kw_ok(&db, &["silence", "list", "--format", "json"]);
    assert!(list.contains(id) && list.contains("pen test"), "{list}");
    let log = probe_log(&db, "probe.log", &["89.160.20.112"]);
    kw_ok(
        &db,
        &["ingest", "--notify", "--alerts", cfg, log.to_str().unwrap()],
    );
    assert!(!mbox.exists(), "a silenced alert is not sent");
    assert_eq!(
        db.query("SELECT fingerprint FROM kw_alerts WHERE alert_type = 'auth_failure_burst'")
            .len(),
        1,
        "but it is recorded"
    );
    // Once the silence ends, the still-firing alert is told.
    kw_ok(&db, &["silence", "expire", id]);
    assert!(kw_ok(&db, &["silence", "list"]).lines().count() <= 1);
    let empty = db.path("empty.log");
    std::fs::write(&empty, "").unwrap();
    kw_ok(
        &db,
        &[
            "ingest",
            "--notify",
            "--alerts",
            cfg,
            empty.to_str().unwrap(),
        ],
    );
    let text = std::fs::read_to_string(&mbox).expect("the mailbox was written");
    assert_eq!(
        text.matches("\nSubject: ").count() + usize::from(text.starts_with("Subject")),
        1
    );
    assert!(text.contains("auth failure burst"), "{text}");
    let bad = kw(
        &db,
        &[
            "silence",
            "add",
            "--type",
            "rate_spik",
            "--expires-in",
            "1h",
        ],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rate_spike"));
}

#[test]
fn silences_on_sqlite() {
    silences_record_but_do_not_send(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn silences_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        silences_record_but_do_not_send(db);
    }
}

#[test]
fn demo_writes_the_emails_it_would_send_to_its_mbox() {
    let dir = tempfile::tempdir().unwrap();
    let out = keywatch()
        .env_remove("KEYWATCH_SMTP_URL")
        .args(["demo", "--no-serve", "--days", "0.5", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("alert emails written to"), "{stdout}");
    let mbox = std::fs::read_to_string(dir.path().join("keywatch-alerts.mbox")).unwrap();
    assert!(
        mbox.starts_with("From keywatch@localhost "),
        "{}",
        &mbox[..200.min(mbox.len())]
    );
    assert!(mbox.contains("Subject: [keywatch] "));
    assert!(mbox.contains("Content-Type: multipart/alternative"));
    assert!(
        !mbox.contains("pmcp_") || !mbox.contains("pmcp_live_"),
        "no full key"
    );
}
