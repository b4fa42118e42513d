//! What a token endpoint answers (`IssuedToken`, `TokenFailure`), and
//! access-token records as the target Secret keeps them. Pure: turns
//! answers into records and records into Secret data and back.
//!
//! The target Secret (mounted by pods) holds `access_token`, `token_type`,
//! `expires_at`, `scope` and the response fields the connection selects.
//! The refresh token travels with them, sealed (`seal`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use serde_json::{Map, Value};

use crate::api::OAuth2Auth;
use crate::time::{rfc3339, truncate_to_seconds};

pub const KEY_ACCESS_TOKEN: &str = "access_token";
pub const KEY_TOKEN_TYPE: &str = "token_type";
pub const KEY_EXPIRES_AT: &str = "expires_at";
pub const KEY_SCOPE: &str = "scope";
pub const KEY_REFRESH_TOKEN: &str = "refresh_token";
pub(crate) const KEY_ISSUED_AT: &str = "issued_at";
pub(crate) const KEY_LIFETIME_ASSUMED: &str = "lifetime_assumed";
pub(crate) const KEY_REQUEST_HASH: &str = "token_request_sha256";
pub(crate) const KEY_VERIFICATION_DENIED: &str = "verification_denied";
pub(crate) const KEY_ODDITIES: &str = "token_response_oddities";

/// Annotations on the target Secret that let tokenkeeper continue after a
/// restart without keeping anything but the token in the data pods see.
pub const ANNOTATION_ISSUED_AT: &str = "tokenkeeper.dev/issued-at";
pub const ANNOTATION_LIFETIME_ASSUMED: &str = "tokenkeeper.dev/lifetime-assumed";
pub const ANNOTATION_REQUEST_HASH: &str = "tokenkeeper.dev/token-request-sha256";
pub const ANNOTATION_VERIFICATION_DENIED: &str = "tokenkeeper.dev/verification-denied";
/// What was odd about the answer that issued the token (`oauth::response`).
pub const ANNOTATION_ODDITIES: &str = "tokenkeeper.dev/token-response-oddities";
/// When tokenkeeper plans to replace the token: for people and monitors,
/// since the status does not change on routine refreshes.
pub const ANNOTATION_NEXT_REFRESH_AT: &str = "tokenkeeper.dev/next-refresh-at";

/// Keys of the target Secret that response fields may not take.
pub const RESERVED_TARGET_KEYS: [&str; 4] =
    [KEY_ACCESS_TOKEN, KEY_TOKEN_TYPE, KEY_EXPIRES_AT, KEY_SCOPE];

/// A successful token response, reduced to what tokenkeeper uses
/// (`oauth::response` reads it).
pub struct IssuedToken {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: Option<Duration>,
    pub refresh_token: Option<String>,
    /// `refresh_token_expires_in`, sent by some providers (GitHub, for one).
    pub refresh_token_expires_in: Option<Duration>,
    pub scope: Option<String>,
    /// Every field RFC 6749 does not name.
    pub extra: Map<String, Value>,
    /// What was odd about the answer but clear, in words for the status.
    pub oddities: Vec<String>,
}

/// The longest id_token read for the account's name.
const ID_TOKEN_MAX: usize = 16 * 1024;
/// The longest account name shown.
const ACCOUNT_MAX: usize = 128;

impl IssuedToken {
    /// The provider account the grant is for, when the answer names it: the
    /// id_token's `email`, `preferred_username` or `sub` (OpenID Connect).
    /// The id_token comes straight from the token endpoint over TLS, so its
    /// claims are read without checking its signature (OIDC Core 3.1.3.7).
    pub fn account(&self) -> Option<String> {
        let id_token = self.extra.get("id_token")?.as_str()?;
        if id_token.len() > ID_TOKEN_MAX {
            return None;
        }
        let payload = id_token.split('.').nth(1)?;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: Map<String, Value> = serde_json::from_slice(&claims).ok()?;
        let name = ["email", "preferred_username", "sub"]
            .iter()
            .find_map(|claim| claims.get(*claim)?.as_str().filter(|v| !v.is_empty()))?;
        let shown: String = name
            .chars()
            .filter(|c| !c.is_control())
            .take(ACCOUNT_MAX)
            .collect();
        (!shown.is_empty()).then_some(shown)
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("scope", &self.scope)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .field("oddities", &self.oddities)
            .finish_non_exhaustive()
    }
}

impl IssuedToken {
    /// When the refresh token expires, for a token issued at `issued_at`.
    pub fn refresh_token_expires_at(&self, issued_at: Timestamp) -> Option<Timestamp> {
        let lifetime = SignedDuration::try_from(self.refresh_token_expires_in?).ok()?;
        issued_at.checked_add(lifetime).ok()
    }

    /// A response field as text, for the target Secret.
    /// Only scalars are copied: an object or a list from a provider is
    /// not what an API call needs, and could carry anything.
    pub fn field(&self, name: &str) -> Option<String> {
        match self.extra.get(name)? {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            Value::Bool(flag) => Some(flag.to_string()),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
        }
    }
}

/// A failed token request, as seen on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenFailure {
    /// An OAuth error response (RFC 6749 section 5.2).
    OAuth {
        status: u16,
        /// The `error` field; empty when the body has none (a provider's
        /// own envelope, such as HubSpot's `status`/`message`).
        code: String,
        description: Option<String>,
        /// The body's top-level fields as text (arrays as their elements),
        /// for the provider's error dialect; bounded.
        fields: BTreeMap<String, Vec<String>>,
    },
    /// An HTTP answer that is not an OAuth response: 5xx, 429, or a body
    /// that is not JSON.
    Http {
        status: u16,
        retry_after: Option<Duration>,
        content_type: Option<String>,
    },
    /// No answer: connection refused, DNS, TLS, timeout.
    Transport { detail: String },
    /// Not sent: the endpoint's name resolves only to addresses the
    /// operator does not send to (`detail` names the rule).
    Denied { detail: String },
    /// A 2xx answer that is not a usable token response (`what` says why,
    /// never quoting it). It may carry a refresh token all the same, which
    /// the provider may have rotated already: it must not be lost.
    Malformed {
        what: String,
        refresh_token: Option<RotatedRefreshToken>,
    },
}

impl TokenFailure {
    /// The refresh token a failed answer carried, if any.
    pub fn rotated_refresh_token(&self) -> Option<&str> {
        match self {
            TokenFailure::Malformed {
                refresh_token: Some(token),
                ..
            } => Some(&token.0),
            _ => None,
        }
    }
}

/// A refresh token from an answer that was otherwise unusable.
#[derive(Clone, PartialEq)]
pub struct RotatedRefreshToken(pub String);

impl fmt::Debug for RotatedRefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One access token as the provider issued it.
#[derive(Clone, PartialEq)]
pub struct TokenRecord {
    pub access_token: String,
    pub token_type: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// The provider sent no `expires_in`; `expires_at` is the configured
    /// default lifetime.
    pub lifetime_assumed: bool,
    /// Granted scopes, space-separated, when the provider said.
    pub scope: Option<String>,
    /// Response fields the connection copies into the target Secret.
    pub fields: BTreeMap<String, String>,
    /// Fingerprint of the token request settings that produced the token;
    /// a different one means the spec changed and a new token is needed.
    pub request_hash: String,
    /// What the verification request said when it refused this token
    /// (403), for example `GET https://api/me answered 403 (insufficient_scope)`.
    pub verification_denied: Option<String>,
    /// What was odd but clear in the answer that issued the token, for
    /// the status ("expires_in was a string").
    pub oddities: Option<String>,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenRecord {
    /// The scopes granted; split at spaces, and at commas for the
    /// providers that separate scopes with them (Slack, Shopify, Zoom).
    pub fn granted_scopes(&self) -> Vec<String> {
        self.scope
            .as_deref()
            .unwrap_or_default()
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// The data of the target Secret.
    pub fn target_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        put(&mut data, KEY_ACCESS_TOKEN, &self.access_token);
        put(&mut data, KEY_TOKEN_TYPE, &self.token_type);
        put(&mut data, KEY_EXPIRES_AT, &rfc3339(self.expires_at));
        put(
            &mut data,
            KEY_SCOPE,
            self.scope.as_deref().unwrap_or_default(),
        );
        for (key, value) in &self.fields {
            put(&mut data, key, value);
        }
        data
    }

    /// Annotations of the target Secret; `next_refresh_at` is when
    /// tokenkeeper plans to replace this token.
    pub fn target_annotations(
        &self,
        next_refresh_at: Option<Timestamp>,
    ) -> BTreeMap<String, String> {
        let mut annotations = BTreeMap::new();
        if let Some(at) = next_refresh_at {
            // To the millisecond: due times spread connections within a second.
            let at = Timestamp::from_millisecond(at.as_millisecond()).expect("valid");
            annotations.insert(ANNOTATION_NEXT_REFRESH_AT.to_owned(), at.to_string());
        }
        annotations.insert(ANNOTATION_ISSUED_AT.to_owned(), rfc3339(self.issued_at));
        annotations.insert(
            ANNOTATION_REQUEST_HASH.to_owned(),
            self.request_hash.clone(),
        );
        if self.lifetime_assumed {
            annotations.insert(ANNOTATION_LIFETIME_ASSUMED.to_owned(), "true".to_owned());
        }
        if let Some(denied) = &self.verification_denied {
            annotations.insert(ANNOTATION_VERIFICATION_DENIED.to_owned(), denied.clone());
        }
        if let Some(oddities) = &self.oddities {
            annotations.insert(ANNOTATION_ODDITIES.to_owned(), oddities.clone());
        }
        annotations
    }

    /// Reads a record back from a target Secret's data and annotations.
    pub fn from_target(
        data: &BTreeMap<String, ByteString>,
        annotations: &BTreeMap<String, String>,
        field_names: &[String],
    ) -> Option<Self> {
        let issued_at = annotations.get(ANNOTATION_ISSUED_AT)?.parse().ok()?;
        Some(TokenRecord {
            access_token: get(data, KEY_ACCESS_TOKEN)?,
            token_type: get(data, KEY_TOKEN_TYPE)?,
            issued_at,
            expires_at: get(data, KEY_EXPIRES_AT)?.parse().ok()?,
            lifetime_assumed: annotations
                .get(ANNOTATION_LIFETIME_ASSUMED)
                .map(String::as_str)
                == Some("true"),
            scope: get(data, KEY_SCOPE).filter(|s| !s.is_empty()),
            fields: field_names
                .iter()
                .filter_map(|name| Some((name.clone(), get(data, name)?)))
                .collect(),
            request_hash: annotations.get(ANNOTATION_REQUEST_HASH)?.clone(),
            verification_denied: annotations.get(ANNOTATION_VERIFICATION_DENIED).cloned(),
            oddities: annotations.get(ANNOTATION_ODDITIES).cloned(),
        })
    }
}

impl TokenRecord {
    /// The record of a token the provider just issued. Without
    /// `expires_in` the token is taken to live `lifetimes.default`, and no
    /// longer than `lifetimes.max` in any case; without `scope` it has the
    /// scopes of `scope_if_unsaid` (RFC 6749 section 5.1).
    pub fn issued(
        now: Timestamp,
        issued: &IssuedToken,
        lifetimes: Lifetimes,
        scope_if_unsaid: Option<String>,
        field_names: &[String],
        request_hash: &str,
    ) -> Self {
        let issued_at = truncate_to_seconds(now);
        let mut oddities = issued.oddities.clone();
        let said = issued
            .expires_in
            .map(|d| SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX));
        let lifetime = match said {
            Some(said) if said > lifetimes.max => {
                oddities.push(format!(
                    "a lifetime of {} s was clamped to {} s (--max-token-lifetime-seconds)",
                    said.as_secs(),
                    lifetimes.max.as_secs()
                ));
                lifetimes.max
            }
            Some(said) => said,
            None => lifetimes.default,
        };
        TokenRecord {
            access_token: issued.access_token.clone(),
            token_type: issued.token_type.clone(),
            issued_at,
            expires_at: issued_at.checked_add(lifetime).unwrap_or(Timestamp::MAX),
            lifetime_assumed: issued.expires_in.is_none(),
            scope: issued
                .scope
                .clone()
                .or(scope_if_unsaid)
                .filter(|s| !s.is_empty()),
            fields: field_names
                .iter()
                .filter_map(|name| Some((name.clone(), issued.field(name)?)))
                .collect(),
            request_hash: request_hash.to_owned(),
            verification_denied: None,
            oddities: (!oddities.is_empty()).then(|| oddities.join("; ")),
        }
    }
}

/// How long a token just issued is taken to live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// When the provider does not say (`defaultTokenLifetime`).
    pub default: SignedDuration,
    /// The most taken from any answer (`--max-token-lifetime-seconds`).
    pub max: SignedDuration,
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

/// SHA-256 hex of a value: fingerprints of tokens and settings, stored only
/// in the operator-private state and annotations, never shown to users.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // A refresh computes several fingerprints: one allocation each, not
    // one per byte.
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

pub(crate) fn put(data: &mut BTreeMap<String, ByteString>, key: &str, value: &str) {
    data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
}

pub(crate) fn get(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    String::from_utf8(data.get(key)?.0.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::state_secret::GrantState;

    fn record() -> TokenRecord {
        TokenRecord {
            access_token: "at-secret-value".into(),
            token_type: "Bearer".into(),
            issued_at: Timestamp::from_second(1_000).unwrap(),
            expires_at: Timestamp::from_second(4_600).unwrap(),
            lifetime_assumed: false,
            scope: Some("crm.read crm.write".into()),
            fields: BTreeMap::from([("instance_url".into(), "https://eu.crm.test".into())]),
            request_hash: "abc".into(),
            verification_denied: None,
            oddities: None,
        }
    }

    fn with_id_token(claims: serde_json::Value) -> IssuedToken {
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims).unwrap());
        let mut extra = Map::new();
        extra.insert(
            "id_token".into(),
            Value::String(format!("eyJhbGciOiJub25lIn0.{payload}.sig")),
        );
        IssuedToken {
            access_token: "at".into(),
            token_type: "Bearer".into(),
            expires_in: None,
            refresh_token: None,
            refresh_token_expires_in: None,
            scope: None,
            extra,
            oddities: Vec::new(),
        }
    }

    #[test]
    fn the_account_is_read_from_the_id_token() {
        let named = |claims| with_id_token(claims).account();
        assert_eq!(
            named(serde_json::json!({"sub": "123", "email": "ann@example.com"})).as_deref(),
            Some("ann@example.com")
        );
        assert_eq!(
            named(serde_json::json!({"sub": "alice"})).as_deref(),
            Some("alice")
        );
        assert_eq!(
            named(serde_json::json!({"sub": "a\u{1b}[2Jb"})).as_deref(),
            Some("a[2Jb")
        );
        assert_eq!(named(serde_json::json!({"sub": ""})), None);
        assert_eq!(
            named(serde_json::json!({"sub": "x".repeat(500)}))
                .unwrap()
                .len(),
            128
        );
        let mut garbage = with_id_token(serde_json::json!({}));
        garbage
            .extra
            .insert("id_token".into(), Value::String("not.a-jwt!".into()));
        assert_eq!(garbage.account(), None);
        garbage.extra.insert("id_token".into(), Value::Bool(true));
        assert_eq!(garbage.account(), None);
    }

    #[test]
    fn target_round_trip() {
        let record = record();
        let data = record.target_data();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            [
                "access_token",
                "expires_at",
                "instance_url",
                "scope",
                "token_type"
            ]
        );
        assert_eq!(data["expires_at"].0, b"1970-01-01T01:16:40Z");
        let back = TokenRecord::from_target(
            &data,
            &record.target_annotations(None),
            &["instance_url".into()],
        );
        assert_eq!(back, Some(record));
    }

    #[test]
    fn target_never_holds_the_refresh_token() {
        let state = GrantState {
            refresh_token: Some("rt-secret".into()),
            token: Some(record()),
            ..Default::default()
        };
        let data = state.to_data(|_| "sealed".into());
        assert!(!data.contains_key("refresh_token"));
        assert!(
            data.values()
                .all(|v| !String::from_utf8_lossy(&v.0).contains("rt-secret"))
        );
        assert!(
            !state
                .token
                .unwrap()
                .target_data()
                .contains_key("refresh_token")
        );
    }

    #[test]
    fn state_round_trip() {
        let state = GrantState {
            refresh_token: Some("rt".into()),
            refresh_token_expires_at: Some(Timestamp::from_second(9_000).unwrap()),
            imported_hash: Some(fingerprint(&["rt0"])),
            account: Some("ann@example.com".into()),
            consent_id: None,
            redirect_values: BTreeMap::from([("realmId".to_owned(), "9130".to_owned())]),
            token: Some(TokenRecord {
                lifetime_assumed: true,
                ..record()
            }),
        };
        let grant = state.grant();
        let data = state.to_data(|_| "sealed".into());
        assert_eq!(
            GrantState::from_data(&data, &["instance_url".into()], |sealed| {
                assert_eq!(sealed, "sealed");
                grant
            }),
            GrantState {
                consent_id: Some(fingerprint(&["sealed"])),
                ..state.clone()
            }
        );
        let unopened = GrantState::from_data(&data, &["instance_url".into()], |_| None);
        assert_eq!(unopened.refresh_token, None);
        assert_eq!(unopened.token, state.token);
        assert_eq!(
            GrantState::from_data(&BTreeMap::new(), &[], |_| None),
            GrantState::default()
        );
    }

    #[test]
    fn debug_output_redacts_tokens() {
        let state = GrantState {
            refresh_token: Some("rt-secret".into()),
            token: Some(record()),
            ..Default::default()
        };
        let text = format!("{state:?}");
        assert!(
            !text.contains("rt-secret") && !text.contains("at-secret-value"),
            "{text}"
        );
    }

    #[test]
    fn issued_token_without_expires_in_gets_the_default_lifetime() {
        let issued = issued_with([
            ("instance_url", serde_json::json!("https://eu.crm.test")),
            ("id_token", serde_json::json!("not-copied")),
        ]);
        let now = Timestamp::from_millisecond(5_500).unwrap();
        let record = TokenRecord::issued(
            now,
            &issued,
            TEN_MINUTES_AT_MOST_A_DAY,
            Some("crm.read".into()),
            &["instance_url".into()],
            "h",
        );
        assert_eq!(record.issued_at, Timestamp::from_second(5).unwrap());
        assert_eq!(record.expires_at, Timestamp::from_second(605).unwrap());
        assert!(record.lifetime_assumed);
        assert_eq!(record.scope.as_deref(), Some("crm.read"));
        assert_eq!(record.fields.keys().collect::<Vec<_>>(), ["instance_url"]);

        let with_expiry = IssuedToken {
            expires_in: Some(std::time::Duration::from_secs(60)),
            ..issued
        };
        let record =
            TokenRecord::issued(now, &with_expiry, TEN_MINUTES_AT_MOST_A_DAY, None, &[], "h");
        assert_eq!(record.expires_at, Timestamp::from_second(65).unwrap());
        assert!(!record.lifetime_assumed);

        let for_ages = IssuedToken {
            expires_in: Some(std::time::Duration::from_secs(u64::MAX)),
            ..with_expiry
        };
        let record = TokenRecord::issued(now, &for_ages, TEN_MINUTES_AT_MOST_A_DAY, None, &[], "h");
        assert_eq!(
            record.expires_at,
            Timestamp::from_second(5 + 86_400).unwrap()
        );
        let said = record.oddities.unwrap_or_default();
        assert!(said.contains("clamped to 86400 s"), "{said}");
    }

    const TEN_MINUTES_AT_MOST_A_DAY: Lifetimes = Lifetimes {
        default: SignedDuration::from_mins(10),
        max: SignedDuration::from_hours(24),
    };

    /// A Bearer token answer without lifetime or scope, with `extra` fields.
    fn issued_with<const N: usize>(extra: [(&str, serde_json::Value); N]) -> IssuedToken {
        IssuedToken {
            access_token: "at".into(),
            token_type: "Bearer".into(),
            expires_in: None,
            refresh_token: None,
            scope: None,
            extra: extra
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
            refresh_token_expires_in: None,
            oddities: Vec::new(),
        }
    }

    #[test]
    fn only_scalar_response_fields_are_copied() {
        let issued = issued_with([
            ("instance_url", serde_json::json!("https://eu.crm.test")),
            ("realm", serde_json::json!(42)),
            ("sandbox", serde_json::json!(false)),
            ("nested", serde_json::json!({"a": "b"})),
            ("list", serde_json::json!(["a"])),
            ("none", serde_json::Value::Null),
        ]);
        let field = |name| issued.field(name);
        assert_eq!(
            field("instance_url").as_deref(),
            Some("https://eu.crm.test")
        );
        assert_eq!(field("realm").as_deref(), Some("42"));
        assert_eq!(field("sandbox").as_deref(), Some("false"));
        for absent in ["nested", "list", "none", "missing"] {
            assert_eq!(field(absent), None, "{absent}");
        }
    }

    #[test]
    fn fingerprints_separate_parts() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
        // Stored fingerprints (imported refresh tokens, requests) must stay
        // comparable across versions: lowercase hex of SHA-256 over
        // length-prefixed parts.
        assert_eq!(
            fingerprint(&["x"]),
            "028f0df5b8596fbcd10c9720b7a4784f8e7e04f629bd5a62bfbdf139678b6624"
        );
    }
}
