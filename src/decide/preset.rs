//! A connection's `oauth2` spec with its preset filled in: what every other
//! part of the operator works with. Pure.

use std::collections::BTreeMap;

use crate::api::{ClientAuthMethod, ErrorRuleReason, OAuth2Auth, Verification};
use crate::error::Error;
use crate::providers::{self, ClientAuth, DialectReason, ErrorRule, Preset, RevocationStyle};

/// An `oauth2` spec as the operator uses it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The spec with the preset's values where it says nothing.
    pub oauth: OAuth2Auth,
    pub preset: Option<&'static Preset>,
    /// The spec's error rules, then the preset's.
    rules: Vec<ErrorRule>,
    /// How the preset's provider revokes.
    preset_revocation: Option<RevocationStyle>,
}

impl Resolved {
    /// The provider's own error shapes, checked before the generic rules.
    pub fn dialect(&self) -> &[ErrorRule] {
        &self.rules
    }

    /// How tokens are revoked at `oauth.revocation_url`.
    pub fn revocation_style(&self) -> RevocationStyle {
        self.preset_revocation.unwrap_or(RevocationStyle::Rfc7009)
    }

    /// Days after consent after which the preset says the grant dies.
    pub fn absolute_expiry_days(&self) -> Option<u32> {
        self.preset
            .and_then(|p| p.refresh_token.absolute_expiry_days)
    }
}

/// Resolves `oauth`: without a provider it must name its token endpoint;
/// with one, the preset's values fill what the spec leaves out, field by
/// field, its URLs rendered with `providerParams`.
pub fn resolve(oauth: &OAuth2Auth) -> Result<Resolved, Error> {
    let Some(id) = oauth.provider.as_deref() else {
        if oauth.token_url.is_empty() {
            return Err(Error::InvalidSpec(
                "spec.oauth2 needs tokenUrl, or a provider preset that fills it in \
                 (kubectl tokenkeeper providers lists them)"
                    .into(),
            ));
        }
        if !oauth.provider_params.is_empty() {
            return Err(Error::InvalidSpec(
                "spec.oauth2.providerParams is set without spec.oauth2.provider".into(),
            ));
        }
        return Ok(Resolved {
            oauth: oauth.clone(),
            preset: None,
            rules: spec_rules(oauth)?,
            preset_revocation: None,
        });
    };
    let preset = providers::preset(id).ok_or_else(|| {
        let known: Vec<&str> = providers::catalogue().keys().map(String::as_str).collect();
        Error::InvalidSpec(format!(
            "spec.oauth2.provider is {id:?}, which is no preset; the presets are {}. Without a \
             preset, set tokenUrl (and the other endpoints) yourself.",
            known.join(", ")
        ))
    })?;
    let params = param_values(id, preset, &oauth.provider_params)?;
    let render = |template: &str| render(template, &params);
    let mut resolved = oauth.clone();
    if resolved.token_url.is_empty() {
        resolved.token_url = render(&preset.token_url);
    }
    if resolved.authorization_url.is_none() {
        resolved.authorization_url = Some(render(&preset.authorization_url));
    }
    // The provider's way of revoking holds at an endpoint the spec names
    // too (a proxy, an emulator).
    let preset_revocation = preset.revocation.as_ref().map(|r| r.style);
    if resolved.revocation_url.is_none() {
        resolved.revocation_url = preset.revocation.as_ref().map(|r| render(&r.url));
    }
    if resolved.verification.is_none() {
        resolved.verification = preset
            .verification_url
            .as_ref()
            .map(|url| Verification { url: render(url) });
    }
    if resolved.introspection_url.is_none() {
        resolved.introspection_url = preset.introspection_url.as_ref().map(|url| render(url));
    }
    if resolved.client.auth_method.is_none() {
        resolved.client.auth_method = Some(match preset.client_auth {
            ClientAuth::Basic => ClientAuthMethod::ClientSecretBasic,
            ClientAuth::Post => ClientAuthMethod::ClientSecretPost,
        });
    }
    if resolved.scopes.is_empty() {
        resolved.scopes = preset.scopes.clone();
    }
    // The oauth2 client joins scopes with spaces; a provider that wants
    // another separator gets them joined already.
    if let Some(separator) = preset.scope_separator.as_deref()
        && resolved.scopes.len() > 1
    {
        resolved.scopes = vec![resolved.scopes.join(separator)];
    }
    resolved.authorization_params =
        merged(&preset.authorization_params, &oauth.authorization_params);
    resolved.extra_token_params = merged(&preset.token_params, &oauth.extra_token_params);
    if resolved.response_fields.is_empty() {
        resolved.response_fields = preset.response_fields.clone();
    }
    if resolved.redirect_fields.is_empty() {
        resolved.redirect_fields = preset.redirect_fields.clone();
    }
    if resolved.default_token_lifetime.is_none() {
        resolved.default_token_lifetime = preset.default_token_lifetime.clone();
    }
    let mut rules = spec_rules(oauth)?;
    rules.extend(preset.errors.iter().cloned());
    Ok(Resolved {
        oauth: resolved,
        preset: Some(preset),
        rules,
        preset_revocation,
    })
}

/// The spec's error rules, as the classifier reads them.
fn spec_rules(oauth: &OAuth2Auth) -> Result<Vec<ErrorRule>, Error> {
    oauth
        .error_rules
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            if rule.equals.is_some() == rule.contains.is_some() {
                return Err(Error::InvalidSpec(format!(
                    "spec.oauth2.errorRules[{index}] needs exactly one of equals and contains"
                )));
            }
            Ok(ErrorRule {
                field: rule.field.clone(),
                equals: rule.equals.clone(),
                contains: rule.contains.clone(),
                status: rule.status,
                reason: match rule.reason {
                    ErrorRuleReason::InvalidGrant => DialectReason::InvalidGrant,
                    ErrorRuleReason::RefreshTokenExpired => DialectReason::RefreshTokenExpired,
                    ErrorRuleReason::InvalidClient => DialectReason::InvalidClient,
                    ErrorRuleReason::InsufficientPermissions => {
                        DialectReason::InsufficientPermissions
                    }
                },
            })
        })
        .collect()
}

/// The value of each of the preset's parameters: the spec's, else the
/// preset's default; each checked against the preset's pattern.
fn param_values(
    id: &str,
    preset: &Preset,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Error> {
    if let Some(unknown) = given.keys().find(|k| !preset.params.contains_key(*k)) {
        let known: Vec<&str> = preset.params.keys().map(String::as_str).collect();
        return Err(Error::InvalidSpec(format!(
            "spec.oauth2.providerParams.{unknown} is not a parameter of preset {id} (it takes: \
             {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    let mut values = BTreeMap::new();
    for (name, param) in &preset.params {
        let value = given.get(name).or(param.default.as_ref()).ok_or_else(|| {
            Error::InvalidSpec(format!(
                "preset {id} needs spec.oauth2.providerParams.{name}: {}",
                param.description
            ))
        })?;
        let matches = providers::param_matches(id, name, value).map_err(|e| Error::Internal {
            detail: format!("the pattern of preset {id}'s parameter {name} is broken: {e}"),
        })?;
        if !matches {
            return Err(Error::InvalidSpec(format!(
                "spec.oauth2.providerParams.{name} is {value:?}, which preset {id} does not take \
                 ({}; it must match {})",
                param.description, param.pattern
            )));
        }
        values.insert(name.clone(), value.clone());
    }
    Ok(values)
}

fn render(template: &str, params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .fold(template.to_owned(), |text, (name, value)| {
            text.replace(&format!("{{{name}}}"), value)
        })
}

/// `preset`'s entries, overridden by `spec`'s.
fn merged(
    preset: &BTreeMap<String, String>,
    spec: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut all = preset.clone();
    all.extend(spec.iter().map(|(k, v)| (k.clone(), v.clone())));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> OAuth2Auth {
        serde_yaml::from_str(yaml).unwrap()
    }

    const CLIENT: &str = "client:\n  secretRef:\n    name: c\n";

    #[test]
    fn a_preset_fills_what_the_spec_leaves_out_and_the_spec_wins() {
        let resolved = resolve(&spec(&format!(
            "provider: salesforce\nproviderParams:\n  domain: acme.my\ngrant: authorizationCode\n{CLIENT}"
        )))
        .unwrap();
        let oauth = &resolved.oauth;
        assert_eq!(
            oauth.token_url,
            "https://acme.my.salesforce.com/services/oauth2/token"
        );
        assert!(oauth.response_fields.contains(&"instance_url".to_owned()));
        assert!(oauth.client.auth_method.is_some());
        let own = resolve(&spec(&format!(
            "provider: salesforce\ntokenUrl: https://proxy.example/token\nscopes: [api]\n\
             authorizationParams:\n  prompt: login\ngrant: authorizationCode\n{CLIENT}"
        )))
        .unwrap()
        .oauth;
        assert_eq!(own.token_url, "https://proxy.example/token");
        assert_eq!(own.scopes, ["api"]);
        assert_eq!(own.authorization_params["prompt"], "login");
    }

    #[test]
    fn every_preset_resolves_with_example_parameters() {
        for (id, preset) in providers::catalogue() {
            let mut text = format!("provider: {id}\ngrant: authorizationCode\n{CLIENT}");
            let needed: Vec<_> = preset
                .params
                .iter()
                .filter(|(_, p)| p.default.is_none())
                .collect();
            if !needed.is_empty() {
                text.push_str("providerParams:\n");
                for (name, _) in needed {
                    text.push_str(&format!("  {name}: acme\n"));
                }
            }
            let resolved = resolve(&spec(&text)).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert!(!resolved.oauth.token_url.contains('{'), "{id}");
            let settings =
                crate::decide::validate::oauth_settings(&resolved.oauth, &Default::default());
            assert!(
                settings.is_ok(),
                "{id}: {:?}",
                settings.err().map(|e| e.to_string())
            );
        }
    }

    #[test]
    fn parameters_are_checked() {
        let missing = resolve(&spec(&format!(
            "provider: zendesk\ngrant: authorizationCode\n{CLIENT}"
        )))
        .unwrap_err()
        .to_string();
        assert!(missing.contains("providerParams.subdomain"), "{missing}");
        let escaping = resolve(&spec(&format!(
            "provider: zendesk\nproviderParams:\n  subdomain: evil.example/x?\ngrant: authorizationCode\n{CLIENT}"
        )))
        .unwrap_err()
        .to_string();
        assert!(escaping.contains("does not take"), "{escaping}");
        let unknown = resolve(&spec(&format!(
            "provider: google\nproviderParams:\n  x: y\ngrant: authorizationCode\n{CLIENT}"
        )))
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("not a parameter"), "{unknown}");
        let nothing = resolve(&spec(&format!("grant: clientCredentials\n{CLIENT}")))
            .unwrap_err()
            .to_string();
        assert!(nothing.contains("needs tokenUrl"), "{nothing}");
        let no_such = resolve(&spec(&format!(
            "provider: nowhere\ngrant: clientCredentials\n{CLIENT}"
        )))
        .unwrap_err()
        .to_string();
        assert!(no_such.contains("salesforce"), "{no_such}");
    }

    #[test]
    fn a_custom_providers_rules_come_first() {
        let resolved = resolve(&spec(&format!(
            "tokenUrl: https://idp.example/token\ngrant: clientCredentials\n{CLIENT}\
             errorRules:\n- field: status\n  equals: DEAD\n  reason: InvalidGrant\n"
        )))
        .unwrap();
        assert_eq!(resolved.dialect().len(), 1);
        assert_eq!(resolved.dialect()[0].reason, DialectReason::InvalidGrant);
        let both = resolve(&spec(&format!(
            "tokenUrl: https://idp.example/token\ngrant: clientCredentials\n{CLIENT}\
             errorRules:\n- field: status\n  equals: DEAD\n  contains: D\n  reason: InvalidGrant\n"
        )))
        .unwrap_err()
        .to_string();
        assert!(both.contains("exactly one"), "{both}");
        let with_preset = resolve(&spec(&format!(
            "provider: hubspot\ngrant: clientCredentials\n{CLIENT}\
             errorRules:\n- field: status\n  equals: DEAD\n  reason: InvalidClient\n"
        )))
        .unwrap();
        assert_eq!(with_preset.dialect()[0].equals.as_deref(), Some("DEAD"));
        assert!(with_preset.dialect().len() > 1);
    }

    #[test]
    fn scopes_are_joined_with_the_providers_separator() {
        let slack = resolve(&spec(&format!(
            "provider: slack\nscopes: [channels:read, users:read]\ngrant: authorizationCode\n{CLIENT}"
        )))
        .unwrap();
        assert_eq!(slack.oauth.scopes, ["channels:read,users:read"]);
    }
}
