//! A key's activity over a window: where it was used from (countries, cities, networks,
//! IPs, user agents, each with first and last seen and requests), which MCPs it used, and
//! its errors by class.
//!
//! Owns the shape of the activity report. MCPs and errors come from [`super::usage`] (the
//! usage report's numbers); the places come from the bounded activity table, at day
//! resolution (a window covers the whole days it overlaps).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{GroupBy, KeyFilter, UsageQuery};
use crate::activity::Facet;
use crate::keys::KeyCache;
use crate::store::{ActivityRow, Store, StoreError};
use crate::usage::Counters;

/// The activity report of one key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyActivity {
    pub key_id: Uuid,
    pub key_prefix: Option<String>,
    pub key_name: Option<String>,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub requests: u64,
    pub errors: Value,
    /// Per MCP: requests and errors.
    pub mcps: Vec<Value>,
    pub countries: Vec<ActivityRow>,
    pub cities: Vec<ActivityRow>,
    pub networks: Vec<ActivityRow>,
    pub ips: Vec<ActivityRow>,
    pub user_agents: Vec<ActivityRow>,
}

fn errors(c: &Counters) -> Value {
    json!({
        "auth": c.err_auth,
        "rate_limited": c.err_rate_limited,
        "client": c.err_client,
        "server": c.err_server,
    })
}

/// The activity of `key_id` in `[from, until)`, its MCPs limited to `mcps` when given.
pub async fn activity(
    store: &Store,
    cache: &KeyCache,
    key_id: Uuid,
    mcps: Option<Vec<String>>,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<KeyActivity, StoreError> {
    let q = UsageQuery {
        key: Some(KeyFilter::Id(key_id)),
        mcps,
        from,
        until,
        group_by: GroupBy::Mcp,
        ..UsageQuery::all_time(until)
    };
    let rows = super::usage(store, cache, &q).await?;
    let mut total = Counters::default();
    let mut per_mcp = Vec::with_capacity(rows.len());
    for r in &rows {
        total.merge(&r.counters);
        per_mcp.push(json!({
            "mcp": r.mcp,
            "requests": r.counters.requests,
            "errors": errors(&r.counters),
        }));
    }
    let mut places = store.key_activity(key_id, from, until).await?;
    let mut take = |f: Facet| -> Vec<ActivityRow> {
        let (mine, rest) = std::mem::take(&mut places)
            .into_iter()
            .partition(|r| r.facet == f.as_str());
        places = rest;
        mine
    };
    let key = cache.key(&key_id);
    Ok(KeyActivity {
        key_id,
        key_prefix: key.map(|k| k.prefix.clone()),
        key_name: key.map(|k| k.name.clone()),
        from,
        until,
        requests: total.requests,
        errors: errors(&total),
        mcps: per_mcp,
        countries: take(Facet::Country),
        cities: take(Facet::City),
        networks: take(Facet::Network),
        ips: take(Facet::Ip),
        user_agents: take(Facet::UserAgent),
    })
}
