//! prefsd: a notification-preferences sidecar.
//!
//! Before every send, a sender asks prefsd whether customer C may get
//! channel H from service S. prefsd answers from an in-memory index of
//! roaring bitmaps, keeps records and the audit trail in redb, and serves a
//! small HTTP API on hyper.
//!
//! # Layout
//!
//! - [`domain`]: ids, slugs, scopes, records, events — parsed once at the edge.
//! - [`index`]: the pure opt-out index and the resolution rule.
//! - [`store`]: redb tables, snapshots, start-up loading and `prefsd
//!   recover`; [`wal`], the write-ahead log that makes a batch durable, and
//!   how it tells a torn tail from damage.
//! - [`writer`]: the single writer thread and group commit.
//! - [`app`]: the shared state handle.
//! - [`http`]: routes, handlers and the error contract ([`error`]).
//! - [`auth`]: API keys and roles.
//! - [`console`]: the support console's pages, sessions and CSRF tokens.
//! - [`config`]: flags, environment and file, validated into [`config::Config`].
//! - [`metrics`]: the Prometheus registry.
//! - [`server`]: accept loops, graceful shutdown, and per-connection limits
//!   (connection cap, request-head and idle timeouts).
//! - [`cluster`]: cluster mode, PostgreSQL as the shared system of record.
//! - [`client`]: the CLI's HTTP client of a running sidecar, and [`import`]
//!   for CSV/NDJSON preference files.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod console;
pub mod domain;
pub mod error;
pub mod http;
pub mod idset;
pub mod import;
pub mod index;
pub mod metrics;
pub mod page;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod token;
pub mod wal;
pub mod writer;
