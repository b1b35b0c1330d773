//! Reading and writing the key tables shared with the auth server.
//!
//! The shared tables have native types in PostgreSQL (uuid, timestamptz, jsonb, uuid[]) and
//! TEXT in SQLite. Reads cast every column to text, which both dialects do the same way, and
//! parse it here; writes bind [`DbUuid`], [`DbTime`] and [`DbUuids`], which encode natively for
//! each back end. Optional columns the auth server's own migrations lack (`status`,
//! `revoked_at`) are detected, never assumed.

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Encode, Postgres, Sqlite, Type};
use uuid::Uuid;

use super::{QueryContext, Store, StoreError, with_pool};
use crate::keys::{KeyCache, KeyInfo, KeySnapshot, OrgInfo};

/// A uuid parameter: `uuid` in PostgreSQL, hyphenated TEXT in SQLite.
pub(crate) struct DbUuid(pub Uuid);
/// A timestamp parameter: `timestamptz` in PostgreSQL, RFC 3339 TEXT with `Z` in SQLite (the
/// form the auth server's own inserts use, so text comparisons order correctly).
pub(crate) struct DbTime(pub DateTime<Utc>);
/// A `uuid[]` parameter: a PostgreSQL array, a JSON array TEXT in SQLite.
pub(crate) struct DbUuids(pub Vec<Uuid>);

impl Type<Sqlite> for DbUuid {
    fn type_info() -> <Sqlite as Database>::TypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}
impl Encode<'_, Sqlite> for DbUuid {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(self.0.hyphenated().to_string(), buf)
    }
}
impl Type<Postgres> for DbUuid {
    fn type_info() -> <Postgres as Database>::TypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }
}
impl Encode<'_, Postgres> for DbUuid {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Type<Sqlite> for DbTime {
    fn type_info() -> <Sqlite as Database>::TypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}
impl Encode<'_, Sqlite> for DbTime {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(sqlite_time(self.0), buf)
    }
}
impl Type<Postgres> for DbTime {
    fn type_info() -> <Postgres as Database>::TypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}
impl Encode<'_, Postgres> for DbTime {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Type<Sqlite> for DbUuids {
    fn type_info() -> <Sqlite as Database>::TypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}
impl Encode<'_, Sqlite> for DbUuids {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        let json = serde_json::to_string(&self.0)?;
        Encode::<Sqlite>::encode(json, buf)
    }
}
impl Type<Postgres> for DbUuids {
    fn type_info() -> <Postgres as Database>::TypeInfo {
        <Vec<Uuid> as Type<Postgres>>::type_info()
    }
}
impl Encode<'_, Postgres> for DbUuids {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

/// The fixed-width text form keywatch writes timestamps in, in SQLite.
pub(crate) fn sqlite_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A new organization, as `keywatch orgs create` and the simulator make them.
#[derive(Debug, Clone)]
pub struct NewOrg {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub tier: String,
    pub custom_max_requests_monthly: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// A new key row: only its hash and prefix, never the key.
#[derive(Debug, Clone)]
pub struct NewKeyRow {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub key_hash: String,
    pub key_prefix: String,
    pub scopes: Vec<String>,
    pub rate_limit_rpm: u32,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub mcp_access_mode: String,
    pub allowed_mcp_ids: Option<Vec<Uuid>>,
}

type OrgRow = (String, String, String, String, Option<i64>);
type KeyRow = (
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
);

impl Store {
    /// Which of the optional `api_keys` columns this database has.
    async fn api_key_columns(&self) -> Result<(bool, bool), StoreError> {
        let sql = match self.dialect() {
            super::Dialect::Sqlite => "SELECT name FROM pragma_table_info('api_keys')",
            super::Dialect::Postgres => {
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'api_keys'"
            }
        };
        let cols: Vec<(String,)> = with_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)
            .context("reading the columns of api_keys")?;
        let has = |c: &str| cols.iter().any(|(n,)| n == c);
        Ok((has("status"), has("revoked_at")))
    }

    /// The SELECT list of a key row, with `'active'` and NULL standing in for the optional
    /// columns a database lacks.
    async fn key_select(&self) -> Result<String, StoreError> {
        let (has_status, has_revoked) = self.api_key_columns().await?;
        Ok(format!(
            "SELECT CAST(id AS TEXT), CAST(org_id AS TEXT), name, key_prefix, rate_limit_rpm, \
             CAST(expires_at AS TEXT), CAST(created_at AS TEXT), mcp_access_mode, \
             CAST(allowed_mcp_ids AS TEXT), {}, {}, CAST(scopes AS TEXT) FROM api_keys",
            if has_status { "status" } else { "'active'" },
            if has_revoked {
                "CAST(revoked_at AS TEXT)"
            } else {
                "CAST(NULL AS TEXT)"
            },
        ))
    }

    /// Loads every organization and key.
    pub async fn load_keys(&self) -> Result<KeySnapshot, StoreError> {
        let orgs: Vec<OrgRow> = with_pool!(self, p => sqlx::query_as(
            "SELECT CAST(id AS TEXT), name, slug, subscription_tier, custom_max_requests_monthly \
             FROM organizations",
        )
        .fetch_all(p)
        .await)
        .context("loading organizations")?;
        let sql = self.key_select().await?;
        let keys: Vec<KeyRow> =
            with_pool!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_all(p)
            .await)
            .context("loading api keys")?;
        let mut snapshot = KeySnapshot::default();
        for (id, name, slug, tier, custom) in orgs {
            snapshot.orgs.push(OrgInfo {
                id: parse_id("organizations.id", &id)?,
                name,
                slug,
                tier,
                custom_max_requests_monthly: custom,
            });
        }
        for row in keys {
            snapshot.keys.push(key_from_row(row)?);
        }
        Ok(snapshot)
    }

    /// The key whose `key_hash` is `hash` (SHA-256 hex of the full key), read now rather than
    /// from the cache, so that a revocation takes effect at the next request.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyInfo>, StoreError> {
        let sql = format!("{} WHERE key_hash = $1", self.key_select().await?);
        let row: Option<KeyRow> =
            with_pool!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
            .bind(hash)
            .fetch_optional(p)
            .await)
            .context("looking up an api key")?;
        row.map(key_from_row).transpose()
    }

    /// The names of the MCP instances among `ids`: what a key limited to those instances may
    /// see in the request log's `mcp_server_name`.
    pub async fn mcp_names(&self, ids: &[Uuid]) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String, String)> = with_pool!(self, p => sqlx::query_as(
            "SELECT CAST(id AS TEXT), name FROM mcp_instances",
        )
        .fetch_all(p)
        .await)
        .context("reading mcp instances")?;
        let mut names: Vec<String> = rows
            .into_iter()
            .filter(|(id, _)| Uuid::try_parse(id).is_ok_and(|u| ids.contains(&u)))
            .map(|(_, name)| name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Loads every organization and key into a fresh key cache, stamped with the wall clock.
    pub async fn key_cache(&self) -> Result<KeyCache, StoreError> {
        Ok(KeyCache::new(self.load_keys().await?, Utc::now()))
    }

    /// Inserts an organization with the auth server's own column list.
    pub async fn insert_org(&self, org: &NewOrg) -> Result<(), StoreError> {
        with_pool!(self, p => sqlx::query(
            "INSERT INTO organizations (id, name, slug, subscription_tier, \
             custom_max_requests_monthly, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(DbUuid(org.id))
        .bind(&org.name)
        .bind(&org.slug)
        .bind(&org.tier)
        .bind(org.custom_max_requests_monthly)
        .bind(DbTime(org.created_at))
        .execute(p)
        .await
        .map(|_| ()))
        .map_err(|e| match e.as_database_error() {
            Some(db) if db.is_unique_violation() => StoreError::Invalid(format!(
                "an organization with slug {:?} already exists; choose another --name",
                org.slug
            )),
            _ => StoreError::Query {
                context: "creating an organization",
                source: e,
            },
        })
    }

    /// Inserts a key (hash and prefix only) with the auth server's own column list.
    pub async fn insert_key(&self, k: &NewKeyRow) -> Result<(), StoreError> {
        with_pool!(self, p => sqlx::query(
            "INSERT INTO api_keys (id, org_id, name, key_hash, key_prefix, scopes, rate_limit_rpm, \
             expires_at, created_at, mcp_access_mode, allowed_mcp_ids) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        )
        .bind(DbUuid(k.id))
        .bind(DbUuid(k.org_id))
        .bind(&k.name)
        .bind(&k.key_hash)
        .bind(&k.key_prefix)
        .bind(sqlx::types::Json(&k.scopes))
        .bind(k.rate_limit_rpm as i32)
        .bind(k.expires_at.map(DbTime))
        .bind(DbTime(k.created_at))
        .bind(&k.mcp_access_mode)
        .bind(k.allowed_mcp_ids.clone().map(DbUuids))
        .execute(p)
        .await
        .map(|_| ()))
        .context("creating an api key")
    }
}

fn key_from_row(row: KeyRow) -> Result<KeyInfo, StoreError> {
    let (id, org_id, name, prefix, rpm, expires, created, mode, allowed, status, revoked, scopes) =
        row;
    Ok(KeyInfo {
        id: parse_id("api_keys.id", &id)?,
        org_id: parse_id("api_keys.org_id", &org_id)?,
        name,
        prefix,
        rate_limit_rpm: rpm.max(1) as u32,
        expires_at: parse_time_opt(expires.as_deref()),
        created_at: parse_time_opt(created.as_deref()),
        status,
        revoked_at: parse_time_opt(revoked.as_deref()),
        mcp_access_mode: mode,
        allowed_mcp_ids: parse_uuid_list(allowed.as_deref()),
        scopes: scopes
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
    })
}

fn parse_id(column: &str, s: &str) -> Result<Uuid, StoreError> {
    Uuid::try_parse(s)
        .map_err(|_| StoreError::Invalid(format!("{column} holds {s:?}, which is not a UUID")))
}

fn parse_time_opt(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| crate::event::parse_timestamp(s).ok())
}

/// Parses `uuid[]` as PostgreSQL prints it (`{a,b}`) or as JSON (`["a","b"]`).
fn parse_uuid_list(s: Option<&str>) -> Vec<Uuid> {
    let Some(s) = s else { return Vec::new() };
    s.trim_matches(|c| matches!(c, '{' | '}' | '[' | ']'))
        .split(',')
        .filter_map(|part| Uuid::try_parse(part.trim().trim_matches('"')).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_lists_in_both_dialects() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        assert_eq!(parse_uuid_list(Some(&format!("{{{a},{b}}}"))), vec![a, b]);
        assert_eq!(
            parse_uuid_list(Some(&format!("[\"{a}\", \"{b}\"]"))),
            vec![a, b]
        );
        assert!(parse_uuid_list(Some("[]")).is_empty());
        assert!(parse_uuid_list(None).is_empty());
    }
}
