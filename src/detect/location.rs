//! `new_country`, `new_network` and `impossible_travel`, per key, from the GeoIP fields the
//! caller put on each observation.
//!
//! Owns each key's learned places (countries, cities, networks) and its last located request,
//! and the great-circle arithmetic. It does not look addresses up: GeoIP is the caller's.
//!
//! A key learns silently until it has both enough requests and enough hours of history
//! (default 20 and 24 h), so a key used from three regions from the first day has all three
//! as known places. Impossible travel needs the new place to be *unknown* to the key as well
//! as too far to reach in time: two known regions used in turn are concurrent use, not travel.

use std::collections::HashMap;
use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::allow::Allowlist;
use super::{
    AlertType, Context, Detector, Episodes, Evidence, Finding, Observation, Severity, Subject,
    country_str, fnv1a,
};

/// Mean Earth radius, km.
const EARTH_RADIUS_KM: f64 = 6371.0;
/// Places kept per key; beyond these a key is used from so many places that "new" means little.
const MAX_COUNTRIES: usize = 32;
const MAX_CITIES: usize = 64;
const MAX_NETWORKS: usize = 64;

/// Settings of the location detectors; defaults are issue 3's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocationSettings {
    /// Raise `new_country`.
    pub new_country: bool,
    /// Off by default: keys used from laptops change networks all the time.
    pub new_network: bool,
    /// Raise `impossible_travel`.
    pub impossible_travel: bool,
    /// Requests with a location a key needs before it is judged.
    pub learning_requests: u32,
    /// And hours of history.
    pub learning_hours: u32,
    /// Fastest plausible travel.
    pub max_speed_kmh: f64,
    /// Accuracy assumed where GeoIP gives a point without a radius.
    pub default_accuracy_km: f64,
    /// A country another key of the same organization uses lowers `new_country` to low.
    pub org_places_lower_severity: bool,
    /// How long a location episode stays open after its last evidence.
    pub recovery_hours: u32,
}

impl Default for LocationSettings {
    fn default() -> LocationSettings {
        LocationSettings {
            new_country: true,
            new_network: false,
            impossible_travel: true,
            learning_requests: 20,
            learning_hours: 24,
            max_speed_kmh: 805.0,
            default_accuracy_km: 50.0,
            org_places_lower_severity: true,
            recovery_hours: 24,
        }
    }
}

/// Great-circle distance in km between two (latitude, longitude) points in degrees.
pub fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// The speed in km/h that travelling between two fixes needs, after giving both the benefit
/// of their accuracy radii; infinite when the distance is positive and the time is zero.
pub fn travel_speed_kmh(distance_km: f64, acc_a_km: f64, acc_b_km: f64, secs: i64) -> f64 {
    let d = (distance_km - acc_a_km.max(0.0) - acc_b_km.max(0.0)).max(0.0);
    if d == 0.0 {
        return 0.0;
    }
    let hours = secs.unsigned_abs() as f64 / 3600.0;
    if hours == 0.0 {
        f64::INFINITY
    } else {
        d / hours
    }
}

/// Whether an address can carry a location at all: private, loopback, link-local, CGNAT,
/// documentation and unspecified addresses are "unknown" and never alert.
pub fn is_routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_routable(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Fix {
    at: DateTime<Utc>,
    lat_lon: (f64, f64),
    accuracy_km: f64,
    country: [u8; 2],
}

/// What one key has learned. Memory: up to 32 × 2 B countries, 64 × 8 B city hashes,
/// 64 × 4 B networks, one 48 B fix and ~40 B of scalars: at most about 0.9 KB, typically
/// under 100 B.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Places {
    first_at: DateTime<Utc>,
    located: u32,
    countries: Vec<[u8; 2]>,
    cities: Vec<u64>,
    networks: Vec<u32>,
    last: Option<Fix>,
}

fn push_bounded<T: PartialEq>(v: &mut Vec<T>, x: T, cap: usize) -> bool {
    if v.contains(&x) {
        return false;
    }
    if v.len() < cap {
        v.push(x);
    }
    true
}

/// Detects new countries, new networks and impossible travel. See the module documentation.
#[derive(Debug)]
pub struct LocationDetector {
    s: LocationSettings,
    keys: HashMap<Uuid, Places>,
    /// Countries each organization's keys have used: a place a colleague's key uses is less
    /// suspicious.
    org_countries: HashMap<Uuid, Vec<[u8; 2]>>,
    /// Known-good places: learned like any other, never alerted.
    allow: Allowlist,
    episodes: Episodes,
}

impl LocationDetector {
    /// A detector with settings `s` and no history.
    pub fn new(s: LocationSettings) -> LocationDetector {
        let episodes = Episodes::new(
            Duration::hours(i64::from(s.recovery_hours)),
            Duration::hours(1),
        );
        LocationDetector {
            s,
            keys: HashMap::new(),
            org_countries: HashMap::new(),
            allow: Allowlist::default(),
            episodes,
        }
    }

    /// The learned places, as JSON (see [`super::Detectors::save_state`]).
    pub fn save_state(&self) -> String {
        let mut keys: Vec<(&Uuid, &Places)> = self.keys.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let mut orgs: Vec<(&Uuid, &Vec<[u8; 2]>)> = self.org_countries.iter().collect();
        orgs.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::to_string(&(keys, orgs)).unwrap_or_default()
    }

    /// Takes back [`LocationDetector::save_state`]'s output; countries taught before it
    /// (alerts marked benign) are added to what is restored.
    pub fn restore_state(&mut self, json: &str) -> Result<(), serde_json::Error> {
        type Saved = (Vec<(Uuid, Places)>, Vec<(Uuid, Vec<[u8; 2]>)>);
        let (keys, orgs): Saved = serde_json::from_str(json)?;
        for (k, mut p) in keys {
            if let Some(taught) = self.keys.remove(&k) {
                for c in taught.countries {
                    push_bounded(&mut p.countries, c, MAX_COUNTRIES);
                }
            }
            self.keys.insert(k, p);
        }
        for (o, cs) in orgs {
            let v = self.org_countries.entry(o).or_default();
            for c in cs {
                push_bounded(v, c, MAX_COUNTRIES);
            }
        }
        Ok(())
    }

    /// The same detector, quiet about the places `allow` covers.
    pub fn with_allowlist(mut self, allow: Allowlist) -> LocationDetector {
        self.allow = allow;
        self
    }

    /// Replaces the allowlist (alerts.toml reloaded): it applies from the next event on.
    pub fn set_allowlist(&mut self, allow: Allowlist) {
        self.allow = allow;
    }

    /// Teaches a key a country (an alert marked benign, an allowlist).
    pub fn learn_country(&mut self, key: Uuid, at: DateTime<Utc>, country: [u8; 2]) {
        let p = self.keys.entry(key).or_insert_with(|| Places::new(at));
        push_bounded(&mut p.countries, country, MAX_COUNTRIES);
    }
}

impl Places {
    fn new(at: DateTime<Utc>) -> Places {
        Places {
            first_at: at,
            located: 0,
            countries: Vec::new(),
            cities: Vec::new(),
            networks: Vec::new(),
            last: None,
        }
    }
}

impl Detector for LocationDetector {
    fn observe(&mut self, obs: &Observation, ctx: &Context<'_>) -> Vec<Finding> {
        let mut out = Vec::new();
        let (Some(key), Some(ip), Some(country)) = (obs.key_id, obs.source_ip, obs.country) else {
            return out;
        };
        if !is_routable(ip) {
            return out;
        }
        let org = ctx.key.map(|k| k.org_id).or(obs.org_id);
        let places = self.keys.entry(key).or_insert_with(|| Places::new(obs.at));
        let learning = {
            let p: &Places = places;
            p.located < self.s.learning_requests
                || obs.at - p.first_at < Duration::hours(i64::from(self.s.learning_hours))
        };
        places.located = places.located.saturating_add(1);
        let city = obs.city.as_deref().map(|c| fnv1a(c.as_bytes()));
        let new_country = push_bounded(&mut places.countries, country, MAX_COUNTRIES);
        let new_city = city.is_some_and(|c| push_bounded(&mut places.cities, c, MAX_CITIES));
        let new_network = obs
            .asn
            .is_some_and(|a| push_bounded(&mut places.networks, a, MAX_NETWORKS));
        let fix = obs.lat_lon.map(|ll| Fix {
            at: obs.at,
            lat_lon: ll,
            accuracy_km: obs.accuracy_km.unwrap_or(self.s.default_accuracy_km),
            country,
        });
        let prev = places.last;
        if let Some(f) = fix
            && prev.is_none_or(|p| f.at >= p.at)
        {
            places.last = Some(f);
        }
        let known_to_org = org.is_some_and(|o| {
            self.org_countries
                .get(&o)
                .is_some_and(|v| v.contains(&country))
        });
        if let Some(o) = org {
            push_bounded(
                self.org_countries.entry(o).or_default(),
                country,
                MAX_COUNTRIES,
            );
        }
        if learning || self.allow.allows(obs).is_some() {
            return out;
        }
        let subject = Subject::Key(key);
        let cc = country_str(country);
        let place = match &obs.city {
            Some(c) => format!("{c}, {cc}"),
            None => cc.clone(),
        };
        let who = obs.key_prefix.clone().unwrap_or_else(|| key.to_string());
        if new_country && self.s.new_country {
            let severity = if known_to_org && self.s.org_places_lower_severity {
                Severity::Low
            } else {
                Severity::Medium
            };
            let ev = Evidence {
                observed: 1.0,
                method: "country never seen for this key after its learning period",
                samples: u64::from(places_count(&self.keys, key)),
                top: vec![(cc.clone(), 1), (ip.to_string(), 1)],
                country: Some(cc.clone()),
                ..Evidence::default()
            };
            let summary = format!(
                "Key {who} was used from {place} ({ip}), a country it had never been used from{}.",
                if known_to_org {
                    " (other keys of its organization use it)"
                } else {
                    ""
                }
            );
            let f = Finding::new(
                AlertType::NewCountry,
                severity,
                subject.clone(),
                obs.at,
                summary,
                ev,
            );
            out.extend(self.episodes.raise(f.about(obs)));
        } else if new_network && !new_country && self.s.new_network {
            let asn = obs.asn.unwrap_or(0);
            let ev = Evidence {
                observed: f64::from(asn),
                method: "network (ASN) never seen for this key in a known country",
                top: vec![(format!("AS{asn}"), 1), (ip.to_string(), 1)],
                ..Evidence::default()
            };
            let summary =
                format!("Key {who} was used from a new network, AS{asn} ({ip}) in {place}.");
            let f = Finding::new(
                AlertType::NewNetwork,
                Severity::Low,
                subject.clone(),
                obs.at,
                summary,
                ev,
            );
            out.extend(self.episodes.raise(f.about(obs)));
        }
        let unknown_place = new_country || new_city;
        if let (true, true, Some(f), Some(p)) = (self.s.impossible_travel, unknown_place, fix, prev)
        {
            let dist = haversine_km(p.lat_lon, f.lat_lon);
            let secs = (f.at - p.at).num_seconds();
            let speed = travel_speed_kmh(dist, p.accuracy_km, f.accuracy_km, secs);
            if speed > self.s.max_speed_kmh {
                let ev = Evidence {
                    observed: speed.min(1e9),
                    threshold: Some(self.s.max_speed_kmh),
                    method: "great-circle distance minus both accuracy radii over the time between",
                    window_secs: secs.unsigned_abs(),
                    samples: 2,
                    top: vec![
                        (country_str(p.country), 1),
                        (cc.clone(), 1),
                        (ip.to_string(), 1),
                    ],
                    country: Some(cc.clone()),
                    ..Evidence::default()
                };
                let summary = format!(
                    "Key {who} was used from {place} {:.0} km from its previous request {} minutes earlier, which would need {} km/h.",
                    dist,
                    secs.abs() / 60,
                    if speed.is_finite() {
                        format!("{speed:.0}")
                    } else {
                        "infinite".to_owned()
                    }
                );
                let f = Finding::new(
                    AlertType::ImpossibleTravel,
                    Severity::High,
                    subject.clone(),
                    obs.at,
                    summary,
                    ev,
                );
                out.extend(self.episodes.raise(f.about(obs)));
            }
        }
        out
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<Finding> {
        self.episodes.sweep(now)
    }
}

fn places_count(keys: &HashMap<Uuid, Places>, key: Uuid) -> u32 {
    keys.get(&key).map_or(0, |p| p.located)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    const LONDON: (f64, f64) = (51.5142, -0.0931);
    const LINKOPING: (f64, f64) = (58.4167, 15.6167);
    const CHANGCHUN: (f64, f64) = (43.88, 125.3228);
    const MILTON: (f64, f64) = (47.2513, -122.3149);

    fn at_place(
        at: DateTime<Utc>,
        key: Uuid,
        ip: &str,
        cc: &str,
        city: &str,
        ll: (f64, f64),
    ) -> Observation {
        let mut o = ok(at, key);
        o.source_ip = Some(ip.parse().unwrap());
        o.country = Some([cc.as_bytes()[0], cc.as_bytes()[1]]);
        o.city = Some(city.into());
        o.lat_lon = Some(ll);
        o.accuracy_km = Some(20.0);
        o
    }

    #[test]
    fn haversine_and_speed_at_the_edges() {
        assert_eq!(haversine_km(LONDON, LONDON), 0.0);
        let d = haversine_km(LONDON, LINKOPING);
        assert!((1200.0..1300.0).contains(&d), "{d}");
        let anti = haversine_km((0.0, 0.0), (0.0, 180.0));
        assert!((anti - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6);
        // Same instant, far apart: infinite; within the radii: no travel at all.
        assert_eq!(travel_speed_kmh(1000.0, 10.0, 10.0, 0), f64::INFINITY);
        assert_eq!(travel_speed_kmh(15.0, 10.0, 10.0, 0), 0.0);
        // The clock going backwards: the time between is what matters.
        assert_eq!(travel_speed_kmh(1000.0, 0.0, 0.0, -3600), 1000.0);
    }

    #[test]
    fn private_and_loopback_are_unknown() {
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "192.168.0.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_routable(ip.parse().unwrap()), "{ip}");
        }
        assert!(is_routable("81.2.69.160".parse().unwrap()));
        assert!(is_routable("2a02:2770::21a:4aff:fe00:1".parse().unwrap()));
    }

    fn learn_london(d: &mut LocationDetector, key: Uuid, t0: DateTime<Utc>) {
        let ctx = Context::default();
        for i in 0..30 {
            let o = at_place(
                t0 + Duration::hours(i),
                key,
                "81.2.69.160",
                "GB",
                "London",
                LONDON,
            );
            assert!(d.observe(&o, &ctx).is_empty());
        }
    }

    #[test]
    fn a_new_country_after_learning_fires_and_a_jump_is_impossible_travel() {
        let mut d = LocationDetector::new(LocationSettings::default());
        let key = Uuid::from_u128(1);
        let t0 = t("2026-11-01T00:00:00Z");
        learn_london(&mut d, key, t0);
        let t1 = t0 + Duration::hours(29) + Duration::minutes(30);
        let o = at_place(t1, key, "175.16.199.1", "CN", "Changchun", CHANGCHUN);
        let out = d.observe(&o, &Context::default());
        let types: Vec<_> = out.iter().map(|f| f.alert_type).collect();
        assert_eq!(types, [AlertType::NewCountry, AlertType::ImpossibleTravel]);
        assert!(out.iter().all(|f| f.subject == Subject::Key(key)));
        assert!(
            out[0].summary.contains("Changchun, CN"),
            "{}",
            out[0].summary
        );
        // Back in London, then Changchun again: both known now, so nothing new.
        let o = at_place(
            t1 + Duration::minutes(1),
            key,
            "81.2.69.160",
            "GB",
            "London",
            LONDON,
        );
        assert!(d.observe(&o, &Context::default()).is_empty());
        assert_eq!(d.tick(t1 + Duration::hours(25)).len(), 2, "both resolve");
    }

    #[test]
    fn an_allowlisted_country_is_learned_without_an_alert() {
        let key = Uuid::from_u128(1);
        let rule = super::super::allow::AllowRule {
            key: Some(key),
            countries: vec!["CN".into()],
            reason: "the Changchun office".into(),
            ..Default::default()
        };
        let mut d = LocationDetector::new(LocationSettings::default())
            .with_allowlist(Allowlist::new(vec![rule]));
        let t0 = t("2026-11-01T00:00:00Z");
        learn_london(&mut d, key, t0);
        let t1 = t0 + Duration::hours(30);
        let o = at_place(t1, key, "175.16.199.1", "CN", "Changchun", CHANGCHUN);
        assert!(d.observe(&o, &Context::default()).is_empty());
        // Another key of no rule still alerts on the same jump.
        let other = Uuid::from_u128(2);
        learn_london(&mut d, other, t0);
        let o = at_place(t1, other, "175.16.199.1", "CN", "Changchun", CHANGCHUN);
        assert!(!d.observe(&o, &Context::default()).is_empty());
    }

    #[test]
    fn a_key_used_from_three_regions_since_day_one_stays_quiet() {
        let mut d = LocationDetector::new(LocationSettings::default());
        let key = Uuid::from_u128(2);
        let t0 = t("2026-11-01T00:00:00Z");
        let places = [
            ("81.2.69.160", "GB", "London", LONDON),
            ("89.160.20.112", "SE", "Linköping", LINKOPING),
            ("216.160.83.56", "US", "Milton", MILTON),
        ];
        let mut out = Vec::new();
        for i in 0..(14 * 24 * 6) {
            let (ip, cc, city, ll) = places[i % 3];
            let o = at_place(t0 + Duration::minutes(10 * i as i64), key, ip, cc, city, ll);
            out.extend(d.observe(&o, &Context::default()));
        }
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn unknown_addresses_never_alert_and_new_network_is_off() {
        let mut d = LocationDetector::new(LocationSettings::default());
        let key = Uuid::from_u128(3);
        let t0 = t("2026-11-01T00:00:00Z");
        learn_london(&mut d, key, t0);
        let mut o = at_place(
            t0 + Duration::hours(31),
            key,
            "10.0.0.1",
            "CN",
            "Changchun",
            CHANGCHUN,
        );
        assert!(
            d.observe(&o, &Context::default()).is_empty(),
            "private address"
        );
        o.source_ip = None;
        assert!(d.observe(&o, &Context::default()).is_empty(), "no address");
        let mut o = at_place(
            t0 + Duration::hours(31),
            key,
            "81.2.69.161",
            "GB",
            "London",
            LONDON,
        );
        o.asn = Some(64_500);
        assert!(
            d.observe(&o, &Context::default()).is_empty(),
            "new_network is off"
        );
        let mut on = LocationDetector::new(LocationSettings {
            new_network: true,
            ..LocationSettings::default()
        });
        learn_london(&mut on, key, t0);
        o.asn = Some(64_501);
        let out = on.observe(&o, &Context::default());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].alert_type, AlertType::NewNetwork);
    }
}
