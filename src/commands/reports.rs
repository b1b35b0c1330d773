//! `keywatch report limits|activity|hygiene`: the flags resolved into the same questions the
//! HTTP API asks [`crate::report`], and the answers printed as a table, JSON (the API's
//! `data`, in the same envelope) or CSV.
//!
//! Owns only resolution and layout; every number comes from the shared query layer.

use anyhow::anyhow;
use chrono::{Duration, Utc};
use serde_json::json;

use super::{Range, find_key, find_org, group_digits, print_rows, resolve_range, short_time};
use crate::cli::{ActivityArgs, Format, OrgReportArgs};
use crate::report::{self, KeyFilter};
use crate::store::{ActivityRow, Store};

/// Without a range, activity covers this many days up to now.
const DEFAULT_ACTIVITY_DAYS: i64 = 7;

fn num(n: u64, format: Format) -> String {
    if format == Format::Table {
        group_digits(n)
    } else {
        n.to_string()
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or(String::new(), |p| format!("{p:.1}%"))
}

pub(super) async fn limits(store: &Store, args: &OrgReportArgs) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let org = args
        .org
        .as_deref()
        .map(|o| find_org(&cache, o))
        .transpose()?;
    let l = report::limits::limits(store, &cache, org, None, Utc::now()).await?;
    if args.format == Format::Json {
        println!("{}", json!({"success": true, "data": l}));
        return Ok(());
    }
    let f = args.format;
    let orgs: Vec<Vec<String>> = l
        .organizations
        .iter()
        .map(|o| {
            vec![
                o.org_name.clone(),
                o.tier.clone(),
                num(o.month_to_date, f),
                o.monthly_limit.map_or("unlimited".into(), |n| num(n, f)),
                format!("{:?}", o.limit_source).to_lowercase(),
                pct(o.percent_used),
                o.forecast_limit_at.map(short_time).unwrap_or_default(),
            ]
        })
        .collect();
    print_rows(
        &[
            "organization",
            "tier",
            "month_to_date",
            "monthly_limit",
            "source",
            "used",
            "limit_reached_at",
        ],
        &orgs,
        f,
    )?;
    println!();
    let keys: Vec<Vec<String>> = l
        .keys
        .iter()
        .map(|k| {
            vec![
                k.key_prefix.clone(),
                k.key_name.clone(),
                num(k.peak_rpm, f),
                num(u64::from(k.rate_limit_rpm), f),
                pct(Some(k.percent_of_rpm)),
                num(k.rate_limited, f),
            ]
        })
        .collect();
    print_rows(
        &[
            "key_prefix",
            "key_name",
            "peak_rpm",
            "rpm_limit",
            "of_limit",
            "429s",
        ],
        &keys,
        f,
    )
}

pub(super) async fn activity(store: &Store, args: &ActivityArgs) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let KeyFilter::Id(key) = find_key(&cache, &args.key)? else {
        return Err(anyhow!("--key needs one key's id or prefix"));
    };
    let now = Utc::now();
    let r = &args.range;
    let (from, until) = if r.since.is_none() && r.from.is_none() && r.until.is_none() {
        (now - Duration::days(DEFAULT_ACTIVITY_DAYS), now)
    } else {
        let Range { from, until, .. } = resolve_range(r, now)?;
        (from, until.min(now))
    };
    let a = report::activity::activity(store, &cache, key, None, from, until).await?;
    if args.format == Format::Json {
        println!("{}", json!({"success": true, "data": a}));
        return Ok(());
    }
    let f = args.format;
    let mut rows: Vec<Vec<String>> = a
        .mcps
        .iter()
        .map(|m| {
            let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            let e = &m["errors"];
            vec![
                "mcp".to_owned(),
                m["mcp"].as_str().unwrap_or("").to_owned(),
                num(n(&m["requests"]), f),
                format!(
                    "auth {} · 429 {} · 4xx {} · 5xx {}",
                    n(&e["auth"]),
                    n(&e["rate_limited"]),
                    n(&e["client"]),
                    n(&e["server"])
                ),
                String::new(),
                String::new(),
            ]
        })
        .collect();
    let facet = |name: &str, list: &[ActivityRow]| -> Vec<Vec<String>> {
        list.iter()
            .map(|r| {
                vec![
                    name.to_owned(),
                    r.value.clone(),
                    num(r.requests, f),
                    String::new(),
                    short_time(r.first_seen),
                    short_time(r.last_seen),
                ]
            })
            .collect()
    };
    for (name, list) in [
        ("country", &a.countries),
        ("city", &a.cities),
        ("network", &a.networks),
        ("ip", &a.ips),
        ("user_agent", &a.user_agents),
    ] {
        rows.extend(facet(name, list));
    }
    if f == Format::Table {
        eprintln!(
            "Key {} ({}): {} requests from {} to {}.",
            a.key_prefix.as_deref().unwrap_or("?"),
            a.key_name.as_deref().unwrap_or("?"),
            group_digits(a.requests),
            short_time(from),
            short_time(until)
        );
    }
    print_rows(
        &[
            "what",
            "value",
            "requests",
            "errors",
            "first_seen",
            "last_seen",
        ],
        &rows,
        f,
    )
}

pub(super) async fn hygiene(store: &Store, args: &OrgReportArgs) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let org = args
        .org
        .as_deref()
        .map(|o| find_org(&cache, o))
        .transpose()?;
    let found = report::hygiene::hygiene(store, &cache, org, Utc::now()).await?;
    if args.format == Format::Json {
        println!("{}", json!({"success": true, "data": found}));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|h| {
            vec![
                h.key_prefix.clone(),
                h.key_name.clone(),
                h.check.to_owned(),
                h.detail.clone(),
            ]
        })
        .collect();
    print_rows(
        &["key_prefix", "key_name", "check", "detail"],
        &rows,
        args.format,
    )
}
