//! The one error type. Each variant that a user can act on is a condition
//! reason on the SourceConnection; its message says what is wrong and how
//! to fix it. Messages name Secrets and keys, never their values.

use std::time::Duration;

#[derive(thiserror::Error, Debug)]
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
        "OAuth 2.0 connections are not supported by this version of tokenkeeper yet; \
         nothing was written. Use basic or apiKey, or upgrade tokenkeeper."
    )]
    NotImplemented,

    /// Talking to the Kubernetes API failed; retried with backoff.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// The condition reason users see (CamelCase, stable).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SecretNotFound { .. } => "SecretNotFound",
            Error::MissingKey { .. } => "MissingKey",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::TargetSecretConflict { .. } => "TargetSecretConflict",
            Error::NotImplemented => "NotImplemented",
            Error::Kube(_) => "KubernetesApiError",
        }
    }

    /// Transient errors are retried with backoff and leave the status as it
    /// was; the others are reported in status and wait for a change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Kube(_))
    }

    /// True when the source rejected the credentials (condition
    /// `AuthFailed=True`), as opposed to configuration the operator could
    /// not use.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            Error::SecretNotFound { .. }
            | Error::MissingKey { .. }
            | Error::InvalidSpec(_)
            | Error::TargetSecretConflict { .. }
            | Error::NotImplemented
            | Error::Kube(_) => false,
        }
    }
}

/// Exponential backoff for transient errors: 5 s doubling up to 5 minutes.
pub fn transient_backoff(consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(6);
    Duration::from_secs(5 * (1u64 << exponent)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=9).map(|n| transient_backoff(n).as_secs()).collect();
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
        assert!(!missing.is_transient());
    }
}
