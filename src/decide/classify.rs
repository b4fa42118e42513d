//! Classifies what the token endpoint answered into the reasons users see
//! (the reference's error table). Pure.

use std::time::Duration;

use jiff::Timestamp;

use crate::error::Error;
use crate::oauth::token::TokenFailure;
use crate::time::rfc3339;

/// What the classifier needs to know besides the failure.
pub struct FailureContext<'a> {
    pub now: Timestamp,
    pub token_endpoint: &'a str,
    /// When the refresh token used is known to expire.
    pub refresh_token_expires_at: Option<Timestamp>,
    /// The kubectl command (or steps) that gives the connection a new grant.
    pub reauthorize_fix: &'a str,
    pub client_secret_namespace: &'a str,
    pub client_secret_name: &'a str,
    /// A longer `Retry-After` is clamped to this, so that no provider
    /// parks a connection for days.
    pub max_retry_after: Duration,
}

pub fn classify(failure: &TokenFailure, context: &FailureContext<'_>) -> Error {
    let unavailable = |detail: String, retry_after: Option<Duration>| Error::ProviderUnavailable {
        endpoint: context.token_endpoint.to_owned(),
        detail,
        retry_after: retry_after.map(|wait| wait.min(context.max_retry_after)),
    };
    match failure {
        TokenFailure::OAuth {
            status,
            code,
            description,
        } => {
            // The provider's words are shown, but no more of them than a
            // person needs: a code is clipped like a description.
            let detail = |code: &str| match description {
                Some(text) if !text.is_empty() => format!("{}: {}", clip(code), clip(text)),
                _ => clip(code),
            };
            match code.as_str() {
                "invalid_grant" => {
                    let said_expired = description
                        .as_deref()
                        .is_some_and(|d| d.to_lowercase().contains("expired"));
                    let known_expired = context
                        .refresh_token_expires_at
                        .filter(|at| *at <= context.now);
                    if said_expired || known_expired.is_some() {
                        Error::RefreshTokenExpired {
                            detail: match known_expired {
                                Some(at) => format!(" at {} (invalid_grant)", rfc3339(at)),
                                None => format!(" ({})", detail("invalid_grant")),
                            },
                            fix: context.reauthorize_fix.to_owned(),
                        }
                    } else {
                        Error::InvalidGrant {
                            detail: description
                                .as_deref()
                                .filter(|d| !d.is_empty())
                                .map(|d| format!(": {}", clip(d)))
                                .unwrap_or_default(),
                            fix: context.reauthorize_fix.to_owned(),
                        }
                    }
                }
                "invalid_scope" | "insufficient_scope" | "insufficient_permissions" => {
                    Error::InsufficientPermissions {
                        detail: format!("the provider answered {}", detail(code)),
                        fix: context.reauthorize_fix.to_owned(),
                    }
                }
                "invalid_client" | "unauthorized_client" => Error::InvalidClient {
                    detail: detail(code),
                    namespace: context.client_secret_namespace.to_owned(),
                    secret: context.client_secret_name.to_owned(),
                },
                "temporarily_unavailable" | "server_error" => {
                    unavailable(format!("HTTP {status}, {}", detail(code)), None)
                }
                _ if *status >= 500 => {
                    unavailable(format!("HTTP {status}, {}", detail(code)), None)
                }
                _ => Error::RequestRefused {
                    endpoint: context.token_endpoint.to_owned(),
                    detail: detail(code),
                },
            }
        }
        TokenFailure::Http {
            status,
            retry_after,
            content_type,
        } => {
            let mut detail = format!("HTTP {status}");
            if *status == 429 {
                detail.push_str(" Too Many Requests");
            }
            if let Some(wait) = retry_after {
                detail.push_str(&format!(", Retry-After {} s", wait.as_secs()));
                if *wait > context.max_retry_after {
                    detail.push_str(&format!(
                        " (waiting {} s at most, --max-retry-after-seconds)",
                        context.max_retry_after.as_secs()
                    ));
                }
            }
            if let Some(kind) = content_type.as_deref().filter(|t| !t.contains("json")) {
                detail.push_str(&format!(", answered with a non-JSON body ({kind})"));
            }
            unavailable(detail, *retry_after)
        }
        TokenFailure::Transport { detail } => unavailable(detail.clone(), None),
        TokenFailure::Denied { detail } => Error::InvalidSpec(format!(
            "{} was not sent to: {detail}. Point the URL at the provider.",
            context.token_endpoint
        )),
        TokenFailure::Malformed { what, .. } => unavailable(format!("it answered {what}"), None),
    }
}

/// Provider texts go into conditions and events: keep them short.
fn clip(text: &str) -> String {
    const LIMIT: usize = 200;
    if text.chars().count() <= LIMIT {
        text.to_owned()
    } else {
        format!("{}...", text.chars().take(LIMIT).collect::<String>())
    }
}

/// What a verification request said about a fresh access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerificationAnswer {
    Accepted,
    /// HTTP 401: the token itself is refused.
    Unauthorized {
        detail: String,
    },
    /// HTTP 403 or `insufficient_scope`: the token lacks permissions.
    Forbidden {
        detail: String,
    },
    /// No usable answer (5xx, timeout): says nothing about the token.
    Inconclusive {
        detail: String,
    },
}

/// Classifies a verification answer by status and `WWW-Authenticate`
/// (RFC 6750 section 3.1).
pub fn classify_verification(status: u16, www_authenticate: Option<&str>) -> VerificationAnswer {
    let error_code = www_authenticate.and_then(|header| {
        let start = header.find("error=\"")? + "error=\"".len();
        let end = header[start..].find('"')? + start;
        Some(header[start..end].to_owned())
    });
    let detail = match &error_code {
        Some(code) => format!(", {code}"),
        None => String::new(),
    };
    match status {
        200..=299 if error_code.is_none() => VerificationAnswer::Accepted,
        403 => VerificationAnswer::Forbidden {
            detail: format!("HTTP 403{detail}"),
        },
        _ if error_code.as_deref() == Some("insufficient_scope") => VerificationAnswer::Forbidden {
            detail: format!("HTTP {status}{detail}"),
        },
        401 => VerificationAnswer::Unauthorized { detail },
        _ => VerificationAnswer::Inconclusive {
            detail: format!("HTTP {status}{detail}"),
        },
    }
}

/// Required scopes the grant lacks, or `None` when the provider did not say
/// which scopes it granted (RFC 6749: the scope is then as requested).
pub fn missing_scopes(required: &[String], granted: Option<&[String]>) -> Vec<String> {
    match granted {
        None => Vec::new(),
        Some(granted) => required
            .iter()
            .filter(|s| !granted.contains(s))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(now: i64, rt_expires: Option<i64>) -> FailureContext<'static> {
        FailureContext {
            now: Timestamp::from_second(now).unwrap(),
            token_endpoint: "https://crm.test/token",
            refresh_token_expires_at: rt_expires.map(|s| Timestamp::from_second(s).unwrap()),
            reauthorize_fix: "kubectl create secret ...",
            client_secret_namespace: "extract",
            client_secret_name: "crm-client",
            max_retry_after: Duration::from_secs(3600),
        }
    }

    fn oauth(status: u16, code: &str, description: Option<&str>) -> TokenFailure {
        TokenFailure::OAuth {
            status,
            code: code.into(),
            description: description.map(Into::into),
        }
    }

    #[test]
    fn the_reference_error_table() {
        let ctx = context(100, None);
        let cases = [
            (
                oauth(400, "invalid_grant", Some("grant request is invalid")),
                "InvalidGrant",
            ),
            (
                oauth(400, "invalid_grant", Some("refresh token is expired")),
                "RefreshTokenExpired",
            ),
            (oauth(400, "invalid_scope", None), "InsufficientPermissions"),
            (
                oauth(403, "insufficient_scope", None),
                "InsufficientPermissions",
            ),
            (
                oauth(401, "invalid_client", Some("client authentication failed")),
                "InvalidClient",
            ),
            (oauth(400, "unauthorized_client", None), "InvalidClient"),
            (
                oauth(503, "temporarily_unavailable", None),
                "ProviderUnavailable",
            ),
            (oauth(500, "server_error", None), "ProviderUnavailable"),
            (oauth(502, "weird", None), "ProviderUnavailable"),
            (oauth(400, "unsupported_grant_type", None), "InvalidSpec"),
            (
                TokenFailure::Http {
                    status: 503,
                    retry_after: None,
                    content_type: None,
                },
                "ProviderUnavailable",
            ),
            (
                TokenFailure::Http {
                    status: 200,
                    retry_after: None,
                    content_type: Some("text/html".into()),
                },
                "ProviderUnavailable",
            ),
            (
                TokenFailure::Transport {
                    detail: "timed out".into(),
                },
                "ProviderUnavailable",
            ),
            (
                TokenFailure::Malformed {
                    what: "an answer without an access_token".into(),
                    refresh_token: None,
                },
                "ProviderUnavailable",
            ),
        ];
        for (failure, reason) in cases {
            assert_eq!(classify(&failure, &ctx).reason(), reason, "{failure:?}");
        }
    }

    #[test]
    fn a_known_refresh_token_lifetime_turns_invalid_grant_into_expired() {
        let failure = oauth(400, "invalid_grant", Some("grant request is invalid"));
        let expired = classify(&failure, &context(100, Some(90)));
        assert_eq!(expired.reason(), "RefreshTokenExpired");
        assert!(
            expired.to_string().contains("1970-01-01T00:01:30Z"),
            "{expired}"
        );
        assert_eq!(
            classify(&failure, &context(100, Some(200))).reason(),
            "InvalidGrant"
        );
    }

    #[test]
    fn a_retry_after_beyond_the_limit_is_clamped_and_said() {
        let failure = TokenFailure::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(u64::MAX)),
            content_type: None,
        };
        let error = classify(&failure, &context(0, None));
        assert!(matches!(
            error,
            Error::ProviderUnavailable { retry_after: Some(d), .. } if d == Duration::from_secs(3600)
        ));
        assert!(
            error.to_string().contains("waiting 3600 s at most"),
            "{error}"
        );
    }

    #[test]
    fn retry_after_is_kept_and_shown() {
        let failure = TokenFailure::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
            content_type: Some("application/json".into()),
        };
        let error = classify(&failure, &context(0, None));
        assert!(matches!(
            error,
            Error::ProviderUnavailable { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(
            error
                .to_string()
                .contains("HTTP 429 Too Many Requests, Retry-After 7 s"),
            "{error}"
        );
    }

    #[test]
    fn messages_carry_cause_and_fix() {
        let error = classify(&oauth(401, "invalid_client", None), &context(0, None));
        let text = error.to_string();
        assert!(
            text.contains("kubectl edit secret crm-client -n extract"),
            "{text}"
        );
        let error = classify(&oauth(400, "invalid_grant", None), &context(0, None));
        assert!(
            error.to_string().contains("kubectl create secret ..."),
            "{error}"
        );
    }

    #[test]
    fn verification_answers() {
        assert_eq!(
            classify_verification(200, None),
            VerificationAnswer::Accepted
        );
        assert_eq!(
            classify_verification(
                403,
                Some(r#"Bearer error="insufficient_scope", scope="crm.write""#)
            ),
            VerificationAnswer::Forbidden {
                detail: "HTTP 403, insufficient_scope".into()
            }
        );
        assert_eq!(
            classify_verification(400, Some(r#"Bearer error="insufficient_scope""#)),
            VerificationAnswer::Forbidden {
                detail: "HTTP 400, insufficient_scope".into()
            }
        );
        assert_eq!(
            classify_verification(401, Some(r#"Bearer error="invalid_token""#)),
            VerificationAnswer::Unauthorized {
                detail: ", invalid_token".into()
            }
        );
        assert!(matches!(
            classify_verification(503, None),
            VerificationAnswer::Inconclusive { .. }
        ));
    }

    #[test]
    fn missing_scopes_only_when_the_provider_said() {
        let required = vec!["crm.read".to_owned(), "crm.write".to_owned()];
        let granted = vec!["crm.read".to_owned()];
        assert_eq!(
            missing_scopes(&required, Some(&granted)),
            vec!["crm.write".to_owned()]
        );
        assert!(missing_scopes(&required, None).is_empty());
    }
}
