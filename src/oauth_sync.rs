//! Reconciling one OAuth 2.0 connection: read the client, the grant's
//! state and the target Secret; decide with `schedule::plan`; request a
//! token when due; persist the refresh token and the access token in one
//! write of the state Secret, then the target Secret; report.
//!
//! One refresh per connection runs at a time: the controller runtime never
//! reconciles the same object concurrently.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use crate::api::{ANNOTATION_FORCE_REFRESH, OAuth2Auth, OAuth2Grant, SourceConnection};
use crate::classify::{self, FailureContext};
use crate::controller::{Context, Note, Synced, write_target};
use crate::decide::{self, OAuthSettings};
use crate::error::{Error, Retry, backoff};
use crate::schedule::{self, Plan, PlanInput, RefreshReason};
use crate::status::{self, Report, TokenStatus, Verdict, display_name};
use crate::token::{GrantState, TokenRecord, fingerprint, rfc3339};
use crate::token_client::{self, Grant, IssuedToken, TokenRequest};

/// How often a write of a freshly rotated refresh token is retried before
/// giving up: losing it would lose the grant.
const STATE_WRITE_ATTEMPTS: u32 = 5;

struct Inputs {
    client_id: String,
    client_secret: String,
    /// The user-supplied refresh token (refreshToken grant).
    user_refresh_token: Option<String>,
    state_secret: Option<Secret>,
    state: GrantState,
    target: Option<Secret>,
    /// The newest token known: from the state (refresh-token grants) or
    /// the target Secret (client credentials).
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
    let inputs = read_inputs(conn, oauth, &secrets).await?;

    let request_hash = request_fingerprint(oauth, &inputs.client_id);
    let user_hash = inputs
        .user_refresh_token
        .as_deref()
        .map(|t| fingerprint(&[t]));
    let new_user_refresh_token = user_hash.is_some() && user_hash != inputs.state.imported_hash;
    let authorization_link = ctx.authorization_link(conn, oauth);
    let token_status = TokenStatus {
        authorization_url: authorization_link.clone(),
        ..TokenStatus::current(conn)
    };
    if oauth.grant == OAuth2Grant::AuthorizationCode
        && inputs.current.is_none()
        && inputs.state.refresh_token.is_none()
    {
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
            action: Action::await_change(),
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

    // Without a request, the target must still hold the newest token: a
    // restart between the state write and the target write leaves it behind.
    let reason = match plan {
        Plan::Refresh(reason) => reason,
        Plan::RetryAt { until } => {
            if let Some(current) = &inputs.current {
                write_target(conn, &secrets, inputs.target.clone(), current).await?;
            }
            return Ok(Synced {
                report: Report {
                    verdict: None,
                    secret_name: None,
                    token: None,
                },
                action: Action::requeue(schedule::delay_until(now, until)),
                notes: Vec::new(),
            });
        }
        Plan::Wait { .. } => {
            let current = inputs
                .current
                .as_ref()
                .expect("the plan waits only while a token exists");
            let current =
                &with_verification_of(current, inputs.target.as_ref(), &oauth.response_fields);
            write_target(conn, &secrets, inputs.target.clone(), current).await?;
            return Ok(healthy(
                conn,
                oauth,
                &settings,
                current,
                token_status,
                now,
                Vec::new(),
                &jitter_key,
            ));
        }
    };

    // Which refresh token to use: a new one from the user wins over ours.
    let refresh_token = match oauth.grant {
        OAuth2Grant::ClientCredentials => None,
        _ if new_user_refresh_token => inputs.user_refresh_token.clone(),
        _ => inputs
            .state
            .refresh_token
            .clone()
            .or_else(|| inputs.user_refresh_token.clone()),
    };
    let imported_hash = if new_user_refresh_token {
        user_hash.clone()
    } else {
        inputs.state.imported_hash.clone()
    };
    info!(connection = %display_name(conn), ?reason, "requesting a token");
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
    let response = token_client::request_token(&ctx.http, request).await;
    let failure_context = FailureContext {
        now,
        token_endpoint: &oauth.token_url,
        refresh_token_expires_at: inputs
            .state
            .refresh_token_expires_at
            .filter(|_| !new_user_refresh_token),
        reauthorize_fix: &reauthorize_fix(conn, oauth),
        client_secret_namespace: &namespace,
        client_secret_name: &oauth.client.secret_ref.name,
    };
    let response = response.map_err(|failure| classify::classify(&failure, &failure_context));
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
            let mut notes = Vec::new();
            // The rotated refresh token is stored first, before anything else
            // that could fail or take time.
            if refresh_token.is_some() {
                let state = next_state(
                    &inputs.state,
                    &issued,
                    refresh_token,
                    imported_hash,
                    &record,
                );
                persist_state(conn, &secrets, inputs.state_secret.clone(), &state).await?;
            }
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
            write_target(conn, &secrets, inputs.target.clone(), &record).await?;
            if let Some(error) = rejected {
                return Ok(failed(
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
                conn,
                oauth,
                &settings,
                &record,
                token_status,
                now,
                notes,
                &jitter_key,
            ))
        }
        Err(error) => {
            if matches!(
                error,
                Error::InvalidGrant { .. } | Error::RefreshTokenExpired { .. }
            ) && refresh_token.is_some()
            {
                // A sibling refresh may have rotated the token under us:
                // then ours is merely stale, not revoked.
                let fresh = secrets.get_opt(&conn.state_secret_name()).await?;
                let fresh_state = fresh
                    .and_then(|s| s.data)
                    .map(|d| GrantState::from_data(&d, &oauth.response_fields))
                    .unwrap_or_default();
                if fresh_state.refresh_token.is_some() && fresh_state.refresh_token != refresh_token
                {
                    info!(connection = %display_name(conn), "refresh token was rotated meanwhile; retrying with the new one");
                    return Ok(Synced {
                        report: Report {
                            verdict: None,
                            secret_name: None,
                            token: None,
                        },
                        action: Action::requeue(Duration::from_millis(100)),
                        notes: Vec::new(),
                    });
                }
            }
            Ok(failed(
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

/// The verification result belongs to one access token and is kept on the
/// target Secret; a state copy of the same token takes it from there.
fn with_verification_of(
    current: &TokenRecord,
    target: Option<&Secret>,
    fields: &[String],
) -> TokenRecord {
    let in_target =
        target.and_then(|t| TokenRecord::from_target(t.data.as_ref()?, t.annotations(), fields));
    match in_target {
        Some(copy) if copy.access_token == current.access_token => TokenRecord {
            verification_denied: copy.verification_denied,
            ..current.clone()
        },
        _ => current.clone(),
    }
}

async fn read_inputs(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    secrets: &Api<Secret>,
) -> Result<Inputs, Error> {
    let namespace = conn.namespace().unwrap_or_default();
    let client_ref = &oauth.client.secret_ref;
    let example = decide::example_literals(decide::Method::OAuth2(oauth));
    let client = read_secret(
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

    let target = secrets.get_opt(&conn.target_secret_name()).await?;
    decide::check_ownership(conn, target.as_ref())?;
    let (state_secret, state) = if oauth.grant == OAuth2Grant::ClientCredentials {
        (None, GrantState::default())
    } else {
        // Read fresh from the API, never from a cache: the refresh token in
        // it may have been rotated a moment ago.
        let secret = secrets.get_opt(&conn.state_secret_name()).await?;
        decide::check_state_ownership(conn, secret.as_ref())?;
        let state = secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .map(|d| GrantState::from_data(d, &oauth.response_fields))
            .unwrap_or_default();
        (secret, state)
    };
    let current = match oauth.grant {
        OAuth2Grant::ClientCredentials => target.as_ref().and_then(|t| {
            TokenRecord::from_target(t.data.as_ref()?, t.annotations(), &oauth.response_fields)
        }),
        _ => state.token.clone(),
    };
    Ok(Inputs {
        client_id,
        client_secret,
        user_refresh_token,
        state_secret,
        state,
        target,
        current,
    })
}

async fn read_secret(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    field: &'static str,
    example_literals: String,
) -> Result<Secret, Error> {
    secrets
        .get_opt(name)
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

/// The state after a successful token request: a refresh token the
/// provider did not rotate stays.
fn next_state(
    previous: &GrantState,
    issued: &IssuedToken,
    used: Option<String>,
    imported_hash: Option<String>,
    record: &TokenRecord,
) -> GrantState {
    let rotated = issued.refresh_token.is_some();
    GrantState {
        refresh_token: issued.refresh_token.clone().or(used),
        refresh_token_expires_at: match issued.refresh_token_expires_at(record.issued_at) {
            Some(at) => Some(at),
            None if rotated => None,
            None => previous.refresh_token_expires_at,
        },
        imported_hash,
        token: Some(record.clone()),
    }
}

/// Writes the state Secret with optimistic concurrency. A conflict means
/// another writer touched it; the token just obtained is the newest, so it
/// is written again on top of the fresh version.
async fn persist_state(
    conn: &SourceConnection,
    secrets: &Api<Secret>,
    existing: Option<Secret>,
    state: &GrantState,
) -> Result<(), Error> {
    let mut resource_version = existing.and_then(|s| s.resource_version());
    let mut last_error = None;
    for attempt in 1..=STATE_WRITE_ATTEMPTS {
        let result =
            store_state_secret(secrets, conn, resource_version.clone(), state.to_data()).await;
        match result {
            Ok(()) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                resource_version = secrets
                    .get_opt(&conn.state_secret_name())
                    .await?
                    .and_then(|s| s.resource_version());
            }
            Err(error) => {
                warn!(connection = %display_name(conn), attempt, %error, "could not persist the refresh token; retrying");
                last_error = Some(error);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    }
    Err(last_error.map_or_else(
        || Error::Kube("state Secret kept conflicting".into()),
        Error::from,
    ))
}

/// Creates the state Secret, or replaces the version `resource_version`
/// names: a write that lost a race fails with 409 instead of overwriting.
pub async fn store_state_secret(
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    resource_version: Option<String>,
    data: std::collections::BTreeMap<String, k8s_openapi::ByteString>,
) -> Result<(), kube::Error> {
    let mut desired = decide::state_secret(conn, data);
    match resource_version {
        None => secrets.create(&PostParams::default(), &desired).await?,
        Some(version) => {
            desired.metadata.resource_version = Some(version);
            secrets
                .replace(&desired.name_any(), &PostParams::default(), &desired)
                .await?
        }
    };
    Ok(())
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

/// The report of a connection whose token is current.
#[allow(clippy::too_many_arguments)]
fn healthy(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    settings: &OAuthSettings,
    record: &TokenRecord,
    token_status: TokenStatus,
    now: Timestamp,
    notes: Vec<Note>,
    jitter_key: &str,
) -> Synced {
    let due = schedule::refresh_due_at(record, settings.refresh_before, jitter_key);
    let target = conn.target_secret_name();
    let mut message = format!(
        "Secret {target} holds an access token valid until {}; next refresh at {}.",
        rfc3339(record.expires_at),
        rfc3339(due)
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
                token_expires_at: Some(record.expires_at),
                last_refresh_time: Some(record.issued_at),
                next_refresh_time: Some(due),
                granted_scopes: granted,
                failed_refresh_attempts: 0,
                last_failure_time: token_status.last_failure_time,
                force_refresh_handled: token_status.force_refresh_handled,
                authorization_url: token_status.authorization_url,
            }),
        },
        action: Action::requeue(schedule::delay_until(now, due)),
        notes,
    }
}

/// The report after a failed token request.
fn failed(
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
        action: match retry_at {
            Some(at) => Action::requeue(schedule::delay_until(now, at)),
            None => Action::await_change(),
        },
        notes: vec![Note {
            type_: EventType::Warning,
            reason: error.reason().into(),
            message: error.to_string(),
        }],
    }
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
