//! tokenkeeper: keeps SaaS source credentials fresh in Kubernetes Secrets.

pub mod api;
pub mod controller;
pub mod crdgen;
pub mod decide;
pub mod error;
pub mod status;
pub mod telemetry;
