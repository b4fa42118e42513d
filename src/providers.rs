//! The preset catalogue (`src/providers.yaml`, compiled in): what a
//! `spec.oauth2.provider` fills in, and the provider's error dialect. Data,
//! not code: adding a provider is an entry there plus an emulator test.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::error::Reason;

/// The catalogue as written, keyed by preset id.
static CATALOGUE: LazyLock<BTreeMap<String, Preset>> = LazyLock::new(|| {
    serde_yaml::from_str(include_str!("providers.yaml"))
        .expect("src/providers.yaml is checked by the unit tests")
});

/// Each preset parameter's pattern, compiled once: resolving a preset is on
/// every reconcile's path.
static PATTERNS: LazyLock<BTreeMap<(String, String), Result<regex_lite::Regex, String>>> =
    LazyLock::new(|| {
        CATALOGUE
            .iter()
            .flat_map(|(id, preset)| {
                preset.params.iter().map(move |(name, param)| {
                    let compiled =
                        regex_lite::Regex::new(&param.pattern).map_err(|e| e.to_string());
                    ((id.clone(), name.clone()), compiled)
                })
            })
            .collect()
    });

/// Whether `value` matches the pattern of preset `id`'s parameter `name`;
/// an error when the catalogue's pattern does not compile.
pub fn param_matches(id: &str, name: &str, value: &str) -> Result<bool, String> {
    match PATTERNS.get(&(id.to_owned(), name.to_owned())) {
        Some(Ok(pattern)) => Ok(pattern.is_match(value)),
        Some(Err(problem)) => Err(problem.clone()),
        None => Err(format!("preset {id} has no parameter {name}")),
    }
}

/// Every preset, by id.
pub fn catalogue() -> &'static BTreeMap<String, Preset> {
    &CATALOGUE
}

/// The preset `id`, if there is one.
pub fn preset(id: &str) -> Option<&'static Preset> {
    CATALOGUE.get(id)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    #[serde(default)]
    pub docs: Option<String>,
    /// Values that differ per customer (a subdomain, a tenant), used as
    /// `{name}` in the URLs.
    #[serde(default)]
    pub params: BTreeMap<String, Param>,
    pub token_url: String,
    pub authorization_url: String,
    #[serde(default)]
    pub revocation: Option<Revocation>,
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub scope_separator: Option<String>,
    #[serde(default)]
    pub authorization_params: BTreeMap<String, String>,
    #[serde(default)]
    pub token_params: BTreeMap<String, String>,
    #[serde(default)]
    pub response_fields: Vec<String>,
    /// Values sent in the consent's redirect, kept with the grant.
    #[serde(default)]
    pub redirect_fields: Vec<String>,
    #[serde(default)]
    pub verification_url: Option<String>,
    /// RFC 7662 token introspection, asked for the expiry of tokens the
    /// provider answers without `expires_in`.
    #[serde(default)]
    pub introspection_url: Option<String>,
    #[serde(default)]
    pub default_token_lifetime: Option<String>,
    #[serde(default)]
    pub refresh_token: RefreshTokenPolicy,
    #[serde(default)]
    pub errors: Vec<ErrorRule>,
    #[serde(default)]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Param {
    pub description: String,
    /// An anchored regular expression the value must match, strict enough
    /// that the rendered host stays the provider's.
    pub pattern: String,
    #[serde(default)]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    pub url: String,
    pub style: RevocationStyle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevocationStyle {
    /// RFC 7009: POST `token` and `token_type_hint`, client authenticated.
    Rfc7009,
    /// POST with the access token as a Bearer token, no body (Dropbox).
    Bearer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuth {
    Basic,
    Post,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefreshTokenPolicy {
    #[serde(default)]
    pub rotation: Rotation,
    #[serde(default)]
    pub reuse_grace: Option<String>,
    /// Days without a refresh after which the provider drops the grant.
    #[serde(default)]
    pub idle_expiry_days: Option<u32>,
    /// Days after consent after which the grant dies whatever happens.
    #[serde(default)]
    pub absolute_expiry_days: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Rotation {
    Always,
    Never,
    Optional,
    #[default]
    Unknown,
}

/// One rule of a provider's error dialect: a field of its error body, and
/// the reason that value means.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ErrorRule {
    pub field: String,
    #[serde(default)]
    pub equals: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    pub reason: DialectReason,
}

/// What a dialect rule may say: one of the rejections users act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DialectReason {
    InvalidGrant,
    RefreshTokenExpired,
    InvalidClient,
    InsufficientPermissions,
}

impl DialectReason {
    pub fn reason(self) -> Reason {
        match self {
            DialectReason::InvalidGrant => Reason::InvalidGrant,
            DialectReason::RefreshTokenExpired => Reason::RefreshTokenExpired,
            DialectReason::InvalidClient => Reason::InvalidClient,
            DialectReason::InsufficientPermissions => Reason::InsufficientPermissions,
        }
    }
}

impl ErrorRule {
    /// Whether an error body with these top-level `fields` (scalars as
    /// text; arrays as their elements) and HTTP `status` matches.
    pub fn matches(&self, status: u16, fields: &BTreeMap<String, Vec<String>>) -> bool {
        if self.status.is_some_and(|s| s != status) {
            return false;
        }
        let Some(values) = fields.get(&self.field) else {
            return false;
        };
        values
            .iter()
            .any(|value| match (&self.equals, &self.contains) {
                (Some(equals), _) => value == equals,
                (None, Some(contains)) => value.contains(contains.as_str()),
                (None, None) => false,
            })
    }
}

/// The first rule of `rules` that matches, and what it means.
pub fn dialect_reason<'a>(
    rules: &'a [ErrorRule],
    status: u16,
    fields: &BTreeMap<String, Vec<String>>,
) -> Option<(DialectReason, &'a ErrorRule)> {
    rules
        .iter()
        .find(|rule| rule.matches(status, fields))
        .map(|rule| (rule.reason, rule))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders(template: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            let Some(end) = rest[start..].find('}') else {
                break;
            };
            names.push(rest[start + 1..start + end].to_owned());
            rest = &rest[start + end + 1..];
        }
        names
    }

    #[test]
    fn every_preset_parses_and_is_complete() {
        let catalogue = catalogue();
        assert!(catalogue.len() >= 20, "{} presets", catalogue.len());
        for (id, preset) in catalogue {
            let mut urls = vec![&preset.token_url, &preset.authorization_url];
            urls.extend(preset.revocation.as_ref().map(|r| &r.url));
            urls.extend(preset.verification_url.as_ref());
            urls.extend(preset.introspection_url.as_ref());
            for url in urls {
                assert!(url.starts_with("https://"), "{id}: {url}");
                for name in placeholders(url) {
                    assert!(
                        preset.params.contains_key(&name),
                        "{id}: {{{name}}} in {url}"
                    );
                }
            }
            for (name, param) in &preset.params {
                if let Some(default) = &param.default {
                    assert_eq!(param_matches(id, name, default), Ok(true), "{id}.{name}");
                }
                assert!(param_matches(id, name, "").is_ok(), "{id}.{name} compiles");
            }
            for rule in &preset.errors {
                assert!(
                    rule.equals.is_some() != rule.contains.is_some(),
                    "{id}: a rule needs exactly one of equals and contains: {rule:?}"
                );
            }
            if let Some(lifetime) = &preset.default_token_lifetime {
                assert!(
                    crate::decide::refresh::parse_duration("defaultTokenLifetime", lifetime)
                        .is_ok(),
                    "{id}: {lifetime}"
                );
            }
        }
    }

    #[test]
    fn a_dialect_rule_matches_its_field_value_and_status() {
        let rule = ErrorRule {
            field: "status".into(),
            equals: Some("BAD_REFRESH_TOKEN".into()),
            contains: None,
            status: Some(400),
            reason: DialectReason::InvalidGrant,
        };
        let fields = BTreeMap::from([("status".to_owned(), vec!["BAD_REFRESH_TOKEN".to_owned()])]);
        assert!(rule.matches(400, &fields));
        assert!(!rule.matches(401, &fields));
        let codes = BTreeMap::from([(
            "error_codes".to_owned(),
            vec!["9002313".to_owned(), "700082".to_owned()],
        )]);
        let by_code = ErrorRule {
            field: "error_codes".into(),
            equals: Some("700082".into()),
            contains: None,
            status: None,
            reason: DialectReason::RefreshTokenExpired,
        };
        assert_eq!(
            dialect_reason(&[rule, by_code], 400, &codes).map(|(r, _)| r),
            Some(DialectReason::RefreshTokenExpired)
        );
    }
}
