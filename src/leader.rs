//! Leader election on a `coordination.k8s.io/v1` Lease. Only the leader
//! refreshes tokens and writes: with rotating refresh tokens, two writers
//! would use the same refresh token twice and the provider would revoke
//! the grant. Followers wait, ready to take over when the lease expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::error::Error;

/// The least time a token request is given; a replica with less left of
/// its lease sends none.
const MIN_REQUEST_TIME: Duration = Duration::from_secs(1);

/// Proof, checked right before each token request, that this replica still
/// holds the lease: it renewed it less than `renew_deadline` ago on the
/// boot-time clock, which runs on while the process is frozen (SIGSTOP, a
/// paused VM, a frozen cgroup). A replica that thawed after its lease
/// lapsed finds it has no time left, sends nothing, and steps down: the
/// timers that fired on thawing cannot reach the provider with refresh
/// tokens the new leader has rotated since.
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
    /// rest of the lease duration for clock skew and requests in flight.
    valid_for: Duration,
    lapsed: Notify,
}

impl Fence {
    /// The fence of a replica that leads through a lease of `settings`.
    pub fn for_lease(settings: &LeaseSettings) -> Self {
        Fence {
            lease: Some(Arc::new(FenceState {
                renewed_at: AtomicU64::new(0),
                valid_for: settings.renew_deadline,
                lapsed: Notify::new(),
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
            state.lapsed.notify_waiters();
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
            _ => {
                self.lost();
                Err(Error::NotLeading)
            }
        }
    }

    /// Resolves when a check found the lease lapsed.
    pub async fn lapsed(&self) {
        match &self.lease {
            Some(state) => state.lapsed.notified().await,
            None => std::future::pending().await,
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
    /// Free or expired: take it.
    Acquire,
    /// Another replica holds it until `until`.
    Wait { until: Timestamp },
}

pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => LeaseDecision::Acquire,
        Some(holder) if holder == identity => LeaseDecision::Renew,
        Some(_) => {
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
            match renewed {
                Some(renewed) if renewed + duration > now => LeaseDecision::Wait {
                    until: renewed + duration,
                },
                _ => LeaseDecision::Acquire,
            }
        }
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
/// when this replica leads and false when it loses or gives up the lease;
/// `fence` learns of every renewal.
pub async fn campaign(
    client: Client,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    fence: Fence,
) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut last_renewal: Option<Duration> = None;
    loop {
        let sent_at = boot_time();
        let outcome = try_claim(&leases, &settings, Timestamp::now()).await;
        match outcome {
            Ok(true) => {
                if !*leading.borrow() {
                    info!(lease = %settings.name, identity = %settings.identity, "became the leader");
                }
                last_renewal = Some(sent_at);
                fence.renewed(sent_at);
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    warn!(lease = %settings.name, "another replica holds the lease; stepping down");
                }
                last_renewal = None;
                fence.lost();
                leading.send_replace(false);
            }
            Err(error) => {
                warn!(lease = %settings.name, %error, "could not read or write the lease");
                let lapsed = last_renewal
                    .is_some_and(|at| boot_time().saturating_sub(at) > settings.renew_deadline);
                if lapsed {
                    warn!(lease = %settings.name, "could not renew the lease in time; stepping down");
                    last_renewal = None;
                    fence.lost();
                    leading.send_replace(false);
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
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let existing = leases.get_opt(&settings.name).await?;
    let spec = existing.as_ref().and_then(|l| l.spec.as_ref());
    match decide(spec, &settings.identity, now) {
        LeaseDecision::Wait { .. } => Ok(false),
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
        assert!(fence.time_left().is_err(), "it stays lapsed until renewed");
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
    fn a_free_or_expired_lease_is_taken_a_live_one_is_not() {
        assert_eq!(decide(None, "a", at(100)), LeaseDecision::Acquire);
        let lease = held_by("b", 100, 15);
        assert_eq!(
            decide(Some(&lease), "a", at(110)),
            LeaseDecision::Wait { until: at(115) }
        );
        assert_eq!(decide(Some(&lease), "a", at(115)), LeaseDecision::Acquire);
        assert_eq!(decide(Some(&lease), "b", at(110)), LeaseDecision::Renew);
        let released = LeaseSpec {
            holder_identity: None,
            ..lease
        };
        assert_eq!(
            decide(Some(&released), "a", at(101)),
            LeaseDecision::Acquire
        );
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
