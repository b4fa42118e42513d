//! The `SourceConnection` API (`tokenkeeper.dev/v1alpha1`).
//!
//! A SourceConnection names exactly one way a source authenticates (Basic,
//! API key or OAuth 2.0) and the Secret that extraction pods mount. The
//! operator keeps that Secret filled with a usable credential and reports
//! in `status.conditions` what is wrong when it cannot.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_GROUP: &str = "tokenkeeper.dev";
/// Field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "tokenkeeper";
/// `app.kubernetes.io/managed-by` value on every Secret the operator writes.
pub const MANAGED_BY: &str = "tokenkeeper";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Names the SourceConnection a managed Secret belongs to.
pub const LABEL_CONNECTION: &str = "tokenkeeper.dev/connection";
/// What a managed Secret is for: `credentials` (mounted by pods).
pub const LABEL_SECRET_ROLE: &str = "tokenkeeper.dev/secret-role";
pub const SECRET_ROLE_CREDENTIALS: &str = "credentials";
/// Role of the operator-private Secret that holds a refresh token.
pub const SECRET_ROLE_STATE: &str = "operator-state";
/// Set this annotation on a SourceConnection to a new value (a timestamp,
/// say) to refresh its token now.
pub const ANNOTATION_FORCE_REFRESH: &str = "tokenkeeper.dev/force-refresh";

/// Keys of the target Secret, per authentication method. These are a stable
/// interface for extraction pods: never rename them.
pub mod target_keys {
    pub const USERNAME: &str = "username";
    pub const PASSWORD: &str = "password";
    pub const API_KEY: &str = "api_key";
}

// What the CRD schema refuses at `kubectl apply`, so that obviously bad
// specs never get stored (issue 24). Every rule admits all that the operator
// accepts (`decide::validate`) and all that Kubernetes can hold (a Secret
// name, a key, a label value); the operator still checks the rest. The API
// server is 1.20 in the tests: OpenAPI v3 keywords only, no CEL.

/// `http://` or `https://`, in any case (the scheme is case-insensitive).
/// Which of the two, and which hosts, the operator decides.
const URL_PATTERN: &str = "^[Hh][Tt][Tt][Pp][Ss]?://";
const URL_MAX: u32 = 2048;
/// A Secret name: an RFC 1123 subdomain of at most 253 characters.
const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
const SECRET_NAME_MAX: u32 = 253;
/// A namespace name: an RFC 1123 label of at most 63 characters.
const NAMESPACE_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
const NAMESPACE_MAX: u32 = 63;
/// A key of a Secret's data.
const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";
const SECRET_KEY_MAX: u32 = 253;

/// One number with a unit of the "friendly" format that `refreshBefore`
/// and `defaultTokenLifetime` are parsed with (jiff's `SignedDuration`):
/// hours down to nanoseconds, with their long and short names.
macro_rules! duration_unit {
    () => {
        r"[0-9]+([.,][0-9]+)?[ \t\n\f\r]*(h(ours?|rs?)?|m(in(ute)?s?)?|s(ec(ond)?s?)?|m(illi(second)?s?|secs?|s)|micro(second)?s?|(u|µ)(secs?|s)|n(ano(second)?s?|secs?|s))"
    };
}
/// A positive duration as the operator parses it: units (`90s`, `1h30m`,
/// `1.5h`, `10 hours, 30 minutes`), `HH:MM:SS`, or ISO 8601 (`PT5M`).
/// Admits some texts the parser refuses (units out of order, `0s`); never
/// the reverse. No sign but `+` and no `ago`: those are never positive.
const DURATION_PATTERN: &str = concat!(
    r"^(\+?([0-9]+:[0-9]+:[0-9]+([.,][0-9]+)?|",
    duration_unit!(),
    r"((,[ \t\n\f\r]+|[ \t\n\f\r]*)",
    duration_unit!(),
    r")*)[ \t\n\f\r]*|\+?[Pp][Tt]([0-9]+([.,][0-9]+)?[HhMmSs])+)$"
);
const DURATION_MAX: u32 = 128;
/// A label value (Kubernetes' rule).
const LABEL_VALUE_MAX: u32 = 63;
const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
const SCOPES_MAX: u32 = 64;
const SCOPE_MAX: u32 = 256;
/// Entries of each map of the spec (parameters, labels, annotations).
const MAP_ENTRIES_MAX: u32 = 32;
const MAP_VALUE_MAX: u32 = 4096;
const RESPONSE_FIELDS_MAX: u32 = 32;

/// Keeps a Secret with a fresh credential for one SaaS or database source.
///
/// Set exactly one of `basic`, `apiKey` or `oauth2`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tokenkeeper.dev",
    version = "v1alpha1",
    kind = "SourceConnection",
    namespaced,
    status = "SourceConnectionStatus",
    shortname = "srcconn",
    category = "tokenkeeper",
    derive = "PartialEq",
    doc = "A source's credentials, kept fresh by tokenkeeper in a Secret that extraction pods mount.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Provider","type":"string","priority":1,"jsonPath":".spec.oauth2.provider"}"#,
    printcolumn = r#"{"name":"Grant","type":"string","priority":1,"jsonPath":".spec.oauth2.grant"}"#,
    printcolumn = r#"{"name":"Token URL","type":"string","priority":1,"jsonPath":".spec.oauth2.tokenUrl"}"#,
    printcolumn = r#"{"name":"Grant Expiring","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"GrantExpiring\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SourceConnectionSpec {
    /// Static username and password (databases and other Basic-auth sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// One static API key (Stripe and other simple APIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAuth>,
    /// OAuth 2.0: the operator obtains and refreshes access tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Auth>,
    /// The Secret that extraction pods mount.
    #[serde(default, skip_serializing_if = "TargetSecret::is_empty")]
    pub target: TargetSecret,
}

/// Username and password from a Secret in the SourceConnection's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    pub secret_ref: BasicAuthSecretRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuthSecretRef {
    /// Name of the Secret holding the username and password.
    #[schemars(length(min = 1, max = SECRET_NAME_MAX), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,
    /// Must be empty or the SourceConnection's own namespace: references into
    /// other namespaces are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAMESPACE_MAX), regex(pattern = NAMESPACE_PATTERN))]
    pub namespace: Option<String>,
    /// Key holding the username.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))]
    pub username_key: String,
    /// Key holding the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))]
    pub password_key: String,
}

/// One API key from a Secret in the SourceConnection's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyAuth {
    pub secret_ref: ApiKeySecretRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySecretRef {
    /// Name of the Secret holding the API key.
    #[schemars(length(min = 1, max = SECRET_NAME_MAX), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,
    /// Must be empty or the SourceConnection's own namespace: references into
    /// other namespaces are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAMESPACE_MAX), regex(pattern = NAMESPACE_PATTERN))]
    pub namespace: Option<String>,
    /// Key holding the API key.
    #[serde(default = "default_api_key_key")]
    #[schemars(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// A reference to one key of a Secret in the SourceConnection's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = SECRET_NAME_MAX), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,
    /// Must be empty or the SourceConnection's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAMESPACE_MAX), regex(pattern = NAMESPACE_PATTERN))]
    pub namespace: Option<String>,
    #[schemars(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// OAuth 2.0 client and grant. The operator exchanges the grant for access
/// tokens at `tokenUrl` and refreshes them before they expire.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Auth {
    /// A preset of the provider catalogue (`kubectl tokenkeeper providers`),
    /// for example `salesforce`, `google` or `hubspot`: it fills in the
    /// endpoints, client authentication, scopes, parameters, response fields
    /// and the provider's error dialect. Any field set here overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub provider: Option<String>,
    /// Values of the preset that differ per customer (a subdomain, a
    /// tenant, an account), as the preset names them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 16,
        "additionalProperties" = {"type": "string", "maxLength": 253},
    ))]
    pub provider_params: BTreeMap<String, String>,
    /// The provider's token endpoint (RFC 6749 section 3.2). Required
    /// unless `provider` fills it in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1, max = URL_MAX), regex(pattern = URL_PATTERN))]
    pub token_url: String,
    /// The provider's authorization endpoint, for the authorizationCode grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URL_MAX), regex(pattern = URL_PATTERN))]
    pub authorization_url: Option<String>,
    /// The provider's revocation endpoint (RFC 7009). When set, deleting
    /// the connection revokes its refresh and access tokens there first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URL_MAX), regex(pattern = URL_PATTERN))]
    pub revocation_url: Option<String>,
    /// Set to false to keep the grant alive when the connection is deleted
    /// (a grant shared with other systems). Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_on_delete: Option<bool>,
    /// How the connection obtains tokens.
    pub grant: OAuth2Grant,
    /// Where the client id and secret are.
    pub client: OAuth2Client,
    /// The refresh token to start from, for the refreshToken grant: a
    /// Secret key supplied by the user (for example imported from another
    /// system). After the first refresh the operator keeps the current
    /// refresh token in its own state Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_secret_ref: Option<SecretKeyRef>,
    /// Scopes to request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCOPES_MAX), inner(length(max = SCOPE_MAX)))]
    pub scopes: Vec<String>,
    /// Scopes the extraction needs; a grant lacking any of them is reported
    /// as InsufficientPermissions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCOPES_MAX), inner(length(max = SCOPE_MAX)))]
    pub required_scopes: Vec<String>,
    /// Extra parameters of the authorization request (for example
    /// `access_type: offline` and `prompt: consent` for Google).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAP_ENTRIES_MAX,
        "additionalProperties" = {"type": "string", "maxLength": MAP_VALUE_MAX},
    ))]
    pub authorization_params: BTreeMap<String, String>,
    /// Extra parameters sent with every token request (for example
    /// `audience` or `resource`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAP_ENTRIES_MAX,
        "additionalProperties" = {"type": "string", "maxLength": MAP_VALUE_MAX},
    ))]
    pub extra_token_params: BTreeMap<String, String>,
    /// Refresh this long before the access token expires (for example
    /// `5m`). Default: when two thirds of the token's lifetime have passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub refresh_before: Option<String>,
    /// Lifetime assumed when the provider's token response has no
    /// `expires_in` (for example `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub default_token_lifetime: Option<String>,
    /// Extra fields of the token response copied into the target Secret
    /// (for example Salesforce's `instance_url`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = RESPONSE_FIELDS_MAX),
        inner(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))
    )]
    pub response_fields: Vec<String>,
    /// Values the provider sends in the consent's redirect rather than in
    /// the token answer (QuickBooks' `realmId`), copied into the target
    /// Secret under their names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = RESPONSE_FIELDS_MAX),
        inner(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))
    )]
    pub redirect_fields: Vec<String>,
    /// A cheap API request made with every new access token, so that a
    /// role change surfaces as InsufficientPermissions before an extraction
    /// fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// The provider's token introspection endpoint (RFC 7662). When a token
    /// answer has no `expires_in`, the real expiry is asked there instead of
    /// assuming `defaultTokenLifetime` (Salesforce's preset sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URL_MAX), regex(pattern = URL_PATTERN))]
    pub introspection_url: Option<String>,
    /// The provider's own error shapes, for a provider without a preset
    /// (or beyond its preset's): a field of the error body and the reason
    /// its value means. Checked first, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub error_rules: Vec<ErrorRule>,
}

/// One rule of a provider's error dialect.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorRule {
    /// A top-level field of the error body (JSON or form), for example
    /// `status` or `error_codes`.
    #[schemars(length(min = 1, max = 128))]
    pub field: String,
    /// Matches when the field's value (or, for a list, any element) is
    /// exactly this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub equals: Option<String>,
    /// Matches when the field's value contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub contains: Option<String>,
    /// Only for this HTTP status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub reason: ErrorRuleReason,
}

/// What an error rule says: one of the rejections users act on.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ErrorRuleReason {
    InvalidGrant,
    RefreshTokenExpired,
    InvalidClient,
    InsufficientPermissions,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// URL requested with `GET` and `Authorization: Bearer <access token>`
    /// (the provider's userinfo endpoint, or an API endpoint the extraction
    /// needs). 2xx: fine; 401: the token is refused (AccessTokenExpired,
    /// retried); 403 or `insufficient_scope`: InsufficientPermissions.
    #[schemars(length(min = 1, max = URL_MAX), regex(pattern = URL_PATTERN))]
    pub url: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OAuth2Grant {
    /// Start from a refresh token the user supplies.
    RefreshToken,
    /// No user: tokens are fetched with the client's own credentials.
    ClientCredentials,
    /// A person authorizes on the provider's consent page.
    AuthorizationCode,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Client {
    /// Secret holding the client id and client secret.
    pub secret_ref: OAuth2ClientSecretRef,
    /// How the client authenticates at the token endpoint. Default: the
    /// preset's, else clientSecretBasic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<ClientAuthMethod>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2ClientSecretRef {
    #[schemars(length(min = 1, max = SECRET_NAME_MAX), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,
    /// Must be empty or the SourceConnection's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAMESPACE_MAX), regex(pattern = NAMESPACE_PATTERN))]
    pub namespace: Option<String>,
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))]
    pub client_id_key: String,
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = SECRET_KEY_MAX), regex(pattern = SECRET_KEY_PATTERN))]
    pub client_secret_key: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuthMethod {
    /// HTTP Basic authentication with the client id and secret.
    #[default]
    ClientSecretBasic,
    /// Client id and secret in the request body.
    ClientSecretPost,
}

/// The Secret that extraction pods mount.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSecret {
    /// Name of the Secret. Default: `<SourceConnection name>-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = SECRET_NAME_MAX), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: Option<String>,
    /// Extra labels for the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAP_ENTRIES_MAX,
        "additionalProperties" = {"type": "string", "maxLength": LABEL_VALUE_MAX, "pattern": LABEL_VALUE_PATTERN},
    ))]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations for the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAP_ENTRIES_MAX,
        "additionalProperties" = {"type": "string", "maxLength": MAP_VALUE_MAX},
    ))]
    pub annotations: BTreeMap<String, String>,
}

impl TargetSecret {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceConnectionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` sums up the connection; `AuthFailed` is True only when the
    /// source rejected the credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The Secret that holds the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When tokenkeeper retries after a failed token request (OAuth 2.0
    /// only). Empty while healthy and while a failure waits for a change.
    /// Routine refresh times are on the target Secret (`expires_at`,
    /// `tokenkeeper.dev/issued-at`, `tokenkeeper.dev/next-refresh-at`):
    /// writing them here would cost a status write per refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    /// Scopes the provider granted with the current access token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_scopes: Vec<String>,
    /// Token requests that failed in a row since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_refresh_attempts: Option<i32>,
    /// When the last token request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Where a person authorizes this connection (authorization-code flow
    /// through tokenkeeper); also the way to re-authorize it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<String>,
    /// The value of the `tokenkeeper.dev/force-refresh` annotation that was
    /// last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_refresh_handled: Option<String>,
    /// The operator's public key (X25519) that `kubectl tokenkeeper
    /// authorize` seals a consented grant to, so that the grant never sits
    /// in a Secret in plaintext (OAuth 2.0 connections with a refresh token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_sealing_key: Option<String>,
    /// The provider account of the grant in use, when the provider named it
    /// at consent (OpenID Connect id_token: email, preferred_username or
    /// sub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_account: Option<String>,
    /// The endpoints in use when `spec.oauth2.provider` fills them in
    /// (`tokenUrl`, `authorizationUrl`, `revocationUrl`, `verificationUrl`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provider_endpoints: BTreeMap<String, String>,
    /// When the grant ends whatever is refreshed (a provider's absolute
    /// limit, or the refresh token's lifetime), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_expires_at: Option<Time>,
}

fn default_username_key() -> String {
    target_keys::USERNAME.to_owned()
}
fn default_password_key() -> String {
    target_keys::PASSWORD.to_owned()
}
fn default_api_key_key() -> String {
    target_keys::API_KEY.to_owned()
}
fn default_client_id_key() -> String {
    "client_id".to_owned()
}
fn default_client_secret_key() -> String {
    "client_secret".to_owned()
}

impl SourceConnection {
    /// Name of the Secret that pods mount.
    pub fn target_secret_name(&self) -> String {
        match &self.spec.target.name {
            Some(name) => name.clone(),
            None => format!(
                "{}-credentials",
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// Holds a deleted OAuth 2.0 connection until its tokens are revoked.
pub const FINALIZER_REVOKE: &str = "tokenkeeper.dev/revoke-tokens";

impl SourceConnection {
    /// Whether deleting this connection must first revoke its tokens.
    pub fn revokes_on_delete(&self) -> bool {
        self.spec.oauth2.as_ref().is_some_and(|o| {
            let preset_revokes = o
                .provider
                .as_deref()
                .and_then(crate::providers::preset)
                .is_some_and(|p| p.revocation.is_some());
            (o.revocation_url.is_some() || preset_revokes) && o.revoke_on_delete != Some(false)
        })
    }

    pub fn has_revoke_finalizer(&self) -> bool {
        self.finalizers().iter().any(|f| f == FINALIZER_REVOKE)
    }

    /// Name of the operator-private Secret that holds the refresh token.
    pub fn state_secret_name(&self) -> String {
        format!(
            "{}-tokenkeeper-state",
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}

impl SourceConnectionSpec {
    /// Names of the Secrets this spec reads, in its own namespace. Used to
    /// map Secret changes to the connections that must be reconciled.
    pub fn referenced_secret_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        if let Some(basic) = &self.basic {
            names.push(basic.secret_ref.name.as_str());
        }
        if let Some(api_key) = &self.api_key {
            names.push(api_key.secret_ref.name.as_str());
        }
        if let Some(oauth2) = &self.oauth2 {
            names.push(oauth2.client.secret_ref.name.as_str());
            if let Some(refresh) = &oauth2.refresh_token_secret_ref {
                names.push(refresh.name.as_str());
            }
        }
        names
    }
}
