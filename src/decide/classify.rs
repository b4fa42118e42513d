//! Classifies what the token endpoint answered into the reasons users see
//! (the reference's error table). Pure.

use std::time::Duration;

use jiff::Timestamp;

use crate::error::{Error, Reason};
use crate::oauth::token::TokenFailure;
use crate::providers::{ErrorRule, dialect_reason};
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
    /// The provider's error dialect (its preset's rules).
    pub dialect: &'a [ErrorRule],
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
            fields,
        } => {
            // The provider's words are shown, but no more of them than a
            // person needs: a code is clipped like a description.
            let detail = |code: &str| match description {
                Some(text) if !text.is_empty() && !code.is_empty() => {
                    format!("{}: {}", clip(code), clip(text))
                }
                Some(text) if !text.is_empty() => clip(text),
                _ => clip(code),
            };
            if let Some((reason, rule)) = dialect_reason(context.dialect, *status, fields) {
                let said = fields
                    .get(&rule.field)
                    .and_then(|values| values.first())
                    .map(|value| format!("{} {}", rule.field, clip(value)))
                    .unwrap_or_default();
                let words = match description {
                    Some(text) if !text.is_empty() => format!("{said}: {}", clip(text)),
                    _ => said,
                };
                return rejection(reason.reason(), &words, context);
            }
            match code.as_str() {
                "invalid_grant" => invalid_grant(description.as_deref(), context),
                "invalid_scope" | "insufficient_scope" | "insufficient_permissions" => {
                    rejection(Reason::InsufficientPermissions, &detail(code), context)
                }
                "invalid_client" | "unauthorized_client" => {
                    rejection(Reason::InvalidClient, &detail(code), context)
                }
                "temporarily_unavailable" | "server_error" => {
                    unavailable(format!("HTTP {status}, {}", detail(code)), None)
                }
                _ if *status >= 500 => {
                    unavailable(format!("HTTP {status}, {}", detail(code)), None)
                }
                _ => match words_say(code, description.as_deref(), fields) {
                    Some(Reason::ProviderUnavailable) => {
                        unavailable(format!("HTTP {status}, {}", detail(code)), None)
                    }
                    Some(reason) => rejection(reason, &detail(code), context),
                    None => Error::RequestRefused {
                        endpoint: context.token_endpoint.to_owned(),
                        detail: format!("HTTP {status}, {}", detail(code)),
                    },
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
            // Only 5xx, 429 and a timeout are worth asking again unchanged.
            if (400..500).contains(status) && !matches!(status, 408 | 429) {
                return Error::RequestRefused {
                    endpoint: context.token_endpoint.to_owned(),
                    detail,
                };
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

/// `invalid_grant`: the grant is dead, or its refresh token expired (as
/// the provider says, or as its known lifetime says).
fn invalid_grant(description: Option<&str>, context: &FailureContext<'_>) -> Error {
    let said_expired = description.is_some_and(|d| d.to_lowercase().contains("expired"));
    let known_expired = context
        .refresh_token_expires_at
        .filter(|at| *at <= context.now);
    if said_expired || known_expired.is_some() {
        let detail = match (known_expired, description.filter(|d| !d.is_empty())) {
            (Some(at), _) => format!(" at {} (invalid_grant)", rfc3339(at)),
            (None, Some(d)) => format!(" (invalid_grant: {})", clip(d)),
            (None, None) => " (invalid_grant)".to_owned(),
        };
        return Error::RefreshTokenExpired {
            detail,
            fix: context.reauthorize_fix.to_owned(),
        };
    }
    Error::InvalidGrant {
        detail: description
            .filter(|d| !d.is_empty())
            .map(|d| format!(": {}", clip(d)))
            .unwrap_or_default(),
        fix: context.reauthorize_fix.to_owned(),
    }
}

/// The error of a rejection with `reason`, in the provider's `words`.
fn rejection(reason: Reason, words: &str, context: &FailureContext<'_>) -> Error {
    match reason {
        Reason::InvalidGrant => Error::InvalidGrant {
            detail: format!(": {words}"),
            fix: context.reauthorize_fix.to_owned(),
        },
        Reason::RefreshTokenExpired => Error::RefreshTokenExpired {
            detail: format!(" ({words})"),
            fix: context.reauthorize_fix.to_owned(),
        },
        Reason::InsufficientPermissions => Error::InsufficientPermissions {
            detail: format!("the provider answered {words}"),
            fix: context.reauthorize_fix.to_owned(),
        },
        _ => Error::InvalidClient {
            detail: words.to_owned(),
            namespace: context.client_secret_namespace.to_owned(),
            secret: context.client_secret_name.to_owned(),
        },
    }
}

/// What a 4xx body without a standard code says in words: a client that
/// is refused (the whole app, not one grant), or a refresh token or grant
/// that is missing, unknown, invalid, expired or revoked.
fn words_say(
    code: &str,
    description: Option<&str>,
    fields: &std::collections::BTreeMap<String, Vec<String>>,
) -> Option<Reason> {
    let mut text = format!("{code} {}", description.unwrap_or_default());
    for values in fields.values() {
        for value in values {
            text.push(' ');
            text.push_str(value);
        }
    }
    let text = text.to_lowercase().replace(['_', '-'], " ");
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&["too many requests", "rate limit", "throttl"]) {
        return Some(Reason::ProviderUnavailable);
    }
    let dead = [
        "missing",
        "unknown",
        "invalid",
        "incorrect",
        "expired",
        "revoked",
        "bad ",
    ];
    if has(&[
        "client secret",
        "client id",
        "client credentials",
        "bad client",
    ]) && has(&dead)
    {
        return Some(Reason::InvalidClient);
    }
    if has(&["refresh token", "grant"]) && has(&dead) {
        return Some(Reason::InvalidGrant);
    }
    None
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
            dialect: &[],
        }
    }

    fn oauth(status: u16, code: &str, description: Option<&str>) -> TokenFailure {
        TokenFailure::OAuth {
            status,
            code: code.into(),
            description: description.map(Into::into),
            fields: Default::default(),
        }
    }

    /// A body as a provider sent it, read as the operator reads it.
    fn answered(status: u16, body: &str) -> TokenFailure {
        use crate::oauth::response::{parse_error, parse_success};
        let json = Some("application/json");
        match status {
            200..=299 => parse_success(status, body.as_bytes(), json).unwrap_err(),
            _ => parse_error(status, body.as_bytes(), json).unwrap(),
        }
    }

    #[test]
    fn provider_dialects_name_the_rejection() {
        let preset = |id: &str| crate::providers::preset(id).unwrap().errors.as_slice();
        let with = |dialect| FailureContext {
            dialect,
            ..context(100, None)
        };
        let cases = [
            (
                "hubspot",
                400,
                r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#,
                "InvalidGrant",
            ),
            (
                "slack",
                200,
                r#"{"ok":false,"error":"invalid_refresh_token"}"#,
                "InvalidGrant",
            ),
            (
                "github",
                200,
                r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired."}"#,
                "InvalidGrant",
            ),
            (
                "microsoft",
                400,
                r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity.","error_codes":[700082]}"#,
                "RefreshTokenExpired",
            ),
            (
                "microsoft",
                401,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
                "InvalidClient",
            ),
            // Where the generic rules alone would say otherwise: a grant
            // revoked by a password reset says "expired" ...
            (
                "microsoft",
                400,
                r#"{"error":"invalid_grant","error_description":"AADSTS50173: The provided grant has expired due to it being revoked, a fresh auth token is needed.","error_codes":[50173]}"#,
                "InvalidGrant",
            ),
            // ... Atlassian refuses a dead refresh token as a client error ...
            (
                "atlassian",
                403,
                r#"{"error":"unauthorized_client","error_description":"refresh_token is invalid"}"#,
                "InvalidGrant",
            ),
            // ... and Zoho names a revoked one with its own code.
            ("zoho", 400, r#"{"error":"invalid_code"}"#, "InvalidGrant"),
        ];
        // Those three differ without the dialect.
        let generic = context(100, None);
        let differ = cases[5..]
            .iter()
            .filter(|(_, status, body, reason)| {
                classify(&answered(*status, body), &generic).reason() != *reason
            })
            .count();
        assert_eq!(differ, 3);
        for (id, status, body, reason) in cases {
            let error = classify(&answered(status, body), &with(preset(id)));
            assert_eq!(error.reason(), reason, "{id}: {body} -> {error}");
        }
    }

    #[test]
    fn without_a_preset_the_words_of_a_4xx_body_decide() {
        let ctx = context(100, None);
        let cases = [
            (
                400,
                r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#,
                "InvalidGrant",
            ),
            (
                200,
                r#"{"ok":false,"error":"invalid_refresh_token"}"#,
                "InvalidGrant",
            ),
            (
                200,
                r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired."}"#,
                "InvalidGrant",
            ),
            (
                200,
                r#"{"error":"incorrect_client_credentials","error_description":"The client_id and/or client_secret passed are incorrect."}"#,
                "InvalidClient",
            ),
            (
                400,
                r#"{"status":"BAD_CLIENT_SECRET","message":"bad client secret"}"#,
                "InvalidClient",
            ),
            (
                400,
                r#"{"error":"invalid_request","error_description":"The provided authorization grant or refresh token is invalid, expired or revoked"}"#,
                "InvalidGrant",
            ),
            (
                400,
                r#"{"status":"error","message":"something else"}"#,
                "InvalidSpec",
            ),
            (
                503,
                r#"{"status":"error","message":"down"}"#,
                "ProviderUnavailable",
            ),
            (
                400,
                r#"{"error_description":"You have made too many requests continuously. Please try again after some time.","error":"Access Denied","status":"failure"}"#,
                "ProviderUnavailable",
            ),
        ];
        for (status, body, reason) in cases {
            let error = classify(&answered(status, body), &ctx);
            assert_eq!(error.reason(), reason, "{body} -> {error}");
            assert!(!error.to_string().is_empty());
        }
        let html = TokenFailure::Http {
            status: 404,
            retry_after: None,
            content_type: Some("text/html".into()),
        };
        assert_eq!(
            classify(&html, &ctx).reason(),
            "InvalidSpec",
            "a 4xx page is no retry loop"
        );
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
