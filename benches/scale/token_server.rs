//! A small, fast OAuth 2.0 token endpoint for the scale benchmark. It does
//! real refresh-token rotation: every refresh returns a new refresh token
//! and retires the old one; presenting a retired one is rejected with
//! `invalid_grant` and revokes the whole grant, as the OAuth 2.0 Security
//! BCP asks of providers. Access tokens carry the grant, a sequence number
//! and the millisecond the request arrived, so the benchmark can tell from
//! a Secret alone when its token was requested.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const CLIENT_ID: &str = "bench-client";
pub const CLIENT_SECRET: &str = "bench-client-secret";

#[derive(Default)]
struct Grants {
    /// Live refresh token to its grant.
    live: HashMap<String, u64>,
    /// Retired refresh token to its grant: presenting one is reuse.
    retired: HashMap<String, u64>,
    /// Grant to (live refresh token, refreshes so far); absent when revoked.
    grants: HashMap<u64, (String, u64)>,
    next_grant: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    refreshed: AtomicU64,
    reused: AtomicU64,
    rejected: AtomicU64,
}

struct Server {
    lifetime_secs: u64,
    grants: Mutex<Grants>,
    counters: Counters,
    nonce: AtomicU64,
    seed: u128,
}

impl Server {
    fn secret(&self, kind: &str) -> String {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::digest(format!("{kind}:{}:{n}", self.seed).as_bytes());
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub async fn serve(listener: tokio::net::TcpListener, lifetime_secs: u64) -> anyhow::Result<()> {
    let server = Arc::new(Server {
        lifetime_secs,
        grants: Mutex::default(),
        counters: Counters::default(),
        nonce: AtomicU64::new(0),
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    });
    let app = Router::new()
        .route("/token", post(token))
        .route("/mint", post(mint))
        .route("/stats", get(stats))
        .with_state(server);
    axum::serve(listener, app).await?;
    Ok(())
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn oauth_error(code: &str) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": code, "error_description": code}),
    )
}

fn client_authenticated(headers: &HeaderMap, form: &HashMap<String, String>) -> bool {
    use base64::Engine as _;
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|raw| String::from_utf8_lossy(&raw).into_owned());
    let expected_basic = format!("{CLIENT_ID}:{CLIENT_SECRET}");
    basic.as_deref() == Some(expected_basic.as_str())
        || (form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
            && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET))
}

async fn token(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let received_ms = now_ms();
    server.counters.requests.fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if !client_authenticated(&headers, &form) {
        server.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client"}),
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        server.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return oauth_error("unsupported_grant_type");
    }
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let next_refresh_token = server.secret("rt");
    let mut grants = server.grants.lock().expect("not poisoned");
    let Some(grant) = grants.live.remove(&presented) else {
        if let Some(grant) = grants.retired.get(&presented).copied() {
            // Reuse: the grant is compromised or its holder lost track.
            server.counters.reused.fetch_add(1, Ordering::Relaxed);
            if let Some((live, _)) = grants.grants.remove(&grant) {
                grants.live.remove(&live);
            }
        } else {
            server.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        return oauth_error("invalid_grant");
    };
    let (live, refreshes) = grants
        .grants
        .get_mut(&grant)
        .expect("a live token has a grant");
    *refreshes += 1;
    let sequence = *refreshes;
    *live = next_refresh_token.clone();
    grants.retired.insert(presented, grant);
    grants.live.insert(next_refresh_token.clone(), grant);
    drop(grants);
    server.counters.refreshed.fetch_add(1, Ordering::Relaxed);
    let access_token = format!(
        "bench.{grant}.{sequence}.{received_ms}.{}",
        server.secret("at")
    );
    json(
        StatusCode::OK,
        serde_json::json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": server.lifetime_secs,
            "refresh_token": next_refresh_token,
        }),
    )
}

#[derive(Deserialize)]
struct MintQuery {
    count: usize,
}

/// Creates `count` grants and returns their first refresh tokens.
async fn mint(State(server): State<Arc<Server>>, Query(query): Query<MintQuery>) -> Response {
    let mut tokens = Vec::with_capacity(query.count);
    let mut grants = server.grants.lock().expect("not poisoned");
    for _ in 0..query.count {
        let grant = grants.next_grant;
        grants.next_grant += 1;
        let refresh_token = server.secret("rt");
        grants.live.insert(refresh_token.clone(), grant);
        grants.grants.insert(grant, (refresh_token.clone(), 0));
        tokens.push(refresh_token);
    }
    json(StatusCode::OK, serde_json::json!(tokens))
}

async fn stats(State(server): State<Arc<Server>>) -> Response {
    let c = &server.counters;
    json(
        StatusCode::OK,
        serde_json::json!({
            "requests": c.requests.load(Ordering::Relaxed),
            "refreshed": c.refreshed.load(Ordering::Relaxed),
            "reused": c.reused.load(Ordering::Relaxed),
            "rejected": c.rejected.load(Ordering::Relaxed),
        }),
    )
}

/// When the token server received the request for `access_token`, in
/// Unix milliseconds.
pub fn requested_at_ms(access_token: &str) -> Option<i64> {
    access_token.split('.').nth(3)?.parse().ok()
}
