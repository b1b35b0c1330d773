//! Property tests (proptest) of everything that parses text from outside: request-log lines,
//! `alerts.toml`, and the command line's durations and `--source` spellings. Each input is a
//! seed of the committed corpus (`tests/data/fuzz/`) with random edits, or random bytes;
//! proptest shrinks a failure to a small input and records its seed in
//! `tests/data/fuzz/regressions.txt`, which is replayed first on every run.
//!
//! The promise checked: no panic, and every refusal is one of the documented reasons with a
//! one-line explanation. Allocation is bounded by the line limit, which is checked here for
//! the parser and in `tests/hostile.rs` for the real binary. `PROPTEST_CASES` raises the
//! number of cases for a longer run (`.ci/run` uses the defaults below).

mod common;

use common::fuzz::{apply, op};
use keywatch::config::AlertsConfig;
use keywatch::event::{MAX_LINE_BYTES, RejectReason, parse_line};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

const LINES: &str = include_str!("data/fuzz/lines.ndjson");

fn line_seeds() -> Vec<&'static [u8]> {
    LINES.lines().map(str::as_bytes).collect()
}

fn alerts_seeds() -> Vec<String> {
    let mut seeds = vec![
        include_str!("../alerts.toml").to_owned(),
        include_str!("data/alerts-test.toml").to_owned(),
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fuzz/alerts");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    seeds.extend(files.iter().map(|p| std::fs::read_to_string(p).unwrap()));
    seeds
}

/// `cases` per property unless `PROPTEST_CASES` says otherwise; failures recorded in the
/// committed regression file.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/data/fuzz/regressions.txt",
        ))),
        ..Config::default()
    }
}

/// What the parser must do with any bytes: accept within the documented ranges, or refuse
/// with a documented reason and a one-line detail.
fn check_line(line: &[u8]) -> Result<(), TestCaseError> {
    match parse_line(line) {
        Ok(r) => {
            prop_assert!((100..=599).contains(&r.http_status_code));
            prop_assert!(r.created_at.timestamp() >= 0);
            if let Some(std::net::IpAddr::V6(v6)) = r.source_ip {
                prop_assert!(v6.to_ipv4_mapped().is_none(), "mapped addresses are IPv4");
            }
        }
        Err(e) => {
            prop_assert!(RejectReason::ALL.contains(&e.reason));
            prop_assert!(
                !e.detail.is_empty() && !e.detail.contains('\n'),
                "{:?}",
                e.detail
            );
            prop_assert!(e.detail.len() < 400, "a short detail: {}", e.detail.len());
            if line.len() > MAX_LINE_BYTES + 1 {
                prop_assert_eq!(e.reason, RejectReason::TooLong);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn mutated_log_lines_are_parsed_or_refused_with_a_reason(
        seed in 0..line_seeds().len(),
        ops in proptest::collection::vec(op(), 1..6),
    ) {
        check_line(&apply(line_seeds()[seed], &ops))?;
    }

    #[test]
    fn random_bytes_are_refused_with_a_reason(line in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_line(&line)?;
    }

    #[test]
    fn durations_and_sources_from_the_command_line_never_panic(s in "\\PC{0,40}") {
        let _ = keywatch::cli::parse_duration(&s);
        if let Err(e) = keywatch::app::SourceSpec::parse(&s) {
            prop_assert!(!e.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(config(1_500))]

    #[test]
    fn mutated_alerts_files_load_or_name_the_line_of_the_mistake(
        seed in 0..alerts_seeds().len(),
        ops in proptest::collection::vec(op(), 1..5),
    ) {
        let seeds = alerts_seeds();
        let text = String::from_utf8_lossy(&apply(seeds[seed].as_bytes(), &ops)).into_owned();
        if let Err(e) = AlertsConfig::parse("alerts.toml", &text) {
            for line in e.to_string().lines() {
                prop_assert!(line.starts_with("alerts.toml: line "), "{}", line);
            }
        }
    }
}

/// Shapes too large for random edits to reach: the parser refuses them without building
/// them up in memory, and the TOML loader without overflowing its stack.
#[test]
fn oversized_and_deeply_nested_inputs_are_refused() {
    let deep_json = format!("{}{}", "[".repeat(60_000), "]".repeat(60_000));
    assert!(deep_json.len() < MAX_LINE_BYTES * 2);
    check_line(deep_json.as_bytes()).unwrap();
    let deep_object = format!(
        r#"{{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"metadata":{}{}}}"#,
        r#"{"a":"#.repeat(12_000),
        "}".repeat(12_000)
    );
    assert_eq!(
        parse_line(deep_object.as_bytes()).unwrap_err().reason,
        RejectReason::TooLong
    );
    let deep_but_short = format!(
        r#"{{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"metadata":{}1{}}}"#,
        r#"{"a":"#.repeat(10_000),
        "}".repeat(10_000)
    );
    assert!(
        parse_line(deep_but_short.as_bytes()).is_ok(),
        "fields keywatch does not read are skipped at any depth"
    );
    let deep_where_read = format!(
        r#"{{"created_at":"2026-11-20T12:00:00Z","http_status_code":200,"user_agent":{}{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    assert_eq!(
        parse_line(deep_where_read.as_bytes()).unwrap_err().reason,
        RejectReason::WrongType
    );
    for deep_toml in [
        format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("a = {}{}", "{b = ".repeat(100_000), "}".repeat(100_000)),
        "[a.".repeat(50_000),
    ] {
        let e = AlertsConfig::parse("alerts.toml", &deep_toml).unwrap_err();
        assert!(e.to_string().starts_with("alerts.toml: line "), "{e}");
    }
}
