//! De-authorization: a deleted OAuth 2.0 connection revokes its refresh and
//! access tokens at the provider (RFC 7009) before its finalizer is
//! released and its Secrets go. A provider that refuses or cannot be reached
//! is retried with backoff, and after a bounded time the finalizer is
//! released anyway, so a dead provider cannot block namespace deletion.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use crate::api::{ClientAuthMethod, FINALIZER_REVOKE, OAuth2Auth, SourceConnection};
use crate::decide::classify::{self, FailureContext};
use crate::decide::preset::{Resolved, resolve};
use crate::decide::refresh::backoff;
use crate::decide::secrets::{check_source, client_credentials};
use crate::decide::status::{Note, display_name};
use crate::error::{Error, Reason};
use crate::oauth::client::{self, Revocable};
use crate::oauth::seal::Binding;
use crate::oauth::token::{KEY_ACCESS_TOKEN, TokenFailure};
use crate::providers::RevocationStyle;
use crate::reconcile::{Context, Next};

/// What to do about revocation once the revocation attempt is known. Pure.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Revoked (or nothing to revoke): release the finalizer.
    Done,
    /// Failed, still within the bound: retry after this long.
    RetryIn(Duration),
    /// Failed for longer than the bound: release anyway.
    GiveUp,
}

pub fn after_attempt(
    succeeded: bool,
    deleted_at: Timestamp,
    now: Timestamp,
    bound: Duration,
    attempts: u32,
) -> Release {
    if succeeded {
        return Release::Done;
    }
    let waited = now.duration_since(deleted_at);
    let bound = SignedDuration::try_from(bound).unwrap_or(SignedDuration::MAX);
    if waited >= bound {
        Release::GiveUp
    } else {
        let left = bound
            .checked_sub(waited)
            .and_then(|left| Duration::try_from(left).ok())
            .unwrap_or_default();
        Release::RetryIn(backoff(attempts).min(left).max(Duration::from_secs(1)))
    }
}

/// Adds or removes the finalizer so that it is there exactly when deleting
/// the connection must revoke tokens.
pub async fn ensure_finalizer(conn: &SourceConnection, ctx: &Context) -> Result<(), Error> {
    let wanted = conn.revokes_on_delete();
    if wanted == conn.has_revoke_finalizer() {
        return Ok(());
    }
    let mut finalizers: Vec<String> = conn
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER_REVOKE)
        .cloned()
        .collect();
    if wanted {
        finalizers.push(FINALIZER_REVOKE.to_owned());
    }
    patch_finalizers(conn, ctx, finalizers).await
}

async fn patch_finalizers(
    conn: &SourceConnection,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let api: Api<SourceConnection> =
        Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
    // resourceVersion makes the patch fail instead of dropping a finalizer
    // someone else added meanwhile.
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": conn.resource_version()}});
    match api
        .patch(
            &conn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Revokes the tokens of a deleted connection, then releases it.
pub async fn finalize(
    conn: &SourceConnection,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Next, Vec<Note>), Error> {
    if !conn.has_revoke_finalizer() {
        return Ok((Next::AwaitChange, Vec::new()));
    }
    let Some(oauth) = conn
        .spec
        .oauth2
        .as_ref()
        .filter(|_| conn.revokes_on_delete())
    else {
        release(conn, ctx).await?;
        return Ok((Next::AwaitChange, Vec::new()));
    };
    let deleted_at = conn
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    // Only a replica that holds the lease revokes.
    ctx.fence.time_left()?;
    let outcome = revoke_all(conn, oauth, ctx, now).await;
    let withheld = matches!(outcome, Ok(Revoked::Withheld));
    let outcome = outcome.map(drop);
    let attempts = match &outcome {
        Ok(()) => 0,
        Err(_) => ctx.record_transient_failure(conn),
    };
    let release_after = after_attempt(
        outcome.is_ok(),
        deleted_at,
        now,
        ctx.revocation_timeout,
        attempts,
    );
    let name = display_name(conn);
    match &outcome {
        Ok(()) if withheld => {
            warn!(connection = %name, "the grant is not for the endpoints the connection names now; nothing revoked")
        }
        Ok(()) => info!(connection = %name, "revoked the connection's tokens; releasing it"),
        Err(error) => {
            warn!(connection = %name, %error, attempts, release = ?release_after, "revocation failed")
        }
    }
    let mut notes: Vec<Note> = if withheld {
        vec![Note::warning(
            Reason::RevocationAbandoned,
            "Did not revoke: the grant kept for this connection was given for other endpoints or \
             another client than spec.oauth2 names now, and is never sent elsewhere. Revoke the \
             app's access at the provider."
                .into(),
        )]
    } else {
        revocation_note(
            &release_after,
            outcome.as_ref().err(),
            ctx.revocation_timeout,
        )
        .into_iter()
        .collect()
    };
    match release_after {
        Release::RetryIn(delay) => Ok((Next::In(delay), notes)),
        Release::Done | Release::GiveUp => {
            // Events first: after the release the object is gone.
            ctx.events.publish_all(conn, &notes).await;
            notes.clear();
            ctx.clear_transient_failures(conn);
            release(conn, ctx).await?;
            Ok((Next::AwaitChange, notes))
        }
    }
}

async fn release(conn: &SourceConnection, ctx: &Context) -> Result<(), Error> {
    let finalizers = conn
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER_REVOKE)
        .cloned()
        .collect();
    patch_finalizers(conn, ctx, finalizers).await
}

/// What revoking did.
enum Revoked {
    /// Every token known (none is fine).
    All,
    /// Nothing: the grant was given for other endpoints than the spec names
    /// now, so neither it nor the access token is sent there.
    Withheld,
}

/// Revokes the refresh token (which most providers take as revoking the
/// grant) and the access token. Tokens already gone are fine.
async fn revoke_all(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    ctx: &Context,
    now: Timestamp,
) -> Result<Revoked, Error> {
    let resolved = resolve(oauth)?;
    let oauth = &resolved.oauth;
    let namespace = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let client_ref = &oauth.client.secret_ref;
    let client = secrets.get_opt(&client_ref.name).await?;
    if let Some(client) = &client {
        let required = ctx.limits.require_source_label;
        check_source(conn, client, "oauth2.client.secretRef", required)?;
    }
    let (client_id, client_secret) = client_credentials(oauth, &namespace, client.as_ref())?;
    // The grant is the sealed one in the target Secret, or a consent that
    // was not adopted yet.
    let binding = Binding::new(&conn.uid().unwrap_or_default(), oauth, &client_id);
    let stored = ctx.read_stored_grant(&secrets, conn, &binding).await?;
    if stored.withheld {
        return Ok(Revoked::Withheld);
    }
    let access_token = stored.target.as_ref().and_then(|t| {
        let value = t.data.as_ref()?.get(KEY_ACCESS_TOKEN)?;
        Some(String::from_utf8_lossy(&value.0).into_owned())
    });
    let revocation_url = oauth.revocation_url.as_deref().unwrap_or_default();
    let tokens = stored
        .sealed
        .iter()
        .chain(stored.consented.iter())
        .map(|t| Revocable::RefreshToken(t))
        .chain(access_token.as_deref().map(Revocable::AccessToken));
    let client = Client {
        id: &client_id,
        secret: &client_secret,
        method: oauth.client.auth_method.unwrap_or_default(),
    };
    for token in tokens {
        if let Err(failure) = revoke_one(ctx, &resolved, revocation_url, &client, token).await {
            let error = classify::classify(
                &failure,
                &FailureContext {
                    now,
                    token_endpoint: revocation_url,
                    refresh_token_expires_at: None,
                    reauthorize_fix: "",
                    client_secret_namespace: &namespace,
                    client_secret_name: &client_ref.name,
                    max_retry_after: ctx.limits.max_retry_after,
                    dialect: resolved.dialect(),
                },
            );
            return Err(error);
        }
    }
    Ok(Revoked::All)
}

/// The client as it authenticates at the revocation endpoint.
struct Client<'a> {
    id: &'a str,
    secret: &'a str,
    method: ClientAuthMethod,
}

/// Revokes one token the provider's way. A token the provider no longer
/// knows counts as revoked: Salesforce answers 400 invalid_token for one
/// that went with its grant.
async fn revoke_one(
    ctx: &Context,
    resolved: &Resolved,
    url: &str,
    client: &Client<'_>,
    token: Revocable<'_>,
) -> Result<(), TokenFailure> {
    let bearer = resolved.revocation_style() == RevocationStyle::Bearer;
    let result = match token {
        // Revoking with the access token as credential ends the grant.
        Revocable::AccessToken(access_token) if bearer => {
            client::revoke_bearer(&ctx.http, url, access_token).await
        }
        _ if bearer => return Ok(()),
        token => {
            let (id, secret, method) = (client.id, client.secret, client.method);
            client::revoke(&ctx.http, url, id, secret, method, token).await
        }
    };
    match result {
        Err(TokenFailure::OAuth { code, .. })
            if code == "invalid_token" || code == "invalid_grant" =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The event that says how revoking went.
fn revocation_note(release: &Release, error: Option<&Error>, timeout: Duration) -> Option<Note> {
    match (release, error) {
        (Release::Done, _) => Some(Note::normal(
            Reason::TokensRevoked,
            "Revoked the refresh and access tokens at the provider before deletion".into(),
        )),
        (Release::RetryIn(delay), Some(error)) => Some(Note::warning(
            Reason::RevocationFailed,
            format!(
                "Could not revoke the tokens before deletion ({error}). Retrying in {} s; the \
                 connection is released anyway {} s after its deletion.",
                delay.as_secs(),
                timeout.as_secs()
            ),
        )),
        (_, Some(error)) => Some(Note::warning(
            Reason::RevocationAbandoned,
            format!(
                "Gave up revoking the tokens {} s after deletion ({error}); the grant may still \
                 be valid at the provider: revoke the app's access there.",
                timeout.as_secs()
            ),
        )),
        (_, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn success_releases_failure_retries_within_the_bound_then_gives_up() {
        let bound = Duration::from_secs(300);
        assert_eq!(after_attempt(true, at(0), at(10), bound, 0), Release::Done);
        assert_eq!(
            after_attempt(false, at(0), at(10), bound, 1),
            Release::RetryIn(Duration::from_secs(5))
        );
        assert_eq!(
            after_attempt(false, at(0), at(10), bound, 3),
            Release::RetryIn(Duration::from_secs(20))
        );
        // The retry never lands after the bound.
        assert_eq!(
            after_attempt(false, at(0), at(290), bound, 9),
            Release::RetryIn(Duration::from_secs(10))
        );
        assert_eq!(
            after_attempt(false, at(0), at(300), bound, 9),
            Release::GiveUp
        );
    }
}
