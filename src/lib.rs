//! tokenkeeper: keeps SaaS source credentials fresh in Kubernetes Secrets.
//!
//! A SourceConnection goes through `runtime` (watches, queue), `reconcile`
//! (read), `decide` (pure decisions), `write` (Secrets, status, events);
//! `oauth` holds the token protocol. README.md, "Architecture", has the map.

pub mod api;
pub mod crdgen;
pub mod decide;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod leader;
pub mod metrics;
pub mod oauth;
pub mod providers;
pub mod reconcile;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod time;
pub mod write;
