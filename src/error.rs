//! The reasons users see, and the one error type. Every condition reason
//! and event reason is a `Reason`; each error a user can act on maps to
//! one, and its message says what is wrong and how to fix it. Messages name
//! Secrets, keys and endpoints, never the values of tokens or secrets.

use std::fmt;
use std::time::Duration;

/// Every reason a SourceConnection's conditions or events can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `Ready=True`: the target Secret holds the current credentials.
    SecretSynced,
    /// `AuthFailed=False`: the provider has not rejected the credentials.
    NotRejected,
    SecretNotFound,
    MissingKey,
    InvalidSpec,
    TargetSecretConflict,
    AuthorizationRequired,
    InvalidGrant,
    RefreshTokenExpired,
    InsufficientPermissions,
    InvalidClient,
    ProviderUnavailable,
    AccessTokenExpired,
    /// The API server refused the target Secret, or it would exceed the
    /// API's size limits.
    SecretWriteFailed,
    /// A bug in tokenkeeper (a panic) stopped this connection's reconcile.
    InternalError,
    /// GrantExpiring=True: the grant's known end is near.
    GrantExpiring,
    /// GrantExpiring=False: the grant's end is known and not near.
    GrantValid,
    /// Only in the `tokenkeeper_reconcile_errors_total` metric and logs:
    /// API trouble is retried, never a condition.
    KubernetesApiError,
    /// Only in the metric and logs: a replica whose lease lapsed sends no
    /// token request and steps down.
    NotLeading,
    /// Event: a new access token (or a consent) reached the target Secret.
    TokenIssued,
    /// Event: the deleted connection's tokens were revoked at the provider.
    TokensRevoked,
    /// Event: revoking failed and will be retried.
    RevocationFailed,
    /// Event: revoking kept failing and the connection was released anyway.
    RevocationAbandoned,
    /// Event: the Secret a renamed target no longer names was deleted.
    RenamedSecretDeleted,
}

impl Reason {
    /// The reasons a `Ready` or `AuthFailed` condition can carry.
    pub const CONDITIONS: [Reason; 17] = [
        Reason::SecretSynced,
        Reason::NotRejected,
        Reason::SecretNotFound,
        Reason::MissingKey,
        Reason::InvalidSpec,
        Reason::TargetSecretConflict,
        Reason::AuthorizationRequired,
        Reason::InvalidGrant,
        Reason::RefreshTokenExpired,
        Reason::InsufficientPermissions,
        Reason::InvalidClient,
        Reason::ProviderUnavailable,
        Reason::AccessTokenExpired,
        Reason::SecretWriteFailed,
        Reason::InternalError,
        Reason::GrantExpiring,
        Reason::GrantValid,
    ];

    /// The reasons only events carry.
    pub const EVENTS_ONLY: [Reason; 5] = [
        Reason::TokenIssued,
        Reason::TokensRevoked,
        Reason::RevocationFailed,
        Reason::RevocationAbandoned,
        Reason::RenamedSecretDeleted,
    ];

    /// The CamelCase word users see (stable: alerts and scripts match it).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::SecretSynced => "SecretSynced",
            Reason::NotRejected => "NotRejected",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::MissingKey => "MissingKey",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::TargetSecretConflict => "TargetSecretConflict",
            Reason::AuthorizationRequired => "AuthorizationRequired",
            Reason::InvalidGrant => "InvalidGrant",
            Reason::RefreshTokenExpired => "RefreshTokenExpired",
            Reason::InsufficientPermissions => "InsufficientPermissions",
            Reason::InvalidClient => "InvalidClient",
            Reason::ProviderUnavailable => "ProviderUnavailable",
            Reason::AccessTokenExpired => "AccessTokenExpired",
            Reason::SecretWriteFailed => "SecretWriteFailed",
            Reason::InternalError => "InternalError",
            Reason::GrantExpiring => "GrantExpiring",
            Reason::GrantValid => "GrantValid",
            Reason::KubernetesApiError => "KubernetesApiError",
            Reason::NotLeading => "NotLeading",
            Reason::TokenIssued => "TokenIssued",
            Reason::TokensRevoked => "TokensRevoked",
            Reason::RevocationFailed => "RevocationFailed",
            Reason::RevocationAbandoned => "RevocationAbandoned",
            Reason::RenamedSecretDeleted => "RenamedSecretDeleted",
        }
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

    /// The spec is wrong in a way the schema cannot say; the message names
    /// the field and the fix.
    #[error("{0}")]
    InvalidSpec(String),

    #[error(
        "The token endpoint {endpoint} refused the request ({detail}); check spec.oauth2 \
         (grant, scopes, extraTokenParams) against the provider's documentation"
    )]
    RequestRefused { endpoint: String, detail: String },

    #[error(
        "The API server refused to write Secret {namespace}/{name} (HTTP {code}: {message}). {fix}"
    )]
    SecretWriteFailed {
        namespace: String,
        name: String,
        code: u16,
        message: String,
        fix: String,
    },

    #[error(
        "Secret {namespace}/{name} would hold {size} bytes of {part}, more than the API server \
         accepts ({limit}), so tokenkeeper does not write it. {fix}"
    )]
    SecretTooLarge {
        namespace: String,
        name: String,
        part: &'static str,
        size: usize,
        limit: usize,
        fix: &'static str,
    },

    #[error(
        "tokenkeeper hit a bug while reconciling this connection ({detail}); other connections \
         are not affected and this one is retried with backoff. Please report it with the \
         operator's log: kubectl logs -n <operator namespace> deploy/tokenkeeper"
    )]
    Internal { detail: String },

    #[error(
        "Secret {name} exists and is not managed by this SourceConnection, but tokenkeeper \
         keeps the connection's refresh token under that name. Rename the SourceConnection, \
         or delete the Secret: kubectl delete secret {name} -n {namespace}"
    )]
    StateSecretConflict { namespace: String, name: String },

    #[error(
        "Secret {namespace}/{name} ({field}) is not marked as a source tokenkeeper may read: \
         this operator sends only the values of Secrets labelled tokenkeeper.dev/source=true, \
         or naming this connection in their annotation tokenkeeper.dev/source-for, to providers \
         (--require-source-label). If the Secret is meant for SourceConnection {connection}: \
         kubectl label secret {name} -n {namespace} tokenkeeper.dev/source=true"
    )]
    SourceNotAllowed {
        namespace: String,
        name: String,
        field: &'static str,
        connection: String,
    },

    #[error(
        "Secret {namespace}/{name} already exists and is not managed by this SourceConnection, \
         so tokenkeeper will not overwrite it. Set spec.target.name to another name, or delete \
         the Secret: kubectl delete secret {name} -n {namespace}"
    )]
    TargetSecretConflict { namespace: String, name: String },

    #[error("{situation} Open {url} in a browser and grant access on the provider's consent page.")]
    AuthorizationRequired {
        /// Why a consent is needed: none was given yet, or the grant kept
        /// cannot be used (and why).
        situation: String,
        url: String,
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
    #[error("Kubernetes API request failed: {detail}")]
    Kube {
        detail: String,
        /// No answer came (as opposed to the API refusing the request).
        unreachable: bool,
    },

    /// This replica cannot prove it still holds the leader lease, so it
    /// sends no token request; it steps down.
    #[error("the leader lease was not renewed in time; no token request is sent")]
    NotLeading,
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube {
            unreachable: !matches!(error, kube::Error::Api(_)),
            detail: error.to_string(),
        }
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
    /// The condition reason users see.
    pub fn reason(&self) -> Reason {
        match self {
            Error::SecretNotFound { .. } => Reason::SecretNotFound,
            Error::MissingKey { .. } => Reason::MissingKey,
            // What the user wrote in the spec is what must change.
            Error::InvalidSpec(_)
            | Error::RequestRefused { .. }
            | Error::StateSecretConflict { .. }
            | Error::SourceNotAllowed { .. } => Reason::InvalidSpec,
            Error::SecretWriteFailed { .. } | Error::SecretTooLarge { .. } => {
                Reason::SecretWriteFailed
            }
            Error::Internal { .. } => Reason::InternalError,
            Error::TargetSecretConflict { .. } => Reason::TargetSecretConflict,
            Error::AuthorizationRequired { .. } => Reason::AuthorizationRequired,
            Error::InvalidGrant { .. } => Reason::InvalidGrant,
            Error::RefreshTokenExpired { .. } => Reason::RefreshTokenExpired,
            Error::InsufficientPermissions { .. } => Reason::InsufficientPermissions,
            Error::InvalidClient { .. } => Reason::InvalidClient,
            Error::ProviderUnavailable { .. } => Reason::ProviderUnavailable,
            // A token the provider refuses right after issuing it is, to
            // the user, a connection without a usable token.
            Error::AccessTokenRejected { .. } => Reason::AccessTokenExpired,
            Error::Kube { .. } => Reason::KubernetesApiError,
            Error::NotLeading => Reason::NotLeading,
        }
    }

    /// Whether the Kubernetes API gave no answer at all.
    pub fn is_api_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Kube {
                unreachable: true,
                ..
            }
        )
    }

    pub fn retry(&self) -> Retry {
        match self {
            Error::Kube { .. } | Error::NotLeading => Retry::Infrastructure,
            Error::ProviderUnavailable { .. }
            | Error::AccessTokenRejected { .. }
            | Error::SecretWriteFailed { .. }
            | Error::SecretTooLarge { .. }
            | Error::Internal { .. } => Retry::Backoff,
            Error::SecretNotFound { .. }
            | Error::MissingKey { .. }
            | Error::InvalidSpec(_)
            | Error::RequestRefused { .. }
            | Error::StateSecretConflict { .. }
            | Error::SourceNotAllowed { .. }
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
            | Error::RequestRefused { .. }
            | Error::SecretWriteFailed { .. }
            | Error::SecretTooLarge { .. }
            | Error::Internal { .. }
            | Error::StateSecretConflict { .. }
            | Error::SourceNotAllowed { .. }
            | Error::TargetSecretConflict { .. }
            | Error::AuthorizationRequired { .. }
            | Error::ProviderUnavailable { .. }
            | Error::AccessTokenRejected { .. }
            | Error::Kube { .. }
            | Error::NotLeading => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(missing.reason(), Reason::SecretNotFound);
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
