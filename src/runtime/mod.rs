//! How the operator runs: the wiring of watches, work queue and servers,
//! what wakes which connection, the caches, and the limits on outgoing
//! requests.

pub mod api_health;
pub mod object_key;
pub mod queue;
pub mod relist;
pub mod run;
pub mod sealing_key;
pub mod secret_cache;
pub mod throttle;
pub mod wakeups;
pub mod wire;
