//! The authorization-code flow through the operator (RFC 6749 section 4.1
//! with S256 PKCE, RFC 7636): `/authorize/{namespace}/{name}?ticket=…` sends
//! the person to the provider's consent page; `/callback` exchanges the code
//! and leaves the grant in the connection's state Secret, from which the
//! leader moves it, sealed, into the target Secret.
//!
//! Reaching the port is no authority. Starting needs the link's ticket: a
//! single-use, expiring secret that only the connection's status shows
//! (the leader mints it; its hash is in the state Secret), so only who may
//! read the connection can start a consent for it; without it nothing is
//! read beyond the connection or written, and the answer does not tell
//! whether the connection exists. The callback completes only in the
//! browser that started (an HttpOnly cookie whose hash is kept with the
//! pending request), so a code and state replayed or planted from
//! elsewhere store nothing. Both are rate-limited.
//!
//! The pending request (a hash of `state`, the PKCE verifier, its expiry
//! and the connection's UID) lives in the operator-private state Secret,
//! not in memory, so any replica behind the Service can answer the
//! callback. It is single-use: the write that stores the grant removes it,
//! with optimistic concurrency, so a replayed callback finds nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use jiff::SignedDuration;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::api::{OAuth2Auth, SourceConnection};
use crate::decide::classify::missing_scopes;
use crate::decide::preset::resolve;
use crate::decide::refresh::Limits;
use crate::decide::secrets::{check_source, check_state_ownership, client_credentials};
use crate::decide::validate::oauth_settings;
use crate::error::Error;
use crate::oauth::client::{self, CodeExchange};
use crate::oauth::seal::{Binding, SharedKeyring};
use crate::oauth::state_secret::{
    CallbackRefusal, GrantState, PendingAuthorization, check_callback, clear_pending,
    consented_grant, new_ticket, redirect_values, remove_ticket, ticket_valid,
};
use crate::oauth::token::{IssuedToken, TokenFailure};
use crate::runtime::throttle::EventBudget;
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
    /// Requests to these endpoints, which anyone who reaches the port can
    /// send, are limited to this budget.
    pub requests: Arc<EventBudget>,
    /// Seals the PKCE verifier and the consented grant.
    pub keyring: SharedKeyring,
}

/// What the PKCE verifier in the state Secret is sealed for.
const PKCE_PURPOSE: &str = "pkce-verifier";

/// Requests per second the authorization endpoints answer, after a burst.
pub const REQUESTS_PER_SECOND: f64 = 5.0;
pub const REQUEST_BURST: u32 = 20;

/// The cookie that ties a callback to the browser that started it.
const BROWSER_COOKIE: &str = "tokenkeeper_authorization";

/// Headers of every answer: nothing on these pages loads, runs, frames
/// them, is cached, or leaks the URL (which carries the code) onwards.
const SECURITY_HEADERS: [(HeaderName, &str); 5] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::CACHE_CONTROL, "no-store"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

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
         <body><h1>{title}</h1><p>{body}</p></body></html>",
        title = escape(title),
        body = escape(body)
    );
    (status, SECURITY_HEADERS, Html(html)).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[derive(Deserialize)]
struct StartQuery {
    ticket: Option<String>,
}

async fn start(
    State(flow): State<Flow>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<StartQuery>,
) -> Response {
    if !flow.requests.take(tokio::time::Instant::now()) {
        return too_many_requests();
    }
    let browser = new_ticket();
    let ticket = query.ticket.unwrap_or_default();
    match begin(&flow, &namespace, &name, &ticket, &browser).await {
        Ok(url) => {
            let secure = if flow.callback_url.starts_with("https://") {
                "; Secure"
            } else {
                ""
            };
            // Outlives the pending authorization, so that a late answer
            // is told it expired rather than that it came to another browser.
            let cookie = format!(
                "{BROWSER_COOKIE}={browser}; Path=/callback; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
                flow.state_ttl.as_secs().saturating_add(3600)
            );
            (
                StatusCode::FOUND,
                SECURITY_HEADERS,
                [(header::LOCATION, url), (header::SET_COOKIE, cookie)],
            )
                .into_response()
        }
        Err((status, message)) => page(status, "Cannot start the authorization", &message),
    }
}

fn too_many_requests() -> Response {
    page(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests",
        "tokenkeeper's authorization endpoints are busy. Try again in a minute.",
    )
}

type PageError = (StatusCode, String);

/// The one answer to a start without a valid link, whatever the reason: it
/// does not tell whether the connection exists.
fn link_not_valid() -> PageError {
    (
        StatusCode::FORBIDDEN,
        "This authorization link is not valid: it was used already, it expired, or tokenkeeper \
         did not give it out. Open the connection's current link, which kubectl describe \
         srcconn NAME -n NAMESPACE shows."
            .to_owned(),
    )
}

/// Checks the link's `ticket`, then starts the authorization for the
/// browser with cookie `browser`, using the ticket up in the same write.
async fn begin(
    flow: &Flow,
    namespace: &str,
    name: &str,
    ticket: &str,
    browser: &str,
) -> Result<String, PageError> {
    let conn = Api::<SourceConnection>::namespaced(flow.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(unavailable)?
        .ok_or_else(link_not_valid)?;
    let resolved = conn
        .spec
        .oauth2
        .as_ref()
        .and_then(|o| {
            resolve(o)
                .inspect_err(|e| debug!(%e, "an authorization link of a connection whose spec does not resolve"))
                .ok()
        })
        .filter(|r| r.oauth.authorization_url.is_some())
        .ok_or_else(link_not_valid)?;
    let oauth = &resolved.oauth;
    let secrets: Api<Secret> = Api::namespaced(flow.client.clone(), namespace);
    let existing = secrets
        .get_opt(&conn.state_secret_name())
        .await
        .map_err(unavailable)?;
    let mut data = existing
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default();
    let now = flow.clock.now();
    let owned = check_state_ownership(&conn, existing.as_ref()).is_ok();
    if ticket.is_empty() || !owned || !ticket_valid(&data, ticket, now, SignedDuration::ZERO) {
        debug!(connection = %format!("{namespace}/{name}"), owned, "an authorization link that is not valid");
        return Err(link_not_valid());
    }
    // The person holds the connection's link from here on.
    oauth_settings(oauth, &flow.limits).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let (client_id, _) = read_client_credentials(flow, &secrets, &conn, oauth).await?;
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
    let expires =
        now + SignedDuration::try_from(flow.state_ttl).unwrap_or(SignedDuration::from_mins(10));
    let uid = conn.uid().unwrap_or_default();
    remove_ticket(&mut data);
    let verifier = flow
        .keyring
        .current()
        .seal_text(PKCE_PURPOSE, &uid, &started.pkce_verifier);
    PendingAuthorization::new(&state, verifier, expires, uid, browser).store_in(&mut data);
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
    /// What else the provider sent (values of `redirectFields`).
    #[serde(flatten)]
    rest: BTreeMap<String, String>,
}

async fn callback(
    State(flow): State<Flow>,
    headers: HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Response {
    if !flow.requests.take(tokio::time::Instant::now()) {
        return too_many_requests();
    }
    let browser = browser_cookie(&headers);
    let mut response = match finish(&flow, query, browser.as_deref()).await {
        Ok((title, message)) => page(StatusCode::OK, &title, &message),
        Err((status, message)) => page(status, "Authorization failed", &message),
    };
    if browser.is_some() {
        let expired =
            format!("{BROWSER_COOKIE}=; Path=/callback; HttpOnly; SameSite=Lax; Max-Age=0");
        if let Ok(value) = expired.parse() {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
    }
    response
}

/// The value of the browser cookie the request carries.
fn browser_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == BROWSER_COOKIE && !value.is_empty()).then(|| value.to_owned())
        })
}

/// Completes the authorization the callback answers: checks it against the
/// pending one, exchanges the code, and stores the grant for the leader.
async fn finish(
    flow: &Flow,
    query: CallbackQuery,
    browser: Option<&str>,
) -> Result<(String, String), PageError> {
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
        .ok_or_else(nothing_pending)?;
    let resolved = conn
        .spec
        .oauth2
        .as_ref()
        .and_then(|o| resolve(o).ok())
        .ok_or_else(nothing_pending)?;
    let oauth = &resolved.oauth;
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
    let uid = conn.uid();
    let pending = match check_callback(&data, state, uid.as_deref(), browser, flow.clock.now()) {
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
    let uid = uid.unwrap_or_default();
    let (issued, client_id) = exchange(flow, &secrets, &conn, oauth, code, &pending.pkce_verifier)
        .await?
        .map_err(|failure| {
            warn!(connection = %format!("{namespace}/{name}"), ?failure, "code exchange failed");
            not_exchanged(&failure)
        })?;
    let Some(refresh_token) = issued.refresh_token.clone() else {
        write_state(&secrets, &conn, existing.as_ref(), cleared).await?;
        return Err(no_refresh_token());
    };
    let now = flow.clock.now();
    let mut consented =
        consented_grant(oauth, &flow.limits, &issued, refresh_token, &client_id, now)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    consented.redirect_values = redirect_values(&oauth.redirect_fields, &query.rest);
    let binding = Binding::new(&uid, oauth, &client_id);
    // The leader takes the grant from there into the target Secret moments
    // later: this replica may be a follower, and only the leader writes grants.
    let data = consented.to_data(|grant| flow.keyring.current().seal(grant, &binding));
    let answer = Answer { state, browser };
    store_consent(flow, &secrets, &conn, existing, data, answer).await?;
    info!(connection = %format!("{namespace}/{name}"), "authorized through the consent page");
    Ok(connected_page(&conn, oauth, consented))
}

/// What identifies the provider's answer a callback completes.
struct Answer<'a> {
    state: &'a str,
    browser: Option<&'a str>,
}

/// Stores a consent in the state Secret read as `existing`. Single use:
/// the write carries the version read, so a callback replayed meanwhile
/// finds nothing pending. A write that lost only to another change of the
/// state Secret (the leader renewing the link's ticket) is made again,
/// while the same authorization is still pending: the code is spent, and
/// the grant exists nowhere else.
async fn store_consent(
    flow: &Flow,
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    mut existing: Option<Secret>,
    data: BTreeMap<String, ByteString>,
    answer: Answer<'_>,
) -> Result<(), PageError> {
    let uid = conn.uid();
    for _ in 0..STORE_ATTEMPTS {
        match write_state(secrets, conn, existing.as_ref(), data.clone()).await {
            Err((StatusCode::CONFLICT, message)) => {
                existing = secrets
                    .get_opt(&conn.state_secret_name())
                    .await
                    .map_err(unavailable)?;
                let fresh = existing
                    .as_ref()
                    .and_then(|s| s.data.clone())
                    .unwrap_or_default();
                let now = flow.clock.now();
                if check_callback(&fresh, answer.state, uid.as_deref(), answer.browser, now)
                    .is_err()
                {
                    return Err((StatusCode::CONFLICT, message));
                }
            }
            other => return other,
        }
    }
    Err(unavailable(kube::Error::Service(
        "the state Secret kept changing".into(),
    )))
}

/// Writes of a consent that lost a race with another change.
const STORE_ATTEMPTS: usize = 3;

/// Exchanges the authorization code with the client's credentials and the
/// PKCE verifier sealed for `conn`; the tokens issued, and the client id
/// they were issued to.
async fn exchange(
    flow: &Flow,
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    code: &str,
    sealed_verifier: &str,
) -> Result<Result<(IssuedToken, String), TokenFailure>, PageError> {
    let uid = conn.uid().unwrap_or_default();
    let pkce_verifier = &flow
        .keyring
        .current()
        .open_text(PKCE_PURPOSE, &uid, sealed_verifier)
        .ok_or_else(|| refused("The authorization this answers cannot be read back."))?;
    let (client_id, client_secret) = read_client_credentials(flow, secrets, conn, oauth).await?;
    let exchange = CodeExchange {
        token_url: &oauth.token_url,
        client_id: &client_id,
        client_secret: &client_secret,
        auth_method: oauth.client.auth_method.unwrap_or_default(),
        redirect_url: &flow.callback_url,
        code,
        pkce_verifier,
    };
    let issued = client::exchange_code(&flow.http, exchange).await;
    Ok(issued.map(|issued| (issued, client_id)))
}

/// The answer for a connection that is gone or no longer OAuth 2.0: the
/// same as for one with nothing pending, so that it tells nobody which
/// connections exist.
fn nothing_pending() -> PageError {
    refused(&CallbackRefusal::NothingPending.to_string())
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
    flow: &Flow,
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
) -> Result<(String, String), PageError> {
    let secret = secrets
        .get_opt(&oauth.client.secret_ref.name)
        .await
        .map_err(unavailable)?;
    let namespace = secrets.namespace().unwrap_or_default();
    let conflict = |e: Error| (StatusCode::CONFLICT, e.to_string());
    if let Some(secret) = &secret {
        let required = flow.limits.require_source_label;
        check_source(conn, secret, "oauth2.client.secretRef", required).map_err(conflict)?;
    }
    client_credentials(oauth, namespace, secret.as_ref()).map_err(conflict)
}

async fn write_state(
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    existing: Option<&Secret>,
    data: BTreeMap<String, ByteString>,
) -> Result<(), PageError> {
    match store_state_secret(secrets, conn, existing, data).await {
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
        TokenFailure::Transport { detail } | TokenFailure::Denied { detail } => detail.clone(),
        TokenFailure::Malformed { what, .. } => what.clone(),
    }
}
