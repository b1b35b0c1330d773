//! keywatch on a database the auth server created: its migrations add only keywatch's own
//! tables, the auth server's own INSERTs keep working, and usage resolves to the auth
//! server's keys and organizations.

mod common;

use common::*;
use sha2::{Digest, Sha256};

/// The auth server's tables as its own migrations create them: no `status`, no `revoked_at`,
/// and billing columns keywatch knows nothing about.
const AUTH_SERVER_SCHEMA: &str = r#"
CREATE TABLE organizations (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(255) NOT NULL,
    slug VARCHAR(100) NOT NULL UNIQUE,
    subscription_tier VARCHAR(50) NOT NULL DEFAULT 'free',
    stripe_customer_id VARCHAR(255),
    custom_max_requests_monthly BIGINT,
    settings JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE TABLE api_keys (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name VARCHAR(255) NOT NULL,
    key_hash VARCHAR(255) NOT NULL,
    key_prefix VARCHAR(20) NOT NULL,
    scopes JSONB NOT NULL DEFAULT '[]',
    rate_limit_rpm INTEGER NOT NULL DEFAULT 60,
    expires_at TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    request_count BIGINT NOT NULL DEFAULT 0,
    created_by UUID,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    mcp_access_mode VARCHAR(20) NOT NULL DEFAULT 'all',
    allowed_mcp_ids UUID[]
);
CREATE TABLE mcp_instances (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name VARCHAR(255) NOT NULL,
    mcp_type VARCHAR(50) NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'active'
);
"#;

/// A key as the auth server makes one: full key, SHA-256 hash, 20-character prefix.
fn auth_server_key(id: &uuid::Uuid) -> (String, String, String) {
    let random: [u8; 16] = rand::random();
    let sig: [u8; 8] = rand::random();
    let full = format!(
        "pmcp_01{}{}{}",
        id.simple(),
        hex::encode(random),
        hex::encode(sig)
    );
    assert_eq!(full.len(), 87);
    let hash = hex::encode(Sha256::digest(full.as_bytes()));
    let prefix = format!("{}...", &full[..17]);
    (full, hash, prefix)
}

fn line(at: &str, org: Option<&str>, key: Option<&str>, prefix: &str, status: u16) -> String {
    let q = |v: Option<&str>| v.map_or("null".to_owned(), |s| format!("\"{s}\""));
    format!(
        r#"{{"request_id":"{}","created_at":"{at}","organization_id":{},"api_key_id":{},"key_prefix":"{prefix}","mcp_server_name":"github","endpoint_path":"/mcp","http_method":"POST","http_status_code":{status},"latency_ms":12,"request_size_bytes":100,"response_size_bytes":200,"source_ip":"81.2.69.160","user_agent":"plexmcp-python/1.4.0","error_code":null,"rate_limit_hit":false,"quota_exceeded":false,"metadata":{{}}}}"#,
        uuid::Uuid::new_v4(),
        q(org),
        q(key)
    )
}

#[test]
fn postgres_database_created_by_the_auth_server() {
    let Some(db) = TestDb::new(Backend::Postgres) else {
        return;
    };
    db.exec(AUTH_SERVER_SCHEMA);
    let org = uuid::Uuid::new_v4();
    db.exec(&format!(
        "INSERT INTO organizations (id, name, slug, subscription_tier, custom_max_requests_monthly, created_at) \
         VALUES ('{org}', 'Acme', 'acme', 'pro', NULL, '2026-11-01T00:00:00Z')"
    ));
    let (k1, k2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let (_, h1, p1) = auth_server_key(&k1);
    let (_, h2, p2) = auth_server_key(&k2);
    for (id, h, p, name) in [(k1, &h1, &p1, "ci"), (k2, &h2, &p2, "prod")] {
        db.exec(&format!(
            "INSERT INTO api_keys (id, org_id, name, key_hash, key_prefix, scopes, rate_limit_rpm, expires_at, \
             last_used_at, request_count, created_by, created_at, mcp_access_mode, allowed_mcp_ids) VALUES \
             ('{id}', '{org}', '{name}', '{h}', '{p}', '[]', 120, '2027-01-01T00:00:00Z', NULL, 0, NULL, \
             '2026-11-01T00:00:00Z', 'all', NULL)"
        ));
    }
    kw_ok(&db, &["migrate"]);
    // keywatch's tables are there; the auth server's are as they were.
    let tables = db.query(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    );
    let names: Vec<String> = tables.into_iter().filter_map(|r| r[0].clone()).collect();
    for t in [
        "kw_usage_minute",
        "kw_usage_hour",
        "kw_usage_day",
        "kw_checkpoints",
        "kw_dead_letters",
    ] {
        assert!(names.contains(&t.to_owned()), "{t} created: {names:?}");
    }
    assert!(
        !names.contains(&"_sqlx_migrations".to_owned()),
        "keywatch keeps out of sqlx's default table"
    );
    let cols = db.query(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'api_keys' ORDER BY 1",
    );
    let cols: Vec<String> = cols.into_iter().filter_map(|r| r[0].clone()).collect();
    assert!(
        !cols.contains(&"status".to_owned()),
        "api_keys left as the auth server made it"
    );
    assert!(!cols.contains(&"revoked_at".to_owned()));

    let keys = kw_ok(&db, &["keys", "list", "--format", "json"]);
    assert!(keys.contains(&p1) && keys.contains(&p2), "{keys}");

    let log = db.path("auth.log");
    let org_s = org.to_string();
    let lines = [
        line(
            "2026-11-20T10:00:00Z",
            Some(&org_s),
            Some(&k1.to_string()),
            &p1,
            200,
        ),
        line(
            "2026-11-20T10:00:01Z",
            Some(&org_s),
            Some(&k1.to_string()),
            &p1,
            500,
        ),
        line(
            "2026-11-20T10:00:02Z",
            Some(&org_s),
            Some(&k2.to_string()),
            &p2,
            429,
        ),
        // Refused with the id missing: resolved by its presented prefix (first 12 characters).
        line("2026-11-20T10:00:03Z", None, None, &p2[..12], 401),
        // Refused, matching no key.
        line("2026-11-20T10:00:04Z", None, None, "pmcp_01zzzzz", 401),
    ];
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    kw_ok(&db, &["ingest", log.to_str().unwrap()]);
    let by_key = reported(&db, "key");
    assert_eq!(by_key[&Some(k1.to_string())].requests, 2);
    assert_eq!(by_key[&Some(k1.to_string())].server, 1);
    assert_eq!(by_key[&Some(k2.to_string())].requests, 2);
    assert_eq!(by_key[&Some(k2.to_string())].rate_limited, 1);
    assert_eq!(by_key[&Some(k2.to_string())].auth, 1);
    assert_eq!(
        by_key[&None].requests, 1,
        "refused keys matching no key are one group"
    );
    let by_org = reported(&db, "org");
    assert_eq!(by_org[&Some(org_s.clone())].requests, 4);

    let json = kw_ok(
        &db,
        &["report", "usage", "--group-by", "key", "--format", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let row = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key_id"] == k1.to_string())
        .unwrap();
    assert_eq!(row["key_prefix"], p1.as_str());
    assert_eq!(row["key_name"], "ci");
    assert_eq!(row["org_id"], org_s.as_str());
    assert_eq!(row["rate_limit_rpm"], 120);
}

/// The statements the auth server runs, word for word in shape, on keywatch's schema.
fn auth_server_inserts_work(db: TestDb) {
    kw_ok(&db, &["migrate"]);
    let org = uuid::Uuid::new_v4();
    let key = uuid::Uuid::new_v4();
    let (_, hash, prefix) = auth_server_key(&key);
    db.exec(&format!(
        "INSERT INTO organizations (id, name, slug, subscription_tier, custom_max_requests_monthly, created_at) \
         VALUES ('{org}', 'Beta', 'beta', 'team', 300000, '2026-11-12T00:00:00Z')"
    ));
    db.exec(&format!(
        "INSERT INTO api_keys (id, org_id, name, key_hash, key_prefix, scopes, rate_limit_rpm, expires_at, \
         last_used_at, request_count, created_by, created_at, mcp_access_mode, allowed_mcp_ids, status, revoked_at) \
         VALUES ('{key}', '{org}', 'deploy', '{hash}', '{prefix}', '[]', 60, '2026-12-12T00:00:00Z', NULL, 0, NULL, \
         '2026-11-12T00:00:00Z', 'all', NULL, 'active', NULL)"
    ));
    let orgs = kw_ok(&db, &["orgs", "list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&orgs).unwrap();
    let row = &v["data"][0];
    assert_eq!(row["slug"], "beta");
    assert_eq!(
        row["monthly_limit"], "300000",
        "custom limit overrides the tier"
    );
    assert_eq!(row["limit_source"], "custom");
    let keys = kw_ok(&db, &["keys", "list", "--format", "json"]);
    assert!(keys.contains(&prefix), "{keys}");
    assert!(keys.contains("2026-12-12"), "expiry read back: {keys}");
}

#[test]
fn auth_server_inserts_on_sqlite() {
    auth_server_inserts_work(TestDb::new(Backend::Sqlite).unwrap());
}

#[test]
fn auth_server_inserts_on_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres) {
        auth_server_inserts_work(db);
    }
}
