//! Which grant an OAuth 2.0 connection continues with, and whether to ask
//! the token endpoint now. Pure: takes what the reconcile read.

use std::sync::Arc;

use jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{ANNOTATION_FORCE_REFRESH, OAuth2Auth, OAuth2Grant, SourceConnection};
use crate::decide::refresh::{Plan, PlanInput, RefreshReason, plan};
use crate::decide::status::{TokenStatus, display_name};
use crate::decide::validate::OAuthSettings;
use crate::error::Error;
use crate::oauth::seal::{OpenError, SealedGrant};
use crate::oauth::state_secret::GrantState;
use crate::oauth::token::{IssuedToken, TokenRecord, fingerprint, request_fingerprint};
use crate::runtime::wire::ReadSecret;

/// What an OAuth 2.0 reconcile read.
pub struct OAuthInputs {
    pub client_id: String,
    pub client_secret: String,
    /// The user-supplied refresh token (refreshToken grant).
    pub user_refresh_token: Option<String>,
    pub target: Option<Arc<ReadSecret>>,
    /// The grant to continue with: the one sealed in the target Secret,
    /// or a consent adopted over it.
    pub grant: Option<SealedGrant>,
    /// The grant as the target Secret in the cluster holds it; an equal
    /// grant keeps that seal.
    pub stored_grant: Option<SealedGrant>,
    /// Why the target Secret's sealed grant could not be used.
    pub grant_problem: Option<OpenError>,
    /// The state Secret, when it holds a grant given on the consent page
    /// or by `kubectl tokenkeeper authorize` that is not adopted yet.
    pub inbox: Option<(Arc<ReadSecret>, GrantState)>,
    /// The newest token: the target Secret's, or the consented one.
    pub current: Option<TokenRecord>,
}

/// Takes a consented grant waiting in the state Secret as the current one
/// when it is newer than the target Secret's. Says whether it did.
pub fn adopt_consented_grant(inputs: &mut OAuthInputs) -> bool {
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

/// What the reconcile knows of the connection's token request, whatever
/// it does about it.
pub struct RefreshDecision {
    /// Fingerprint of the token request settings.
    pub request_hash: String,
    /// The status's token fields going in (with the authorization link and,
    /// when a request is made, the force-refresh value it handles).
    pub token_status: TokenStatus,
    /// Spreads this connection's refreshes and retries.
    pub jitter_key: String,
}

/// What the reconcile does about the token endpoint.
pub enum Action {
    /// No refresh token to go on with: a person must authorize.
    AuthorizationRequired(Error),
    /// A transient failure backs off until then.
    RetryAt(Timestamp),
    /// `token` stays valid until it is due.
    Wait { token: TokenRecord, due: Timestamp },
    /// Ask the token endpoint now.
    Request(TokenAsk),
}

/// A token request to make.
pub struct TokenAsk {
    pub reason: RefreshReason,
    /// `None` for the client-credentials grant.
    pub refresh_token: Option<String>,
    /// Fingerprint of the user-supplied refresh token the grant comes from.
    pub import_hash: Option<String>,
    /// When the refresh token used is known to expire.
    pub refresh_token_expires_at: Option<Timestamp>,
}

/// Decides whether to request a token now, and with which refresh token: a
/// new one from the user wins over the grant tokenkeeper keeps.
pub fn decide_refresh(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    settings: &OAuthSettings,
    inputs: &OAuthInputs,
    authorization_link: Option<String>,
    now: Timestamp,
) -> (RefreshDecision, Action) {
    let request_hash = request_fingerprint(oauth, &inputs.client_id);
    let user_hash = inputs
        .user_refresh_token
        .as_deref()
        .map(|t| fingerprint(&[t]));
    let imported_hash = inputs.grant.as_ref().and_then(|g| g.imported_hash.clone());
    let new_user_refresh_token = user_hash.is_some() && user_hash != imported_hash;
    let mut token_status = TokenStatus {
        authorization_url: authorization_link.clone(),
        ..TokenStatus::current(conn)
    };
    let jitter_key = conn.uid().unwrap_or_else(|| display_name(conn));
    let refresh_token = match oauth.grant {
        OAuth2Grant::ClientCredentials => None,
        _ if new_user_refresh_token => inputs.user_refresh_token.clone(),
        _ => inputs
            .grant
            .as_ref()
            .map(|g| g.refresh_token.clone())
            .or_else(|| inputs.user_refresh_token.clone()),
    };
    let decision = |token_status, action| {
        let decision = RefreshDecision {
            request_hash: request_hash.clone(),
            token_status,
            jitter_key: jitter_key.clone(),
        };
        (decision, action)
    };
    if oauth.grant != OAuth2Grant::ClientCredentials && refresh_token.is_none() {
        let error = Error::AuthorizationRequired {
            url: authorization_link.unwrap_or_else(|| {
                "the operator's authorization endpoint (start tokenkeeper with --external-url)"
                    .into()
            }),
            namespace: conn.namespace().unwrap_or_default(),
            name: conn.name_any(),
        };
        return decision(token_status, Action::AuthorizationRequired(error));
    }
    let force_value = conn.annotations().get(ANNOTATION_FORCE_REFRESH).cloned();
    let plan = plan(&PlanInput {
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
    let reason = match (plan, &inputs.current) {
        (Plan::RetryAt { until }, _) => return decision(token_status, Action::RetryAt(until)),
        (Plan::Wait { until }, Some(token)) => {
            let token = token.clone();
            return decision(token_status, Action::Wait { token, due: until });
        }
        (Plan::Refresh(reason), _) => reason,
        // `plan` waits only for a token it has.
        (Plan::Wait { .. }, None) => RefreshReason::FirstToken,
    };
    // A forced refresh is done once per annotation value, whatever its
    // result: otherwise a failing one would skip the backoff forever.
    token_status.force_refresh_handled = force_value.or(token_status.force_refresh_handled);
    let ask = TokenAsk {
        reason,
        refresh_token,
        import_hash: if new_user_refresh_token {
            user_hash
        } else {
            imported_hash
        },
        refresh_token_expires_at: inputs
            .grant
            .as_ref()
            .and_then(|g| g.refresh_token_expires_at)
            .filter(|_| !new_user_refresh_token),
    };
    decision(token_status, Action::Request(ask))
}

/// The grant after a successful refresh: a refresh token the provider did
/// not rotate stays, and so does its known expiry.
pub fn next_grant(
    previous: Option<&SealedGrant>,
    issued: &IssuedToken,
    used: String,
    import_hash: Option<String>,
    issued_at: Timestamp,
) -> SealedGrant {
    let rotated = issued.refresh_token.is_some();
    SealedGrant {
        refresh_token: issued.refresh_token.clone().unwrap_or(used),
        refresh_token_expires_at: match issued.refresh_token_expires_at(issued_at) {
            Some(at) => Some(at),
            None if rotated => None,
            None => previous.and_then(|p| p.refresh_token_expires_at),
        },
        imported_hash: import_hash,
    }
}
