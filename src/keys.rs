//! The key schema shared with the auth server: key format, hashing and prefixes, plan limits,
//! and the in-memory cache that resolves a log line to its key and organization.
//!
//! Owns what a PlexMCP key looks like and what a key or organization is allowed. It does no
//! I/O: the store loads rows and hands them over as [`KeySnapshot`]. A full key never leaves
//! [`PresentedKey`] or [`NewKey`] except through their explicit accessors.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "pmcp_";
/// Length of a full key: `pmcp_` + 66 payload + 16 signature characters.
pub const KEY_LEN: usize = 87;
/// The key format version the auth server writes first in the payload.
const FORMAT_VERSION: &str = "01";
/// Length of the stored `key_prefix`: the first 17 characters and `...`.
pub const STORED_PREFIX_LEN: usize = 20;

type HmacSha256 = hmac::Hmac<Sha256>;

/// SHA-256 hex of a full key: the `key_hash` column.
pub fn hash_key(full_key: &str) -> String {
    hex::encode(Sha256::digest(full_key.as_bytes()))
}

/// The stored `key_prefix` of a full key: first 17 characters and `...`.
pub fn stored_prefix(full_key: &str) -> String {
    let head: String = full_key.chars().take(STORED_PREFIX_LEN - 3).collect();
    format!("{head}...")
}

/// The 16-hex signature of a payload under the auth server's HMAC secret.
fn signature(payload: &str, secret: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(payload.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..8])
}

/// A freshly made key. The full key is available exactly once, through [`NewKey::reveal`].
pub struct NewKey {
    pub id: Uuid,
    full: String,
    pub hash: String,
    pub prefix: String,
}

impl NewKey {
    /// Makes a key in the auth server's format for key id `id`. With the auth server's HMAC
    /// secret the signature verifies there; without one it is random and only the hash
    /// lookup can accept the key.
    pub fn generate(id: Uuid, hmac_secret: Option<&[u8]>) -> NewKey {
        let random: [u8; 16] = rand::random();
        let payload = format!("{FORMAT_VERSION}{}{}", id.simple(), hex::encode(random));
        let sig = match hmac_secret {
            Some(secret) => signature(&payload, secret),
            None => hex::encode(rand::random::<[u8; 8]>()),
        };
        let full = format!("{KEY_PREFIX}{payload}{sig}");
        NewKey {
            id,
            hash: hash_key(&full),
            prefix: stored_prefix(&full),
            full,
        }
    }

    /// The full key, to be shown once to whoever asked for it.
    pub fn reveal(&self) -> &str {
        &self.full
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Why a presented key was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with \"pmcp_\"")]
    Prefix,
    #[error("the key is not 87 characters long")]
    Length,
    #[error("the key is not lowercase hex after \"pmcp_\"")]
    NotHex,
    #[error("the key's format version is not 01")]
    Version,
}

/// A key as a client presented it, already checked for format. `Debug` shows only its prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey(String);

impl PresentedKey {
    /// Checks the format: prefix, length, lowercase hex, version.
    pub fn parse(s: &str) -> Result<PresentedKey, KeyFormatError> {
        let rest = s.strip_prefix(KEY_PREFIX).ok_or(KeyFormatError::Prefix)?;
        if s.len() != KEY_LEN {
            return Err(KeyFormatError::Length);
        }
        if !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(KeyFormatError::NotHex);
        }
        if !rest.starts_with(FORMAT_VERSION) {
            return Err(KeyFormatError::Version);
        }
        Ok(PresentedKey(s.to_owned()))
    }

    /// Whether the signature verifies under `secret`, compared in constant time.
    pub fn signature_valid(&self, secret: &[u8]) -> bool {
        let (payload, sig) = self.0[KEY_PREFIX.len()..].split_at(66);
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(payload.as_bytes());
        mac.verify_truncated_left(&sig).is_ok()
    }

    /// The key id embedded in the payload.
    pub fn embedded_id(&self) -> Option<Uuid> {
        Uuid::try_parse(&self.0[KEY_PREFIX.len() + 2..KEY_PREFIX.len() + 34]).ok()
    }

    pub fn hash(&self) -> String {
        hash_key(&self.0)
    }

    pub fn prefix(&self) -> String {
        stored_prefix(&self.0)
    }
}

impl fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey({})", self.prefix())
    }
}

/// Replaces every full or partial key (`pmcp_` followed by 24 or more hex characters) in
/// `text` with its stored prefix and a marker, so that nothing keywatch writes can leak one.
/// Returns `None` when there was nothing to redact.
pub fn redact_keys(text: &str) -> Option<String> {
    const MIN_SECRET_HEX: usize = 24;
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut search = 0;
    while let Some(pos) = memchr::memmem::find(&bytes[search..], KEY_PREFIX.as_bytes()) {
        let start = search + pos;
        let hex_start = start + KEY_PREFIX.len();
        let hex_len = bytes[hex_start..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        search = hex_start + hex_len;
        if hex_len < MIN_SECRET_HEX {
            continue;
        }
        let o = out.get_or_insert_with(String::new);
        o.push_str(&text[copied..start]);
        o.push_str(&text[start..hex_start + (STORED_PREFIX_LEN - 3 - KEY_PREFIX.len())]);
        o.push_str("...[redacted]");
        copied = search;
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// A subscription tier and the monthly request limit it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Free,
    Pro,
    Team,
    Enterprise,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Free, Tier::Pro, Tier::Team, Tier::Enterprise];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Team => "team",
            Tier::Enterprise => "enterprise",
        }
    }

    /// Parses a `subscription_tier` value.
    pub fn parse(s: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Requests per calendar month; `None` is unlimited.
    pub fn monthly_requests(self) -> Option<u64> {
        match self {
            Tier::Free => Some(1_000),
            Tier::Pro => Some(50_000),
            Tier::Team => Some(250_000),
            Tier::Enterprise => None,
        }
    }
}

/// Where an organization's monthly limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    Tier,
    Custom,
}

/// An organization as keywatch needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgInfo {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    /// The stored tier text; an unrecognised one is kept as written and has no tier limit.
    pub tier: String,
    pub custom_max_requests_monthly: Option<i64>,
}

impl OrgInfo {
    /// The monthly request limit and where it comes from; `None` for unlimited.
    pub fn monthly_limit(&self) -> (Option<u64>, LimitSource) {
        match self.custom_max_requests_monthly {
            Some(n) => (Some(n.max(0) as u64), LimitSource::Custom),
            None => (
                Tier::parse(&self.tier).and_then(Tier::monthly_requests),
                LimitSource::Tier,
            ),
        }
    }
}

/// A key as keywatch needs it: never the secret, only its prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub rate_limit_rpm: u32,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    /// `active`, or another value that refuses the key. `active` where the column is absent.
    pub status: String,
    pub revoked_at: Option<DateTime<Utc>>,
    pub mcp_access_mode: String,
    pub allowed_mcp_ids: Vec<Uuid>,
    pub scopes: Vec<String>,
}

/// Everything the store loaded in one refresh.
#[derive(Debug, Default, Clone)]
pub struct KeySnapshot {
    pub orgs: Vec<OrgInfo>,
    pub keys: Vec<KeyInfo>,
}

/// The result of resolving a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The key, when the line names one (by id, or by an unambiguous prefix).
    pub key_id: Option<Uuid>,
    /// The organization: the key's, else the one on the line.
    pub org_id: Option<Uuid>,
    /// Whether the key is in the key tables (false for a deleted or never-seen key).
    pub known: bool,
}

/// Organizations and keys by id and by prefix, rebuilt whole at each refresh.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: HashMap<Uuid, Arc<KeyInfo>>,
    orgs: HashMap<Uuid, Arc<OrgInfo>>,
    /// Stored prefix (without `...`) to key id; `None` where two keys share it.
    by_prefix: BTreeMap<String, Option<Uuid>>,
    loaded_at: Option<DateTime<Utc>>,
}

impl KeyCache {
    /// Builds the cache from a snapshot loaded at `loaded_at` (wall clock).
    pub fn new(snapshot: KeySnapshot, loaded_at: DateTime<Utc>) -> KeyCache {
        // Sorted once and built in bulk: inserting a million random prefixes one at a time
        // took about 2 s of a start-up with 1,000,000 keys, the B-tree searched at each one.
        let mut heads: Vec<(&str, Uuid)> = snapshot
            .keys
            .iter()
            .map(|k| (k.prefix.trim_end_matches("..."), k.id))
            .collect();
        heads.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let by_prefix = heads
            .chunk_by(|a, b| a.0 == b.0)
            .map(|same| (same[0].0.to_owned(), (same.len() == 1).then_some(same[0].1)))
            .collect();
        KeyCache {
            keys: snapshot
                .keys
                .into_iter()
                .map(|k| (k.id, Arc::new(k)))
                .collect(),
            orgs: snapshot
                .orgs
                .into_iter()
                .map(|o| (o.id, Arc::new(o)))
                .collect(),
            by_prefix,
            loaded_at: Some(loaded_at),
        }
    }

    pub fn key(&self, id: &Uuid) -> Option<&Arc<KeyInfo>> {
        self.keys.get(id)
    }

    pub fn org(&self, id: &Uuid) -> Option<&Arc<OrgInfo>> {
        self.orgs.get(id)
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyInfo>> {
        self.keys.values()
    }

    pub fn orgs(&self) -> impl Iterator<Item = &Arc<OrgInfo>> {
        self.orgs.values()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn org_count(&self) -> usize {
        self.orgs.len()
    }

    pub fn loaded_at(&self) -> Option<DateTime<Utc>> {
        self.loaded_at
    }

    /// Finds the one key whose stored prefix starts with `presented` (a 12-character refused
    /// prefix or a full 20-character stored one); `None` when none or several match.
    pub fn key_by_prefix(&self, presented: &str) -> Option<Uuid> {
        let head = presented.trim_end_matches("...");
        if head.len() < 8 || !head.starts_with(KEY_PREFIX) {
            return None;
        }
        let mut range = self
            .by_prefix
            .range(head.to_owned()..)
            .take_while(|(p, _)| p.starts_with(head));
        match (range.next(), range.next()) {
            (Some((_, id)), None) => *id,
            _ => None,
        }
    }

    /// Resolves a line to its key and organization: by `api_key_id`, else by prefix.
    pub fn resolve(
        &self,
        api_key_id: Option<Uuid>,
        key_prefix: Option<&str>,
        organization_id: Option<Uuid>,
    ) -> Resolved {
        let key_id = api_key_id.or_else(|| key_prefix.and_then(|p| self.key_by_prefix(p)));
        match key_id.and_then(|id| self.keys.get(&id)) {
            Some(k) => Resolved {
                key_id,
                org_id: Some(k.org_id),
                known: true,
            },
            None => Resolved {
                key_id,
                org_id: organization_id,
                known: false,
            },
        }
    }
}

#[cfg(test)]
impl KeyInfo {
    /// An active key with the auth server's defaults, for tests.
    pub(crate) fn for_test(id: Uuid, org_id: Uuid, prefix: &str, rate_limit_rpm: u32) -> KeyInfo {
        KeyInfo {
            id,
            org_id,
            name: "k".into(),
            prefix: prefix.into(),
            rate_limit_rpm,
            expires_at: None,
            created_at: None,
            status: "active".into(),
            revoked_at: None,
            mcp_access_mode: "all".into(),
            allowed_mcp_ids: vec![],
            scopes: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_has_the_auth_server_format() {
        let id = Uuid::new_v4();
        let k = NewKey::generate(id, Some(b"0123456789abcdef0123456789abcdef"));
        let full = k.reveal();
        assert_eq!(full.len(), KEY_LEN);
        assert!(full.starts_with("pmcp_01"));
        assert_eq!(k.prefix.len(), STORED_PREFIX_LEN);
        assert_eq!(k.prefix, format!("{}...", &full[..17]));
        assert_eq!(k.hash, hex::encode(Sha256::digest(full.as_bytes())));
        let p = PresentedKey::parse(full).unwrap();
        assert!(p.signature_valid(b"0123456789abcdef0123456789abcdef"));
        assert!(!p.signature_valid(b"another secret that is long enough!!"));
        assert_eq!(p.embedded_id(), Some(id));
        assert!(!format!("{p:?}").contains(&full[20..]));
        assert!(!format!("{k:?}").contains(&full[20..]));
    }

    #[test]
    fn presented_key_format_errors() {
        let k = NewKey::generate(Uuid::new_v4(), None);
        let full = k.reveal();
        assert_eq!(PresentedKey::parse(&full[1..]), Err(KeyFormatError::Prefix));
        assert_eq!(
            PresentedKey::parse(&full[..86]),
            Err(KeyFormatError::Length)
        );
        let upper = format!("pmcp_{}", full[5..].to_uppercase());
        assert_eq!(PresentedKey::parse(&upper), Err(KeyFormatError::NotHex));
        let v2 = format!("pmcp_02{}", &full[7..]);
        assert_eq!(PresentedKey::parse(&v2), Err(KeyFormatError::Version));
    }

    #[test]
    fn redaction_keeps_only_the_prefix() {
        let k = NewKey::generate(Uuid::new_v4(), None);
        let text = format!("ua=curl key={} end", k.reveal());
        let red = redact_keys(&text).unwrap();
        assert_eq!(
            red,
            format!("ua=curl key={}...[redacted] end", &k.reveal()[..17])
        );
        assert_eq!(redact_keys("pmcp_019a41c2e7f0... is a prefix"), None);
    }

    #[test]
    fn limits_come_from_tier_or_custom() {
        let mut org = OrgInfo {
            id: Uuid::new_v4(),
            name: "a".into(),
            slug: "a".into(),
            tier: "pro".into(),
            custom_max_requests_monthly: None,
        };
        assert_eq!(org.monthly_limit(), (Some(50_000), LimitSource::Tier));
        org.tier = "enterprise".into();
        assert_eq!(org.monthly_limit(), (None, LimitSource::Tier));
        org.custom_max_requests_monthly = Some(7);
        assert_eq!(org.monthly_limit(), (Some(7), LimitSource::Custom));
    }

    fn key(prefix: &str, org: Uuid) -> KeyInfo {
        KeyInfo::for_test(Uuid::new_v4(), org, prefix, 60)
    }

    #[test]
    fn resolves_by_id_then_by_unambiguous_prefix() {
        let org = Uuid::new_v4();
        let a = key("pmcp_01aaaaa1111...", org);
        let b = key("pmcp_01bbbbb1111...", org);
        let c = key("pmcp_01bbbbb2222...", org);
        // Two keys with one stored prefix: neither is found by it.
        let d = key("pmcp_01ddddd3333...", org);
        let e = key("pmcp_01ddddd3333...", org);
        let (aid, bid) = (a.id, b.id);
        let cache = KeyCache::new(
            KeySnapshot {
                orgs: vec![],
                keys: vec![e, a, b, d, c],
            },
            Utc::now(),
        );
        assert_eq!(cache.resolve(Some(bid), None, None).key_id, Some(bid));
        assert_eq!(cache.key_by_prefix("pmcp_01aaaaa"), Some(aid));
        assert_eq!(cache.key_by_prefix("pmcp_01aaaaa1111..."), Some(aid));
        assert_eq!(cache.key_by_prefix("pmcp_01bbbbb"), None, "ambiguous");
        assert_eq!(cache.key_by_prefix("pmcp_01bbbbb1111..."), Some(bid));
        assert_eq!(cache.key_by_prefix("pmcp_01ccccc"), None);
        assert_eq!(cache.key_by_prefix("pmcp_01ddddd3333..."), None, "shared");
        assert_eq!(cache.key_by_prefix("pmcp_01ddddd"), None, "shared");
        let r = cache.resolve(None, Some("pmcp_01aaaaa"), None);
        assert_eq!(
            r,
            Resolved {
                key_id: Some(aid),
                org_id: Some(org),
                known: true
            }
        );
        let other_org = Uuid::new_v4();
        let unknown = cache.resolve(None, Some("pmcp_01zzzzz"), Some(other_org));
        assert_eq!(unknown.key_id, None);
        assert_eq!(unknown.org_id, Some(other_org));
    }
}
