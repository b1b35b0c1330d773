//! Wiring: builds the running pipeline from validated settings, starts its tasks (sources,
//! key refresher, HTTP) and stops them in order on shutdown.
//!
//! Owns task lifetimes and the shutdown order (stop reading → commit → stop serving). It
//! decides nothing about what is counted; every loop it starts takes the shutdown token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::metrics::Metrics;
use crate::pipeline::{Detection, IngestStats, Pipeline, PipelineOptions, Progress, SharedKeys};
use crate::source::file::{FileOptions, run_file};
use crate::source::http::{HttpIngest, HttpSettings, run_http};
use crate::source::stdin::run_stdin;
use crate::source::{Chunk, SourceError};
use crate::store::{Store, StoreError};

/// Chunks in flight between the sources and the pipeline: with 1 MiB chunks, a bound of a few
/// MiB of memory however far ahead the sources could read.
const CHANNEL_CHUNKS: usize = 8;

/// A configured source of lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    File(PathBuf),
    Stdin,
    /// `POST /v1/ingest` on the `--listen` address.
    Http,
    /// Partitions of a NATS JetStream stream.
    Nats(crate::source::nats::NatsSpec),
    /// The auth server's tables, in the database at this URL (`None`: `--database-url`).
    Postgres(Option<String>),
}

impl SourceSpec {
    /// The name `/readyz` reports it by.
    pub fn name(&self) -> String {
        match self {
            SourceSpec::File(p) => format!("file:{}", p.display()),
            SourceSpec::Stdin => "stdin".into(),
            SourceSpec::Http => "http".into(),
            SourceSpec::Nats(n) => format!("nats:{}", n.stream),
            SourceSpec::Postgres(_) => "postgres".into(),
        }
    }

    /// Parses `file:PATH`, `stdin` (and `-` for stdin) or `http`.
    pub fn parse(s: &str) -> Result<SourceSpec, String> {
        match s {
            "stdin" | "-" => Ok(SourceSpec::Stdin),
            "http" | "http:" => Ok(SourceSpec::Http),
            "postgres" | "postgres:" => Ok(SourceSpec::Postgres(None)),
            _ if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                Ok(SourceSpec::Postgres(Some(s.to_owned())))
            }
            _ if s.starts_with("postgres:") => Ok(SourceSpec::Postgres(Some(
                s["postgres:".len()..].to_owned(),
            ))),
            _ if s.starts_with("nats://") => crate::source::nats::NatsSpec::parse(s)
                .map(SourceSpec::Nats)
                .map_err(|e| e.to_string()),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SourceSpec::File(PathBuf::from(p))),
                _ => Err(format!(
                    "--source {s:?} is not a source keywatch knows; use postgres[:URL], http, nats://HOST:PORT?stream=S&partitions=A-B&of=N, file:PATH or stdin"
                )),
            },
        }
    }
}

/// What sources beyond files and stdin need from the daemon that starts them.
#[derive(Default)]
pub struct SourceContext {
    /// The HTTP source's endpoint state, served by the daemon's HTTP server.
    pub http: Option<Arc<HttpIngest>>,
    /// The postgres source's settings, its URL resolved.
    pub postgres: Option<crate::source::postgres::PostgresOptions>,
    /// Where sources say whether they are reading (`/readyz`).
    pub health: crate::source::Health,
}

/// Spawns a source's task so that its end marks it down in `health` (with the error, if any).
struct Tracked<'a> {
    tasks: &'a mut tokio::task::JoinSet<Result<(), SourceError>>,
    health: crate::source::Health,
    name: String,
}

impl Tracked<'_> {
    fn spawn(
        &mut self,
        fut: impl std::future::Future<Output = Result<(), SourceError>> + Send + 'static,
    ) {
        let (health, name) = (self.health.clone(), self.name.clone());
        self.tasks.spawn(async move {
            let r = fut.await;
            let why = match &r {
                Ok(()) => "stopped".to_owned(),
                Err(e) => format!("stopped: {e}"),
            };
            health.down(&name, why);
            r
        });
    }
}

/// Loads the key cache and reports its size.
pub async fn load_keys(store: &Store, metrics: &Metrics) -> Result<Arc<SharedKeys>, StoreError> {
    let keys = SharedKeys::new(store.key_cache().await?);
    metrics.key_cache_loaded(&keys.get());
    Ok(keys)
}

/// Runs `specs` through one pipeline until every source ends (batch mode) or `shutdown`.
/// Returns the stats and the first source error, if any (the counts of what was read before
/// it are committed all the same).
#[allow(clippy::too_many_arguments)]
pub async fn run_sources(
    store: &Store,
    keys: Arc<SharedKeys>,
    metrics: &Metrics,
    specs: &[SourceSpec],
    file_opts: FileOptions,
    opts: PipelineOptions,
    shutdown: CancellationToken,
    progress: Option<Progress>,
    detection: Option<Detection>,
) -> Result<(IngestStats, Option<SourceError>), StoreError> {
    run_sources_in(
        store,
        keys,
        metrics,
        specs,
        file_opts,
        opts,
        shutdown,
        progress,
        detection,
        &SourceContext::default(),
    )
    .await
}

/// [`run_sources`] with what the HTTP, NATS and PostgreSQL sources need.
#[allow(clippy::too_many_arguments)]
pub async fn run_sources_in(
    store: &Store,
    keys: Arc<SharedKeys>,
    metrics: &Metrics,
    specs: &[SourceSpec],
    file_opts: FileOptions,
    opts: PipelineOptions,
    shutdown: CancellationToken,
    progress: Option<Progress>,
    detection: Option<Detection>,
    ctx: &SourceContext,
) -> Result<(IngestStats, Option<SourceError>), StoreError> {
    let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    // The sources also stop when the pipeline fails for good (a full disk), which would
    // otherwise leave a source following a quiet file waiting for ever.
    let sources_stop = shutdown.child_token();
    let checkpoints = Arc::new(store.clone());
    // A dry run replays every file from its beginning, whatever was ingested before.
    let no_checkpoints = Arc::new(crate::source::NoCheckpoints);
    let dry_run = opts.dry_run;
    let mut tasks = tokio::task::JoinSet::new();
    for spec in specs {
        let tx = tx.clone();
        let token = sources_stop.clone();
        let health = ctx.health.clone();
        let name = spec.name();
        health.up(&name);
        let mut tasks = Tracked {
            tasks: &mut tasks,
            health: health.clone(),
            name,
        };
        match spec.clone() {
            SourceSpec::File(path) => {
                let opts = file_opts.clone();
                if dry_run {
                    let cps = Arc::clone(&no_checkpoints);
                    tasks.spawn(
                        async move { run_file(path, opts, cps, tx, token).await.map(|_| ()) },
                    );
                } else {
                    let cps = Arc::clone(&checkpoints);
                    tasks.spawn(
                        async move { run_file(path, opts, cps, tx, token).await.map(|_| ()) },
                    );
                }
            }
            SourceSpec::Stdin => {
                let chunk = file_opts.chunk_bytes;
                tasks.spawn(async move { run_stdin(tx, token, chunk).await.map(|_| ()) });
            }
            SourceSpec::Http => match ctx.http.clone() {
                Some(h) => {
                    tasks.spawn(async move {
                        run_http(h, tx, token).await;
                        Ok(())
                    });
                }
                None => {
                    tasks.spawn(async { Err(SourceError::Unavailable("http".into())) });
                }
            },
            SourceSpec::Postgres(_) => match ctx.postgres.clone() {
                Some(o) => {
                    tasks.spawn(crate::source::postgres::run_postgres(
                        o,
                        store.clone(),
                        tx,
                        token,
                        health,
                    ));
                }
                None => {
                    tasks.spawn(async { Err(SourceError::Unavailable("postgres".into())) });
                }
            },
            SourceSpec::Nats(spec) => {
                let cps = Arc::clone(&checkpoints);
                tasks.spawn(crate::source::nats::run_nats(spec, cps, tx, token, health));
            }
        }
    }
    let mut detection = detection;
    if let Some(mut events) = detection.as_mut().and_then(|d| d.own_events.take()) {
        let (tx, token) = (tx.clone(), sources_stop.clone());
        tasks.spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    c = events.recv() => c,
                };
                let Some(c) = chunk else { return Ok(()) };
                if tx.send(c).await.is_err() {
                    return Ok(());
                }
            }
        });
    }
    drop(tx);
    let mut pipeline =
        Pipeline::new(store.clone(), keys, metrics.clone(), opts).with_health(ctx.health.clone());
    if let Some(p) = progress {
        pipeline = pipeline.with_progress(p);
    }
    if let Some(mut d) = detection {
        if let Some(t) = d.notify.take() {
            pipeline = pipeline.with_notifications(t);
        }
        pipeline = pipeline.with_detection(d);
    }
    let sources_done = async {
        let mut first_err = None;
        while let Some(r) = tasks.join_next().await {
            let err = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(join) => Some(SourceError::Io {
                    path: "source task".into(),
                    source: std::io::Error::other(join.to_string()),
                }),
            };
            if let Some(e) = err {
                tracing::error!(error = %e, "A source stopped.");
                first_err.get_or_insert(e);
            }
        }
        first_err
    };
    // A batch run gives up on a database that stays down; the daemon waits for it.
    let give_up = (!file_opts.follow).then(|| Duration::from_secs(60));
    let counted = async {
        let r = pipeline.run(rx, shutdown.clone(), give_up).await;
        if r.is_err() {
            sources_stop.cancel();
        }
        r
    };
    let (stats, source_err) = tokio::join!(counted, sources_done);
    Ok((stats?, source_err))
}

/// Settings of the daemon, already validated.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub sources: Vec<SourceSpec>,
    pub listen: SocketAddr,
    pub start_at_end: bool,
    pub key_refresh: Duration,
    pub lateness: Duration,
    pub geo: Option<Arc<crate::geo::GeoHandle>>,
    /// The detector settings (from `alerts.toml`).
    pub detectors: crate::detect::Settings,
    /// How many keys, organizations and MCPs /metrics labels.
    pub metrics: crate::metrics::Limits,
    /// Alert delivery: settings and receivers (from `alerts.toml` and the environment).
    pub notify: Option<Notify>,
    /// Where alerts.toml was read from (and whether it must exist), to re-read it on SIGHUP.
    pub alerts_file: Option<(PathBuf, bool)>,
    /// How the HTTP API authenticates.
    pub api_auth: crate::api::auth::AuthSettings,
    /// The HTTP source's settings, when `sources` has `http`.
    pub http: Option<HttpSettings>,
    /// The postgres source's settings, when `sources` has `postgres`.
    pub postgres: Option<crate::source::postgres::PostgresOptions>,
    /// How long usage rollup rows are kept.
    pub retention: crate::store::Retention,
    /// How often rows past their retention are deleted (and once at start).
    pub retention_interval: Duration,
    /// How long a stop may take, from the signal to the exit.
    pub shutdown_timeout: Duration,
}

/// How long the HTTP source remembers a push's `Idempotency-Key`: a client that resends a
/// committed push within this time has it answered as a duplicate, not counted again.
pub const PUSH_IDS_KEPT: Duration = Duration::from_secs(7 * 86_400);

/// Alert delivery for `alerts`: its settings and receivers, with the environment read and
/// relative mailboxes in `dir`.
pub fn notify_for(
    alerts: &crate::config::AlertsConfig,
    dir: &Path,
    clock: Arc<dyn crate::notify::Clock>,
) -> anyhow::Result<Notify> {
    let settings = Arc::new(alerts.notify_settings()?);
    let receivers = crate::notify::receivers(&settings, dir).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Notify {
        settings,
        receivers,
        clock,
    })
}

/// Alert delivery, ready to start.
#[derive(Clone)]
pub struct Notify {
    pub settings: Arc<crate::notify::NotifySettings>,
    pub receivers: std::collections::HashMap<String, Arc<dyn crate::notify::Receiver>>,
    pub clock: Arc<dyn crate::notify::Clock>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("receivers", &self.receivers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What the pipeline needs to queue notifications: the alerts the store already announced.
pub async fn change_tracker(store: &Store) -> Result<crate::notify::ChangeTracker, StoreError> {
    let open = store.open_alerts().await?;
    Ok(crate::notify::ChangeTracker::new(
        open.into_iter()
            .filter_map(|(fp, sev)| Some((fp, crate::notify::route::parse_severity(&sev)?))),
    ))
}

/// The daemon: sources followed forever, keys refreshed, HTTP served, until `shutdown`.
pub async fn run_daemon(
    store: Store,
    settings: DaemonSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics = Metrics::with_limits(settings.metrics);
    let keys = load_keys(&store, &metrics).await?;
    seed_metrics(
        &store,
        &metrics,
        settings.geo.as_ref().map(|g| g.current()).as_deref(),
    )
    .await;
    if let Some(geo) = settings.geo.clone() {
        tokio::spawn(geo_reload_loop(
            geo,
            metrics.clone(),
            shutdown.child_token(),
        ));
    }
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", settings.listen))?;
    tracing::info!(listen = %settings.listen, database = store.url(), "Serving /metrics and /healthz.");
    let mut ctx = SourceContext {
        postgres: settings.postgres.clone(),
        ..SourceContext::default()
    };
    if settings.sources.contains(&SourceSpec::Http) {
        let http = settings
            .http
            .clone()
            .context("--source http needs --ingest-token-sha256")?;
        ctx.http = Some(HttpIngest::new(http, Some(store.clone())));
        tracing::info!(listen = %settings.listen, "Taking pushed lines on POST /v1/ingest.");
    }
    let (refused_tx, refused_rx) = mpsc::channel::<Chunk>(api::auth::REFUSED_EVENTS_QUEUE);
    let http = tokio::spawn(api::serve(
        listener,
        ApiState::new(metrics.clone(), store.clone())
            .with_keys(Arc::clone(&keys))
            .with_auth(settings.api_auth.clone(), Some(refused_tx))
            .with_ingest(ctx.http.clone().map(crate::source::http::router))
            .with_sources(ctx.health.clone()),
        shutdown.child_token(),
    ));
    let refresher = tokio::spawn(Arc::clone(&keys).refresh_loop(
        store.clone(),
        settings.key_refresh,
        metrics.clone(),
        shutdown.child_token(),
    ));
    spawn_signal_handlers(Arc::clone(&keys), shutdown.clone());
    let overdue = overdue_after(&shutdown, settings.shutdown_timeout);
    tokio::spawn(retention_loop(
        store.clone(),
        settings.retention,
        settings.retention_interval,
        shutdown.child_token(),
    ));
    // Delivery stops last: after reading stopped and the last batch (and its outbox rows)
    // was committed.
    let delivery_stop = CancellationToken::new();
    let (notify_tx, notify_rx) = tokio::sync::watch::channel(settings.notify.clone());
    let delivery = settings.notify.is_some().then(|| {
        tokio::spawn(deliver_reloading(
            store.clone(),
            notify_rx,
            metrics.clone(),
            delivery_stop.clone(),
        ))
    });
    let mut detection =
        build_detection(&store, &settings.detectors, settings.geo.clone(), false).await?;
    if settings.notify.is_some() {
        detection.notify = Some(change_tracker(&store).await?);
    }
    if let Some((path, required)) = settings.alerts_file.clone() {
        let (detectors_tx, detectors_rx) = tokio::sync::watch::channel(settings.detectors.clone());
        detection.settings_updates = Some(detectors_rx);
        tokio::spawn(alerts_reload_loop(
            AlertsReload {
                path,
                required,
                notify: notify_tx,
                detectors: detectors_tx,
            },
            shutdown.child_token(),
        ));
    }
    detection.own_events = Some(refused_rx);
    let file_opts = FileOptions {
        follow: true,
        start_at_end: settings.start_at_end,
        ..FileOptions::default()
    };
    let opts = PipelineOptions {
        lateness: chrono::Duration::from_std(settings.lateness)
            .unwrap_or(chrono::Duration::minutes(5)),
        ..PipelineOptions::default()
    };
    let reading = run_sources_in(
        &store,
        keys,
        &metrics,
        &settings.sources,
        file_opts,
        opts,
        shutdown.clone(),
        None,
        Some(detection),
        &ctx,
    );
    let ran = tokio::select! {
        r = reading => r,
        () = overdue.cancelled() => anyhow::bail!(
            "could not commit what was read within --shutdown-timeout {}; the sources resume from the last commit at the next start (lines read from stdin since then are lost)",
            shown_secs(settings.shutdown_timeout)
        ),
    };
    if ran.is_err() {
        // The database cannot take counts any more: stop serving too.
        shutdown.cancel();
    }
    let (stats, source_err) = ran?;
    tracing::info!(
        accepted = stats.accepted,
        rejected = stats.rejected_total(),
        "Stopped reading; counts committed."
    );
    // Reading may also have ended on its own (a source failed): stop everything else now.
    shutdown.cancel();
    delivery_stop.cancel();
    if let Some(d) = delivery {
        let finished = within(&overdue, d, "Stopped with a notification unconfirmed by its server; it stays queued and is sent again at the next start, with the same Message-ID.").await;
        if let Some(Err(e)) = finished {
            tracing::warn!(error = %e, "The alert delivery task failed.");
        }
    }
    let _ = refresher.await;
    let served = within(
        &overdue,
        http,
        "Stopped with HTTP requests still open; their clients get no answer.",
    )
    .await;
    match served {
        Some(Ok(Err(e))) => tracing::warn!(error = %e, "The HTTP server stopped with an error."),
        Some(Err(e)) => tracing::warn!(error = %e, "The HTTP server task failed."),
        Some(Ok(Ok(()))) | None => {}
    }
    match source_err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// A token cancelled `timeout` after `shutdown` is: the moment a stop has taken too long.
fn overdue_after(shutdown: &CancellationToken, timeout: Duration) -> CancellationToken {
    let overdue = CancellationToken::new();
    let (shutdown, fire) = (shutdown.clone(), overdue.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tokio::time::sleep(timeout).await;
        fire.cancel();
    });
    overdue
}

/// Waits for `task` until `overdue`; then aborts it and logs `abandoned`.
async fn within<T>(
    overdue: &CancellationToken,
    mut task: tokio::task::JoinHandle<T>,
    abandoned: &str,
) -> Option<Result<T, tokio::task::JoinError>> {
    tokio::select! {
        r = &mut task => Some(r),
        () = overdue.cancelled() => {
            task.abort();
            tracing::warn!("{abandoned}");
            None
        }
    }
}

/// `d` in whole seconds, as the duration flags are written.
fn shown_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Deletes usage rows past their retention at start and then every `every`, until
/// `shutdown`. A failure is logged and tried again at the next pass: it costs disk, not data.
async fn retention_loop(
    store: Store,
    retention: crate::store::Retention,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let pass = store.prune(&retention, PUSH_IDS_KEPT, chrono::Utc::now());
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = pass => r,
        };
        match result {
            Ok(p) if p.rollup_rows() + p.push_ids > 0 => tracing::info!(
                minute_rows = p.minute_rows,
                hour_rows = p.hour_rows,
                day_rows = p.day_rows,
                push_ids = p.push_ids,
                reference = ?p.reference,
                "Pruned usage past its retention."
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Could not prune old usage rows; will try again at the next pass.")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Gives the metrics what the pipeline does not see: the GeoIP databases in use, and the
/// month-to-date counts committed before this process started. A failure is logged: it costs
/// only the month-to-date gauges their earlier counts.
async fn seed_metrics(store: &Store, metrics: &Metrics, geo: Option<&crate::geo::GeoDb>) {
    if let Some(g) = geo {
        metrics.geoip_loaded(g);
    }
    let now = chrono::Utc::now();
    match crate::report::month_to_date(store, now).await {
        Ok(counts) => metrics.seed_month_to_date(now, &counts),
        Err(e) => {
            tracing::warn!(error = %e, "Could not read month-to-date usage; the metrics count this month from now.")
        }
    }
}

/// Runs delivery with the settings `notify` holds, restarting the dispatcher and sender when
/// they change (alerts.toml reloaded). Their state (groups, outbox, retries) is in the
/// database, so a restart of them loses nothing, as a restart of the process does not. When
/// delivery stops with an error (the database failing as it loads its state), it is started
/// again after a pause that doubles up to a minute: the outbox keeps what is due meanwhile.
async fn deliver_reloading(
    store: Store,
    mut notify: tokio::sync::watch::Receiver<Option<Notify>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    /// Why one run of delivery ended.
    enum Next {
        Stop,
        Reload,
        Failed,
    }
    const FIRST_PAUSE: Duration = Duration::from_secs(1);
    const LONGEST_PAUSE: Duration = Duration::from_secs(60);
    let mut pause = FIRST_PAUSE;
    loop {
        let Some(n) = notify.borrow_and_update().clone() else {
            return;
        };
        let this = stop.child_token();
        let mut task = tokio::spawn(crate::notify::run_delivery(
            store.clone(),
            n.settings,
            n.receivers,
            n.clock,
            metrics.clone(),
            this.clone(),
        ));
        let (next, ended) = tokio::select! {
            _ = stop.cancelled() => (Next::Stop, None),
            r = notify.changed() => (if r.is_ok() { Next::Reload } else { Next::Stop }, None),
            r = &mut task => (Next::Failed, Some(r)),
        };
        this.cancel();
        let ended = match ended {
            Some(r) => r,
            None => task.await,
        };
        match ended {
            Ok(Err(e)) => tracing::warn!(error = %e, "Alert delivery stopped with an error."),
            Err(e) => tracing::warn!(error = %e, "The alert delivery task failed."),
            Ok(Ok(())) => {}
        }
        match next {
            Next::Stop => return,
            Next::Reload => {
                pause = FIRST_PAUSE;
                tracing::info!("Alert delivery restarted with the reloaded settings.");
            }
            Next::Failed => {
                tracing::info!(
                    in_secs = pause.as_secs(),
                    "Alert delivery starts again shortly; notifications wait in the outbox."
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                    r = notify.changed() => if r.is_err() { return },
                }
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

/// What a SIGHUP re-reads alerts.toml into.
struct AlertsReload {
    path: PathBuf,
    required: bool,
    notify: tokio::sync::watch::Sender<Option<Notify>>,
    /// The detector settings in force, with the `[[allow]]` list, for the pipeline.
    detectors: tokio::sync::watch::Sender<crate::detect::Settings>,
}

impl AlertsReload {
    /// Re-reads the file: detector settings, `[[allow]]` and delivery take effect now. A file that does not check
    /// changes nothing, and the log says why.
    fn reload(&mut self) {
        let shown = self.path.display().to_string();
        let loaded = crate::config::AlertsConfig::load(&self.path, self.required)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| {
                let clock: Arc<dyn crate::notify::Clock> = Arc::new(crate::notify::SystemClock);
                Ok((notify_for(&cfg, Path::new("."), clock)?, cfg))
            });
        let (notify, cfg) = match loaded {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(file = %shown, error = %format!("{e:#}"), "SIGHUP: the new alerts.toml is rejected; keeping the settings in force.");
                return;
            }
        };
        self.detectors.send_if_modified(|d| {
            let new = cfg.detector_settings();
            let changed = *d != new;
            *d = new;
            changed
        });
        self.notify.send_replace(Some(notify));
        tracing::info!(file = %shown, "SIGHUP: reloaded alerts.toml (detectors, [[allow]], receivers, routes, silences).");
    }
}

async fn alerts_reload_loop(mut reload: AlertsReload, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("Cannot listen for SIGHUP; alerts.toml is read only at start.");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup.recv() => reload.reload(),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (&mut reload, shutdown);
    }
}

/// SIGTERM and Ctrl-C stop the daemon cleanly; SIGHUP reloads the keys at once.
/// How often the GeoIP files are checked for replacement.
const GEO_RELOAD_EVERY: Duration = Duration::from_secs(60);

/// Picks up GeoIP databases replaced on disk (and on SIGHUP, which also checks them): a
/// broken new file is logged and the previous databases stay in use.
async fn geo_reload_loop(
    geo: Arc<crate::geo::GeoHandle>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(GEO_RELOAD_EVERY) => {}
            _ = hangup => {}
        }
        let g = Arc::clone(&geo);
        match tokio::task::spawn_blocking(move || g.reload()).await {
            Ok(Ok(true)) => {
                let db = geo.current();
                metrics.geoip_loaded(&db);
                tracing::info!(databases = ?db, "Reloaded the GeoIP databases.");
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "A replaced GeoIP database does not open; keeping the previous one.");
            }
            Err(e) => tracing::warn!(error = %e, "The GeoIP reload task failed."),
        }
    }
}

fn spawn_signal_handlers(keys: Arc<SharedKeys>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::warn!("Cannot install signal handlers; stop keywatch with Ctrl-C.");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading keys and GeoIP databases.");
                        keys.request_refresh();
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("Stopping: committing what was read.");
        shutdown.cancel();
    });
}

/// The detectors for `settings`, taught the places people marked benign (so that "this is
/// fine" outlives a restart).
///
/// Unless `dry_run` (which re-reads what the store already counted), the quota detector is
/// told what the month already holds, up to the newest counted minute, and which levels it
/// already reported: a restart mid-month neither misses a crossing nor repeats one.
pub async fn build_detection(
    store: &Store,
    settings: &crate::detect::Settings,
    geo: Option<Arc<crate::geo::GeoHandle>>,
    dry_run: bool,
) -> Result<Detection, StoreError> {
    let mut detectors = crate::detect::Detectors::new(settings);
    if let Some(loc) = detectors.location.as_mut() {
        for p in store.benign_places().await? {
            loc.learn_country(p.key_id, p.since, p.country);
        }
    }
    if !dry_run {
        for (name, state) in store.detector_state().await? {
            if let Err(e) = detectors.restore_state(&name, &state) {
                tracing::warn!(detector = %name, error = %e, "Saved detector state does not read; that detector starts over.");
            }
        }
    }
    if let (Some(quota), false) = (detectors.quota.as_mut(), dry_run)
        && let Some(at) = store.latest_minute().await?
    {
        let at = at + chrono::Duration::minutes(1);
        let (month_start, _) = crate::usage::month_of(at);
        let mut reported: std::collections::HashMap<String, Vec<u32>> = Default::default();
        for a in store
            .alerts(month_start, at + chrono::Duration::days(1))
            .await?
        {
            if let (true, Some(org), Some(level)) = (
                a.alert_type == "quota_threshold",
                a.org_id.clone(),
                a.evidence.get("score").and_then(serde_json::Value::as_f64),
            ) {
                let levels = reported.entry(org).or_default();
                levels.extend(
                    settings
                        .quota
                        .levels
                        .iter()
                        .filter(|&&l| f64::from(l) <= level),
                );
            }
        }
        for (org, count) in crate::report::month_to_date(store, at).await? {
            let levels = reported
                .get(&org.to_string())
                .map_or(&[][..], Vec::as_slice);
            quota.seed(org, at, count, levels);
        }
    }
    Ok(Detection {
        detectors,
        geo,
        notify: None,
        settings_updates: None,
        own_events: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_specs() {
        assert_eq!(SourceSpec::parse("stdin"), Ok(SourceSpec::Stdin));
        assert_eq!(
            SourceSpec::parse("file:/var/log/a.log"),
            Ok(SourceSpec::File("/var/log/a.log".into()))
        );
        assert_eq!(SourceSpec::parse("http"), Ok(SourceSpec::Http));
        assert_eq!(
            SourceSpec::parse("postgres"),
            Ok(SourceSpec::Postgres(None))
        );
        let other = Some("postgres://kw@db/auth".to_owned());
        assert_eq!(
            SourceSpec::parse("postgres:postgres://kw@db/auth"),
            Ok(SourceSpec::Postgres(other.clone()))
        );
        assert_eq!(
            SourceSpec::parse("postgres://kw@db/auth"),
            Ok(SourceSpec::Postgres(other))
        );
        match SourceSpec::parse("nats://127.0.0.1:4222?stream=PLEXMCP_REQUESTS&partitions=0-3&of=8")
        {
            Ok(SourceSpec::Nats(n)) => assert_eq!((n.partitions.len(), n.of), (4, 8)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            SourceSpec::parse("kafka:x").unwrap_err(),
            "--source \"kafka:x\" is not a source keywatch knows; use postgres[:URL], http, nats://HOST:PORT?stream=S&partitions=A-B&of=N, file:PATH or stdin"
        );
    }
}
