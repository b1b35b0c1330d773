//! Synthetic request-log traffic for `keywatch demo`, `keywatch simulate`, the tests and the
//! benchmarks.
//!
//! Owns generating a plausible set of organizations and keys ([`plan`]) and a deterministic
//! stream of request-log lines for them ([`generate`]), in the auth server's line format (see
//! [`crate::event`]). Everything is derived from [`SimOptions`]: the same options give the same
//! bytes. It must not touch storage or read the wall clock (the only time it knows is
//! [`SimOptions::end`]), and it never prints or keeps a full key: only its hash and prefix.

use std::collections::HashMap;
use std::io::{self, Write};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::keys::{KEY_PREFIX, KeyInfo, OrgInfo, hash_key, stored_prefix};

/// What to simulate. Build with [`SimOptions::new`] and change the fields you need.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Number of API keys.
    pub keys: usize,
    /// Number of organizations; `None` derives about one per four keys (at least 3 when
    /// there are at least 3 keys, never more than the keys).
    pub orgs: Option<usize>,
    /// Length of the period in days, ending at `end`.
    pub days: f64,
    /// Exactly this many lines: the rates are scaled so that the period holds them.
    /// Organization 0 keeps its monthly target; the unlimited organizations' keys take the
    /// extra volume (the others scale only when there are fewer lines than their natural
    /// volume, or when there are no unlimited keys). Only when `lines` is below organization
    /// 0's own share (or it has the only keys) does it scale too, and then its target is lost.
    pub lines: Option<u64>,
    /// Seed of every random choice.
    pub seed: u64,
    /// End of the period; the only time the simulator knows.
    pub end: DateTime<Utc>,
    /// Share of requests that fail with 5xx, 400/404 or 403 (60% / 25% / 15% of it).
    pub error_share: f64,
    /// Share of lines that are refused keys (401 with no key or organization id).
    pub refused_share: f64,
}

impl SimOptions {
    /// The defaults: 12 keys, derived organizations, one day, natural volume, seed 1,
    /// 3% errors and 1% refused keys, ending at `end`.
    pub fn new(end: DateTime<Utc>) -> Self {
        SimOptions {
            keys: 12,
            orgs: None,
            days: 1.0,
            lines: None,
            seed: 1,
            end,
            error_share: 0.03,
            refused_share: 0.01,
        }
    }

    /// The number of organizations [`plan`] makes.
    pub fn org_count(&self) -> usize {
        match self.orgs {
            Some(n) => n.max(1),
            None if self.keys >= 3 => self.keys.div_ceil(4).max(3),
            None => self.keys.max(1),
        }
    }
}

/// A simulated key: what keywatch's key tables hold about it, and its hash. The full key is
/// never kept.
#[derive(Debug, Clone)]
pub struct SimKey {
    /// The key as the store would load it.
    pub info: KeyInfo,
    /// SHA-256 hex of the full key (the `key_hash` column).
    pub key_hash: String,
    traffic: Traffic,
}

/// The simulated organizations and keys. Organization 0 is the one close to its monthly limit.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The organizations; index 0 is on the free tier and ends the period near its limit.
    pub orgs: Vec<OrgInfo>,
    /// The keys, each in one of `orgs`.
    pub keys: Vec<SimKey>,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SimStats {
    /// Lines written.
    pub lines: u64,
    /// Start of the period (`end - days`, to the millisecond).
    pub start: DateTime<Utc>,
    /// End of the period.
    pub end: DateTime<Utc>,
    /// 2xx lines.
    pub ok: u64,
    /// 400 and 404 lines.
    pub client_errors: u64,
    /// 401 lines: refused keys.
    pub unauthorized: u64,
    /// 403 lines (`forbidden`, `mcp_not_permitted`).
    pub forbidden: u64,
    /// 429 lines over a key's `rate_limit_rpm`.
    pub rate_limited: u64,
    /// 429 lines over an organization's monthly limit.
    pub quota_exceeded: u64,
    /// 5xx lines.
    pub server_errors: u64,
    /// Per organization (indexed like [`Plan::orgs`]): its lines in the calendar month (UTC)
    /// containing `end`, up to `end`.
    pub org_month_to_date: Vec<u64>,
}

// ---------------------------------------------------------------------------------------------
// Fixed vocabulary. Every string here is plain ASCII that needs no JSON escaping.

struct Mcp {
    name: &'static str,
    /// Median latency of a successful call, in milliseconds.
    latency_ms: f64,
    /// Median response size, in bytes.
    response_bytes: f64,
    tools: &'static [&'static str],
}

const MCPS: &[Mcp] = &[
    Mcp {
        name: "github",
        latency_ms: 180.0,
        response_bytes: 4000.0,
        tools: &[
            "search_issues",
            "get_file_contents",
            "create_pull_request",
            "list_commits",
            "create_issue",
        ],
    },
    Mcp {
        name: "slack",
        latency_ms: 110.0,
        response_bytes: 1500.0,
        tools: &[
            "post_message",
            "search_messages",
            "list_channels",
            "get_thread",
        ],
    },
    Mcp {
        name: "postgres",
        latency_ms: 60.0,
        response_bytes: 2500.0,
        tools: &["query", "list_tables", "describe_table"],
    },
    Mcp {
        name: "filesystem",
        latency_ms: 40.0,
        response_bytes: 6000.0,
        tools: &["read_file", "list_directory", "search_files", "write_file"],
    },
    Mcp {
        name: "jira",
        latency_ms: 300.0,
        response_bytes: 3500.0,
        tools: &[
            "search_issues",
            "get_issue",
            "create_issue",
            "transition_issue",
        ],
    },
    Mcp {
        name: "linear",
        latency_ms: 140.0,
        response_bytes: 2000.0,
        tools: &["list_issues", "create_issue", "update_issue"],
    },
    Mcp {
        name: "notion",
        latency_ms: 240.0,
        response_bytes: 5000.0,
        tools: &["search", "get_page", "create_page"],
    },
    Mcp {
        name: "sentry",
        latency_ms: 200.0,
        response_bytes: 3000.0,
        tools: &["list_issues", "get_event", "resolve_issue"],
    },
];

/// Daily rhythm of a key, by what uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// People and CI: working hours, quiet nights and weekends.
    Office,
    /// Always-on services: flatter, busier by day.
    Service,
    /// Nightly jobs: busiest in the small hours.
    Batch,
}

impl Kind {
    /// Relative activity at each local hour (interpolated linearly within the hour).
    fn hourly(self) -> [f64; 24] {
        match self {
            Kind::Office => [
                0.05, 0.04, 0.03, 0.03, 0.03, 0.05, 0.1, 0.3, 0.7, 1.0, 1.1, 1.1, 0.9, 1.0, 1.1,
                1.05, 0.95, 0.7, 0.45, 0.3, 0.2, 0.15, 0.1, 0.07,
            ],
            Kind::Service => [
                0.45, 0.4, 0.35, 0.33, 0.33, 0.38, 0.5, 0.7, 0.9, 1.0, 1.05, 1.05, 1.0, 1.0, 1.05,
                1.0, 0.95, 0.9, 0.8, 0.75, 0.7, 0.65, 0.55, 0.5,
            ],
            Kind::Batch => [
                0.6, 1.5, 2.5, 2.5, 1.5, 0.6, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
                0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.15, 0.25,
            ],
        }
    }

    /// Activity on Saturday and Sunday relative to a weekday.
    fn weekend(self) -> f64 {
        match self {
            Kind::Office => 0.2,
            Kind::Service => 0.7,
            Kind::Batch => 0.9,
        }
    }
}

/// Key names, the rhythm of what uses them, and whether requests carry an `Origin`.
const KEY_NAMES: &[(&str, Kind, bool)] = &[
    ("prod-backend", Kind::Service, false),
    ("ci-deploy", Kind::Office, false),
    ("web-dashboard", Kind::Office, true),
    ("analytics-etl", Kind::Batch, false),
    ("staging-api", Kind::Office, false),
    ("support-bot", Kind::Service, false),
    ("nightly-sync", Kind::Batch, false),
    ("dev-laptop", Kind::Office, false),
    ("agent-worker", Kind::Service, false),
    ("data-pipeline", Kind::Batch, false),
    ("qa-runner", Kind::Office, false),
    ("ops-automation", Kind::Service, false),
    ("mobile-app", Kind::Service, true),
    ("zapier-hooks", Kind::Service, false),
];

const ORG_NAMES: &[&str] = &[
    "Acme Robotics",
    "Northwind Analytics",
    "Globex Systems",
    "Initech Labs",
    "Umbrella Health",
    "Stark Logistics",
    "Wayne Fintech",
    "Hooli Cloud",
    "Pied Piper Data",
    "Vandelay Imports",
    "Soylent Foods",
    "Tyrell Biotech",
    "Cyberdyne Security",
    "Wonka Retail",
    "Aperture Research",
    "Oscorp Energy",
    "Massive Dynamic",
    "Gringotts Payments",
    "Monarch Media",
    "Blue Sun Mobility",
];

const SDK_AGENTS: &[&str] = &[
    "plexmcp-python/1.4.0",
    "plexmcp-node/2.1.0",
    "plexmcp-go/0.9.2",
    "python-httpx/0.27.0",
];
const BROWSER_AGENT: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";
const DEBUG_AGENT: &str = "curl/8.5.0";
const SCANNER_AGENTS: &[&str] = &["curl/8.5.0", "python-requests/2.31.0", "Go-http-client/1.1"];

/// An address block that MaxMind's test databases place in one country.
struct Place {
    /// UTC offset of the organizations based there, in hours.
    tz_hours: i32,
    net: Net,
}

enum Net {
    /// `a.b.c.(first + n)` for n below `count`.
    V4([u8; 3], u8, u8),
    /// The first two groups, the second varying in `0..count` above the given one.
    V6(u16, u16, u16),
}

const PLACES: &[Place] = &[
    // GB
    Place {
        tz_hours: 0,
        net: Net::V4([81, 2, 69], 160, 32),
    },
    // US
    Place {
        tz_hours: -8,
        net: Net::V4([216, 160, 83], 56, 8),
    },
    // SE
    Place {
        tz_hours: 1,
        net: Net::V4([89, 160, 20], 112, 16),
    },
    // DE
    Place {
        tz_hours: 1,
        net: Net::V6(0x2a02, 0xd180, 8),
    },
    // JP
    Place {
        tz_hours: 9,
        net: Net::V6(0x2001, 0x0218, 1),
    },
    // FR
    Place {
        tz_hours: 1,
        net: Net::V6(0x2a02, 0xec00, 8),
    },
    // CN
    Place {
        tz_hours: 8,
        net: Net::V4([175, 16, 199], 1, 254),
    },
    // KR
    Place {
        tz_hours: 9,
        net: Net::V6(0x2001, 0x0220, 1),
    },
    // ES
    Place {
        tz_hours: 1,
        net: Net::V6(0x2a02, 0xd5c0, 8),
    },
    // TW
    Place {
        tz_hours: 8,
        net: Net::V6(0x2001, 0x0238, 1),
    },
];

impl Place {
    fn address(&self, rng: &mut StdRng) -> String {
        match self.net {
            Net::V4([a, b, c], first, count) => {
                format!("{a}.{b}.{c}.{}", first + rng.random_range(0..count))
            }
            Net::V6(g1, g2, count) => format!(
                "{g1:x}:{:x}:{:x}:{:x}::{:x}",
                g2 + rng.random_range(0..count),
                rng.random::<u16>(),
                rng.random::<u16>() & 0xff,
                rng.random_range(1..0xffffu16),
            ),
        }
    }
}

/// Monthly share of its limit that a limited organization (other than 0) uses, at most.
const LIMITED_BUDGET: (f64, f64) = (0.25, 0.6);
/// Organization 0's requests in the month containing `end`, as a share of its limit.
const ORG0_TARGET: f64 = 0.9;
/// Organization 0's expected requests in an earlier month of the period, at most.
const ORG0_EARLIER_CAP: f64 = 0.8;
/// Per-minute chance (at peak activity) that a bursty key starts a burst over its limit.
const BURST_CHANCE: f64 = 0.004;
/// Mean size of a burst, in multiples of the key's `rate_limit_rpm` (drawn from 1.1 to 2).
const BURST_SIZE: f64 = 1.55;
const RPM_CHOICES: &[u32] = &[60, 120, 300, 600, 1000, 2000, 5000, 10000];
const MINUTES_PER_WEEK: usize = 7 * 1440;
const AVG_MONTH_MINUTES: f64 = 30.44 * 1440.0;

// ---------------------------------------------------------------------------------------------
// Plan.

/// How a key behaves: private to the simulator, kept beside the key in [`SimKey`].
#[derive(Debug, Clone)]
struct Traffic {
    kind: Kind,
    tz_hours: i32,
    /// Natural mean requests per minute (the daily rhythm averages 1 over a week).
    base: f64,
    /// Whether it sometimes bursts past its `rate_limit_rpm` (a CI job fanning out).
    bursty: bool,
    /// MCP indices with cumulative weights.
    mcps: Vec<(usize, f64)>,
    /// MCPs a `selected` key is not allowed, which it sometimes tries.
    denied: Vec<usize>,
    /// Source addresses with cumulative weights.
    locations: Vec<(String, f64)>,
    user_agent: &'static str,
    origin: Option<String>,
}

/// Which rate rule a key follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// Organization 0, paced to its monthly target.
    Org0,
    /// Natural volume only: keys of limited organizations, and bursty keys.
    Fixed,
    /// Keys of unlimited organizations: they take the extra volume of `lines`.
    Scalable,
}

fn group_of(org_index: usize, org: &OrgInfo, t: &Traffic) -> Group {
    if org_index == 0 {
        Group::Org0
    } else if t.bursty || org.monthly_limit().0.is_some() {
        Group::Fixed
    } else {
        Group::Scalable
    }
}

fn random_uuid(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random::<u128>().to_le_bytes()).into_uuid()
}

/// The id of organization `org`'s instance of MCP `name`, for `allowed_mcp_ids`.
fn mcp_instance_id(org: Uuid, name: &str) -> Uuid {
    let digest = Sha256::new()
        .chain_update(org.as_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn slugify(name: &str) -> String {
    let mut slug = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    slug.trim_end_matches('-').to_owned()
}

/// A standard normal draw, approximately (Irwin-Hall of three uniforms: bounded at 3 sd).
fn normal(rng: &mut StdRng) -> f64 {
    let x: u64 = rng.random();
    const MASK: u64 = (1 << 21) - 1;
    let scale = 1.0 / (1u64 << 21) as f64;
    let a = (x & MASK) as f64 * scale;
    let b = ((x >> 21) & MASK) as f64 * scale;
    let c = ((x >> 42) & MASK) as f64 * scale;
    (a + b + c - 1.5) * 2.0
}

fn lognormal(rng: &mut StdRng, median: f64, sigma: f64) -> f64 {
    median * (sigma * normal(rng)).exp()
}

/// A Poisson draw with mean `lambda` (a normal approximation from 30 up).
fn poisson(rng: &mut StdRng, lambda: f64) -> u64 {
    if lambda.is_nan() || lambda <= 0.0 {
        return 0;
    }
    if lambda < 30.0 {
        let mut p = (-lambda).exp();
        let mut sum = p;
        let u: f64 = rng.random();
        let mut k = 0u64;
        while u > sum && k < 400 {
            k += 1;
            p *= lambda / k as f64;
            sum += p;
        }
        k
    } else {
        (lambda + lambda.sqrt() * normal(rng)).round().max(0.0) as u64
    }
}

/// Picks an index from cumulative weights ending in the total.
fn pick<T>(items: &[(T, f64)], rng: &mut StdRng) -> usize {
    let total = items.last().map_or(0.0, |x| x.1);
    let u = rng.random::<f64>() * total;
    items
        .iter()
        .position(|x| u < x.1)
        .unwrap_or(items.len() - 1)
}

fn cumulative<T>(items: Vec<(T, f64)>) -> Vec<(T, f64)> {
    let mut acc = 0.0;
    items
        .into_iter()
        .map(|(t, w)| {
            acc += w;
            (t, acc)
        })
        .collect()
}

/// Makes the organizations and keys. Deterministic from `opts.seed` (ids, names, prefixes and
/// hashes); the rate limits also depend on the period and `lines`, so that only the keys
/// meant to hit theirs do.
pub fn plan(opts: &SimOptions) -> Plan {
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x706c_616e_6b65_7973);
    let period = Period::new(opts);
    let n_orgs = opts.org_count();

    // Organizations.
    let mut name_order: Vec<usize> = (0..ORG_NAMES.len()).collect();
    for i in (1..name_order.len()).rev() {
        name_order.swap(i, rng.random_range(0..=i));
    }
    let mut orgs = Vec::with_capacity(n_orgs);
    let mut homes = Vec::with_capacity(n_orgs);
    let mut name_offsets = Vec::with_capacity(n_orgs);
    for i in 0..n_orgs {
        let base = ORG_NAMES[name_order[i % ORG_NAMES.len()]];
        let round = i / ORG_NAMES.len();
        let name = if round == 0 {
            base.to_owned()
        } else {
            format!("{base} {}", round + 1)
        };
        let tier = match i {
            0 => "free",
            1 => "enterprise",
            2 => "pro",
            3 => "team",
            _ => ["free", "pro", "pro", "team", "team", "enterprise"][rng.random_range(0..6)],
        };
        let custom = (i >= 4 && tier != "free" && rng.random_bool(0.15))
            .then(|| [20_000, 100_000, 500_000][rng.random_range(0..3)]);
        orgs.push(OrgInfo {
            id: random_uuid(&mut rng),
            slug: slugify(&name),
            name,
            tier: tier.to_owned(),
            custom_max_requests_monthly: custom,
        });
        // Most organizations are in the first few places.
        homes.push(if rng.random_bool(0.7) {
            rng.random_range(0..6)
        } else {
            rng.random_range(0..PLACES.len())
        });
        name_offsets.push(match i {
            0 => 0,
            1 => 1,
            _ => rng.random_range(0..KEY_NAMES.len()),
        });
    }

    // Which organization each key is in: one each first, then by tier, within tier key limits.
    let max_keys = |o: &OrgInfo| match o.tier.as_str() {
        "free" => 5,
        "pro" => 20,
        "team" => 50,
        _ => usize::MAX,
    };
    let mut org_of = Vec::with_capacity(opts.keys);
    let mut per_org = vec![0usize; n_orgs];
    for j in 0..opts.keys {
        let o = if j < n_orgs {
            j
        } else {
            let weights: Vec<(usize, f64)> = orgs
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let cap = if i == 0 { 3 } else { max_keys(o) };
                    let w = match o.tier.as_str() {
                        _ if per_org[i] >= cap => 0.0,
                        "enterprise" => 3.0,
                        "team" => 2.0,
                        "pro" => 1.5,
                        _ => 1.0,
                    };
                    (i, w)
                })
                .collect();
            let weights = cumulative(weights);
            if weights.last().is_some_and(|w| w.1 > 0.0) {
                pick(&weights, &mut rng)
            } else {
                n_orgs.min(2) - 1
            }
        };
        per_org[o] += 1;
        org_of.push(o);
    }

    // Keys.
    let mut keys = Vec::with_capacity(opts.keys);
    let mut seen_in_org = vec![0usize; n_orgs];
    for &o in &org_of {
        let org = &orgs[o];
        let nth = seen_in_org[o];
        seen_in_org[o] += 1;
        let (base_name, kind, web) = KEY_NAMES[(name_offsets[o] + nth) % KEY_NAMES.len()];
        let round = nth / KEY_NAMES.len();
        let name = if round == 0 {
            base_name.to_owned()
        } else {
            format!("{base_name}-{}", round + 1)
        };

        let id = random_uuid(&mut rng);
        let full = format!(
            "{KEY_PREFIX}01{}{}{}",
            id.simple(),
            hex::encode(rng.random::<u128>().to_le_bytes()),
            hex::encode(rng.random::<u64>().to_le_bytes()),
        );
        let key_hash = hash_key(&full);
        let prefix = stored_prefix(&full);
        drop(full);

        let unlimited = org.monthly_limit().0.is_none();
        let bursty = base_name == "ci-deploy" && unlimited && o != 0;
        let base = if o == 0 {
            lognormal(&mut rng, 1.0, 0.4)
        } else if bursty {
            lognormal(&mut rng, 2.0, 0.4)
        } else if let (Some(limit), _) = org.monthly_limit() {
            let share = rng.random_range(LIMITED_BUDGET.0..LIMITED_BUDGET.1);
            let budget = limit as f64 * share / AVG_MONTH_MINUTES / per_org[o] as f64;
            lognormal(&mut rng, 2.0, 0.8).min(budget)
        } else {
            lognormal(&mut rng, 5.0, 0.8).clamp(0.2, 60.0)
        };

        let n_mcps = [1, 2, 2, 3, 3, 4][rng.random_range(0..6)];
        let mut mcp_ids: Vec<usize> = Vec::with_capacity(n_mcps);
        while mcp_ids.len() < n_mcps {
            let m = rng.random_range(0..MCPS.len());
            if !mcp_ids.contains(&m) {
                mcp_ids.push(m);
            }
        }
        let mut w = 1.0;
        let mcps = cumulative(
            mcp_ids
                .iter()
                .map(|&m| {
                    let this = w;
                    w *= rng.random_range(0.25..0.7);
                    (m, this)
                })
                .collect(),
        );
        let selected = rng.random_bool(0.35);
        let denied: Vec<usize> = if selected {
            (0..MCPS.len()).filter(|m| !mcp_ids.contains(m)).collect()
        } else {
            Vec::new()
        };
        let allowed_mcp_ids = if selected {
            mcp_ids
                .iter()
                .map(|&m| mcp_instance_id(org.id, MCPS[m].name))
                .collect()
        } else {
            Vec::new()
        };

        let n_locs = [1, 1, 2, 2, 3][rng.random_range(0..5)];
        let mut places = vec![homes[o]];
        while places.len() < n_locs {
            let p = rng.random_range(0..PLACES.len());
            if !places.contains(&p) {
                places.push(p);
            }
        }
        let locations = cumulative(
            places
                .iter()
                .zip([0.85, 0.12, 0.03])
                .map(|(&p, w)| (PLACES[p].address(&mut rng), w))
                .collect(),
        );
        let user_agent = if web {
            BROWSER_AGENT
        } else {
            match kind {
                Kind::Batch => SDK_AGENTS[[0, 3][rng.random_range(0..2)]],
                Kind::Service => SDK_AGENTS[rng.random_range(0..3)],
                Kind::Office => [SDK_AGENTS[0], SDK_AGENTS[1], DEBUG_AGENT][rng.random_range(0..3)],
            }
        };
        let origin = web.then(|| format!("https://{}.example.com", org.slug));

        let created_at =
            period.start - chrono::Duration::seconds(rng.random_range(2 * 86_400..400 * 86_400));
        let expires_at = rng.random_bool(0.25).then(|| {
            period.end + chrono::Duration::seconds(rng.random_range(3 * 86_400..200 * 86_400))
        });
        let rpm_pick = RPM_CHOICES[[0, 1, 1, 3, 4][rng.random_range(0..5)]];

        keys.push(SimKey {
            info: KeyInfo {
                id,
                org_id: org.id,
                name,
                prefix,
                rate_limit_rpm: if bursty { 60 } else { rpm_pick },
                expires_at,
                created_at: Some(created_at.with_timezone(&Utc)),
                status: "active".to_owned(),
                revoked_at: None,
                mcp_access_mode: if selected { "selected" } else { "all" }.to_owned(),
                allowed_mcp_ids,
                scopes: vec!["mcp:invoke".to_owned()],
            },
            key_hash,
            traffic: Traffic {
                kind,
                tz_hours: PLACES[homes[o]].tz_hours,
                base,
                bursty,
                mcps,
                denied,
                locations,
                user_agent,
                origin,
            },
        });
    }

    let mut plan = Plan { orgs, keys };

    // Rate limits: at least twice a key's expected peak, except for the bursty keys.
    let model = Model::new(&plan, opts);
    for (k, key) in plan.keys.iter_mut().enumerate() {
        if key.traffic.bursty {
            continue;
        }
        let peak = key.traffic.base
            * model.profile_max[model.key_profile[k]] as f64
            * model.nominal_multiplier(k);
        let need = (2.0 * peak).ceil() as u32;
        if key.info.rate_limit_rpm < need {
            key.info.rate_limit_rpm = RPM_CHOICES
                .iter()
                .copied()
                .find(|&r| r >= need)
                .unwrap_or(10_000);
        }
    }
    plan
}

// ---------------------------------------------------------------------------------------------
// The period and the expected volumes.

#[derive(Debug, Clone, Copy)]
struct Period {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Events fall in `start_ms..=end_ms`.
    start_ms: i64,
    end_ms: i64,
    first_minute: i64,
    minutes: usize,
}

impl Period {
    fn new(opts: &SimOptions) -> Period {
        let duration_ms = if opts.days.is_finite() && opts.days > 0.0 {
            ((opts.days * 86_400_000.0).round() as i64).clamp(1, 100 * 365 * 86_400_000)
        } else {
            1
        };
        let end_ms = opts.end.timestamp_millis();
        let sub_ms = !opts.end.timestamp_subsec_nanos().is_multiple_of(1_000_000);
        let start_ms = end_ms - duration_ms + i64::from(sub_ms);
        let first_minute = start_ms.div_euclid(60_000);
        let last_minute = end_ms.div_euclid(60_000);
        Period {
            start: opts.end - chrono::Duration::milliseconds(duration_ms),
            end: opts.end,
            start_ms,
            end_ms,
            first_minute,
            minutes: (last_minute - first_minute + 1) as usize,
        }
    }

    /// The milliseconds of minute `i` inside the period, as offsets within the minute.
    fn covered(&self, i: usize) -> (u32, u32) {
        let m0 = (self.first_minute + i as i64) * 60_000;
        let lo = (self.start_ms - m0).max(0);
        let hi = (self.end_ms + 1 - m0).min(60_000);
        (lo as u32, hi as u32)
    }
}

fn next_month_start(ms: i64) -> i64 {
    let t = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .map_or(i64::MAX, |d| d.timestamp_millis())
}

/// Activity of a kind in a time zone for each minute of a UTC week (Monday 00:00 first),
/// averaging 1.
fn profile(kind: Kind, tz_hours: i32) -> Vec<f32> {
    let hourly = kind.hourly();
    let mut v: Vec<f64> = (0..MINUTES_PER_WEEK)
        .map(|i| {
            let local = (i as i64 + tz_hours as i64 * 60).rem_euclid(MINUTES_PER_WEEK as i64);
            let day = local / 1440;
            let h = (local % 1440) as f64 / 60.0;
            let (h0, f) = (h.floor() as usize, h.fract());
            let x = hourly[h0] * (1.0 - f) + hourly[(h0 + 1) % 24] * f;
            if day >= 5 { x * kind.weekend() } else { x }
        })
        .collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter_mut().for_each(|x| *x /= mean);
    v.into_iter().map(|x| x as f32).collect()
}

/// Index into a [`profile`] of an absolute minute (minutes since 1970-01-01, a Thursday).
fn week_minute(minute: i64) -> usize {
    (minute + 3 * 1440).rem_euclid(MINUTES_PER_WEEK as i64) as usize
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No `lines`: natural volume.
    Natural,
    /// `lines`: organization 0 stays on its target, the other keys share the rest (the
    /// unlimited organizations' keys take any extra volume, the others keep their natural
    /// rates unless there is less than that).
    Paced,
    /// `lines`, fewer than organization 0's own volume (or no other keys): every key scales.
    Uniform,
    /// `lines` with no keys at all: only refused keys.
    RefusedOnly,
}

/// Expected volumes of a plan over the period, shared by [`plan`] and [`generate`].
struct Model {
    period: Period,
    profiles: Vec<Vec<f32>>,
    profile_max: Vec<f32>,
    key_profile: Vec<usize>,
    key_group: Vec<Group>,
    key_org: Vec<usize>,
    /// Prefix sums per minute of `base * profile * covered fraction`, per group.
    p0: Vec<f64>,
    pf: Vec<f64>,
    ps: Vec<f64>,
    /// Prefix sums of organization 0's nominal volume (with its multipliers).
    po: Vec<f64>,
    /// Minute indices where a calendar month begins (0 first).
    segments: Vec<usize>,
    /// Organization 0's multiplier per segment (the last is the nominal one of its month).
    s0: Vec<f64>,
    org0_limit: Option<u64>,
    org0_target: u64,
    mode: Mode,
    /// Refused lines per known line.
    rho: f64,
    /// Multipliers of the fixed and the scalable keys (all keys in [`Mode::Uniform`]),
    /// estimated from the totals, for the rate limits.
    scale_estimate: (f64, f64),
}

impl Model {
    fn new(plan: &Plan, opts: &SimOptions) -> Model {
        let period = Period::new(opts);
        let org_index: HashMap<Uuid, usize> = plan
            .orgs
            .iter()
            .enumerate()
            .map(|(i, o)| (o.id, i))
            .collect();
        let mut combos: Vec<(Kind, i32)> = Vec::new();
        let mut key_profile = Vec::with_capacity(plan.keys.len());
        let mut key_group = Vec::with_capacity(plan.keys.len());
        let mut key_org = Vec::with_capacity(plan.keys.len());
        for k in &plan.keys {
            let c = (k.traffic.kind, k.traffic.tz_hours);
            let idx = combos.iter().position(|x| *x == c).unwrap_or_else(|| {
                combos.push(c);
                combos.len() - 1
            });
            key_profile.push(idx);
            // A key of an organization missing from the plan behaves like a fixed one.
            let o = org_index.get(&k.info.org_id).copied();
            key_org.push(o.unwrap_or(usize::MAX));
            key_group.push(match o {
                Some(o) => group_of(o, &plan.orgs[o], &k.traffic),
                None => Group::Fixed,
            });
        }
        let profiles: Vec<Vec<f32>> = combos.iter().map(|&(k, tz)| profile(k, tz)).collect();
        let profile_max = profiles
            .iter()
            .map(|p| p.iter().copied().fold(0.0, f32::max))
            .collect();

        let n = period.minutes;
        let (mut p0, mut pf, mut ps) = (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n + 1]);
        for i in 0..n {
            let (lo, hi) = period.covered(i);
            let frac = f64::from(hi - lo) / 60_000.0;
            let wm = week_minute(period.first_minute + i as i64);
            let mut e = [0.0f64; 3];
            for (k, key) in plan.keys.iter().enumerate() {
                let g = key_group[k] as usize;
                let shape = f64::from(profiles[key_profile[k]][wm]);
                e[g] += key.traffic.base * shape;
                if key.traffic.bursty {
                    let burst = f64::from(key.info.rate_limit_rpm) * BURST_SIZE;
                    e[g] += BURST_CHANCE * shape * burst;
                }
            }
            p0[i + 1] = p0[i] + e[Group::Org0 as usize] * frac;
            pf[i + 1] = pf[i] + e[Group::Fixed as usize] * frac;
            ps[i + 1] = ps[i] + e[Group::Scalable as usize] * frac;
        }

        let mut segments = vec![0usize];
        let mut b = next_month_start(period.start_ms);
        while b <= period.end_ms {
            segments.push((b.div_euclid(60_000) - period.first_minute) as usize);
            b = next_month_start(b);
        }
        let org0_limit = plan.orgs.first().and_then(|o| o.monthly_limit().0);
        let org0_target = org0_limit.map_or(0, |l| (l as f64 * ORG0_TARGET).round() as u64);
        let seg_sum = |j: usize| {
            let a = segments[j];
            let b = segments.get(j + 1).copied().unwrap_or(n);
            p0[b] - p0[a]
        };
        let last = segments.len() - 1;
        let s0: Vec<f64> = match org0_limit {
            None => vec![1.0; segments.len()],
            Some(limit) => {
                let e_w = seg_sum(last);
                let s_w = if e_w > 0.0 {
                    org0_target as f64 / e_w
                } else {
                    0.0
                };
                (0..segments.len())
                    .map(|j| {
                        if j == last {
                            return s_w;
                        }
                        let e = seg_sum(j);
                        let cap = if e > 0.0 {
                            ORG0_EARLIER_CAP * limit as f64 / e
                        } else {
                            0.0
                        };
                        if s_w > 0.0 { s_w.min(cap) } else { cap * 0.5 }
                    })
                    .collect()
            }
        };
        let mut po = vec![0.0; n + 1];
        let mut seg = 0;
        for i in 0..n {
            if seg + 1 < segments.len() && i >= segments[seg + 1] {
                seg += 1;
            }
            po[i + 1] = po[i] + (p0[i + 1] - p0[i]) * s0[seg];
        }

        let refused = opts.refused_share.clamp(0.0, 0.95);
        let rho = refused / (1.0 - refused);
        let (o_tot, f_tot, s_tot) = (po[n], pf[n], ps[n]);
        let (mode, scale_estimate) = match opts.lines {
            None => (Mode::Natural, (1.0, 1.0)),
            Some(lines) => {
                let known = lines as f64 / (1.0 + rho);
                if f_tot + s_tot > 0.0 && known >= o_tot {
                    (Mode::Paced, share_rest(known - o_tot, f_tot, s_tot))
                } else if o_tot + f_tot + s_tot > 0.0 {
                    let u = known / (o_tot + f_tot + s_tot);
                    (Mode::Uniform, (u, u))
                } else {
                    (Mode::RefusedOnly, (0.0, 0.0))
                }
            }
        };
        Model {
            period,
            profiles,
            profile_max,
            key_profile,
            key_group,
            key_org,
            p0,
            pf,
            ps,
            po,
            segments,
            s0,
            org0_limit,
            org0_target,
            mode,
            rho,
            scale_estimate,
        }
    }

    /// A key's typical multiplier over its natural rate (the largest, for organization 0).
    fn nominal_multiplier(&self, k: usize) -> f64 {
        let (fixed, scalable) = self.scale_estimate;
        match self.key_group[k] {
            Group::Org0 if self.mode == Mode::Uniform => {
                self.s0.iter().copied().fold(0.0, f64::max) * fixed
            }
            Group::Org0 => self.s0.iter().copied().fold(0.0, f64::max),
            Group::Fixed => fixed,
            Group::Scalable => scalable,
        }
    }
}

/// Multipliers of the fixed and the scalable keys so that their expected volumes (`fixed`,
/// `scalable`) come to `avail`: the scalable keys take any extra, both scale down if short.
fn share_rest(avail: f64, fixed: f64, scalable: f64) -> (f64, f64) {
    let avail = avail.max(0.0);
    if scalable > 0.0 && avail >= fixed {
        (1.0, (avail - fixed) / scalable)
    } else if fixed + scalable > 0.0 {
        let u = avail / (fixed + scalable);
        (u, u)
    } else {
        (0.0, 0.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Generation.

/// A key as the writer needs it: JSON fragments ready to copy.
struct KeyRt<'a> {
    /// `","organization_id":"…","api_key_id":"…","key_prefix":"…","mcp_server_name":"`
    ids: Vec<u8>,
    org: usize,
    rpm: u32,
    limited_org: bool,
    t: &'a Traffic,
    selected: bool,
    locations: Vec<(Vec<u8>, f64)>,
    /// `,"origin":"…"` or empty.
    origin: Vec<u8>,
}

/// A stream a request can come from: a key, or the refused-key scanners.
const REFUSED: u32 = u32::MAX;

fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            0..=0x1f => {
                buf.extend_from_slice(format!("\\u{b:04x}").as_bytes());
            }
            _ => buf.push(b),
        }
    }
}

fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

fn push_uuid(buf: &mut Vec<u8>, rng: &mut StdRng) {
    let mut tmp = [0u8; uuid::fmt::Hyphenated::LENGTH];
    random_uuid(rng).hyphenated().encode_lower(&mut tmp);
    buf.extend_from_slice(&tmp);
}

/// What happened to one request.
struct Outcome {
    status: u16,
    code: Option<&'static str>,
    rate_limit_hit: bool,
    quota_exceeded: bool,
    mcp: usize,
}

/// Writes synthetic traffic for `plan` over the period of `opts`, one JSON line per request,
/// in event-time order, and returns what it wrote. The same plan and options give the same
/// bytes. With `opts.lines` it writes exactly that many lines.
pub fn generate<W: Write>(plan: &Plan, opts: &SimOptions, mut out: W) -> io::Result<SimStats> {
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x7472_6166_6669_6373);
    let model = Model::new(plan, opts);
    let period = model.period;
    let n_min = period.minutes;
    let error_share = opts.error_share.clamp(0.0, 1.0);

    let rt: Vec<KeyRt<'_>> = plan
        .keys
        .iter()
        .enumerate()
        .map(|(k, key)| {
            let mut ids = Vec::new();
            ids.extend_from_slice(b"\",\"organization_id\":\"");
            push_json_str(&mut ids, &key.info.org_id.hyphenated().to_string());
            ids.extend_from_slice(b"\",\"api_key_id\":\"");
            push_json_str(&mut ids, &key.info.id.hyphenated().to_string());
            ids.extend_from_slice(b"\",\"key_prefix\":\"");
            push_json_str(&mut ids, &key.info.prefix);
            ids.extend_from_slice(b"\",\"mcp_server_name\":\"");
            let org = model.key_org[k];
            let mut origin = Vec::new();
            if let Some(o) = &key.traffic.origin {
                origin.extend_from_slice(b",\"origin\":\"");
                push_json_str(&mut origin, o);
                origin.push(b'"');
            }
            KeyRt {
                ids,
                org,
                rpm: key.info.rate_limit_rpm,
                limited_org: plan
                    .orgs
                    .get(org)
                    .is_some_and(|o| o.monthly_limit().0.is_some()),
                t: &key.traffic,
                selected: key.info.mcp_access_mode == "selected",
                locations: key
                    .traffic
                    .locations
                    .iter()
                    .map(|(ip, w)| {
                        let mut b = Vec::new();
                        push_json_str(&mut b, ip);
                        (b, *w)
                    })
                    .collect(),
                origin,
            }
        })
        .collect();
    let org_limits: Vec<u64> = plan
        .orgs
        .iter()
        .map(|o| o.monthly_limit().0.unwrap_or(u64::MAX))
        .collect();

    // Refused keys: a handful of scanners, each retrying one or two made-up prefixes.
    let known_heads: Vec<&str> = plan
        .keys
        .iter()
        .map(|k| k.info.prefix.get(..12).unwrap_or(&k.info.prefix))
        .collect();
    let mut bogus: Vec<String> = Vec::new();
    while bogus.len() < 6 {
        let p = format!("{KEY_PREFIX}01{:05x}", rng.random::<u32>() & 0xf_ffff);
        if !known_heads.contains(&p.as_str()) && !bogus.contains(&p) {
            bogus.push(p);
        }
    }
    let scanners: Vec<(String, &'static str)> = (0..4)
        .map(|_| {
            let place = &PLACES[rng.random_range(0..PLACES.len())];
            (
                place.address(&mut rng),
                SCANNER_AGENTS[rng.random_range(0..SCANNER_AGENTS.len())],
            )
        })
        .collect();

    let mut stats = SimStats {
        lines: 0,
        start: period.start,
        end: period.end,
        ok: 0,
        client_errors: 0,
        unauthorized: 0,
        forbidden: 0,
        rate_limited: 0,
        quota_exceeded: 0,
        server_errors: 0,
        org_month_to_date: vec![0; plan.orgs.len()],
    };
    let target_lines = opts.lines;
    let w0 = *model.segments.last().unwrap_or(&0);
    let pace_org0 = model.org0_limit.is_some()
        && matches!(model.mode, Mode::Natural | Mode::Paced)
        && model.key_group.contains(&Group::Org0);
    let mut org0_in_w: u64 = 0;

    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut events: Vec<u64> = Vec::new();
    let mut lambdas: Vec<f64> = vec![0.0; rt.len()];
    let mut minute_count: Vec<u32> = vec![0; rt.len()];
    let mut quota_used: Vec<u64> = vec![0; plan.orgs.len()];
    let mut seg = 0usize;

    'minutes: for i in 0..n_min {
        if seg + 1 < model.segments.len() && i >= model.segments[seg + 1] {
            seg += 1;
            quota_used.iter_mut().for_each(|q| *q = 0);
        }
        let remaining = target_lines.map(|n| n - stats.lines);
        if remaining == Some(0) {
            break;
        }
        let last = i + 1 == n_min;
        let minute = period.first_minute + i as i64;
        let wm = week_minute(minute);
        let (lo, hi) = period.covered(i);
        let frac = f64::from(hi - lo) / 60_000.0;

        // Multipliers for this minute.
        let known_rem = |p: &Vec<f64>| p[n_min] - p[i];
        let (mut m_fixed, mut m_scal) = (1.0, 1.0);
        let mut m_org0 = model.s0[seg];
        let org0_left = model.org0_target.saturating_sub(org0_in_w);
        match (model.mode, remaining) {
            (Mode::Paced, Some(r)) => {
                let want = r as f64 / (1.0 + model.rho);
                let org0_rem = if !pace_org0 {
                    known_rem(&model.po)
                } else if i < w0 {
                    model.po[w0] - model.po[i] + model.org0_target as f64
                } else {
                    org0_left as f64
                };
                (m_fixed, m_scal) =
                    share_rest(want - org0_rem, known_rem(&model.pf), known_rem(&model.ps));
            }
            (Mode::Uniform, Some(r)) => {
                let t_rem = known_rem(&model.po) + known_rem(&model.pf) + known_rem(&model.ps);
                let u = if t_rem > 0.0 {
                    r as f64 / (1.0 + model.rho) / t_rem
                } else {
                    0.0
                };
                (m_fixed, m_scal, m_org0) = (u, u, m_org0 * u);
            }
            _ => {}
        }
        // Organization 0 never draws more than what is left of its target.
        let mut org0_cap = u64::MAX;
        if pace_org0 && i >= w0 {
            let e_rem = known_rem(&model.p0);
            m_org0 = if e_rem > 0.0 {
                org0_left as f64 / e_rem
            } else {
                0.0
            };
            org0_cap = org0_left;
        }

        // Arrivals.
        events.clear();
        let span = hi - lo;
        let mut known_lambda = 0.0;
        for (k, key) in rt.iter().enumerate() {
            let g = model.key_group[k];
            let mult = match g {
                Group::Org0 => m_org0,
                Group::Fixed => m_fixed,
                Group::Scalable => m_scal,
            };
            let shape = f64::from(model.profiles[model.key_profile[k]][wm]);
            let lambda = key.t.base * shape * frac * mult;
            lambdas[k] = lambda;
            known_lambda += lambda;
            let mut n = poisson(&mut rng, lambda);
            if g == Group::Org0 {
                n = n.min(org0_cap);
                org0_cap -= n;
            }
            if key.t.bursty && rng.random::<f64>() < BURST_CHANCE * shape * frac * m_fixed {
                let size = f64::from(key.rpm) * rng.random_range(1.1..2.0);
                n += poisson(&mut rng, size);
            }
            for _ in 0..n {
                events.push(((lo + rng.random_range(0..span)) as u64) << 32 | k as u64);
            }
        }
        let refused_lambda = if model.mode == Mode::RefusedOnly {
            let rem_ms = (period.end_ms + 1 - (minute * 60_000).max(period.start_ms)) as f64;
            remaining.unwrap_or(0) as f64 * f64::from(span) / rem_ms
        } else {
            model.rho * known_lambda
        };
        for _ in 0..poisson(&mut rng, refused_lambda) {
            events.push(((lo + rng.random_range(0..span)) as u64) << 32 | u64::from(REFUSED));
        }

        if last {
            // Organization 0 ends exactly on its target; with `lines`, the total on its count.
            let is_org0 = |e: &u64| {
                let k = (*e & 0xffff_ffff) as u32;
                k != REFUSED && model.key_group[k as usize] == Group::Org0
            };
            let mut org0_events = Vec::new();
            if pace_org0 && i >= w0 {
                events.retain(|e| !is_org0(e));
                let need = model.org0_target.saturating_sub(org0_in_w);
                let weights = cumulative(
                    (0..rt.len())
                        .filter(|&k| model.key_group[k] == Group::Org0)
                        .map(|k| (k, lambdas[k].max(1e-9)))
                        .collect(),
                );
                for _ in 0..need {
                    let k = weights[pick(&weights, &mut rng)].0;
                    org0_events.push(((lo + rng.random_range(0..span)) as u64) << 32 | k as u64);
                }
            }
            if let Some(r) = remaining {
                let r = r as usize;
                if org0_events.len() > r {
                    org0_events.truncate(r);
                }
                let others = r - org0_events.len();
                if events.len() > others {
                    // Drop a random selection of the others.
                    for j in (1..events.len()).rev() {
                        events.swap(j, rng.random_range(0..=j));
                    }
                    events.truncate(others);
                } else if events.len() < others {
                    let mut weights: Vec<(u32, f64)> = (0..rt.len())
                        .filter(|&k| model.key_group[k] != Group::Org0)
                        .map(|k| (k as u32, lambdas[k]))
                        .filter(|x| x.1 > 0.0)
                        .collect();
                    if refused_lambda > 0.0 {
                        weights.push((REFUSED, refused_lambda));
                    }
                    if weights.is_empty() {
                        weights = (0..rt.len()).map(|k| (k as u32, 1.0)).collect();
                    }
                    if weights.is_empty() {
                        weights.push((REFUSED, 1.0));
                    }
                    let weights = cumulative(weights);
                    while events.len() < others {
                        let k = weights[pick(&weights, &mut rng)].0;
                        events.push(((lo + rng.random_range(0..span)) as u64) << 32 | u64::from(k));
                    }
                }
            }
            events.extend_from_slice(&org0_events);
        }
        events.sort_unstable();
        if let Some(r) = remaining {
            // The other streams never take the lines organization 0 still needs.
            let reserve = if pace_org0 && !last {
                if i < w0 { model.org0_target } else { org0_left }
            } else {
                0
            };
            let is_org0 = |e: u64| {
                let k = (e & 0xffff_ffff) as u32;
                k != REFUSED && model.key_group[k as usize] == Group::Org0
            };
            let c0 = events.iter().filter(|&&e| is_org0(e)).count() as u64;
            let mut others_left = r.saturating_sub(reserve.max(c0));
            if (events.len() as u64) > c0 + others_left {
                events.retain(|&e| {
                    is_org0(e)
                        || others_left
                            .checked_sub(1)
                            .map(|x| others_left = x)
                            .is_some()
                });
            }
            events.truncate(r as usize);
        }

        // Lines.
        let ts = DateTime::<Utc>::from_timestamp(minute * 60, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:")
            .to_string();
        for &e in &events {
            let offset = (e >> 32) as u32;
            let k = (e & 0xffff_ffff) as u32;
            buf.extend_from_slice(b"{\"request_id\":\"");
            push_uuid(&mut buf, &mut rng);
            buf.extend_from_slice(b"\",\"created_at\":\"");
            buf.extend_from_slice(ts.as_bytes());
            let (sec, ms) = (offset / 1000, offset % 1000);
            buf.extend_from_slice(&[
                b'0' + (sec / 10) as u8,
                b'0' + (sec % 10) as u8,
                b'.',
                b'0' + (ms / 100) as u8,
                b'0' + (ms / 10 % 10) as u8,
                b'0' + (ms % 10) as u8,
                b'Z',
            ]);
            if k == REFUSED {
                write_refused(&mut buf, &mut rng, &bogus, &scanners);
                stats.unauthorized += 1;
            } else {
                let k = k as usize;
                let key = &rt[k];
                minute_count[k] += 1;
                let outcome = decide(
                    key,
                    minute_count[k],
                    quota_used.get_mut(key.org),
                    org_limits.get(key.org).copied().unwrap_or(u64::MAX),
                    error_share,
                    &mut rng,
                );
                match outcome.status {
                    200..=299 => stats.ok += 1,
                    403 => stats.forbidden += 1,
                    429 if outcome.quota_exceeded => stats.quota_exceeded += 1,
                    429 => stats.rate_limited += 1,
                    500..=599 => stats.server_errors += 1,
                    _ => stats.client_errors += 1,
                }
                if i >= w0 {
                    if let Some(c) = stats.org_month_to_date.get_mut(key.org) {
                        *c += 1;
                    }
                    if model.key_group[k] == Group::Org0 {
                        org0_in_w += 1;
                    }
                }
                write_known(&mut buf, &mut rng, key, &outcome);
            }
            stats.lines += 1;
            if buf.len() >= (1 << 20) - 4096 {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        for &e in &events {
            let k = (e & 0xffff_ffff) as u32;
            if k != REFUSED {
                minute_count[k as usize] = 0;
            }
        }
        if target_lines.is_some_and(|n| stats.lines >= n) {
            break 'minutes;
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    Ok(stats)
}

/// The fate of a known key's request: rate limit, then quota, then the MCP's answer.
fn decide(
    key: &KeyRt<'_>,
    in_minute: u32,
    quota_used: Option<&mut u64>,
    limit: u64,
    error_share: f64,
    rng: &mut StdRng,
) -> Outcome {
    let mcp = key.t.mcps[pick(&key.t.mcps, rng)].0;
    let fail = |status, code| Outcome {
        status,
        code: Some(code),
        rate_limit_hit: false,
        quota_exceeded: false,
        mcp,
    };
    if key.rpm > 0 && in_minute > key.rpm {
        return Outcome {
            rate_limit_hit: true,
            ..fail(429, "rate_limited")
        };
    }
    if let Some(used) = quota_used {
        if key.limited_org && *used >= limit {
            return Outcome {
                quota_exceeded: true,
                ..fail(429, "quota_exceeded")
            };
        }
        *used += 1;
    }
    let u: f64 = rng.random();
    if u >= error_share {
        return Outcome {
            status: 200,
            code: None,
            rate_limit_hit: false,
            quota_exceeded: false,
            mcp,
        };
    }
    let u = u / error_share;
    if u < 0.6 {
        let (status, code) = [
            (500, "internal_error"),
            (502, "bad_gateway"),
            (502, "bad_gateway"),
            (503, "service_unavailable"),
            (504, "gateway_timeout"),
        ][rng.random_range(0..5)];
        fail(status, code)
    } else if u < 0.85 {
        if rng.random_bool(0.6) {
            fail(400, "invalid_request")
        } else {
            fail(404, "not_found")
        }
    } else if key.selected && !key.t.denied.is_empty() {
        Outcome {
            mcp: key.t.denied[rng.random_range(0..key.t.denied.len())],
            ..fail(403, "mcp_not_permitted")
        }
    } else {
        fail(403, "forbidden")
    }
}

/// Writes the rest of a known key's line, after `created_at`.
fn write_known(buf: &mut Vec<u8>, rng: &mut StdRng, key: &KeyRt<'_>, o: &Outcome) {
    let mcp = &MCPS[o.mcp];
    buf.extend_from_slice(&key.ids);
    buf.extend_from_slice(mcp.name.as_bytes());
    buf.extend_from_slice(
        b"\",\"endpoint_path\":\"/mcp\",\"http_method\":\"POST\",\"http_status_code\":",
    );
    push_u64(buf, u64::from(o.status));
    let request = lognormal(rng, 600.0, 0.8).max(60.0) as u64;
    let (latency, response) = match o.status {
        200..=299 => {
            let mut l = lognormal(rng, mcp.latency_ms, 0.5);
            if rng.random::<u32>() % 50 == 0 {
                l *= rng.random_range(3.0..10.0);
            }
            (l, lognormal(rng, mcp.response_bytes, 1.0).max(40.0))
        }
        504 => (lognormal(rng, 30_000.0, 0.05), 160.0),
        500 => (lognormal(rng, mcp.latency_ms, 0.5), 150.0),
        502 => (lognormal(rng, 25.0, 0.6), 140.0),
        503 => (lognormal(rng, 4.0, 0.5), 140.0),
        404 => (lognormal(rng, 20.0, 0.5), 120.0),
        _ => (lognormal(rng, 2.5, 0.4), 110.0),
    };
    buf.extend_from_slice(b",\"latency_ms\":");
    push_u64(buf, latency.max(1.0) as u64);
    buf.extend_from_slice(b",\"request_size_bytes\":");
    push_u64(buf, request);
    buf.extend_from_slice(b",\"response_size_bytes\":");
    push_u64(buf, response as u64);
    buf.extend_from_slice(b",\"tokens_used\":");
    if o.status == 200 && rng.random::<u32>() % 100 < 35 {
        push_u64(buf, (response / 4.0) as u64 + rng.random_range(0..50));
    } else {
        buf.extend_from_slice(b"null");
    }
    buf.extend_from_slice(b",\"source_ip\":\"");
    buf.extend_from_slice(&key.locations[pick(&key.locations, rng)].0);
    buf.extend_from_slice(b"\",\"user_agent\":\"");
    let ua = if rng.random::<u32>() % 100 < 3 {
        DEBUG_AGENT
    } else {
        key.t.user_agent
    };
    buf.extend_from_slice(ua.as_bytes());
    buf.extend_from_slice(b"\",\"error_code\":");
    match o.code {
        Some(c) => {
            buf.push(b'"');
            buf.extend_from_slice(c.as_bytes());
            buf.push(b'"');
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(if o.rate_limit_hit {
        b",\"rate_limit_hit\":true"
    } else {
        b",\"rate_limit_hit\":false"
    });
    buf.extend_from_slice(if o.quota_exceeded {
        b",\"quota_exceeded\":true"
    } else {
        b",\"quota_exceeded\":false"
    });
    buf.extend_from_slice(b",\"metadata\":{\"tool_name\":\"");
    buf.extend_from_slice(mcp.tools[rng.random_range(0..mcp.tools.len())].as_bytes());
    buf.push(b'"');
    buf.extend_from_slice(&key.origin);
    buf.extend_from_slice(b"}}\n");
}

/// Writes the rest of a refused key's line, after `created_at`.
fn write_refused(
    buf: &mut Vec<u8>,
    rng: &mut StdRng,
    bogus: &[String],
    scanners: &[(String, &'static str)],
) {
    let s = rng.random_range(0..scanners.len());
    let prefix = &bogus[(s + rng.random_range(0..2)) % bogus.len()];
    buf.extend_from_slice(b"\",\"organization_id\":null,\"api_key_id\":null,\"key_prefix\":\"");
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(b"\",\"mcp_server_name\":null,\"endpoint_path\":\"/mcp\",\"http_method\":\"POST\",\"http_status_code\":401,\"latency_ms\":");
    push_u64(buf, rng.random_range(1..4));
    buf.extend_from_slice(b",\"request_size_bytes\":");
    push_u64(buf, rng.random_range(150..400));
    buf.extend_from_slice(b",\"response_size_bytes\":92,\"tokens_used\":null,\"source_ip\":\"");
    buf.extend_from_slice(scanners[s].0.as_bytes());
    buf.extend_from_slice(b"\",\"user_agent\":\"");
    buf.extend_from_slice(scanners[s].1.as_bytes());
    buf.extend_from_slice(b"\",\"error_code\":\"unauthorized\",\"rate_limit_hit\":false,\"quota_exceeded\":false,\"metadata\":{\"tool_name\":\"tools/list\"}}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_line;

    fn month_start(ms: i64) -> i64 {
        let t = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
            .single()
            .map_or(ms, |d| d.timestamp_millis())
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn run(opts: &SimOptions) -> (Plan, Vec<u8>, SimStats) {
        let plan = plan(opts);
        let mut out = Vec::new();
        let stats = generate(&plan, opts, &mut out).unwrap();
        (plan, out, stats)
    }

    fn lines(out: &[u8]) -> impl Iterator<Item = &[u8]> {
        out.split(|&b| b == b'\n').filter(|l| !l.is_empty())
    }

    /// Organization 0's lines in the month containing `end`, counted from the output by
    /// looking at the text (RFC 3339 times in one format compare as strings).
    fn org0_month_to_date(plan: &Plan, out: &[u8], end: DateTime<Utc>) -> u64 {
        let from = DateTime::<Utc>::from_timestamp_millis(month_start(end.timestamp_millis()))
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let needle = format!("\"organization_id\":\"{}\"", plan.orgs[0].id);
        lines(out)
            .map(|l| std::str::from_utf8(l).unwrap())
            .filter(|l| l.contains(&needle) && l[67..91] >= *from)
            .count() as u64
    }

    #[test]
    fn same_seed_same_bytes_different_seed_different() {
        let opts = SimOptions::new(at("2026-12-01T09:30:00Z"));
        let (p1, a, _) = run(&opts);
        let (p2, b, _) = run(&opts);
        assert!(!a.is_empty());
        assert_eq!(a, b);
        assert_eq!(p1.orgs, p2.orgs);
        let ids = |p: &Plan| -> Vec<_> {
            p.keys
                .iter()
                .map(|k| (k.info.clone(), k.key_hash.clone()))
                .collect()
        };
        assert_eq!(ids(&p1), ids(&p2));
        let other = SimOptions { seed: 2, ..opts };
        let (p3, c, _) = run(&other);
        assert_ne!(a, c);
        assert_ne!(p1.keys[0].info.id, p3.keys[0].info.id);
    }

    #[test]
    fn every_line_parses_in_order_within_the_period() {
        let end = at("2026-12-01T09:30:00Z");
        let opts = SimOptions {
            days: 1.5,
            ..SimOptions::new(end)
        };
        let (plan, out, stats) = run(&opts);
        let start = end - chrono::Duration::milliseconds((1.5 * 86_400_000.0) as i64);
        assert_eq!(stats.start, start);
        let mut prev = start;
        let mut n = 0;
        let prefixes: Vec<&str> = plan.keys.iter().map(|k| k.info.prefix.as_str()).collect();
        for line in lines(&out) {
            let r = parse_line(line).unwrap_or_else(|e| {
                panic!("{e}: {}", String::from_utf8_lossy(line));
            });
            assert!(r.created_at >= prev, "out of order");
            assert!(r.created_at <= end);
            prev = r.created_at;
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            let ts = v["created_at"].as_str().unwrap();
            assert_eq!(ts.len(), 24, "{ts}");
            assert!(ts.ends_with('Z'));
            assert!(v["metadata"]["tool_name"].is_string());
            for field in ["request_id", "tokens_used", "error_code", "source_ip"] {
                assert!(v.get(field).is_some(), "{field} missing");
            }
            assert!(r.source_ip.is_some() && r.user_agent.is_some());
            assert_eq!(r.endpoint_path.as_deref(), Some("/mcp"));
            assert_eq!(r.http_method.as_deref(), Some("POST"));
            if r.api_key_id.is_some() {
                let p = r.key_prefix.as_deref().unwrap();
                assert!(prefixes.contains(&p));
            }
            n += 1;
        }
        assert_eq!(n, stats.lines);
        assert!(n > 10_000, "{n} lines");
    }

    #[test]
    fn exactly_n_lines_with_lines() {
        let end = at("2026-11-20T12:00:00Z");
        for (n, keys, days) in [
            (1u64, 12, 1.0),
            (137, 12, 1.0),
            (50_000, 12, 3.0),
            (5_000, 1, 0.5),
        ] {
            let opts = SimOptions {
                lines: Some(n),
                keys,
                days,
                ..SimOptions::new(end)
            };
            let (_, out, stats) = run(&opts);
            assert_eq!(stats.lines, n);
            assert_eq!(lines(&out).count() as u64, n);
            for l in lines(&out) {
                parse_line(l).unwrap();
            }
        }
        let none = SimOptions {
            lines: Some(300),
            keys: 0,
            ..SimOptions::new(end)
        };
        let (_, out, _) = run(&none);
        assert_eq!(lines(&out).count(), 300);
    }

    #[test]
    fn big_line_counts_reach_the_end_with_few_429s() {
        let end = at("2026-12-01T09:30:00Z");
        let opts = SimOptions {
            lines: Some(200_000),
            ..SimOptions::new(end)
        };
        let (plan, out, stats) = run(&opts);
        assert_eq!(stats.lines, 200_000);
        let last = parse_line(lines(&out).last().unwrap()).unwrap();
        assert!(end - last.created_at < chrono::Duration::minutes(2));
        assert!(
            stats.rate_limited + stats.quota_exceeded < stats.lines / 50,
            "{stats:?}"
        );
        let mtd = org0_month_to_date(&plan, &out, end);
        assert!((850..=950).contains(&mtd), "{mtd}");
    }

    #[test]
    fn org0_month_to_date_count_is_the_parsed_one() {
        let end = at("2026-12-01T09:30:00Z");
        let (plan, out, _) = run(&SimOptions::new(end));
        let from = month_start(end.timestamp_millis());
        let parsed = lines(&out)
            .map(|l| parse_line(l).unwrap())
            .filter(|r| {
                r.organization_id == Some(plan.orgs[0].id)
                    && r.created_at.timestamp_millis() >= from
            })
            .count() as u64;
        assert_eq!(org0_month_to_date(&plan, &out, end), parsed);
    }

    #[test]
    fn org0_ends_near_its_monthly_limit() {
        for (end, days, keys) in [
            ("2026-12-01T09:30:00Z", 1.0, 12), // crosses into December
            ("2026-12-01T00:20:00Z", 1.0, 6),  // only 20 minutes of December
            ("2026-11-20T12:00:00Z", 1.0, 6),  // inside November
            ("2026-11-20T12:00:00Z", 7.0, 1),  // inside November
            ("2026-12-03T18:00:00Z", 40.0, 1), // three months
            ("2026-11-30T23:59:00Z", 0.25, 6), // inside November, end of month
        ] {
            let seeds = if days > 2.0 { 1..=1 } else { 1..=2 };
            for seed in seeds {
                let end = at(end);
                let opts = SimOptions {
                    days,
                    seed,
                    keys,
                    ..SimOptions::new(end)
                };
                let (plan, out, stats) = run(&opts);
                let limit = plan.orgs[0].monthly_limit().0.unwrap();
                let mtd = org0_month_to_date(&plan, &out, end);
                assert_eq!(mtd, stats.org_month_to_date[0]);
                let share = mtd as f64 / limit as f64;
                assert!(
                    (0.85..=0.95).contains(&share),
                    "{end} {days} {seed}: {share}"
                );
                assert_eq!(stats.quota_exceeded, 0);
            }
        }
    }

    #[test]
    fn errors_rate_limits_and_refused_keys_occur() {
        let end = at("2026-12-01T09:30:00Z");
        let (plan, out, stats) = run(&SimOptions::new(end));
        assert!(stats.rate_limited > 0, "{stats:?}");
        assert!(stats.server_errors > 0 && stats.client_errors > 0 && stats.forbidden > 0);
        assert!(stats.unauthorized > 0);
        let share = stats.unauthorized as f64 / stats.lines as f64;
        assert!((0.005..0.02).contains(&share), "{share}");
        let errs = (stats.server_errors + stats.client_errors + stats.forbidden) as f64;
        let share = errs / stats.lines as f64;
        assert!((0.02..0.045).contains(&share), "{share}");

        let heads: Vec<&str> = plan.keys.iter().map(|k| &k.info.prefix[..12]).collect();
        let (mut n429, mut n5xx, mut n401) = (0, 0, 0);
        let mut refused_ips = std::collections::HashSet::new();
        for l in lines(&out) {
            let r = parse_line(l).unwrap();
            match r.http_status_code {
                429 => {
                    assert!(r.rate_limit_hit || r.quota_exceeded);
                    if r.rate_limit_hit {
                        assert_eq!(r.error_code.as_deref(), Some("rate_limited"));
                    }
                    n429 += 1;
                }
                500..=599 => {
                    assert!(r.error_code.is_some());
                    n5xx += 1;
                }
                401 => {
                    assert_eq!(r.api_key_id, None);
                    assert_eq!(r.organization_id, None);
                    assert_eq!(r.error_code.as_deref(), Some("unauthorized"));
                    let p = r.key_prefix.as_deref().unwrap();
                    assert_eq!(p.len(), 12);
                    assert!(p.starts_with("pmcp_01"));
                    assert!(!heads.contains(&p));
                    refused_ips.insert(r.source_ip.unwrap());
                    n401 += 1;
                }
                403 => assert!(matches!(
                    r.error_code.as_deref(),
                    Some("forbidden" | "mcp_not_permitted")
                )),
                _ => {}
            }
        }
        assert_eq!(n429, stats.rate_limited + stats.quota_exceeded);
        assert_eq!(n5xx, stats.server_errors);
        assert_eq!(n401, stats.unauthorized);
        assert!((1..=4).contains(&refused_ips.len()));
    }

    #[test]
    fn over_the_monthly_limit_is_quota_exceeded() {
        let end = at("2026-12-01T09:30:00Z");
        let opts = SimOptions {
            days: 2.0,
            ..SimOptions::new(end)
        };
        let mut plan = plan(&opts);
        plan.orgs[2].custom_max_requests_monthly = Some(50);
        let org = plan.orgs[2].id;
        let mut out = Vec::new();
        let stats = generate(&plan, &opts, &mut out).unwrap();
        assert!(stats.quota_exceeded > 0);
        let mut counted: HashMap<u32, u64> = HashMap::new();
        for l in lines(&out) {
            let r = parse_line(l).unwrap();
            if r.organization_id != Some(org) || r.rate_limit_hit {
                continue;
            }
            let used = counted.entry(r.created_at.month()).or_default();
            assert_eq!(r.quota_exceeded, *used >= 50);
            if r.quota_exceeded {
                assert_eq!(r.http_status_code, 429);
                assert_eq!(r.error_code.as_deref(), Some("quota_exceeded"));
            } else {
                *used += 1;
            }
        }
        assert_eq!(counted.len(), 2, "both months");
    }

    #[test]
    fn rate_limit_is_per_key_per_clock_minute() {
        let end = at("2026-11-25T18:00:00Z");
        let opts = SimOptions {
            days: 3.0,
            ..SimOptions::new(end)
        };
        let (plan, out, stats) = run(&opts);
        assert!(stats.rate_limited > 0);
        let rpm: HashMap<Uuid, u32> = plan
            .keys
            .iter()
            .map(|k| (k.info.id, k.info.rate_limit_rpm))
            .collect();
        let mut per_minute: HashMap<(Uuid, i64), (u32, u32)> = HashMap::new();
        for l in lines(&out) {
            let r = parse_line(l).unwrap();
            if let Some(id) = r.api_key_id {
                let e = per_minute
                    .entry((id, r.created_at.timestamp().div_euclid(60)))
                    .or_default();
                e.0 += 1;
                if r.rate_limit_hit {
                    e.1 += 1;
                }
            }
        }
        for ((id, _), (total, limited)) in per_minute {
            assert_eq!(limited, total.saturating_sub(rpm[&id]));
        }
    }

    #[test]
    fn plan_has_valid_keys_and_orgs() {
        let end = at("2026-12-01T09:30:00Z");
        let opts = SimOptions {
            keys: 40,
            ..SimOptions::new(end)
        };
        let plan = plan(&opts);
        assert_eq!(plan.keys.len(), 40);
        assert_eq!(plan.orgs.len(), 10);
        assert_eq!(SimOptions::new(end).org_count(), 3);
        assert_eq!(plan.orgs[0].tier, "free");
        let mut slugs: Vec<&str> = plan.orgs.iter().map(|o| o.slug.as_str()).collect();
        slugs.sort();
        slugs.dedup();
        assert_eq!(slugs.len(), plan.orgs.len());
        let tiers: std::collections::HashSet<&str> =
            plan.orgs.iter().map(|o| o.tier.as_str()).collect();
        for t in ["free", "pro", "team", "enterprise"] {
            assert!(tiers.contains(t), "{t}");
        }
        let start = Period::new(&opts).start;
        let mut heads = std::collections::HashSet::new();
        for k in &plan.keys {
            let p = &k.info.prefix;
            assert_eq!(p.len(), 20);
            assert!(p.ends_with("..."));
            assert!(p.starts_with("pmcp_01"));
            assert_eq!(&p[7..17], &k.info.id.simple().to_string()[..10]);
            assert_eq!(k.key_hash.len(), 64);
            assert!(heads.insert(p.clone()));
            assert!(k.info.created_at.unwrap() < start);
            assert!(k.info.expires_at.is_none_or(|e| e > end));
            assert_eq!(k.info.status, "active");
            assert!((1..=10_000).contains(&k.info.rate_limit_rpm));
            assert!(plan.orgs.iter().any(|o| o.id == k.info.org_id));
            let selected = k.info.mcp_access_mode == "selected";
            assert_eq!(selected, !k.info.allowed_mcp_ids.is_empty());
            assert!((1..=4).contains(&k.traffic.mcps.len()));
        }
        assert!(plan.keys.iter().any(|k| k.info.expires_at.is_some()));
        assert!(
            plan.keys
                .iter()
                .any(|k| k.info.mcp_access_mode == "selected")
        );
        // The cache resolves every generated prefix to its key.
        let cache = crate::keys::KeyCache::new(
            crate::keys::KeySnapshot {
                orgs: plan.orgs.clone(),
                keys: plan.keys.iter().map(|k| k.info.clone()).collect(),
            },
            end,
        );
        for k in &plan.keys {
            assert_eq!(cache.key_by_prefix(&k.info.prefix), Some(k.info.id));
        }
    }

    #[test]
    fn vocabulary_needs_no_escaping() {
        let plain = |s: &str| {
            s.bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        };
        for m in MCPS {
            assert!(plain(m.name));
            m.tools.iter().for_each(|t| assert!(plain(t)));
        }
        for s in SDK_AGENTS.iter().chain(SCANNER_AGENTS).chain(ORG_NAMES) {
            assert!(plain(s));
        }
        assert!(plain(BROWSER_AGENT));
        let mut b = Vec::new();
        push_json_str(&mut b, "a\"b\\c\n");
        assert_eq!(b, br#"a\"b\\c\u000a"#);
        assert_eq!(slugify("Pied Piper Data 2"), "pied-piper-data-2");
    }

    #[test]
    fn daily_rhythm_is_visible() {
        let end = at("2026-11-20T00:00:00Z"); // a Friday
        let opts = SimOptions {
            days: 7.0,
            keys: 4,
            ..SimOptions::new(end)
        };
        let (_, out, stats) = run(&opts);
        let mut by_hour = [0u64; 24];
        for l in lines(&out) {
            let r = parse_line(l).unwrap();
            by_hour[chrono::Timelike::hour(&r.created_at) as usize] += 1;
        }
        let (min, max) = (by_hour.iter().min().unwrap(), by_hour.iter().max().unwrap());
        assert!(*max > 2 * *min, "{by_hour:?}");
        assert!(stats.lines > 0);
    }

    /// `cargo test --release -- --ignored --nocapture throughput`
    #[test]
    #[ignore]
    fn throughput() {
        let opts = SimOptions {
            lines: Some(2_000_000),
            ..SimOptions::new(at("2026-12-01T09:30:00Z"))
        };
        let plan = plan(&opts);
        let t = std::time::Instant::now();
        let mut sink = io::sink();
        let stats = generate(&plan, &opts, &mut sink).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "{} lines in {secs:.2}s: {:.0} lines/s",
            stats.lines,
            stats.lines as f64 / secs
        );
    }
}
