//! Allowlists: countries, networks (ASNs) and address ranges known to be good for a key, an
//! organization or every key, each with an optional expiry, that keep the location detectors
//! quiet about them.
//!
//! Owns what a rule says and whether a request matches one. It does not read `alerts.toml` or
//! the database: the configuration stage builds the rules, and alerts marked benign teach the
//! location detector directly (see [`super::location::LocationDetector::learn_country`]).
//! Expiry is judged on event time, like everything else in detection, so a replay of last
//! month's log is judged with the rules as they stood then.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::Observation;

/// One known-good pattern (`[[allow]]` in `alerts.toml`). A rule with neither `key` nor
/// `org` applies to every key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllowRule {
    /// The key it applies to.
    pub key: Option<Uuid>,
    /// The organization whose keys it applies to.
    pub org: Option<Uuid>,
    /// ISO country codes (two letters, any case).
    pub countries: Vec<String>,
    /// Autonomous system numbers (networks), where an ASN database is configured.
    pub asns: Vec<u32>,
    /// Address ranges, such as `"10.20.0.0/16"` or `"2001:db8::/32"`.
    pub cidrs: Vec<Cidr>,
    /// After this instant (event time) the rule no longer applies.
    #[serde(deserialize_with = "instant")]
    pub expires: Option<DateTime<Utc>>,
    /// Why the pattern is good: shown in logs and kept for the next person reading the file.
    pub reason: String,
}

/// An RFC 3339 instant, written either as a string or as a bare TOML date-time (which the
/// `toml` crate hands to serde as a one-entry table holding its text).
fn instant<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Toml(std::collections::BTreeMap<String, String>),
    }
    let text = match Written::deserialize(d)? {
        Written::Text(t) => t,
        Written::Toml(m) => m.into_values().next().unwrap_or_default(),
    };
    DateTime::parse_from_rfc3339(&text)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not a date and time with a zone: write it like 2027-06-30T00:00:00Z"
            ))
        })
}

/// An address range: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

/// Why a text is not a CIDR range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an address range: write an address and a prefix length, like \"10.0.0.0/8\" or \"2001:db8::/32\""
)]
pub struct BadCidr(pub String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
            None => (s, if s.contains(':') { 128 } else { 32 }),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Cidr { net, len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl Cidr {
    /// Whether `ip` is inside the range. IPv4-mapped IPv6 addresses match IPv4 ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.len),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.len),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let whole = usize::from(len / 8);
    let rest = len % 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

impl AllowRule {
    /// Whether the rule covers the request: it applies to the request's key or organization
    /// (or to every key), has not expired at the request's event time, and names the
    /// request's country, network or address.
    pub fn matches(&self, obs: &Observation) -> bool {
        let applies = match (self.key, self.org) {
            (None, None) => true,
            (k, o) => (k.is_some() && k == obs.key_id) || (o.is_some() && o == obs.org_id),
        };
        if !applies || self.expires.is_some_and(|e| obs.at > e) {
            return false;
        }
        let country = obs.country.is_some_and(|c| {
            self.countries
                .iter()
                .any(|x| x.as_bytes().eq_ignore_ascii_case(&c))
        });
        let asn = obs.asn.is_some_and(|a| self.asns.contains(&a));
        let cidr = obs
            .source_ip
            .is_some_and(|ip| self.cidrs.iter().any(|c| c.contains(ip)));
        country || asn || cidr
    }

    /// The first thing wrong with the rule, as `(setting, what it must be)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(c) = self
            .countries
            .iter()
            .find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err((
                "countries",
                format!("{c:?} is not a country code: use two letters, like \"GB\""),
            ));
        }
        if self.countries.is_empty() && self.asns.is_empty() && self.cidrs.is_empty() {
            return Err((
                "countries",
                "the rule allows nothing: give at least one of countries, asns or cidrs".into(),
            ));
        }
        Ok(())
    }
}

/// Every allow rule, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allowlist {
    rules: Vec<AllowRule>,
}

impl Allowlist {
    /// An allowlist of `rules`.
    pub fn new(rules: Vec<AllowRule>) -> Allowlist {
        Allowlist { rules }
    }

    /// The reason of the first rule that covers the request, if any.
    pub fn allows(&self, obs: &Observation) -> Option<&str> {
        // Most deployments have no rules: the common case costs one length check.
        if self.rules.is_empty() {
            return None;
        }
        self.rules
            .iter()
            .find(|r| r.matches(obs))
            .map(|r| r.reason.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ok, t};
    use super::*;

    #[test]
    fn cidrs_parse_and_match_at_their_edges() {
        let c: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(c.contains("10.20.255.1".parse().unwrap()));
        assert!(!c.contains("10.21.0.0".parse().unwrap()));
        assert!(c.contains("::ffff:10.20.1.1".parse().unwrap()));
        let odd: Cidr = "192.168.0.0/23".parse().unwrap();
        assert!(odd.contains("192.168.1.200".parse().unwrap()));
        assert!(!odd.contains("192.168.2.0".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let host: Cidr = "8.8.8.8".parse().unwrap();
        assert_eq!(host.to_string(), "8.8.8.8/32");
        for bad in ["10.0.0.0/33", "10.0.0/8", "", "::/129", "x/1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rule_covers_its_key_or_org_until_it_expires() {
        let key = Uuid::from_u128(7);
        let mut o = ok(t("2026-11-20T12:00:00Z"), key);
        o.country = Some(*b"SE");
        let rule = AllowRule {
            key: Some(key),
            countries: vec!["se".into()],
            expires: Some(t("2026-12-01T00:00:00Z")),
            reason: "office in Linköping".into(),
            ..AllowRule::default()
        };
        let list = Allowlist::new(vec![rule.clone()]);
        assert_eq!(list.allows(&o), Some("office in Linköping"));
        o.at = t("2026-12-02T00:00:00Z");
        assert_eq!(list.allows(&o), None, "expired");
        o.at = t("2026-11-20T12:00:00Z");
        o.key_id = Some(Uuid::from_u128(8));
        assert_eq!(list.allows(&o), None, "another key");
        let org_rule = AllowRule {
            key: None,
            org: o.org_id,
            ..rule
        };
        assert!(Allowlist::new(vec![org_rule]).allows(&o).is_some());
    }

    #[test]
    fn a_rule_that_allows_nothing_or_a_bad_country_is_refused() {
        assert!(AllowRule::default().check().is_err());
        let r = AllowRule {
            countries: vec!["GBR".into()],
            ..AllowRule::default()
        };
        assert_eq!(r.check().unwrap_err().0, "countries");
    }
}
