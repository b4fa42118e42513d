//! The authorization-code flow through the operator (RFC 6749 section 4.1
//! with S256 PKCE, RFC 7636): `/authorize/{namespace}/{name}` sends the
//! person to the provider's consent page; `/callback` exchanges the code
//! and leaves the grant in the connection's state Secret, from which the
//! leader moves it, sealed, into the target Secret.
//!
//! The pending request (a hash of `state`, the PKCE verifier, its expiry
//! and the connection's UID) lives in the operator-private state Secret,
//! not in memory, so any replica behind the Service can answer the
//! callback. It is single-use: the write that stores the grant removes it,
//! with optimistic concurrency, so a replayed callback finds nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use jiff::SignedDuration;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde::Deserialize;
use tracing::{info, warn};

use crate::api::{OAuth2Auth, SourceConnection};
use crate::decide::classify::missing_scopes;
use crate::decide::refresh::Limits;
use crate::decide::secrets::{check_state_ownership, client_credentials};
use crate::oauth::client::{self, CodeExchange};
use crate::oauth::state_secret::{
    CallbackRefusal, GrantState, PendingAuthorization, check_callback, clear_pending,
    consented_grant,
};
use crate::oauth::token::{IssuedToken, TokenFailure};
use crate::time::Clock;
use crate::write::secret::store_state_secret;

/// What the authorization endpoints need: the API, the token endpoints'
/// HTTP client, and where the provider sends people back.
#[derive(Clone)]
pub struct Flow {
    pub client: Client,
    pub http: reqwest::Client,
    /// The redirect URI registered at the provider.
    pub callback_url: String,
    /// How long a started authorization may take.
    pub state_ttl: Duration,
    pub clock: Clock,
    /// The operator's bounds on token lifetimes.
    pub limits: Limits,
}

pub fn router(flow: Flow) -> Router {
    Router::new()
        .route("/authorize/{namespace}/{name}", get(start))
        .route("/callback", get(callback))
        .with_state(flow)
}

/// The page a person sees, in plain words.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\
         <h1>{title}</h1><p>{body}</p></body></html>",
        title = escape(title),
        body = escape(body)
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn start(
    State(flow): State<Flow>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    match begin(&flow, &namespace, &name).await {
        Ok(url) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, url),
                (header::CACHE_CONTROL, "no-store".into()),
            ],
        )
            .into_response(),
        Err((status, message)) => page(status, "Cannot start the authorization", &message),
    }
}

type PageError = (StatusCode, String);

async fn begin(flow: &Flow, namespace: &str, name: &str) -> Result<String, PageError> {
    let conn = Api::<SourceConnection>::namespaced(flow.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("There is no SourceConnection {namespace}/{name}."),
            )
        })?;
    let oauth = conn.spec.oauth2.as_ref().filter(|o| o.authorization_url.is_some()).ok_or_else(|| {
        (
            StatusCode::BAD_REQUEST,
            format!("SourceConnection {namespace}/{name} has no spec.oauth2.authorizationUrl to authorize with."),
        )
    })?;
    let secrets: Api<Secret> = Api::namespaced(flow.client.clone(), namespace);
    let (client_id, _) = read_client_credentials(&secrets, oauth).await?;
    // state carries the connection it is for; the random part makes it
    // unguessable, and only its hash is stored.
    let random = oauth2::CsrfToken::new_random_len(32);
    let state = format!("{namespace}:{name}:{}", random.secret());
    let started = client::authorization_start(
        oauth.authorization_url.as_deref().unwrap_or_default(),
        &client_id,
        &flow.callback_url,
        &oauth.scopes,
        &oauth.authorization_params,
        &state,
    )
    .map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("spec.oauth2.authorizationUrl is not usable: {e}"),
        )
    })?;

    let expires = flow.clock.now()
        + SignedDuration::try_from(flow.state_ttl).unwrap_or(SignedDuration::from_mins(10));
    let existing = secrets
        .get_opt(&conn.state_secret_name())
        .await
        .map_err(unavailable)?;
    check_state_ownership(&conn, existing.as_ref())
        .map_err(|e| (StatusCode::CONFLICT, e.to_string()))?;
    let mut data = existing
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default();
    let uid = conn.uid().unwrap_or_default();
    PendingAuthorization::new(&state, started.pkce_verifier, expires, uid).store_in(&mut data);
    write_state(&secrets, &conn, existing.as_ref(), data).await?;
    info!(connection = %format!("{namespace}/{name}"), "authorization started");
    Ok(started.url)
}

#[derive(Deserialize)]
struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(State(flow): State<Flow>, Query(query): Query<CallbackQuery>) -> Response {
    match finish(&flow, query).await {
        Ok((title, message)) => page(StatusCode::OK, &title, &message),
        Err((status, message)) => page(status, "Authorization failed", &message),
    }
}

/// Completes the authorization the callback answers: checks it against the
/// pending one, exchanges the code, and stores the grant for the leader.
async fn finish(flow: &Flow, query: CallbackQuery) -> Result<(String, String), PageError> {
    let state = query.state.as_deref().unwrap_or_default();
    let mut parts = state.splitn(3, ':');
    let (Some(namespace), Some(name), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refused(
            "This answer does not belong to an authorization tokenkeeper started.",
        ));
    };
    let conn = Api::<SourceConnection>::namespaced(flow.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| refused("The SourceConnection of this authorization no longer exists."))?;
    let oauth = conn.spec.oauth2.as_ref().ok_or_else(|| {
        refused("The SourceConnection of this authorization is no longer an OAuth 2.0 connection.")
    })?;
    let secrets: Api<Secret> = Api::namespaced(flow.client.clone(), namespace);
    let existing = secrets
        .get_opt(&conn.state_secret_name())
        .await
        .map_err(unavailable)?;
    let data = existing
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default();
    let mut cleared = data.clone();
    clear_pending(&mut cleared);
    let pending = match check_callback(&data, state, conn.uid().as_deref(), flow.clock.now()) {
        Ok(pending) => pending,
        Err(refusal) => {
            if refusal == CallbackRefusal::Expired {
                write_state(&secrets, &conn, existing.as_ref(), cleared).await?;
            }
            return Err(refused(&refusal.to_string()));
        }
    };
    if let Some(error) = &query.error {
        write_state(&secrets, &conn, existing.as_ref(), cleared).await?;
        return Err(provider_refused(error, query.error_description.as_deref()));
    }
    let code = query
        .code
        .as_deref()
        .ok_or_else(|| refused("The provider's answer has no code."))?;
    let (issued, client_id) = exchange(flow, &secrets, oauth, code, &pending.pkce_verifier)
        .await?
        .map_err(|failure| {
            warn!(connection = %format!("{namespace}/{name}"), ?failure, "code exchange failed");
            not_exchanged(&failure)
        })?;
    let Some(refresh_token) = issued.refresh_token.clone() else {
        write_state(&secrets, &conn, existing.as_ref(), cleared).await?;
        return Err(no_refresh_token());
    };
    let previous = GrantState::from_data(&data, &oauth.response_fields);
    let now = flow.clock.now();
    let consented = consented_grant(
        oauth,
        &flow.limits,
        &issued,
        refresh_token,
        &client_id,
        previous,
        now,
    )
    .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    // Single use: this write fails if another callback or writer got there
    // first, because it carries the version read above. The leader takes
    // the grant from there into the target Secret, sealed, moments later:
    // this replica may be a follower, and only the leader writes grants.
    write_state(&secrets, &conn, existing.as_ref(), consented.to_data()).await?;
    info!(connection = %format!("{namespace}/{name}"), "authorized through the consent page");
    Ok(connected_page(&conn, oauth, consented))
}

/// Exchanges the authorization code with the client's credentials; the
/// tokens issued, and the client id they were issued to.
async fn exchange(
    flow: &Flow,
    secrets: &Api<Secret>,
    oauth: &OAuth2Auth,
    code: &str,
    pkce_verifier: &str,
) -> Result<Result<(IssuedToken, String), TokenFailure>, PageError> {
    let (client_id, client_secret) = read_client_credentials(secrets, oauth).await?;
    let exchange = CodeExchange {
        token_url: &oauth.token_url,
        client_id: &client_id,
        client_secret: &client_secret,
        auth_method: oauth.client.auth_method,
        redirect_url: &flow.callback_url,
        code,
        pkce_verifier,
    };
    let issued = client::exchange_code(&flow.http, exchange).await;
    Ok(issued.map(|issued| (issued, client_id)))
}

/// A callback that cannot complete anything: nothing was changed.
fn refused(why: &str) -> PageError {
    (
        StatusCode::BAD_REQUEST,
        format!(
            "{why} Nothing was changed. Start again from the link in the connection's status \
             (kubectl describe srcconn NAME)."
        ),
    )
}

/// The person or the provider declined on the consent page.
fn provider_refused(error: &str, description: Option<&str>) -> PageError {
    let said = description.map(|d| format!(" ({d})")).unwrap_or_default();
    let what = if error == "access_denied" {
        "Access was not granted on the provider's page".to_owned()
    } else {
        format!("The provider answered {error}")
    };
    (
        StatusCode::BAD_REQUEST,
        format!(
            "{what}{said}. Nothing was stored. To try again, open the link in the connection's status."
        ),
    )
}

fn not_exchanged(failure: &TokenFailure) -> PageError {
    (
        StatusCode::BAD_GATEWAY,
        format!(
            "The provider did not exchange the authorization code for tokens ({}). Nothing was \
             stored. Start again from the link in the connection's status.",
            describe(failure)
        ),
    )
}

fn no_refresh_token() -> PageError {
    (
        StatusCode::BAD_GATEWAY,
        "The provider granted access but sent no refresh token, so tokenkeeper could not keep \
         the connection authorized. Ask for offline access (for example \
         spec.oauth2.authorizationParams access_type: offline, or the offline_access scope) \
         and authorize again."
            .to_owned(),
    )
}

/// The page after a stored consent: whether the grant has every scope the
/// connection requires.
fn connected_page(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    consented: GrantState,
) -> (String, String) {
    let (namespace, name) = (conn.namespace().unwrap_or_default(), conn.name_any());
    let record = consented.token;
    let said = record.as_ref().is_some_and(|r| r.scope.is_some());
    let granted = record.map(|r| r.granted_scopes()).unwrap_or_default();
    let missing = missing_scopes(&oauth.required_scopes, said.then_some(&granted[..]));
    if missing.is_empty() {
        return (
            "Connected".to_owned(),
            format!(
                "SourceConnection {namespace}/{name} is authorized. tokenkeeper keeps a fresh \
                 access token in Secret {} from now on. You can close this window.",
                conn.target_secret_name()
            ),
        );
    }
    (
        "Connected, but without every permission".to_owned(),
        format!(
            "SourceConnection {namespace}/{name} is authorized, but the grant lacks {} (granted: \
             {}). Extraction that needs them will fail: authorize again and allow them.",
            missing.join(", "),
            if granted.is_empty() {
                "none".to_owned()
            } else {
                granted.join(" ")
            }
        ),
    )
}

async fn read_client_credentials(
    secrets: &Api<Secret>,
    oauth: &OAuth2Auth,
) -> Result<(String, String), PageError> {
    let secret = secrets
        .get_opt(&oauth.client.secret_ref.name)
        .await
        .map_err(unavailable)?;
    let namespace = secrets.namespace().unwrap_or_default();
    client_credentials(oauth, namespace, secret.as_ref())
        .map_err(|e| (StatusCode::CONFLICT, e.to_string()))
}

async fn write_state(
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    existing: Option<&Secret>,
    data: BTreeMap<String, ByteString>,
) -> Result<(), PageError> {
    let version = existing.and_then(|s| s.resource_version());
    match store_state_secret(secrets, conn, version, data).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Err((
            StatusCode::CONFLICT,
            "This authorization was completed or changed by another request meanwhile. Nothing \
             more was changed; check the connection with kubectl describe srcconn."
                .to_owned(),
        )),
        Err(error) => Err(unavailable(error)),
    }
}

fn unavailable(error: kube::Error) -> PageError {
    warn!(%error, "Kubernetes API request failed during authorization");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "tokenkeeper could not reach the Kubernetes API. Try again in a moment.".to_owned(),
    )
}

fn describe(failure: &TokenFailure) -> String {
    match failure {
        TokenFailure::OAuth {
            code, description, ..
        } => match description {
            Some(d) => format!("{code}: {d}"),
            None => code.clone(),
        },
        TokenFailure::Http { status, .. } => format!("HTTP {status}"),
        TokenFailure::Transport { detail } => detail.clone(),
        TokenFailure::Malformed { what, .. } => what.clone(),
    }
}
