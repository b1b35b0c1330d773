//! Per-stage costs of the hot path, per request-log line: parse, resolve the key, GeoIP, usage
//! rollup, every detector, and the whole in-memory pipeline (`Pipeline::process`, which adds
//! the activity facets and the bookkeeping between the stages). Nothing is stored.
//!
//! The input is `keywatch simulate`'s (10,000 keys, 1,000 organizations, seed 9). Run with
//! `cargo bench --bench pipeline`; each stage reports its throughput in lines per second.
//! The stateful stages (usage, detectors, the whole pipeline) start empty at each iteration,
//! so with about two lines a key they include the first sight of every key (the detectors'
//! per-key state is made then): compare them with each other and across changes. The
//! steady state of a long run is what `scripts/bench-ingest` measures.

use std::hint::black_box;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use keywatch::detect::{Context, Detector, Detectors, Observation, Settings};
use keywatch::event::{Record, parse_line};
use keywatch::geo::{GeoDb, GeoHandle};
use keywatch::keys::{KeyCache, KeySnapshot};
use keywatch::pipeline::{Detection, Pipeline, PipelineOptions, SharedKeys};
use keywatch::simulate::{SimOptions, generate, plan};
use keywatch::source::Chunk;
use keywatch::usage::Rollup;

/// Lines per measured iteration: enough for every key to appear about twice.
const LINES: u64 = 20_000;

struct Input {
    log: Vec<u8>,
    cache: Arc<KeyCache>,
}

fn input() -> Input {
    let mut opts = SimOptions::new(Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap());
    opts.keys = 10_000;
    opts.orgs = Some(1_000);
    opts.lines = Some(LINES);
    opts.seed = 9;
    let plan = plan(&opts);
    let mut log = Vec::new();
    generate(&plan, &opts, &mut log).expect("writing to memory cannot fail");
    let snapshot = KeySnapshot {
        orgs: plan.orgs.clone(),
        keys: plan.keys.iter().map(|k| k.info.clone()).collect(),
    };
    Input {
        log,
        cache: Arc::new(KeyCache::new(snapshot, Utc::now())),
    }
}

fn lines(log: &[u8]) -> impl Iterator<Item = &[u8]> {
    log.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

fn geo_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(keywatch::geo::DEFAULT_DIR)
}

fn observation(rec: &Record<'_>, cache: &KeyCache, geo: &GeoDb) -> Observation {
    let r = cache.resolve(
        rec.api_key_id,
        rec.key_prefix.as_deref(),
        rec.organization_id,
    );
    let loc = rec.source_ip.map(|ip| geo.locate(ip)).unwrap_or_default();
    Observation {
        at: rec.created_at,
        key_id: r.key_id,
        org_id: r.org_id,
        key_prefix: rec.key_prefix.as_deref().map(str::to_owned),
        status: rec.http_status_code,
        source_ip: rec.source_ip,
        country: loc.country,
        city: loc.city,
        lat_lon: loc.lat_lon,
        accuracy_km: loc.accuracy_km,
        asn: loc.asn,
        user_agent: rec.user_agent.as_deref().map(str::to_owned),
        origin: rec.origin.as_deref().map(str::to_owned),
        mcp: rec.mcp_server_name.as_deref().map(str::to_owned),
        error_code: rec.error_code.as_deref().map(str::to_owned),
        rate_limit_hit: rec.rate_limit_hit,
    }
}

fn stages(c: &mut Criterion) {
    let input = input();
    let records: Vec<Record<'_>> = lines(&input.log)
        .map(|l| parse_line(l).expect("simulated lines parse"))
        .collect();
    let geo = GeoDb::open(&geo_path()).expect("the shipped GeoIP database opens");
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.sample_size(20);

    g.bench_function("parse", |b| {
        b.iter(|| {
            for l in lines(&input.log) {
                black_box(parse_line(black_box(l)).ok());
            }
        })
    });
    g.bench_function("resolve", |b| {
        b.iter(|| {
            for r in &records {
                black_box(input.cache.resolve(
                    r.api_key_id,
                    r.key_prefix.as_deref(),
                    r.organization_id,
                ));
            }
        })
    });
    g.bench_function("geoip", |b| {
        b.iter(|| {
            for r in &records {
                black_box(r.source_ip.map(|ip| geo.locate(ip)));
            }
        })
    });
    let mcp: Arc<str> = Arc::from("github");
    g.bench_function("usage", |b| {
        b.iter_batched_ref(
            Rollup::default,
            |rollup| {
                for r in &records {
                    let k = input.cache.resolve(r.api_key_id, None, r.organization_id);
                    rollup.record(
                        r.created_at,
                        k.key_id,
                        k.org_id,
                        &mcp,
                        r.http_status_code,
                        r.latency_ms,
                        r.request_size_bytes,
                        r.response_size_bytes,
                    );
                }
            },
            BatchSize::LargeInput,
        )
    });
    let observations: Vec<Observation> = records
        .iter()
        .map(|r| observation(r, &input.cache, &geo))
        .collect();
    g.bench_function("detectors", |b| {
        b.iter_batched_ref(
            || Detectors::new(&Settings::default()),
            |d| {
                for o in &observations {
                    let ctx = Context {
                        key: o.key_id.and_then(|k| input.cache.key(&k)).map(|k| &**k),
                        org: o.org_id.and_then(|k| input.cache.org(&k)).map(|o| &**o),
                    };
                    black_box(d.observe(o, &ctx));
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn whole(c: &mut Criterion) {
    let input = input();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = rt
        .block_on(keywatch::store::Store::open(&format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        )))
        .expect("a fresh SQLite store");
    let geo = Arc::new(GeoHandle::open(&geo_path()).expect("the shipped GeoIP database opens"));
    let keys = SharedKeys::new(KeyCache::new(
        KeySnapshot {
            orgs: input.cache.orgs().map(|o| (**o).clone()).collect(),
            keys: input.cache.keys().map(|k| (**k).clone()).collect(),
        },
        Utc::now(),
    ));
    let chunk = Chunk {
        source: Arc::from("file:bench"),
        data: input.log.clone(),
        first_line_no: 1,
        checkpoint: None,
        ack: None,
        read_at: std::time::Instant::now(),
    };
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(LINES));
    g.sample_size(10);
    g.bench_function("process", |b| {
        b.iter_batched_ref(
            || {
                Pipeline::new(
                    store.clone(),
                    Arc::clone(&keys),
                    keywatch::metrics::Metrics::new(),
                    PipelineOptions::default(),
                )
                .with_detection(Detection {
                    detectors: Detectors::new(&Settings::default()),
                    geo: Some(Arc::clone(&geo)),
                    notify: None,
                    settings_updates: None,
                    own_events: None,
                })
            },
            |p| p.process(&chunk),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, stages, whole);
criterion_main!(benches);
