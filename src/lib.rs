//! tokenkeeper: keeps SaaS source credentials fresh in Kubernetes Secrets.

pub mod api;
pub mod authorize;
pub mod cached;
pub mod classify;
pub mod controller;
pub mod crdgen;
pub mod decide;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod oauth_sync;
pub mod object_key;
pub mod revocation;
pub mod schedule;
pub mod seal;
pub mod secret_cache;
pub mod server;
pub mod status;
pub mod status_echo;
pub mod telemetry;
pub mod throttle;
pub mod token;
pub mod token_client;
pub mod triggers;
pub mod wakes;
pub mod work_queue;
