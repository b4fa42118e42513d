//! What every reconcile shares: API and HTTP clients, the caches, the
//! limits, and the writers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::SourceConnection;
use crate::decide::grant::usable_grant;
use crate::decide::refresh::Limits;
use crate::leader::Fence;
use crate::metrics::Metrics;
use crate::oauth::seal::ANNOTATION_SEALED_GRANT;
use crate::oauth::seal::{Binding, SharedKeyring};
use crate::oauth::state_secret::GrantState;
use crate::reconcile::pending::PendingGrants;
use crate::runtime::api_health::ApiHealth;
use crate::runtime::secret_cache::SecretCache;
use crate::runtime::throttle::HostThrottle;
use crate::runtime::wakeups::SecretTriggers;
use crate::runtime::wire::{CachedConnection, ReadSecret};
use crate::time::Clock;
use crate::write::events::EventPublisher;
use crate::write::status::StatusWriter;

pub struct Context {
    pub client: Client,
    /// HTTP client for token endpoints, shared so connections reuse
    /// connection pools per provider.
    pub http: reqwest::Client,
    pub metrics: Arc<Metrics>,
    /// How long a deleted connection waits for its tokens to be revoked.
    pub revocation_timeout: Duration,
    /// Base URL under which people reach the authorization endpoints.
    pub external_url: Option<String>,
    /// Consecutive transient failures per connection, for backoff.
    pub transient_failures: TransientFailures,
    /// Token requests per provider host.
    pub throttle: HostThrottle,
    /// Which connections a Secret event wakes.
    pub triggers: Arc<SecretTriggers>,
    /// Secrets at their current versions, as read or written.
    pub secrets: Arc<SecretCache>,
    /// Seals the refresh tokens kept in target and state Secrets.
    pub keyring: SharedKeyring,
    pub events: EventPublisher,
    pub status: Arc<StatusWriter>,
    pub clock: Clock,
    /// Proof of the leader lease, checked before each token request.
    pub fence: Fence,
    /// Grants no write has stored yet.
    pub pending: PendingGrants,
    /// Whether the Kubernetes API answers.
    pub api: ApiHealth,
    /// Bounds on token lifetimes, refresh intervals and `Retry-After`.
    pub limits: Limits,
}

impl Context {
    pub fn record_transient_failure(&self, conn: &impl Resource) -> u32 {
        let mut failures = self.transient_failures.0.lock().expect("not poisoned");
        let count = failures.entry(connection_ref(conn)).or_default();
        *count = count.saturating_add(1);
        *count
    }

    pub fn clear_transient_failures(&self, conn: &impl Resource) {
        self.transient_failures
            .0
            .lock()
            .expect("not poisoned")
            .remove(&connection_ref(conn));
    }

    /// The refresh tokens stored for `conn` now, read from the API: the one
    /// sealed in its target Secret and a consented one waiting in its state
    /// Secret, each only when bound to what `binding` names; with the
    /// target Secret as read.
    pub async fn read_stored_grant(
        &self,
        secrets: &Api<Secret>,
        conn: &SourceConnection,
        binding: &Binding,
    ) -> Result<StoredGrant, kube::Error> {
        let namespace = conn.namespace().unwrap_or_default();
        let target = self
            .secrets
            .get_fresh(secrets, &namespace, &conn.target_secret_name())
            .await?;
        let keyring = self.keyring.current();
        let open = |sealed: &str| {
            let opened = keyring.open(sealed, &binding.uid).ok()?;
            usable_grant(opened, binding).ok()
        };
        let seal = target
            .as_deref()
            .and_then(|t| t.annotations().get(ANNOTATION_SEALED_GRANT));
        let sealed = seal.and_then(|s| open(s)).map(|g| g.refresh_token);
        let withheld = seal.is_some() && sealed.is_none();
        let consented = self
            .secrets
            .get_fresh(secrets, &namespace, &conn.state_secret_name())
            .await?
            .and_then(|s| s.data.clone())
            .and_then(|d| GrantState::from_data(&d, &[], open).refresh_token);
        Ok(StoredGrant {
            target,
            sealed,
            withheld,
            consented,
        })
    }
}

/// Consecutive transient failures per connection, for backoff.
#[derive(Default)]
pub struct TransientFailures(Mutex<HashMap<ObjectRef<CachedConnection>, u32>>);

/// What `Context::read_stored_grant` found.
pub struct StoredGrant {
    pub target: Option<Arc<ReadSecret>>,
    pub sealed: Option<String>,
    /// The target Secret holds a grant that is not for the endpoints and
    /// client the connection names now (or does not open).
    pub withheld: bool,
    pub consented: Option<String>,
}

fn connection_ref(conn: &impl Resource) -> ObjectRef<CachedConnection> {
    ObjectRef::new(&conn.name_any()).within(&conn.namespace().unwrap_or_default())
}
