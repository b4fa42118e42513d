//! Reconciling one SourceConnection: read what it needs, decide with the
//! pure functions of `decide`, then write only what changed. Static
//! credentials are copied (`static_creds`), OAuth 2.0 tokens refreshed
//! (`oauth`), tokens revoked when a connection is deleted (`revocation`).

mod context;
pub mod oauth;
mod pending;
pub mod revocation;
mod static_creds;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use jiff::Timestamp;
use kube::{Api, ResourceExt};
use tracing::{error, info, warn};

use crate::api::SourceConnection;
use crate::decide::refresh::backoff;
use crate::decide::secrets::renamed_target;
use crate::decide::status::{self, display_name};
use crate::decide::validate::{self, Method};
use crate::error::{Error, Reason, Retry};
use crate::runtime::object_key::key_of;
use crate::runtime::wire::CachedConnection;
use crate::write::secret::delete_renamed_target;

pub use crate::decide::outcome::{Next, Synced};

/// How often a connection whose new grant could not be written tries again.
const PENDING_RETRY: Duration = Duration::from_secs(2);
pub use context::{Context, StoredGrant, TransientFailures};
pub use pending::{PendingGrant, PendingGrants};

/// The work queue's worker: reconciles `cached` and says when to do so
/// again (`None`: on the next watch event). A panic is a bug: it stops this
/// reconcile only, and the connection says so.
pub async fn reconcile(cached: Arc<CachedConnection>, ctx: Arc<Context>) -> Option<Duration> {
    let started = Instant::now();
    let result = match cached.decode() {
        Ok(conn) => match AssertUnwindSafe(reconcile_once(&conn, &ctx))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(_) => return Some(after_panic(&conn, &ctx).await),
        },
        // The cache admits only connections that decode.
        Err(error) => Err(Error::InvalidSpec(format!(
            "the connection cannot be read: {error}"
        ))),
    };
    ctx.metrics.observe_reconcile(started.elapsed());
    match result {
        Ok(next) => next.delay(ctx.clock.now()),
        Err(error) => {
            if error.is_api_unreachable() {
                ctx.api.failed();
            }
            ctx.metrics.reconcile_error(error.reason());
            let failures = ctx.record_transient_failure(&*cached);
            // A grant only this process holds is written as soon as the API
            // answers again, however long it was gone.
            let delay = if ctx.pending.has(&key_of(&*cached)) {
                backoff(failures).min(PENDING_RETRY)
            } else {
                backoff(failures)
            };
            warn!(connection = %display_name(&*cached), %error, failures, retry_in = ?delay, "reconcile failed");
            Some(delay)
        }
    }
}

/// After a panic in `conn`'s reconcile: counted, said on the connection
/// (`InternalError`), and retried with backoff. The panic's message went to
/// the log through the panic hook; the status does not repeat it, since it
/// may quote whatever value was at hand.
async fn after_panic(conn: &SourceConnection, ctx: &Context) -> Duration {
    ctx.metrics.reconcile_panics.inc();
    ctx.metrics.reconcile_error(Reason::InternalError);
    let failures = ctx.record_transient_failure(conn);
    let delay = backoff(failures);
    error!(connection = %display_name(conn), failures, retry_in = ?delay, "reconcile panicked: a bug in tokenkeeper");
    let error = Error::Internal {
        detail: "a panic; the operator's log has its message".to_owned(),
    };
    let synced = Synced::failed(&error);
    let desired = status::desired_status(conn, &synced.report, ctx.clock.now());
    if !status::is_current(conn, &desired)
        && let Err(error) = ctx.status.write(conn, &desired).await
    {
        warn!(connection = %display_name(conn), %error, "could not report the panic on the connection");
    }
    ctx.events.publish_all(conn, &synced.notes).await;
    delay
}

async fn reconcile_once(conn: &SourceConnection, ctx: &Context) -> Result<Next, Error> {
    let now = ctx.clock.now();
    #[cfg(feature = "fault-injection")]
    if conn.annotations().contains_key(FAULT_PANIC_ANNOTATION) {
        panic!("fault injected by the {FAULT_PANIC_ANNOTATION} annotation");
    }
    if conn.metadata.deletion_timestamp.is_some() {
        let (next, notes) = revocation::finalize(conn, ctx, now).await?;
        ctx.events.publish_all(conn, &notes).await;
        return Ok(next);
    }
    revocation::ensure_finalizer(conn, ctx).await?;
    let mut synced = match sync(conn, ctx, now).await {
        Ok(mut synced) => {
            ctx.clear_transient_failures(conn);
            let wrote_new =
                synced.report.secret_name.as_deref() == Some(&conn.target_secret_name());
            if let Some(old) = renamed_target(conn).filter(|_| wrote_new) {
                let secrets =
                    Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
                synced
                    .notes
                    .extend(delete_renamed_target(conn, &secrets, &old).await?);
            }
            synced
        }
        Err(error) if error.retry() == Retry::Infrastructure => return Err(error),
        Err(error) => {
            info!(connection = %display_name(conn), reason = %error.reason(), %error, "connection not ready");
            ctx.metrics.reconcile_error(error.reason());
            let mut synced = Synced::failed(&error);
            // A refused write or an unusable answer is tried again later;
            // a spec problem waits for a change.
            if error.retry() == Retry::Backoff {
                synced.next = Next::In(backoff(ctx.record_transient_failure(conn)));
            } else {
                ctx.clear_transient_failures(conn);
            }
            synced
        }
    };
    if let Some(times) = synced.token_times {
        let namespace = conn.namespace().unwrap_or_default();
        ctx.metrics
            .report_token_times(&namespace, &conn.name_any(), times);
    }
    let desired = status::desired_status(conn, &synced.report, now);
    if let Some(message) = status::grant_expiry_began(conn, &desired) {
        synced
            .notes
            .push(status::Note::warning(Reason::GrantExpiring, message));
    }
    if !status::is_current(conn, &desired) {
        ctx.status.write(conn, &desired).await?;
        ctx.api.answered();
    }
    ctx.events.publish_all(conn, &synced.notes).await;
    Ok(synced.next)
}

/// Builds with the `fault-injection` feature (the test suite's) panic in
/// the reconcile of a connection with this annotation, to show that a bug
/// stops only that connection.
#[cfg(feature = "fault-injection")]
pub const FAULT_PANIC_ANNOTATION: &str = "tokenkeeper.dev/test-inject-panic";

async fn sync(conn: &SourceConnection, ctx: &Context, now: Timestamp) -> Result<Synced, Error> {
    match validate::validate(conn)? {
        Method::OAuth2(oauth) => oauth::sync(conn, oauth, ctx, now).await,
        Method::Static(method) => static_creds::sync(conn, method, ctx).await,
    }
}
