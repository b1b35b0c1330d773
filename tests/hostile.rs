//! Hostile input: every shape of bad line is either accepted with a defined meaning or
//! refused with its reason, by the parser and by the real binary (which keeps each refused line
//! with its reason and line number), and floods meant to exhaust memory stay bounded.
//!
//! What each hostile shape means (the table `hostile_shapes_have_a_defined_meaning` pins):
//! - a line over 64 KiB (`event::MAX_LINE_BYTES`): `too_long`; sources keep only 64 KiB of it
//!   in memory, however long it is;
//! - deep nesting: in fields keywatch does not read, skipped at any depth the 64 KiB allow
//!   (without recursion); where a string, number or `metadata` object is due, `wrong_type`;
//! - `\u0000` in a string: accepted (stored values drop or replace the NUL); a raw NUL byte
//!   or other control byte in a string: `not_json`; invalid UTF-8: `invalid_utf8` with the
//!   byte offset; a lone surrogate escape (`\ud800`): `not_json`;
//! - a number outside its field's range (status 100 to 599, latency 0 to 2^32-1, sizes 0 to
//!   2^63-1): `out_of_range`; a fraction, exponent or anything past i64 where an integer is
//!   due: `wrong_type`;
//! - `created_at` before 1970: `bad_timestamp`; 1970-01-01T00:00:00Z exactly: accepted;
//!   more than 24 h ahead of the wall clock (the year 9999): `bad_timestamp` from the
//!   pipeline, so one line cannot make every other line late;
//! - an IPv6 `source_ip`: accepted as is; an IPv4-mapped one (`::ffff:1.2.3.4`): accepted as
//!   the IPv4 address, for GeoIP, activity and per-address detector state alike;
//! - a field twice at the top level: `duplicate_field`; twice inside `metadata`: the line is
//!   refused the same way when the field is one keywatch reads (`origin`), and ignored for
//!   fields it does not read.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fuzz::{apply, random_ops};
use common::{Backend, KillOnDrop, Rng, TestDb, free_port, keywatch, kw_ok, scrape};
use keywatch::event::{RejectReason, parse_line};
use serde_json::Value;

const GOOD: &str = r#"{"request_id":"6f1c0a52-3a6f-4b8e-9d7c-2b1e5f9a0c11","created_at":"2026-11-20T12:00:00.123Z","organization_id":"0b7e3f2a-1c4d-4e5f-8a9b-0c1d2e3f4a5b","api_key_id":"9a41c2e7-f001-4abc-8def-0123456789ab","key_prefix":"pmcp_019a41c2e7f0...","mcp_server_name":"github","endpoint_path":"/mcp","http_method":"POST","http_status_code":200,"latency_ms":42,"request_size_bytes":512,"response_size_bytes":2048,"tokens_used":null,"source_ip":"81.2.69.160","user_agent":"plexmcp-python/1.4.0","error_code":null,"rate_limit_hit":false,"quota_exceeded":false,"metadata":{"tool_name":"search_issues","origin":"https://app.example.com"}}"#;

/// A line of `fields` (JSON members without braces) after a valid time and status.
fn with(fields: &str) -> Vec<u8> {
    format!(r#"{{"created_at":"2026-11-20T12:00:00Z","http_status_code":200{fields}}}"#)
        .into_bytes()
}

/// Each hostile shape, what the parser must answer (`None`: accepted), and why.
fn hostile_cases() -> Vec<(&'static str, Vec<u8>, Option<RejectReason>)> {
    use RejectReason::*;
    let huge = with(&format!(r#","user_agent":"{}""#, "A".repeat(70_000)));
    let big_but_under = with(&format!(r#","user_agent":"{}""#, "A".repeat(60_000)));
    vec![
        ("a string that makes the line over 64 KiB", huge, Some(TooLong)),
        ("a 60 KB string (the line is under the limit)", big_but_under, None),
        (
            "100,000 levels of nesting",
            format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)).into_bytes(),
            Some(TooLong),
        ),
        (
            "30,000 levels of arrays in an unknown field",
            with(&format!(r#","x":{}{}"#, "[".repeat(30_000), "]".repeat(30_000))),
            None,
        ),
        (
            "10,000 levels of objects in an unknown field",
            with(&format!(r#","x":{}1{}"#, r#"{"a":"#.repeat(10_000), "}".repeat(10_000))),
            None,
        ),
        (
            "1,000 levels of objects in metadata",
            with(&format!(r#","metadata":{}1{}"#, r#"{"a":"#.repeat(1_000), "}".repeat(1_000))),
            None,
        ),
        (
            "200 levels of arrays where a string is due",
            with(&format!(r#","user_agent":{}{}"#, "[".repeat(200), "]".repeat(200))),
            Some(WrongType),
        ),
        ("an escaped NUL", with(r#","user_agent":"a\u0000b""#), None),
        ("a raw NUL byte in a string", with(",\"user_agent\":\"a\0b\""), Some(NotJson)),
        ("a raw NUL byte outside strings", with(",\0\"user_agent\":\"a\""), Some(NotJson)),
        (
            "invalid UTF-8",
            b"{\"created_at\":\"2026-11-20T12:00:00Z\",\"http_status_code\":200,\"user_agent\":\"\xff\"}"
                .to_vec(),
            Some(InvalidUtf8),
        ),
        ("a lone surrogate escape", with(r#","user_agent":"\ud800""#), Some(NotJson)),
        (
            "a status past i64",
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":99999999999999999999}"#
                .to_vec(),
            Some(WrongType),
        ),
        (
            "a status out of range",
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":99999999999}"#.to_vec(),
            Some(OutOfRange),
        ),
        ("a negative latency", with(r#","latency_ms":-1"#), Some(OutOfRange)),
        ("a latency past u32", with(r#","latency_ms":4294967296"#), Some(OutOfRange)),
        ("the largest latency", with(r#","latency_ms":4294967295"#), None),
        ("a size of 2^63", with(r#","request_size_bytes":9223372036854775808"#), Some(WrongType)),
        ("the largest size", with(r#","response_size_bytes":9223372036854775807"#), None),
        ("a fractional status", with(r#","latency_ms":1.5"#), Some(WrongType)),
        ("an exponent", with(r#","latency_ms":1e308"#), Some(WrongType)),
        (
            "the year 9999 (refused later, by the pipeline)",
            br#"{"created_at":"9999-12-31T23:59:59Z","http_status_code":200}"#.to_vec(),
            None,
        ),
        (
            "the Unix epoch",
            br#"{"created_at":"1970-01-01T00:00:00Z","http_status_code":200}"#.to_vec(),
            None,
        ),
        (
            "before 1970",
            br#"{"created_at":"1969-12-31T23:59:59Z","http_status_code":200}"#.to_vec(),
            Some(BadTimestamp),
        ),
        (
            "the year 1026",
            br#"{"created_at":"1026-11-20T12:00:00Z","http_status_code":200}"#.to_vec(),
            Some(BadTimestamp),
        ),
        ("an IPv6 address", with(r#","source_ip":"2001:db8::1""#), None),
        ("an IPv4-mapped address", with(r#","source_ip":"::ffff:81.2.69.160""#), None),
        ("an IPv6 address with a zone", with(r#","source_ip":"fe80::1%eth0""#), Some(BadIp)),
        ("not an address", with(r#","source_ip":"999.1.1.1""#), Some(BadIp)),
        ("a field twice", with(r#","http_status_code":500"#), Some(DuplicateField)),
        (
            "origin twice inside metadata",
            with(r#","metadata":{"origin":"a","origin":"b"}"#),
            Some(DuplicateField),
        ),
        (
            "an unread field twice inside metadata",
            with(r#","metadata":{"tool":"a","tool":"b"}"#),
            None,
        ),
    ]
}

/// `keywatch [global] ingest --format json PATH`: its summary.
fn ingest_json(db: &TestDb, global: &[&str], path: &std::path::Path) -> Value {
    let mut args = global.to_vec();
    args.extend([
        "ingest",
        "--no-progress",
        "--format",
        "json",
        path.to_str().unwrap(),
    ]);
    serde_json::from_str(&kw_ok(db, &args)).unwrap()
}

#[test]
fn hostile_shapes_have_a_defined_meaning() {
    for (what, line, want) in hostile_cases() {
        let got = parse_line(&line);
        assert_eq!(
            got.as_ref().err().map(|e| e.reason),
            want,
            "{what}: {got:?}"
        );
        if let Ok(r) = got {
            if what.contains("IPv4-mapped") {
                assert_eq!(r.source_ip, Some("81.2.69.160".parse().unwrap()), "{what}");
            }
            if what.contains("escaped NUL") {
                assert_eq!(r.user_agent.as_deref(), Some("a\0b"), "{what}");
            }
        }
    }
}

/// The same table through the real binary: every refused line is in the dead-letter table
/// with its reason and line number, every accepted one is counted, and an IPv4-mapped
/// address is the IPv4 address for GeoIP, the key's activity and per-address state.
#[test]
fn hostile_lines_through_the_binary_are_counted_or_kept_with_reason_and_line() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let org = kw_ok(
        &db,
        &["orgs", "create", "--name", "Hostile", "--tier", "pro"],
    );
    kw_ok(&db, &["keys", "create", "--org", org.trim(), "--name", "k"]);
    let key_id = db.query("SELECT id FROM api_keys")[0][0].clone().unwrap();
    let mut log = Vec::new();
    let mut expected_dead: Vec<(u64, String)> = Vec::new();
    let mut accepted = 0u64;
    let mut line_no = 0u64;
    let mut push = |line: &[u8], want: Option<&str>, log: &mut Vec<u8>| {
        line_no += 1;
        log.extend_from_slice(line);
        log.push(b'\n');
        match want {
            Some(r) => expected_dead.push((line_no, r.to_owned())),
            None => accepted += 1,
        }
    };
    for (what, line, want) in hostile_cases() {
        let want = match want {
            None if what.contains("9999") => Some("bad_timestamp"),
            w => w.map(RejectReason::as_str),
        };
        push(&line, want, &mut log);
    }
    // Lines of the key from an IPv4-mapped address and an IPv6 one.
    for ip in ["::ffff:81.2.69.160", "2001:db8::1"] {
        let line = format!(
            r#"{{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"api_key_id":"{key_id}","source_ip":"{ip}"}}"#
        );
        push(line.as_bytes(), None, &mut log);
    }
    // Refused keys from one address written both ways: one address trying 24 prefixes.
    for i in 0..24 {
        let ip = if i % 2 == 0 {
            "203.0.113.9"
        } else {
            "::ffff:203.0.113.9"
        };
        let line = format!(
            r#"{{"created_at":"2026-11-20T12:01:{i:02}Z","http_status_code":401,"key_prefix":"pmcp_01{i:05x}","source_ip":"{ip}"}}"#
        );
        push(line.as_bytes(), None, &mut log);
    }
    let path = db.path("hostile.log");
    std::fs::write(&path, &log).unwrap();
    let geoip = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/geoip/GeoIP2-City-Test.mmdb"
    );
    let v = ingest_json(&db, &["--geoip", geoip], &path);
    assert_eq!(v["data"]["accepted"], accepted, "{v}");
    assert_eq!(v["data"]["rejected"], expected_dead.len() as u64, "{v}");
    let dead: Vec<(u64, String)> = db
        .query("SELECT CAST(line_no AS TEXT), reason, detail FROM kw_dead_letters ORDER BY line_no")
        .into_iter()
        .map(|r| {
            let detail = r[2].clone().unwrap();
            assert!(!detail.is_empty() && !detail.contains('\n'), "{detail}");
            (
                r[0].clone().unwrap().parse().unwrap(),
                r[1].clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(dead, expected_dead);
    assert_eq!(common::total_requests(&db), accepted);

    let activity: BTreeSet<(String, String)> = db
        .query(&format!(
            "SELECT facet, value FROM kw_key_activity WHERE key_id = '{key_id}'"
        ))
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    let has = |facet: &str, value: &str| activity.contains(&(facet.to_owned(), value.to_owned()));
    assert!(
        has("ip", "81.2.69.160") && has("ip", "2001:db8::1"),
        "{activity:?}"
    );
    assert!(
        !activity.iter().any(|(_, v)| v.contains("::ffff:")),
        "{activity:?}"
    );
    assert!(
        has("country", "GB"),
        "the mapped address is located: {activity:?}"
    );

    let alerts = kw_ok(
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
    let alerts: Value = serde_json::from_str(&alerts).unwrap();
    let ips: Vec<&Value> = alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["source_ip"])
        .collect();
    assert_eq!(
        ips,
        ["203.0.113.9"],
        "one address, whichever way it is written: {alerts}"
    );
}

#[test]
fn a_log_of_hostile_lines_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let mut rng = Rng(0xfeed);
    let mut log = Vec::new();
    let n = 5_000;
    for _ in 0..n {
        let mut line = apply(GOOD.as_bytes(), &random_ops(&mut rng));
        line.retain(|&b| b != b'\n');
        if line.iter().all(u8::is_ascii_whitespace) {
            line = b"x".to_vec(); // blank lines are skipped, not counted: keep every line real
        }
        log.extend_from_slice(&line);
        log.push(b'\n');
    }
    let path = db.path("hostile.log");
    std::fs::write(&path, &log).unwrap();
    let v = ingest_json(&db, &[], &path);
    let accepted = v["data"]["accepted"].as_u64().unwrap();
    let rejected = v["data"]["rejected"].as_u64().unwrap();
    assert_eq!(accepted + rejected, n, "{v}");
    assert!(
        accepted > 200 && rejected > 200,
        "both paths exercised: {v}"
    );
    let kept = db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_dead_letters");
    assert_eq!(kept[0][0].as_deref(), Some(rejected.to_string().as_str()));
    let total = db.query("SELECT CAST(SUM(requests) AS TEXT) FROM kw_usage_day");
    assert_eq!(
        total[0][0].as_deref(),
        Some(accepted.to_string().as_str()),
        "every accepted line is counted once"
    );
    let minutes = db.query("SELECT CAST(SUM(requests) AS TEXT) FROM kw_usage_minute");
    assert_eq!(minutes, total);
    assert_eq!(common::total_requests(&db), accepted);
}

/// Starts `keywatch run` following `log`, with `alerts` (the tests' alerts file plus `extra`).
fn follow(db: &TestDb, log: &std::path::Path, extra_alerts: &str) -> (KillOnDrop, String) {
    let alerts = db.path("alerts.toml");
    std::fs::write(
        &alerts,
        format!("{}\n{extra_alerts}", include_str!("data/alerts-test.toml")),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = keywatch()
        .args(["--database-url", &db.url, "run", "--listen", &addr])
        .arg("--alerts")
        .arg(&alerts)
        .arg("--source")
        .arg(format!("file:{}", log.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("keywatch run starts");
    let mut d = KillOnDrop(child);
    common::wait_healthy(&mut d, &addr);
    (d, addr)
}

/// Waits until /metrics shows `lines` lines read (accepted and rejected) and returns the scrape.
fn scrape_when_read(d: &mut KillOnDrop, addr: &str, lines: f64) -> String {
    let mut last = String::new();
    let done = common::wait_until(Duration::from_secs(240), || {
        assert!(d.0.try_wait().unwrap().is_none(), "keywatch stopped");
        last = scrape(addr);
        let read: f64 = last
            .lines()
            .filter(|l| {
                l.starts_with("keywatch_lines_ingested_total{")
                    || l.starts_with("keywatch_lines_rejected_total{")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        read >= lines
    });
    assert!(done, "all {lines} lines read:\n{last}");
    last
}

/// A 256 MiB line without a newline until its end is refused as too long while keywatch
/// holds at most 64 KiB of it, and the line after it is counted.
#[test]
fn an_endless_line_is_refused_in_bounded_memory() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("endless.log");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
        f.write_all(br#"{"created_at":"2026-11-20T12:00:00Z","user_agent":""#)
            .unwrap();
        let chunk = vec![b'A'; 1 << 20];
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\"}\n").unwrap();
        f.write_all(&with("")).unwrap();
        f.write_all(b"\n").unwrap();
    }
    let (mut d, addr) = follow(&db, &log, "");
    let metrics = scrape_when_read(&mut d, &addr, 2.0);
    let peak_mib = d.peak_rss_kib() / 1024;
    let too_long: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("keywatch_lines_rejected_total{") && l.contains("reason=\"too_long\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(too_long, 1.0, "{metrics}");
    assert!(d.terminate().success());
    eprintln!("peak RSS reading a 256 MiB line: {peak_mib} MiB");
    assert!(
        peak_mib < 200,
        "peak RSS {peak_mib} MiB: the line was held in memory"
    );
    assert_eq!(common::total_requests(&db), 1);
    let kept = db.query("SELECT reason, CAST(LENGTH(line) AS TEXT) FROM kw_dead_letters");
    assert_eq!(kept[0][0].as_deref(), Some("too_long"));
    assert!(
        kept[0][1].as_deref().unwrap().parse::<u64>().unwrap() <= 8 * 1024,
        "a dead letter keeps the line's start"
    );
}

/// Distinct MCP names in the flood: twice what /metrics remembers.
const MCP_NAMES: u64 = 20_000;

/// `n` refused-key lines from `first` on: each a new presented prefix and a new address (IPv4
/// and IPv6 in turn), MCP names cycling through [`MCP_NAMES`], one every 5 ms of event time
/// from 12:00.
fn flood(first: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n as usize * 200);
    for i in first..first + n {
        let ms = i * 5;
        let ip = if i % 2 == 0 {
            format!(
                "{}.{}.{}.{}",
                11 + (i >> 24) % 200,
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )
        } else {
            format!("2001:db8::{:x}:{:x}", i >> 16, i & 0xffff)
        };
        out.extend_from_slice(
            format!(
                r#"{{"created_at":"2026-11-20T{:02}:{:02}:{:02}.{:03}Z","http_status_code":401,"key_prefix":"pmcp_01{:05x}","source_ip":"{ip}","mcp_server_name":"mcp-{}","error_code":"unauthorized"}}"#,
                12 + ms / 3_600_000,
                ms / 60_000 % 60,
                ms / 1000 % 60,
                ms % 1000,
                i % 0x10_0000,
                i % MCP_NAMES
            )
            .as_bytes(),
        );
        out.push(b'\n');
    }
    out
}

/// A flood of distinct refused prefixes, addresses and MCP names, meant to exhaust memory:
/// the refused-key detector's state stays within `max_subjects` (evictions counted on
/// /metrics), memory stops growing, and every line is still counted exactly.
#[test]
fn a_flood_of_distinct_prefixes_addresses_and_mcps_is_bounded_and_counted_exactly() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("flood.log");
    // The heap is measured once the bounded caches (SQLite's 64 MiB page cache, the MCP
    // interner, the detector's subjects) have filled, then again after half as many more.
    let (warm, more) = (400_000, 200_000);
    std::fs::write(&log, flood(0, warm)).unwrap();
    let (mut d, addr) = follow(&db, &log, "[detectors.auth]\nmax_subjects = 2000\n");
    let first = scrape_when_read(&mut d, &addr, warm as f64);
    let (peak_warm, anon_warm) = (d.peak_rss_kib(), d.anon_rss_kib());
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&flood(warm, more)).unwrap();
    }
    let total = warm + more;
    let metrics = scrape_when_read(&mut d, &addr, total as f64);
    let (peak, anon) = (d.peak_rss_kib(), d.anon_rss_kib());
    let evicted = |m: &str| {
        common::sample(
            m,
            r#"keywatch_state_evictions_total{state="auth_subjects"}"#,
        )
    };
    let subjects = common::sample(&metrics, r#"keywatch_detection_subjects{detector="auth"}"#);
    let folded = common::sample(
        &metrics,
        r#"keywatch_metrics_series_folded_total{family="mcp"}"#,
    );
    eprintln!(
        "flood: heap {} MiB (peak RSS {} MiB) after {warm} lines, {} MiB ({} MiB) after {total}; database {} MiB; auth subjects {subjects:?}, evictions {:?}, MCPs folded {folded:?}",
        anon_warm / 1024,
        peak_warm / 1024,
        anon / 1024,
        peak / 1024,
        std::fs::metadata(db.path("keywatch.db"))
            .map(|m| m.len() >> 20)
            .unwrap_or(0),
        evicted(&metrics)
    );
    assert!(subjects.is_some_and(|n| n <= 2000.0), "{subjects:?}");
    assert!(
        evicted(&first).is_some_and(|n| n > 0.0),
        "evictions counted: {first}"
    );
    assert!(evicted(&metrics).unwrap() > evicted(&first).unwrap());
    // Each sighting of a name /metrics does not remember is folded into `other` again.
    assert!(folded.is_some_and(|n| n >= 100_000.0), "{folded:?}");
    // The heap: the database file, which grows with every new MCP name, is mapped and its
    // pages count in RSS, but they are the kernel's to drop.
    assert!(
        anon <= anon_warm + anon_warm / 4,
        "memory grew with the flood: {} MiB after {warm} lines, {} MiB after {total}",
        anon_warm / 1024,
        anon / 1024,
    );
    assert!(d.terminate().success());
    assert_eq!(
        common::total_requests(&db),
        total,
        "every line counted once"
    );
}
