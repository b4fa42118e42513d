//! What every reconcile shares: API and HTTP clients, the caches, the
//! limits, and the writers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};

use crate::api::{OAuth2Auth, SourceConnection};
use crate::metrics::Metrics;
use crate::oauth::seal::SealingKey;
use crate::runtime::secret_cache::SecretCache;
use crate::runtime::throttle::HostThrottle;
use crate::runtime::wakeups::SecretTriggers;
use crate::runtime::wire::CachedConnection;
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
    transient_failures: Mutex<HashMap<ObjectRef<CachedConnection>, u32>>,
    /// Token requests per provider host.
    pub throttle: HostThrottle,
    /// Which connections a Secret event wakes.
    pub triggers: Arc<SecretTriggers>,
    /// Secrets at their current versions, as read or written.
    pub secrets: Arc<SecretCache>,
    /// Seals the refresh tokens kept in target Secrets.
    pub sealing_key: SealingKey,
    pub events: EventPublisher,
    pub status: Arc<StatusWriter>,
    pub clock: Clock,
}

/// What `Context::new` is made of.
pub struct ContextParts {
    pub client: Client,
    pub http: reqwest::Client,
    pub metrics: Arc<Metrics>,
    pub revocation_timeout: Duration,
    pub external_url: Option<String>,
    pub throttle: HostThrottle,
    pub sealing_key: SealingKey,
    pub events: EventPublisher,
    pub clock: Clock,
}

impl Context {
    pub fn new(parts: ContextParts) -> Self {
        Context {
            status: Arc::new(StatusWriter::new(parts.client.clone())),
            client: parts.client,
            http: parts.http,
            metrics: parts.metrics,
            revocation_timeout: parts.revocation_timeout,
            external_url: parts.external_url,
            transient_failures: Mutex::default(),
            throttle: parts.throttle,
            triggers: Arc::default(),
            secrets: Arc::default(),
            sealing_key: parts.sealing_key,
            events: parts.events,
            clock: parts.clock,
        }
    }

    /// The link a person opens to authorize `conn`, when it can be served.
    pub fn authorization_link(
        &self,
        conn: &SourceConnection,
        oauth: &OAuth2Auth,
    ) -> Option<String> {
        let base = self.external_url.as_deref()?;
        oauth.authorization_url.as_ref()?;
        Some(format!(
            "{base}/authorize/{}/{}",
            conn.namespace().unwrap_or_default(),
            conn.name_any()
        ))
    }

    pub fn record_transient_failure(&self, conn: &impl Resource) -> u32 {
        let mut failures = self.transient_failures.lock().expect("not poisoned");
        let count = failures.entry(connection_ref(conn)).or_default();
        *count = count.saturating_add(1);
        *count
    }

    pub fn clear_transient_failures(&self, conn: &impl Resource) {
        self.transient_failures
            .lock()
            .expect("not poisoned")
            .remove(&connection_ref(conn));
    }
}

fn connection_ref(conn: &impl Resource) -> ObjectRef<CachedConnection> {
    ObjectRef::new(&conn.name_any()).within(&conn.namespace().unwrap_or_default())
}
