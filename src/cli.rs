//! The command line, as clap definitions only: flags, their environment variables, defaults
//! and help. Turning flags into running objects is `commands`' job; nothing here does I/O.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::report::GroupBy;

/// keywatch watches how PlexMCP API keys are used: it ingests the auth server's request log,
/// tracks usage against limits and answers usage reports.
#[derive(Debug, Parser)]
#[command(name = "keywatch", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every subcommand that needs them reads the same way.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Database: sqlite://PATH (created on first start) or postgres://USER@HOST/DB (the auth
    /// server's database, where keywatch adds its own tables beside the auth server's).
    #[arg(
        long,
        global = true,
        env = "KEYWATCH_DATABASE_URL",
        default_value = "sqlite://keywatch.db",
        value_name = "URL"
    )]
    pub database_url: String,

    /// GeoIP database: a .mmdb file or a directory of them.
    #[arg(long, global = true, env = "KEYWATCH_GEOIP", value_name = "PATH")]
    pub geoip: Option<PathBuf>,

    /// Log level filter (error, warn, info, debug, trace, or a tracing filter directive).
    #[arg(
        long,
        global = true,
        env = "KEYWATCH_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
}

// Parsed once at start: the size of the largest variant (`run`'s many settings) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: follow the sources, keep usage current, serve /metrics and /healthz.
    Run(RunArgs),
    /// Ingest request-log files to their end, then exit: for backfill and replay.
    ///
    /// Each file is checkpointed like the daemon does (by a fingerprint of its first line), so
    /// running it again over a file it has already ingested continues where it stopped and
    /// counts nothing twice.
    Ingest(IngestArgs),
    /// Apply keywatch's database migrations (also done at every start).
    Migrate,
    /// List or create API keys (for the embedded mode and for tests).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// List or create organizations.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Answer an admin's question about usage.
    #[command(subcommand)]
    Report(ReportCommand),
    /// Create a few organizations and keys, generate a realistic day of traffic, run it
    /// through the real pipeline, print what it found, then serve until Ctrl-C.
    Demo(DemoArgs),
    /// Generate a realistic request log (and create its organizations and keys).
    Simulate(SimulateArgs),
    /// Publish request-log files to a NATS JetStream stream, each line on the subject of its
    /// key's partition (FNV-1a 32-bit of `api_key_id`, else of `key_prefix`, modulo the
    /// partition count), for backfills, tests and auth servers that write files.
    Publish(PublishArgs),
    /// Check an alerting configuration file without starting: prints nothing and exits 0
    /// when it is valid, else names the line, column and setting that is wrong.
    CheckConfig {
        /// The file to check.
        #[arg(default_value = "alerts.toml", value_name = "FILE")]
        file: PathBuf,
    },
    /// Act on an alert.
    #[command(subcommand)]
    Alert(AlertCommand),
    /// Silence alerts: matching alerts are still recorded, but not sent, until the silence
    /// expires.
    #[command(subcommand)]
    Silence(SilenceCommand),
}

#[derive(Debug, Subcommand)]
pub enum SilenceCommand {
    /// Add a silence; prints its id. At least one matcher is needed.
    Add {
        /// Alert types (repeat or comma-separate), for example rate_spike.
        #[arg(long = "type", value_delimiter = ',', value_name = "TYPE")]
        types: Vec<String>,
        /// Severities: info, low, medium, high, critical.
        #[arg(long = "severity", value_delimiter = ',', value_name = "SEVERITY")]
        severities: Vec<String>,
        /// Organization ids.
        #[arg(long = "org", value_delimiter = ',', value_name = "ORG")]
        orgs: Vec<String>,
        /// Key ids or prefixes.
        #[arg(long = "key", value_delimiter = ',', value_name = "KEY")]
        keys: Vec<String>,
        /// How long the silence lasts (30m, 4h, 7d).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        expires_in: std::time::Duration,
        /// Why, kept with the silence.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the silences in force (with --all, expired ones too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// End a silence now.
    Expire {
        /// The silence's id (as `silence list` prints it).
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A source of request-log lines: file:PATH (followed like `tail -F`), stdin, http
    /// (`POST /v1/ingest` on --listen, NDJSON, optionally gzip), postgres (the auth server's
    /// mcp_request_log and auth_audit_log in --database-url; postgres:URL for another
    /// database), or nats://HOST:PORT?stream=S&partitions=A-B&of=N (JetStream). Repeat for
    /// several.
    #[arg(
        long = "source",
        env = "KEYWATCH_SOURCE",
        value_delimiter = ',',
        value_name = "SOURCE",
        required = true
    )]
    pub sources: Vec<String>,

    /// Address for /metrics and /healthz.
    #[arg(
        long,
        env = "KEYWATCH_LISTEN",
        default_value = "127.0.0.1:9464",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub alerts: AlertsFile,

    #[command(flatten)]
    pub api: ApiAuthArgs,

    /// Start files seen for the first time at their end instead of their beginning.
    #[arg(long, env = "KEYWATCH_START_AT_END")]
    pub start_at_end: bool,

    /// How often to reload keys and organizations from the database. Short, so a key revoked
    /// or changed in the auth server's tables is treated as such within seconds.
    #[arg(
        long,
        env = "KEYWATCH_KEY_REFRESH",
        default_value = "2s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub key_refresh: std::time::Duration,

    /// How far behind the newest event a line may be and still count as on time.
    #[arg(
        long,
        env = "KEYWATCH_LATENESS",
        default_value = "5m",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub lateness: std::time::Duration,

    /// Keys with series of their own on /metrics: the busiest by recent traffic; the rest are
    /// summed in one "other" series. Each key costs 7 series.
    #[arg(
        long,
        env = "KEYWATCH_METRICS_TOP_KEYS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(0..=10_000),
        value_name = "N"
    )]
    pub metrics_top_keys: u32,

    /// Organizations with series of their own on /metrics (8 series each).
    #[arg(
        long,
        env = "KEYWATCH_METRICS_TOP_ORGS",
        default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(0..=10_000),
        value_name = "N"
    )]
    pub metrics_top_orgs: u32,

    /// MCPs with series of their own on /metrics (5 series each).
    #[arg(
        long,
        env = "KEYWATCH_METRICS_TOP_MCPS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(0..=10_000),
        value_name = "N"
    )]
    pub metrics_top_mcps: u32,

    /// How long a key, organization or MCP without requests keeps its series on /metrics.
    #[arg(
        long,
        env = "KEYWATCH_METRICS_IDLE_EXPIRY",
        default_value = "24h",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub metrics_idle_expiry: std::time::Duration,

    #[command(flatten)]
    pub sources_opts: SourceArgs,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// How long a stop (SIGTERM, Ctrl-C) may take: reading stops at once, what was read is
    /// committed, and notifications being sent get the rest of this time; one still unanswered
    /// then stays queued and is sent again at the next start, with the same Message-ID.
    #[arg(
        long,
        env = "KEYWATCH_SHUTDOWN_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub shutdown_timeout: std::time::Duration,
}

/// How long `run` keeps usage rollup rows, and how often it deletes older ones. Ages are
/// counted from the newest counted minute (at most from now), so a replayed or backfilled log
/// is kept as long as live traffic would be.
#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// How long minute buckets are kept; a report of an older range is exact when the range
    /// starts and ends on whole hours.
    #[arg(
        long,
        env = "KEYWATCH_RETAIN_MINUTE_BUCKETS",
        default_value = "7d",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub retain_minute_buckets: std::time::Duration,

    /// How long hour buckets are kept; a report of an older range is exact when the range
    /// starts and ends on whole days (UTC).
    #[arg(
        long,
        env = "KEYWATCH_RETAIN_HOUR_BUCKETS",
        default_value = "90d",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub retain_hour_buckets: std::time::Duration,

    /// How long day buckets are kept (older usage is gone from every report).
    #[arg(
        long,
        env = "KEYWATCH_RETAIN_DAY_BUCKETS",
        default_value = "2y",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub retain_day_buckets: std::time::Duration,

    /// How often old rows are deleted: once at start, then at this interval.
    #[arg(
        long,
        env = "KEYWATCH_RETENTION_INTERVAL",
        default_value = "1h",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub retention_interval: std::time::Duration,
}

/// Settings of the HTTP, NATS and PostgreSQL sources.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// SHA-256 (hex) of the token that `POST /v1/ingest` requires as `Authorization: Bearer
    /// TOKEN`; only the hash is configured, so the token itself is in no file or process list.
    #[arg(long, env = "KEYWATCH_INGEST_TOKEN_SHA256", value_name = "HEX")]
    pub ingest_token_sha256: Option<String>,

    /// The largest `POST /v1/ingest` body, in bytes, after gzip decoding; larger ones get 413.
    #[arg(
        long,
        env = "KEYWATCH_INGEST_MAX_BODY",
        default_value_t = 8 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024),
        value_name = "BYTES"
    )]
    pub ingest_max_body: u64,

    /// Ingest requests read or waiting for their commit at once; more get 503 with
    /// Retry-After. Memory held by pushes stays under this times --ingest-max-body.
    #[arg(
        long,
        env = "KEYWATCH_INGEST_MAX_IN_FLIGHT",
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..=4096),
        value_name = "N"
    )]
    pub ingest_max_in_flight: u32,

    /// With --source postgres, on a first start (no cursor yet): read the auth server's tables
    /// from this time (RFC 3339) instead of from their oldest row.
    #[arg(long, env = "KEYWATCH_POSTGRES_SINCE", value_name = "TIME")]
    pub postgres_since: Option<String>,

    /// With --source postgres: how far before the cursor a row committed late is still
    /// counted (once). Above the auth server's longest transaction.
    #[arg(
        long,
        env = "KEYWATCH_POSTGRES_LOOKBACK",
        default_value = "30s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub postgres_lookback: std::time::Duration,

    /// With --source postgres: how often the tables are polled once caught up.
    #[arg(
        long,
        env = "KEYWATCH_POSTGRES_POLL",
        default_value = "1s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub postgres_poll: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The server and stream, as `--source` spells it: nats://HOST:PORT?stream=S (and
    /// subject=PREFIX for subjects other than plexmcp.requests.<partition>). The stream is
    /// created if missing.
    #[arg(long, value_name = "URL")]
    pub nats: String,

    /// How many partitions the stream has (the consumers' `of=`).
    #[arg(
        long,
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..=4096),
        value_name = "N"
    )]
    pub partitions: u32,

    /// Request-log files (`-` for stdin), one message per line.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// How the HTTP API under /v1 authenticates.
#[derive(Debug, Clone, Args)]
pub struct ApiAuthArgs {
    /// SHA-256 hashes (hex, as `sha256sum` prints them) of the admin tokens, comma-separated;
    /// an admin sends `Authorization: Bearer TOKEN` and sees every organization.
    #[arg(
        long = "admin-token-sha256",
        env = "KEYWATCH_ADMIN_TOKEN_SHA256",
        value_delimiter = ',',
        value_name = "HEX,..."
    )]
    pub admin_token_sha256: Vec<String>,
    /// A file (readable by its owner only) holding the auth server's API_KEY_HMAC_SECRET:
    /// keys whose signature does not verify are refused. Or set the secret itself in
    /// KEYWATCH_API_KEY_HMAC_SECRET; it is never taken from the command line, where every
    /// user of the machine could read it. Without either, keys are checked by their hash
    /// alone.
    #[arg(
        long = "api-key-hmac-secret-file",
        env = "KEYWATCH_API_KEY_HMAC_SECRET_FILE",
        value_name = "FILE"
    )]
    pub hmac_secret_file: Option<PathBuf>,
    /// SHA-256 (hex) of the bearer token that `/metrics` then requires (Prometheus:
    /// `authorization: {credentials: TOKEN}`). Needed, or --metrics-public, when --listen is
    /// not a loopback address.
    #[arg(
        long,
        env = "KEYWATCH_METRICS_TOKEN_SHA256",
        value_name = "HEX",
        conflicts_with = "metrics_public"
    )]
    pub metrics_token_sha256: Option<String>,
    /// Serve `/metrics` without a token on a non-loopback --listen, on purpose (otherwise
    /// keywatch refuses to start there).
    #[arg(long, env = "KEYWATCH_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Failed authentications allowed per client IP and minute before the API answers 429.
    #[arg(
        long,
        env = "KEYWATCH_API_AUTH_FAILURES_PER_MINUTE",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000),
        value_name = "N"
    )]
    pub api_auth_failures_per_minute: u32,
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Request-log files (`-` for stdin, which has no checkpoint: the same lines fed twice are
    /// counted twice).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Never show a progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,

    /// Replay the files through the detectors and print the alerts they would raise, in
    /// --format; nothing is stored (no counts, no checkpoints, no alerts) and nothing is sent.
    /// Checkpoints are ignored, so every file is read from its beginning: the way to tune
    /// alerts.toml on real history.
    #[arg(long, conflicts_with = "notify")]
    pub dry_run: bool,

    /// Also queue and deliver notifications for the alerts it raises (a backfill does not
    /// page anyone unless asked). It waits for the groups' first notifications (group_wait).
    #[arg(long)]
    pub notify: bool,

    #[command(flatten)]
    pub alerts: AlertsFile,

    /// Summary format (with --dry-run: the alerts' format).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// The alerting configuration file, as `run` and `ingest` take it.
#[derive(Debug, Clone, Args)]
pub struct AlertsFile {
    /// Alerting configuration: detector settings and allowlists. The default file may be
    /// absent (the built-in defaults apply); a file named here must exist.
    #[arg(
        long = "alerts",
        env = "KEYWATCH_ALERTS",
        default_value = "alerts.toml",
        value_name = "FILE"
    )]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Send a test message through a receiver of alerts.toml, now (not through the outbox):
    /// checks the server, the credentials and the addresses.
    Test {
        /// The receiver's name in alerts.toml.
        #[arg(long, default_value = "email")]
        receiver: String,
        #[command(flatten)]
        alerts: AlertsFile,
    },
    /// Mark an alert benign: it stops counting as open, and for a new_country or
    /// impossible_travel alert the key learns the country, so it is not raised again.
    Benign {
        /// The alert's id (as `report alerts` prints it).
        id: String,
        /// Why it is benign, kept with the alert.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List keys with their prefix, organization, limits and status.
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Create a key in the auth server's format. Prints the full key once, alone on stdout;
    /// only its SHA-256 hash and 20-character prefix are stored.
    Create(KeysCreateArgs),
}

#[derive(Debug, Args)]
pub struct KeysCreateArgs {
    /// Organization id or slug.
    #[arg(long)]
    pub org: String,
    /// Key name.
    #[arg(long)]
    pub name: String,
    /// Expire after this long (for example 30d, 90d, 1y).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub expires_in: Option<std::time::Duration>,
    /// Restrict the key to these MCP instance ids (comma-separated); all MCPs without it.
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub mcps: Vec<uuid::Uuid>,
    /// Requests per minute (1 to 10000).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub rpm: u32,
    /// Scopes (comma-separated), for example reports:read,alerts:write.
    #[arg(long, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// A file (owner-only) holding the auth server's API_KEY_HMAC_SECRET, so that the key's
    /// signature verifies there; or set KEYWATCH_API_KEY_HMAC_SECRET.
    #[arg(
        long = "hmac-secret-file",
        env = "KEYWATCH_API_KEY_HMAC_SECRET_FILE",
        value_name = "FILE"
    )]
    pub hmac_secret_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// List organizations with their tier and monthly limit.
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Create an organization; prints its id alone on stdout.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = TierArg::Free)]
        tier: TierArg,
        /// A custom monthly request limit that overrides the tier's.
        #[arg(long)]
        custom_limit: Option<i64>,
    },
    /// Set the address an organization's alerts also go to, through routes with
    /// `to_org = true` in alerts.toml.
    SetAlertEmail {
        /// The organization's id or slug.
        org: String,
        /// An email address, like "Acme security <security@acme.example>".
        email: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TierArg {
    Free,
    Pro,
    Team,
    Enterprise,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Requests, errors by class, latency and bytes per key, organization or MCP; for
    /// organizations, month-to-date usage against the monthly limit.
    Usage(UsageArgs),
    /// Alerts the detectors raised, by when their episode started.
    Alerts(AlertsArgs),
    /// Per organization: month-to-date usage against the monthly limit, and when the limit
    /// is reached at this month's rate; per key: the busiest minute against its limit, 429s.
    Limits(OrgReportArgs),
    /// Where and how one key was used: countries, cities, networks, IPs and user agents (first
    /// and last seen, requests), MCPs and errors. Without a range: the last 7 days.
    Activity(ActivityArgs),
    /// Keys that break the documented security practices: no expiry, valid for more than a
    /// year, expiring within 7 days while in use, unused for 30 days, access to all MCPs but
    /// using at most two, still in use after a newer key of the same name was created.
    Hygiene(OrgReportArgs),
    /// Lines that were refused, with their source, line number, reason and text.
    Rejected {
        /// Only lines of this source (for example file:/var/log/plexmcp/requests.log).
        #[arg(long)]
        source: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Organization id or slug.
    #[arg(long)]
    pub org: Option<String>,
    /// Key id or prefix (`pmcp_01ab...`); `unknown` for refused keys that match no key.
    #[arg(long)]
    pub key: Option<String>,
    /// MCP server name.
    #[arg(long)]
    pub mcp: Option<String>,
    #[command(flatten)]
    pub range: TimeRange,
    /// What one row is.
    #[arg(long, value_enum, default_value_t = GroupBy::Key)]
    pub group_by: GroupBy,
    /// Split each row into buckets of this size.
    #[arg(long, value_enum)]
    pub bucket: Option<BucketArg>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// A time range: the last DURATION, or from and until; all of time without either.
#[derive(Debug, Args)]
pub struct TimeRange {
    /// Only the last DURATION (for example 24h, 7d), up to now.
    #[arg(long, value_parser = parse_duration, conflicts_with_all = ["from", "until"], value_name = "DURATION")]
    pub since: Option<std::time::Duration>,
    /// Start of the range (RFC 3339), inclusive.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End of the range (RFC 3339), exclusive.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// The range applies to when each alert's episode started.
    #[command(flatten)]
    pub range: TimeRange,
    /// Alert type, for example new_country or error_spike.
    #[arg(long = "type", value_name = "TYPE")]
    pub r#type: Option<String>,
    /// Status: firing, acknowledged, resolved or benign.
    #[arg(long)]
    pub status: Option<String>,
    /// Severity: info, low, medium, high or critical.
    #[arg(long)]
    pub severity: Option<String>,
    /// Organization id or slug.
    #[arg(long)]
    pub org: Option<String>,
    /// Key id or prefix.
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// A report about one organization, or all of them.
#[derive(Debug, Args)]
pub struct OrgReportArgs {
    /// Organization id or slug.
    #[arg(long)]
    pub org: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ActivityArgs {
    /// Key id or prefix.
    #[arg(long)]
    pub key: String,
    #[command(flatten)]
    pub range: TimeRange,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BucketArg {
    Minute,
    Hour,
    Day,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Days of traffic to generate.
    #[arg(long, default_value_t = 1.0)]
    pub days: f64,
    /// Keys to create.
    #[arg(long, default_value_t = 12)]
    pub keys: usize,
    /// Seed of the traffic generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the demo keeps its database and log (recreated at each run).
    #[arg(long, default_value = "keywatch-demo", value_name = "DIR")]
    pub dir: PathBuf,
    /// Address for /metrics and /healthz while the demo serves.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Exit after the summary instead of serving until Ctrl-C.
    #[arg(long)]
    pub no_serve: bool,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// File to write the request log to.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Number of keys.
    #[arg(long, default_value_t = 12)]
    pub keys: usize,
    /// Number of organizations (default: about one per four keys).
    #[arg(long)]
    pub orgs: Option<usize>,
    /// Days of traffic, ending at --end.
    #[arg(long, default_value_t = 1.0)]
    pub days: f64,
    /// Exactly this many lines (rates are scaled to fit the period).
    #[arg(long)]
    pub lines: Option<u64>,
    /// Seed: the same seed and --end give the same file.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// End of the traffic (RFC 3339); default now.
    #[arg(long, value_name = "TIME")]
    pub end: Option<String>,
    /// Share of requests that fail (5xx, 4xx).
    #[arg(long, default_value_t = 0.03)]
    pub error_share: f64,
    /// Share of lines from refused keys (401 with no key id).
    #[arg(long, default_value_t = 0.01)]
    pub refused_share: f64,
    /// Only write the log; do not create the organizations and keys in the database.
    #[arg(long)]
    pub no_db: bool,
}

/// Parses `90s`, `5m`, `24h`, `7d`, `1y` (and combinations such as `1h30m`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let err = || format!("{s:?} is not a duration; write it like 30s, 5m, 24h, 90d or 1y");
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| err())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(err()),
        };
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(err)?)
            .ok_or_else(err)?;
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(err());
    }
    Ok(std::time::Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5_400);
        assert_eq!(parse_duration("90d").unwrap().as_secs(), 90 * 86_400);
        assert!(parse_duration("90").is_err());
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }
}
