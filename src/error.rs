//! The one error type. Each variant that a user can act on is a condition
//! reason on the SourceConnection; its message says what is wrong and how
//! to fix it. Messages name Secrets, keys and endpoints, never the values
//! of tokens or secrets.

use std::time::Duration;

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum Error {
    #[error(
        "Secret {namespace}/{name} (spec.{field}) does not exist. Create it, for example: \
         kubectl create secret generic {name} -n {namespace} {example_literals}"
    )]
    SecretNotFound {
        namespace: String,
        name: String,
        field: &'static str,
        example_literals: String,
    },

    #[error(
        "Secret {namespace}/{name} (spec.{field}) has no non-empty key \"{key}\"{present}. \
         Add it with kubectl edit secret {name} -n {namespace}, or point spec.{field} \
         at the key that holds it."
    )]
    MissingKey {
        namespace: String,
        name: String,
        key: String,
        field: &'static str,
        /// Names of the keys the Secret does have, to spot a typo.
        present: String,
    },

    #[error("{0}")]
    InvalidSpec(String),

    #[error(
        "Secret {namespace}/{name} already exists and is not managed by this SourceConnection, \
         so tokenkeeper will not overwrite it. Set spec.target.name to another name, or delete \
         the Secret: kubectl delete secret {name} -n {namespace}"
    )]
    TargetSecretConflict { namespace: String, name: String },

    #[error(
        "Nobody has authorized SourceConnection {namespace}/{name} yet. Open {url} in a browser \
         and grant access on the provider's consent page."
    )]
    AuthorizationRequired {
        url: String,
        namespace: String,
        name: String,
    },

    #[error(
        "The provider rejected the refresh token (invalid_grant{detail}): the grant was revoked \
         (for example the app was disconnected at the provider) or the refresh token is no \
         longer valid. Re-authorize the connection and store the new refresh token: {fix}"
    )]
    InvalidGrant { detail: String, fix: String },

    #[error(
        "The refresh token expired{detail}. Reconnect the source and re-authorize it, then \
         store the new refresh token: {fix}"
    )]
    RefreshTokenExpired { detail: String, fix: String },

    #[error(
        "The grant lacks permissions the connection needs: {detail}. Restore the permissions \
         at the provider, or re-authorize with the needed scopes and store the new refresh \
         token: {fix}"
    )]
    InsufficientPermissions { detail: String, fix: String },

    #[error(
        "The provider rejected the client credentials ({detail}). Fix the client id and \
         secret in Secret {namespace}/{secret} (kubectl edit secret {secret} -n {namespace}) \
         and check spec.oauth2.client.authMethod (clientSecretBasic or clientSecretPost)."
    )]
    InvalidClient {
        detail: String,
        namespace: String,
        secret: String,
    },

    #[error("The token endpoint {endpoint} is unavailable: {detail}.")]
    ProviderUnavailable {
        endpoint: String,
        detail: String,
        /// How long the provider asked us to wait (HTTP 429/503 Retry-After).
        retry_after: Option<Duration>,
    },

    #[error(
        "The verification request GET {url} refused the access token just issued (HTTP 401{detail}): \
         the provider does not accept its own token, for example because the grant is being \
         revoked or the API is in another region"
    )]
    AccessTokenRejected { url: String, detail: String },

    /// Talking to the Kubernetes API failed; retried with backoff.
    #[error("Kubernetes API request failed: {0}")]
    Kube(String),
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error.to_string())
    }
}

/// What the controller does after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Kubernetes API trouble: retried with in-memory backoff, status untouched.
    Infrastructure,
    /// The provider is unavailable: reported, retried with backoff kept in status.
    Backoff,
    /// Wait for a change to the SourceConnection or its Secrets.
    AwaitChange,
}

impl Error {
    /// The condition reason users see (CamelCase, stable).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SecretNotFound { .. } => "SecretNotFound",
            Error::MissingKey { .. } => "MissingKey",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::TargetSecretConflict { .. } => "TargetSecretConflict",
            Error::AuthorizationRequired { .. } => "AuthorizationRequired",
            Error::InvalidGrant { .. } => "InvalidGrant",
            Error::RefreshTokenExpired { .. } => "RefreshTokenExpired",
            Error::InsufficientPermissions { .. } => "InsufficientPermissions",
            Error::InvalidClient { .. } => "InvalidClient",
            Error::ProviderUnavailable { .. } => "ProviderUnavailable",
            Error::AccessTokenRejected { .. } => "AccessTokenExpired",
            Error::Kube(_) => "KubernetesApiError",
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            Error::Kube(_) => Retry::Infrastructure,
            Error::ProviderUnavailable { .. } | Error::AccessTokenRejected { .. } => Retry::Backoff,
            Error::SecretNotFound { .. }
            | Error::MissingKey { .. }
            | Error::InvalidSpec(_)
            | Error::TargetSecretConflict { .. }
            | Error::AuthorizationRequired { .. }
            | Error::InvalidGrant { .. }
            | Error::RefreshTokenExpired { .. }
            | Error::InsufficientPermissions { .. }
            | Error::InvalidClient { .. } => Retry::AwaitChange,
        }
    }

    /// True when the provider rejected the credentials (condition
    /// `AuthFailed=True`), as opposed to configuration tokenkeeper could
    /// not use or a provider it could not reach.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            Error::InvalidGrant { .. }
            | Error::RefreshTokenExpired { .. }
            | Error::InsufficientPermissions { .. }
            | Error::InvalidClient { .. } => true,
            Error::SecretNotFound { .. }
            | Error::MissingKey { .. }
            | Error::InvalidSpec(_)
            | Error::TargetSecretConflict { .. }
            | Error::AuthorizationRequired { .. }
            | Error::ProviderUnavailable { .. }
            | Error::AccessTokenRejected { .. }
            | Error::Kube(_) => false,
        }
    }
}

/// Exponential backoff for retried errors: 5 s doubling up to 5 minutes.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(6);
    Duration::from_secs(5 * (1u64 << exponent)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn messages_carry_the_fix() {
        let missing = Error::SecretNotFound {
            namespace: "extract".into(),
            name: "db-login".into(),
            field: "basic.secretRef",
            example_literals: "--from-literal=username=USER --from-literal=password=PASSWORD"
                .into(),
        };
        let text = missing.to_string();
        assert!(text.contains("extract/db-login"), "{text}");
        assert!(
            text.contains(
                "kubectl create secret generic db-login -n extract --from-literal=username="
            ),
            "{text}"
        );
        assert_eq!(missing.reason(), "SecretNotFound");
        assert_eq!(missing.retry(), Retry::AwaitChange);
        assert!(!missing.is_auth_failure());
    }

    #[test]
    fn only_rejections_are_auth_failures() {
        let grant = Error::InvalidGrant {
            detail: String::new(),
            fix: "x".into(),
        };
        assert!(grant.is_auth_failure());
        let outage = Error::ProviderUnavailable {
            endpoint: "https://p/token".into(),
            detail: "HTTP 503".into(),
            retry_after: None,
        };
        assert!(!outage.is_auth_failure());
        assert_eq!(outage.retry(), Retry::Backoff);
    }
}
