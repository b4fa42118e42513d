//! The operator's wiring: the HTTP endpoints, the sealing key, leader
//! election, and per watched namespace the watches that feed the work queue
//! whose worker is `reconcile::reconcile`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::api::SourceConnection;
use crate::decide::refresh::Limits;
use crate::leader::{self, Fence, LeaseSettings};
use crate::metrics::Metrics;
use crate::oauth::seal::SharedKeyring;
use crate::oauth::{authorize, client as token_client};
use crate::reconcile::{self, Context, PendingGrants, TransientFailures};
use crate::runtime::api_health::ApiHealth;
use crate::runtime::object_key::{self, key_of};
use crate::runtime::queue::{self, Trigger};
use crate::runtime::sealing_key;
use crate::runtime::throttle::{self, EventBudget, HostThrottle};
use crate::runtime::wakeups::ConnectionWakes;
use crate::runtime::wire::{CachedConnection, SecretMeta};
use crate::server::{self, Health};
use crate::time::Clock;
use crate::write::events::EventPublisher;
use crate::write::status::StatusWriter;

pub struct Settings {
    /// Watch only these namespaces; empty watches all.
    pub namespaces: Vec<String>,
    /// Where to serve /metrics, /healthz and /readyz.
    pub metrics_address: Option<SocketAddr>,
    /// Lead through this Lease; `None` runs as the only replica.
    pub leader_election: Option<LeaseSettings>,
    /// Release a deleted connection after this long even when its tokens
    /// could not be revoked.
    pub revocation_timeout: Duration,
    /// Serve the authorization-code flow; `None` disables it.
    pub authorization: Option<AuthorizationSettings>,
    /// Limits on token requests per provider host.
    pub token_limits: throttle::Limits,
    /// Bounds on token lifetimes, refresh intervals and `Retry-After`.
    pub limits: Limits,
    /// How many Normal events may be published.
    pub event_budget: EventBudget,
    /// Connections reconciled at the same time, per controller.
    pub concurrency: u16,
    /// The operator's own namespace, home of the sealing key.
    pub operator_namespace: String,
    /// The Secret there that holds the key sealing refresh tokens.
    pub sealing_key_secret: String,
}

pub struct AuthorizationSettings {
    pub bind_address: SocketAddr,
    /// How people's browsers reach `bind_address` (an Ingress, or a
    /// port-forward): the base of the links in status and of the callback.
    pub external_url: String,
    /// How long a started authorization may take.
    pub state_ttl: Duration,
}

fn scoped<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// Runs the operator until SIGTERM or SIGINT: the HTTP endpoints, the
/// leader election when configured, and the controllers while leading.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    for scope in &scopes {
        ensure_crd_installed(&scoped(client.clone(), scope.as_deref())).await?;
    }
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(address) = settings.metrics_address {
        let health = Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        };
        let server = server::serve(address, health);
        tokio::spawn(async move {
            if let Err(error) = server.await {
                error!(%error, "the metrics and health server stopped");
            }
        });
    }
    let key_secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.operator_namespace);
    let (keys, key_data) = sealing_key::load_or_create(&key_secrets, &settings.sealing_key_secret)
        .await
        .with_context(|| {
            format!(
                "cannot read or create the sealing key Secret {}/{}",
                settings.operator_namespace, settings.sealing_key_secret
            )
        })?;
    info!(keys = ?keys, "sealing keys loaded");
    let keyring = SharedKeyring::new(keys);
    tokio::spawn(sealing_key::keep_keys(
        key_secrets,
        settings.sealing_key_secret.clone(),
        keyring.clone(),
        key_data,
        metrics.clone(),
    ));
    let external_url = settings
        .authorization
        .as_ref()
        .map(|a| a.external_url.trim_end_matches('/').to_owned());
    let http = token_client::http_client(settings.limits.endpoints.clone())?;
    let fence = settings
        .leader_election
        .as_ref()
        .map(Fence::for_lease)
        .unwrap_or_default();
    let context = Arc::new(Context {
        client: client.clone(),
        http: http.clone(),
        metrics: metrics.clone(),
        revocation_timeout: settings.revocation_timeout,
        external_url: external_url.clone(),
        transient_failures: TransientFailures::default(),
        throttle: HostThrottle::new(settings.token_limits),
        triggers: Arc::default(),
        secrets: Arc::default(),
        keyring: keyring.clone(),
        events: EventPublisher::new(
            client.clone(),
            settings.event_budget,
            metrics.events_dropped.clone(),
        ),
        status: Arc::new(StatusWriter::new(client.clone())),
        clock: Clock::system(),
        fence: fence.clone(),
        pending: PendingGrants::default(),
        api: ApiHealth::default(),
        limits: settings.limits.clone(),
    });
    if let Some(authorization) = &settings.authorization {
        let flow = authorize::Flow {
            client: client.clone(),
            http,
            callback_url: format!("{}/callback", external_url.as_deref().unwrap_or_default()),
            state_ttl: authorization.state_ttl,
            clock: Clock::system(),
            limits: settings.limits,
            requests: Arc::new(EventBudget::new(
                authorize::REQUESTS_PER_SECOND,
                authorize::REQUEST_BURST,
            )),
            keyring,
        };
        let address = authorization.bind_address;
        tokio::spawn(async move {
            match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => {
                    info!(%address, "serving the authorization flow");
                    if let Err(error) = axum::serve(listener, authorize::router(flow)).await {
                        error!(%error, "the authorization server stopped");
                    }
                }
                Err(error) => error!(%address, %error, "cannot serve the authorization flow"),
            }
        });
    }

    let Some(lease) = settings.leader_election else {
        ready.store(true, Ordering::Relaxed);
        metrics.leader.set(1);
        run_controllers(
            &client,
            &scopes,
            context,
            settings.concurrency,
            shutdown_signal(),
        )
        .await;
        return Ok(());
    };

    let (leading_tx, mut leading) = watch::channel(false);
    tokio::spawn(leader::campaign(
        client.clone(),
        lease.clone(),
        leading_tx,
        fence.clone(),
    ));
    // A follower is ready: it is up and can take over at any moment.
    ready.store(true, Ordering::Relaxed);
    info!(lease = %lease.name, identity = %lease.identity, "waiting to lead");
    tokio::select! {
        _ = leading.wait_for(|leads| *leads) => {}
        _ = shutdown_signal() => return Ok(()),
    }
    metrics.leader.set(1);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stop_rx.await;
    };
    let controllers = run_controllers(&client, &scopes, context, settings.concurrency, stopped);
    tokio::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => {
            leader::release(client.clone(), &lease).await;
            Ok(())
        }
        _ = leading.wait_for(|leads| !*leads) => {
            metrics.leader.set(0);
            let _ = stop_tx.send(());
            // Exit rather than linger: a fresh start follows the new leader
            // from a clean slate, and reads every grant from the API again.
            anyhow::bail!("lost the leader lease {}; exiting so that only the new leader writes", lease.name)
        }
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// One controller per watched namespace (or one for all), each with its
/// own cache, until `stop` resolves or a signal arrives.
async fn run_controllers(
    client: &Client,
    scopes: &[Option<String>],
    context: Arc<Context>,
    concurrency: u16,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let stop = stop.shared();
    let controllers = scopes.iter().map(|scope| {
        let namespace = scope.as_deref();
        let connections: Api<CachedConnection> = scoped(client.clone(), namespace);
        let (reader, writer) = reflector::store();
        context.metrics.watch(reader.clone());
        let index = context.triggers.clone();
        let cache = context.secrets.clone();
        let status_writer = context.status.clone();
        // Status-only updates (our own writes) do not change the generation
        // or annotations, so they do not wake the reconciler again.
        let wakes = Arc::new(ConnectionWakes::default());
        let deciding = wakes.clone();
        let connection_changes = watcher(connections, watch_config())
            .default_backoff()
            .reflect(writer)
            .inspect(move |event| {
                if let Ok(event) = event {
                    index.observe(event);
                    wakes.observe(event);
                    match event {
                        watcher::Event::Apply(conn) | watcher::Event::InitApply(conn) => {
                            status_writer
                                .observed(&key_of(conn), conn.meta().resource_version.as_deref());
                        }
                        watcher::Event::Delete(conn) => {
                            status_writer.observed(&key_of(conn), None);
                            if let Ok(conn) = conn.decode() {
                                cache.forget(
                                    &conn.namespace().unwrap_or_default(),
                                    &[conn.target_secret_name(), conn.state_secret_name()],
                                );
                            }
                        }
                        watcher::Event::Init | watcher::Event::InitDone => {}
                    }
                }
            })
            .filter_map(move |event| {
                futures::future::ready(match event {
                    Ok(watcher::Event::Apply(conn) | watcher::Event::InitApply(conn)) => deciding
                        .wakes(&conn)
                        .then(|| Trigger::Reconcile(key_of(&conn))),
                    Ok(watcher::Event::Delete(conn)) => Some(Trigger::Forget(key_of(&conn))),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(error) => {
                        warn!(%error, "watching SourceConnections; retrying");
                        None
                    }
                })
            });
        // One metadata-only watch of Secrets serves both the Secrets users
        // reference and the ones tokenkeeper writes; contents are read
        // when reconciling, so no Secret data is cached.
        let secret_metadata: Api<SecretMeta> = scoped(client.clone(), namespace);
        let cache = context.secrets.clone();
        let scope = scope.clone();
        let triggers = context.triggers.clone();
        let readers = context.secrets.clone();
        let secret_changes = watcher(secret_metadata, watch_config())
            .default_backoff()
            .inspect(move |event| {
                if let Ok(event) = event {
                    cache.observe(&scope, event);
                }
            })
            .touched_objects()
            .filter_map(|secret| {
                futures::future::ready(match secret {
                    Ok(secret) => Some(secret),
                    Err(error) => {
                        warn!(%error, "watching Secrets; retrying");
                        None
                    }
                })
            })
            .flat_map(move |secret| {
                futures::stream::iter(triggers.connections_for(&secret, &readers).into_iter().map(
                    |connection| {
                        Trigger::Reconcile(object_key::key(
                            connection.namespace.as_deref().unwrap_or_default(),
                            &connection.name,
                        ))
                    },
                ))
            });
        info!(
            namespace = namespace.unwrap_or("<all>"),
            "tokenkeeper controller starting"
        );
        let context = context.clone();
        let stop = stop.clone();
        async move {
            queue::run(
                reader,
                futures::stream::select(connection_changes, secret_changes),
                concurrency,
                async move {
                    tokio::select! {
                        () = stop => {}
                        () = shutdown_signal() => {}
                    }
                },
                |conn| reconcile::reconcile(conn, context.clone()),
            )
            .await;
        }
    });
    futures::future::join_all(controllers).await;
    info!("tokenkeeper controller stopped");
}

/// Lists served from the API server's watch cache, as client-go's
/// informers do: a consistent list is read from etcd page by page, which
/// costs the API server seconds of CPU at scale during the cold start. The
/// watch that follows brings everything newer than the cached list.
fn watch_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

async fn ensure_crd_installed(connections: &Api<SourceConnection>) -> anyhow::Result<()> {
    match connections.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(status)) if status.code == 404 => anyhow::bail!(
            "the SourceConnection CRD (sourceconnections.tokenkeeper.dev) is not installed in \
             this cluster. Install it first: kubectl apply -f crds/ (or `tokenkeeper crd | \
             kubectl apply -f -`)"
        ),
        other => other
            .map(|_| ())
            .context("cannot list SourceConnections; check the kubeconfig and RBAC"),
    }
}
