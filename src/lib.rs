//! keywatch: usage monitoring and anomaly detection for PlexMCP API keys.
//!
//! # Layout
//!
//! A request-log line travels one way through these modules:
//!
//! ```text
//! source ──► event (parse) ──► keys (resolve) ──► usage ──► store
//!   file, stdin,  pure parser      key cache         rollups    sqlite / postgres
//!   http, nats,
//!   postgres
//! ```
//!
//! [`pipeline`] drives those stages and commits each batch of counts with the checkpoints of
//! the sources it covers, and with the alert changes worth telling someone about, which
//! [`notify`] then routes, groups and delivers from the outbox (detect → alert → notify). Beside the pipeline: [`store`] (all SQL, both dialects),
//! [`report`] (the query layer the CLI and the API share), [`metrics`] (every metric),
//! [`api`] (HTTP: /metrics, /healthz, /readyz and the reports API under /v1), [`activity`]
//! (where each key was used from, bounded), [`geo`] (GeoIP lookups), [`simulate`] (synthetic
//! traffic for the demo, tests and benchmarks), [`cli`] (flags only) and [`commands`] (what
//! each subcommand does). [`app`] wires the daemon together.

// No unsafe code: the GeoIP databases are read into memory rather than memory-mapped.
#![deny(unsafe_code)]

pub mod activity;
pub mod api;
pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod detect;
pub mod event;
pub mod geo;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod report;
pub mod secret;
pub mod simulate;
pub mod source;
pub mod store;
pub mod usage;
