//! Requests to the provider's endpoints: tokens (refresh, client
//! credentials, authorization code with PKCE), revocation (RFC 7009) and
//! verification. Form POSTs over reqwest, with the client authenticated as
//! `spec.oauth2.client.authMethod` says; answers are read up to
//! `MAX_ANSWER_BYTES` and parsed leniently (`oauth::response`). The
//! `oauth2` crate builds the consent URL and the PKCE pair.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use oauth2::{ClientId, Scope};
use tracing::warn;

use crate::api::ClientAuthMethod;
use crate::decide::classify::{self, VerificationAnswer};
use crate::oauth::destination::{DeniedDestination, EndpointPolicy, GuardedResolver};
use crate::oauth::response::{parse_error, parse_success};
use crate::oauth::token::{IssuedToken, TokenFailure};

/// Timeout of one token request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer read from a provider; a larger one is refused unread
/// past this, so that no provider can make the operator buffer without end.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

pub enum Grant<'a> {
    RefreshToken(&'a str),
    ClientCredentials,
}

pub struct TokenRequest<'a> {
    pub token_url: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub auth_method: ClientAuthMethod,
    pub scopes: &'a [String],
    pub extra_params: &'a BTreeMap<String, String>,
    pub grant: Grant<'a>,
    /// How long the request may take (at most `REQUEST_TIMEOUT`).
    pub timeout: Duration,
}

/// Requests a token. Never logs or returns token values in errors.
pub async fn request_token(
    http: &reqwest::Client,
    request: TokenRequest<'_>,
) -> Result<IssuedToken, TokenFailure> {
    let scopes = request.scopes.join(" ");
    let mut form: Vec<(&str, &str)> = match request.grant {
        // No scope parameter: a refresh keeps what the grant holds (RFC 6749
        // section 6); asking for more is refused.
        Grant::RefreshToken(refresh_token) => vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
        Grant::ClientCredentials => {
            let mut form = vec![("grant_type", "client_credentials")];
            if !scopes.is_empty() {
                form.push(("scope", &scopes));
            }
            form
        }
    };
    form.extend(
        request
            .extra_params
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
    );
    let client = ClientAuth {
        id: request.client_id,
        secret: request.client_secret,
        method: request.auth_method,
    };
    let post = client
        .post(http, request.token_url, form)
        .timeout(request.timeout);
    answer_token(send(post).await?)
}

/// What starts an authorization-code flow: the provider's consent URL and
/// the PKCE verifier that must stay with the operator.
pub struct AuthorizationStart {
    pub url: String,
    pub pkce_verifier: String,
}

/// Builds the consent URL (RFC 6749 section 4.1.1) with S256 PKCE
/// (RFC 7636), `state`, the scopes and provider-specific parameters.
pub fn authorization_start(
    authorization_url: &str,
    client_id: &str,
    redirect_url: &str,
    scopes: &[String],
    params: &BTreeMap<String, String>,
    state: &str,
) -> Result<AuthorizationStart, String> {
    let client = oauth2::basic::BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_auth_uri(
            oauth2::AuthUrl::new(authorization_url.to_owned()).map_err(|e| e.to_string())?,
        )
        .set_redirect_uri(
            oauth2::RedirectUrl::new(redirect_url.to_owned()).map_err(|e| e.to_string())?,
        );
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    let state = state.to_owned();
    let mut request = client
        .authorize_url(move || oauth2::CsrfToken::new(state))
        .add_scopes(scopes.iter().cloned().map(Scope::new))
        .set_pkce_challenge(challenge);
    for (name, value) in params {
        request = request.add_extra_param(name.clone(), value.clone());
    }
    let (url, _) = request.url();
    Ok(AuthorizationStart {
        url: url.to_string(),
        pkce_verifier: verifier.secret().clone(),
    })
}

/// An authorization code to exchange (RFC 6749 section 4.1.3), with the
/// PKCE verifier of the authorization it answers.
pub struct CodeExchange<'a> {
    pub token_url: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub auth_method: ClientAuthMethod,
    /// The redirect URI the authorization was started with.
    pub redirect_url: &'a str,
    pub code: &'a str,
    pub pkce_verifier: &'a str,
}

/// Exchanges an authorization code for tokens, proving PKCE.
pub async fn exchange_code(
    http: &reqwest::Client,
    exchange: CodeExchange<'_>,
) -> Result<IssuedToken, TokenFailure> {
    let form = vec![
        ("grant_type", "authorization_code"),
        ("code", exchange.code),
        ("redirect_uri", exchange.redirect_url),
        ("code_verifier", exchange.pkce_verifier),
    ];
    let client = ClientAuth {
        id: exchange.client_id,
        secret: exchange.client_secret,
        method: exchange.auth_method,
    };
    answer_token(send(client.post(http, exchange.token_url, form)).await?)
}

/// The client's credentials and how the endpoint wants them.
struct ClientAuth<'a> {
    id: &'a str,
    secret: &'a str,
    method: ClientAuthMethod,
}

impl ClientAuth<'_> {
    /// A form POST to `url` with the client authenticated: HTTP Basic of the
    /// form-encoded id and secret (RFC 6749 section 2.3.1), or both in the
    /// form.
    fn post<'f>(
        &'f self,
        http: &reqwest::Client,
        url: &str,
        mut form: Vec<(&'f str, &'f str)>,
    ) -> reqwest::RequestBuilder {
        let mut request = http
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json");
        match self.method {
            ClientAuthMethod::ClientSecretBasic => {
                let encode = |text: &str| {
                    url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
                };
                request = request.basic_auth(encode(self.id), Some(encode(self.secret)));
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id", self.id));
                form.push(("client_secret", self.secret));
            }
        }
        request.form(&form)
    }
}

/// What a token request's answer says: a token, an OAuth error, or an HTTP
/// failure that keeps the status and `Retry-After`.
fn answer_token(answer: Answer) -> Result<IssuedToken, TokenFailure> {
    let content_type = answer.content_type.as_deref();
    match answer.status {
        200..=299 => parse_success(answer.status, &answer.body, content_type),
        status if status >= 500 || status == 429 => Err(answer.http_failure()),
        status => Err(parse_error(status, &answer.body, content_type)
            .unwrap_or_else(|| answer.http_failure())),
    }
}

/// What a token endpoint's answer says, from its parts as they came: the
/// pure part of a token request (and what `tests/fuzz.rs` feeds).
pub fn read_token_answer(
    status: u16,
    retry_after: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<IssuedToken, TokenFailure> {
    answer_token(Answer {
        status,
        retry_after: retry_after.and_then(parse_retry_after),
        content_type: content_type.map(str::to_owned),
        body: body.to_vec(),
    })
}

/// A `Retry-After` in seconds (the HTTP-date form is not used by token
/// endpoints and is ignored).
fn parse_retry_after(text: &str) -> Option<Duration> {
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// What an endpoint answered, its body read up to `MAX_ANSWER_BYTES`.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn http_failure(&self) -> TokenFailure {
        TokenFailure::Http {
            status: self.status,
            retry_after: self.retry_after,
            content_type: self.content_type.clone(),
        }
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, TokenFailure> {
    let mut response = request.send().await.map_err(|e| transport_failure(&e))?;
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = header(reqwest::header::RETRY_AFTER).and_then(|v| parse_retry_after(&v));
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let status = response.status().as_u16();
    let mut body = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|_| TokenFailure::Transport {
                detail: "the answer was cut off".to_owned(),
            })?;
        let Some(chunk) = chunk else {
            break;
        };
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(TokenFailure::Malformed {
                what: format!(
                    "an answer larger than {} KiB, refused",
                    MAX_ANSWER_BYTES / 1024
                ),
                refresh_token: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status,
        retry_after,
        content_type,
        body,
    })
}

pub enum Revocable<'a> {
    RefreshToken(&'a str),
    AccessToken(&'a str),
}

/// Revokes a token at the provider's revocation endpoint (RFC 7009): a form
/// POST with the client authenticated as for token requests.
pub async fn revoke(
    http: &reqwest::Client,
    revocation_url: &str,
    client_id: &str,
    client_secret: &str,
    auth_method: ClientAuthMethod,
    token: Revocable<'_>,
) -> Result<(), TokenFailure> {
    let (token, hint) = match token {
        Revocable::RefreshToken(t) => (t, "refresh_token"),
        Revocable::AccessToken(t) => (t, "access_token"),
    };
    let form = vec![("token", token), ("token_type_hint", hint)];
    let client = ClientAuth {
        id: client_id,
        secret: client_secret,
        method: auth_method,
    };
    let answer = send(client.post(http, revocation_url, form)).await?;
    revocation_answer(&answer)
}

/// What a revocation endpoint's answer says: done, or why not.
fn revocation_answer(answer: &Answer) -> Result<(), TokenFailure> {
    match answer.status {
        200..=299 => Ok(()),
        status if status >= 500 || status == 429 => Err(answer.http_failure()),
        status => Err(
            parse_error(status, &answer.body, answer.content_type.as_deref())
                .unwrap_or_else(|| answer.http_failure()),
        ),
    }
}

/// The expiry of `access_token` as the provider's introspection endpoint
/// (RFC 7662) tells it: `None` when the token is inactive or the answer has
/// no `exp`.
pub async fn introspect(
    http: &reqwest::Client,
    url: &str,
    client_id: &str,
    client_secret: &str,
    auth_method: ClientAuthMethod,
    access_token: &str,
) -> Result<Option<jiff::Timestamp>, TokenFailure> {
    let client = ClientAuth {
        id: client_id,
        secret: client_secret,
        method: auth_method,
    };
    let form = vec![("token", access_token), ("token_type_hint", "access_token")];
    let answer = send(client.post(http, url, form).timeout(REQUEST_TIMEOUT)).await?;
    if !(200..300).contains(&answer.status) {
        return Err(answer.http_failure());
    }
    let body: serde_json::Value =
        serde_json::from_slice(&answer.body).map_err(|_| TokenFailure::Malformed {
            what: "an introspection answer that is not JSON".to_owned(),
            refresh_token: None,
        })?;
    if body.get("active") != Some(&serde_json::Value::Bool(true)) {
        return Ok(None);
    }
    Ok(body
        .get("exp")
        .and_then(serde_json::Value::as_i64)
        .and_then(|exp| jiff::Timestamp::from_second(exp).ok()))
}

/// Revokes an access token with it as the Bearer credential of a POST
/// without a body (Dropbox's `/2/auth/token/revoke`).
pub async fn revoke_bearer(
    http: &reqwest::Client,
    revocation_url: &str,
    access_token: &str,
) -> Result<(), TokenFailure> {
    let answer = send(http.post(revocation_url).bearer_auth(access_token)).await?;
    revocation_answer(&answer)
}

/// Timeout of one verification request.
const VERIFICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls the verification URL with a fresh access token.
pub async fn verify(http: &reqwest::Client, url: &str, access_token: &str) -> VerificationAnswer {
    let response = http
        .get(url)
        .bearer_auth(access_token)
        .timeout(VERIFICATION_TIMEOUT)
        .send()
        .await;
    match response {
        Ok(response) => classify::classify_verification(
            response.status().as_u16(),
            response
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok()),
        ),
        Err(error) => VerificationAnswer::Inconclusive {
            detail: if error.is_timeout() {
                "no answer".to_owned()
            } else {
                "request failed".to_owned()
            },
        },
    }
}

/// Why a request got no answer, in a few words: the connection's status
/// is read by the tenant, and an exact error (refused, reset, unreachable)
/// from any address a spec names would make the operator a scanner of the
/// cluster's network. The whole cause goes to the operator's log.
fn transport_failure(error: &reqwest::Error) -> TokenFailure {
    let chain = std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    });
    let denied = chain
        .filter_map(|e| e.downcast_ref::<DeniedDestination>())
        .map(ToString::to_string)
        .next();
    if let Some(detail) = denied {
        return TokenFailure::Denied { detail };
    }
    // reqwest's Display leaves out the cause (a refused connection, an
    // untrusted certificate), which is what the operator's admin needs.
    let cause = std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .map(ToString::to_string)
    .collect::<Vec<_>>()
    .join(": ");
    warn!(%cause, "a request to a provider failed");
    let detail = if error.is_timeout() {
        format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
    } else if error.is_connect() {
        "could not connect".to_owned()
    } else {
        "the request failed".to_owned()
    };
    TokenFailure::Transport { detail }
}

/// The HTTP client for token requests: rustls trusting the system's CA
/// certificates (`SSL_CERT_FILE`, or `/etc/ssl/certs`), a timeout, no
/// redirects (a token endpoint that redirects is misconfigured, and
/// following it would resend credentials). Fails when the CA certificates
/// found are all unreadable.
pub fn http_client(endpoints: Arc<EndpointPolicy>) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { policy: endpoints }))
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokenkeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .context(
            "set up the HTTPS client for token endpoints: no CA certificate could be read \
             (check the bundle at SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt)",
        )
}
