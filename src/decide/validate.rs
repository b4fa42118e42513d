//! Checks of a SourceConnection's spec beyond what the CRD schema can say:
//! which one method it names, whether its references and endpoints are
//! usable. Pure: no I/O.

use std::time::Duration;

use jiff::SignedDuration;
use kube::ResourceExt;

use crate::api::{
    ApiKeyAuth, BasicAuth, LABEL_CONNECTION, LABEL_MANAGED_BY, LABEL_SECRET_ROLE, OAuth2Auth,
    OAuth2Grant, SourceConnection,
};
use crate::decide::refresh::{FALLBACK_TOKEN_LIFETIME, Limits, Schedule, parse_duration};
use crate::error::Error;
use crate::oauth::token::{KEY_REFRESH_TOKEN, Lifetimes, RESERVED_TARGET_KEYS};
use crate::time::humanize;

/// The one authentication method a valid spec names.
#[derive(Debug, Clone, Copy)]
pub enum Method<'a> {
    /// Credentials copied from the user's Secret as they are.
    Static(StaticMethod<'a>),
    OAuth2(&'a OAuth2Auth),
}

#[derive(Debug, Clone, Copy)]
pub enum StaticMethod<'a> {
    Basic(&'a BasicAuth),
    ApiKey(&'a ApiKeyAuth),
}

/// Checks what the CRD schema cannot: exactly one method, no reference into
/// another namespace, and a target Secret that is not one of the inputs.
pub fn validate(conn: &SourceConnection) -> Result<Method<'_>, Error> {
    let spec = &conn.spec;
    let namespace = conn.namespace().unwrap_or_default();
    let mut methods = Vec::new();
    if let Some(basic) = &spec.basic {
        methods.push(Method::Static(StaticMethod::Basic(basic)));
    }
    if let Some(api_key) = &spec.api_key {
        methods.push(Method::Static(StaticMethod::ApiKey(api_key)));
    }
    if let Some(oauth2) = &spec.oauth2 {
        methods.push(Method::OAuth2(oauth2));
    }
    let method = match methods.as_slice() {
        [one] => *one,
        [] => {
            return Err(Error::InvalidSpec(
                "spec names no authentication method: set exactly one of spec.basic, \
                 spec.apiKey or spec.oauth2"
                    .into(),
            ));
        }
        _ => {
            return Err(Error::InvalidSpec(
                "spec names more than one authentication method: keep exactly one of \
                 spec.basic, spec.apiKey or spec.oauth2"
                    .into(),
            ));
        }
    };

    let references: Vec<(&str, Option<&str>)> = match method {
        Method::Static(StaticMethod::Basic(basic)) => {
            vec![("basic.secretRef", basic.secret_ref.namespace.as_deref())]
        }
        Method::Static(StaticMethod::ApiKey(api_key)) => {
            vec![("apiKey.secretRef", api_key.secret_ref.namespace.as_deref())]
        }
        Method::OAuth2(oauth2) => {
            let mut refs = vec![(
                "oauth2.client.secretRef",
                oauth2.client.secret_ref.namespace.as_deref(),
            )];
            if let Some(refresh) = &oauth2.refresh_token_secret_ref {
                refs.push(("oauth2.refreshTokenSecretRef", refresh.namespace.as_deref()));
            }
            refs
        }
    };
    for (field, referenced_namespace) in references {
        if let Some(other) = referenced_namespace.filter(|ns| *ns != namespace) {
            return Err(Error::InvalidSpec(format!(
                "spec.{field}.namespace is \"{other}\", but a SourceConnection may only read \
                 Secrets in its own namespace \"{namespace}\" (otherwise anyone allowed to create \
                 one could read another namespace's Secrets). Copy the Secret into \
                 \"{namespace}\" and remove spec.{field}.namespace."
            )));
        }
    }

    let target = conn.target_secret_name();
    if !is_dns_subdomain(&target) {
        return Err(Error::InvalidSpec(format!(
            "target Secret name \"{target}\" is not a valid Secret name: use lowercase letters, \
             digits, '-' and '.', starting and ending with a letter or digit, at most 253 \
             characters. Set spec.target.name."
        )));
    }
    if matches!(method, Method::OAuth2(_)) {
        let state = conn.state_secret_name();
        if target == state || spec.referenced_secret_names().contains(&state.as_str()) {
            return Err(Error::InvalidSpec(format!(
                "Secret \"{state}\" is where tokenkeeper keeps this connection's refresh token; \
                 it cannot also be the target or an input. Use other names."
            )));
        }
    }
    if spec.referenced_secret_names().contains(&target.as_str()) {
        return Err(Error::InvalidSpec(format!(
            "target Secret \"{target}\" is also a Secret this connection reads from; writing it \
             would overwrite the input. Set spec.target.name to another name."
        )));
    }
    for reserved in [LABEL_MANAGED_BY, LABEL_CONNECTION, LABEL_SECRET_ROLE] {
        if spec.target.labels.contains_key(reserved) {
            return Err(Error::InvalidSpec(format!(
                "spec.target.labels sets \"{reserved}\", which tokenkeeper sets itself to find \
                 the Secrets it manages. Remove it from spec.target.labels."
            )));
        }
    }
    Ok(method)
}

/// OAuth 2.0 settings checked and parsed, within the operator's limits.
pub struct OAuthSettings {
    pub schedule: Schedule,
    pub default_lifetime: SignedDuration,
    /// Longer lifetimes in the provider's answers are clamped to this.
    pub max_lifetime: SignedDuration,
    /// Longer `Retry-After`s are clamped to this.
    pub max_retry_after: Duration,
}

impl OAuthSettings {
    pub fn lifetimes(&self) -> Lifetimes {
        Lifetimes {
            default: self.default_lifetime,
            max: self.max_lifetime,
        }
    }
}

/// Checks an `oauth2` spec beyond what the schema can.
pub fn oauth_settings(oauth: &OAuth2Auth, limits: &Limits) -> Result<OAuthSettings, Error> {
    let invalid = |message: String| Error::InvalidSpec(message);
    limits
        .endpoints
        .check_url("spec.oauth2.tokenUrl", &oauth.token_url)
        .map_err(invalid)?;
    if let Some(authorization) = &oauth.authorization_url {
        limits
            .endpoints
            .check_url("spec.oauth2.authorizationUrl", authorization)
            .map_err(invalid)?;
    }
    if let Some(revocation) = &oauth.revocation_url {
        limits
            .endpoints
            .check_url("spec.oauth2.revocationUrl", revocation)
            .map_err(invalid)?;
    }
    if let Some(introspection) = &oauth.introspection_url {
        limits
            .endpoints
            .check_url("spec.oauth2.introspectionUrl", introspection)
            .map_err(invalid)?;
    }
    if let Some(verification) = &oauth.verification {
        limits
            .endpoints
            .check_url("spec.oauth2.verification.url", &verification.url)
            .map_err(invalid)?;
    }
    match oauth.grant {
        OAuth2Grant::AuthorizationCode if oauth.authorization_url.is_none() => {
            return Err(invalid(
                "spec.oauth2.grant is authorizationCode, but spec.oauth2.authorizationUrl is not \
                 set: name the provider's authorization endpoint."
                    .into(),
            ));
        }
        OAuth2Grant::RefreshToken if oauth.refresh_token_secret_ref.is_none() => {
            return Err(invalid(
                "spec.oauth2.grant is refreshToken, but spec.oauth2.refreshTokenSecretRef is not \
                 set: name the Secret and key that hold the refresh token to start from."
                    .into(),
            ));
        }
        _ => {}
    }
    for field in oauth.response_fields.iter().chain(&oauth.redirect_fields) {
        let reserved = RESERVED_TARGET_KEYS.contains(&field.as_str()) || field == KEY_REFRESH_TOKEN;
        let valid_key = !field.is_empty()
            && field
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if reserved || !valid_key {
            return Err(invalid(format!(
                "spec.oauth2.responseFields lists \"{field}\", which cannot be a key of the \
                 target Secret ({}). Remove it.",
                if reserved {
                    "tokenkeeper sets that key itself, or it is the refresh token"
                } else {
                    "keys are letters, digits, '-', '_' and '.'"
                }
            )));
        }
    }
    let bounded = |field: &str, text: &str| {
        let duration = parse_duration(field, text)?;
        if duration > limits.max_token_lifetime {
            return Err(format!(
                "{field} is {text}, longer than the longest token lifetime this operator takes \
                 ({}, --max-token-lifetime-seconds); write a shorter duration",
                humanize(limits.max_token_lifetime)
            ));
        }
        Ok(duration)
    };
    let refresh_before = oauth
        .refresh_before
        .as_deref()
        .map(|text| bounded("spec.oauth2.refreshBefore", text))
        .transpose()
        .map_err(invalid)?;
    let default_lifetime = oauth
        .default_token_lifetime
        .as_deref()
        .map(|text| bounded("spec.oauth2.defaultTokenLifetime", text))
        .transpose()
        .map_err(invalid)?
        .unwrap_or(FALLBACK_TOKEN_LIFETIME.min(limits.max_token_lifetime));
    Ok(OAuthSettings {
        schedule: Schedule {
            refresh_before,
            min_interval: limits.min_refresh_interval,
            propagation_margin: limits.propagation_margin,
        },
        default_lifetime,
        max_lifetime: limits.max_token_lifetime,
        max_retry_after: limits.max_retry_after,
    })
}

/// RFC 1123 subdomain, the rule for Secret names.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_subdomain_rule() {
        for ok in ["a", "db-credentials", "a.b-c.d1"] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a..b", "a_b", &"x".repeat(254)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
