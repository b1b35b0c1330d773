//! A labelled scenario for the detectors: eight and a half days of realistic traffic for a few
//! dozen keys (daily and weekly rhythm, Poisson arrivals, background errors and refused keys),
//! one incident of each alert type on the last two days, and decoys that must stay quiet.
//!
//! The generator is deterministic (its own SplitMix64 stream per key), writes lines in the
//! auth server's format in event-time order, and knows exactly when each incident starts, so a
//! test can score keywatch's alerts: detected or not, how late, and what else fired.
//! It does not reuse `keywatch simulate`'s traffic model, which has no notion of a labelled
//! incident or of a stream per key that a test can bend; it shares its line format and the
//! address blocks MaxMind's test databases place in London, Linköping, Milton and Changchun.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::Path;

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use keywatch::keys::NewKey;

use crate::common::Rng;
use uuid::Uuid;

/// Where a request comes from: `(first three octets, first host, hosts)` in a block MaxMind's
/// GeoIP2-City-Test database places in one city.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place(&'static str, u8, u8);

pub const LONDON: Place = Place("81.2.69", 160, 32);
pub const LINKOPING: Place = Place("89.160.20", 112, 16);
pub const MILTON: Place = Place("216.160.83", 56, 8);
pub const CHANGCHUN: Place = Place("175.16.199", 1, 254);

impl Place {
    fn address(self, rng: &mut Rng, pick: Option<u8>) -> String {
        let host = pick.unwrap_or_else(|| rng.below(u64::from(self.2)) as u8) % self.2;
        format!("{}.{}", self.0, self.1 + host)
    }
}

/// Daily rhythm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// Working hours, quiet nights, quieter weekends.
    Office,
    /// Always on, busier by day.
    Service,
    /// Only between 01:00 and 05:00 UTC (a nightly job).
    Nightly,
    /// The same every minute.
    Flat,
}

impl Shape {
    fn factor(self, t: DateTime<Utc>) -> f64 {
        const OFFICE: [f64; 24] = [
            0.05, 0.04, 0.03, 0.03, 0.03, 0.05, 0.1, 0.3, 0.7, 1.0, 1.1, 1.1, 0.9, 1.0, 1.1, 1.05,
            0.95, 0.7, 0.45, 0.3, 0.2, 0.15, 0.1, 0.07,
        ];
        const SERVICE: [f64; 24] = [
            0.45, 0.4, 0.35, 0.33, 0.33, 0.38, 0.5, 0.7, 0.9, 1.0, 1.05, 1.05, 1.0, 1.0, 1.05, 1.0,
            0.95, 0.9, 0.8, 0.75, 0.7, 0.65, 0.55, 0.5,
        ];
        let h = t.hour() as usize;
        let weekend = t.weekday().number_from_monday() >= 6;
        match self {
            Shape::Office => OFFICE[h] * if weekend { 0.2 } else { 1.0 },
            Shape::Service => SERVICE[h] * if weekend { 0.7 } else { 1.0 },
            Shape::Nightly => {
                if (1..5).contains(&h) {
                    1.0
                } else {
                    0.0
                }
            }
            Shape::Flat => 1.0,
        }
    }
}

/// What a key does besides its rhythm.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Nothing unusual.
    Ordinary,
    /// Its rate multiplied by `mult` for `minutes`.
    Spike {
        at: DateTime<Utc>,
        minutes: i64,
        mult: f64,
    },
    /// Silent for `minutes`.
    Drop { at: DateTime<Utc>, minutes: i64 },
    /// A few requests from `place` at `at`.
    Visit {
        at: DateTime<Utc>,
        place: Place,
        minutes: i64,
    },
    /// `fraction` of its requests fail with 5xx for `minutes`.
    Failing {
        at: DateTime<Utc>,
        minutes: i64,
        fraction: f64,
    },
    /// Expires at `at`; the client keeps calling.
    Expires { at: DateTime<Utc> },
    /// Revoked at `at`; the client keeps calling.
    Revoked { at: DateTime<Utc> },
    /// Calls at `demand` per minute for `minutes`; past `rate_limit_rpm` the server says 429.
    Saturates {
        at: DateTime<Utc>,
        minutes: i64,
        demand: f64,
    },
    /// Browser requests from `addresses` different addresses over `minutes`.
    Exposed {
        at: DateTime<Utc>,
        minutes: i64,
        addresses: u8,
    },
    /// One request at `at` with the full key in its user agent.
    Leaks { at: DateTime<Utc> },
    /// Used from London, Linköping and Milton, at random, from its first request.
    Multi,
    /// Its rate grows by `per_day` (a fraction) every day.
    Growth { per_day: f64 },
    /// `burst` requests in the first three minutes of every hour, almost nothing between.
    HourlyCi { burst: f64 },
}

/// One key of the scenario.
#[derive(Debug, Clone)]
pub struct ScnKey {
    pub name: &'static str,
    pub id: Uuid,
    pub org: usize,
    pub prefix: String,
    pub hash: String,
    /// The full key, only to plant it in a log line for `key_in_logs`; never stored.
    full: String,
    pub rpm_limit: u32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub base_rpm: f64,
    pub shape: Shape,
    pub home: Place,
    pub mcp: &'static str,
    pub role: Role,
    /// True for the decoys: keys whose unusual-but-normal traffic must raise nothing.
    pub decoy: bool,
}

/// One organization of the scenario.
#[derive(Debug, Clone)]
pub struct ScnOrg {
    pub id: Uuid,
    pub name: &'static str,
    pub tier: &'static str,
    pub custom_limit: Option<i64>,
}

/// A labelled incident: the alert it must raise and what else may fire with it.
#[derive(Debug, Clone)]
pub struct Incident {
    pub name: &'static str,
    pub alert_type: &'static str,
    /// The alert subject as fingerprints spell it (`key:<uuid>`, `org:<uuid>`, `ip:<addr>`).
    pub subject: String,
    pub start: DateTime<Utc>,
    /// How long after `start` the alert may be raised: 15 minutes, plus the window the
    /// alert type is defined over where that is longer (a drop is 30 minutes of silence).
    pub allowed_delay: Duration,
    /// Other `type/subject` alerts this incident legitimately causes (an expired key's 401s
    /// are also an auth error spike on that key).
    pub companions: Vec<String>,
}

/// The whole scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub orgs: Vec<ScnOrg>,
    pub keys: Vec<ScnKey>,
    pub incidents: Vec<Incident>,
    pub lines: u64,
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn uuid(n: u128) -> Uuid {
    // Version-4 shaped, so nothing treats them as special.
    Uuid::from_u128(0x5c3e_0000_0000_4000_8000_0000_0000_0000 | n)
}

/// The scenario: keys, organizations and incidents (the lines come from [`write_log`]).
pub fn scenario() -> Scenario {
    let start = t("2026-11-02T00:00:00Z"); // a Monday
    let end = t("2026-11-10T12:00:00Z");
    let day8 = |hm: &str| t(&format!("2026-11-09T{hm}:00Z"));
    let orgs = vec![
        ScnOrg {
            id: uuid(0xa1),
            name: "Acme Robotics",
            tier: "team",
            custom_limit: Some(50_000_000),
        },
        ScnOrg {
            id: uuid(0xa2),
            name: "Globex Systems",
            tier: "team",
            custom_limit: Some(50_000_000),
        },
        ScnOrg {
            id: uuid(0xa3),
            name: "Massive Dynamic",
            tier: "enterprise",
            custom_limit: None,
        },
        // Its limit is set by `write_log` so that 75% falls on the scenario's last days.
        ScnOrg {
            id: uuid(0xa4),
            name: "Tiny Startup",
            tier: "pro",
            custom_limit: None,
        },
    ];
    let mcps = [
        "github",
        "slack",
        "postgres",
        "filesystem",
        "notion",
        "sentry",
    ];
    let mut keys = Vec::new();
    let mut n = 0u128;
    let mut key =
        |name: &'static str, org: usize, base_rpm: f64, shape: Shape, role: Role, decoy: bool| {
            n += 1;
            let id = uuid(n);
            let k = NewKey::generate(id, None);
            ScnKey {
                name,
                id,
                org,
                prefix: k.prefix.clone(),
                hash: k.hash.clone(),
                full: k.reveal().to_owned(),
                rpm_limit: 600,
                created_at: start - Duration::days(30),
                expires_at: None,
                revoked_at: None,
                base_rpm,
                shape,
                home: LONDON,
                mcp: mcps[(n as usize) % mcps.len()],
                role,
                decoy,
            }
        };
    // Ordinary keys: the background that every false alert is counted against.
    for i in 0..14 {
        let shape = if i % 3 == 0 {
            Shape::Office
        } else {
            Shape::Service
        };
        let mut k = key(
            "ordinary",
            i % 2,
            1.0 + (i % 4) as f64,
            shape,
            Role::Ordinary,
            false,
        );
        if i % 5 == 4 {
            k.home = LINKOPING;
        }
        keys.push(k);
    }
    // Incidents.
    keys.push(key(
        "spike",
        0,
        15.0,
        Shape::Service,
        Role::Spike {
            at: day8("14:00"),
            minutes: 40,
            mult: 5.0,
        },
        false,
    ));
    keys.push(key(
        "drop",
        1,
        15.0,
        Shape::Service,
        Role::Drop {
            at: day8("10:00"),
            minutes: 180,
        },
        false,
    ));
    keys.push(key(
        "new-country",
        0,
        3.0,
        Shape::Nightly,
        Role::Visit {
            at: day8("15:00"),
            place: LINKOPING,
            minutes: 10,
        },
        false,
    ));
    keys.push(key(
        "impossible-travel",
        1,
        4.0,
        Shape::Service,
        Role::Visit {
            at: day8("16:00"),
            place: CHANGCHUN,
            minutes: 10,
        },
        false,
    ));
    keys.push(key(
        "error-spike",
        0,
        12.0,
        Shape::Service,
        Role::Failing {
            at: day8("11:00"),
            minutes: 25,
            fraction: 0.35,
        },
        false,
    ));
    let mut exp = key(
        "expired",
        1,
        4.0,
        Shape::Service,
        Role::Expires { at: day8("12:00") },
        false,
    );
    exp.expires_at = Some(day8("12:00"));
    keys.push(exp);
    let mut rev = key(
        "revoked",
        0,
        4.0,
        Shape::Service,
        Role::Revoked { at: day8("09:00") },
        false,
    );
    rev.revoked_at = Some(day8("09:00"));
    keys.push(rev);
    let mut sat = key(
        "saturation",
        1,
        8.0,
        Shape::Service,
        Role::Saturates {
            at: day8("13:00"),
            minutes: 60,
            demand: 75.0,
        },
        false,
    );
    sat.rpm_limit = 60;
    keys.push(sat);
    keys.push(key(
        "exposed",
        0,
        3.0,
        Shape::Service,
        Role::Exposed {
            at: day8("18:00"),
            minutes: 20,
            addresses: 30,
        },
        false,
    ));
    keys.push(key(
        "leaked",
        1,
        3.0,
        Shape::Service,
        Role::Leaks { at: day8("20:00") },
        false,
    ));
    keys.push(key("quota", 3, 3.0, Shape::Flat, Role::Ordinary, false));
    // Decoys.
    keys.push(key(
        "three-regions",
        0,
        4.0,
        Shape::Service,
        Role::Multi,
        true,
    ));
    keys.push(key(
        "growing",
        1,
        8.0,
        Shape::Service,
        Role::Growth { per_day: 0.06 },
        true,
    ));
    keys.push(key(
        "hourly-ci",
        0,
        0.3,
        Shape::Flat,
        Role::HourlyCi { burst: 420.0 },
        true,
    ));
    keys.push(key(
        "low-volume",
        1,
        0.05,
        Shape::Flat,
        Role::Ordinary,
        true,
    ));
    let mut fresh = key(
        "created-yesterday",
        0,
        20.0,
        Shape::Service,
        Role::Ordinary,
        true,
    );
    fresh.created_at = end - Duration::hours(24);
    keys.push(fresh);
    keys.push(key(
        "enterprise",
        2,
        40.0,
        Shape::Service,
        Role::Ordinary,
        true,
    ));

    let find = |name: &str| keys.iter().find(|k| k.name == name).unwrap();
    let ks = |name: &str| format!("key:{}", find(name).id);
    let org_of = |name: &str| format!("org:{}", orgs[find(name).org].id);
    let mcp_of = |name: &str| format!("mcp:{}", find(name).mcp);
    let q = Duration::minutes(15);
    let incidents = vec![
        Incident {
            name: "spike",
            alert_type: "rate_spike",
            subject: ks("spike"),
            start: day8("14:00"),
            allowed_delay: q,
            companions: vec![format!("rate_spike/{}", org_of("spike"))],
        },
        Incident {
            name: "drop",
            alert_type: "rate_drop",
            subject: ks("drop"),
            start: day8("10:00"),
            allowed_delay: Duration::minutes(30) + q,
            companions: vec![format!("rate_drop/{}", org_of("drop"))],
        },
        Incident {
            name: "new-country",
            alert_type: "new_country",
            subject: ks("new-country"),
            start: day8("15:00"),
            allowed_delay: q,
            companions: vec![],
        },
        Incident {
            name: "impossible-travel",
            alert_type: "impossible_travel",
            subject: ks("impossible-travel"),
            start: day8("16:00"),
            allowed_delay: q,
            // Changchun is also a country the key never used.
            companions: vec![format!("new_country/{}", ks("impossible-travel"))],
        },
        Incident {
            name: "error-spike",
            alert_type: "error_spike",
            subject: ks("error-spike"),
            start: day8("11:00"),
            allowed_delay: q,
            companions: vec![format!("error_spike/{}", mcp_of("error-spike"))],
        },
        Incident {
            name: "auth-failure-burst",
            alert_type: "auth_failure_burst",
            subject: format!("ip:{PROBER}"),
            start: t("2026-11-10T03:00:00Z"),
            allowed_delay: q,
            companions: vec![],
        },
        Incident {
            name: "expired",
            alert_type: "expired_key_use",
            subject: ks("expired"),
            start: day8("12:00"),
            allowed_delay: q,
            companions: vec![
                format!("error_spike/{}", ks("expired")),
                format!("error_spike/{}", mcp_of("expired")),
            ],
        },
        Incident {
            name: "revoked",
            alert_type: "revoked_key_use",
            subject: ks("revoked"),
            start: day8("09:00"),
            allowed_delay: q,
            companions: vec![
                format!("error_spike/{}", ks("revoked")),
                format!("error_spike/{}", mcp_of("revoked")),
            ],
        },
        Incident {
            name: "quota",
            alert_type: "quota_threshold",
            subject: format!("org:{}", orgs[3].id),
            start: day8("15:00"), // replaced by the exact crossing in `write_log`
            allowed_delay: q,
            companions: vec![],
        },
        Incident {
            name: "saturation",
            alert_type: "rate_limit_saturation",
            subject: ks("saturation"),
            start: day8("13:00"),
            // "Most minutes of an hour": 31 saturated minutes by definition.
            allowed_delay: Duration::minutes(31) + q,
            companions: vec![
                format!("rate_spike/{}", ks("saturation")),
                format!("rate_spike/{}", org_of("saturation")),
                format!("error_spike/{}", ks("saturation")),
                format!("error_spike/{}", mcp_of("saturation")),
            ],
        },
        Incident {
            name: "exposed",
            alert_type: "client_side_exposure",
            subject: ks("exposed"),
            start: day8("18:00"),
            allowed_delay: q,
            companions: vec![],
        },
        Incident {
            name: "leaked",
            alert_type: "key_in_logs",
            subject: ks("leaked"),
            start: day8("20:00"),
            allowed_delay: q,
            companions: vec![],
        },
    ];
    Scenario {
        start,
        end,
        orgs,
        keys,
        incidents,
        lines: 0,
    }
}

/// The address that probes for keys in the auth-failure incident (documentation range, so
/// GeoIP knows nothing of it).
pub const PROBER: &str = "198.51.100.23";

/// One request before it is written.
struct Req {
    at_ms: i64,
    key: usize,
    status: u16,
    error_code: Option<&'static str>,
    ip: String,
    ua: String,
    origin: Option<&'static str>,
    rate_limit_hit: bool,
}

/// Index meaning "a refused key" in [`Req::key`].
const REFUSED: usize = usize::MAX;

/// Writes the scenario's log to `path` and fills in what depends on the traffic (the quota
/// organization's limit and the exact time it crosses 75%).
pub fn write_log(s: &mut Scenario, path: &Path) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut rngs: Vec<Rng> = (0..s.keys.len())
        .map(|i| Rng(0x5eed_0000 + i as u64 * 7919))
        .collect();
    let mut noise = Rng(0xbad_cafe);
    let quota_key = s.keys.iter().position(|k| k.name == "quota").unwrap();
    let mut quota_times: Vec<i64> = Vec::new();
    let minutes = (s.end - s.start).num_minutes();
    let mut reqs: Vec<Req> = Vec::new();
    let mut line = String::with_capacity(1024);
    let mut rid: u64 = 0;
    for m in 0..minutes {
        let at = s.start + Duration::minutes(m);
        let ms0 = at.timestamp_millis();
        reqs.clear();
        for (ki, k) in s.keys.iter().enumerate() {
            let rng = &mut rngs[ki];
            if at < k.created_at {
                continue;
            }
            let in_window =
                |from: DateTime<Utc>, mins: i64| at >= from && at < from + Duration::minutes(mins);
            let mut lambda = k.base_rpm * k.shape.factor(at);
            match &k.role {
                Role::Spike {
                    at: a,
                    minutes,
                    mult,
                } if in_window(*a, *minutes) => lambda *= mult,
                Role::Drop { at: a, minutes } if in_window(*a, *minutes) => lambda = 0.0,
                Role::Growth { per_day } => {
                    lambda *= 1.0 + per_day * (at - s.start).num_minutes() as f64 / 1440.0
                }
                Role::HourlyCi { burst } if at.minute() < 3 => lambda += burst / 3.0,
                Role::Saturates {
                    at: a,
                    minutes,
                    demand,
                } if in_window(*a, *minutes) => lambda = *demand,
                _ => {}
            }
            let count = rng.poisson(lambda);
            let mut this_minute = 0u32;
            for _ in 0..count {
                let at_ms = ms0 + rng.below(60_000) as i64;
                let mut r = Req {
                    at_ms,
                    key: ki,
                    status: 200,
                    error_code: None,
                    ip: k.home.address(rng, Some((ki % 4) as u8)),
                    ua: "plexmcp-python/1.4.0".into(),
                    origin: None,
                    rate_limit_hit: false,
                };
                // Background errors: 0.7% 5xx, 0.5% 404, 0.3% 403.
                let u = rng.unit();
                if u < 0.007 {
                    r.status = 502;
                    r.error_code = Some("upstream_error");
                } else if u < 0.012 {
                    r.status = 404;
                    r.error_code = Some("not_found");
                } else if u < 0.015 {
                    r.status = 403;
                    r.error_code = Some("mcp_not_permitted");
                }
                match &k.role {
                    Role::Multi => {
                        let place = [LONDON, LINKOPING, MILTON][rng.below(3) as usize];
                        r.ip = place.address(rng, None);
                    }
                    Role::Failing {
                        at: a,
                        minutes,
                        fraction,
                    } if in_window(*a, *minutes) && rng.unit() < *fraction => {
                        r.status = 503;
                        r.error_code = Some("upstream_error");
                    }
                    Role::Expires { at: a } | Role::Revoked { at: a } if at >= *a => {
                        r.status = 401;
                        r.error_code = Some(if matches!(k.role, Role::Expires { .. }) {
                            "expired_key"
                        } else {
                            "revoked_key"
                        });
                    }
                    Role::Saturates { .. } => {
                        this_minute += 1;
                        if this_minute > k.rpm_limit {
                            r.status = 429;
                            r.error_code = Some("rate_limited");
                            r.rate_limit_hit = true;
                        }
                    }
                    _ => {}
                }
                reqs.push(r);
            }
            // Incident traffic beside the rhythm.
            match &k.role {
                Role::Visit {
                    at: a,
                    place,
                    minutes,
                } if in_window(*a, *minutes) => {
                    reqs.push(Req {
                        at_ms: ms0 + rng.below(60_000) as i64,
                        key: ki,
                        status: 200,
                        error_code: None,
                        ip: place.address(rng, None),
                        ua: "plexmcp-python/1.4.0".into(),
                        origin: None,
                        rate_limit_hit: false,
                    });
                }
                Role::Exposed {
                    at: a,
                    minutes,
                    addresses,
                } if in_window(*a, *minutes) => {
                    let i = (at - *a).num_minutes();
                    let per_min = (u64::from(*addresses)).div_ceil(*minutes as u64) as i64;
                    for j in 0..per_min {
                        let host = (i * per_min + j) as u8;
                        if host >= *addresses {
                            break;
                        }
                        reqs.push(Req {
                            at_ms: ms0 + rng.below(60_000) as i64,
                            key: ki,
                            status: 200,
                            error_code: None,
                            ip: LONDON.address(rng, Some(host)),
                            ua: "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36".into(),
                            origin: Some("https://shop.example.com"),
                            rate_limit_hit: false,
                        });
                    }
                }
                Role::Leaks { at: a } if at == *a => {
                    reqs.push(Req {
                        at_ms: ms0 + 30_000,
                        key: ki,
                        status: 200,
                        error_code: None,
                        ip: k.home.address(rng, Some(0)),
                        ua: format!("deploy-script/2.0 (key={})", k.full),
                        origin: None,
                        rate_limit_hit: false,
                    });
                }
                _ => {}
            }
        }
        // Background refused keys: a few scanners, one every few minutes.
        if noise.unit() < 0.2 {
            reqs.push(Req {
                at_ms: ms0 + noise.below(60_000) as i64,
                key: REFUSED,
                status: 401,
                error_code: Some("invalid_key"),
                ip: format!("203.0.113.{}", 1 + noise.below(40)),
                ua: "python-requests/2.31.0".into(),
                origin: None,
                rate_limit_hit: false,
            });
        }
        // The probing incident: 60 made-up prefixes from one address in three minutes.
        let probe = t("2026-11-10T03:00:00Z");
        if at >= probe && at < probe + Duration::minutes(3) {
            for _ in 0..20 {
                reqs.push(Req {
                    at_ms: ms0 + noise.below(60_000) as i64,
                    key: REFUSED,
                    status: 401,
                    error_code: Some("invalid_key"),
                    ip: PROBER.into(),
                    ua: "Go-http-client/1.1".into(),
                    origin: None,
                    rate_limit_hit: false,
                });
            }
        }
        reqs.sort_by_key(|r| (r.at_ms, r.key));
        for r in &reqs {
            rid += 1;
            line.clear();
            let at = Utc.timestamp_millis_opt(r.at_ms).unwrap();
            let _ = write!(
                line,
                r#"{{"request_id":"{}","created_at":"{}","#,
                Uuid::from_u64_pair(0x5c3e, rid),
                at.format("%Y-%m-%dT%H:%M:%S%.3fZ")
            );
            if r.key == REFUSED {
                let _ = write!(
                    line,
                    r#""organization_id":null,"api_key_id":null,"key_prefix":"pmcp_01{:05x}","mcp_server_name":null,"#,
                    noise.below(0x10_0000)
                );
            } else {
                let k = &s.keys[r.key];
                if r.key == quota_key {
                    quota_times.push(r.at_ms);
                }
                let _ = write!(
                    line,
                    r#""organization_id":"{}","api_key_id":"{}","key_prefix":"{}","mcp_server_name":"{}","#,
                    s.orgs[k.org].id, k.id, k.prefix, k.mcp
                );
            }
            let _ = write!(
                line,
                r#""endpoint_path":"/mcp","http_method":"POST","http_status_code":{},"latency_ms":{},"request_size_bytes":512,"response_size_bytes":2048,"source_ip":"{}","user_agent":"{}","error_code":{},"rate_limit_hit":{},"quota_exceeded":false,"metadata":{{"#,
                r.status,
                40 + (rid % 200),
                r.ip,
                r.ua,
                r.error_code
                    .map_or("null".to_owned(), |c| format!("\"{c}\"")),
                r.rate_limit_hit,
            );
            if let Some(o) = r.origin {
                let _ = write!(line, r#""origin":"{o}""#);
            }
            line.push_str("}}\n");
            out.write_all(line.as_bytes())?;
            s.lines += 1;
        }
    }
    out.flush()?;
    // The quota organization's limit: 75% of it is what it had made by 15:00 on day 8.
    let target = t("2026-11-09T15:00:00Z").timestamp_millis();
    let before = quota_times.iter().filter(|&&ms| ms < target).count() as i64;
    let limit = ((before * 100) as u64).div_ceil(75) as i64;
    s.orgs[3].custom_limit = Some(limit);
    // The detector crosses at the request that brings the count to ceil(75% of the limit).
    let needed = ((limit * 75) as u64).div_ceil(100) as usize;
    let crossing = quota_times[needed - 1];
    let inc = s.incidents.iter_mut().find(|i| i.name == "quota").unwrap();
    inc.start = Utc.timestamp_millis_opt(crossing).unwrap();
    Ok(())
}

/// One alert as `report alerts --format json` gives it, reduced to what scoring needs.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub alert_type: String,
    pub severity: String,
    pub detected_at: DateTime<Utc>,
    pub summary: String,
}

impl Seen {
    /// `type/subject`, without the facet.
    pub fn type_subject(&self) -> String {
        let mut parts = self.id.splitn(3, '/');
        format!(
            "{}/{}",
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("")
        )
    }
}

/// How the alerts score against the labels.
#[derive(Debug, Default)]
pub struct Score {
    /// Per incident: the delay of its detection, or `None` when missed (or too late).
    pub detected: Vec<(&'static str, Option<Duration>)>,
    /// Alerts an incident explains beside its own.
    pub companions: Vec<String>,
    /// Alerts nothing explains.
    pub false_alerts: Vec<String>,
    /// Key-days of traffic judged.
    pub key_days: f64,
}

impl Score {
    pub fn recall(&self) -> f64 {
        let hit = self.detected.iter().filter(|d| d.1.is_some()).count();
        hit as f64 / self.detected.len().max(1) as f64
    }
    pub fn false_per_1000_key_days(&self) -> f64 {
        self.false_alerts.len() as f64 * 1000.0 / self.key_days.max(1e-9)
    }
    pub fn median_delay(&self) -> Option<Duration> {
        let mut d: Vec<Duration> = self.detected.iter().filter_map(|d| d.1).collect();
        d.sort();
        d.get(d.len().saturating_sub(1) / 2).copied()
    }
}

/// Scores `alerts` against the scenario's labels.
pub fn score(s: &Scenario, alerts: &[Seen]) -> Score {
    let mut sc = Score {
        key_days: s
            .keys
            .iter()
            .map(|k| (s.end - k.created_at.max(s.start)).num_minutes() as f64 / 1440.0)
            .sum(),
        ..Score::default()
    };
    let mut used = vec![false; alerts.len()];
    for inc in &s.incidents {
        let want = format!("{}/{}", inc.alert_type, inc.subject);
        let hit = alerts.iter().enumerate().find(|(_, a)| {
            a.type_subject() == want
                && a.detected_at >= inc.start - Duration::minutes(1)
                && a.detected_at <= inc.start + inc.allowed_delay
        });
        if let Some((i, a)) = hit {
            used[i] = true;
            sc.detected.push((
                inc.name,
                Some((a.detected_at - inc.start).max(Duration::zero())),
            ));
        } else {
            sc.detected.push((inc.name, None));
        }
    }
    for (i, a) in alerts.iter().enumerate() {
        if used[i] {
            continue;
        }
        let ts = a.type_subject();
        let explained = s.incidents.iter().any(|inc| {
            a.detected_at >= inc.start - Duration::minutes(1)
                && (inc.companions.contains(&ts)
                    || ts == format!("{}/{}", inc.alert_type, inc.subject))
        });
        let line = format!(
            "{} {} at {}: {}",
            a.id, a.severity, a.detected_at, a.summary
        );
        if explained {
            sc.companions.push(line);
        } else {
            sc.false_alerts.push(line);
        }
    }
    sc
}
