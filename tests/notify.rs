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

use common::smtp::*;
use common::*;
use serde_json::Value;

/// Writes `text` to `name` in the test's directory.
fn write_file(db: &TestDb, name: &str, text: &str) -> PathBuf {
    let p = db.path(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// An alerts.toml sending to `port`, with timers short enough for a test.
fn alerts_toml(db: &TestDb, port: u16, group_by: &str) -> PathBuf {
    write_file(
        db,
        "alerts.toml",
        &format!(
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
}

/// Key probing from each of `ips`: one auth_failure_burst alert per address. The presented
/// prefixes are hostile: markup and a CRLF header injection attempt.
fn probe_log(db: &TestDb, name: &str, ips: &[&str]) -> PathBuf {
    let log = db.path(name);
    std::fs::write(&log, probe_lines(ips, 10)).unwrap();
    log
}

/// The lines of [`probe_log`], at `hour` o'clock.
fn probe_lines(ips: &[&str], hour: u32) -> String {
    let mut lines = String::new();
    for ip in ips {
        for i in 0..60u32 {
            lines.push_str(&format!(
                r#"{{"created_at":"2026-11-20T{hour:02}:0{}:{:02}Z","api_key_id":null,"organization_id":null,"key_prefix":"pmcp_<b>{i:03}\r\nBcc: victim@evil.test","http_status_code":401,"error_code":"unauthorized","source_ip":"{ip}","user_agent":"<script>alert(1)</script>"}}"#,
                i / 20,
                (i % 20) * 3,
            ));
            lines.push('\n');
        }
    }
    lines
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
    (write_file(db, "alerts.toml", &mbox_config(&mbox)), mbox)
}

/// Delivery to the mailbox file `mbox`, one group per alert, at once.
fn mbox_config(mbox: &Path) -> String {
    format!(
        "[[receivers]]\nname = \"box\"\ntype = \"email\"\nmailbox = \"{}\"\n\n[route]\ngroup_by = [\"fingerprint\"]\ngroup_wait = \"0s\"\n",
        mbox.display()
    )
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

/// `keywatch run` with `cfg`, reading only an empty log, with `env` set.
fn spawn_daemon(db: &TestDb, cfg: &Path, env: &[(&str, &str)]) -> Child {
    let empty = db.path("empty.log");
    std::fs::write(&empty, "").unwrap();
    keywatch()
        .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
        .arg("--alerts")
        .arg(cfg)
        .arg("--source")
        .arg(format!("file:{}", empty.display()))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts")
}

fn stop(mut daemon: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    let _ = daemon.wait();
}

fn ingest_notify(db: &TestDb, cfg: &Path, log: &Path, env: &[(&str, &str)]) {
    let out = keywatch()
        .args(["--database-url", &db.url, "ingest", "--notify", "--alerts"])
        .arg(cfg)
        .arg(log)
        .envs(env.iter().copied())
        .output()
        .expect("keywatch runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn webhooks_are_signed_retried_by_id_and_slack_shaped() {
    if !aiosmtpd_available() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let mut hook = Sink::new(db.path("hook"), free_port()).with(
        "webhook_sink.py",
        &["--secret", "hook-secret", "--fail-first", "1"],
    );
    let mut slack = Sink::new(db.path("slack"), free_port()).with("webhook_sink.py", &[]);
    hook.start();
    slack.start();
    let cfg = write_file(
        &db,
        "alerts.toml",
        &format!(
            r#"
[delivery]
retry_initial = "1s"
retry_max = "2s"

[[receivers]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:{}/hook"
secret_env = "KW_TEST_HOOK_SECRET"

[[receivers]]
name = "slack"
type = "webhook"
format = "slack"
url = "http://127.0.0.1:{}/slack"

[route]
receiver = "hook"
group_wait = "0s"
group_interval = "1s"

[[routes]]
receiver = "slack"
types = ["auth_failure_burst"]
continue = true

[[routes]]
receiver = "hook"
types = ["auth_failure_burst"]
"#,
            hook.port, slack.port
        ),
    );
    let env = [("KW_TEST_HOOK_SECRET", "hook-secret")];
    let log = probe_log(&db, "probe.log", &["89.160.20.112"]);
    ingest_notify(&db, &cfg, &log, &env);
    // The hook answered 503 the first time: the daemon retries it.
    let daemon = spawn_daemon(&db, &cfg, &env);
    let done = wait_until(Duration::from_secs(30), || hook.messages().len() >= 2);
    std::thread::sleep(Duration::from_millis(500));
    stop(daemon);
    let got = hook.messages();
    assert!(done, "the retry arrived: {got:?}");
    assert_eq!(got.len(), 2, "one failed attempt, one delivery: {got:?}");
    assert_eq!(got[0]["answered"], 503);
    assert_eq!(got[1]["answered"], 200);
    let id = &got[0]["headers"]["x-keywatch-notification-id"];
    assert!(id.is_string());
    assert_eq!(
        &got[1]["headers"]["x-keywatch-notification-id"], id,
        "a retry has the same id"
    );
    for m in &got {
        assert_eq!(m["path"], "/hook");
        assert_eq!(m["signature_ok"], true, "signed with the secret: {m}");
        assert_eq!(m["headers"]["content-type"], "application/json");
        let body = &m["body"];
        assert_eq!(body["version"], "1");
        assert_eq!(body["status"], "firing");
        assert_eq!(body["id"], *id);
        let a = &body["alerts"][0];
        assert_eq!(a["type"], "auth_failure_burst");
        assert_eq!(a["status"], "firing");
        assert_eq!(a["source_ip"], "89.160.20.112");
    }
    let s = slack.messages();
    assert_eq!(s.len(), 1, "{s:?}");
    let text = s[0]["body"]["text"].as_str().unwrap();
    assert!(text.starts_with("*[keywatch] "), "{text}");
    assert!(text.contains("auth failure burst"), "{text}");
    assert!(!text.contains("<b>"), "Slack markup is escaped: {text}");
    assert_eq!(
        s[0]["signature_ok"],
        Value::Null,
        "no secret, no signature check"
    );
    assert!(notification_states(&db).iter().all(|(st, _)| st == "sent"));
}

/// Debian's prometheus-alertmanager, on a free port; killed when dropped.
struct Alertmanager {
    child: Child,
    port: u16,
}

impl Alertmanager {
    fn start(dir: &Path) -> Option<Alertmanager> {
        let bin = Path::new("/usr/bin/prometheus-alertmanager");
        if !bin.exists() {
            assert!(
                std::env::var("CI").is_err(),
                "CI is set but prometheus-alertmanager is missing (apt-get install prometheus-alertmanager)"
            );
            eprintln!("skipped: Alertmanager test (apt-get install prometheus-alertmanager)");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("alertmanager.yml");
        std::fs::write(
            &cfg,
            "route:\n  receiver: blackhole\n  group_wait: 1h\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("alertmanager starts");
        let am = Alertmanager { child, port };
        assert!(
            wait_until(Duration::from_secs(30), || get(
                &format!("127.0.0.1:{}", am.port),
                "/-/ready",
                "text/plain"
            )
            .is_some_and(|(status, _, _)| status == 200)),
            "Alertmanager became ready"
        );
        Some(am)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_alertmanager_receives_the_alerts_with_their_labels() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let Some(am) = Alertmanager::start(&db.path("am")) else {
        return;
    };
    let cfg = write_file(
        &db,
        "alerts.toml",
        &format!(
            r#"
[[receivers]]
name = "am"
type = "alertmanager"
url = "http://127.0.0.1:{}"

[route]
group_by = ["fingerprint"]
group_wait = "0s"
"#,
            am.port
        ),
    );
    let log = probe_log(&db, "probe.log", &["89.160.20.112", "81.2.69.160"]);
    ingest_notify(&db, &cfg, &log, &[]);
    let mut alerts = Vec::new();
    let arrived = wait_until(Duration::from_secs(20), || {
        alerts = get(
            &format!("127.0.0.1:{}", am.port),
            "/api/v2/alerts",
            "application/json",
        )
        .and_then(|(_, _, body)| serde_json::from_str::<Vec<Value>>(&body).ok())
        .unwrap_or_default();
        alerts.len() >= 2
    });
    assert!(arrived, "two alerts in Alertmanager: {alerts:?}");
    for a in &alerts {
        let l = &a["labels"];
        assert_eq!(l["alertname"], "auth_failure_burst", "{a}");
        assert_eq!(l["source"], "keywatch");
        assert!(
            l["severity"].is_string() && l["fingerprint"].is_string(),
            "{a}"
        );
        assert!(
            a["annotations"]["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{a}"
        );
        assert_eq!(a["status"]["state"], "active", "firing: {a}");
    }
    assert_eq!(notification_states(&db).len(), 2);
    assert!(notification_states(&db).iter().all(|(s, _)| s == "sent"));
}

/// A CA and a certificate for 127.0.0.1 it signed, made by openssl in `dir`: (ca, cert, key).
fn test_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=keywatch test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
    )
}

fn tls_toml(db: &TestDb, name: &str, url: &str, ca: &Path) -> PathBuf {
    write_file(
        db,
        name,
        &format!(
            r#"
[delivery]
timeout = "3s"

[[receivers]]
name = "security"
type = "email"
url = "{url}"
password_env = "KW_TEST_SMTP_PASSWORD"
ca_file = "{}"
from = "keywatch <keywatch@example.com>"
to = ["sec@example.com"]

[route]
group_by = ["fingerprint"]
group_wait = "0s"
"#,
            ca.display()
        ),
    )
}

#[test]
fn starttls_and_implicit_tls_with_a_test_certificate_and_auth() {
    if !aiosmtpd_available() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let (ca, cert, key) = test_certificate(&db.path("tls"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut starttls = Sink::new(db.path("starttls"), free_port()).with(
        "smtp_sink.py",
        &["--tls", cert, key, "--auth", "kw", "right-password"],
    );
    let mut implicit = Sink::new(db.path("implicit"), free_port()).with(
        "smtp_sink.py",
        &[
            "--tls",
            cert,
            key,
            "--implicit-tls",
            "--auth",
            "kw",
            "right-password",
        ],
    );
    starttls.start();
    implicit.start();
    let good = [("KW_TEST_SMTP_PASSWORD", "right-password")];
    // One alert (from `ip`) through the server at `url`.
    let send = |name: &str, url: String, ip: &str, env: &[(&str, &str)]| {
        let cfg = tls_toml(&db, &format!("{name}.toml"), &url, &ca);
        ingest_notify(
            &db,
            &cfg,
            &probe_log(&db, &format!("{name}.log"), &[ip]),
            env,
        );
        cfg
    };
    let starttls_url = format!("smtp://kw@127.0.0.1:{}?tls=required", starttls.port);
    send("starttls", starttls_url.clone(), "89.160.20.112", &good);
    assert!(wait_until(Duration::from_secs(20), || !starttls
        .messages()
        .is_empty()));
    let m = &starttls.messages()[0];
    assert_eq!(m["tls"], true, "sent after STARTTLS: {m}");
    assert_eq!(m["auth"], true, "authenticated: {m}");
    assert_eq!(m["rcpt_to"], serde_json::json!(["sec@example.com"]));

    send(
        "implicit",
        format!("smtps://kw@127.0.0.1:{}", implicit.port),
        "81.2.69.160",
        &good,
    );
    assert!(
        wait_until(Duration::from_secs(20), || !implicit.messages().is_empty()),
        "{:?}",
        db.query("SELECT status, last_error FROM kw_notifications")
    );
    assert_eq!(implicit.messages()[0]["auth"], true);

    // A wrong password is refused: nothing is delivered, and the error is kept on the row.
    let cfg = send(
        "wrong",
        starttls_url,
        "175.16.199.1",
        &[("KW_TEST_SMTP_PASSWORD", "wrong")],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        starttls.messages().len(),
        1,
        "nothing sent with a wrong password"
    );
    let rows = db.query("SELECT status, last_error FROM kw_notifications ORDER BY created_at");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_ne!(rows[2][0].as_deref(), Some("sent"), "{rows:?}");
    assert!(
        rows[2][1].as_deref().is_some_and(|e| e.contains("SMTP")),
        "{rows:?}"
    );
    // Without the CA, the server's certificate is not trusted and nothing is sent.
    let no_ca = db.path("no-ca.toml");
    std::fs::write(
        &no_ca,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("ca_file"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    ingest_notify(
        &db,
        &no_ca,
        &probe_log(&db, "d.log", &["89.160.20.113"]),
        &good,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        starttls.messages().len(),
        1,
        "an untrusted certificate gets nothing"
    );
}

#[test]
fn kill_9_between_accepted_and_marked_sent_gives_one_duplicate_with_the_same_message_id() {
    if !aiosmtpd_available() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).unwrap();
    // The server keeps each message, then waits 4 s before saying so: a crash in that window
    // is a crash between "accepted" and "marked sent".
    let mut sink =
        Sink::new(db.path("mail"), free_port()).with("smtp_sink.py", &["--reply-delay", "4"]);
    let cfg = alerts_toml(&db, sink.port, r#""fingerprint""#);
    ingest_notify(
        &db,
        &cfg,
        &probe_log(&db, "probe.log", &["89.160.20.112"]),
        &[],
    );
    assert_eq!(
        notification_states(&db).len(),
        1,
        "queued while the server was down"
    );
    sink.start();
    let mut first = spawn_daemon(&db, &cfg, &[]);
    assert!(wait_until(Duration::from_secs(30), || sink
        .messages()
        .len()
        == 1));
    first.kill().unwrap();
    let _ = first.wait();
    assert_eq!(
        notification_states(&db)[0].0,
        "pending",
        "killed before it was marked sent"
    );
    let second = spawn_daemon(&db, &cfg, &[]);
    let sent = wait_until(Duration::from_secs(30), || {
        notification_states(&db)
            .first()
            .is_some_and(|(s, _)| s == "sent")
    });
    std::thread::sleep(Duration::from_secs(1));
    stop(second);
    assert!(sent, "{:?}", notification_states(&db));
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 2, "exactly one duplicate: {msgs:?}");
    assert_eq!(
        msgs[0]["message_id"], msgs[1]["message_id"],
        "the duplicate is recognisable by its Message-ID"
    );
}

#[test]
fn sighup_reloads_alerts_toml_and_keeps_it_when_the_new_one_is_bad() {
    use std::io::Write;
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let (a, b) = (db.path("a.mbox"), db.path("b.mbox"));
    let cfg = write_file(&db, "alerts.toml", &mbox_config(&a));
    let live = write_file(&db, "live.log", "");
    let log = db.path("daemon.log");
    let daemon = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
        .arg("--alerts")
        .arg(&cfg)
        .arg("--source")
        .arg(format!("file:{}", live.display()))
        .env("KEYWATCH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("daemon starts");
    let logged = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let append = |text: String| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&live)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &daemon.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    assert!(
        wait_until(Duration::from_secs(20), || logged("Serving")),
        "{}",
        read(&log)
    );
    append(probe_lines(&["89.160.20.112"], 10));
    assert!(
        wait_until(Duration::from_secs(30), || read(&a)
            .contains("89.160.20.112")),
        "the first alert reached a.mbox: {}",
        read(&log)
    );
    // A new file: alerts go to b.mbox from now on.
    std::fs::write(&cfg, mbox_config(&b)).unwrap();
    hup();
    assert!(wait_until(Duration::from_secs(20), || logged(
        "reloaded alerts.toml"
    )));
    append(probe_lines(&["81.2.69.160"], 11));
    assert!(
        wait_until(Duration::from_secs(30), || read(&b).contains("81.2.69.160")),
        "after the reload the alert reached b.mbox: {}",
        read(&log)
    );
    assert!(!read(&a).contains("81.2.69.160"));
    // A broken file is rejected with its line, and the settings in force stay.
    std::fs::write(&cfg, format!("{}\nrate_spike = true\n", mbox_config(&a))).unwrap();
    hup();
    assert!(wait_until(Duration::from_secs(20), || logged(
        "is rejected"
    )));
    let text = read(&log);
    let line = text.lines().find(|l| l.contains("is rejected")).unwrap();
    assert!(
        line.contains("line 10") && line.contains("rate_spike"),
        "{line}"
    );
    append(probe_lines(&["175.16.199.1"], 12));
    assert!(
        wait_until(Duration::from_secs(30), || read(&b)
            .contains("175.16.199.1")),
        "the old settings still deliver: {}",
        read(&log)
    );
    assert!(!read(&a).contains("175.16.199.1"));
    // Detector thresholds apply at once too: 60 failures from one address no longer make a
    // burst once the threshold is 1000 (and the prefix rule is off).
    std::fs::write(
        &cfg,
        format!(
            "[detectors.auth]\nfailures = 1000\ndistinct_prefixes = 128\nper_prefix = false\n\n{}",
            mbox_config(&b)
        ),
    )
    .unwrap();
    hup();
    assert!(
        wait_until(Duration::from_secs(20), || read(&log)
            .matches("reloaded alerts.toml")
            .count()
            == 2),
        "{}",
        read(&log)
    );
    // The pipeline takes the new settings with the next lines it reads.
    append(probe_lines(&["89.160.20.128"], 13));
    // Four bursts of 60 lines: wait until all of them are committed.
    let committed = || {
        db.query("SELECT CAST(line_no AS TEXT) FROM kw_checkpoints")
            .first()
            .and_then(|r| r[0].as_deref()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(wait_until(Duration::from_secs(30), || committed() >= 240));
    let text = read(&log);
    assert!(
        text.contains("detectors=auth"),
        "the auth detector was rebuilt: {text}"
    );
    assert!(
        db.query("SELECT fingerprint FROM kw_alerts WHERE source_ip = '89.160.20.128'")
            .is_empty(),
        "no burst under the new threshold"
    );
    assert!(
        !read(&b).contains("89.160.20.128"),
        "no burst under the new threshold"
    );
    stop(daemon);
}

#[test]
fn a_route_with_to_org_also_mails_the_organizations_own_address() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    simulate(&db, &db.path("seed.log"), &["--keys", "3", "--lines", "10"]);
    let rows = db.query(
        "SELECT CAST(id AS TEXT), CAST(org_id AS TEXT), key_prefix FROM api_keys ORDER BY key_prefix LIMIT 1",
    );
    let [Some(id), Some(org), Some(prefix)] = &rows[0][..] else {
        panic!("a key: {rows:?}")
    };
    let revoked_at = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339();
    db.exec(&format!(
        "UPDATE api_keys SET status = 'revoked', revoked_at = '{revoked_at}' WHERE CAST(id AS TEXT) = '{id}'"
    ));
    let mbox = db.path("alerts.mbox");
    let cfg = write_file(
        &db,
        "alerts.toml",
        &format!(
            r#"
[[receivers]]
name = "box"
type = "email"
mailbox = "{}"
to = ["sec@example.com"]

[route]
group_wait = "0s"

[[routes]]
receiver = "box"
types = ["revoked_key_use"]
group_by = ["org"]
to_org = true
"#,
            mbox.display()
        ),
    );
    // A bad address is refused, naming it; a good one is stored.
    let bad = kw(
        &db,
        &[
            "orgs",
            "set-alert-email",
            org,
            "security@acme\r\nBcc: x@evil.test",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not an email address"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    kw_ok(
        &db,
        &[
            "orgs",
            "set-alert-email",
            org,
            "Acme security <security@acme.example>",
        ],
    );
    let now = chrono::Utc::now().to_rfc3339();
    let log = write_file(
        &db,
        "revoked.log",
        &format!(
            "{{\"request_id\":\"6c1f0d9e-8a37-4b8e-9f7e-2d5b0c1a9e01\",\"created_at\":\"{now}\",\"organization_id\":\"{org}\",\"api_key_id\":\"{id}\",\"key_prefix\":\"{prefix}\",\"mcp_server_name\":\"github\",\"endpoint_path\":\"/mcp\",\"http_method\":\"POST\",\"http_status_code\":401,\"latency_ms\":4,\"request_size_bytes\":100,\"response_size_bytes\":50,\"source_ip\":\"81.2.69.160\",\"user_agent\":\"t/1\",\"error_code\":\"revoked_key\"}}\n"
        ),
    );
    ingest_notify(&db, &cfg, &log, &[]);
    let text = std::fs::read_to_string(&mbox).unwrap_or_default();
    let to = text
        .lines()
        .find(|l| l.starts_with("To: "))
        .unwrap_or_else(|| {
            panic!(
                "a message: {text} alerts: {:?} rejected: {:?} notes: {:?}",
                db.query("SELECT alert_type, org_id FROM kw_alerts"),
                db.query("SELECT reason FROM kw_dead_letters"),
                db.query("SELECT status, last_error FROM kw_notifications")
            )
        });
    assert!(
        to.contains("sec@example.com") && to.contains("security@acme.example"),
        "the receiver's recipients and the organization's: {to}"
    );
    assert!(text.contains("revoked key use"), "{text}");
    // A route that could mix organizations cannot mail one of them.
    let mixed = write_file(
        &db,
        "mixed.toml",
        &format!(
            "[[receivers]]\nname = \"box\"\ntype = \"email\"\nmailbox = \"{}\"\n\n[route]\ngroup_by = [\"type\"]\nto_org = true\n",
            mbox.display()
        ),
    );
    let out = kw(&db, &["check-config", mixed.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must group by org"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An error alert's email shows the key's last hours (issue 4): the errors of the alert's
/// class per hour as an inline chart, drawn from the usage rollups, and the hours it draws
/// are the log's own counts, each expecting the key's baseline fraction of its requests.
#[test]
fn an_error_alert_carries_a_chart_of_its_subjects_last_hours() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("requests.log");
    simulate(
        &db,
        &log,
        &[
            "--keys",
            "3",
            "--orgs",
            "1",
            "--lines",
            "3000",
            "--days",
            "0.25",
            "--error-share",
            "0",
            "--refused-share",
            "0",
            "--seed",
            "5",
        ],
    );
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let (key, org, prefix) = (
        first["api_key_id"].as_str().unwrap().to_owned(),
        first["organization_id"].as_str().unwrap().to_owned(),
        first["key_prefix"].as_str().unwrap().to_owned(),
    );
    // Ten minutes after the simulated traffic ends, the key fails 40 times in a minute.
    let burst: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"created_at":"2026-11-20T12:10:{:02}Z","organization_id":"{org}","api_key_id":"{key}","key_prefix":"{prefix}","mcp_server_name":"github","http_status_code":500,"error_code":"internal_error","latency_ms":40,"source_ip":"81.2.69.160","user_agent":"plexmcp-python/1.4.0"}}"#,
                i
            )
        })
        .collect();
    append(&log, &burst);
    // The oracle: the key's requests and 5xx per hour, from the log itself.
    let mut per_hour: std::collections::BTreeMap<i64, (u64, u64)> = Default::default();
    for l in std::fs::read_to_string(&log).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if v["api_key_id"].as_str() != Some(key.as_str()) {
            continue;
        }
        let at: chrono::DateTime<chrono::Utc> = v["created_at"].as_str().unwrap().parse().unwrap();
        let h = per_hour.entry(at.timestamp() / 3600 * 3600).or_default();
        h.0 += 1;
        h.1 += u64::from(v["http_status_code"].as_u64().unwrap() >= 500);
    }
    let (cfg, mbox) = mbox_toml(&db);
    ingest_notify(&db, &cfg, &log, &[]);

    let fp = format!("error_spike/key:{key}/5xx");
    let rows = db.query(&format!(
        "SELECT payload FROM kw_outbox WHERE fingerprint = '{fp}' AND change = 'opened'"
    ));
    assert_eq!(rows.len(), 1, "the key's 5xx alert was queued once");
    let change: Value = serde_json::from_str(rows[0][0].as_deref().unwrap()).unwrap();
    let baseline = change["evidence"]["expected"].as_f64().unwrap();
    let hourly = change["evidence"]["hourly"]
        .as_array()
        .unwrap_or_else(|| panic!("the error alert carries its hours: {change}"));
    let drawn: Vec<(i64, u64, f64)> = hourly
        .iter()
        .map(|h| {
            (
                h[0].as_i64().unwrap(),
                h[1].as_u64().unwrap(),
                h[2].as_f64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(i64, u64, f64)> = per_hour
        .iter()
        .map(|(&start, &(requests, errors))| (start, errors, requests as f64 * baseline))
        .collect();
    assert_eq!(drawn.len(), want.len(), "{drawn:?} against {want:?}");
    for (d, w) in drawn.iter().zip(&want) {
        assert_eq!((d.0, d.1), (w.0, w.1), "{drawn:?} against {want:?}");
        assert!((d.2 - w.2).abs() < 1e-6, "{drawn:?} against {want:?}");
    }
    assert_eq!(
        drawn.last().unwrap().1,
        40,
        "the alerting hour holds the burst"
    );
    assert!(
        drawn.len() >= 6,
        "the simulated hours are drawn too: {drawn:?}"
    );

    // The MCP's alert has its chart too, and the email carries both inline.
    let mcp = db.query(
        "SELECT payload FROM kw_outbox WHERE fingerprint = 'error_spike/mcp:github/5xx' AND change = 'opened'",
    );
    assert_eq!(mcp.len(), 1, "the MCP's 5xx alert was queued once");
    let mcp: Value = serde_json::from_str(mcp[0][0].as_deref().unwrap()).unwrap();
    assert!(mcp["evidence"]["hourly"].as_array().unwrap().len() >= 2);
    let text = std::fs::read_to_string(&mbox).expect("the mailbox was written");
    let messages: Vec<&str> = text.split("\nFrom ").collect();
    let errors: Vec<&&str> = messages
        .iter()
        .filter(|m| m.contains("Subject: [keywatch] ") && m.contains("error spike"))
        .collect();
    assert_eq!(
        errors.len(),
        2,
        "one email per alert (grouped by fingerprint)"
    );
    for m in errors {
        assert!(m.contains("multipart/related"), "{m}");
        assert_eq!(m.matches("Content-Type: image/png").count(), 1, "{m}");
        assert!(m.contains("Content-ID: <chart-"), "{m}");
    }
}

/// Delivery that fails as it starts (here: after a reload, its state's table is missing for a
/// moment) is started again by itself; before, it stayed stopped until the next SIGHUP and
/// every alert waited in the outbox.
#[test]
fn delivery_that_fails_to_start_is_started_again() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let (cfg, mbox) = mbox_toml(&db);
    let log = db.path("live.log");
    std::fs::write(&log, "").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", &addr])
        .arg("--alerts")
        .arg(&cfg)
        .arg("--source")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let ready = wait_until(Duration::from_secs(30), || {
        get(&addr, "/readyz", "text/plain").is_some_and(|(status, _, _)| status == 200)
    });
    assert!(ready, "the daemon is ready (and handles SIGHUP)");
    db.exec("ALTER TABLE kw_notify_groups RENAME TO kw_notify_groups_away");
    let hup = Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // Long enough for the restarted delivery to fail on the missing table, at least once.
    std::thread::sleep(Duration::from_secs(2));
    db.exec("ALTER TABLE kw_notify_groups_away RENAME TO kw_notify_groups");
    append(
        &log,
        &probe_lines(&["89.160.20.112"], 10)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    );
    let delivered = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&mbox).is_ok_and(|t| t.contains("auth failure burst"))
    });
    stop(daemon);
    assert!(
        delivered,
        "the alert was delivered once delivery could start: {:?}",
        notification_states(&db)
    );
}
