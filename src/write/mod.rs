//! The writes a reconcile makes once it has decided: Secrets, the status,
//! events. Each takes the narrow handle it needs, never the whole context.

pub mod events;
pub mod secret;
pub mod status;
