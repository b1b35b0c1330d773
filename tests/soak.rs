//! Retention and a soak, through the real binary.
//!
//! - Retention, on SQLite and PostgreSQL: `keywatch run` deletes minute rows older than 7 days,
//!   hour rows older than 90 days and day rows older than 2 years (ages from the newest counted
//!   minute); recent rows stay, and reports of ranges the kept rows cover are unchanged.
//! - Soak: hours of simulated traffic read at full speed by `keywatch run`, its RSS sampled from
//!   /proc: once every key is known, memory stays flat, and minute rows are pruned as it goes.
//!   `KEYWATCH_SOAK_HOURS` and `KEYWATCH_SOAK_LINES` make it longer (CI: 6 h, 300,000 lines).

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::*;
use serde_json::Value;

/// The simulated traffic's end: the newest event time of every test here.
const END: &str = "2026-11-20T12:00:00Z";

fn end() -> DateTime<Utc> {
    END.parse().unwrap()
}

/// `t` as the usage tables store it, and as both back ends compare it.
fn db_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Rows of usage table `g` (minute, hour, day) with a bucket in `[from, until)`.
fn rows(db: &TestDb, g: &str, from: DateTime<Utc>, until: DateTime<Utc>) -> u64 {
    let r = db.query(&format!(
        "SELECT CAST(COUNT(*) AS TEXT) FROM kw_usage_{g} WHERE bucket_start >= '{}' AND bucket_start < '{}'",
        db_time(from),
        db_time(until)
    ));
    r[0][0].as_deref().unwrap().parse().unwrap()
}

fn days(n: i64) -> chrono::Duration {
    chrono::Duration::days(n)
}

/// The templates' lines moved to start at `at`, 7 s apart.
fn moved(templates: &[Value], at: DateTime<Utc>) -> Vec<String> {
    templates
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut v = v.clone();
            let t = at + chrono::Duration::seconds(7 * i as i64);
            v["created_at"] = t
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into();
            v.to_string()
        })
        .collect()
}

fn oracle_of(db: &TestDb, lines: &[String]) -> BTreeMap<Option<String>, Tally> {
    let p = db.path("expected.log");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    oracle(&p).0
}

fn retention_prunes_old_rows_and_keeps_reports(db: TestDb) {
    let log = db.path("simulated.log");
    simulate(
        &db,
        &log,
        &["--keys", "6", "--lines", "2000", "--seed", "81"],
    );
    let recent: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let templates: Vec<Value> = recent[..40]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let t = end();
    // One group of lines per age: past every retention, past the hours', past the minutes',
    // and within all of them.
    let ancient = moved(&templates, t - days(3 * 365));
    let old = moved(&templates, t - days(200));
    let month = moved(&templates, t - days(30));
    let mut all: Vec<String> = [ancient.as_slice(), &old, &month].concat();
    all.extend(recent.iter().cloned());
    let input = db.path("input.log");
    std::fs::write(&input, all.join("\n") + "\n").unwrap();
    kw_ok(&db, &["ingest", "--no-progress", input.to_str().unwrap()]);

    // Ranges the kept rows cover: minutes of the last day, whole hours 30 days back, whole
    // days 200 days back.
    let range = |from: DateTime<Utc>, until: DateTime<Utc>| {
        vec![
            "--from".to_owned(),
            from.to_rfc3339(),
            "--until".to_owned(),
            until.to_rfc3339(),
        ]
    };
    let hour_of = |x: DateTime<Utc>| x - chrono::Duration::seconds(x.timestamp() % 3_600);
    let day_of = |x: DateTime<Utc>| x - chrono::Duration::seconds(x.timestamp() % 86_400);
    let ranges = [
        range(
            t - days(1) + chrono::Duration::minutes(13),
            t + chrono::Duration::minutes(1),
        ),
        range(
            hour_of(t - days(30)) - chrono::Duration::hours(3),
            hour_of(t - days(30)) + chrono::Duration::hours(2),
        ),
        range(
            day_of(t - days(200)) - days(2),
            day_of(t - days(200)) + days(3),
        ),
    ];
    let report = |r: &[String]| {
        let args: Vec<&str> = r.iter().map(String::as_str).collect();
        (
            reported_with(&db, "key", &args),
            reported_with(&db, "org", &args),
        )
    };
    let before: Vec<_> = ranges.iter().map(|r| report(r)).collect();
    for (r, (by_key, _)) in ranges.iter().zip(&before) {
        assert!(
            by_key.values().map(|t| t.requests).sum::<u64>() > 0,
            "the range {r:?} holds requests"
        );
    }
    assert_eq!(reported(&db, "key"), oracle_of(&db, &all));
    let (minute_cut, hour_cut, day_cut) = (t - days(7), t - days(90), t - days(730));
    let far = t - days(5_000);
    assert!(rows(&db, "minute", far, minute_cut) > 0);
    assert!(rows(&db, "hour", far, hour_cut) > 0);
    assert!(rows(&db, "day", far, day_cut) > 0);

    let empty = db.path("empty.log");
    std::fs::write(&empty, "").unwrap();
    let mut d = KillOnDrop(
        keywatch()
            .args(["--database-url", &db.url, "run", "--listen", "127.0.0.1:0"])
            .args(["--source", &format!("file:{}", empty.display())])
            .args(["--retention-interval", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pruned = wait_until(Duration::from_secs(60), || {
        rows(&db, "minute", far, minute_cut) == 0
            && rows(&db, "hour", far, hour_cut) == 0
            && rows(&db, "day", far, day_cut) == 0
    });
    d.signal("TERM");
    assert!(
        d.wait_for(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    assert!(pruned, "rows past their retention are deleted");
    // What the retention keeps stays: this month's minutes, the hours of 30 days ago, the
    // days of 200 days ago.
    assert!(rows(&db, "minute", minute_cut, t + days(1)) > 0);
    assert!(rows(&db, "hour", hour_cut, minute_cut) > 0);
    assert!(rows(&db, "day", day_cut, hour_cut) > 0);
    for (r, want) in ranges.iter().zip(&before) {
        assert_eq!(&report(r), want, "the report of {r:?} is unchanged");
    }
    // All time is answered from day rows: everything but what is older than two years.
    let kept: Vec<String> = [&old, &month, &recent]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    assert_eq!(reported(&db, "key"), oracle_of(&db, &kept));
}

#[test]
fn retention_on_sqlite() {
    retention_prunes_old_rows_and_keeps_reports(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn retention_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        retention_prunes_old_rows_and_keeps_reports(db);
    }
}

#[test]
fn a_retention_reports_need_is_refused_with_the_flag() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    for (args, message) in [
        (
            ["--retain-minute-buckets", "10m"],
            "--retain-minute-buckets 10m is too short",
        ),
        (
            ["--retain-hour-buckets", "3d"],
            "--retain-hour-buckets 3d is shorter than --retain-minute-buckets 7d",
        ),
    ] {
        let out = keywatch()
            .args(["--database-url", &db.url, "run", "--source", "stdin"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(message), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The lines `/metrics` says were read.
fn lines_read(addr: &str) -> Option<u64> {
    let (_, _, body) = get(addr, "/metrics", "text/plain")?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("keywatch_lines_ingested_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the RSS of the second half may add to the RSS at the half, in KiB. Measured (200
/// keys, 6 h, 300,000 lines): on PostgreSQL, +6 MiB at most, with swings of ±5 MiB from the
/// allocator; on SQLite, up to +16 MiB more, which is its page cache filling: each of the
/// pool's 4 connections caches up to 64 MiB of the database file, so SQLite is allowed four
/// times the file's size on top (that memory is bounded by the file, not by time).
fn rss_tolerance_kib(db: &TestDb) -> u64 {
    let base = 16 * 1024;
    match db.backend {
        Backend::Postgres => base,
        Backend::Sqlite => {
            let size = |name: &str| std::fs::metadata(db.path(name)).map_or(0, |m| m.len());
            let file_kib = (size("keywatch.db") + size("keywatch.db-wal")) / 1024;
            base + 4 * file_kib.min(64 * 1024)
        }
    }
}

fn soak(db: TestDb) {
    let hours = env_or("KEYWATCH_SOAK_HOURS", 6);
    let lines = env_or("KEYWATCH_SOAK_LINES", 300_000);
    let log = db.path("soak.log");
    simulate(
        &db,
        &log,
        &[
            "--keys",
            "200",
            "--orgs",
            "50",
            "--days",
            &format!("{}", hours as f64 / 24.0),
            "--lines",
            &lines.to_string(),
            "--seed",
            "91",
        ],
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = KillOnDrop(
        keywatch()
            .args(["--database-url", &db.url, "run", "--listen", &addr])
            .args(["--source", &format!("file:{}", log.display())])
            .args([
                "--retain-minute-buckets",
                "1h",
                "--retention-interval",
                "2s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = d.0.id();
    // (lines read, RSS in KiB), every 200 ms until every line is read.
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let started = Instant::now();
    loop {
        let read = lines_read(&addr).unwrap_or(0);
        if let Some(rss) = rss_kib(pid) {
            samples.push((read, rss));
        }
        if read >= lines {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "read {read} of {lines} lines in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    assert!(
        wait_until(Duration::from_secs(60), || total_requests(&db) == lines),
        "every line committed"
    );
    // A last retention pass after the last commit.
    std::thread::sleep(Duration::from_secs(3));
    d.signal("TERM");
    assert!(
        d.wait_for(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );

    // Every key is known within the first tenth of the log; from the middle on, nothing may
    // grow with time.
    let half: Vec<&(u64, u64)> = samples.iter().filter(|(r, _)| *r >= lines / 2).collect();
    assert!(
        half.len() >= 5,
        "too few samples in the second half: {samples:?}"
    );
    let at_half = half[0].1;
    let peak = half.iter().map(|(_, rss)| *rss).max().unwrap();
    let first_peak = samples.iter().map(|(_, rss)| *rss).max().unwrap();
    eprintln!(
        "soak on {:?}: {lines} lines, {hours} h simulated, read in {took:?}; RSS at half {} MiB, peak of the second half {} MiB (+{} KiB), peak overall {} MiB, {} samples",
        db.backend,
        at_half / 1024,
        peak / 1024,
        peak.saturating_sub(at_half),
        first_peak / 1024,
        samples.len()
    );
    let tolerance_kib = rss_tolerance_kib(&db);
    assert!(
        peak <= at_half + tolerance_kib,
        "RSS grew by {} KiB in the second half (tolerance {tolerance_kib} KiB): {samples:?}",
        peak - at_half
    );
    // Minute rows: only the last hour (and the minute being filled) is left; hour and day
    // rows keep everything, so the totals are exact.
    let buckets =
        db.query("SELECT CAST(COUNT(DISTINCT bucket_start) AS TEXT) FROM kw_usage_minute");
    let minutes: u64 = buckets[0][0].as_deref().unwrap().parse().unwrap();
    assert!(
        minutes <= 62,
        "{minutes} minute buckets kept with --retain-minute-buckets 1h"
    );
    let (by_key, by_org) = oracle(&log);
    assert_eq!(reported(&db, "key"), by_key);
    assert_eq!(reported(&db, "org"), by_org);
}

#[test]
fn soak_on_sqlite() {
    soak(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn soak_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        soak(db);
    }
}
