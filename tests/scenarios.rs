//! The detection scenario suite: a labelled week and a half of traffic (see `scenario/`)
//! through the real binary on each back end, scored for recall, false alerts and delay.
//!
//! Each run writes its score to `target/tmp/scenario-<backend>.txt`, which is where the
//! README's detection numbers come from (`cargo test --release --test scenarios -- --nocapture`
//! prints them too).

mod common;
mod scenario;

use std::path::PathBuf;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use common::{Backend, TestDb, block_on, kw, kw_ok};
use keywatch::store::{NewKeyRow, NewOrg, Store};
use scenario::{Scenario, Score, Seen};

const GEOIP: &str = "tests/data/geoip/GeoIP2-City-Test.mmdb";

/// The log, generated once per test process and shared by the back ends.
fn log() -> &'static (Scenario, PathBuf) {
    static LOG: OnceLock<(Scenario, PathBuf)> = OnceLock::new();
    LOG.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("scenario.ndjson");
        let mut s = scenario::scenario();
        scenario::write_log(&mut s, &path).expect("the scenario log is written");
        (s, path)
    })
}

/// Creates the scenario's organizations and keys in `db`, as the auth server would have.
fn load_keys(db: &TestDb, s: &Scenario) {
    block_on(async {
        let store = Store::open(&db.url).await.expect("store opens");
        for o in &s.orgs {
            store
                .insert_org(&NewOrg {
                    id: o.id,
                    name: o.name.to_owned(),
                    slug: o.name.to_lowercase().replace(' ', "-"),
                    tier: o.tier.to_owned(),
                    custom_max_requests_monthly: o.custom_limit,
                    created_at: s.start - chrono::Duration::days(90),
                })
                .await
                .expect("org inserted");
        }
        for k in &s.keys {
            store
                .insert_key(&NewKeyRow {
                    id: k.id,
                    org_id: s.orgs[k.org].id,
                    name: k.name.to_owned(),
                    key_hash: k.hash.clone(),
                    key_prefix: k.prefix.clone(),
                    scopes: vec!["mcp:invoke".into()],
                    rate_limit_rpm: k.rpm_limit,
                    expires_at: k.expires_at,
                    created_at: k.created_at,
                    mcp_access_mode: "all".into(),
                    allowed_mcp_ids: None,
                })
                .await
                .expect("key inserted");
        }
    });
    for k in s.keys.iter().filter(|k| k.revoked_at.is_some()) {
        let at = k.revoked_at.unwrap().to_rfc3339();
        db.exec(&format!(
            "UPDATE api_keys SET status = 'revoked', revoked_at = '{at}' WHERE id = '{}'",
            k.id
        ));
    }
}

fn parse_alerts(json: &str) -> Vec<Seen> {
    let v: serde_json::Value = serde_json::from_str(json).expect("alerts are JSON");
    assert_eq!(v["success"], true, "{json}");
    let time = |x: &serde_json::Value| -> DateTime<Utc> {
        x.as_str().and_then(|s| s.parse().ok()).expect("a time")
    };
    v["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|a| {
            for field in [
                "id",
                "type",
                "severity",
                "status",
                "key_id",
                "key_prefix",
                "org_id",
                "source_ip",
                "started_at",
                "last_seen_at",
                "resolved_at",
                "summary",
                "evidence",
            ] {
                assert!(a.get(field).is_some(), "alert without {field}: {a}");
            }
            Seen {
                id: a["id"].as_str().unwrap().to_owned(),
                alert_type: a["type"].as_str().unwrap().to_owned(),
                severity: a["severity"].as_str().unwrap().to_owned(),
                detected_at: time(&a["detected_at"]),
                summary: a["summary"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

fn report(backend: &str, s: &Scenario, sc: &Score) -> String {
    let mut r = format!(
        "scenario on {backend}: {} lines, {} keys, {:.1} key-days\n",
        s.lines,
        s.keys.len(),
        sc.key_days
    );
    for (name, d) in &sc.detected {
        match d {
            Some(d) => r += &format!("  detected  {name:<20} after {:>5} s\n", d.num_seconds()),
            None => r += &format!("  MISSED    {name}\n"),
        }
    }
    r += &format!(
        "recall {:.3} ({} of {}); false alerts {} = {:.2} per 1000 key-days; median delay {} s; companion alerts {}\n",
        sc.recall(),
        sc.detected.iter().filter(|d| d.1.is_some()).count(),
        sc.detected.len(),
        sc.false_alerts.len(),
        sc.false_per_1000_key_days(),
        sc.median_delay().map_or(-1, |d| d.num_seconds()),
        sc.companions.len()
    );
    for c in &sc.companions {
        r += &format!("  companion {c}\n");
    }
    for f in &sc.false_alerts {
        r += &format!("  FALSE     {f}\n");
    }
    r
}

fn run_scenario(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    let (s, path) = log();
    load_keys(&db, s);
    let path = path.to_str().unwrap();
    kw_ok(
        &db,
        &[
            "--geoip",
            GEOIP,
            "ingest",
            "--no-progress",
            "--alerts",
            "alerts.toml",
            path,
        ],
    );
    let json = kw_ok(
        &db,
        &[
            "report",
            "alerts",
            "--from",
            "2026-11-01T00:00:00Z",
            "--until",
            "2026-12-01T00:00:00Z",
            "--format",
            "json",
        ],
    );
    let alerts = parse_alerts(&json);
    let sc = scenario::score(s, &alerts);
    let name = format!("{backend:?}").to_lowercase();
    let text = report(&name, s, &sc);
    println!("{text}");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("scenario-{name}.txt"));
    std::fs::write(&out, &text).expect("score written");
    assert_eq!(sc.recall(), 1.0, "every incident detected in time:\n{text}");
    assert!(
        sc.false_alerts.is_empty(),
        "decoys and ordinary keys stay quiet:\n{text}"
    );
    // The quota alert carries the threshold it crossed.
    let quota = &s
        .incidents
        .iter()
        .find(|i| i.name == "quota")
        .unwrap()
        .subject;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let q = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"].as_str().unwrap().ends_with(quota.as_str()))
        .expect("a quota alert");
    assert!(q["threshold"].as_f64().is_some(), "{q}");
}

#[test]
fn scenario_on_sqlite() {
    run_scenario(Backend::Sqlite);
}

#[test]
fn scenario_on_postgres() {
    run_scenario(Backend::Postgres);
}

/// `ingest --dry-run` prints the alerts a replay would raise and stores nothing.
#[test]
fn dry_run_prints_the_alerts_and_stores_nothing() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let (s, path) = log();
    load_keys(&db, s);
    let out = kw(
        &db,
        &[
            "--geoip",
            GEOIP,
            "ingest",
            "--dry-run",
            "--format",
            "json",
            path.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alerts = parse_alerts(&String::from_utf8(out.stdout).unwrap());
    let sc = scenario::score(s, &alerts);
    assert_eq!(sc.recall(), 1.0, "{}", report("dry run", s, &sc));
    assert_eq!(
        db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_usage_minute")[0][0].as_deref(),
        Some("0")
    );
    assert_eq!(
        db.query("SELECT CAST(COUNT(*) AS TEXT) FROM kw_alerts")[0][0].as_deref(),
        Some("0")
    );
}
