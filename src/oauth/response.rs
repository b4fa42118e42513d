//! Token endpoint answers as real providers send them (RFC 6749 section 5.1
//! and the ways providers deviate from it): numbers as strings, no
//! `token_type` or one in any case, `scope` as a list or comma-separated,
//! form-encoded bodies, errors in a 2xx body. Whatever was odd but clear is
//! read and said; an answer that cannot be used still gives up the refresh
//! token it carries, since the provider may have rotated it already. Pure.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::oauth::token::{IssuedToken, RotatedRefreshToken, TokenFailure};

/// The fields RFC 6749 names; every other field is kept as an extra.
const STANDARD_FIELDS: [&str; 6] = [
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "scope",
    "refresh_token_expires_in",
];

/// Reads a 2xx answer of the token endpoint.
pub fn parse_success(
    status: u16,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<IssuedToken, TokenFailure> {
    // A page in place of an answer (a proxy's or a maintenance page) is an
    // HTTP failure, said with its content type.
    let Some(fields) = fields_of(body, content_type) else {
        return Err(TokenFailure::Http {
            status,
            retry_after: None,
            content_type: content_type.map(str::to_owned),
        });
    };
    // An error in a 2xx body (GitHub's `error`, Slack's `ok: false`) is
    // an error, whatever else the body holds.
    if text(fields.get("error")).is_some() || fields.get("ok") == Some(&Value::Bool(false)) {
        return Err(oauth_failure(status, &fields));
    }
    let refresh_token = text(fields.get("refresh_token"));
    let access_token = text(fields.get("access_token"));
    let Some(access_token) = access_token else {
        return Err(TokenFailure::Malformed {
            what: "an answer without an access_token".to_owned(),
            refresh_token: refresh_token.map(RotatedRefreshToken),
        });
    };
    let mut oddities = Vec::new();
    let token_type = match fields.get("token_type") {
        Some(Value::String(kind)) if kind.eq_ignore_ascii_case("bearer") => "Bearer".to_owned(),
        Some(Value::String(kind)) if !kind.is_empty() => kind.clone(),
        Some(_) => {
            oddities.push("token_type was not a word; Bearer assumed".to_owned());
            "Bearer".to_owned()
        }
        None => {
            oddities.push("token_type was absent; Bearer assumed".to_owned());
            "Bearer".to_owned()
        }
    };
    let expires_in = lifetime("expires_in", fields.get("expires_in"), &mut oddities);
    let refresh_token_expires_in = lifetime(
        "refresh_token_expires_in",
        fields.get("refresh_token_expires_in"),
        &mut oddities,
    );
    let scope = scope(fields.get("scope"), &mut oddities);
    let extra = fields
        .into_iter()
        .filter(|(name, _)| !STANDARD_FIELDS.contains(&name.as_str()))
        .collect();
    Ok(IssuedToken {
        access_token,
        token_type,
        expires_in,
        refresh_token,
        refresh_token_expires_in,
        scope,
        extra,
        oddities,
    })
}

/// Reads a 4xx answer: an OAuth error (RFC 6749 section 5.2), or the
/// provider's own error envelope, when the body is JSON or a form; `None`
/// when it is neither.
pub fn parse_error(status: u16, body: &[u8], content_type: Option<&str>) -> Option<TokenFailure> {
    let fields = fields_of(body, content_type)?;
    Some(oauth_failure(status, &fields))
}

/// Fields of an error body kept for the dialect rules, and the longest
/// value kept of each.
const ERROR_FIELDS_MAX: usize = 32;
const ERROR_VALUE_MAX: usize = 512;

fn oauth_failure(status: u16, fields: &Map<String, Value>) -> TokenFailure {
    let scalar = |value: &Value| match value {
        Value::String(text) => Some(text.chars().take(ERROR_VALUE_MAX).collect()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    };
    // Fields that may echo a credential are never kept: the failure is
    // logged and may be shown.
    let credential = |name: &str| {
        let name = name.to_ascii_lowercase();
        name == "code"
            || ["token", "secret", "password", "assertion", "verifier"]
                .iter()
                .any(|word| name.contains(word))
    };
    let kept = fields
        .iter()
        .filter(|(name, _)| !credential(name))
        .take(ERROR_FIELDS_MAX)
        .map(|(name, value)| {
            let values: Vec<String> = match value {
                Value::Array(items) => items
                    .iter()
                    .take(ERROR_FIELDS_MAX)
                    .filter_map(scalar)
                    .collect(),
                other => scalar(other).into_iter().collect(),
            };
            (name.clone(), values)
        })
        .filter(|(_, values)| !values.is_empty())
        .collect();
    TokenFailure::OAuth {
        status,
        code: text(fields.get("error")).unwrap_or_default(),
        description: text(fields.get("error_description")).or_else(|| text(fields.get("message"))),
        fields: kept,
    }
}

/// The members of a JSON object, or of a form-encoded body.
fn fields_of(body: &[u8], content_type: Option<&str>) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) {
        return Some(fields);
    }
    let form = content_type.is_some_and(|t| t.contains("x-www-form-urlencoded"));
    form.then(|| {
        url::form_urlencoded::parse(body)
            .map(|(name, value)| (name.into_owned(), Value::String(value.into_owned())))
            .collect()
    })
}

/// A non-empty string field.
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        _ => None,
    }
}

/// A lifetime in seconds, read leniently: a number or a numeric string;
/// zero or less is no lifetime. Any length is read (saturating); the
/// operator's maximum applies where the token is recorded.
fn lifetime(name: &str, value: Option<&Value>, oddities: &mut Vec<String>) -> Option<Duration> {
    let seconds = match value? {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => {
            let parsed = text.trim().parse::<f64>().ok();
            if parsed.is_some() {
                oddities.push(format!("{name} was a string"));
            }
            parsed
        }
        Value::Null => return None,
        _ => None,
    };
    let Some(seconds) = seconds.filter(|s| s.is_finite()) else {
        oddities.push(format!("{name} was not a number; ignored"));
        return None;
    };
    if seconds <= 0.0 {
        let reading = if name == "expires_in" {
            ", so the default lifetime applies"
        } else {
            ""
        };
        oddities.push(format!(
            "{name} was {seconds}; read as not given{reading} (some providers mean \"does not \
             expire\")"
        ));
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds.ceil()).unwrap_or(Duration::MAX))
}

/// The granted scopes, space-separated: from a string (commas taken as
/// separators) or a list of strings.
fn scope(value: Option<&Value>, oddities: &mut Vec<String>) -> Option<String> {
    let words: Vec<String> = match value? {
        Value::String(text) => {
            if text.contains(',') {
                oddities.push("scope was comma-separated".to_owned());
            }
            text.split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }
        Value::Array(items) => {
            oddities.push("scope was a list".to_owned());
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        }
        Value::Null => return None,
        _ => {
            oddities.push("scope was neither a string nor a list; ignored".to_owned());
            return None;
        }
    };
    Some(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: serde_json::Value) -> Result<IssuedToken, TokenFailure> {
        parse_success(200, body.to_string().as_bytes(), Some("application/json"))
    }

    #[test]
    fn a_standard_answer_reads_as_it_is() {
        let issued = json(serde_json::json!({
            "access_token": "at", "token_type": "bearer", "expires_in": 3600,
            "refresh_token": "rt", "scope": "read write", "instance_url": "https://x"
        }))
        .unwrap();
        assert_eq!(issued.token_type, "Bearer");
        assert_eq!(issued.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(issued.refresh_token.as_deref(), Some("rt"));
        assert_eq!(issued.scope.as_deref(), Some("read write"));
        assert_eq!(issued.extra.keys().collect::<Vec<_>>(), ["instance_url"]);
        assert!(issued.oddities.is_empty(), "{:?}", issued.oddities);
    }

    #[test]
    fn numbers_as_strings_and_missing_token_types_are_read_and_said() {
        // Azure AD v1 and LinkedIn.
        let issued = json(serde_json::json!({
            "access_token": "at", "expires_in": "3599", "refresh_token_expires_in": "86400",
            "refresh_token": "rt"
        }))
        .unwrap();
        assert_eq!(issued.expires_in, Some(Duration::from_secs(3599)));
        assert_eq!(
            issued.refresh_token_expires_in,
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(issued.token_type, "Bearer");
        assert_eq!(
            issued.oddities,
            [
                "token_type was absent; Bearer assumed",
                "expires_in was a string",
                "refresh_token_expires_in was a string"
            ]
        );
    }

    #[test]
    fn other_token_types_and_scope_shapes_are_kept() {
        let issued = json(serde_json::json!({
            "access_token": "at", "token_type": "bot", "scope": ["a", "b"]
        }))
        .unwrap();
        assert_eq!(issued.token_type, "bot");
        assert_eq!(issued.scope.as_deref(), Some("a b"));
        let issued = json(serde_json::json!({
            "access_token": "at", "token_type": "Bearer", "scope": "a,b"
        }))
        .unwrap();
        assert_eq!(issued.scope.as_deref(), Some("a b"));
        assert_eq!(issued.oddities, ["scope was comma-separated"]);
    }

    #[test]
    fn lifetimes_out_of_range_are_not_taken_as_they_are() {
        for zero in [serde_json::json!(0), serde_json::json!(-5)] {
            let issued = json(serde_json::json!({"access_token": "at", "expires_in": zero}));
            let issued = issued.unwrap();
            assert_eq!(issued.expires_in, None);
            assert!(
                issued.oddities[1].contains("read as not given"),
                "{:?}",
                issued.oddities
            );
        }
        let huge = json(serde_json::json!({"access_token": "at", "expires_in": 1e12})).unwrap();
        assert_eq!(
            huge.expires_in,
            Some(Duration::from_secs(1_000_000_000_000))
        );
        let beyond = json(serde_json::json!({"access_token": "at", "expires_in": 1e300})).unwrap();
        assert_eq!(beyond.expires_in, Some(Duration::MAX));
        let odd = json(serde_json::json!({"access_token": "at", "expires_in": "soon"})).unwrap();
        assert_eq!(odd.expires_in, None);
    }

    #[test]
    fn an_error_in_a_2xx_body_is_an_error() {
        // GitHub and Slack answer errors with HTTP 200.
        let failure = json(serde_json::json!({"ok": false, "error": "invalid_refresh_token"}));
        assert_eq!(
            failure.unwrap_err(),
            TokenFailure::OAuth {
                status: 200,
                code: "invalid_refresh_token".into(),
                description: None,
                fields: [
                    ("error".to_owned(), vec!["invalid_refresh_token".to_owned()]),
                    ("ok".to_owned(), vec!["false".to_owned()]),
                ]
                .into(),
            }
        );
        let form = parse_success(
            200,
            b"error=bad_refresh_token&error_description=expired",
            Some("application/x-www-form-urlencoded"),
        );
        assert!(
            matches!(form, Err(TokenFailure::OAuth { code, .. }) if code == "bad_refresh_token")
        );
    }

    #[test]
    fn an_unusable_answer_still_gives_up_its_refresh_token() {
        let failure = json(serde_json::json!({"refresh_token": "rotated", "expires_in": 60}));
        let Err(TokenFailure::Malformed {
            refresh_token,
            what,
        }) = failure
        else {
            panic!("malformed");
        };
        assert_eq!(refresh_token, Some(RotatedRefreshToken("rotated".into())));
        assert!(what.contains("access_token"), "{what}");
        assert!(
            !format!("{refresh_token:?}").contains("rotated"),
            "redacted"
        );
        let not_json = parse_success(200, b"<html>", Some("text/html"));
        assert!(matches!(
            not_json,
            Err(TokenFailure::Http { status: 200, .. })
        ));
    }

    #[test]
    fn a_form_encoded_answer_reads_like_json() {
        let issued = parse_success(
            200,
            b"access_token=at&token_type=bearer&expires_in=28800&refresh_token=rt&scope=repo%2Cuser",
            Some("application/x-www-form-urlencoded; charset=utf-8"),
        )
        .unwrap();
        assert_eq!(issued.expires_in, Some(Duration::from_secs(28_800)));
        assert_eq!(issued.scope.as_deref(), Some("repo user"));
    }

    #[test]
    fn error_bodies_of_4xx_answers() {
        let body = br#"{"error":"invalid_grant","error_description":"revoked"}"#;
        assert_eq!(
            parse_error(400, body, Some("application/json")),
            Some(TokenFailure::OAuth {
                status: 400,
                code: "invalid_grant".into(),
                description: Some("revoked".into()),
                fields: [
                    ("error".to_owned(), vec!["invalid_grant".to_owned()]),
                    ("error_description".to_owned(), vec!["revoked".to_owned()]),
                ]
                .into(),
            })
        );
        // A provider's own envelope, without an `error` field.
        let hubspot =
            br#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#;
        let Some(TokenFailure::OAuth {
            code,
            description,
            fields,
            ..
        }) = parse_error(400, hubspot, Some("application/json"))
        else {
            panic!("an error");
        };
        assert_eq!(code, "");
        assert_eq!(
            description.as_deref(),
            Some("missing or unknown refresh token")
        );
        assert_eq!(fields["status"], ["BAD_REFRESH_TOKEN"]);
        let echoing =
            br#"{"error":"invalid_grant","refresh_token":"rt-echoed","client_secret":"s"}"#;
        let Some(TokenFailure::OAuth { fields, .. }) =
            parse_error(400, echoing, Some("application/json"))
        else {
            panic!("an error");
        };
        assert!(!format!("{fields:?}").contains("rt-echoed"), "{fields:?}");
        assert!(!fields.contains_key("client_secret"));
        assert_eq!(parse_error(401, b"nope", Some("text/plain")), None);
    }
}
