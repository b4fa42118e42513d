//! Token requests to the provider, through the `oauth2` crate over reqwest.
//!
//! The `oauth2` crate drops the HTTP status and headers of answers it
//! cannot parse, so the HTTP layer handed to it turns 5xx, 429 and non-JSON
//! answers into errors that keep them (Retry-After in particular); OAuth
//! error responses pass through for the crate to parse.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AsyncHttpClient, AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    ExtraTokenFields, HttpRequest, HttpResponse, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse as _, TokenUrl,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::ClientAuthMethod;
use crate::decide::classify::{self, VerificationAnswer};
use crate::oauth::token::{IssuedToken, TokenFailure};

/// Timeout of one token request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Every field of the token response that RFC 6749 does not name.
#[derive(Clone, Deserialize, Serialize)]
pub struct ExtraFields {
    #[serde(flatten)]
    pub fields: BTreeMap<String, Value>,
}

impl fmt::Debug for ExtraFields {
    // Extra fields may hold an id_token or other credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.fields.keys()).finish()
    }
}

impl ExtraTokenFields for ExtraFields {}

type ProviderTokenResponse = StandardTokenResponse<ExtraFields, BasicTokenType>;
type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    ProviderTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

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
}

#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {status}")]
    NotOAuth {
        status: u16,
        retry_after: Option<Duration>,
        content_type: Option<String>,
    },
    #[error("invalid request: {0}")]
    Build(String),
}

/// Requests a token. Never logs or returns token values in errors.
pub async fn request_token(
    http: &reqwest::Client,
    request: TokenRequest<'_>,
) -> Result<IssuedToken, TokenFailure> {
    let token_url =
        TokenUrl::new(request.token_url.to_owned()).map_err(|e| TokenFailure::Transport {
            detail: format!("invalid token URL: {e}"),
        })?;
    let client: OAuthClient = oauth2::Client::new(ClientId::new(request.client_id.to_owned()))
        .set_client_secret(ClientSecret::new(request.client_secret.to_owned()))
        .set_token_uri(token_url)
        .set_auth_type(match request.auth_method {
            ClientAuthMethod::ClientSecretBasic => AuthType::BasicAuth,
            ClientAuthMethod::ClientSecretPost => AuthType::RequestBody,
        });
    let send = ProviderHttp(http.clone());

    let result = match request.grant {
        Grant::RefreshToken(refresh_token) => {
            let refresh_token = RefreshToken::new(refresh_token.to_owned());
            // No scope parameter: a refresh keeps what the grant holds
            // (RFC 6749 section 6); asking for more is refused.
            let mut exchange = client.exchange_refresh_token(&refresh_token);
            for (name, value) in request.extra_params {
                exchange = exchange.add_extra_param(name.clone(), value.clone());
            }
            exchange.request_async(&send).await
        }
        Grant::ClientCredentials => {
            let mut exchange = client
                .exchange_client_credentials()
                .add_scopes(request.scopes.iter().cloned().map(Scope::new));
            for (name, value) in request.extra_params {
                exchange = exchange.add_extra_param(name.clone(), value.clone());
            }
            exchange.request_async(&send).await
        }
    };

    issued(result)
}

fn issued(
    result: Result<ProviderTokenResponse, RequestTokenError<HttpError, BasicErrorResponse>>,
) -> Result<IssuedToken, TokenFailure> {
    match result {
        Ok(response) => Ok(IssuedToken {
            access_token: response.access_token().secret().clone(),
            token_type: match response.token_type() {
                BasicTokenType::Bearer => "Bearer".to_owned(),
                BasicTokenType::Mac => "mac".to_owned(),
                BasicTokenType::Extension(other) => other.clone(),
            },
            expires_in: response.expires_in(),
            refresh_token: response.refresh_token().map(|t| t.secret().clone()),
            scope: response.scopes().map(|scopes| {
                scopes
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
            extra: response.extra_fields().fields.clone(),
        }),
        Err(RequestTokenError::ServerResponse(error)) => Err(TokenFailure::OAuth {
            status: 400,
            code: error.error().as_ref().to_owned(),
            description: error.error_description().cloned(),
        }),
        Err(RequestTokenError::Request(HttpError::NotOAuth {
            status,
            retry_after,
            content_type,
        })) => Err(TokenFailure::Http {
            status,
            retry_after,
            content_type,
        }),
        Err(RequestTokenError::Request(error)) => Err(TokenFailure::Transport {
            detail: error.to_string(),
        }),
        // The body may hold tokens: it is dropped, never shown.
        Err(RequestTokenError::Parse(_, _)) | Err(RequestTokenError::Other(_)) => {
            Err(TokenFailure::Malformed)
        }
    }
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
    let token_url =
        TokenUrl::new(exchange.token_url.to_owned()).map_err(|e| TokenFailure::Transport {
            detail: format!("invalid token URL: {e}"),
        })?;
    let redirect = oauth2::RedirectUrl::new(exchange.redirect_url.to_owned()).map_err(|e| {
        TokenFailure::Transport {
            detail: format!("invalid redirect URL: {e}"),
        }
    })?;
    let client: OAuthClient = oauth2::Client::new(ClientId::new(exchange.client_id.to_owned()))
        .set_client_secret(ClientSecret::new(exchange.client_secret.to_owned()))
        .set_token_uri(token_url)
        .set_auth_type(match exchange.auth_method {
            ClientAuthMethod::ClientSecretBasic => AuthType::BasicAuth,
            ClientAuthMethod::ClientSecretPost => AuthType::RequestBody,
        });
    let send = ProviderHttp(http.clone());
    let result = client
        .exchange_code(oauth2::AuthorizationCode::new(exchange.code.to_owned()))
        .set_pkce_verifier(oauth2::PkceCodeVerifier::new(
            exchange.pkce_verifier.to_owned(),
        ))
        .set_redirect_uri(std::borrow::Cow::Owned(redirect))
        .request_async(&send)
        .await;
    issued(result)
}

/// The HTTP layer handed to `oauth2`. A named type with a boxed `Send`
/// future, because a closure would make the whole reconcile future `Send`
/// only for one lifetime, which the controller runtime cannot accept.
struct ProviderHttp(reqwest::Client);

impl<'c> AsyncHttpClient<'c> for ProviderHttp {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

async fn send(http: &reqwest::Client, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let request =
        reqwest::Request::try_from(request).map_err(|e| HttpError::Build(e.to_string()))?;
    let response = http
        .execute(request)
        .await
        .map_err(|e| HttpError::Transport(transport_detail(&e)))?;
    let status = response.status();
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let is_json = content_type.as_deref().is_some_and(|t| t.contains("json"));
    if status.is_server_error() || status.as_u16() == 429 || !is_json {
        return Err(HttpError::NotOAuth {
            status: status.as_u16(),
            retry_after: header(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
            content_type,
        });
    }
    let mut builder = http::Response::builder().status(status);
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = response
        .bytes()
        .await
        .map_err(|_| HttpError::Transport("the answer was cut off".to_owned()))?;
    builder
        .body(body.to_vec())
        .map_err(|e| HttpError::Build(e.to_string()))
}

pub enum Revocable<'a> {
    RefreshToken(&'a str),
    AccessToken(&'a str),
}

/// Revokes a token at the provider's revocation endpoint (RFC 7009).
///
/// Not through the `oauth2` crate: it refuses revocation endpoints that are
/// not HTTPS, even on loopback, where local providers and the tests live.
/// The request is the same: a form POST with the client authenticated as
/// for token requests.
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
    let mut form = vec![("token", token), ("token_type_hint", hint)];
    let mut request = http.post(revocation_url);
    match auth_method {
        // RFC 6749 section 2.3.1: form-encode before Basic.
        ClientAuthMethod::ClientSecretBasic => {
            let encode = |text: &str| {
                url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
            };
            request = request.basic_auth(encode(client_id), Some(encode(client_secret)));
        }
        ClientAuthMethod::ClientSecretPost => {
            form.push(("client_id", client_id));
            form.push(("client_secret", client_secret));
        }
    }
    let response = request
        .form(&form)
        .send()
        .await
        .map_err(|e| TokenFailure::Transport {
            detail: if e.is_timeout() {
                "no answer".to_owned()
            } else {
                "connection failed".to_owned()
            },
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Option<Value> = response
        .bytes()
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match body.as_ref().and_then(|b| b["error"].as_str()) {
        Some(code) if !status.is_server_error() && status.as_u16() != 429 => {
            Err(TokenFailure::OAuth {
                status: status.as_u16(),
                code: code.to_owned(),
                description: body
                    .as_ref()
                    .and_then(|b| b["error_description"].as_str())
                    .map(str::to_owned),
            })
        }
        _ => Err(TokenFailure::Http {
            status: status.as_u16(),
            retry_after,
            content_type,
        }),
    }
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

/// Why a request got no answer, without the URL (which is in the
/// message already) and never with request contents.
fn transport_detail(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return format!("no answer within {} s", REQUEST_TIMEOUT.as_secs());
    }
    let mut detail = if error.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    detail
}

/// The HTTP client for token requests: rustls, a timeout, no redirects
/// (a token endpoint that redirects is misconfigured, and following it
/// would resend credentials).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokenkeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings always builds")
}
