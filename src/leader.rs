//! Leader election on a `coordination.k8s.io/v1` Lease. Only the leader
//! refreshes tokens and writes: with rotating refresh tokens, two writers
//! would use the same refresh token twice and the provider would revoke
//! the grant. Followers wait, ready to take over when the lease expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::Error;

/// The least time a token request is given; a replica with less left of
/// its lease sends none.
const MIN_REQUEST_TIME: Duration = Duration::from_secs(1);

/// Proof, checked right before each token request, that this replica still
/// holds the lease: it renewed it less than `renew_deadline` ago on the
/// boot-time clock, which runs on while the process is frozen (SIGSTOP, a
/// paused VM, a frozen cgroup). A replica that thawed after its lease
/// lapsed finds it has no time left and sends nothing until its lease loop
/// renews (then no other replica took over) or finds another holder (then
/// it exits): the timers that fired on thawing cannot reach the provider
/// with refresh tokens a new leader has rotated since.
#[derive(Clone, Default)]
pub struct Fence {
    /// `None`: no leader election, this replica is the only one.
    lease: Option<Arc<FenceState>>,
}

struct FenceState {
    /// Boot-time nanoseconds when the last successful renewal was sent;
    /// 0 while not leading.
    renewed_at: AtomicU64,
    /// How long a renewal is good for: the renew deadline, which leaves the
    /// rest of the lease duration for clock-rate skew and requests in
    /// flight.
    valid_for: Duration,
}

impl Fence {
    /// The fence of a replica that leads through a lease of `settings`.
    pub fn for_lease(settings: &LeaseSettings) -> Self {
        Fence {
            lease: Some(Arc::new(FenceState {
                renewed_at: AtomicU64::new(0),
                valid_for: settings.renew_deadline,
            })),
        }
    }

    /// The lease was renewed by a request sent at `sent_at` (boot time).
    fn renewed(&self, sent_at: Duration) {
        if let Some(state) = &self.lease {
            let nanos = u64::try_from(sent_at.as_nanos()).unwrap_or(u64::MAX).max(1);
            state.renewed_at.store(nanos, Ordering::SeqCst);
        }
    }

    fn lost(&self) {
        if let Some(state) = &self.lease {
            state.renewed_at.store(0, Ordering::SeqCst);
        }
    }

    /// How long a token request sent now may take, or `NotLeading` when the
    /// lease is not proven (then the replica steps down).
    pub fn time_left(&self) -> Result<Duration, Error> {
        let Some(state) = &self.lease else {
            return Ok(Duration::MAX);
        };
        let renewed_at = state.renewed_at.load(Ordering::SeqCst);
        let elapsed = boot_time().saturating_sub(Duration::from_nanos(renewed_at));
        match state.valid_for.checked_sub(elapsed) {
            Some(left) if renewed_at != 0 && left >= MIN_REQUEST_TIME => Ok(left),
            _ => Err(Error::NotLeading),
        }
    }
}

/// The time since boot, suspended and frozen time included.
fn boot_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer
    // it is given.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    if status != 0 {
        // Without the clock no renewal can be proven recent.
        return Duration::MAX;
    }
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or_default(),
        u32::try_from(now.tv_nsec).unwrap_or_default(),
    )
}

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// A leader that cannot renew for this long steps down, before its
    /// lease can expire and another replica can take over.
    pub renew_deadline: Duration,
    /// How often the lease is renewed or tried.
    pub retry_period: Duration,
}

/// What to do with the lease, from what it says now. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseDecision {
    /// We hold it: renew.
    Renew,
    /// Free, or its holder stopped renewing: take it.
    Acquire,
    /// Another replica holds it and renews it.
    Wait,
}

/// Decides from the lease and how long this replica has seen it unchanged
/// (on its own clock, as client-go does): a holder that stopped renewing
/// loses the lease once its duration has passed since this replica last
/// saw it change. Not from the holder's renew time, so that clocks that
/// differ between nodes cannot hand the lease over early, and a lease no
/// one could renew while the API was down is not taken the moment the API
/// answers again: its holder renews it first if it is alive.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, unchanged_for: Duration) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => LeaseDecision::Acquire,
        Some(holder) if holder == identity => LeaseDecision::Renew,
        Some(_) => {
            let seconds = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
            if unchanged_for >= Duration::from_secs(seconds) {
                LeaseDecision::Acquire
            } else {
                LeaseDecision::Wait
            }
        }
    }
}

/// How long a lease has been seen unchanged, continuously: its holder and
/// times as last read, and when (boot time) they were first read so. A read
/// that fails starts the count again, since a holder cannot renew while
/// nobody can reach the API either.
#[derive(Default)]
struct Observation {
    record: Option<(Option<String>, Option<MicroTime>, Option<MicroTime>)>,
    since: Duration,
}

impl Observation {
    fn unchanged_for(&mut self, spec: Option<&LeaseSpec>, now: Duration) -> Duration {
        let record = spec.map(|s| {
            (
                s.holder_identity.clone(),
                s.renew_time.clone(),
                s.acquire_time.clone(),
            )
        });
        if self.record != record {
            self.record = record;
            self.since = now;
        }
        now.saturating_sub(self.since)
    }

    /// The lease could not be read.
    fn lost_sight(&mut self) {
        self.record = None;
    }
}

/// The lease as this replica writes it when it acquires or renews.
pub fn claimed(
    previous: Option<&LeaseSpec>,
    settings: &LeaseSettings,
    now: Timestamp,
) -> LeaseSpec {
    let ours =
        previous.and_then(|p| p.holder_identity.as_deref()) == Some(settings.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(settings.lease_duration.as_secs()).unwrap_or(i32::MAX),
        ),
        acquire_time: if ours {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// Campaigns for the lease until the process ends. `leading` turns true
/// when this replica leads and false when another replica holds the lease;
/// `fence` learns of every renewal. A leader that cannot renew (the API does
/// not answer) keeps its place but sends no token request once the renew
/// deadline has passed; it renews as soon as it can, before any other
/// replica may take over, so that grants only it holds are not lost.
pub async fn campaign(
    client: Client,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    fence: Fence,
) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut observation = Observation::default();
    let mut warned = false;
    loop {
        let sent_at = boot_time();
        let outcome = try_claim(&leases, &settings, &mut observation, sent_at).await;
        match outcome {
            Ok(true) => {
                if !*leading.borrow() {
                    info!(lease = %settings.name, identity = %settings.identity, "became the leader");
                } else if warned {
                    info!(lease = %settings.name, "renewed the lease again");
                }
                warned = false;
                fence.renewed(sent_at);
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    warn!(lease = %settings.name, "another replica holds the lease; stepping down");
                }
                fence.lost();
                leading.send_replace(false);
            }
            Err(error) => {
                observation.lost_sight();
                warn!(lease = %settings.name, %error, "could not read or write the lease");
                if *leading.borrow() && fence.time_left().is_err() && !warned {
                    warn!(lease = %settings.name, "could not renew the lease in time; no token request is sent until it is renewed");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(settings.retry_period).await;
    }
}

/// Tries to acquire or renew. `Ok(true)` when this replica holds the lease.
async fn try_claim(
    leases: &Api<Lease>,
    settings: &LeaseSettings,
    observation: &mut Observation,
    sent_at: Duration,
) -> Result<bool, kube::Error> {
    let existing = leases.get_opt(&settings.name).await?;
    let spec = existing.as_ref().and_then(|l| l.spec.as_ref());
    let unchanged_for = observation.unchanged_for(spec, sent_at);
    let now = Timestamp::now();
    match decide(spec, &settings.identity, unchanged_for) {
        LeaseDecision::Wait => Ok(false),
        LeaseDecision::Acquire | LeaseDecision::Renew => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    resource_version: existing.as_ref().and_then(|l| l.resource_version()),
                    ..ObjectMeta::default()
                },
                spec: Some(claimed(spec, settings, now)),
            };
            let written = match &existing {
                None => leases.create(&PostParams::default(), &lease).await,
                Some(_) => {
                    leases
                        .replace(&settings.name, &PostParams::default(), &lease)
                        .await
                }
            };
            match written {
                Ok(_) => Ok(true),
                // Someone else wrote first: they lead.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            }
        }
    }
}

/// Gives the lease up on a clean shutdown so a follower takes over at once
/// instead of after the lease duration.
pub async fn release(client: Client, settings: &LeaseSettings) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let Ok(Some(mut lease)) = leases.get_opt(&settings.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match leases
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!(lease = %settings.name, "released the lease"),
        Err(error) => warn!(lease = %settings.name, %error, "could not release the lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline_settings(renew_deadline: u64) -> LeaseSettings {
        LeaseSettings {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(renew_deadline + 5),
            renew_deadline: Duration::from_secs(renew_deadline),
            retry_period: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_fence_lets_requests_through_only_within_the_renew_deadline() {
        assert_eq!(Fence::default().time_left().unwrap(), Duration::MAX);
        let fence = Fence::for_lease(&deadline_settings(10));
        assert!(fence.time_left().is_err(), "never renewed");
        fence.renewed(boot_time());
        let left = fence.time_left().unwrap();
        assert!(
            left > Duration::from_secs(9) && left <= Duration::from_secs(10),
            "{left:?}"
        );
        // A renewal as long ago as a freeze past the deadline.
        fence.renewed(boot_time().saturating_sub(Duration::from_secs(10)));
        assert!(matches!(fence.time_left(), Err(Error::NotLeading)));
        fence.renewed(boot_time());
        assert!(fence.time_left().is_ok());
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn held_by(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings {
            namespace: "tokenkeeper".into(),
            name: "tokenkeeper-leader".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_lease_is_taken_when_free_or_seen_unchanged_for_its_duration() {
        let secs = Duration::from_secs;
        assert_eq!(decide(None, "a", secs(0)), LeaseDecision::Acquire);
        let lease = held_by("b", 100, 15);
        assert_eq!(decide(Some(&lease), "a", secs(14)), LeaseDecision::Wait);
        assert_eq!(decide(Some(&lease), "a", secs(15)), LeaseDecision::Acquire);
        assert_eq!(decide(Some(&lease), "b", secs(0)), LeaseDecision::Renew);
        let released = LeaseSpec {
            holder_identity: None,
            ..lease
        };
        assert_eq!(
            decide(Some(&released), "a", secs(0)),
            LeaseDecision::Acquire
        );
    }

    #[test]
    fn unchanged_is_counted_from_the_last_change_seen_not_the_renew_time() {
        let secs = Duration::from_secs;
        let mut seen = Observation::default();
        // Renewed long ago by the holder's clock: first seen now, so not
        // taken at once (an API server that was down comes back to a lease
        // nobody could renew).
        let stale = held_by("b", 100, 15);
        assert_eq!(seen.unchanged_for(Some(&stale), secs(1_000)), secs(0));
        assert_eq!(seen.unchanged_for(Some(&stale), secs(1_010)), secs(10));
        let renewed = held_by("b", 101, 15);
        assert_eq!(seen.unchanged_for(Some(&renewed), secs(1_012)), secs(0));
        assert_eq!(seen.unchanged_for(Some(&renewed), secs(1_027)), secs(15));
        // The API did not answer for a while: nothing was seen, so the
        // count starts again when it answers.
        seen.lost_sight();
        assert_eq!(seen.unchanged_for(Some(&renewed), secs(1_060)), secs(0));
        assert_eq!(seen.unchanged_for(Some(&renewed), secs(1_070)), secs(10));
    }

    #[test]
    fn taking_over_counts_a_transition_renewing_does_not() {
        let lease = held_by("b", 100, 15);
        let taken = claimed(Some(&lease), &settings("a"), at(120));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(120))));
        let renewed = claimed(Some(&taken), &settings("a"), at(122));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(120))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(122))));
        assert_eq!(renewed.lease_duration_seconds, Some(15));
    }
}
