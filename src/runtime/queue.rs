//! Which connections to reconcile, and when; and the loop that runs them.
//!
//! Every connection always has a reconcile planned (its next refresh), so
//! the queue holds one entry per connection for as long as the operator
//! runs. kube-runtime's controller keeps each planned reconcile as a
//! request carrying the connection's reference (four Strings), twice: in a
//! map and in a delay queue, a tenth of the heap at scale (benches/README.md).
//! This queue keeps one shared key and one time per connection.
//!
//! It keeps kube-runtime's rules: a connection has one due time, the
//! earliest asked for; it is never reconciled twice at once, and one that
//! comes due while its reconcile runs goes again when that reconcile ends;
//! no more than the concurrency limit run at once; nothing runs before the
//! cache has listed every connection.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::runtime::object_key::{Key, split};
use crate::runtime::wire::CachedConnection;

/// Connections waiting for their due time, and the ones running.
#[derive(Default)]
pub struct WorkQueue {
    /// Ordered by due time; the key is shared with `due_at`.
    due: BTreeSet<(Instant, Arc<str>)>,
    due_at: HashMap<Arc<str>, Instant>,
    running: HashSet<Arc<str>>,
    /// Came due while running: they go again when their reconcile ends.
    again: HashSet<Arc<str>>,
}

impl WorkQueue {
    /// Plans a reconcile of `key` at `at`, unless one is planned earlier.
    pub fn schedule(&mut self, key: &str, at: Instant) {
        let shared = self
            .due_at
            .get_key_value(key)
            .map(|(shared, _)| shared.clone())
            .or_else(|| self.running.get(key).cloned())
            .unwrap_or_else(|| Arc::from(key));
        self.schedule_shared(shared, at);
    }

    fn schedule_shared(&mut self, key: Arc<str>, at: Instant) {
        if let Some(planned) = self.due_at.get(&key).copied() {
            if planned <= at {
                return;
            }
            self.due.remove(&(planned, key.clone()));
        }
        self.due.insert((at, key.clone()));
        self.due_at.insert(key, at);
    }

    /// Drops what is planned for a connection that is gone.
    pub fn forget(&mut self, key: &str) {
        if let Some((shared, planned)) = self.due_at.remove_entry(key) {
            self.due.remove(&(planned, shared));
        }
        self.again.remove(key);
    }

    /// When the earliest planned reconcile is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// The next connection due by `now` that is not running, now running.
    pub fn start_due(&mut self, now: Instant) -> Option<Arc<str>> {
        while self.due.first().is_some_and(|(at, _)| *at <= now) {
            let (_, key) = self.due.pop_first()?;
            self.due_at.remove(&key);
            if self.running.contains(&key) {
                self.again.insert(key);
                continue;
            }
            self.running.insert(key.clone());
            return Some(key);
        }
        None
    }

    /// Ends the reconcile of `key`; `next` is when it asked to run again.
    pub fn finish(&mut self, key: &str, next: Option<Instant>, now: Instant) {
        let Some(shared) = self.running.take(key) else {
            return;
        };
        if self.again.remove(key) {
            self.schedule_shared(shared.clone(), now);
        }
        if let Some(at) = next {
            self.schedule_shared(shared, at);
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }
}

/// What the watches ask of the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Reconcile this connection now.
    Reconcile(Key),
    /// The connection is gone.
    Forget(Key),
}

/// Reconciles the connections of `store` as `triggers` and their own
/// requests say, `concurrency` at once (0: no limit), until `stop`
/// resolves or `triggers` ends; then lets the running reconciles finish.
/// `reconcile` answers in how long to reconcile the connection again
/// (`None`: when a watch says something changed).
pub async fn run<R, F>(
    store: Store<CachedConnection>,
    triggers: impl Stream<Item = Trigger>,
    concurrency: u16,
    stop: impl Future<Output = ()>,
    reconcile: R,
) where
    R: Fn(Arc<CachedConnection>) -> F,
    F: Future<Output = Option<Duration>>,
{
    let limit = match concurrency {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let mut queue = WorkQueue::default();
    let mut running = FuturesUnordered::new();
    let triggers = triggers.fuse();
    let stop = stop.fuse();
    let listed = store.wait_until_ready().fuse();
    futures::pin_mut!(triggers, stop, listed);
    let mut ready = false;
    loop {
        if ready {
            let now = Instant::now();
            while queue.running() < limit {
                let Some(key) = queue.start_due(now) else {
                    break;
                };
                let (namespace, name) = split(&key);
                match store.get(&ObjectRef::new(name).within(namespace)) {
                    Some(conn) => {
                        let reconciled = reconcile(conn);
                        running.push(async move { (key, reconciled.await) });
                    }
                    // Deleted while it waited: the watch's Forget is on
                    // its way, or was missed during a relist.
                    None => queue.finish(&key, None, now),
                }
            }
        }
        let wake = queue
            .next_due()
            .filter(|_| ready && queue.running() < limit);
        tokio::select! {
            biased;
            () = &mut stop => break,
            listing = &mut listed, if !ready => {
                if listing.is_err() {
                    break;
                }
                ready = true;
            }
            Some((key, next)) = running.next(), if !running.is_empty() => {
                let now = Instant::now();
                queue.finish(&key, next.map(|delay| now + delay), now);
            }
            trigger = triggers.next() => match trigger {
                Some(Trigger::Reconcile(key)) => queue.schedule(&key, Instant::now()),
                Some(Trigger::Forget(key)) => queue.forget(&key),
                None => break,
            },
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {}
        }
    }
    while running.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    fn started(queue: &mut WorkQueue, now: Instant) -> Vec<String> {
        std::iter::from_fn(|| queue.start_due(now))
            .map(|key| key.to_string())
            .collect()
    }

    #[test]
    fn connections_run_in_the_order_they_come_due_and_not_before() {
        let t0 = Instant::now();
        let mut queue = WorkQueue::default();
        queue.schedule("data/late", at(t0, 20));
        queue.schedule("data/early", at(t0, 10));
        assert_eq!(queue.next_due(), Some(at(t0, 10)));
        assert!(started(&mut queue, at(t0, 9)).is_empty());
        assert_eq!(started(&mut queue, at(t0, 25)), ["data/early", "data/late"]);
        assert_eq!(queue.next_due(), None);
    }

    #[test]
    fn a_connection_keeps_only_its_earliest_due_time() {
        let t0 = Instant::now();
        let mut queue = WorkQueue::default();
        queue.schedule("data/crm", at(t0, 80));
        queue.schedule("data/crm", at(t0, 5));
        queue.schedule("data/crm", at(t0, 60));
        assert_eq!(queue.next_due(), Some(at(t0, 5)));
        assert_eq!(started(&mut queue, at(t0, 100)), ["data/crm"]);
        assert!(started(&mut queue, at(t0, 100)).is_empty());
    }

    #[test]
    fn a_connection_due_while_it_runs_goes_again_when_it_ends() {
        let t0 = Instant::now();
        let mut queue = WorkQueue::default();
        queue.schedule("data/crm", t0);
        assert_eq!(started(&mut queue, t0), ["data/crm"]);
        queue.schedule("data/crm", at(t0, 1));
        assert!(started(&mut queue, at(t0, 2)).is_empty());
        assert_eq!(queue.running(), 1);

        queue.finish("data/crm", Some(at(t0, 80)), at(t0, 3));
        assert_eq!(queue.next_due(), Some(at(t0, 3)));
        assert_eq!(started(&mut queue, at(t0, 3)), ["data/crm"]);
        queue.finish("data/crm", Some(at(t0, 80)), at(t0, 4));
        assert_eq!(queue.next_due(), Some(at(t0, 80)));
    }

    #[test]
    fn a_finished_connection_runs_again_when_it_asked_or_when_triggered() {
        let t0 = Instant::now();
        let mut queue = WorkQueue::default();
        queue.schedule("data/crm", t0);
        queue.schedule("data/erp", t0);
        started(&mut queue, t0);
        queue.finish("data/crm", Some(at(t0, 80)), t0);
        queue.finish("data/erp", None, t0);
        assert_eq!(queue.next_due(), Some(at(t0, 80)));
        assert_eq!(started(&mut queue, at(t0, 80)), ["data/crm"]);
        queue.schedule("data/erp", at(t0, 90));
        assert_eq!(started(&mut queue, at(t0, 90)), ["data/erp"]);
    }

    #[test]
    fn a_forgotten_connection_does_not_run() {
        let t0 = Instant::now();
        let mut queue = WorkQueue::default();
        queue.schedule("data/gone", at(t0, 10));
        queue.schedule("data/kept", at(t0, 20));
        queue.forget("data/gone");
        assert_eq!(started(&mut queue, at(t0, 30)), ["data/kept"]);

        queue.schedule("data/running", t0);
        started(&mut queue, t0);
        queue.schedule("data/running", t0);
        started(&mut queue, t0);
        queue.forget("data/running");
        queue.finish("data/running", None, at(t0, 1));
        assert_eq!(queue.next_due(), None);
    }
}
