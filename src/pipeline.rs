//! The pipeline a line travels: parse → resolve key → usage, then commit in batches.
//!
//! Owns the order of the stages and the batching policy: chunks from every source come in on
//! one bounded channel, each line is parsed, resolved against the key cache and counted into
//! the current batch, and the batch is committed with the sources' checkpoints in one
//! transaction (with the alerts the detectors raised and, when notifications are on, the
//! changes among them worth telling someone about). The stages themselves live in their modules (`event`, `keys`, `usage`); this
//! file only drives them, and it never reads a file or writes SQL.

mod chart;
mod retry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::detect::{Context, Detector, Detectors, Finding, Observation};
use crate::event::{self, RejectReason};
use crate::geo::{GeoHandle, Location, LocationCache};
use crate::keys::{KeyCache, redact_keys};
use crate::metrics::Metrics;
use crate::notify::{AlertChange, ChangeTracker};
use crate::source::{Checkpoint, Chunk, ChunkOutcome, CommitAck, RejectedLine};
use crate::store::{Batch, DeadLetter, Store, StoreError};

/// How much of a refused line the dead-letter table keeps.
const DEAD_LETTER_LINE_BYTES: usize = 8 * 1024;
/// The longest MCP name kept; longer ones are cut (they come from log lines, so from anyone).
const MAX_MCP_NAME: usize = 255;

/// Reports progress: bytes of the chunk just processed, and lines processed so far.
pub type Progress = Box<dyn Fn(u64, u64) + Send>;

/// The key cache shared by the pipeline, the refresher and (later) the API.
#[derive(Debug, Default)]
pub struct SharedKeys {
    cache: RwLock<Arc<KeyCache>>,
    refresh: Notify,
}

impl SharedKeys {
    pub fn new(cache: KeyCache) -> Arc<SharedKeys> {
        Arc::new(SharedKeys {
            cache: RwLock::new(Arc::new(cache)),
            refresh: Notify::new(),
        })
    }

    /// The current cache; cheap, and consistent for as long as it is held.
    pub fn get(&self) -> Arc<KeyCache> {
        Arc::clone(&self.cache.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, cache: KeyCache) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cache);
    }

    /// Asks the refresher to reload now (a line named a key the cache does not know).
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Reloads the cache from the store.
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        self.replace(store.key_cache().await?);
        Ok(())
    }

    /// Reloads every `interval`, and at once when asked, until `shutdown`. Errors are logged
    /// and the old cache kept: a database hiccup must not stop counting.
    pub async fn refresh_loop(
        self: Arc<Self>,
        store: Store,
        interval: Duration,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) {
        // At most one reload a second however often lines ask for one.
        let min_gap = Duration::from_secs(1);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.refresh.notified() => {
                    let since = last.elapsed();
                    if since < min_gap {
                        tokio::time::sleep(min_gap - since).await;
                    }
                }
            }
            last = Instant::now();
            match self.reload(&store).await {
                Ok(()) => metrics.key_cache_loaded(&self.get()),
                Err(e) => {
                    tracing::warn!(error = %e, "Could not refresh the key cache; keeping the previous one.")
                }
            }
        }
    }
}

/// How often a running pipeline saves what the detectors learned (and always when it stops).
const STATE_SAVE_EVERY: Duration = Duration::from_secs(600);
/// How often the organizations' month-to-date totals are read back from the store, where the
/// instances sharing a database add up (see `QuotaDetector::sync_month_to_date`).
const TOTALS_SYNC_EVERY: Duration = Duration::from_secs(10);

/// Detection: the detectors, and the GeoIP databases that say where a request came from.
pub struct Detection {
    pub detectors: Detectors,
    pub geo: Option<Arc<GeoHandle>>,
    /// When set, the alert changes worth a notification are queued in the outbox.
    pub notify: Option<ChangeTracker>,
    /// New detector settings (and `[[allow]]` list) from a reloaded alerts.toml, applied at
    /// the next chunk.
    pub settings_updates: Option<tokio::sync::watch::Receiver<crate::detect::Settings>>,
    /// Request-log lines keywatch makes itself, read beside the sources: the HTTP API's
    /// refused credentials (see `api::auth`), so the detectors see attacks on it too.
    pub own_events: Option<mpsc::Receiver<Chunk>>,
}

/// When to commit, and what counts as on time.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Lines older than the newest event time by more than this are late: still counted
    /// (usage buckets are additive, so nothing is lost) but flagged as late.
    pub lateness: chrono::Duration,
    /// Commit at least this often while lines arrive.
    pub flush_interval: Duration,
    /// Commit once this many lines are pending.
    pub flush_lines: u64,
    /// Refuse event times further than this ahead of the wall clock: a line dated in the
    /// year 9999 would otherwise become the newest event time and make every other line late.
    pub max_future: chrono::Duration,
    /// Store nothing: each batch's findings are kept in [`IngestStats::dry_run_findings`] and
    /// the batch (counts, checkpoints, dead letters, alerts) is dropped.
    pub dry_run: bool,
}

impl Default for PipelineOptions {
    fn default() -> PipelineOptions {
        PipelineOptions {
            lateness: chrono::Duration::minutes(5),
            flush_interval: Duration::from_secs(1),
            flush_lines: 25_000,
            max_future: chrono::Duration::hours(24),
            dry_run: false,
        }
    }
}

/// What an ingestion did, for its summary.
#[derive(Debug, Default, Clone)]
pub struct IngestStats {
    pub accepted: u64,
    pub rejected: BTreeMap<RejectReason, u64>,
    pub late: u64,
    pub bytes: u64,
    /// Lines whose key is not in the key tables (refused keys, deleted keys).
    pub unknown_key_lines: u64,
    pub first_event: Option<DateTime<Utc>>,
    pub last_event: Option<DateTime<Utc>>,
    pub keys: HashSet<Uuid, foldhash::quality::RandomState>,
    pub orgs: HashSet<Uuid, foldhash::quality::RandomState>,
    pub commits: u64,
    /// Fingerprints of the alerts the lines opened or updated.
    pub alerts: HashSet<String>,
    /// In a dry run, every finding, in the order the detectors raised them.
    pub dry_run_findings: Vec<crate::detect::Finding>,
}

impl IngestStats {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// One instance of the pipeline: the current batch, the event-time watermark and the stats.
pub struct Pipeline {
    store: Store,
    keys: Arc<SharedKeys>,
    metrics: Metrics,
    opts: PipelineOptions,
    batch: Batch,
    pending_lines: u64,
    checkpoints: HashMap<Arc<str>, Checkpoint>,
    mcps: HashMap<String, Arc<str>>,
    watermark: Option<DateTime<Utc>>,
    stats: IngestStats,
    last_flush: Instant,
    /// The detectors and the GeoIP databases that enrich their input, when detection is on.
    detection: Option<Detection>,
    /// Called after each chunk with the bytes and lines processed so far (a progress bar).
    on_progress: Option<Progress>,
    /// When notifications are on: which findings open, raise or resolve an alert.
    changes: Option<ChangeTracker>,
    /// When the detectors' state was last saved.
    state_saved: Instant,
    /// When the month-to-date totals were last read back from the store.
    totals_synced: Instant,
    /// Which activity values each key-day keeps (the bound outlives a commit).
    activity: crate::activity::ActivityTracker,
    /// Sources waiting to hear that their chunks of the current batch committed.
    acks: Vec<(CommitAck, ChunkOutcome)>,
    /// Batch numbering and failure reporting of [`retry`].
    commits: retry::Commits,
    /// Locations of the addresses seen lately.
    geo_cache: LocationCache,
    /// A buffer for text made from a line's fields.
    scratch: String,
}

/// Queues the notification-worthy change `f` makes, when notifications are on.
fn queue_change(
    tracker: Option<&mut ChangeTracker>,
    batch: &mut Batch,
    f: &crate::detect::Finding,
    cache: &KeyCache,
) {
    if let Some(kind) = tracker.and_then(|t| t.observe(f)) {
        let mut c = AlertChange::from_finding(kind, f);
        c.key_name = f.key_id.and_then(|k| cache.key(&k)).map(|k| {
            let name = crate::notify::render::header_safe(&k.name, 80);
            redact_keys(&name).unwrap_or(name)
        });
        batch.changes.push(c);
    }
}

impl Pipeline {
    pub fn new(
        store: Store,
        keys: Arc<SharedKeys>,
        metrics: Metrics,
        opts: PipelineOptions,
    ) -> Pipeline {
        Pipeline {
            store,
            keys,
            metrics,
            opts,
            batch: Batch::default(),
            pending_lines: 0,
            checkpoints: HashMap::new(),
            mcps: HashMap::new(),
            watermark: None,
            stats: IngestStats::default(),
            last_flush: Instant::now(),
            on_progress: None,
            detection: None,
            changes: None,
            state_saved: Instant::now(),
            totals_synced: Instant::now(),
            activity: Default::default(),
            acks: Vec::new(),
            commits: Default::default(),
            geo_cache: LocationCache::default(),
            scratch: String::new(),
        }
    }

    /// Queues a notification for every alert a finding opens, raises or resolves, in the same
    /// transaction as the alert; `tracker` knows the alerts already announced.
    pub fn with_notifications(mut self, tracker: ChangeTracker) -> Pipeline {
        self.changes = Some(tracker);
        self
    }

    /// Runs every accepted, on-time line through the detectors too.
    pub fn with_detection(mut self, detection: Detection) -> Pipeline {
        self.detection = Some(detection);
        self
    }

    /// Reports the bytes of each chunk as it is processed.
    pub fn with_progress(mut self, f: Progress) -> Pipeline {
        self.on_progress = Some(f);
        self
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Runs every line of a chunk through parse → resolve → usage. Synchronous and
    /// deterministic given the key cache; commits nothing.
    pub fn process(&mut self, chunk: &Chunk) {
        let cache = self.keys.get();
        if let Some(d) = self.detection.as_mut()
            && let Some(rx) = d.settings_updates.as_mut()
            && rx.has_changed().unwrap_or(false)
        {
            let settings = rx.borrow_and_update().clone();
            let rebuilt = d.detectors.reconfigure(&settings);
            if !rebuilt.is_empty() {
                tracing::info!(detectors = %rebuilt.join(", "), "Detector settings reloaded; these detectors start over with what they had learned.");
            }
        }
        // Once per chunk: a database swapped in by a reload applies from the next chunk.
        let geo = self
            .detection
            .as_ref()
            .and_then(|d| d.geo.as_ref())
            .map(|g| g.current());
        let now = Utc::now();
        let mut line_no = chunk.first_line_no;
        let mut accepted = 0u64;
        let mut asked_refresh = false;
        let mut metrics_tally = crate::metrics::ChunkTally::default();
        // This chunk's refusals are the dead letters it appends, for a source that asks.
        let dead_letters_before = self.batch.dead_letters.len();
        for line in chunk.data.split_inclusive(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let this_line = line_no;
            line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines carry nothing and are not errors
            }
            let rec = match event::parse_line(line) {
                Ok(r) if r.created_at - now > self.opts.max_future => Err(event::ParseError {
                    reason: RejectReason::BadTimestamp,
                    detail: format!(
                        "\"created_at\" {} is more than {} h in the future",
                        r.created_at.to_rfc3339(),
                        self.opts.max_future.num_hours()
                    ),
                }),
                other => other,
            };
            let rec = match rec {
                Ok(rec) => rec,
                Err(e) => {
                    self.reject(&chunk.source, this_line, line, e);
                    continue;
                }
            };
            accepted += 1;
            let resolved = cache.resolve(
                rec.api_key_id,
                rec.key_prefix.as_deref(),
                rec.organization_id,
            );
            if !resolved.known {
                self.stats.unknown_key_lines += 1;
                if resolved.key_id.is_some() && !asked_refresh {
                    // A key created after the last refresh: look again soon.
                    self.keys.request_refresh();
                    asked_refresh = true;
                }
            }
            let at = rec.created_at;
            let mut late = false;
            match self.watermark {
                Some(w) if at < w - self.opts.lateness => {
                    self.stats.late += 1;
                    late = true;
                }
                Some(w) if at <= w => {}
                _ => self.watermark = Some(at),
            }
            self.stats.first_event = Some(self.stats.first_event.map_or(at, |f| f.min(at)));
            self.stats.last_event = Some(self.stats.last_event.map_or(at, |l| l.max(at)));
            if let Some(k) = resolved.key_id {
                self.stats.keys.insert(k);
            }
            if let Some(o) = resolved.org_id {
                self.stats.orgs.insert(o);
            }
            let mcp = self.intern_mcp(rec.mcp_server_name.as_deref().unwrap_or(""));
            self.batch.rollup.record(
                at,
                resolved.key_id,
                resolved.org_id,
                &mcp,
                rec.http_status_code,
                rec.latency_ms,
                rec.request_size_bytes,
                rec.response_size_bytes,
            );
            metrics_tally.request(at, rec.http_status_code, rec.latency_ms);
            let loc = match (rec.source_ip, &geo) {
                (Some(ip), Some(g)) => self.geo_cache.locate(g, ip).clone(),
                _ => Location::default(),
            };
            if let (Some(key), true) = (resolved.key_id, resolved.known) {
                self.record_activity(key, at, rec.source_ip, &loc, rec.user_agent.as_deref());
            }
            // Detectors run on event time within the lateness bound; later lines are counted
            // above but would rewrite windows the detectors have already closed.
            if let Some(d) = self.detection.as_mut().filter(|_| !late) {
                let obs = Observation {
                    at,
                    key_id: resolved.key_id,
                    org_id: resolved.org_id,
                    key_prefix: rec.key_prefix.map(|p| p.into_owned()),
                    status: rec.http_status_code,
                    source_ip: rec.source_ip,
                    country: loc.country,
                    city: loc.city.clone(),
                    lat_lon: loc.lat_lon,
                    accuracy_km: loc.accuracy_km,
                    asn: loc.asn,
                    user_agent: rec.user_agent.map(|u| u.into_owned()),
                    origin: rec.origin.map(|o| o.into_owned()),
                    mcp: Some(mcp.to_string()).filter(|m| !m.is_empty()),
                    error_code: rec.error_code.map(|e| e.into_owned()),
                    rate_limit_hit: rec.rate_limit_hit,
                };
                let ctx = Context {
                    key: resolved.key_id.and_then(|k| cache.key(&k)).map(|k| &**k),
                    org: resolved.org_id.and_then(|o| cache.org(&o)).map(|o| &**o),
                };
                for f in d.detectors.observe(&obs, &ctx) {
                    self.take_finding(f, &cache, Some(chunk.read_at));
                }
            }
        }
        if let Some(w) = self.watermark {
            self.activity.forget_before(w);
        }
        if let (Some(d), Some(w)) = (self.detection.as_mut(), self.watermark) {
            for f in d.detectors.tick(w) {
                self.take_finding(f, &cache, Some(chunk.read_at));
            }
        }
        self.stats.accepted += accepted;
        self.stats.bytes += chunk.data.len() as u64;
        self.metrics.lines_accepted(&chunk.source, accepted);
        self.metrics.chunk_read(&chunk.source, &metrics_tally);
        let rate = self
            .detection
            .as_ref()
            .and_then(|d| d.detectors.rate.as_ref());
        self.metrics.detector_subjects(rate.map(|r| r.subjects()));
        let auth = self
            .detection
            .as_ref()
            .and_then(|d| d.detectors.auth.as_ref());
        self.metrics
            .auth_detector_state(auth.map(|a| (a.subjects(), a.evictions())));
        self.pending_lines += line_no - chunk.first_line_no;
        if let Some(cp) = &chunk.checkpoint {
            let mut cp = cp.clone();
            // The newest position wins, but every chunk's counted rows must be remembered.
            if let Some(mut older) = self.checkpoints.remove(&chunk.source)
                && !older.seen.is_empty()
            {
                older.seen.append(&mut cp.seen);
                cp.seen = older.seen;
            }
            self.checkpoints.insert(Arc::clone(&chunk.source), cp);
        }
        if let Some(ack) = &chunk.ack {
            let rejected = self.batch.dead_letters[dead_letters_before..]
                .iter()
                .map(|d| RejectedLine {
                    line_no: d.line_no,
                    reason: d.reason,
                    detail: d.detail.clone(),
                })
                .collect();
            self.acks
                .push((ack.clone(), ChunkOutcome { accepted, rejected }));
            // Someone waits on this chunk, so it counts as pending even if it held only blank
            // lines: the next flush answers it.
            self.pending_lines = self.pending_lines.max(1);
        }
        if let Some(f) = &self.on_progress {
            f(
                chunk.data.len() as u64,
                self.stats.accepted + self.stats.rejected_total(),
            );
        }
    }

    /// Adds a detector's finding to the batch (and the outbox, when notifications are on).
    /// `read_at` is when the chunk holding the line that decided it was read, for the
    /// alert-decision latency; `None` for the month-to-date read-back, which no line decides.
    fn take_finding(&mut self, f: Finding, cache: &KeyCache, read_at: Option<Instant>) {
        if let Some(read_at) = read_at {
            self.metrics.alert_decided(f.alert_type, read_at.elapsed());
        }
        self.stats.alerts.insert(f.fingerprint());
        queue_change(self.changes.as_mut(), &mut self.batch, &f, cache);
        self.batch.findings.push(f);
    }

    /// Counts where a known key was used from, for the activity report.
    fn record_activity(
        &mut self,
        key: Uuid,
        at: DateTime<Utc>,
        ip: Option<std::net::IpAddr>,
        loc: &Location,
        user_agent: Option<&str>,
    ) {
        use std::fmt::Write;

        use crate::activity::Facet;
        let out = &mut self.batch.activity;
        let t = &mut self.activity;
        // Addresses and networks are written into one reused buffer, not a string per line.
        let text = &mut self.scratch;
        if let Some(ip) = ip {
            text.clear();
            let _ = write!(text, "{ip}");
            t.record(out, key, at, Facet::Ip, text);
        }
        if let Some(c) = loc.country {
            t.record(out, key, at, Facet::Country, &String::from_utf8_lossy(&c));
        }
        if let Some(city) = &loc.city {
            t.record(out, key, at, Facet::City, city);
        }
        if let Some(asn) = loc.asn {
            text.clear();
            let _ = write!(text, "AS{asn}");
            t.record(out, key, at, Facet::Network, text);
        }
        if let Some(ua) = user_agent {
            t.record(out, key, at, Facet::UserAgent, ua);
        }
    }

    fn reject(&mut self, source: &Arc<str>, line_no: u64, line: &[u8], e: event::ParseError) {
        *self.stats.rejected.entry(e.reason).or_default() += 1;
        self.metrics.line_rejected(source, e.reason);
        let kept = &line[..line.len().min(DEAD_LETTER_LINE_BYTES)];
        let text = String::from_utf8_lossy(kept);
        let text = redact_keys(&text).unwrap_or_else(|| text.into_owned());
        let detail = redact_keys(&e.detail).unwrap_or(e.detail);
        if self.batch.dead_letters.len() < 10 {
            tracing::debug!(source = %source, line = line_no, reason = %e.reason, "Refused a line.");
        }
        self.batch.dead_letters.push(DeadLetter {
            source: source.to_string(),
            line_no,
            reason: e.reason.as_str(),
            detail,
            line: text.replace('\0', "\u{FFFD}"),
        });
    }

    fn intern_mcp(&mut self, name: &str) -> Arc<str> {
        if let Some(m) = self.mcps.get(name) {
            return Arc::clone(m);
        }
        let mut kept = redact_keys(name).unwrap_or_else(|| name.to_owned());
        if kept.len() > MAX_MCP_NAME {
            let mut end = MAX_MCP_NAME;
            while !kept.is_char_boundary(end) {
                end -= 1;
            }
            kept.truncate(end);
        }
        let arc: Arc<str> = Arc::from(kept.replace('\0', ""));
        // Bound the interner: names come from log lines, so from anyone.
        if self.mcps.len() < 100_000 {
            self.mcps.insert(name.to_owned(), Arc::clone(&arc));
        }
        arc
    }

    /// Whether the batch should be committed now.
    pub fn flush_due(&self) -> bool {
        self.pending_lines >= self.opts.flush_lines
            || (self.pending_lines > 0 && self.last_flush.elapsed() >= self.opts.flush_interval)
    }

    /// Commits the current batch and the checkpoints it covers.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        self.batch.checkpoints = self
            .checkpoints
            .drain()
            .map(|(s, cp)| (s.to_string(), cp))
            .collect();
        if self.batch.is_empty() {
            self.pending_lines = 0;
            self.last_flush = Instant::now();
            self.send_acks();
            return Ok(());
        }
        if self.opts.dry_run {
            let batch = std::mem::take(&mut self.batch);
            self.stats.dry_run_findings.extend(batch.findings);
            self.pending_lines = 0;
            self.last_flush = Instant::now();
            self.send_acks();
            return Ok(());
        }
        if !self.batch.changes.is_empty() {
            chart::fill(&self.store, &mut self.batch).await;
        }
        let started = Instant::now();
        let result = self.store.commit_batch(&self.batch).await;
        self.metrics
            .batch_committed(started.elapsed(), result.is_ok());
        match result {
            Ok(()) => {
                self.metrics.absorb(&self.batch);
                self.batch = Batch::default();
                self.pending_lines = 0;
                self.stats.commits += 1;
                self.last_flush = Instant::now();
                self.send_acks();
                Ok(())
            }
            Err(e) => {
                // Keep the checkpoints for the retry: they still describe this batch.
                for (s, cp) in self.batch.checkpoints.drain(..) {
                    self.checkpoints.entry(Arc::from(s)).or_insert(cp);
                }
                Err(e)
            }
        }
    }

    /// Tells every source waiting on a chunk of the batch just committed.
    fn send_acks(&mut self) {
        for (ack, outcome) in self.acks.drain(..) {
            ack.send(outcome);
        }
    }

    /// Consumes chunks until every sender is gone or `shutdown`, committing as it goes and
    /// once more at the end. `give_up` bounds how long a failing commit is retried.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Chunk>,
        shutdown: CancellationToken,
        give_up: Option<Duration>,
    ) -> Result<IngestStats, StoreError> {
        loop {
            let wait = if self.pending_lines > 0 {
                self.opts
                    .flush_interval
                    .saturating_sub(self.last_flush.elapsed())
            } else {
                // Nothing to commit: wake only for the month-to-date read-back, not every
                // few milliseconds.
                (self.totals_synced + TOTALS_SYNC_EVERY).saturating_duration_since(Instant::now())
            };
            tokio::select! {
                biased;
                chunk = rx.recv() => match chunk {
                    Some(chunk) => self.process(&chunk),
                    None => break,
                },
                _ = shutdown.cancelled() => {
                    // Take what the sources already handed over, then stop.
                    while let Ok(chunk) = rx.try_recv() {
                        self.process(&chunk);
                    }
                    break;
                }
                _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            }
            if self.flush_due() {
                self.flush_with_retry(give_up, &shutdown).await?;
                // Right after a commit the state matches the checkpoints; saving it now and
                // then bounds what a crash (kill -9) makes the detectors forget.
                if self.state_saved.elapsed() >= STATE_SAVE_EVERY {
                    self.save_detector_state().await;
                }
            }
            // Also when idle: a peer's last commit can be what crosses a level.
            if self.pending_lines == 0 && self.totals_synced.elapsed() >= TOTALS_SYNC_EVERY {
                self.sync_month_to_date().await;
            }
        }
        self.flush_with_retry(give_up, &shutdown).await?;
        self.save_detector_state().await;
        Ok(self.stats)
    }

    /// Gives the quota detector the organizations' month-to-date totals as the store holds
    /// them, so that instances which each count their own partitions judge the sum. Run only
    /// when nothing is pending, so that everything this instance counted is in the store. A failure only
    /// delays the sum: it is logged.
    async fn sync_month_to_date(&mut self) {
        self.totals_synced = Instant::now();
        let Some(w) = self.watermark.filter(|_| !self.opts.dry_run) else {
            return;
        };
        if self
            .detection
            .as_ref()
            .is_none_or(|d| d.detectors.quota.is_none())
        {
            return;
        }
        // Peers may be a little ahead in event time: count up to an hour past this watermark,
        // within its month.
        let (_, month_end) = crate::usage::month_of(w);
        let until = (w + chrono::Duration::hours(1)).min(month_end - chrono::Duration::seconds(1));
        let started = Instant::now();
        let totals = crate::report::month_to_date(&self.store, until).await;
        // A large database makes the query slow: then it runs less often, so that it never
        // takes more than about 2% of the pipeline's time.
        self.totals_synced = Instant::now() + started.elapsed() * 50;
        let totals = match totals {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "Could not read the organizations' month-to-date totals; the quota detector counts on from its own.");
                return;
            }
        };
        let cache = self.keys.get();
        let Some(quota) = self
            .detection
            .as_mut()
            .and_then(|d| d.detectors.quota.as_mut())
        else {
            return;
        };
        let found: Vec<_> = totals
            .iter()
            .filter_map(|(id, &total)| cache.org(id).map(|o| (o, total)))
            .flat_map(|(o, total)| quota.sync_month_to_date(o, w, total))
            .collect();
        for f in found {
            self.take_finding(f, &cache, None);
            self.pending_lines = self.pending_lines.max(1);
        }
    }

    /// Keeps what the detectors learned for the next start, now that everything they saw is
    /// committed (a dry run keeps nothing). A failure costs a warm-up, not data: it is logged.
    async fn save_detector_state(&mut self) {
        self.state_saved = Instant::now();
        let Some(d) = self.detection.as_ref().filter(|_| !self.opts.dry_run) else {
            return;
        };
        let states = d.detectors.save_state();
        let at = self.watermark.unwrap_or_else(Utc::now);
        if let Err(e) = self.store.save_detector_state(&states, at).await {
            tracing::warn!(error = %e, "Could not save what the detectors learned; they start over at the next start.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Settings;
    use crate::metrics::Format;

    /// A histogram's count, summed over its series, and the count of its `le` bucket.
    fn histogram_counts(scrape: &str, name: &str, le: &str) -> (u64, u64) {
        let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
        let count = format!("{name}_count");
        let bucket = format!("{name}_bucket{{");
        let le = format!("le=\"{le}\"");
        scrape.lines().fold((0, 0), |(n, b), l| {
            if l.starts_with(&count) {
                (n + value(l).unwrap_or(0), b)
            } else if l.starts_with(&bucket) && l.contains(&le) {
                (n, b + value(l).unwrap_or(0))
            } else {
                (n, b)
            }
        })
    }

    #[tokio::test]
    async fn every_finding_is_timed_from_the_read_of_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        let metrics = Metrics::new();
        let opts = PipelineOptions {
            dry_run: true,
            ..PipelineOptions::default()
        };
        let mut p = Pipeline::new(
            store,
            SharedKeys::new(KeyCache::default()),
            metrics.clone(),
            opts,
        )
        .with_detection(Detection {
            detectors: Detectors::new(&Settings::default()),
            geo: None,
            notify: None,
            settings_updates: None,
            own_events: None,
        });
        // A key in a user agent is a finding of the key-in-logs detector at once, one per key.
        // The keys are made up here (their signature is not the auth server's).
        let mut data = String::new();
        for i in 0..20u128 {
            let id = Uuid::from_u128(i + 1);
            let key = format!("pmcp_01{}{}", id.simple(), "ab".repeat(24));
            data.push_str(&format!(
                "{{\"created_at\":\"2026-11-20T12:{i:02}:00Z\",\"api_key_id\":\"{id}\",\
                 \"key_prefix\":\"{}...\",\"http_status_code\":200,\"latency_ms\":5,\
                 \"source_ip\":\"81.2.69.160\",\"user_agent\":\"script/1 ({key})\"}}\n",
                &key[..17]
            ));
        }
        // Read 30 ms ago: the chunk waited that long for the pipeline.
        let read_at = Instant::now() - Duration::from_millis(30);
        p.process(&Chunk {
            source: Arc::from("file:test"),
            data: data.into_bytes(),
            first_line_no: 1,
            checkpoint: None,
            ack: None,
            read_at,
        });
        p.flush().await.unwrap();
        let findings = p.stats().dry_run_findings.len() as u64;
        assert!(findings >= 20, "{findings} findings");
        let scrape = metrics.render(Format::Prometheus).unwrap();
        let (count, fast) = histogram_counts(&scrape, "keywatch_alert_decision_seconds", "0.025");
        assert_eq!(count, findings, "one observation per finding");
        assert_eq!(fast, 0, "timed from the read, not from processing");
    }
}
