//! Hostile input: the line parser and the alerts.toml loader take anything without panicking,
//! and the real binary ingests a log of hostile lines losing none: each is counted, or refused
//! with its reason and line number.
//!
//! The fuzzing here is a deterministic mutation loop (byte flips, insertions, deletions,
//! splices and truncations of valid seeds), bounded in iterations so that it costs a few
//! seconds in CI and fails the same way on every machine.

mod common;

use common::{Backend, Rng, TestDb, kw_ok};
use keywatch::config::AlertsConfig;
use keywatch::event::{RejectReason, parse_line};

const GOOD: &str = r#"{"request_id":"6f1c0a52-3a6f-4b8e-9d7c-2b1e5f9a0c11","created_at":"2026-11-20T12:00:00.123Z","organization_id":"0b7e3f2a-1c4d-4e5f-8a9b-0c1d2e3f4a5b","api_key_id":"9a41c2e7-f001-4abc-8def-0123456789ab","key_prefix":"pmcp_019a41c2e7f0...","mcp_server_name":"github","endpoint_path":"/mcp","http_method":"POST","http_status_code":200,"latency_ms":42,"request_size_bytes":512,"response_size_bytes":2048,"tokens_used":null,"source_ip":"81.2.69.160","user_agent":"plexmcp-python/1.4.0","error_code":null,"rate_limit_hit":false,"quota_exceeded":false,"metadata":{"tool_name":"search_issues","origin":"https://app.example.com"}}"#;

/// Pieces that make mutations interesting to a JSON parser.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\0",
    b"\xff\xfe",
    b"\xc3\x28",
    b"99999999999999999999999",
    b"-1",
    b"1e308",
    b"NaN",
    b"null",
    b"9999-12-31T23:59:59Z",
    b"1970-01-01T00:00:00Z",
    b"::ffff:81.2.69.160",
    b"2001:db8::1",
    b",\"http_status_code\":500",
    b"pmcp_01",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below_usize(4) {
        let at = rng.below_usize(v.len() + 1);
        match rng.below_usize(5) {
            0 if !v.is_empty() => {
                let i = rng.below_usize(v.len());
                v[i] ^= 1 << rng.below_usize(8);
            }
            1 => {
                let t = TOKENS[rng.below_usize(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            2 if at < v.len() => {
                let end = (at + 1 + rng.below_usize(16)).min(v.len());
                v.drain(at..end);
            }
            3 => v.truncate(at),
            _ => {
                // Splice in a slice of the seed itself (duplicate fields, nesting).
                let a = rng.below_usize(seed.len());
                let b = (a + rng.below_usize(64)).min(seed.len());
                v.splice(at..at, seed[a..b].iter().copied());
            }
        }
    }
    v
}

#[test]
fn the_parser_takes_any_bytes_without_panicking() {
    let mut rng = Rng(0x5eed);
    let seeds: Vec<Vec<u8>> = vec![
        GOOD.as_bytes().to_vec(),
        br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":401,"key_prefix":"pmcp_01abcdef","source_ip":"203.0.113.9"}"#.to_vec(),
    ];
    let (mut ok, mut refused) = (0u32, 0u32);
    for i in 0..200_000 {
        let line = mutate(&mut rng, &seeds[i % seeds.len()]);
        match parse_line(&line) {
            Ok(r) => {
                ok += 1;
                // What was accepted is within the documented ranges.
                assert!((100..=599).contains(&r.http_status_code), "{line:?}");
            }
            Err(e) => {
                refused += 1;
                assert!(RejectReason::ALL.contains(&e.reason));
                assert!(!e.detail.is_empty());
            }
        }
    }
    // The mutations must exercise both paths, or this test proves nothing.
    assert!(
        ok > 1_000 && refused > 1_000,
        "{ok} accepted, {refused} refused"
    );
}

#[test]
fn hostile_shapes_are_refused_or_bounded() {
    let huge = format!(
        r#"{{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"user_agent":"{}"}}"#,
        "A".repeat(70_000)
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(Vec<u8>, Option<RejectReason>)> = vec![
        (huge.into_bytes(), Some(RejectReason::TooLong)),
        (deep.into_bytes(), Some(RejectReason::TooLong)),
        ("[".repeat(5_000).into_bytes(), Some(RejectReason::WrongType)),
        (
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"user_agent":"a\u0000b"}"#.to_vec(),
            None,
        ),
        (
            b"{\"created_at\":\"2026-11-20T12:00:00Z\",\"http_status_code\":200,\"user_agent\":\"\xff\"}".to_vec(),
            Some(RejectReason::InvalidUtf8),
        ),
        (
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":99999999999}"#.to_vec(),
            Some(RejectReason::OutOfRange),
        ),
        (
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"http_status_code":500}"#.to_vec(),
            Some(RejectReason::DuplicateField),
        ),
        (
            br#"{"created_at":"1970-01-01T00:00:00Z","http_status_code":200}"#.to_vec(),
            None,
        ),
        (
            br#"{"created_at":"1026-11-20T12:00:00Z","http_status_code":200}"#.to_vec(),
            Some(RejectReason::BadTimestamp),
        ),
        (
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"source_ip":"::ffff:81.2.69.160"}"#.to_vec(),
            None,
        ),
        (
            br#"{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"source_ip":"999.1.1.1"}"#.to_vec(),
            Some(RejectReason::BadIp),
        ),
    ];
    for (line, want) in cases {
        let got = parse_line(&line).err().map(|e| e.reason);
        assert_eq!(
            got,
            want,
            "{}",
            String::from_utf8_lossy(&line[..line.len().min(120)])
        );
    }
}

#[test]
fn the_alerts_file_loader_takes_any_text_without_panicking() {
    let seed = include_str!("../alerts.toml").to_owned()
        + "\n[[allow]]\norg = \"0b7e3f2a-1c4d-4e5f-8a9b-0c1d2e3f4a5b\"\ncountries = [\"SE\"]\ncidrs = [\"10.0.0.0/8\"]\nexpires = 2027-01-01T00:00:00Z\n";
    let mut rng = Rng(0xc0f1);
    let (mut ok, mut refused) = (0u32, 0u32);
    for _ in 0..3_000 {
        let text = String::from_utf8_lossy(&mutate(&mut rng, seed.as_bytes())).into_owned();
        match AlertsConfig::parse("alerts.toml", &text) {
            Ok(_) => ok += 1,
            Err(e) => {
                refused += 1;
                let msg = e.to_string();
                assert!(msg.starts_with("alerts.toml: line "), "{msg}");
                assert_eq!(msg.lines().count(), 1, "one sentence: {msg}");
            }
        }
    }
    assert!(ok > 50 && refused > 50, "{ok} accepted, {refused} refused");
}

#[test]
fn a_log_of_hostile_lines_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let mut rng = Rng(0xfeed);
    let mut log = Vec::new();
    let n = 5_000;
    for _ in 0..n {
        let mut line = mutate(&mut rng, GOOD.as_bytes());
        line.retain(|&b| b != b'\n');
        if line.iter().all(u8::is_ascii_whitespace) {
            line = b"x".to_vec(); // blank lines are skipped, not counted: keep every line real
        }
        log.extend_from_slice(&line);
        log.push(b'\n');
    }
    let path = db.path("hostile.log");
    std::fs::write(&path, &log).unwrap();
    let out = kw_ok(
        &db,
        &[
            "ingest",
            "--no-progress",
            "--format",
            "json",
            path.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let accepted = v["data"]["accepted"].as_u64().unwrap();
    let rejected = v["data"]["rejected"].as_u64().unwrap();
    assert_eq!(accepted + rejected, n, "{v}");
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
    // And what is counted is what the reports show (no event outside their range).
    assert_eq!(common::total_requests(&db), accepted);
}
