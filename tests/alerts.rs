//! Acting on alerts and configuring detection, through the real binary: marking an alert
//! benign teaches the key its place across restarts, allowlists in alerts.toml keep a known
//! place quiet, and a bad alerts.toml is refused with its line.

mod common;

use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use common::{Backend, TestDb, block_on, kw, kw_ok};
use keywatch::keys::NewKey;
use keywatch::store::{NewKeyRow, NewOrg, Store};
use uuid::Uuid;

const GEOIP: &str = "tests/data/geoip/GeoIP2-City-Test.mmdb";
const ORG: Uuid = Uuid::from_u128(0x5c3e_0000_0000_4000_8000_0000_0000_00a1);
const KEY: Uuid = Uuid::from_u128(0x5c3e_0000_0000_4000_8000_0000_0000_0001);

fn setup(db: &TestDb) -> String {
    let k = NewKey::generate(KEY, None);
    block_on(async {
        let store = Store::open(&db.url).await.unwrap();
        store
            .insert_org(&NewOrg {
                id: ORG,
                name: "Acme".into(),
                slug: "acme".into(),
                tier: "team".into(),
                custom_max_requests_monthly: None,
                created_at: "2026-10-01T00:00:00Z".parse().unwrap(),
            })
            .await
            .unwrap();
        store
            .insert_key(&NewKeyRow {
                id: KEY,
                org_id: ORG,
                name: "laptop".into(),
                key_hash: k.hash.clone(),
                key_prefix: k.prefix.clone(),
                scopes: vec![],
                rate_limit_rpm: 600,
                expires_at: None,
                created_at: "2026-10-01T00:00:00Z".parse().unwrap(),
                mcp_access_mode: "all".into(),
                allowed_mcp_ids: None,
            })
            .await
            .unwrap();
    });
    k.prefix
}

/// Two days of London, one request an hour, then, three hours later (slow enough not to be
/// impossible travel), one request from Linköping.
fn write_visit(path: &Path, prefix: &str, from: DateTime<Utc>) {
    let mut f = std::fs::File::create(path).unwrap();
    let line = |at: DateTime<Utc>, ip: &str| {
        format!(
            r#"{{"created_at":"{}","organization_id":"{ORG}","api_key_id":"{KEY}","key_prefix":"{prefix}","mcp_server_name":"github","http_status_code":200,"latency_ms":40,"source_ip":"{ip}","user_agent":"plexmcp-python/1.4.0"}}"#,
            at.to_rfc3339()
        )
    };
    for h in 0..48 {
        writeln!(f, "{}", line(from + Duration::hours(h), "81.2.69.160")).unwrap();
    }
    writeln!(f, "{}", line(from + Duration::hours(50), "89.160.20.112")).unwrap();
}

fn alerts(db: &TestDb) -> Vec<serde_json::Value> {
    let out = kw_ok(
        db,
        &[
            "report",
            "alerts",
            "--from",
            "2026-01-01T00:00:00Z",
            "--until",
            "2027-01-01T00:00:00Z",
            "--format",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["data"].as_array().unwrap().clone()
}

fn ingest(db: &TestDb, file: &Path, alerts_toml: &str) {
    kw_ok(
        db,
        &[
            "--geoip",
            GEOIP,
            "ingest",
            "--no-progress",
            "--alerts",
            alerts_toml,
            file.to_str().unwrap(),
        ],
    );
}

#[test]
fn an_alert_marked_benign_teaches_the_key_its_country() {
    for db in common::backends() {
        let prefix = setup(&db);
        let first = db.path("week1.ndjson");
        write_visit(&first, &prefix, "2026-11-02T00:00:00Z".parse().unwrap());
        ingest(&db, &first, "alerts.toml");
        let a = alerts(&db);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0]["type"], "new_country");
        assert_eq!(a[0]["evidence"]["country"], "SE");
        let id = a[0]["id"].as_str().unwrap().to_owned();

        let out = kw(&db, &["alert", "benign", "no-such-alert"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("there is no alert"), "{err}");
        kw_ok(
            &db,
            &["alert", "benign", &id, "--reason", "our Linköping office"],
        );

        // A week later (a new process, the old episode long over, and what the detectors
        // learned lost): the same visit again. The benign mark alone has taught the key
        // Sweden, so nothing new is raised and the alert stays benign.
        db.exec("DELETE FROM kw_detector_state");
        let second = db.path("week2.ndjson");
        write_visit(&second, &prefix, "2026-11-09T00:00:00Z".parse().unwrap());
        ingest(&db, &second, "alerts.toml");
        let a = alerts(&db);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0]["status"], "benign", "{a:?}");
        assert_eq!(
            db.query("SELECT note FROM kw_alerts")[0][0].as_deref(),
            Some("our Linköping office")
        );
    }
}

#[test]
fn an_unmarked_alert_fires_again_on_the_next_visit() {
    // The control for the test above: without the benign mark (and with the detectors'
    // saved state lost) the second visit is news.
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let prefix = setup(&db);
    let first = db.path("week1.ndjson");
    write_visit(&first, &prefix, "2026-11-02T00:00:00Z".parse().unwrap());
    ingest(&db, &first, "alerts.toml");
    db.exec("DELETE FROM kw_detector_state");
    let second = db.path("week2.ndjson");
    write_visit(&second, &prefix, "2026-11-09T00:00:00Z".parse().unwrap());
    ingest(&db, &second, "alerts.toml");
    let a = alerts(&db);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["status"], "firing");
    assert!(
        a[0]["detected_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-11T02"),
        "{a:?}"
    );
}

#[test]
fn an_allowlisted_country_raises_nothing() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let prefix = setup(&db);
    let log = db.path("visit.ndjson");
    write_visit(&log, &prefix, "2026-11-02T00:00:00Z".parse().unwrap());
    let toml = db.path("alerts.toml");
    std::fs::write(
        &toml,
        format!(
            "[[allow]]\norg = \"{ORG}\"\ncountries = [\"SE\"]\nreason = \"Linköping office\"\n"
        ),
    )
    .unwrap();
    kw_ok(&db, &["check-config", toml.to_str().unwrap()]);
    ingest(&db, &log, toml.to_str().unwrap());
    assert!(alerts(&db).is_empty());
}

#[test]
fn a_bad_alerts_file_is_refused_with_its_line_and_nothing_is_ingested() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let prefix = setup(&db);
    let log = db.path("visit.ndjson");
    write_visit(&log, &prefix, "2026-11-02T00:00:00Z".parse().unwrap());
    let toml = db.path("alerts.toml");
    std::fs::write(&toml, "[detectors.rate]\n\nwindow_minutes = 90\n").unwrap();
    for args in [
        vec!["check-config", toml.to_str().unwrap()],
        vec![
            "ingest",
            "--alerts",
            toml.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    ] {
        let out = kw(&db, &args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("line 3, column 18: rate.window_minutes must be from 1 to 30, not 90"),
            "{err}"
        );
        assert!(
            !err.contains("panicked") && err.lines().count() <= 2,
            "{err}"
        );
    }
    assert_eq!(
        db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_usage_minute")[0][0].as_deref(),
        Some("0")
    );
}

/// `per_minute(i)` requests in each minute `i` from `from`, spread over the minute.
fn write_rate(
    path: &Path,
    prefix: &str,
    from: DateTime<Utc>,
    minutes: i64,
    per_minute: impl Fn(i64) -> u64,
) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..minutes {
        let n = per_minute(i);
        for j in 0..n {
            let at = from + Duration::minutes(i) + Duration::milliseconds((j * 60_000 / n) as i64);
            writeln!(
                f,
                r#"{{"created_at":"{}","organization_id":"{ORG}","api_key_id":"{KEY}","key_prefix":"{prefix}","mcp_server_name":"github","http_status_code":200,"latency_ms":40,"source_ip":"81.2.69.160"}}"#,
                at.to_rfc3339()
            )
            .unwrap();
        }
    }
}

#[test]
fn what_the_detectors_learned_survives_a_restart() {
    // Eight days at a steady 10 requests a minute, ingested by one process; then a second
    // process sees an hour of the same and a fivefold spike. Only a detector that kept its
    // baseline (a week of history) can call that a spike: a fresh one is still warming up.
    let start: DateTime<Utc> = "2026-11-02T00:00:00Z".parse().unwrap();
    let mut raised = Vec::new();
    for keep_state in [true, false] {
        let db = TestDb::new(Backend::Sqlite).unwrap();
        let prefix = setup(&db);
        let week = db.path("week.ndjson");
        write_rate(&week, &prefix, start, 8 * 1440, |_| 10);
        ingest(&db, &week, "alerts.toml");
        assert_eq!(
            db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_detector_state")[0][0].as_deref(),
            Some("2"),
            "rate and location state saved"
        );
        if !keep_state {
            db.exec("DELETE FROM kw_detector_state");
        }
        let next = db.path("next.ndjson");
        write_rate(&next, &prefix, start + Duration::days(8), 80, |i| {
            if i >= 60 { 50 } else { 10 }
        });
        ingest(&db, &next, "alerts.toml");
        raised.push(
            alerts(&db)
                .iter()
                .filter(|a| a["id"] == format!("rate_spike/key:{KEY}").as_str())
                .count(),
        );
    }
    assert_eq!(raised, [1, 0], "with the saved state, and without");
}
