//! What each subcommand does: resolve its flags into settings, call the library, print the
//! result for a person (table) or a program (JSON, CSV).
//!
//! Owns output: stdout carries only the result (so scripts can capture it), stderr carries
//! progress, details and summaries. Errors leave here as `anyhow` errors with one sentence of
//! context; nothing below `main` prints a backtrace.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::{self, DaemonSettings, SourceSpec};
use crate::cli::{
    AlertCommand, AlertsArgs, AlertsFile, BucketArg, Cli, Command, DemoArgs, Format, IngestArgs,
    KeysCommand, KeysCreateArgs, OrgsCommand, ReportCommand, SilenceCommand, SimulateArgs, TierArg,
    TimeRange, UsageArgs,
};
use crate::detect::Settings as DetectorSettings;
use crate::geo::GeoHandle;
use crate::keys::{KeyCache, NewKey};
use crate::metrics::Metrics;
use crate::notify::SystemClock;
use crate::pipeline::{IngestStats, PipelineOptions};
use crate::report::{self, GroupBy, KeyFilter, UsageQuery, UsageRow};
use crate::source::file::FileOptions;
use crate::store::{NewKeyRow, NewOrg, Store};
use crate::usage::Granularity;

mod reports;

/// The environment variable of the auth server's API_KEY_HMAC_SECRET (or `..._FILE`).
const HMAC_SECRET_VAR: &str = "KEYWATCH_API_KEY_HMAC_SECRET";

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Run(args) => {
            let sources = args
                .sources
                .iter()
                .map(|s| SourceSpec::parse(s.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!(e))?;
            let alerts = load_alerts(&args.alerts)?;
            let geo = open_geo(g.geoip.as_deref())?.map(Arc::new);
            let notify = app::notify_for(&alerts, Path::new("."), Arc::new(SystemClock))?;
            let hmac_secret =
                crate::secret::from(HMAC_SECRET_VAR, args.api.hmac_secret_file.as_deref())?;
            let api_auth = crate::api::auth::AuthSettings::new(
                hmac_secret.as_deref(),
                &args.api.admin_token_sha256,
                args.api.api_auth_failures_per_minute,
            )?
            .with_metrics_access(
                args.api.metrics_token_sha256.as_deref(),
                args.api.metrics_public,
            )?;
            let retention = retention(&args.retention)?;
            api_auth.check_listen(args.listen)?;
            let store = Store::open(&g.database_url).await?;
            let http = http_settings(&args.sources_opts, &sources)?;
            let postgres = postgres_options(&args.sources_opts, &sources, &g.database_url)?;
            let settings = DaemonSettings {
                api_auth,
                http,
                postgres,
                notify: Some(notify),
                alerts_file: Some((args.alerts.path.clone(), alerts_required(&args.alerts))),
                geo,
                sources,
                listen: args.listen,
                start_at_end: args.start_at_end,
                key_refresh: args.key_refresh,
                lateness: args.lateness,
                detectors: alerts.detector_settings(),
                metrics: crate::metrics::Limits {
                    top_keys: args.metrics_top_keys as usize,
                    top_orgs: args.metrics_top_orgs as usize,
                    top_mcps: args.metrics_top_mcps as usize,
                    idle_expiry: args.metrics_idle_expiry,
                },
                retention,
                retention_interval: args.retention.retention_interval,
                shutdown_timeout: args.shutdown_timeout,
            };
            app::run_daemon(store, settings, CancellationToken::new()).await
        }
        Command::Ingest(args) => {
            let geo = open_geo(g.geoip.as_deref())?.map(Arc::new);
            let store = Store::open(&g.database_url).await?;
            ingest(&store, &args, geo).await
        }
        Command::Migrate => {
            let store = Store::open(&g.database_url).await?;
            eprintln!("Migrations applied to {}.", store.url());
            Ok(())
        }
        Command::Keys(KeysCommand::List { format }) => {
            let store = Store::open(&g.database_url).await?;
            list_keys(&store, format).await
        }
        Command::Keys(KeysCommand::Create(args)) => {
            let store = Store::open(&g.database_url).await?;
            create_key(&store, &args).await
        }
        Command::Orgs(OrgsCommand::List { format }) => {
            let store = Store::open(&g.database_url).await?;
            list_orgs(&store, format).await
        }
        Command::Orgs(OrgsCommand::Create {
            name,
            tier,
            custom_limit,
        }) => {
            let store = Store::open(&g.database_url).await?;
            let id = create_org(&store, &name, tier, custom_limit).await?;
            println!("{id}");
            Ok(())
        }
        Command::Orgs(OrgsCommand::SetAlertEmail { org, email }) => {
            let store = Store::open(&g.database_url).await?;
            let id = find_org(&store.key_cache().await?, &org)?;
            let mailbox: lettre::message::Mailbox = email.parse().map_err(|e| {
                anyhow!(
                    "{email:?} is not an email address ({e}); give one like security@acme.example"
                )
            })?;
            store
                .set_org_alert_email(&id.to_string(), &mailbox.to_string(), Utc::now())
                .await?;
            eprintln!(
                "Alerts of organization {id} also go to {mailbox} through routes with to_org = true."
            );
            Ok(())
        }
        Command::Report(ReportCommand::Usage(args)) => {
            let store = Store::open(&g.database_url).await?;
            report_usage(&store, &args).await
        }
        Command::Report(ReportCommand::Rejected { source, format }) => {
            let store = Store::open(&g.database_url).await?;
            let letters = store.dead_letters(source.as_deref()).await?;
            if format == Format::Json {
                let data: Vec<_> = letters
                    .iter()
                    .map(|d| json!({"source": d.source, "line": d.line_no, "reason": d.reason, "detail": d.detail, "text": d.line}))
                    .collect();
                println!("{}", json!({"success": true, "data": data}));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = letters
                .into_iter()
                .map(|d| {
                    vec![
                        d.source,
                        d.line_no.to_string(),
                        d.reason.to_owned(),
                        d.detail,
                        d.line,
                    ]
                })
                .collect();
            print_rows(
                &["source", "line", "reason", "detail", "text"],
                &rows,
                format,
            )
        }
        Command::Report(ReportCommand::Limits(args)) => {
            let store = Store::open(&g.database_url).await?;
            reports::limits(&store, &args).await
        }
        Command::Report(ReportCommand::Activity(args)) => {
            let store = Store::open(&g.database_url).await?;
            reports::activity(&store, &args).await
        }
        Command::Report(ReportCommand::Hygiene(args)) => {
            let store = Store::open(&g.database_url).await?;
            reports::hygiene(&store, &args).await
        }
        Command::Report(ReportCommand::Alerts(args)) => {
            let store = Store::open(&g.database_url).await?;
            report_alerts(&store, &args).await
        }
        Command::Demo(args) => demo(&args).await,
        Command::Simulate(args) => simulate(&g.database_url, &args).await,
        Command::Publish(args) => publish(&args).await,
        Command::CheckConfig { file } => {
            crate::config::AlertsConfig::load(&file, true)?;
            eprintln!("{} is valid.", file.display());
            Ok(())
        }
        Command::Silence(cmd) => {
            let store = Store::open(&g.database_url).await?;
            silence(&store, cmd).await
        }
        Command::Alert(AlertCommand::Test { receiver, alerts }) => {
            let notify = app::notify_for(
                &load_alerts(&alerts)?,
                Path::new("."),
                Arc::new(SystemClock),
            )?;
            let Some(r) = notify.receivers.get(&receiver) else {
                let mut names: Vec<&String> = notify.receivers.keys().collect();
                names.sort();
                bail!(
                    "there is no receiver {receiver:?} in {}; defined receivers: {names:?}",
                    alerts.path.display()
                );
            };
            let n = crate::notify::render::test_notification(&receiver, Utc::now());
            r.deliver(&n).await.map_err(|e| {
                anyhow!(e).context(format!(
                    "the test message to {receiver:?} was not delivered"
                ))
            })?;
            eprintln!(
                "Delivered a test message through {receiver:?} (Message-ID {}).",
                n.message_id()
            );
            Ok(())
        }
        Command::Alert(AlertCommand::Benign { id, reason }) => {
            let store = Store::open(&g.database_url).await?;
            if !store.mark_benign(&id, &reason).await? {
                bail!(
                    "there is no alert {id:?} (keywatch report alerts --format json lists their ids)"
                );
            }
            eprintln!(
                "Alert {id} is marked benign; a location it names is learned by its key at the next start."
            );
            Ok(())
        }
    }
}

/// Delivers what the outbox holds, waiting (on `clock`) for the groups' first notifications.
async fn deliver_now(
    store: &Store,
    notify: &app::Notify,
    manual: Option<crate::notify::ManualClock>,
) -> anyhow::Result<usize> {
    let r = &notify.settings.router;
    let wait = r
        .routes
        .iter()
        .chain(std::iter::once(&r.default))
        .map(|x| x.group_wait)
        .max()
        .unwrap_or_default();
    // A replay (manual clock) also sends the groups' follow-ups due after the last change.
    let interval = match manual {
        Some(_) => r
            .routes
            .iter()
            .chain(std::iter::once(&r.default))
            .map(|x| x.group_interval)
            .max()
            .unwrap_or_default(),
        None => std::time::Duration::ZERO,
    };
    let settle = chrono::Duration::from_std(wait + interval).unwrap_or_default()
        + chrono::Duration::seconds(2);
    Ok(crate::notify::drain(
        store.clone(),
        Arc::clone(&notify.settings),
        notify.receivers.clone(),
        Arc::clone(&notify.clock),
        manual,
        settle,
    )
    .await?)
}

async fn silence(store: &Store, cmd: SilenceCommand) -> anyhow::Result<()> {
    let now = Utc::now();
    match cmd {
        SilenceCommand::Add {
            types,
            severities,
            orgs,
            keys,
            expires_in,
            reason,
        } => {
            let matchers = crate::notify::config::StoredMatchers {
                types,
                severities,
                orgs,
                keys,
            };
            let checked = matchers.check().map_err(|e| anyhow!(e))?;
            if checked.is_empty() {
                bail!("a silence needs at least one matcher: --type, --severity, --org or --key");
            }
            let expires = chrono::Duration::from_std(expires_in)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .ok_or_else(|| anyhow!("--expires-in is too long"))?;
            let s = crate::store::StoredSilence {
                id: Uuid::new_v4().to_string(),
                matchers,
                reason,
                created_at: now,
                expires_at: expires,
            };
            store.add_silence(&s).await?;
            println!("{}", s.id);
            eprintln!(
                "Silenced until {}: matching alerts are recorded but not sent.",
                s.expires_at.to_rfc3339()
            );
            Ok(())
        }
        SilenceCommand::List { all, format } => {
            let list = store.silences(now, all).await?;
            if format == Format::Json {
                println!("{}", json!({"success": true, "data": list}));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .into_iter()
                .map(|s| {
                    let m = &s.matchers;
                    let mut parts = Vec::new();
                    for (k, v) in [
                        ("type", &m.types),
                        ("severity", &m.severities),
                        ("org", &m.orgs),
                        ("key", &m.keys),
                    ] {
                        if !v.is_empty() {
                            parts.push(format!("{k}={}", v.join("|")));
                        }
                    }
                    vec![s.id, parts.join(" "), s.expires_at.to_rfc3339(), s.reason]
                })
                .collect();
            print_rows(&["id", "matchers", "expires", "reason"], &rows, format)
        }
        SilenceCommand::Expire { id } => {
            if !store.expire_silence(&id, now).await? {
                bail!(
                    "there is no silence {id:?} in force (keywatch silence list shows their ids)"
                );
            }
            eprintln!("Silence {id} expired.");
            Ok(())
        }
    }
}

/// `keywatch publish`: every file's lines to their partitions' subjects.
async fn publish(args: &crate::cli::PublishArgs) -> anyhow::Result<()> {
    use crate::source::nats::{NatsSpec, publish};
    let spec = NatsSpec::parse(&args.nats).map_err(|e| anyhow!(e))?;
    let started = Instant::now();
    let mut total = 0;
    for f in &args.files {
        let published = if f == Path::new("-") {
            publish(
                &spec,
                args.partitions,
                tokio::io::BufReader::new(tokio::io::stdin()),
            )
            .await
        } else {
            let file = tokio::fs::File::open(f)
                .await
                .with_context(|| format!("cannot read {}", f.display()))?;
            publish(&spec, args.partitions, tokio::io::BufReader::new(file)).await
        }
        .with_context(|| format!("publishing {}", f.display()))?;
        total += published.lines;
    }
    eprintln!(
        "Published {} lines to stream {} ({} partitions) in {:.2} s.",
        group_digits(total),
        spec.stream,
        args.partitions,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The postgres source's settings, when `sources` has it, its URL resolved.
fn postgres_options(
    args: &crate::cli::SourceArgs,
    sources: &[SourceSpec],
    database_url: &str,
) -> anyhow::Result<Option<crate::source::postgres::PostgresOptions>> {
    let Some(url) = sources.iter().find_map(|s| match s {
        SourceSpec::Postgres(url) => Some(url.as_deref().unwrap_or(database_url)),
        _ => None,
    }) else {
        return Ok(None);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!(
            "--source postgres reads the auth server's tables from PostgreSQL, but {} is not a postgres:// URL; use --source postgres:postgres://USER@HOST/DB",
            crate::store::redact_url(url)
        );
    }
    let since = args
        .postgres_since
        .as_deref()
        .map(|s| parse_time("--postgres-since", s))
        .transpose()?;
    Ok(Some(crate::source::postgres::PostgresOptions {
        url: url.to_owned(),
        since,
        lookback: args.postgres_lookback,
        poll: args.postgres_poll,
    }))
}

/// The HTTP source's settings, when `sources` has it (which then needs a token).
/// The retention flags, checked against what reports need.
fn retention(args: &crate::cli::RetentionArgs) -> anyhow::Result<crate::store::Retention> {
    if args.retention_interval < std::time::Duration::from_secs(1) {
        bail!("--retention-interval must be at least 1s");
    }
    Ok(crate::store::Retention {
        minute: args.retain_minute_buckets,
        hour: args.retain_hour_buckets,
        day: args.retain_day_buckets,
    }
    .validate()?)
}

fn http_settings(
    args: &crate::cli::SourceArgs,
    sources: &[SourceSpec],
) -> anyhow::Result<Option<crate::source::http::HttpSettings>> {
    use crate::source::http::{HttpConfigError, HttpSettings, parse_token_sha256};
    if !sources.contains(&SourceSpec::Http) {
        return Ok(None);
    }
    let hash = args
        .ingest_token_sha256
        .as_deref()
        .ok_or(HttpConfigError::NoToken)?;
    Ok(Some(HttpSettings {
        token_sha256: parse_token_sha256(hash)?,
        max_body_bytes: usize::try_from(args.ingest_max_body).unwrap_or(usize::MAX),
        max_in_flight: args.ingest_max_in_flight as usize,
    }))
}

/// A file named on the command line must exist; the default `alerts.toml` may be missing.
fn alerts_required(file: &AlertsFile) -> bool {
    file.path != Path::new("alerts.toml")
}

/// Reads the alerting configuration. The default file may be absent (the built-in defaults
/// apply); a file named with --alerts or KEYWATCH_ALERTS must exist.
fn load_alerts(file: &AlertsFile) -> anyhow::Result<crate::config::AlertsConfig> {
    Ok(crate::config::AlertsConfig::load(
        &file.path,
        alerts_required(file),
    )?)
}

fn open_geo(path: Option<&Path>) -> anyhow::Result<Option<GeoHandle>> {
    let geo = GeoHandle::open_configured(path)?;
    if let Some(h) = &geo {
        for f in h.current().files() {
            tracing::debug!(path = %f.path.display(), kind = f.database_type(), "Opened GeoIP database.");
        }
    }
    Ok(geo)
}

async fn ingest(
    store: &Store,
    args: &IngestArgs,
    geo: Option<Arc<GeoHandle>>,
) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    let mut total_bytes = 0u64;
    for f in &args.files {
        if f == Path::new("-") {
            specs.push(SourceSpec::Stdin);
            continue;
        }
        let meta = std::fs::metadata(f).with_context(|| format!("cannot read {}", f.display()))?;
        if meta.is_dir() {
            bail!("{} is a directory; name the log files in it", f.display());
        }
        total_bytes += meta.len();
        specs.push(SourceSpec::File(f.clone()));
    }
    let alerts = load_alerts(&args.alerts)?;
    let settings = alerts.detector_settings();
    let notify = match args.notify {
        true => Some(app::notify_for(
            &alerts,
            Path::new("."),
            Arc::new(SystemClock),
        )?),
        false => None,
    };
    let show_progress = !args.no_progress && std::io::stderr().is_terminal();
    let run = IngestRun {
        settings: &settings,
        dry_run: args.dry_run,
        notify: args.notify,
        total_bytes,
        show_progress,
    };
    let (stats, took) = ingest_sources(store, &specs, &run, geo).await?;
    if args.dry_run {
        let alerts = dry_run_alerts(&stats.dry_run_findings);
        eprintln!(
            "Dry run: {} lines replayed in {:.2} s; {} alerts would be raised (nothing stored or sent).",
            group_digits(stats.accepted + stats.rejected_total()),
            took.as_secs_f64(),
            alerts.len()
        );
        return print_alerts(&alerts, args.format);
    }
    print_ingest_summary(&stats, took, args.format)?;
    if let Some(n) = &notify {
        let sent = deliver_now(store, n, None).await?;
        let left = store.outbox_depth().await?;
        eprintln!(
            "Notifications: {sent} delivered; {} waiting for `keywatch run` (retries, later group messages).",
            left.pending + left.changes
        );
    }
    Ok(())
}

/// The alerts a dry run's findings make, as `report alerts` would list them had they been
/// stored: the updates of one fingerprint merged into one alert.
fn dry_run_alerts(findings: &[crate::detect::Finding]) -> Vec<crate::store::StoredAlert> {
    let mut by_fp: BTreeMap<String, crate::store::StoredAlert> = BTreeMap::new();
    for f in findings {
        let a = crate::store::StoredAlert::from_finding(f);
        match by_fp.get_mut(&a.id) {
            Some(old) if old.status != "resolved" || f.resolved => {
                let (started_at, detected_at) = (old.started_at, old.detected_at);
                *old = a;
                old.started_at = started_at;
                old.detected_at = detected_at;
            }
            // A new episode after a resolved one: what a store would show is the newest.
            _ => {
                by_fp.insert(a.id.clone(), a);
            }
        }
    }
    let mut v: Vec<_> = by_fp.into_values().collect();
    v.sort_by(|a, b| {
        a.started_at
            .cmp(&b.started_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    v
}

/// How one `ingest_sources` runs.
struct IngestRun<'a> {
    settings: &'a DetectorSettings,
    dry_run: bool,
    /// Queue notifications for the alerts raised.
    notify: bool,
    /// For the progress bar.
    total_bytes: u64,
    show_progress: bool,
}

/// Runs `specs` to their end through the pipeline, with a progress bar when asked.
async fn ingest_sources(
    store: &Store,
    specs: &[SourceSpec],
    run: &IngestRun<'_>,
    geo: Option<Arc<GeoHandle>>,
) -> anyhow::Result<(IngestStats, std::time::Duration)> {
    let (total_bytes, show_progress) = (run.total_bytes, run.show_progress);
    let metrics = Metrics::new();
    let keys = app::load_keys(store, &metrics).await?;
    let bar = show_progress.then(|| {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let progress: Option<crate::pipeline::Progress> = bar.clone().map(|b| {
        Box::new(move |bytes: u64, lines: u64| {
            b.inc(bytes);
            b.set_message(format!("{} lines", group_digits(lines)));
        }) as crate::pipeline::Progress
    });
    let mut detection = app::build_detection(store, run.settings, geo, run.dry_run).await?;
    if run.notify && !run.dry_run {
        detection.notify = Some(app::change_tracker(store).await?);
    }
    let started = Instant::now();
    let file_opts = FileOptions {
        follow: false,
        ..FileOptions::default()
    };
    let (stats, err) = app::run_sources(
        store,
        keys,
        &metrics,
        specs,
        file_opts,
        PipelineOptions {
            dry_run: run.dry_run,
            ..PipelineOptions::default()
        },
        CancellationToken::new(),
        progress,
        Some(detection),
    )
    .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(e) = err {
        return Err(
            anyhow!(e).context("ingestion stopped early (what was read before is committed)")
        );
    }
    Ok((stats, started.elapsed()))
}

fn print_ingest_summary(
    stats: &IngestStats,
    took: std::time::Duration,
    format: Format,
) -> anyhow::Result<()> {
    let secs = took.as_secs_f64().max(1e-9);
    let rejected: BTreeMap<&str, u64> = stats
        .rejected
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect();
    if format == Format::Json {
        let v = json!({
            "success": true,
            "data": {
                "accepted": stats.accepted,
                "rejected": stats.rejected_total(),
                "rejected_by_reason": rejected,
                "late": stats.late,
                "unknown_key_lines": stats.unknown_key_lines,
                "first_event": stats.first_event,
                "last_event": stats.last_event,
                "keys": stats.keys.len(),
                "organizations": stats.orgs.len(),
                "alerts": stats.alerts.len(),
                "bytes": stats.bytes,
                "seconds": secs,
                "lines_per_second": (stats.accepted + stats.rejected_total()) as f64 / secs,
            }
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut e = std::io::stderr().lock();
    let lines = stats.accepted + stats.rejected_total();
    writeln!(
        e,
        "Ingested {} lines ({}) in {:.2} s: {:.0} lines/s.",
        group_digits(lines),
        human_bytes(stats.bytes),
        secs,
        lines as f64 / secs
    )?;
    writeln!(
        e,
        "  {:<16} {:>10}",
        "accepted",
        group_digits(stats.accepted)
    )?;
    writeln!(
        e,
        "  {:<16} {:>10}",
        "rejected",
        group_digits(stats.rejected_total())
    )?;
    for (reason, n) in &rejected {
        writeln!(e, "    {reason:<14} {:>10}", group_digits(*n))?;
    }
    if stats.rejected_total() > 0 {
        writeln!(
            e,
            "  (each refused line is kept with its reason and line number in kw_dead_letters)"
        )?;
    }
    if stats.late > 0 {
        writeln!(
            e,
            "  {:<16} {:>10}",
            "late (counted)",
            group_digits(stats.late)
        )?;
    }
    match (stats.first_event, stats.last_event) {
        (Some(a), Some(b)) => writeln!(e, "  events     {} → {}", short_time(a), short_time(b))?,
        _ => writeln!(e, "  events     none")?,
    }
    writeln!(
        e,
        "  seen       {} keys, {} organizations, {} lines from unknown keys",
        stats.keys.len(),
        stats.orgs.len(),
        group_digits(stats.unknown_key_lines)
    )?;
    writeln!(
        e,
        "  alerts     {} raised or updated (keywatch report alerts)",
        stats.alerts.len()
    )?;
    Ok(())
}

async fn create_org(
    store: &Store,
    name: &str,
    tier: TierArg,
    custom: Option<i64>,
) -> anyhow::Result<Uuid> {
    let tier = match tier {
        TierArg::Free => "free",
        TierArg::Pro => "pro",
        TierArg::Team => "team",
        TierArg::Enterprise => "enterprise",
    };
    let org = NewOrg {
        id: Uuid::new_v4(),
        name: name.to_owned(),
        slug: slugify(name),
        tier: tier.to_owned(),
        custom_max_requests_monthly: custom,
        created_at: Utc::now(),
    };
    if org.slug.is_empty() {
        bail!("the organization name {name:?} has no letters or digits to make a slug from");
    }
    store.insert_org(&org).await?;
    eprintln!(
        "Created organization {:?} ({}, slug {}).",
        org.name, tier, org.slug
    );
    Ok(org.id)
}

/// A URL-safe slug: lowercase letters and digits, runs of anything else as one `-`.
fn slugify(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(100).collect()
}

/// Finds an organization by id or slug.
fn find_org(cache: &KeyCache, s: &str) -> anyhow::Result<Uuid> {
    if let Ok(id) = Uuid::try_parse(s) {
        return Ok(id);
    }
    cache
        .orgs()
        .find(|o| o.slug == s)
        .map(|o| o.id)
        .ok_or_else(|| {
            anyhow!("no organization has the id or slug {s:?}; see `keywatch orgs list`")
        })
}

/// Finds a key by id or by (an unambiguous start of) its prefix.
fn find_key(cache: &KeyCache, s: &str) -> anyhow::Result<KeyFilter> {
    if s == "unknown" {
        return Ok(KeyFilter::Unknown);
    }
    if let Ok(id) = Uuid::try_parse(s) {
        return Ok(KeyFilter::Id(id));
    }
    cache.key_by_prefix(s).map(KeyFilter::Id).ok_or_else(|| {
        anyhow!("no single key has the id or prefix {s:?}; see `keywatch keys list`")
    })
}

async fn create_key(store: &Store, args: &KeysCreateArgs) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let org_id = find_org(&cache, &args.org)?;
    if cache.org(&org_id).is_none() {
        bail!("no organization has the id {org_id}; see `keywatch orgs list`");
    }
    let secret = crate::secret::from(HMAC_SECRET_VAR, args.hmac_secret_file.as_deref())?;
    let secret = secret.as_deref().map(str::as_bytes);
    if secret.is_some_and(|s| s.len() < 32) {
        bail!(
            "KEYWATCH_API_KEY_HMAC_SECRET must be at least 32 characters, as the auth server requires"
        );
    }
    let key = NewKey::generate(Uuid::new_v4(), secret);
    let now = Utc::now();
    let expires_at = match args.expires_in {
        Some(d) => Some(now + chrono::Duration::from_std(d).context("--expires-in is too long")?),
        None => None,
    };
    let (mode, allowed) = if args.mcps.is_empty() {
        ("all", None)
    } else {
        ("selected", Some(args.mcps.clone()))
    };
    store
        .insert_key(&NewKeyRow {
            id: key.id,
            org_id,
            name: args.name.clone(),
            key_hash: key.hash.clone(),
            key_prefix: key.prefix.clone(),
            scopes: args.scopes.clone(),
            rate_limit_rpm: args.rpm,
            expires_at,
            created_at: now,
            mcp_access_mode: mode.to_owned(),
            allowed_mcp_ids: allowed,
        })
        .await?;
    println!("{}", key.reveal());
    eprintln!(
        "Created key {:?} {} (id {}) for organization {}: {} rpm, expires {}.",
        args.name,
        key.prefix,
        key.id,
        org_id,
        args.rpm,
        expires_at.map_or("never".to_owned(), short_time)
    );
    eprintln!("The full key is shown once, above; keywatch stores only its hash and prefix.");
    if secret.is_none() {
        eprintln!(
            "(No KEYWATCH_API_KEY_HMAC_SECRET: the signature will not verify on an auth server.)"
        );
    }
    Ok(())
}

async fn list_keys(store: &Store, format: Format) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let mut keys: Vec<_> = cache.keys().collect();
    keys.sort_by(|a, b| (a.org_id, &a.name).cmp(&(b.org_id, &b.name)));
    let header = ["id", "prefix", "name", "org", "rpm", "expires_at", "status"];
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                k.prefix.clone(),
                k.name.clone(),
                cache
                    .org(&k.org_id)
                    .map_or(k.org_id.to_string(), |o| o.slug.clone()),
                k.rate_limit_rpm.to_string(),
                k.expires_at.map(short_time).unwrap_or_default(),
                k.status.clone(),
            ]
        })
        .collect();
    print_rows(&header, &rows, format)
}

async fn list_orgs(store: &Store, format: Format) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let mut orgs: Vec<_> = cache.orgs().collect();
    orgs.sort_by(|a, b| a.slug.cmp(&b.slug));
    let header = [
        "id",
        "slug",
        "name",
        "tier",
        "monthly_limit",
        "limit_source",
    ];
    let rows: Vec<Vec<String>> = orgs
        .iter()
        .map(|o| {
            let (limit, source) = o.monthly_limit();
            vec![
                o.id.to_string(),
                o.slug.clone(),
                o.name.clone(),
                o.tier.clone(),
                limit.map_or("unlimited".to_owned(), |l| l.to_string()),
                format!("{source:?}").to_lowercase(),
            ]
        })
        .collect();
    print_rows(&header, &rows, format)
}

/// Prints rows as an aligned table, JSON objects or CSV, on stdout.
fn print_rows(header: &[&str], rows: &[Vec<String>], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let data: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::Value::Object(
                        header
                            .iter()
                            .zip(r)
                            .map(|(h, v)| ((*h).to_owned(), json!(v)))
                            .collect(),
                    )
                })
                .collect();
            writeln!(out, "{}", json!({"success": true, "data": data}))?;
        }
        Format::Csv => crate::report::csv::write_csv(&mut out, header, rows)?,
        Format::Table => write_table(&mut out, header, rows)?,
    }
    Ok(())
}

fn write_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| {
                // Numbers read best right-aligned.
                if c.chars().next().is_some_and(|ch| ch.is_ascii_digit()) && !c.contains('-') {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn parse_time(flag: &str, s: &str) -> anyhow::Result<DateTime<Utc>> {
    crate::event::parse_timestamp(s)
        .map_err(|_| anyhow!("{flag} {s:?} is not an RFC 3339 time such as 2026-11-20T00:00:00Z"))
}

/// Builds the usage question from the flags.
fn usage_query(
    args: &UsageArgs,
    cache: &KeyCache,
    now: DateTime<Utc>,
) -> anyhow::Result<UsageQuery> {
    let mut q = UsageQuery::all_time(now);
    q.group_by = args.group_by;
    q.bucket = args.bucket.map(|b| match b {
        BucketArg::Minute => Granularity::Minute,
        BucketArg::Hour => Granularity::Hour,
        BucketArg::Day => Granularity::Day,
    });
    q.org = args
        .org
        .as_deref()
        .map(|o| find_org(cache, o))
        .transpose()?;
    q.key = args
        .key
        .as_deref()
        .map(|k| find_key(cache, k))
        .transpose()?;
    q.mcp = args.mcp.clone();
    let range = resolve_range(&args.range, now)?;
    (q.from, q.until) = (range.from, range.until);
    if let Some(u) = range.explicit_until {
        q.month_at = u;
    }
    Ok(q)
}

/// A resolved time range: half-open `[from, until)`, and the `--until` given, if any.
#[derive(Debug)]
struct Range {
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    explicit_until: Option<DateTime<Utc>>,
}

/// The range the flags name; all of time without any.
fn resolve_range(r: &TimeRange, now: DateTime<Utc>) -> anyhow::Result<Range> {
    let mut from = report::beginning();
    if let Some(since) = r.since {
        from = now - chrono::Duration::from_std(since).context("--since is too long")?;
    }
    if let Some(f) = &r.from {
        from = parse_time("--from", f)?;
    }
    let until = r
        .until
        .as_deref()
        .map(|u| parse_time("--until", u))
        .transpose()?;
    let end = until.unwrap_or_else(report::end_of_time);
    if from >= end {
        bail!("--from must be before --until");
    }
    Ok(Range {
        from,
        until: end,
        explicit_until: until,
    })
}

async fn report_usage(store: &Store, args: &UsageArgs) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let q = usage_query(args, &cache, Utc::now())?;
    let rows = report::usage(store, &cache, &q).await?;
    // A sparkline per row, for a person at a terminal that can show it.
    let trends = if args.format == Format::Table
        && q.bucket.is_none()
        && std::io::stdout().is_terminal()
        && terminal_shows_unicode()
    {
        Some(report::trends(store, &cache, &q).await?)
    } else {
        None
    };
    print_usage(&rows, q.group_by, args.format, trends.as_ref())
}

/// Whether the locale is UTF-8 and the terminal not `dumb`: where block characters show.
fn terminal_shows_unicode() -> bool {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let locale = [var("LC_ALL"), var("LC_CTYPE"), var("LANG")]
        .into_iter()
        .find(|v| !v.is_empty())
        .unwrap_or_default()
        .to_ascii_lowercase();
    var("TERM") != "dumb" && (locale.contains("utf-8") || locale.contains("utf8"))
}

fn print_usage(
    rows: &[UsageRow],
    group_by: GroupBy,
    format: Format,
    trends: Option<&BTreeMap<report::RowId, String>>,
) -> anyhow::Result<()> {
    if format == Format::Json {
        let data: Vec<_> = rows.iter().map(|r| r.to_json(group_by)).collect();
        println!("{}", json!({"success": true, "data": data}));
        return Ok(());
    }
    let bucketed = rows.iter().any(|r| r.bucket_start.is_some());
    let mut header: Vec<&str> = match group_by {
        GroupBy::Key => vec!["key_prefix", "key_name"],
        GroupBy::Org => vec!["organization"],
        GroupBy::Mcp => vec!["mcp"],
    };
    if bucketed {
        header.push("bucket_start");
    }
    header.extend([
        "requests",
        "auth_4xx",
        "429",
        "other_4xx",
        "5xx",
        "p50_ms",
        "p95_ms",
        "bytes_in",
        "bytes_out",
    ]);
    match group_by {
        GroupBy::Key => header.extend(["peak_rpm", "rpm_limit"]),
        GroupBy::Org => header.extend(["month_to_date", "monthly_limit", "used"]),
        GroupBy::Mcp => {}
    }
    if trends.is_some() {
        header.push("trend");
    }
    let human = format == Format::Table;
    let num = |n: u64| {
        if human {
            group_digits(n)
        } else {
            n.to_string()
        }
    };
    let ms = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.0}"));
    let bytes = |n: u64| if human { human_bytes(n) } else { n.to_string() };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let c = &r.counters;
            let mut cells = match group_by {
                GroupBy::Key => vec![
                    r.key_prefix.clone().unwrap_or_else(|| {
                        r.key_id
                            .map_or("(unknown keys)".to_owned(), |k| k.to_string())
                    }),
                    r.key_name.clone().unwrap_or_default(),
                ],
                GroupBy::Org => vec![r.org_name.clone().unwrap_or_else(|| {
                    r.org_id
                        .map_or("(no organization)".to_owned(), |o| o.to_string())
                })],
                GroupBy::Mcp => vec![
                    r.mcp
                        .clone()
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| "(none)".to_owned()),
                ],
            };
            if bucketed {
                cells.push(r.bucket_start.map(short_time).unwrap_or_default());
            }
            cells.extend([
                num(c.requests),
                num(c.err_auth),
                num(c.err_rate_limited),
                num(c.err_client),
                num(c.err_server),
                ms(c.latency_quantile(0.5)),
                ms(c.latency_quantile(0.95)),
                bytes(c.bytes_in),
                bytes(c.bytes_out),
            ]);
            match group_by {
                GroupBy::Key => cells.extend([
                    r.peak_rpm.map(num).unwrap_or_default(),
                    r.rate_limit_rpm.map(|v| num(v.into())).unwrap_or_default(),
                ]),
                GroupBy::Org => cells.extend([
                    r.month_to_date.map(num).unwrap_or_default(),
                    match (r.monthly_limit, r.limit_source) {
                        (Some(l), _) => num(l),
                        (None, Some(_)) => "unlimited".to_owned(),
                        (None, None) => String::new(),
                    },
                    r.percent_used()
                        .map_or(String::new(), |p| format!("{p:.1}%")),
                ]),
                GroupBy::Mcp => {}
            }
            if let Some(t) = trends {
                cells.push(t.get(&report::row_id(r)).cloned().unwrap_or_default());
            }
            cells
        })
        .collect();
    print_rows(&header, &table, format)
}

async fn report_alerts(store: &Store, args: &AlertsArgs) -> anyhow::Result<()> {
    let cache = store.key_cache().await?;
    let Range { from, until, .. } = resolve_range(&args.range, Utc::now())?;
    let mut f = crate::store::AlertFilter {
        from: Some(from),
        until: Some(until),
        status: args.status.clone(),
        alert_type: args.r#type.clone(),
        severity: args.severity.clone(),
        ..Default::default()
    };
    report::alerts::check(&f).map_err(|e| anyhow!("--{e}"))?;
    f.org = args
        .org
        .as_deref()
        .map(|o| find_org(&cache, o))
        .transpose()?
        .map(|o| o.to_string());
    f.key = match args
        .key
        .as_deref()
        .map(|k| find_key(&cache, k))
        .transpose()?
    {
        Some(KeyFilter::Id(k)) => Some(k.to_string()),
        Some(KeyFilter::Unknown) => Some(String::new()),
        None => None,
    };
    let alerts = report::alerts::alerts(store, &f).await?;
    print_alerts(&alerts, args.format)
}

fn print_alerts(alerts: &[crate::store::StoredAlert], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        println!("{}", json!({"success": true, "data": alerts}));
        return Ok(());
    }
    let header = [
        "started_at",
        "type",
        "severity",
        "status",
        "key_prefix",
        "source_ip",
        "summary",
    ];
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            vec![
                short_time(a.started_at),
                a.alert_type.clone(),
                a.severity.clone(),
                a.status.clone(),
                a.key_prefix.clone().unwrap_or_default(),
                a.source_ip.clone().unwrap_or_default(),
                a.summary.clone(),
            ]
        })
        .collect();
    print_rows(&header, &rows, format)
}

/// `1234567` as `1,234,567`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Writes the organizations and keys of a simulation plan into the database.
async fn insert_plan(store: &Store, plan: &crate::simulate::Plan) -> anyhow::Result<()> {
    for o in &plan.orgs {
        store
            .insert_org(&NewOrg {
                id: o.id,
                name: o.name.clone(),
                slug: o.slug.clone(),
                tier: o.tier.clone(),
                custom_max_requests_monthly: o.custom_max_requests_monthly,
                created_at: plan
                    .keys
                    .iter()
                    .filter(|k| k.info.org_id == o.id)
                    .filter_map(|k| k.info.created_at)
                    .min()
                    .unwrap_or_else(Utc::now),
            })
            .await?;
    }
    for k in &plan.keys {
        let i = &k.info;
        store
            .insert_key(&NewKeyRow {
                id: i.id,
                org_id: i.org_id,
                name: i.name.clone(),
                key_hash: k.key_hash.clone(),
                key_prefix: i.prefix.clone(),
                scopes: i.scopes.clone(),
                rate_limit_rpm: i.rate_limit_rpm,
                expires_at: i.expires_at,
                created_at: i.created_at.unwrap_or_else(Utc::now),
                mcp_access_mode: i.mcp_access_mode.clone(),
                allowed_mcp_ids: (i.mcp_access_mode == "selected")
                    .then(|| i.allowed_mcp_ids.clone()),
            })
            .await?;
    }
    Ok(())
}

fn sim_options(args: &SimulateArgs) -> anyhow::Result<crate::simulate::SimOptions> {
    let end = match &args.end {
        Some(e) => parse_time("--end", e)?,
        None => Granularity::Minute.truncate(Utc::now()),
    };
    if !(args.days > 0.0 && args.days <= 366.0) {
        bail!("--days must be more than 0 and at most 366");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    for (flag, v) in [
        ("--error-share", args.error_share),
        ("--refused-share", args.refused_share),
    ] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{flag} must be between 0 and 1");
        }
    }
    let mut o = crate::simulate::SimOptions::new(end);
    o.keys = args.keys;
    o.orgs = args.orgs;
    o.days = args.days;
    o.lines = args.lines;
    o.seed = args.seed;
    o.error_share = args.error_share;
    o.refused_share = args.refused_share;
    Ok(o)
}

/// Writes a generated log to `path`, returning its stats.
fn write_simulation(
    plan: &crate::simulate::Plan,
    opts: &crate::simulate::SimOptions,
    path: &Path,
) -> anyhow::Result<crate::simulate::SimStats> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let stats = crate::simulate::generate(plan, opts, &mut out)
        .and_then(|s| out.flush().map(|_| s))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(stats)
}

async fn simulate(database_url: &str, args: &SimulateArgs) -> anyhow::Result<()> {
    let opts = sim_options(args)?;
    let plan = crate::simulate::plan(&opts);
    if !args.no_db {
        let store = Store::open(database_url).await?;
        insert_plan(&store, &plan).await?;
    }
    let started = Instant::now();
    let stats = write_simulation(&plan, &opts, &args.out)?;
    eprintln!(
        "Wrote {} lines for {} keys in {} organizations to {} ({} → {}) in {:.1} s.",
        group_digits(stats.lines),
        plan.keys.len(),
        plan.orgs.len(),
        args.out.display(),
        short_time(stats.start),
        short_time(stats.end),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    if !args.no_serve && !args.listen.ip().is_loopback() {
        // The demo serves /metrics and the API with no token: only to this machine.
        bail!(
            "keywatch demo serves only on a loopback address (--listen 127.0.0.1:9464), because it has no token to guard /metrics; `keywatch run --metrics-token-sha256` serves beyond this machine"
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create the demo directory {}", args.dir.display()))?;
    let db_path = args.dir.join("keywatch.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db_path.display()));
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    let url = format!("sqlite://{}", db_path.display());
    let store = Store::open(&url).await?;
    let sim_args = SimulateArgs {
        out: args.dir.join("requests.log"),
        keys: args.keys,
        orgs: None,
        days: args.days,
        lines: None,
        seed: args.seed,
        end: None,
        error_share: 0.03,
        refused_share: 0.01,
        no_db: false,
    };
    let opts = sim_options(&sim_args)?;
    let plan = crate::simulate::plan(&opts);
    insert_plan(&store, &plan).await?;
    let stats = write_simulation(&plan, &opts, &sim_args.out)?;
    eprintln!(
        "keywatch demo: {} organizations, {} keys, {} request-log lines ({} → {}) in {}.",
        plan.orgs.len(),
        plan.keys.len(),
        group_digits(stats.lines),
        short_time(stats.start),
        short_time(stats.end),
        sim_args.out.display()
    );
    let size = std::fs::metadata(&sim_args.out)
        .map(|m| m.len())
        .unwrap_or(0);
    let settings = DetectorSettings::default();
    let mbox = args.dir.join("keywatch-alerts.mbox");
    if mbox.exists() {
        std::fs::remove_file(&mbox).with_context(|| format!("cannot remove {}", mbox.display()))?;
    }
    // The demo's clock jumps to each delivery timer instead of waiting for it.
    let clock = crate::notify::ManualClock::new(stats.start);
    let notify = app::notify_for(
        &crate::config::AlertsConfig::default(),
        &args.dir,
        Arc::new(clock.clone()),
    )?;
    let run = IngestRun {
        settings: &settings,
        dry_run: false,
        notify: true,
        total_bytes: size,
        show_progress: std::io::stderr().is_terminal(),
    };
    let (ingested, took) = ingest_sources(
        &store,
        &[SourceSpec::File(sim_args.out.clone())],
        &run,
        open_geo(None)?.map(Arc::new),
    )
    .await?;
    print_ingest_summary(&ingested, took, Format::Table)?;
    let cache = store.key_cache().await?;
    let now = Utc::now();
    let mut q = UsageQuery::all_time(now);
    q.group_by = GroupBy::Org;
    println!("\nOrganizations (all traffic; month-to-date against the monthly limit):");
    print_usage(
        &report::usage(&store, &cache, &q).await?,
        GroupBy::Org,
        Format::Table,
        None,
    )?;
    q.group_by = GroupBy::Key;
    println!("\nKeys:");
    print_usage(
        &report::usage(&store, &cache, &q).await?,
        GroupBy::Key,
        Format::Table,
        None,
    )?;
    q.group_by = GroupBy::Mcp;
    println!("\nMCPs:");
    print_usage(
        &report::usage(&store, &cache, &q).await?,
        GroupBy::Mcp,
        Format::Table,
        None,
    )?;
    let alerts = store
        .alerts(report::beginning(), report::end_of_time())
        .await?;
    println!("\nAlerts raised by the detectors ({}):", alerts.len());
    print_alerts(&alerts, Format::Table)?;
    let sent = deliver_now(&store, &notify, Some(clock)).await?;
    if std::env::var("KEYWATCH_SMTP_URL").is_ok_and(|u| !u.trim().is_empty()) {
        println!("\n{sent} alert emails sent through KEYWATCH_SMTP_URL.");
    } else {
        println!(
            "\n{sent} alert emails written to {} (set KEYWATCH_SMTP_URL, KEYWATCH_ALERT_FROM and KEYWATCH_ALERT_TO to send them).",
            mbox.display()
        );
    }
    println!(
        "\nAsk more with: keywatch --database-url {url} report usage --group-by org --since 24h"
    );
    if args.no_serve {
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (use --listen to pick another address)",
                args.listen
            )
        })?;
    let metrics = Metrics::new();
    metrics.key_cache_loaded(&Arc::new(cache));
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    println!(
        "Serving http://{}/metrics and /healthz; press Ctrl-C to stop.",
        args.listen
    );
    crate::api::serve(
        listener,
        crate::api::ApiState::new(metrics, store.clone()),
        shutdown,
    )
    .await
    .context("the HTTP server failed")?;
    store.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_bytes_read_well() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1_000), "1,000");
        assert_eq!(group_digits(1_234_567), "1,234,567");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn time_ranges() {
        let now: DateTime<Utc> = "2026-11-20T12:00:00Z".parse().unwrap();
        let r = |since: Option<u64>, from: Option<&str>, until: Option<&str>| {
            resolve_range(
                &TimeRange {
                    since: since.map(std::time::Duration::from_secs),
                    from: from.map(str::to_owned),
                    until: until.map(str::to_owned),
                },
                now,
            )
        };
        let all = r(None, None, None).unwrap();
        assert_eq!(
            (all.from, all.until),
            (report::beginning(), report::end_of_time())
        );
        let day = r(Some(86_400), None, None).unwrap();
        assert_eq!(
            day.from,
            "2026-11-19T12:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(day.explicit_until, None);
        let explicit = r(
            None,
            Some("2026-11-01T00:00:00Z"),
            Some("2026-11-02T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(explicit.explicit_until, Some(explicit.until));
        let backwards = r(
            None,
            Some("2026-11-02T00:00:00Z"),
            Some("2026-11-01T00:00:00Z"),
        );
        assert_eq!(
            backwards.unwrap_err().to_string(),
            "--from must be before --until"
        );
        let bad = r(None, Some("yesterday"), None);
        assert!(bad.unwrap_err().to_string().contains("RFC 3339"));
    }

    #[test]
    fn slugs() {
        assert_eq!(slugify("Acme Corp, Inc."), "acme-corp-inc");
        assert_eq!(slugify("  --  "), "");
    }
}
