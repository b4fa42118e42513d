//! The reconciler: reads what a SourceConnection needs, hands it to the pure
//! functions of `decide` and `status`, then writes only what changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY, SourceConnection};
use crate::decide;
use crate::error::{Error, transient_backoff};
use crate::status::{self, Outcome, display_name};

/// Static credentials are re-read this often even without a watch event,
/// as a safety net; watches normally bring changes within a second.
const RESYNC_INTERVAL: Duration = Duration::from_secs(3600);
/// events.k8s.io/v1 refuses notes longer than this.
const EVENT_NOTE_LIMIT: usize = 1024;

pub struct Settings {
    /// Watch only this namespace; `None` watches all.
    pub namespace: Option<String>,
}

pub struct Context {
    client: Client,
    recorder: Recorder,
    /// Consecutive transient failures per connection, for backoff.
    transient_failures: Mutex<HashMap<ObjectRef<SourceConnection>, u32>>,
}

impl Context {
    fn record_transient_failure(&self, conn: &SourceConnection) -> u32 {
        let mut failures = self.transient_failures.lock().expect("not poisoned");
        let count = failures.entry(ObjectRef::from_obj(conn)).or_default();
        *count += 1;
        *count
    }

    fn clear_transient_failures(&self, conn: &SourceConnection) {
        self.transient_failures
            .lock()
            .expect("not poisoned")
            .remove(&ObjectRef::from_obj(conn));
    }
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

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let namespace = settings.namespace.as_deref();
    let connections: Api<SourceConnection> = scoped(client.clone(), namespace);
    ensure_crd_installed(&connections).await?;
    let secrets: Api<Secret> = scoped(client.clone(), namespace);

    let (reader, writer) = reflector::store();
    // Status-only updates (our own writes) do not change the generation or
    // annotations, so they do not wake the reconciler again.
    let connection_changes = watcher(connections, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            Predicate::<SourceConnection>::combine(predicates::generation, predicates::annotations),
            Default::default(),
        );
    // Secrets the users reference are watched by metadata only and mapped
    // to their connections; their contents are read when reconciling.
    let secret_metadata: Api<PartialObjectMeta<Secret>> = scoped(client.clone(), namespace);
    let referenced_secret_changes = watcher(secret_metadata, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let connection_index = reader.clone();

    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client, Reporter::from(FIELD_MANAGER)),
        transient_failures: Mutex::default(),
    });
    info!(
        namespace = namespace.unwrap_or("<all>"),
        "tokenkeeper controller starting"
    );
    Controller::for_stream(connection_changes, reader)
        .owns(
            secrets,
            watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")),
        )
        .watches_stream(referenced_secret_changes, move |secret| {
            connections_reading(&connection_index, &secret)
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "reconcile loop");
            }
        })
        .await;
    info!("tokenkeeper controller stopped");
    Ok(())
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

/// Connections in the Secret's namespace that read it. Secrets tokenkeeper
/// writes itself come through `owns` instead.
fn connections_reading(
    index: &Store<SourceConnection>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<SourceConnection>> {
    if secret.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY) {
        return Vec::new();
    }
    let name = secret.name_any();
    let namespace = secret.namespace();
    index
        .state()
        .iter()
        .filter(|conn| conn.namespace() == namespace)
        .filter(|conn| conn.spec.referenced_secret_names().contains(&name.as_str()))
        .map(|conn| ObjectRef::from_obj(conn.as_ref()))
        .collect()
}

async fn reconcile(conn: Arc<SourceConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = display_name(&conn);
    match sync(&conn, &ctx).await {
        Ok(secret_name) => {
            ctx.clear_transient_failures(&conn);
            write_status(&conn, &ctx, &Outcome::Synced { secret_name }).await?;
            Ok(Action::requeue(RESYNC_INTERVAL))
        }
        Err(error) if error.is_transient() => Err(error),
        Err(error) => {
            ctx.clear_transient_failures(&conn);
            info!(connection = %name, reason = error.reason(), %error, "connection not ready");
            write_status(&conn, &ctx, &Outcome::Failed(&error)).await?;
            publish(
                &ctx,
                &conn,
                EventType::Warning,
                error.reason(),
                &error.to_string(),
            )
            .await;
            // Permanent errors wait for a change to the connection or its
            // Secrets; the watches bring that change.
            Ok(Action::await_change())
        }
    }
}

fn error_policy(conn: Arc<SourceConnection>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_transient_failure(&conn);
    let delay = transient_backoff(failures);
    warn!(connection = %display_name(&conn), %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Reads the inputs, decides, and writes the target Secret when it differs.
/// Returns the target Secret's name.
async fn sync(conn: &SourceConnection, ctx: &Context) -> Result<String, Error> {
    let method = decide::validate(conn)?;
    let namespace = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    let Some(source_name) = method.static_source_secret() else {
        return Err(Error::NotImplemented);
    };
    let source = secrets
        .get_opt(source_name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            namespace: namespace.clone(),
            name: source_name.to_owned(),
            field: match method {
                decide::Method::Basic(_) => "basic.secretRef",
                _ => "apiKey.secretRef",
            },
            example_literals: decide::example_literals(method),
        })?;
    let data = decide::static_credentials(conn, method, &source)?;

    let target_name = conn.target_secret_name();
    let existing = secrets.get_opt(&target_name).await?;
    decide::check_ownership(conn, existing.as_ref())?;
    let desired = decide::target_secret(conn, data);
    if decide::needs_write(existing.as_ref(), &desired) {
        apply_secret(&secrets, &desired).await?;
        let verb = if existing.is_some() {
            "Updated"
        } else {
            "Created"
        };
        info!(connection = %display_name(conn), secret = %target_name, "{verb} target Secret");
        publish(
            ctx,
            conn,
            EventType::Normal,
            status::REASON_SECRET_SYNCED,
            &format!("{verb} Secret {target_name} with the current credentials"),
        )
        .await;
    }
    Ok(target_name)
}

async fn apply_secret(secrets: &Api<Secret>, desired: &Secret) -> Result<(), Error> {
    let name = desired.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match secrets.patch(&name, &params, &Patch::Apply(desired)).await {
        Ok(_) => Ok(()),
        // The server refuses the Secret for what the user wrote into
        // spec.target (an invalid label, say): a spec problem, not an outage.
        Err(kube::Error::Api(status)) if status.code == 422 => Err(Error::InvalidSpec(format!(
            "the API server refused the target Secret {name}: {}. Fix spec.target.",
            status.message
        ))),
        Err(error) => Err(error.into()),
    }
}

async fn write_status(
    conn: &SourceConnection,
    ctx: &Context,
    outcome: &Outcome<'_>,
) -> Result<(), Error> {
    let desired = status::desired_status(conn, outcome, Timestamp::now());
    if status::is_current(conn, &desired) {
        return Ok(());
    }
    let api: Api<SourceConnection> =
        Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": SourceConnection::api_version(&()),
        "kind": SourceConnection::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &conn.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    conn: &SourceConnection,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let mut note = note.to_owned();
    if note.len() > EVENT_NOTE_LIMIT {
        let mut cut = EVENT_NOTE_LIMIT - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &conn.object_ref(&())).await {
        // An event is a courtesy; the status already carries the outcome.
        warn!(connection = %display_name(conn), %error, "could not publish event");
    }
}
