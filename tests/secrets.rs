//! Secrets and access, through the real binary: keywatch refuses to serve /metrics openly on
//! a non-loopback address, takes secrets only from the environment or owner-only files and
//! never echoes them, and writes no full API key anywhere (database, logs, /metrics, API
//! answers, emails, mailbox, dead letters) even when its input is full of them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::smtp::*;
use common::*;
use sha2::Digest;

const HMAC_SECRET: &str = "hmac-Secret-0123456789abcdef-0123456789";

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// `keywatch run` on `listen` with `args`, following an empty file.
fn run_cmd(db: &TestDb, listen: &str, args: &[&str]) -> std::process::Command {
    let empty = db.path("empty.log");
    std::fs::write(&empty, "").unwrap();
    let mut c = keywatch();
    c.args(["--database-url", &db.url, "run", "--listen", listen])
        .arg("--source")
        .arg(format!("file:{}", empty.display()))
        .args(args);
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One line, no panic or backtrace.
fn assert_one_sentence(err: &str) {
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn a_non_loopback_listen_needs_metrics_protected_or_public() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    for any in ["0.0.0.0", "[::]"] {
        let listen = format!("{any}:{}", free_port());
        let out = run_cmd(&db, &listen, &[]).output().unwrap();
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_one_sentence(&err);
        assert!(
            err.contains(&format!("--listen {listen} is not a loopback address"))
                && err.contains("--metrics-token-sha256 (KEYWATCH_METRICS_TOKEN_SHA256)")
                && err.contains("--metrics-public (KEYWATCH_METRICS_PUBLIC)"),
            "{err}"
        );
    }
    let help = kw_ok(&db, &["run", "--help"]);
    assert!(
        help.contains("[default: 127.0.0.1:9464]"),
        "loopback by default: {help}"
    );

    // Explicitly public: it starts, and anyone may scrape.
    let port = free_port();
    let mut d = KillOnDrop(
        run_cmd(&db, &format!("0.0.0.0:{port}"), &["--metrics-public"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_healthy(&mut d, &addr);
    assert_eq!(get(&addr, "/metrics", "text/plain").unwrap().0, 200);
    assert!(d.terminate().success());

    // Protected: only the bearer token whose hash is configured may scrape.
    let port = free_port();
    let token = "metrics-token-4f1c2d";
    let mut d = KillOnDrop(
        run_cmd(&db, &format!("0.0.0.0:{port}"), &[])
            .env("KEYWATCH_METRICS_TOKEN_SHA256", sha256_hex(token))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_healthy(&mut d, &addr);
    let scrape_with = |auth: &str| {
        http(
            &addr,
            &format!("GET /metrics HTTP/1.0\r\nHost: x\r\n{auth}\r\n"),
        )
        .unwrap()
    };
    assert_eq!(scrape_with("").0, 401);
    assert_eq!(scrape_with("Authorization: Bearer wrong\r\n").0, 401);
    assert_eq!(
        scrape_with(&format!("Authorization: Bearer {token}x\r\n")).0,
        401
    );
    let (status, _, body) = scrape_with(&format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(status, 200);
    assert!(body.contains("keywatch_build_info"), "{body}");
    assert_eq!(
        get(&addr, "/healthz", "text/plain").unwrap().0,
        200,
        "probes stay open"
    );
    assert!(d.terminate().success());

    let out = run_cmd(&db, "127.0.0.1:0", &["--metrics-token-sha256", "nothex"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_one_sentence(&stderr(&out));
    assert!(
        stderr(&out).contains("metrics token hash \"nothex\""),
        "{}",
        stderr(&out)
    );
}

fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn secrets_come_only_from_the_environment_or_owner_only_files_and_are_never_echoed() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    // Not on the command line, where `ps` shows it to every user.
    let out = run_cmd(&db, "127.0.0.1:0", &["--api-key-hmac-secret", HMAC_SECRET])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!stderr(&out).contains(HMAC_SECRET), "{}", stderr(&out));

    // A file others may read is refused, naming the file and the fix, not the secret.
    let open = secret_file(db.dir.path(), "hmac-open", HMAC_SECRET, 0o644);
    for (var, what) in [
        ("KEYWATCH_API_KEY_HMAC_SECRET_FILE", "run"),
        ("KEYWATCH_SMTP_PASSWORD_FILE", "run"),
    ] {
        let out = run_cmd(&db, "127.0.0.1:0", &[])
            .env(var, &open)
            .env("KEYWATCH_SMTP_URL", "smtp://127.0.0.1:25")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{what} with {var}: {err}");
        assert_one_sentence(&err);
        assert!(
            err.contains(&format!("the secret file {} ({var})", open.display()))
                && err.contains("mode 0644")
                && err.contains(&format!("chmod 600 {}", open.display())),
            "{err}"
        );
        assert!(!err.contains(HMAC_SECRET), "{err}");
    }

    // check-config with every secret set, and with a secret pasted into the file by mistake.
    let hook_secret = "whsec-Hook-Secret-98765";
    let smtp_password = "smtp-Pass-Word-24680";
    let cfg = db.path("alerts.toml");
    std::fs::write(
        &cfg,
        r#"
[[receivers]]
name = "mail"
type = "email"
url = "smtp://relay@127.0.0.1:2525"
password_env = "KW_SMTP_PASSWORD"

[[receivers]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:9/hook"
secret_env = "KW_HOOK_SECRET"

[route]
receiver = "mail"
"#,
    )
    .unwrap();
    let env = [
        ("KW_SMTP_PASSWORD", smtp_password),
        ("KW_HOOK_SECRET", hook_secret),
        ("KEYWATCH_API_KEY_HMAC_SECRET", HMAC_SECRET),
    ];
    let out = keywatch()
        .args(["check-config"])
        .arg(&cfg)
        .envs(env)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let pasted = db.path("pasted.toml");
    std::fs::write(
        &pasted,
        format!(
            "[[receivers]]\nname = \"mail\"\ntype = \"email\"\nurl = \"smtp://127.0.0.1:2525\"\npassword_env = \"{smtp_password}!\"\n"
        ),
    )
    .unwrap();
    let bad = keywatch()
        .arg("check-config")
        .arg(&pasted)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("password_env names an environment variable"),
        "{}",
        stderr(&bad)
    );

    // The daemon with every secret set (the HMAC secret from an owner-only file), at debug.
    let owner_only = secret_file(db.dir.path(), "hmac", &format!("{HMAC_SECRET}\n"), 0o600);
    let port = free_port();
    let child = run_cmd(
        &db,
        &format!("127.0.0.1:{port}"),
        &["--log", "debug", "--alerts"],
    )
    .arg(&cfg)
    .envs(env)
    .env_remove("KEYWATCH_API_KEY_HMAC_SECRET")
    .env("KEYWATCH_API_KEY_HMAC_SECRET_FILE", &owner_only)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut d = KillOnDrop(child);
    let addr = format!("127.0.0.1:{port}");
    wait_healthy(&mut d, &addr);
    let metrics = scrape(&addr);
    let _ = http(
        &addr,
        &format!("GET /v1/usage HTTP/1.0\r\nAuthorization: Bearer {HMAC_SECRET}\r\n\r\n"),
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(d.0.id().to_string())
        .status();
    let mut logs = String::new();
    use std::io::Read;
    d.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    d.0.stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(d.0.wait().unwrap().success(), "{logs}");
    assert!(
        logs.contains("Alert receiver ready"),
        "the daemon ran at debug: {logs}"
    );
    for out in [stderr(&out), stderr(&bad), logs, metrics] {
        for secret in [HMAC_SECRET, hook_secret, smtp_password] {
            assert!(!out.contains(secret), "{secret} echoed: {out}");
        }
    }
}

use std::process::Command;

/// A full key in the auth server's format for a random id, unsigned (the API checks no
/// signature without a secret, and the log carries whatever clients sent).
fn fake_key(rng: &mut Rng) -> String {
    let mut k = String::from("pmcp_01");
    while k.len() < 87 {
        k.push_str(&format!("{:016x}", rng.next()));
    }
    k.truncate(87);
    k
}

/// Anything that still looks like a full or partial key: `pmcp_` and 24 or more hex.
fn leaked_keys(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("pmcp_") {
        let hex: String = rest[i + 5..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        if hex.len() >= 24 {
            out.push(format!("pmcp_{hex}"));
        }
        rest = &rest[i + 5..];
    }
    out
}

/// Every part of every message in the mbox or .eml files, decoded (quoted-printable and
/// base64 would hide a key from a plain search).
fn decoded_mail(paths: &[std::path::PathBuf]) -> String {
    let script = r#"
import email, email.policy, mailbox, sys
for p in sys.argv[1:]:
    msgs = mailbox.mbox(p) if p.endswith(".mbox") else [email.message_from_binary_file(open(p, "rb"), policy=email.policy.default)]
    for m in msgs:
        print(m.as_string() if hasattr(m, "as_string") else m)
        for part in m.walk():
            payload = part.get_payload(decode=True)
            if payload:
                print(payload.decode("utf-8", "replace"))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(paths)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The real binary over input full of full keys (in lines, user agents, MCP names, paths,
/// origins, error codes, presented prefixes, refused lines, API headers), delivering alerts to
/// a real SMTP server and a mailbox: no output anywhere holds a full key.
#[test]
fn no_full_key_is_written_anywhere() {
    if !python_module("aiosmtpd", "aiosmtpd", "no-full-key test") {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let org = kw_ok(&db, &["orgs", "create", "--name", "Leaky", "--tier", "pro"]);
    let created = keywatch()
        .args([
            "--database-url",
            &db.url,
            "keys",
            "create",
            "--org",
            org.trim(),
            "--name",
            "k",
        ])
        .args(["--scopes", "reports:read"])
        .env("KEYWATCH_API_KEY_HMAC_SECRET", HMAC_SECRET)
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let real = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(!stderr(&created).contains(&real));
    let key_id = db.query("SELECT id FROM api_keys")[0][0].clone().unwrap();
    let mut rng = Rng(0x1ea4);
    let fakes: Vec<String> = (0..12).map(|_| fake_key(&mut rng)).collect();
    let mut all_keys = vec![real.clone()];
    all_keys.extend(fakes.iter().cloned());

    // The log: the real key's requests carrying keys in every string field, refused keys
    // presented in full, and refused lines of every kind holding keys.
    let mut log = String::new();
    for i in 0..40 {
        let k = &all_keys[i % all_keys.len()];
        log.push_str(&format!(
            r#"{{"created_at":"2026-11-20T12:00:{:02}Z","api_key_id":"{key_id}","organization_id":"{}","key_prefix":"{k}","mcp_server_name":"mcp-{k}","endpoint_path":"/mcp?api_key={k}","http_method":"POST","http_status_code":{},"source_ip":"81.2.69.160","user_agent":"curl/8 (key {k})","error_code":"{}","metadata":{{"origin":"https://leak.example/?k={k}"}}}}"#,
            i % 60,
            org.trim(),
            if i % 3 == 0 { 500 } else { 200 },
            if i % 3 == 0 { k.as_str() } else { "" },
        ));
        log.push('\n');
    }
    for (i, k) in fakes.iter().enumerate() {
        log.push_str(&format!(
            r#"{{"created_at":"2026-11-20T12:01:{i:02}Z","http_status_code":401,"key_prefix":"{k}","source_ip":"203.0.113.9","user_agent":"{k}"}}"#
        ));
        log.push('\n');
        log.push_str(&format!("not json at all {k}\n"));
        log.push_str(&format!(
            r#"{{"created_at":"yesterday {k}","http_status_code":200}}"#
        ));
        log.push('\n');
        log.push_str(&format!(
            r#"{{"created_at":"2026-11-20T12:01:00Z","http_status_code":"{k}"}}"#
        ));
        log.push('\n');
        log.push_str(&format!(r#"{{"x":"{k}","y":"{}"}}"#, "A".repeat(70_000)));
        log.push('\n');
    }
    let log_path = db.path("leaky.log");
    let mut bytes = log.into_bytes();
    for k in &fakes {
        bytes.extend_from_slice(format!(r#"{{"user_agent":"{k}"#).as_bytes());
        bytes.extend_from_slice(b"\xff\"}\n");
    }
    std::fs::write(&log_path, &bytes).unwrap();

    let mail_dir = db.path("smtp");
    std::fs::create_dir_all(&mail_dir).unwrap();
    let smtp_port = free_port();
    let mut sink = Sink::new(mail_dir.clone(), smtp_port);
    sink.start();
    let mbox = db.path("alerts.mbox");
    let cfg = db.path("alerts.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[delivery]
retry_initial = "1s"
retry_max = "2s"

[[receivers]]
name = "smtp"
type = "email"
url = "smtp://127.0.0.1:{smtp_port}"
to = ["sec@example.com"]

[[receivers]]
name = "mbox"
type = "email"
mailbox = "{}"

[route]
receiver = "smtp"
group_by = ["fingerprint"]
group_wait = "0s"
group_interval = "1s"

[[routes]]
receiver = "mbox"
continue = true

[[routes]]
receiver = "smtp"
"#,
            mbox.display()
        ),
    )
    .unwrap();
    let admin = "admin-token-for-the-leak-test";
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = keywatch()
        .args([
            "--database-url",
            &db.url,
            "--log",
            "debug",
            "run",
            "--listen",
            &addr,
        ])
        .arg("--alerts")
        .arg(&cfg)
        .arg("--source")
        .arg(format!("file:{}", log_path.display()))
        .env("KEYWATCH_ADMIN_TOKEN_SHA256", sha256_hex(admin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut d = KillOnDrop(child);
    // Drain the logs while it runs, so a full pipe never blocks it.
    let (mut err_pipe, mut out_pipe) = (d.0.stderr.take().unwrap(), d.0.stdout.take().unwrap());
    let logs = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    wait_healthy(&mut d, &addr);

    // Keys in the API's headers, path and query.
    let mut answers = String::new();
    for (i, k) in fakes.iter().enumerate().take(4) {
        let req = match i {
            0 => format!(
                "GET /v1/usage HTTP/1.0\r\nAuthorization: ApiKey {k}\r\nUser-Agent: {k}\r\n\r\n"
            ),
            1 => format!("GET /v1/usage?key={k} HTTP/1.0\r\nAuthorization: Bearer {k}\r\n\r\n"),
            2 => format!("GET /v1/keys/{k}/activity HTTP/1.0\r\nX-API-Key: {k}\r\n\r\n"),
            _ => format!("GET /{k} HTTP/1.0\r\nAuthorization: ApiKey {k}\r\n\r\n"),
        };
        if let Some((_, head, body)) = http(&addr, &req) {
            answers.push_str(&head);
            answers.push_str(&body);
        }
    }
    let sent = wait_until(Duration::from_secs(60), || {
        std::fs::read_dir(&mail_dir)
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "eml"))
            && std::fs::metadata(&mbox).is_ok_and(|m| m.len() > 0)
    });
    if !sent {
        let _ = d.0.kill();
        let _ = d.0.wait();
        let logs = logs.join().unwrap();
        let alerts = kw_ok(&db, &["report", "alerts", "--format", "json"]);
        panic!(
            "alerts were not mailed and written to the mailbox: {alerts}\n{}",
            &logs[logs.len().saturating_sub(6000)..]
        );
    }
    let bearer = format!("Authorization: Bearer {admin}\r\n");
    for path in [
        "/v1/alerts".to_owned(),
        "/v1/usage?group_by=mcp".to_owned(),
        "/v1/usage?key=unknown".to_owned(),
        format!("/v1/keys/{key_id}/activity?from=2026-11-19T00:00:00Z&until=2026-11-21T00:00:00Z"),
    ] {
        let (status, head, body) =
            http(&addr, &format!("GET {path} HTTP/1.0\r\n{bearer}\r\n")).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        answers.push_str(&head);
        answers.push_str(&body);
    }
    let alerts_answer = answers.clone();
    let metrics = scrape(&addr);
    assert!(d.terminate().success());
    let logs = logs.join().unwrap();
    drop(sink);

    let reports = [
        kw_ok(&db, &["report", "rejected", "--format", "json"]),
        kw_ok(&db, &["report", "alerts", "--format", "json"]),
        kw_ok(
            &db,
            &["report", "usage", "--group-by", "mcp", "--format", "csv"],
        ),
        kw_ok(
            &db,
            &[
                "report",
                "activity",
                "--key",
                &key_id,
                "--from",
                "2026-11-19T00:00:00Z",
                "--until",
                "2026-11-21T00:00:00Z",
                "--format",
                "json",
            ],
        ),
    ]
    .join("\n");
    assert!(
        reports.contains("key_in_logs"),
        "the leak itself was detected: {reports}"
    );
    assert!(
        reports.contains("not_json") && reports.contains("too_long"),
        "{reports}"
    );
    let dump = Command::new("sqlite3")
        .arg(db.path("keywatch.db"))
        .arg(".dump")
        .output()
        .expect("sqlite3 (installed by .ci/run)");
    assert!(dump.status.success());
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(
        dump.contains("kw_dead_letters") && dump.contains(&key_id),
        "a real dump"
    );
    let mut raw_db = String::new();
    for f in ["keywatch.db", "keywatch.db-wal"] {
        raw_db.push_str(&String::from_utf8_lossy(
            &std::fs::read(db.path(f)).unwrap_or_default(),
        ));
    }
    let mut mail_files: Vec<_> = std::fs::read_dir(&mail_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    let sink_json: String = std::fs::read_dir(&mail_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    mail_files.push(mbox.clone());
    let mail = decoded_mail(&mail_files);
    assert!(
        mail.contains("key_in_logs") || mail.contains("key in logs"),
        "{mail}"
    );
    let raw_mbox = std::fs::read_to_string(&mbox).unwrap();

    for (what, text) in [
        ("the database dump", &dump),
        ("the database files", &raw_db),
        ("the logs", &logs),
        ("/metrics", &metrics),
        ("API answers", &alerts_answer),
        ("reports", &reports),
        ("emails and mailbox (decoded)", &mail),
        ("the SMTP sink's decoded parts", &sink_json),
        ("the mailbox file", &raw_mbox),
    ] {
        assert!(!text.is_empty(), "{what} is empty");
        let leaked = leaked_keys(text);
        let context: Vec<&str> = text
            .lines()
            .filter(|l| leaked.iter().any(|k| l.contains(k.as_str())))
            .map(|l| &l[..l.len().min(300)])
            .take(5)
            .collect();
        assert_eq!(
            leaked,
            Vec::<String>::new(),
            "a full key in {what}: {context:#?}"
        );
        for k in &all_keys {
            // The part after the 20-character prefix is the secret: none of it, anywhere.
            assert!(!text.contains(&k[20..60]), "part of a full key in {what}");
        }
    }
}
