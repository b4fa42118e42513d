//! Limits on what thousands of connections starting at once (a new
//! operator, a restored cluster) would otherwise send in a stampede: token
//! requests per provider host (at most `concurrency` in flight and
//! `per_second` started, with a small burst), and informational events to
//! the API server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::decide::refresh::DUE_TIME_GRID;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_second: f64,
    pub burst: u32,
    pub concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_second: 200.0,
            burst: 20,
            concurrency: 32,
        }
    }
}

pub struct HostThrottle {
    limits: Limits,
    gates: Mutex<Gates>,
}

#[derive(Default)]
struct Gates {
    by_host: HashMap<String, Arc<Gate>>,
    /// The gate of each token URL seen, so that a refresh does not parse
    /// its URL again. Token URLs are few; the map is cleared should spec
    /// edits ever make it large.
    by_url: HashMap<Box<str>, Arc<Gate>>,
}

/// More distinct token URLs than any cluster has providers.
const REMEMBERED_URLS: usize = 1024;

struct Gate {
    in_flight: Arc<Semaphore>,
    /// Where the release ticks of this gate are counted from.
    ticks_from: Instant,
    /// The earliest start of the next request (a GCRA schedule).
    next_start: Mutex<Option<Instant>>,
}

/// The host of `url` as rate buckets and metric labels know it: the host,
/// with the port when it is not the scheme's default.
pub fn host_key(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|url| {
            let host = url.host_str()?;
            Some(match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            })
        })
        .unwrap_or_default()
}

/// Held while a token request is in flight.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl HostThrottle {
    pub fn new(limits: Limits) -> Self {
        HostThrottle {
            limits,
            gates: Mutex::default(),
        }
    }

    /// The gate of `url`'s host.
    fn gate(&self, url: &str) -> Arc<Gate> {
        let mut gates = self.gates.lock().expect("not poisoned");
        if let Some(gate) = gates.by_url.get(url) {
            return gate.clone();
        }
        let gate = gates
            .by_host
            .entry(host_key(url))
            .or_insert_with(|| {
                Arc::new(Gate {
                    in_flight: Arc::new(Semaphore::new(self.limits.concurrency.max(1))),
                    ticks_from: wall_clock_aligned_tick(),
                    next_start: Mutex::new(None),
                })
            })
            .clone();
        if gates.by_url.len() >= REMEMBERED_URLS {
            gates.by_url.clear();
        }
        gates.by_url.insert(url.into(), gate.clone());
        gate
    }

    /// Waits until a request to `url`'s host may start.
    pub async fn acquire(&self, url: &str) -> Slot {
        let gate = self.gate(url);
        let permit = gate
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.wait_for_rate(&gate).await;
        Slot { _permit: permit }
    }

    /// Like `acquire`, but `None` when, at its place in the rate schedule,
    /// the host has its most requests in flight: a reconcile then gives its
    /// reconcile slot back instead of holding it while a slow or dead
    /// provider times out. The wait for the rate holds no slot of the host,
    /// so that a wave of refreshes paced by the rate never finds it busy.
    pub async fn acquire_unless_busy(&self, url: &str) -> Option<Slot> {
        let gate = self.gate(url);
        self.wait_for_rate(&gate).await;
        let permit = gate.in_flight.clone().try_acquire_owned().ok()?;
        Some(Slot { _permit: permit })
    }

    /// Waits for the next place in the host's rate schedule.
    async fn wait_for_rate(&self, gate: &Gate) {
        let now = Instant::now();
        let start = release_at(&gate.next_start, gate.ticks_from, now, &self.limits);
        if start > now {
            tokio::time::sleep_until(start).await;
        }
    }
}

/// Token requests in flight per host: as asked, but at most half the
/// reconcile slots (`reconciles`, 0 for no limit), so that the connections
/// of one slow provider can never hold every slot.
pub fn per_host_concurrency(asked: usize, reconciles: u16) -> usize {
    match reconciles {
        0 => asked.max(1),
        n => asked.clamp(1, usize::from(n / 2).max(1)),
    }
}

/// Reserves the next start time: requests are spaced `1 / per_second`
/// apart, and up to `burst` may start at once after a quiet period.
fn reserve(next_start: &Mutex<Option<Instant>>, now: Instant, limits: &Limits) -> Instant {
    let spacing = Spacing::of(limits.per_second, limits.burst);
    let mut next = next_start.lock().expect("not poisoned");
    let start = spacing.earliest_start(*next, now);
    *next = Some(start + spacing.interval);
    start.max(now)
}

/// Requests that must wait for the rate are released together on ticks of
/// the due-time grid instead of one per `1 / per_second`: during a wave of
/// refreshes at the limit the operator then wakes once per tick for a
/// dozen or more requests, whose replies and Secret writes also travel
/// together (benches/README.md), for at most one tick of delay; no request
/// starts before its place in the rate schedule.
const RELEASE_TICK: Duration = Duration::from_millis(DUE_TIME_GRID.as_millis() as u64);

/// When a request asking at `now` may start: at once within the burst,
/// otherwise on the first tick at or after its place in the schedule.
fn release_at(
    next_start: &Mutex<Option<Instant>>,
    ticks_from: Instant,
    now: Instant,
    limits: &Limits,
) -> Instant {
    let start = reserve(next_start, now, limits);
    if start <= now {
        return now;
    }
    let tick = RELEASE_TICK.as_nanos();
    let ticks = start
        .saturating_duration_since(ticks_from)
        .as_nanos()
        .div_ceil(tick);
    ticks_from + Duration::from_nanos((ticks * tick) as u64)
}

/// An instant on the wall clock's tick grid, where due times fall too, so
/// that the connections due in one slot and the requests released on one
/// tick share a wake-up.
fn wall_clock_aligned_tick() -> Instant {
    let now = Instant::now();
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let into_tick = since_epoch.as_nanos() % RELEASE_TICK.as_nanos();
    now.checked_sub(Duration::from_nanos(into_tick as u64))
        .unwrap_or(now)
}

/// A GCRA schedule: starts `interval` apart, up to `burst` at once after a
/// quiet period.
struct Spacing {
    interval: Duration,
    burst_window: Duration,
}

impl Spacing {
    fn of(per_second: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / per_second.max(0.001));
        Spacing {
            interval,
            burst_window: interval * burst.saturating_sub(1),
        }
    }

    /// When the next start may be, given the one reserved last.
    fn earliest_start(&self, next: Option<Instant>, now: Instant) -> Instant {
        let earliest = now.checked_sub(self.burst_window).unwrap_or(now);
        next.map_or(earliest, |n| n.max(earliest))
    }
}

/// How many Normal events may be published: `burst` at once, then
/// `per_second`, across all connections, as the kubelet's `--event-qps`
/// and `--event-burst` do. A Normal event says what the Ready condition
/// already says; when thousands of connections become Ready together,
/// an event each would be a large part of the API server's work and a
/// flood no one reads. Warnings ask a person to act and are never held
/// back.
pub struct EventBudget {
    spacing: Spacing,
    next: Mutex<Option<Instant>>,
}

impl EventBudget {
    pub fn new(per_second: f64, burst: u32) -> Self {
        EventBudget {
            spacing: Spacing::of(per_second, burst.max(1)),
            next: Mutex::new(None),
        }
    }

    /// Takes one event from the budget if one is left at `now`.
    pub fn take(&self, now: Instant) -> bool {
        let mut next = self.next.lock().expect("not poisoned");
        let start = self.spacing.earliest_start(*next, now);
        if start > now {
            return false;
        }
        *next = Some(start + self.spacing.interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_starts_at_once_then_requests_are_spaced() {
        let limits = Limits {
            per_second: 10.0,
            burst: 3,
            concurrency: 100,
        };
        let next = Mutex::new(None);
        let now = Instant::now();
        let starts: Vec<Duration> = (0..6).map(|_| reserve(&next, now, &limits) - now).collect();
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 0, 0, 100, 200, 300]);
    }

    #[test]
    fn a_quiet_period_restores_the_burst_but_no_more() {
        let limits = Limits {
            per_second: 10.0,
            burst: 2,
            concurrency: 100,
        };
        let next = Mutex::new(None);
        let start = Instant::now();
        for _ in 0..5 {
            reserve(&next, start, &limits);
        }
        let later = start + Duration::from_secs(10);
        let ms: Vec<u128> = (0..4)
            .map(|_| (reserve(&next, later, &limits) - later).as_millis())
            .collect();
        assert_eq!(ms, [0, 0, 100, 200]);
    }

    #[test]
    fn requests_that_wait_for_the_rate_are_released_together_on_ticks() {
        let limits = Limits {
            per_second: 200.0,
            burst: 1,
            concurrency: 100,
        };
        let ticks_from = Instant::now();
        let asked_at = ticks_from + Duration::from_millis(30);
        let next = Mutex::new(None);
        let mut per_tick = std::collections::BTreeMap::<u128, usize>::new();
        for k in 0..45u64 {
            // Each no earlier than its place in the schedule (5 ms apart).
            let at = release_at(&next, ticks_from, asked_at, &limits);
            assert!(at >= asked_at + Duration::from_millis(5 * k));
            *per_tick.entry((at - ticks_from).as_millis()).or_default() += 1;
        }
        assert_eq!(
            per_tick.into_iter().collect::<Vec<_>>(),
            [(30, 1), (100, 14), (200, 20), (300, 10)],
            "the burst at once, then one wake-up per tick for at most per_second x tick"
        );
    }

    #[test]
    fn events_beyond_the_burst_are_dropped_until_the_rate_refills_them() {
        let budget = EventBudget::new(10.0, 3);
        let start = Instant::now();
        let taken = |at: Instant| (0..5).filter(|_| budget.take(at)).count();
        assert_eq!(taken(start), 3, "the burst goes out at once");
        assert_eq!(taken(start + Duration::from_millis(50)), 0);
        assert_eq!(
            taken(start + Duration::from_millis(100)),
            1,
            "one per 100 ms"
        );
        assert_eq!(
            taken(start + Duration::from_secs(60)),
            3,
            "a quiet minute restores the burst, no more"
        );
    }

    #[tokio::test]
    async fn concurrency_is_bounded_per_host() {
        let throttle = HostThrottle::new(Limits {
            per_second: 1000.0,
            burst: 100,
            concurrency: 2,
        });
        let first = throttle.acquire("https://a.example/token").await;
        let _second = throttle.acquire("https://a.example/token").await;
        let _other_host = throttle.acquire("https://b.example/token").await;
        let third = tokio::time::timeout(
            Duration::from_millis(50),
            throttle.acquire("https://a.example/oauth"),
        )
        .await;
        assert!(third.is_err(), "a third request to the same host waits");
        drop(first);
        tokio::time::timeout(
            Duration::from_millis(500),
            throttle.acquire("https://a.example/token"),
        )
        .await
        .expect("a released slot lets the next request start");
    }

    #[tokio::test]
    async fn a_busy_host_is_said_at_once_instead_of_waited_for() {
        let throttle = HostThrottle::new(Limits {
            per_second: 1000.0,
            burst: 100,
            concurrency: 1,
        });
        let first = throttle
            .acquire_unless_busy("https://a.example/token")
            .await;
        assert!(first.is_some());
        let busy = tokio::time::timeout(
            Duration::from_millis(500),
            throttle.acquire_unless_busy("https://a.example/token"),
        )
        .await
        .expect("answers without waiting");
        assert!(busy.is_none());
        assert!(
            throttle
                .acquire_unless_busy("https://b.example/token")
                .await
                .is_some(),
            "another host is not busy"
        );
        drop(first);
        assert!(
            throttle
                .acquire_unless_busy("https://a.example/token")
                .await
                .is_some()
        );
    }

    #[test]
    fn one_host_gets_at_most_half_the_reconcile_slots() {
        assert_eq!(per_host_concurrency(32, 64), 32);
        assert_eq!(per_host_concurrency(32, 8), 4);
        assert_eq!(per_host_concurrency(32, 1), 1);
        assert_eq!(per_host_concurrency(0, 64), 1);
        assert_eq!(per_host_concurrency(500, 0), 500);
    }

    #[test]
    fn urls_of_one_host_share_its_gate() {
        let throttle = HostThrottle::new(Limits::default());
        let token = throttle.gate("https://a.example/token");
        assert!(Arc::ptr_eq(
            &token,
            &throttle.gate("https://a.example/token")
        ));
        assert!(Arc::ptr_eq(
            &token,
            &throttle.gate("https://a.example:443/oauth")
        ));
        assert!(!Arc::ptr_eq(
            &token,
            &throttle.gate("https://a.example:8443/token")
        ));
        // The key the metrics label requests with: one provider host.
        assert!(Arc::ptr_eq(
            &token,
            &throttle.gate("http://a.example/token")
        ));
        assert_eq!(host_key("https://a.example:443/token"), "a.example");
        assert_eq!(host_key("https://a.example:8443/token"), "a.example:8443");
    }
}
