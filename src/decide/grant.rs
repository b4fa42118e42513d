//! Which grant an OAuth 2.0 connection continues with, and whether to ask
//! the token endpoint now. Pure: takes what the reconcile read.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::api::{ANNOTATION_FORCE_REFRESH, OAuth2Auth, OAuth2Grant, SourceConnection};
use crate::decide::refresh::{Plan, PlanInput, RefreshReason, plan};
use crate::decide::status::{GrantExpiry, TokenStatus, display_name};
use crate::decide::validate::OAuthSettings;
use crate::error::Error;
use crate::oauth::seal::{Binding, OpenError, Opened, SealedGrant};
use crate::oauth::state_secret::GrantState;
use crate::oauth::token::{IssuedToken, TokenRecord, fingerprint, request_fingerprint};
use crate::runtime::wire::ReadSecret;

/// What an OAuth 2.0 reconcile read.
pub struct OAuthInputs {
    pub client_id: String,
    /// What a grant of this connection is bound to, as the spec is now.
    pub binding: Binding,
    /// The public key the kubectl plugin seals consents to, for the status.
    pub grant_sealing_key: Option<String>,
    pub client_secret: String,
    /// The user-supplied refresh token (refreshToken grant).
    pub user_refresh_token: Option<String>,
    pub target: Option<Arc<ReadSecret>>,
    /// The grant to continue with: the one sealed in the target Secret,
    /// or a consent adopted over it.
    pub grant: Option<SealedGrant>,
    /// The grant as the target Secret in the cluster holds it; an equal
    /// grant keeps that seal.
    pub stored_grant: Option<SealedGrant>,
    /// Why the target Secret's sealed grant could not be used.
    pub grant_problem: Option<GrantProblem>,
    /// The state Secret, when it holds a grant given on the consent page
    /// or by `kubectl tokenkeeper authorize` that is not adopted yet.
    pub inbox: Option<(Arc<ReadSecret>, GrantState)>,
    /// The state Secret, whatever it holds (authorization-code connections).
    pub state: Option<Arc<ReadSecret>>,
    /// The newest token: the target Secret's, or the consented one.
    pub current: Option<TokenRecord>,
}

/// Why a sealed grant is not used.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum GrantProblem {
    #[error("the sealed refresh token in the target Secret cannot be opened: {0}")]
    Seal(#[from] OpenError),
    /// The connection now names other endpoints or another client than the
    /// grant was given for: it is never sent there.
    #[error(
        "the grant kept for it is not sent anywhere else than where it was given: {}",
        changes.join("; ")
    )]
    Rebound {
        changes: Vec<String>,
        /// The user-supplied refresh token the grant came from, which is
        /// then not sent to the new endpoints either.
        imported_hash: Option<String>,
    },
}

/// The grant of `opened` when the connection, as `now` describes it, may
/// still use it. A seal from before seals named a binding is bound to the
/// connection's UID only (checked when it opened).
pub fn usable_grant(opened: Opened, now: &Binding) -> Result<SealedGrant, GrantProblem> {
    let Some(binding) = &opened.binding else {
        return Ok(opened.grant);
    };
    let changes = binding.changes_to(now);
    if changes.is_empty() {
        Ok(opened.grant)
    } else {
        Err(GrantProblem::Rebound {
            changes,
            imported_hash: opened.grant.imported_hash,
        })
    }
}

/// Takes a consented grant waiting in the state Secret as the current one
/// unless the grant in use was adopted from that very consent (whose
/// removal from the state Secret failed). Says whether it did.
pub fn adopt_consented_grant(inputs: &mut OAuthInputs) -> bool {
    let Some((_, consented)) = &inputs.inbox else {
        return false;
    };
    let (Some(refresh_token), Some(token)) = (&consented.refresh_token, &consented.token) else {
        return false;
    };
    let adopted_before = inputs
        .grant
        .as_ref()
        .is_some_and(|g| g.consent.is_some() && g.consent == consented.consent_id);
    if adopted_before {
        return false;
    }
    inputs.grant = Some(SealedGrant {
        refresh_token: refresh_token.clone(),
        refresh_token_expires_at: consented.refresh_token_expires_at,
        imported_hash: inputs
            .grant
            .as_ref()
            .and_then(|g| g.imported_hash.clone())
            .or_else(|| consented.imported_hash.clone()),
        account: consented.account.clone(),
        consent: consented.consent_id.clone(),
        granted_at: Some(token.issued_at),
        redirect_values: consented.redirect_values.clone(),
    });
    inputs.current = Some(token.clone());
    true
}

/// What the reconcile knows of the connection's token request, whatever
/// it does about it.
pub struct RefreshDecision {
    /// Fingerprint of the token request settings.
    pub request_hash: String,
    /// The status's token fields going in (with the authorization link and,
    /// when a request is made, the force-refresh value it handles).
    pub token_status: TokenStatus,
    /// Spreads this connection's refreshes and retries.
    pub jitter_key: String,
}

/// What the reconcile does about the token endpoint.
pub enum Action {
    /// No refresh token to go on with: a person must authorize.
    AuthorizationRequired(Error),
    /// A transient failure backs off until then.
    RetryAt(Timestamp),
    /// `token` stays valid until it is due.
    Wait { token: TokenRecord, due: Timestamp },
    /// Ask the token endpoint now.
    Request(TokenAsk),
}

/// A token request to make.
pub struct TokenAsk {
    pub reason: RefreshReason,
    /// `None` for the client-credentials grant.
    pub refresh_token: Option<String>,
    /// Fingerprint of the user-supplied refresh token the grant comes from.
    pub import_hash: Option<String>,
    /// When the refresh token used is known to expire.
    pub refresh_token_expires_at: Option<Timestamp>,
}

/// The endpoints a preset filled in, as the status shows them.
fn provider_endpoints(oauth: &OAuth2Auth) -> std::collections::BTreeMap<String, String> {
    if oauth.provider.is_none() {
        return Default::default();
    }
    [
        ("tokenUrl", Some(&oauth.token_url)),
        ("authorizationUrl", oauth.authorization_url.as_ref()),
        ("revocationUrl", oauth.revocation_url.as_ref()),
        (
            "verificationUrl",
            oauth.verification.as_ref().map(|v| &v.url),
        ),
    ]
    .into_iter()
    .filter_map(|(name, url)| Some((name.to_owned(), url?.clone())))
    .collect()
}

/// Spreads one connection's refreshes and retries: its uid, stable for its
/// life.
pub fn jitter_key(conn: &SourceConnection) -> String {
    conn.uid().unwrap_or_else(|| display_name(conn))
}

/// Decides whether to request a token now, and with which refresh token: a
/// new one from the user wins over the grant tokenkeeper keeps.
pub fn decide_refresh(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    settings: &OAuthSettings,
    inputs: &OAuthInputs,
    authorization_link: Option<String>,
    now: Timestamp,
) -> (RefreshDecision, Action) {
    let request_hash = request_fingerprint(oauth, &inputs.client_id);
    let user_hash = inputs
        .user_refresh_token
        .as_deref()
        .map(|t| fingerprint(&[t]));
    let imported_hash = inputs.grant.as_ref().and_then(|g| g.imported_hash.clone());
    // A refresh token imported for endpoints the connection no longer names
    // is not sent to the new ones; a new one from the user is.
    let unusable_import = match &inputs.grant_problem {
        Some(GrantProblem::Rebound { imported_hash, .. }) => imported_hash.clone(),
        _ => None,
    };
    let user_token_usable = unusable_import.is_none() || user_hash != unusable_import;
    let new_user_refresh_token =
        user_hash.is_some() && user_hash != imported_hash && user_token_usable;
    let mut token_status = TokenStatus {
        authorization_url: authorization_link.clone(),
        grant_sealing_key: inputs.grant_sealing_key.clone(),
        authorized_account: inputs.grant.as_ref().and_then(|g| g.account.clone()),
        provider_endpoints: provider_endpoints(oauth),
        reauthorize_fix: Some(crate::decide::outcome::reauthorize_fix(conn, oauth)),
        ..TokenStatus::current(conn)
    };
    let jitter_key = jitter_key(conn);
    let refresh_token = match oauth.grant {
        OAuth2Grant::ClientCredentials => None,
        _ if new_user_refresh_token => inputs.user_refresh_token.clone(),
        _ => inputs
            .grant
            .as_ref()
            .map(|g| g.refresh_token.clone())
            .or_else(|| {
                inputs
                    .user_refresh_token
                    .clone()
                    .filter(|_| user_token_usable)
            }),
    };
    let decision = |token_status, action| {
        let decision = RefreshDecision {
            request_hash: request_hash.clone(),
            token_status,
            jitter_key: jitter_key.clone(),
        };
        (decision, action)
    };
    if oauth.grant != OAuth2Grant::ClientCredentials && refresh_token.is_none() {
        let name = display_name(conn);
        let situation = match &inputs.grant_problem {
            None => format!("Nobody has authorized SourceConnection {name} yet."),
            Some(problem) => {
                format!("SourceConnection {name} needs a new consent: {problem}.")
            }
        };
        let error = Error::AuthorizationRequired {
            situation,
            url: authorization_link.unwrap_or_else(|| {
                "the operator's authorization endpoint (start tokenkeeper with --external-url)"
                    .into()
            }),
        };
        return decision(token_status, Action::AuthorizationRequired(error));
    }
    let force_value = conn.annotations().get(ANNOTATION_FORCE_REFRESH).cloned();
    let plan = plan(&PlanInput {
        now,
        current: inputs.current.as_ref(),
        request_hash: &request_hash,
        new_user_refresh_token,
        force_requested: force_value.is_some() && force_value != token_status.force_refresh_handled,
        failed_attempts: token_status.failed_refresh_attempts,
        retry_at: token_status.next_refresh_time,
        schedule: settings.schedule,
        jitter_key: &jitter_key,
    });
    let reason = match (plan, &inputs.current) {
        (Plan::RetryAt { until }, _) => return decision(token_status, Action::RetryAt(until)),
        (Plan::Wait { until }, Some(token)) => {
            let token = token.clone();
            return decision(token_status, Action::Wait { token, due: until });
        }
        (Plan::Refresh(reason), _) => reason,
        // `plan` waits only for a token it has.
        (Plan::Wait { .. }, None) => RefreshReason::FirstToken,
    };
    // A forced refresh is done once per annotation value, whatever its
    // result: otherwise a failing one would skip the backoff forever.
    token_status.force_refresh_handled = force_value.or(token_status.force_refresh_handled);
    let ask = TokenAsk {
        reason,
        refresh_token,
        import_hash: if new_user_refresh_token {
            user_hash
        } else {
            imported_hash
        },
        refresh_token_expires_at: inputs
            .grant
            .as_ref()
            .and_then(|g| g.refresh_token_expires_at)
            .filter(|_| !new_user_refresh_token),
    };
    decision(token_status, Action::Request(ask))
}

/// When a grant dies whatever is refreshed: its refresh token's known
/// expiry, or the provider's absolute lifetime counted from the consent;
/// the earlier. `None` when neither is known.
pub fn grant_expiry(
    grant: &SealedGrant,
    absolute_expiry_days: Option<u32>,
    warning: SignedDuration,
) -> Option<GrantExpiry> {
    let by_policy = absolute_expiry_days
        .zip(grant.granted_at)
        .and_then(|(days, at)| {
            at.checked_add(SignedDuration::from_hours(
                i64::from(days).saturating_mul(24),
            ))
            .ok()
            .map(|end| {
                (
                    end,
                    format!("the provider's limit of {days} days after consent"),
                )
            })
        });
    let by_token = grant.refresh_token_expires_at.map(|end| {
        (
            end,
            "the refresh token's lifetime the provider sent".to_owned(),
        )
    });
    let (expires_at, source) = [by_policy, by_token]
        .into_iter()
        .flatten()
        .min_by_key(|(end, _)| *end)?;
    // A third of the grant's life when that is shorter than the warning.
    let lifetime = grant
        .granted_at
        .map(|at| expires_at.duration_since(at))
        .unwrap_or(warning);
    let lead = warning.min(lifetime / 3).max(SignedDuration::ZERO);
    Some(GrantExpiry {
        expires_at,
        warn_at: expires_at.checked_sub(lead).unwrap_or(expires_at),
        source,
    })
}

/// The grant after a successful refresh: a refresh token the provider did
/// not rotate stays, and so does its known expiry.
pub fn next_grant(
    previous: Option<&SealedGrant>,
    issued: &IssuedToken,
    used: String,
    import_hash: Option<String>,
    issued_at: Timestamp,
) -> SealedGrant {
    let rotated = issued.refresh_token.is_some();
    SealedGrant {
        refresh_token: issued.refresh_token.clone().unwrap_or(used),
        refresh_token_expires_at: match issued.refresh_token_expires_at(issued_at) {
            Some(at) => Some(at),
            None if rotated => None,
            None => previous.and_then(|p| p.refresh_token_expires_at),
        },
        // A refresh token newly imported is of an account nobody named.
        account: previous
            .filter(|p| p.imported_hash == import_hash)
            .and_then(|p| p.account.clone()),
        consent: previous.and_then(|p| p.consent.clone()),
        granted_at: match previous.filter(|p| p.imported_hash == import_hash) {
            Some(kept) => kept.granted_at,
            None => Some(issued_at),
        },
        redirect_values: previous
            .map(|p| p.redirect_values.clone())
            .unwrap_or_default(),
        imported_hash: import_hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use crate::decide::refresh::Limits;
    use crate::decide::validate::oauth_settings;

    fn token(issued: i64) -> TokenRecord {
        TokenRecord {
            access_token: format!("at-{issued}"),
            token_type: "Bearer".into(),
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(issued + 3600).unwrap(),
            lifetime_assumed: false,
            scope: None,
            fields: BTreeMap::new(),
            request_hash: "h".into(),
            verification_denied: None,
            oddities: None,
        }
    }

    fn inputs(current: Option<i64>, grant: Option<&str>, consented: Option<i64>) -> OAuthInputs {
        OAuthInputs {
            client_id: "id".into(),
            binding: Binding {
                uid: "uid-1".into(),
                token_origin: "https://login.example.com".into(),
                client_id: "id".into(),
                revocation_origin: None,
                verification_origin: None,
                introspection_origin: None,
            },
            grant_sealing_key: None,
            client_secret: "secret".into(),
            user_refresh_token: None,
            target: None,
            stored_grant: None,
            grant: grant.map(|rt| SealedGrant {
                refresh_token: rt.into(),
                imported_hash: Some("imported".into()),
                ..Default::default()
            }),
            grant_problem: None,
            inbox: consented.map(|issued| {
                (
                    Arc::new(ReadSecret::default()),
                    GrantState {
                        refresh_token: Some("consented-rt".into()),
                        consent_id: Some("consent-1".into()),
                        token: Some(token(issued)),
                        ..Default::default()
                    },
                )
            }),
            state: None,
            current: current.map(token),
        }
    }

    fn connection(grant: &str) -> SourceConnection {
        let mut oauth = serde_json::json!({
            "tokenUrl": "https://login.example.com/token",
            "grant": grant,
            "client": {"secretRef": {"name": "crm-client"}},
        });
        match grant {
            "refreshToken" => {
                oauth["refreshTokenSecretRef"] =
                    serde_json::json!({"name": "crm-grant", "key": "refresh_token"});
            }
            "authorizationCode" => {
                oauth["authorizationUrl"] = "https://login.example.com/authorize".into();
            }
            _ => {}
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tokenkeeper.dev/v1alpha1",
            "kind": "SourceConnection",
            "metadata": {"name": "crm", "namespace": "data", "uid": "uid-1"},
            "spec": {"oauth2": oauth},
        }))
        .unwrap()
    }

    fn decide(
        conn: &SourceConnection,
        inputs: &OAuthInputs,
        now: i64,
    ) -> (RefreshDecision, Action) {
        let oauth = conn.spec.oauth2.as_ref().unwrap();
        let settings = oauth_settings(oauth, &Default::default()).unwrap();
        let now = Timestamp::from_second(now).unwrap();
        decide_refresh(conn, oauth, &settings, inputs, None, now)
    }

    #[test]
    fn durations_beyond_the_longest_lifetime_are_refused_and_the_floor_is_kept() {
        let mut conn = connection("clientCredentials");
        let limits = Limits {
            max_token_lifetime: jiff::SignedDuration::from_hours(24),
            ..Limits::default()
        };
        let oauth = conn.spec.oauth2.as_mut().unwrap();
        oauth.refresh_before = Some("25h".into());
        let refused = oauth_settings(oauth, &limits).err().unwrap().to_string();
        assert!(
            refused.contains("spec.oauth2.refreshBefore is 25h") && refused.contains("24h"),
            "{refused}"
        );
        oauth.refresh_before = Some("1h".into());
        oauth.default_token_lifetime = Some("1000000h".into());
        let refused = oauth_settings(oauth, &limits).err().unwrap().to_string();
        assert!(refused.contains("defaultTokenLifetime"), "{refused}");
        oauth.default_token_lifetime = Some("24h".into());
        let settings = oauth_settings(oauth, &limits).unwrap();
        assert_eq!(settings.schedule.min_interval, limits.min_refresh_interval);
        assert_eq!(settings.max_lifetime, limits.max_token_lifetime);
    }

    /// `current` with the fingerprint of `conn`'s token request, as a token
    /// tokenkeeper requested for that spec carries.
    fn current_for(conn: &SourceConnection, inputs: &mut OAuthInputs) {
        let oauth = conn.spec.oauth2.as_ref().unwrap();
        if let Some(current) = inputs.current.as_mut() {
            current.request_hash = request_fingerprint(oauth, &inputs.client_id);
        }
    }

    #[test]
    fn a_newer_consent_replaces_the_grant_and_keeps_the_import_fingerprint() {
        let mut fresh = inputs(Some(100), Some("old-rt"), Some(200));
        assert!(adopt_consented_grant(&mut fresh));
        let grant = fresh.grant.unwrap();
        assert_eq!(grant.refresh_token, "consented-rt");
        assert_eq!(grant.imported_hash.as_deref(), Some("imported"));
        assert_eq!(fresh.current.unwrap().issued_at.as_second(), 200);
    }

    #[test]
    fn a_consent_is_adopted_once() {
        let mut first = inputs(Some(300), Some("current-rt"), Some(300));
        assert!(
            adopt_consented_grant(&mut first),
            "same second as the current token"
        );
        let adopted = first.grant.clone().unwrap();
        assert_eq!(adopted.consent.as_deref(), Some("consent-1"));
        // The consent stayed in the state Secret while the grant rotated.
        let mut again = inputs(Some(400), Some("rotated-rt"), Some(300));
        again.grant = Some(SealedGrant {
            refresh_token: "rotated-rt".into(),
            ..adopted
        });
        assert!(!adopt_consented_grant(&mut again));
        assert_eq!(again.grant.unwrap().refresh_token, "rotated-rt");
    }

    #[test]
    fn a_consent_is_adopted_when_there_is_no_grant_yet() {
        let mut first = inputs(None, None, Some(50));
        assert!(adopt_consented_grant(&mut first));
        let mut nothing = inputs(Some(10), Some("rt"), None);
        assert!(!adopt_consented_grant(&mut nothing));
    }

    #[test]
    fn without_any_refresh_token_a_person_must_authorize() {
        let conn = connection("authorizationCode");
        let (_, action) = decide(&conn, &inputs(None, None, None), 1_000);
        let Action::AuthorizationRequired(error) = action else {
            panic!("authorization required");
        };
        assert_eq!(error.reason(), "AuthorizationRequired");
        assert!(error.to_string().contains("data/crm"), "{error}");
    }

    #[test]
    fn a_grant_for_other_endpoints_is_not_sent_and_the_consent_says_why() {
        let binding = |token: &str| Binding {
            uid: "uid-1".into(),
            token_origin: token.into(),
            client_id: "id".into(),
            revocation_origin: None,
            verification_origin: None,
            introspection_origin: None,
        };
        let opened = Opened {
            grant: SealedGrant {
                refresh_token: "kept-rt".into(),
                imported_hash: Some(fingerprint(&["user-rt"])),
                ..Default::default()
            },
            binding: Some(binding("https://login.example.com")),
        };
        let problem = usable_grant(opened, &binding("https://attacker.example")).unwrap_err();
        let conn = connection("refreshToken");
        let mut read = inputs(Some(1_000), None, None);
        read.grant_problem = Some(problem);
        // The user's refresh token was imported for the old endpoint.
        read.user_refresh_token = Some("user-rt".into());
        let (_, action) = decide(&conn, &read, 1_100);
        let Action::AuthorizationRequired(error) = action else {
            panic!("authorization required");
        };
        let message = error.to_string();
        assert!(
            message.contains("needs a new consent")
                && message.contains("https://login.example.com")
                && message.contains("https://attacker.example"),
            "{message}"
        );
        // A refresh token the user supplies afterwards is theirs to send.
        read.user_refresh_token = Some("another-rt".into());
        let (_, action) = decide(&conn, &read, 1_100);
        let Action::Request(ask) = action else {
            panic!("request");
        };
        assert_eq!(ask.refresh_token.as_deref(), Some("another-rt"));
        let same = Opened {
            grant: SealedGrant::default(),
            binding: Some(binding("https://login.example.com")),
        };
        assert!(usable_grant(same, &binding("https://login.example.com")).is_ok());
    }

    #[test]
    fn a_grant_expiry_comes_from_the_policy_or_the_token_and_warns_ahead() {
        let at = |s: i64| Timestamp::from_second(s).unwrap();
        let day = 86_400;
        let grant = SealedGrant {
            granted_at: Some(at(0)),
            ..Default::default()
        };
        let fortnight = SignedDuration::from_hours(14 * 24);
        assert_eq!(grant_expiry(&grant, None, fortnight), None);
        let yearly = grant_expiry(&grant, Some(365), fortnight).unwrap();
        assert_eq!(yearly.expires_at, at(365 * day));
        assert_eq!(yearly.warn_at, at(351 * day));
        assert!(yearly.source.contains("365 days"));
        // A week-long grant warns a third of its life ahead.
        let weekly = grant_expiry(&grant, Some(7), fortnight).unwrap();
        assert_eq!(weekly.warn_at.as_second(), 7 * day - 7 * day / 3);
        // The refresh token's own end, when sooner, wins.
        let told = SealedGrant {
            refresh_token_expires_at: Some(at(30 * day)),
            ..grant
        };
        let soon = grant_expiry(&told, Some(365), fortnight).unwrap();
        assert_eq!(soon.expires_at, at(30 * day));
        assert!(soon.source.contains("refresh token"));
    }

    #[test]
    fn a_valid_token_waits_until_it_is_due_and_the_wait_says_when() {
        let conn = connection("authorizationCode");
        let mut read = inputs(Some(1_000), Some("rt"), None);
        current_for(&conn, &mut read);
        let (decision, action) = decide(&conn, &read, 1_100);
        let Action::Wait { token, due } = action else {
            panic!("wait");
        };
        assert_eq!(token.issued_at.as_second(), 1_000);
        // Two thirds of the hour, less a jitter of at most 30 s.
        let at = due.as_second();
        assert!((3_370..=3_400).contains(&at), "{at}");
        assert_eq!(decision.jitter_key, "uid-1");
        let (_, action) = decide(&conn, &read, at);
        assert!(matches!(
            action,
            Action::Request(TokenAsk {
                reason: RefreshReason::Due,
                ..
            })
        ));
    }

    #[test]
    fn a_new_refresh_token_from_the_user_wins_over_the_kept_grant() {
        let conn = connection("refreshToken");
        let mut read = inputs(Some(1_000), Some("kept-rt"), None);
        current_for(&conn, &mut read);
        read.user_refresh_token = Some("new-rt".into());
        let (_, action) = decide(&conn, &read, 1_100);
        let Action::Request(ask) = action else {
            panic!("request");
        };
        assert_eq!(ask.reason, RefreshReason::NewRefreshToken);
        assert_eq!(ask.refresh_token.as_deref(), Some("new-rt"));
        assert_eq!(ask.import_hash, Some(fingerprint(&["new-rt"])));
        assert_eq!(ask.refresh_token_expires_at, None, "the old grant's expiry");
    }

    #[test]
    fn a_forced_refresh_is_handled_once_per_annotation_value() {
        let mut conn = connection("clientCredentials");
        conn.metadata.annotations = Some([(ANNOTATION_FORCE_REFRESH.into(), "1".into())].into());
        let mut read = inputs(Some(1_000), None, None);
        current_for(&conn, &mut read);
        let (decision, action) = decide(&conn, &read, 1_100);
        assert!(matches!(
            action,
            Action::Request(TokenAsk {
                reason: RefreshReason::Forced,
                refresh_token: None,
                ..
            })
        ));
        assert_eq!(
            decision.token_status.force_refresh_handled.as_deref(),
            Some("1")
        );
        conn.status = Some(crate::api::SourceConnectionStatus {
            force_refresh_handled: Some("1".into()),
            ..Default::default()
        });
        let (_, action) = decide(&conn, &read, 1_100);
        assert!(matches!(action, Action::Wait { .. }));
    }

    #[test]
    fn a_rotated_refresh_token_replaces_the_old_one_and_its_expiry() {
        let previous = SealedGrant {
            refresh_token: "rt-1".into(),
            refresh_token_expires_at: Some(Timestamp::from_second(50_000).unwrap()),
            imported_hash: None,
            account: None,
            consent: None,
            granted_at: None,
            redirect_values: Default::default(),
        };
        let issued_at = Timestamp::from_second(1_000).unwrap();
        let mut issued = IssuedToken {
            access_token: "at".into(),
            token_type: "Bearer".into(),
            expires_in: Some(Duration::from_secs(60)),
            refresh_token: Some("rt-2".into()),
            scope: None,
            extra: serde_json::Map::new(),
            refresh_token_expires_in: None,
            oddities: Vec::new(),
        };
        let rotated = next_grant(Some(&previous), &issued, "rt-1".into(), None, issued_at);
        assert_eq!(rotated.refresh_token, "rt-2");
        assert_eq!(rotated.refresh_token_expires_at, None);

        issued.refresh_token = None;
        let kept = next_grant(
            Some(&previous),
            &issued,
            "rt-1".into(),
            Some("h".into()),
            issued_at,
        );
        assert_eq!(kept.refresh_token, "rt-1");
        assert_eq!(
            kept.refresh_token_expires_at,
            previous.refresh_token_expires_at
        );
        assert_eq!(kept.imported_hash.as_deref(), Some("h"));

        issued.refresh_token_expires_in = Some(Duration::from_secs(600));
        let told = next_grant(Some(&previous), &issued, "rt-1".into(), None, issued_at);
        assert_eq!(told.refresh_token_expires_at.unwrap().as_second(), 1_600);
    }
}
