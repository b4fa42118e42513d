//! Reconciling one SourceConnection: read what it needs, decide with the
//! pure functions of `decide`, then write only what changed. Static
//! credentials are copied (`static_creds`), OAuth 2.0 tokens refreshed
//! (`oauth`), tokens revoked when a connection is deleted (`revocation`).

mod context;
pub mod oauth;
mod pending;
pub mod revocation;
mod static_creds;

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::ResourceExt;
use tracing::{info, warn};

use crate::api::SourceConnection;
use crate::decide::refresh::backoff;
use crate::decide::status::{self, display_name};
use crate::decide::validate::{self, Method};
use crate::error::{Error, Retry};
use crate::runtime::object_key::key_of;
use crate::runtime::wire::CachedConnection;

pub use crate::decide::outcome::{Next, Synced};

/// How often a connection whose new grant could not be written tries again.
const PENDING_RETRY: Duration = Duration::from_secs(2);
pub use context::{Context, StoredGrant, TransientFailures};
pub use pending::{PendingGrant, PendingGrants};

/// The work queue's worker: reconciles `cached` and says when to do so
/// again (`None`: on the next watch event).
pub async fn reconcile(cached: Arc<CachedConnection>, ctx: Arc<Context>) -> Option<Duration> {
    let started = Instant::now();
    let result = match cached.decode() {
        Ok(conn) => reconcile_once(&conn, &ctx).await,
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

async fn reconcile_once(conn: &SourceConnection, ctx: &Context) -> Result<Next, Error> {
    let now = ctx.clock.now();
    if conn.metadata.deletion_timestamp.is_some() {
        let (next, notes) = revocation::finalize(conn, ctx, now).await?;
        ctx.events.publish_all(conn, &notes).await;
        return Ok(next);
    }
    revocation::ensure_finalizer(conn, ctx).await?;
    let synced = match sync(conn, ctx, now).await {
        Ok(synced) => synced,
        Err(error) if error.retry() == Retry::Infrastructure => return Err(error),
        Err(error) => {
            info!(connection = %display_name(conn), reason = %error.reason(), %error, "connection not ready");
            ctx.metrics.reconcile_error(error.reason());
            Synced::failed(&error)
        }
    };
    ctx.clear_transient_failures(conn);
    if let Some(times) = synced.token_times {
        let namespace = conn.namespace().unwrap_or_default();
        ctx.metrics
            .report_token_times(&namespace, &conn.name_any(), times);
    }
    let desired = status::desired_status(conn, &synced.report, now);
    if !status::is_current(conn, &desired) {
        ctx.status.write(conn, &desired).await?;
        ctx.api.answered();
    }
    ctx.events.publish_all(conn, &synced.notes).await;
    Ok(synced.next)
}

async fn sync(conn: &SourceConnection, ctx: &Context, now: Timestamp) -> Result<Synced, Error> {
    match validate::validate(conn)? {
        Method::OAuth2(oauth) => oauth::sync(conn, oauth, ctx, now).await,
        Method::Static(method) => static_creds::sync(conn, method, ctx).await,
    }
}
