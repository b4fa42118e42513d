//! Reconciling one OAuth 2.0 connection: read the client, the grant and
//! the target Secret; decide with `schedule::plan`; request a token when
//! due; write the new access token and the (sealed) refresh token to the
//! target Secret in one write; report.
//!
//! One refresh per connection runs at a time: the controller runtime never
//! reconciles the same object concurrently. Only the leader writes grants,
//! and it keeps the target Secret it wrote last (see `secret_cache`), so
//! the refresh token it sends is the one it stored; after a restart or a
//! change by anyone else it reads the Secret from the API again.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use tracing::{debug, info, warn};

use crate::api::{ANNOTATION_FORCE_REFRESH, OAuth2Auth, OAuth2Grant, SourceConnection};
use crate::classify::{self, FailureContext};
use crate::controller::{Context, Next, Note, Synced, apply_if_changed};
use crate::decide::{self, OAuthSettings, ReadSecret};
use crate::error::{Error, Retry, backoff};
use crate::metrics::{Metrics, TokenTimes};
use crate::schedule::{self, Plan, PlanInput, RefreshReason};
use crate::seal::{ANNOTATION_SEALED_GRANT, OpenError, SealedGrant};
use crate::status::{self, Report, TokenStatus, Verdict, display_name};
use crate::token::{GrantState, TokenRecord, fingerprint, rfc3339};
use crate::token_client::{self, Grant, IssuedToken, TokenRequest};

/// How often a write of a freshly rotated refresh token is retried before
/// giving up: losing it would lose the grant.
const GRANT_WRITE_ATTEMPTS: u32 = 5;

struct Inputs {
    client_id: String,
    client_secret: String,
    /// The user-supplied refresh token (refreshToken grant).
    user_refresh_token: Option<String>,
    target: Option<Arc<ReadSecret>>,
    /// The grant to continue with: the one sealed in the target Secret,
    /// or a consent adopted over it.
    grant: Option<SealedGrant>,
    /// The grant as the target Secret in the cluster holds it, opened once
    /// per reconcile; an equal grant keeps that seal.
    stored_grant: Option<SealedGrant>,
    /// Why the target Secret's sealed grant could not be used.
    grant_problem: Option<OpenError>,
    /// The state Secret, when it holds a grant given on the consent page
    /// or by `kubectl tokenkeeper authorize` that is not adopted yet.
    inbox: Option<(Arc<ReadSecret>, GrantState)>,
    /// The newest token: the target Secret's, or the consented one.
    current: Option<TokenRecord>,
}

pub async fn sync(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    ctx: &Context,
    now: Timestamp,
) -> Result<Synced, Error> {
    let settings = decide::oauth_settings(oauth)?;
    let namespace = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut inputs = read_inputs(conn, oauth, ctx, &secrets).await?;
    if let Some(problem) = &inputs.grant_problem {
        warn!(connection = %display_name(conn), %problem, "the sealed refresh token in the target Secret cannot be used");
    }
    let adopted = adopt_consented_grant(&mut inputs);
    if !adopted && inputs.inbox.is_some() {
        // An older consent than the grant in use: only in the way, and its
        // refresh token must not be taken for a rotation later.
        clear_inbox(ctx, conn, &secrets, &inputs).await;
        inputs.inbox = None;
    }

    let request_hash = request_fingerprint(oauth, &inputs.client_id);
    let user_hash = inputs
        .user_refresh_token
        .as_deref()
        .map(|t| fingerprint(&[t]));
    let imported_hash = inputs.grant.as_ref().and_then(|g| g.imported_hash.clone());
    let new_user_refresh_token = user_hash.is_some() && user_hash != imported_hash;
    let authorization_link = ctx.authorization_link(conn, oauth);
    let token_status = TokenStatus {
        authorization_url: authorization_link.clone(),
        ..TokenStatus::current(conn)
    };
    // Which refresh token to use: a new one from the user wins over ours.
    let refresh_token = match oauth.grant {
        OAuth2Grant::ClientCredentials => None,
        _ if new_user_refresh_token => inputs.user_refresh_token.clone(),
        _ => inputs
            .grant
            .as_ref()
            .map(|g| g.refresh_token.clone())
            .or_else(|| inputs.user_refresh_token.clone()),
    };
    if oauth.grant != OAuth2Grant::ClientCredentials && refresh_token.is_none() {
        let error = Error::AuthorizationRequired {
            url: authorization_link.unwrap_or_else(|| {
                "the operator's authorization endpoint (start tokenkeeper with --external-url)"
                    .into()
            }),
            namespace: namespace.clone(),
            name: conn.name_any(),
        };
        return Ok(Synced {
            report: Report {
                verdict: Some(Verdict::failed(&error)),
                secret_name: None,
                token: Some(token_status),
            },
            next: Next::AwaitChange,
            notes: vec![Note {
                type_: EventType::Normal,
                reason: error.reason().into(),
                message: error.to_string(),
            }],
        });
    }
    let force_value = conn.annotations().get(ANNOTATION_FORCE_REFRESH).cloned();
    let jitter_key = conn.uid().unwrap_or_else(|| display_name(conn));
    let plan = schedule::plan(&PlanInput {
        now,
        current: inputs.current.as_ref(),
        request_hash: &request_hash,
        new_user_refresh_token,
        force_requested: force_value.is_some() && force_value != token_status.force_refresh_handled,
        failed_attempts: token_status.failed_refresh_attempts,
        retry_at: token_status.next_refresh_time,
        refresh_before: settings.refresh_before,
        jitter_key: &jitter_key,
    });

    // Without a request, the target must still hold the newest token and
    // grant: a consent may have just been given.
    let reason = match plan {
        Plan::Refresh(reason) => reason,
        Plan::RetryAt { until } => {
            if let Some(current) = &inputs.current {
                let grant = inputs.grant.as_ref();
                write_token(ctx, conn, &secrets, &inputs, current, grant, until).await?;
            }
            clear_inbox(ctx, conn, &secrets, &inputs).await;
            return Ok(Synced {
                report: Report {
                    verdict: None,
                    secret_name: None,
                    token: None,
                },
                next: Next::At(until),
                notes: Vec::new(),
            });
        }
        Plan::Wait { .. } => {
            let current = inputs
                .current
                .as_ref()
                .expect("the plan waits only while a token exists");
            let due = schedule::refresh_due_at(current, settings.refresh_before, &jitter_key);
            let grant = inputs.grant.as_ref();
            write_token(ctx, conn, &secrets, &inputs, current, grant, due).await?;
            clear_inbox(ctx, conn, &secrets, &inputs).await;
            let notes = adopted
                .then(|| consent_note(conn, current))
                .into_iter()
                .collect();
            return Ok(healthy(
                &ctx.metrics,
                conn,
                oauth,
                &settings,
                current,
                token_status,
                notes,
                due,
            ));
        }
    };

    let import_hash = if new_user_refresh_token {
        user_hash.clone()
    } else {
        imported_hash
    };
    debug!(connection = %display_name(conn), ?reason, "requesting a token");
    // A forced refresh is done once per annotation value, whatever its
    // result: otherwise a failing one would skip the backoff forever.
    let token_status = TokenStatus {
        force_refresh_handled: force_value.or(token_status.force_refresh_handled),
        ..token_status
    };
    let request = TokenRequest {
        token_url: &oauth.token_url,
        client_id: &inputs.client_id,
        client_secret: &inputs.client_secret,
        auth_method: oauth.client.auth_method,
        scopes: &oauth.scopes,
        extra_params: &oauth.extra_token_params,
        grant: match &refresh_token {
            Some(token) => Grant::RefreshToken(token),
            None => Grant::ClientCredentials,
        },
    };
    let slot = ctx.throttle.acquire(&oauth.token_url).await;
    let response = token_client::request_token(&ctx.http, request).await;
    drop(slot);
    let response = response.map_err(|failure| {
        let failure_context = FailureContext {
            now,
            token_endpoint: &oauth.token_url,
            refresh_token_expires_at: inputs
                .grant
                .as_ref()
                .and_then(|g| g.refresh_token_expires_at)
                .filter(|_| !new_user_refresh_token),
            reauthorize_fix: &reauthorize_fix(conn, oauth),
            client_secret_namespace: &namespace,
            client_secret_name: &oauth.client.secret_ref.name,
        };
        classify::classify(&failure, &failure_context)
    });
    ctx.metrics.token_request(
        &oauth.token_url,
        response
            .as_ref()
            .map_or_else(|error| error.reason(), |_| "success"),
    );
    match response {
        Ok(issued) => {
            let scope_if_unsaid = inputs
                .current
                .as_ref()
                .and_then(|c| c.scope.clone())
                .or_else(|| (!oauth.scopes.is_empty()).then(|| oauth.scopes.join(" ")));
            let mut record = TokenRecord::issued(
                now,
                &issued,
                settings.default_lifetime,
                scope_if_unsaid,
                &oauth.response_fields,
                &request_hash,
            );
            let grant = refresh_token
                .map(|used| next_grant(inputs.grant.as_ref(), &issued, used, import_hash, &record));
            let mut rejected = None;
            if let Some(verification) = &oauth.verification {
                match token_client::verify(&ctx.http, &verification.url, &record.access_token).await
                {
                    classify::Verdict::Accepted => {}
                    classify::Verdict::Forbidden { detail } => {
                        record.verification_denied =
                            Some(format!("GET {} answered {detail}", verification.url));
                    }
                    classify::Verdict::Unauthorized { detail } => {
                        rejected = Some(Error::AccessTokenRejected {
                            url: verification.url.clone(),
                            detail,
                        });
                    }
                    classify::Verdict::Inconclusive { detail } => {
                        warn!(connection = %display_name(conn), %detail, "verification request gave no answer; token kept");
                    }
                }
            }
            let due = schedule::refresh_due_at(&record, settings.refresh_before, &jitter_key);
            // The new refresh token and access token go out in one write.
            write_token(ctx, conn, &secrets, &inputs, &record, grant.as_ref(), due).await?;
            clear_inbox(ctx, conn, &secrets, &inputs).await;
            if let Some(error) = rejected {
                return Ok(failed(
                    &ctx.metrics,
                    conn,
                    &error,
                    Some(&record),
                    token_status,
                    now,
                    &jitter_key,
                ));
            }
            let was_ready = status::find_condition(conn, status::CONDITION_READY)
                .is_some_and(|c| c.status == "True" && c.reason == status::REASON_SECRET_SYNCED);
            let mut notes = Vec::new();
            if !was_ready || reason == RefreshReason::NewRefreshToken {
                notes.push(Note {
                    type_: EventType::Normal,
                    reason: "TokenIssued".into(),
                    message: format!(
                        "Obtained an access token valid until {}; Secret {} holds it",
                        rfc3339(record.expires_at),
                        conn.target_secret_name()
                    ),
                });
            }
            Ok(healthy(
                &ctx.metrics,
                conn,
                oauth,
                &settings,
                &record,
                token_status,
                notes,
                due,
            ))
        }
        Err(error) => {
            if matches!(
                error,
                Error::InvalidGrant { .. } | Error::RefreshTokenExpired { .. }
            ) && refresh_token.is_some()
                && rotated_meanwhile(conn, ctx, &secrets, refresh_token.as_deref()).await?
            {
                // A sibling refresh or a new consent changed the grant
                // under us: ours is merely stale, not revoked.
                info!(connection = %display_name(conn), "the refresh token changed meanwhile; retrying with the new one");
                return Ok(Synced {
                    report: Report {
                        verdict: None,
                        secret_name: None,
                        token: None,
                    },
                    next: Next::In(Duration::from_millis(100)),
                    notes: Vec::new(),
                });
            }
            Ok(failed(
                &ctx.metrics,
                conn,
                &error,
                inputs.current.as_ref(),
                token_status,
                now,
                &jitter_key,
            ))
        }
    }
}

fn consent_note(conn: &SourceConnection, record: &TokenRecord) -> Note {
    Note {
        type_: EventType::Normal,
        reason: "TokenIssued".into(),
        message: format!(
            "Authorized: an access token valid until {}; Secret {} holds it",
            rfc3339(record.expires_at),
            conn.target_secret_name()
        ),
    }
}

/// Takes a consented grant waiting in the state Secret as the current one
/// when it is newer than the target Secret's. Says whether it did.
fn adopt_consented_grant(inputs: &mut Inputs) -> bool {
    let Some((_, consented)) = &inputs.inbox else {
        return false;
    };
    let (Some(refresh_token), Some(token)) = (&consented.refresh_token, &consented.token) else {
        return false;
    };
    let newer = match (&inputs.current, &inputs.grant) {
        (Some(current), Some(_)) => token.issued_at > current.issued_at,
        _ => true,
    };
    if !newer {
        return false;
    }
    inputs.grant = Some(SealedGrant {
        refresh_token: refresh_token.clone(),
        refresh_token_expires_at: consented.refresh_token_expires_at,
        imported_hash: inputs
            .grant
            .as_ref()
            .and_then(|g| g.imported_hash.clone())
            .or_else(|| consented.imported_hash.clone()),
    });
    inputs.current = Some(token.clone());
    true
}

/// After a consent is adopted (or found stale), the state Secret keeps only
/// a pending authorization, if any. A failure leaves it for next time.
async fn clear_inbox(
    ctx: &Context,
    conn: &SourceConnection,
    secrets: &Api<Secret>,
    inputs: &Inputs,
) {
    let Some((secret, _)) = &inputs.inbox else {
        return;
    };
    let data = secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| key.starts_with(crate::authorize::PENDING_PREFIX))
        .collect();
    match store_state_secret(secrets, conn, secret.resource_version(), data).await {
        Ok(written) => ctx.secrets.wrote(ReadSecret::new(written)),
        Err(error) => {
            debug!(connection = %display_name(conn), %error, "could not clear the adopted consent");
        }
    }
}

/// Whether the grant now stored differs from the refresh token `used`.
async fn rotated_meanwhile(
    conn: &SourceConnection,
    ctx: &Context,
    secrets: &Api<Secret>,
    used: Option<&str>,
) -> Result<bool, Error> {
    let namespace = conn.namespace().unwrap_or_default();
    let target = ctx
        .secrets
        .get_fresh(secrets, &namespace, &conn.target_secret_name())
        .await?;
    let stored = target
        .as_deref()
        .and_then(|t| open_grant(ctx, conn, t).ok().flatten())
        .map(|g| g.refresh_token);
    let consented = ctx
        .secrets
        .get_fresh(secrets, &namespace, &conn.state_secret_name())
        .await?
        .and_then(|s| s.data.clone())
        .and_then(|d| GrantState::from_data(&d, &[]).refresh_token);
    Ok([stored, consented]
        .into_iter()
        .flatten()
        .any(|token| Some(token.as_str()) != used))
}

fn open_grant(
    ctx: &Context,
    conn: &SourceConnection,
    target: &Secret,
) -> Result<Option<SealedGrant>, OpenError> {
    let Some(sealed) = target.annotations().get(ANNOTATION_SEALED_GRANT) else {
        return Ok(None);
    };
    ctx.sealing_key
        .open(sealed, &conn.uid().unwrap_or_default())
        .map(Some)
}

async fn read_inputs(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    ctx: &Context,
    secrets: &Api<Secret>,
) -> Result<Inputs, Error> {
    let namespace = conn.namespace().unwrap_or_default();
    let client_ref = &oauth.client.secret_ref;
    let example = decide::example_literals(decide::Method::OAuth2(oauth));
    let client = read_secret(
        ctx,
        secrets,
        &namespace,
        &client_ref.name,
        "oauth2.client.secretRef",
        example,
    )
    .await?;
    let (client_id, client_secret) = decide::client_credentials(oauth, &client)?;

    let user_refresh_token = match (&oauth.grant, &oauth.refresh_token_secret_ref) {
        (OAuth2Grant::RefreshToken, Some(reference)) => {
            let example = format!("--from-literal={}=REFRESH_TOKEN", reference.key);
            let secret = read_secret(
                ctx,
                secrets,
                &namespace,
                &reference.name,
                "oauth2.refreshTokenSecretRef",
                example,
            )
            .await?;
            Some(text(decide::secret_key(
                &secret,
                &reference.key,
                "oauth2.refreshTokenSecretRef.key",
            )?))
        }
        _ => None,
    };

    let target = ctx
        .secrets
        .get(secrets, &namespace, &conn.target_secret_name())
        .await?;
    decide::check_ownership(conn, target.as_deref().map(ReadSecret::secret))?;
    // A deleted target Secret is written again from what tokenkeeper wrote
    // last, grant included.
    let remembered = match &target {
        Some(_) => None,
        None => ctx
            .secrets
            .last_written(&namespace, &conn.target_secret_name()),
    };
    let source = target.as_deref().or(remembered.as_deref());
    let current = source.and_then(|t| {
        TokenRecord::from_target(t.data.as_ref()?, t.annotations(), &oauth.response_fields)
    });
    let (grant, grant_problem, inbox) = if oauth.grant == OAuth2Grant::ClientCredentials {
        (None, None, None)
    } else {
        let (grant, problem) = match source.map(|t| open_grant(ctx, conn, t)) {
            Some(Ok(grant)) => (grant, None),
            Some(Err(problem)) => (None, Some(problem)),
            None => (None, None),
        };
        let state = ctx
            .secrets
            .get(secrets, &namespace, &conn.state_secret_name())
            .await?;
        decide::check_state_ownership(conn, state.as_deref().map(ReadSecret::secret))?;
        let inbox = state.and_then(|secret| {
            let consented = GrantState::from_data(secret.data.as_ref()?, &oauth.response_fields);
            consented
                .refresh_token
                .is_some()
                .then_some((secret, consented))
        });
        (grant, problem, inbox)
    };
    let stored_grant = target.as_ref().and(grant.clone());
    Ok(Inputs {
        client_id,
        client_secret,
        user_refresh_token,
        target,
        stored_grant,
        grant,
        grant_problem,
        inbox,
        current,
    })
}

async fn read_secret(
    ctx: &Context,
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    field: &'static str,
    example_literals: String,
) -> Result<Arc<ReadSecret>, Error> {
    ctx.secrets
        .get(secrets, namespace, name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            field,
            example_literals,
        })
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// Fingerprint of everything that shapes a token request: a change means
/// the current token may not be what the spec asks for.
pub fn request_fingerprint(oauth: &OAuth2Auth, client_id: &str) -> String {
    let grant = format!("{:?}", oauth.grant);
    let mut parts = vec![oauth.token_url.as_str(), client_id, grant.as_str()];
    parts.extend(oauth.scopes.iter().map(String::as_str));
    parts.push("--");
    for (name, value) in &oauth.extra_token_params {
        parts.push(name);
        parts.push(value);
    }
    fingerprint(&parts)
}

/// The grant after a successful refresh: a refresh token the provider did
/// not rotate stays.
fn next_grant(
    previous: Option<&SealedGrant>,
    issued: &IssuedToken,
    used: String,
    imported_hash: Option<String>,
    record: &TokenRecord,
) -> SealedGrant {
    let rotated = issued.refresh_token.is_some();
    SealedGrant {
        refresh_token: issued.refresh_token.clone().unwrap_or(used),
        refresh_token_expires_at: match issued.refresh_token_expires_at(record.issued_at) {
            Some(at) => Some(at),
            None if rotated => None,
            None => previous.and_then(|p| p.refresh_token_expires_at),
        },
        imported_hash,
    }
}

/// The target Secret for `record` and `grant`. An unchanged grant keeps
/// its seal, which is different each time it is made, so that an
/// unchanged token rewrites nothing.
fn desired_target(
    ctx: &Context,
    conn: &SourceConnection,
    inputs: &Inputs,
    record: &TokenRecord,
    grant: Option<&SealedGrant>,
    next_refresh_at: Timestamp,
) -> Secret {
    let mut annotations = record.target_annotations(Some(next_refresh_at));
    if let Some(grant) = grant {
        let kept_seal = inputs
            .target
            .as_deref()
            .filter(|_| inputs.stored_grant.as_ref() == Some(grant))
            .and_then(|t| t.annotations().get(ANNOTATION_SEALED_GRANT).cloned());
        let sealed = kept_seal
            .unwrap_or_else(|| ctx.sealing_key.seal(grant, &conn.uid().unwrap_or_default()));
        annotations.insert(ANNOTATION_SEALED_GRANT.to_owned(), sealed);
    }
    decide::target_secret(conn, record.target_data(), annotations)
}

/// Writes the target Secret when it differs from what `record` and
/// `grant` make. A freshly rotated refresh token exists nowhere else, so
/// that write is retried before giving up.
async fn write_token(
    ctx: &Context,
    conn: &SourceConnection,
    secrets: &Api<Secret>,
    inputs: &Inputs,
    record: &TokenRecord,
    grant: Option<&SealedGrant>,
    next_refresh_at: Timestamp,
) -> Result<(), Error> {
    let desired = desired_target(ctx, conn, inputs, record, grant, next_refresh_at);
    let mut attempt = 1;
    loop {
        let result = apply_if_changed(
            conn,
            secrets,
            inputs.target.as_deref(),
            &desired,
            &mut Vec::new(),
        )
        .await;
        match result {
            Ok(Some(written)) => {
                ctx.secrets.wrote(written);
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(error)
                if error.retry() == Retry::Infrastructure && attempt < GRANT_WRITE_ATTEMPTS =>
            {
                warn!(connection = %display_name(conn), attempt, %error, "could not write the target Secret; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Creates the state Secret, or replaces the version `resource_version`
/// names: a write that lost a race fails with 409 instead of overwriting.
pub async fn store_state_secret(
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    resource_version: Option<String>,
    data: std::collections::BTreeMap<String, k8s_openapi::ByteString>,
) -> Result<Secret, kube::Error> {
    let mut desired = decide::state_secret(conn, data);
    match resource_version {
        None => secrets.create(&PostParams::default(), &desired).await,
        Some(version) => {
            desired.metadata.resource_version = Some(version);
            secrets
                .replace(&desired.name_any(), &PostParams::default(), &desired)
                .await
        }
    }
}

/// The grant a person just gave on the consent page (through the
/// operator's callback or `kubectl tokenkeeper authorize`), ready to be
/// stored in the state Secret.
pub fn consented_grant(
    oauth: &OAuth2Auth,
    issued: &IssuedToken,
    refresh_token: String,
    client_id: &str,
    previous: GrantState,
    now: Timestamp,
) -> Result<GrantState, Error> {
    let settings = decide::oauth_settings(oauth)?;
    let record = TokenRecord::issued(
        now,
        issued,
        settings.default_lifetime,
        (!oauth.scopes.is_empty()).then(|| oauth.scopes.join(" ")),
        &oauth.response_fields,
        &request_fingerprint(oauth, client_id),
    );
    Ok(GrantState {
        refresh_token: Some(refresh_token),
        refresh_token_expires_at: issued.refresh_token_expires_at(record.issued_at),
        imported_hash: previous.imported_hash,
        token: Some(record),
    })
}

/// The report of a connection whose token is current. Nothing in it
/// changes from one routine refresh to the next, so a refresh writes no
/// status: the token's times are on the target Secret and in the metrics.
#[allow(clippy::too_many_arguments)]
fn healthy(
    metrics: &Metrics,
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    settings: &OAuthSettings,
    record: &TokenRecord,
    token_status: TokenStatus,
    notes: Vec<Note>,
    // When `record` is replaced: the same for every replica and every
    // reconcile, so recomputing it never rewrites the target Secret.
    due: Timestamp,
) -> Synced {
    report_token_times(metrics, conn, Some(record.expires_at), Some(due));
    let target = conn.target_secret_name();
    let mut message = format!(
        "Secret {target} holds a valid access token; tokenkeeper replaces it before it expires. \
         Its expires_at key and tokenkeeper.dev/next-refresh-at annotation say when."
    );
    if record.lifetime_assumed {
        message.push_str(&format!(
            " The provider did not say when the token expires (no expires_in); tokenkeeper \
             assumes {} (spec.oauth2.defaultTokenLifetime).",
            humanize(settings.default_lifetime)
        ));
    }
    let granted = record.granted_scopes();
    let missing = classify::missing_scopes(
        &oauth.required_scopes,
        record.scope.is_some().then_some(&granted[..]),
    );
    let verdict = if let Some(denied) = &record.verification_denied {
        Verdict::failed(&Error::InsufficientPermissions {
            detail: denied.clone(),
            fix: reauthorize_fix(conn, oauth),
        })
    } else if missing.is_empty() {
        Verdict::ready(message)
    } else {
        Verdict::failed(&Error::InsufficientPermissions {
            detail: format!(
                "missing {} (granted: {})",
                missing.join(", "),
                if granted.is_empty() {
                    "none".to_owned()
                } else {
                    granted.join(" ")
                }
            ),
            fix: reauthorize_fix(conn, oauth),
        })
    };
    Synced {
        report: Report {
            verdict: Some(verdict),
            secret_name: Some(target),
            token: Some(TokenStatus {
                next_refresh_time: None,
                granted_scopes: granted,
                failed_refresh_attempts: 0,
                last_failure_time: token_status.last_failure_time,
                force_refresh_handled: token_status.force_refresh_handled,
                authorization_url: token_status.authorization_url,
            }),
        },
        next: Next::At(due),
        notes,
    }
}

/// The report after a failed token request.
fn failed(
    metrics: &Metrics,
    conn: &SourceConnection,
    error: &Error,
    current: Option<&TokenRecord>,
    previous: TokenStatus,
    now: Timestamp,
    jitter_key: &str,
) -> Synced {
    let attempts = previous.failed_refresh_attempts.saturating_add(1);
    let valid_token = current.filter(|c| !c.is_expired(now));
    let (verdict, retry_at) = match error.retry() {
        Retry::Backoff => {
            let retry_after = match error {
                Error::ProviderUnavailable { retry_after, .. } => retry_after.unwrap_or_default(),
                _ => Duration::ZERO,
            };
            // Spread retries of many connections failing together.
            let base = backoff(attempts).max(retry_after);
            let jitter = base.mul_f64(0.1 * jitter_fraction(jitter_key, attempts));
            let retry_at = status::truncate_to_seconds(
                now + SignedDuration::try_from(base + jitter).unwrap_or_default(),
            ) + SignedDuration::from_secs(1);
            let progress = format!(
                " Attempt {attempts} failed; tokenkeeper retries at {} with backoff.",
                rfc3339(retry_at)
            );
            let verdict = match (valid_token, current) {
                _ if matches!(error, Error::AccessTokenRejected { .. }) => Verdict {
                    ready: false,
                    reason: error.reason().to_owned(),
                    message: format!("{error}.{progress}"),
                    rejection: None,
                },
                (Some(token), _) => Verdict {
                    ready: true,
                    reason: error.reason().to_owned(),
                    message: format!(
                        "{error}{progress} Secret {} keeps the current access token, valid until {}.",
                        conn.target_secret_name(),
                        rfc3339(token.expires_at)
                    ),
                    rejection: None,
                },
                (None, Some(expired)) => Verdict {
                    ready: false,
                    reason: status::REASON_ACCESS_TOKEN_EXPIRED.to_owned(),
                    message: format!(
                        "The access token in Secret {} expired at {} because refreshing keeps \
                         failing: {error}{progress}",
                        conn.target_secret_name(),
                        rfc3339(expired.expires_at)
                    ),
                    rejection: None,
                },
                (None, None) => Verdict {
                    ready: false,
                    reason: error.reason().to_owned(),
                    message: format!("{error}{progress}"),
                    rejection: None,
                },
            };
            (verdict, Some(retry_at))
        }
        Retry::AwaitChange | Retry::Infrastructure => (Verdict::failed(error), None),
    };
    warn!(connection = %display_name(conn), reason = error.reason(), attempts, "token request failed");
    report_token_times(metrics, conn, current.map(|c| c.expires_at), retry_at);
    Synced {
        report: Report {
            verdict: Some(verdict),
            secret_name: None,
            token: Some(TokenStatus {
                next_refresh_time: retry_at,
                failed_refresh_attempts: attempts,
                last_failure_time: Some(now),
                ..previous
            }),
        },
        next: match retry_at {
            Some(at) => Next::At(at),
            None => Next::AwaitChange,
        },
        notes: vec![Note {
            type_: EventType::Warning,
            reason: error.reason().into(),
            message: error.to_string(),
        }],
    }
}

fn report_token_times(
    metrics: &Metrics,
    conn: &SourceConnection,
    expires_at: Option<Timestamp>,
    next_action_at: Option<Timestamp>,
) {
    metrics.report_token_times(
        &conn.namespace().unwrap_or_default(),
        &conn.name_any(),
        TokenTimes {
            expires_at: expires_at.map(|t| t.as_second()),
            next_action_at: next_action_at.map(|t| t.as_second()),
        },
    );
}

fn jitter_fraction(key: &str, attempt: u32) -> f64 {
    let hex = fingerprint(&[key, &attempt.to_string()]);
    f64::from(u16::from_str_radix(&hex[..4], 16).expect("hex")) / 65_536.0
}

/// What the user does to give the connection a new grant.
fn reauthorize_fix(conn: &SourceConnection, oauth: &OAuth2Auth) -> String {
    let namespace = conn.namespace().unwrap_or_default();
    let open_link = conn
        .status
        .as_ref()
        .and_then(|s| s.authorization_url.as_deref())
        .filter(|_| oauth.authorization_url.is_some())
        .map(|link| format!("open {link} in a browser and grant access again; or "))
        .unwrap_or_default();
    let command = match (&oauth.grant, &oauth.refresh_token_secret_ref) {
        (OAuth2Grant::RefreshToken, Some(reference)) => format!(
            "kubectl create secret generic {name} -n {namespace} \
             --from-literal={key}=NEW_REFRESH_TOKEN --dry-run=client -o yaml | kubectl apply -f -",
            name = reference.name,
            key = reference.key
        ),
        _ => format!(
            "grant the client the needed access at the provider, then force a new token: \
             kubectl annotate srcconn {} -n {namespace} {ANNOTATION_FORCE_REFRESH}=\"$(date +%s)\" --overwrite",
            conn.name_any()
        ),
    };
    format!("{open_link}{command}")
}

fn humanize(duration: SignedDuration) -> String {
    let secs = duration.as_secs();
    if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn token(issued: i64) -> TokenRecord {
        TokenRecord {
            access_token: format!("at-{issued}"),
            token_type: "Bearer".into(),
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(issued + 3600).unwrap(),
            lifetime_assumed: false,
            scope: None,
            fields: BTreeMap::new(),
            request_hash: "h".into(),
            verification_denied: None,
        }
    }

    fn inputs(current: Option<i64>, grant: Option<&str>, consented: Option<i64>) -> Inputs {
        Inputs {
            client_id: "id".into(),
            client_secret: "secret".into(),
            user_refresh_token: None,
            target: None,
            stored_grant: None,
            grant: grant.map(|rt| SealedGrant {
                refresh_token: rt.into(),
                imported_hash: Some("imported".into()),
                ..Default::default()
            }),
            grant_problem: None,
            inbox: consented.map(|issued| {
                (
                    Arc::new(ReadSecret::default()),
                    GrantState {
                        refresh_token: Some("consented-rt".into()),
                        token: Some(token(issued)),
                        ..Default::default()
                    },
                )
            }),
            current: current.map(token),
        }
    }

    #[test]
    fn a_newer_consent_replaces_the_grant_and_keeps_the_import_fingerprint() {
        let mut fresh = inputs(Some(100), Some("old-rt"), Some(200));
        assert!(adopt_consented_grant(&mut fresh));
        let grant = fresh.grant.unwrap();
        assert_eq!(grant.refresh_token, "consented-rt");
        assert_eq!(grant.imported_hash.as_deref(), Some("imported"));
        assert_eq!(fresh.current.unwrap().issued_at.as_second(), 200);
    }

    #[test]
    fn an_older_consent_is_not_adopted() {
        let mut stale = inputs(Some(300), Some("current-rt"), Some(200));
        assert!(!adopt_consented_grant(&mut stale));
        assert_eq!(stale.grant.unwrap().refresh_token, "current-rt");
    }

    #[test]
    fn a_consent_is_adopted_when_there_is_no_grant_yet() {
        let mut first = inputs(None, None, Some(50));
        assert!(adopt_consented_grant(&mut first));
        let mut nothing = inputs(Some(10), Some("rt"), None);
        assert!(!adopt_consented_grant(&mut nothing));
    }
}
