//! Whether the Kubernetes API answers. While it does not, a refresh of a
//! refresh-token grant is not started: the provider may rotate the refresh
//! token, and the write that stores the new one would fail. The current
//! access token stays in the Secret while it is valid.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::Client;

use crate::runtime::object_key::Key;

/// How often a connection that would refresh asks the API whether it is
/// back, across all connections.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct ApiHealth {
    state: Mutex<State>,
    /// Held while one probe is in flight; the others wait for its answer.
    probing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Since when no request has had an answer; `None` while it answers.
    unreachable_since: Option<Instant>,
    last_probe: Option<Instant>,
    /// Connections whose refresh waits for the API, since when.
    deferred: HashMap<Key, Timestamp>,
}

impl ApiHealth {
    /// A request to the API got no answer.
    pub fn failed(&self) {
        let mut state = self.lock();
        state.unreachable_since.get_or_insert_with(Instant::now);
    }

    /// A request to the API was answered.
    pub fn answered(&self) {
        self.lock().unreachable_since = None;
    }

    pub fn is_unreachable(&self) -> bool {
        self.lock().unreachable_since.is_some()
    }

    /// Whether the API answers now: asks it (its version, the cheapest
    /// request) at most once per `PROBE_INTERVAL`, and says what it last
    /// heard otherwise.
    pub async fn answers(&self, client: &Client) -> bool {
        if !self.is_unreachable() {
            return true;
        }
        let _probing = self.probing.lock().await;
        let due = self
            .lock()
            .last_probe
            .is_none_or(|at| at.elapsed() >= PROBE_INTERVAL);
        if due {
            self.lock().last_probe = Some(Instant::now());
            match client.apiserver_version().await {
                Ok(_) => self.answered(),
                Err(_) => self.failed(),
            }
        }
        !self.is_unreachable()
    }

    /// `key`'s refresh waits for the API (since `now`, or earlier).
    pub fn defer(&self, key: Key, now: Timestamp) {
        self.lock().deferred.entry(key).or_insert(now);
    }

    /// Since when `key`'s refresh waited, if it did; forgets it.
    pub fn take_deferral(&self, key: &Key) -> Option<Timestamp> {
        self.lock().deferred.remove(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_from_the_first_failure_until_an_answer() {
        let health = ApiHealth::default();
        assert!(!health.is_unreachable());
        health.failed();
        let since = health.lock().unreachable_since;
        health.failed();
        assert_eq!(
            health.lock().unreachable_since,
            since,
            "the first failure counts"
        );
        assert!(health.is_unreachable());
        health.answered();
        assert!(!health.is_unreachable());
    }

    #[test]
    fn a_deferral_is_told_once_from_its_first_moment() {
        let health = ApiHealth::default();
        let key = Key::from("data/crm");
        let first = Timestamp::from_second(100).unwrap();
        health.defer(key.clone(), first);
        health.defer(key.clone(), Timestamp::from_second(200).unwrap());
        assert_eq!(health.take_deferral(&key), Some(first));
        assert_eq!(health.take_deferral(&key), None);
    }
}
