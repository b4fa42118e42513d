//! What an OAuth 2.0 reconcile ends with, decided from what it read and what
//! the token endpoint answered: the report for the status, when to look
//! again, the events, and the token times for the metrics. Pure.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::api::{ANNOTATION_FORCE_REFRESH, OAuth2Auth, OAuth2Grant, SourceConnection};
use crate::decide::classify::missing_scopes;
use crate::decide::refresh::{RefreshReason, delay_until, retry_at};
use crate::decide::status::{CONDITION_READY, Note, Report, TokenStatus, Verdict, find_condition};
use crate::decide::validate::OAuthSettings;
use crate::error::{Error, Reason, Retry};
use crate::oauth::token::TokenRecord;
use crate::time::{humanize, rfc3339};

/// When to reconcile again without a watch event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// At a planned time, such as a refresh due time.
    At(Timestamp),
    /// After a delay counted from the end of the reconcile.
    In(Duration),
    AwaitChange,
}

impl Next {
    /// How long from `now` until the next reconcile (`None`: until a watch
    /// event). Taken when the reconcile ends, after its writes: a due time
    /// computed at its start would otherwise be late by the reconcile's
    /// own duration.
    pub fn delay(self, now: Timestamp) -> Option<Duration> {
        match self {
            Next::At(at) => Some(delay_until(now, at)),
            Next::In(delay) => Some(delay),
            Next::AwaitChange => None,
        }
    }
}

/// When the connection's token expires and when tokenkeeper acts next, for
/// the per-connection metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenTimes {
    pub expires_at: Option<Timestamp>,
    pub next_action_at: Option<Timestamp>,
}

/// What a sync achieved: the status to report, when to look again, events
/// to publish, and the token times when it has any to tell.
#[derive(Debug, Clone, PartialEq)]
pub struct Synced {
    pub report: Report,
    pub next: Next,
    pub notes: Vec<Note>,
    pub token_times: Option<TokenTimes>,
}

impl Synced {
    /// A connection that cannot be served for `error` until something it
    /// reads changes (the watches bring that change).
    pub fn failed(error: &Error) -> Self {
        Synced {
            report: Report {
                verdict: Some(Verdict::failed(error)),
                secret_name: None,
                token: None,
            },
            next: Next::AwaitChange,
            notes: vec![Note::of_error(error)],
            token_times: None,
        }
    }

    /// Nothing to report; look again `next`.
    pub fn unchanged(next: Next) -> Self {
        Synced {
            report: Report {
                verdict: None,
                secret_name: None,
                token: None,
            },
            next,
            notes: Vec::new(),
            token_times: None,
        }
    }
}

/// The report of a connection whose token is current. Nothing in it
/// changes from one routine refresh to the next, so a refresh writes no
/// status: the token's times are on the target Secret and in the metrics.
/// `due` is when `record` is replaced: the same for every replica and every
/// reconcile, so recomputing it never rewrites the target Secret.
pub fn healthy(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    settings: &OAuthSettings,
    record: &TokenRecord,
    due: Timestamp,
    previous: TokenStatus,
) -> Synced {
    let target = conn.target_secret_name();
    let mut message = format!(
        "Secret {target} holds a valid access token; tokenkeeper replaces it before it expires. \
         Its expires_at key and tokenkeeper.dev/next-refresh-at annotation say when."
    );
    if record.lifetime_assumed {
        message.push_str(&format!(
            " The provider did not say when the token expires (no expires_in); tokenkeeper \
             assumes {} (spec.oauth2.defaultTokenLifetime).",
            humanize(settings.default_lifetime)
        ));
    }
    let lifetime = record.expires_at.duration_since(record.issued_at);
    let schedule = &settings.schedule;
    if !schedule.propagation_fits(lifetime) {
        message.push_str(&format!(
            " The token lives {}, too short to replace it {} before it expires (the \
             propagation margin) and still keep each token {}: a pod that reads the Secret \
             through a volume may see the new token only after the old one expired.",
            humanize(lifetime.max(SignedDuration::ZERO)),
            humanize(schedule.propagation_margin),
            humanize(schedule.min_interval),
        ));
    }
    if let Some(oddities) = &record.oddities {
        message.push_str(&format!(
            " The provider's answer was odd but clear, and read so: {oddities}."
        ));
    }
    let granted = record.granted_scopes();
    let missing = missing_scopes(
        &oauth.required_scopes,
        record.scope.is_some().then_some(&granted[..]),
    );
    let verdict = if let Some(denied) = &record.verification_denied {
        Verdict::failed(&Error::InsufficientPermissions {
            detail: denied.clone(),
            fix: reauthorize_fix(conn, oauth),
        })
    } else if missing.is_empty() {
        Verdict::ready(message)
    } else {
        Verdict::failed(&Error::InsufficientPermissions {
            detail: format!(
                "missing {} (granted: {})",
                missing.join(", "),
                if granted.is_empty() {
                    "none".to_owned()
                } else {
                    granted.join(" ")
                }
            ),
            fix: reauthorize_fix(conn, oauth),
        })
    };
    Synced {
        report: Report {
            verdict: Some(verdict),
            secret_name: Some(target),
            token: Some(TokenStatus {
                next_refresh_time: None,
                granted_scopes: granted,
                failed_refresh_attempts: 0,
                last_failure_time: previous.last_failure_time,
                force_refresh_handled: previous.force_refresh_handled,
                authorization_url: previous.authorization_url,
                grant_sealing_key: previous.grant_sealing_key,
                authorized_account: previous.authorized_account,
                provider_endpoints: previous.provider_endpoints,
                grant_expiry: previous.grant_expiry,
                reauthorize_fix: previous.reauthorize_fix,
            }),
        },
        next: Next::At(due),
        notes: Vec::new(),
        token_times: Some(TokenTimes {
            expires_at: Some(record.expires_at),
            next_action_at: Some(due),
        }),
    }
}

/// The report after a failed token request: the backoff and its retry time
/// when the error is retried, what the Secret still holds, and a Warning.
pub fn failed(
    conn: &SourceConnection,
    error: &Error,
    current: Option<&TokenRecord>,
    previous: TokenStatus,
    now: Timestamp,
    jitter_key: &str,
) -> Synced {
    let attempts = previous.failed_refresh_attempts.saturating_add(1);
    let (verdict, retry) = match error.retry() {
        Retry::Backoff => {
            let retry_after = match error {
                Error::ProviderUnavailable { retry_after, .. } => *retry_after,
                _ => None,
            };
            let retry = retry_at(now, attempts, retry_after, jitter_key);
            let verdict = retried_verdict(conn, error, current, now, attempts, retry);
            (verdict, Some(retry))
        }
        Retry::AwaitChange | Retry::Infrastructure => (Verdict::failed(error), None),
    };
    Synced {
        report: Report {
            verdict: Some(verdict),
            secret_name: None,
            token: Some(TokenStatus {
                next_refresh_time: retry,
                failed_refresh_attempts: attempts,
                last_failure_time: Some(now),
                ..previous
            }),
        },
        next: retry.map_or(Next::AwaitChange, Next::At),
        notes: vec![Note::of_error(error)],
        token_times: Some(TokenTimes {
            expires_at: current.map(|c| c.expires_at),
            next_action_at: retry,
        }),
    }
}

/// The conditions while a transient failure is retried: `Ready` stays
/// True while the Secret's token is valid.
fn retried_verdict(
    conn: &SourceConnection,
    error: &Error,
    current: Option<&TokenRecord>,
    now: Timestamp,
    attempts: u32,
    retry: Timestamp,
) -> Verdict {
    let progress = format!(
        " Attempt {attempts} failed; tokenkeeper retries at {} with backoff.",
        rfc3339(retry)
    );
    let valid_token = current.filter(|c| !c.is_expired(now));
    let (ready, reason, message) = match (valid_token, current) {
        _ if matches!(error, Error::AccessTokenRejected { .. }) => {
            (false, error.reason(), format!("{error}.{progress}"))
        }
        (Some(token), _) => (
            true,
            error.reason(),
            format!(
                "{error}{progress} Secret {} keeps the current access token, valid until {}.",
                conn.target_secret_name(),
                rfc3339(token.expires_at)
            ),
        ),
        (None, Some(expired)) => (
            false,
            Reason::AccessTokenExpired,
            format!(
                "The access token in Secret {} expired at {} because refreshing keeps failing: \
                 {error}{progress}",
                conn.target_secret_name(),
                rfc3339(expired.expires_at)
            ),
        ),
        (None, None) => (false, error.reason(), format!("{error}{progress}")),
    };
    Verdict {
        ready,
        reason,
        message,
        rejection: None,
    }
}

/// Says in the Ready message that the refresh that led to `synced` waited
/// for the Kubernetes API from `since` until `now`.
pub fn say_deferred(synced: &mut Synced, since: Timestamp, now: Timestamp) {
    if let Some(verdict) = synced.report.verdict.as_mut() {
        verdict.message.push_str(&format!(
            " A refresh waited from {} to {} for the Kubernetes API to answer, so that a \
             rotated refresh token could be stored.",
            rfc3339(since),
            rfc3339(now)
        ));
    }
}

/// A token just issued, verified and written.
pub struct Refreshed {
    pub record: TokenRecord,
    /// When `record` is due for refresh.
    pub due: Timestamp,
    pub reason: RefreshReason,
    /// The verification request refused the token (HTTP 401).
    pub rejected: Option<Error>,
}

/// The report after a token request that succeeded: healthy, with a
/// `TokenIssued` event when the connection was not ready before or the
/// user supplied a new refresh token; or failed when the provider refused
/// its own token.
pub fn after_refresh(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    settings: &OAuthSettings,
    refreshed: Refreshed,
    previous: TokenStatus,
    now: Timestamp,
    jitter_key: &str,
) -> Synced {
    let record = &refreshed.record;
    if let Some(error) = &refreshed.rejected {
        return failed(conn, error, Some(record), previous, now, jitter_key);
    }
    let was_ready = find_condition(conn, CONDITION_READY)
        .is_some_and(|c| c.status == "True" && c.reason == Reason::SecretSynced.as_str());
    let mut synced = healthy(conn, oauth, settings, record, refreshed.due, previous);
    if !was_ready || refreshed.reason == RefreshReason::NewRefreshToken {
        synced.notes.push(token_issued(conn, record, false));
    }
    synced
}

/// The event of a connection nobody has authorized yet: Normal, since it
/// is where every `authorizationCode` connection starts.
pub fn authorization_required(error: &Error) -> Note {
    Note::normal(error.reason(), error.to_string())
}

/// The event that says a token reached the target Secret.
pub fn token_issued(conn: &SourceConnection, record: &TokenRecord, consented: bool) -> Note {
    let what = if consented {
        "Authorized: an access token"
    } else {
        "Obtained an access token"
    };
    Note::normal(
        Reason::TokenIssued,
        format!(
            "{what} valid until {}; Secret {} holds it",
            rfc3339(record.expires_at),
            conn.target_secret_name()
        ),
    )
}

/// The event after a consent was adopted: which provider account it is
/// for, and what became of the grant it replaced (`replaced`: the old
/// grant's account, if there was an old grant; `revoked`: whether revoking
/// it worked, if it was tried).
pub fn consent_adopted(
    account: Option<&str>,
    replaced: Option<Option<&str>>,
    revoked: Option<bool>,
) -> Note {
    let by = match account {
        Some(account) => format!("the provider account {account:?}"),
        None => "an account the provider did not name".to_owned(),
    };
    let mut message = format!("Consent given by {by} is in use");
    if let Some(old) = replaced {
        let old = match old {
            Some(old) if Some(old) == account => format!("the earlier grant of {old:?}"),
            Some(old) => format!("the grant of ANOTHER account, {old:?}"),
            None => "the earlier grant (account not named)".to_owned(),
        };
        let fate = match revoked {
            Some(true) => "revoked at the provider",
            Some(false) => "NOT revoked: revoke it at the provider",
            None => "not revoked (no spec.oauth2.revocationUrl)",
        };
        message.push_str(&format!("; it replaced {old}, {fate}"));
    }
    Note::normal(Reason::TokenIssued, message)
}

/// What the user does to give the connection a new grant.
pub fn reauthorize_fix(conn: &SourceConnection, oauth: &OAuth2Auth) -> String {
    let namespace = conn.namespace().unwrap_or_default();
    let open_link = conn
        .status
        .as_ref()
        .and_then(|s| s.authorization_url.as_deref())
        .filter(|_| oauth.authorization_url.is_some())
        .map(|link| format!("open {link} in a browser and grant access again; or "))
        .unwrap_or_default();
    let command = match (&oauth.grant, &oauth.refresh_token_secret_ref) {
        (OAuth2Grant::RefreshToken, Some(reference)) => format!(
            "kubectl create secret generic {name} -n {namespace} \
             --from-literal={key}=NEW_REFRESH_TOKEN --dry-run=client -o yaml | kubectl apply -f -",
            name = reference.name,
            key = reference.key
        ),
        _ => format!(
            "grant the client the needed access at the provider, then force a new token: \
             kubectl annotate srcconn {} -n {namespace} {ANNOTATION_FORCE_REFRESH}=\"$(date +%s)\" --overwrite",
            conn.name_any()
        ),
    };
    format!("{open_link}{command}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::refresh::Schedule;
    use std::collections::BTreeMap;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn connection(required_scopes: &[&str]) -> (SourceConnection, OAuth2Auth) {
        let conn: SourceConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "tokenkeeper.dev/v1alpha1",
            "kind": "SourceConnection",
            "metadata": {"name": "crm", "namespace": "data", "uid": "uid-1"},
            "spec": {"oauth2": {
                "tokenUrl": "https://login.example.com/token",
                "grant": "refreshToken",
                "client": {"secretRef": {"name": "crm-client"}},
                "refreshTokenSecretRef": {"name": "crm-grant", "key": "refresh_token"},
                "requiredScopes": required_scopes,
            }},
        }))
        .unwrap();
        let oauth = conn.spec.oauth2.clone().unwrap();
        (conn, oauth)
    }

    fn token(issued: i64, lifetime: i64, scope: Option<&str>) -> TokenRecord {
        TokenRecord {
            access_token: "at".into(),
            token_type: "Bearer".into(),
            issued_at: at(issued),
            expires_at: at(issued + lifetime),
            lifetime_assumed: false,
            scope: scope.map(str::to_owned),
            fields: BTreeMap::new(),
            request_hash: "h".into(),
            verification_denied: None,
            oddities: None,
        }
    }

    fn unavailable(retry_after: Option<u64>) -> Error {
        Error::ProviderUnavailable {
            endpoint: "https://login.example.com/token".into(),
            detail: "HTTP 503".into(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    /// Settings whose propagation margin fits the tokens of these tests.
    fn settings(default_lifetime: SignedDuration) -> OAuthSettings {
        OAuthSettings {
            schedule: Schedule {
                refresh_before: None,
                min_interval: SignedDuration::from_secs(30),
                propagation_margin: SignedDuration::from_mins(2),
            },
            default_lifetime,
            max_lifetime: SignedDuration::from_hours(24),
            max_retry_after: Duration::from_secs(3600),
        }
    }

    fn verdict(synced: &Synced) -> &Verdict {
        synced.report.verdict.as_ref().expect("a verdict")
    }

    #[test]
    fn a_current_token_is_ready_and_due_at_its_refresh_time() {
        let (conn, oauth) = connection(&[]);
        let record = token(1_000, 3_600, Some("read"));
        let previous = TokenStatus {
            failed_refresh_attempts: 3,
            next_refresh_time: Some(at(900)),
            ..TokenStatus::default()
        };
        let oauth_settings = settings(SignedDuration::from_hours(1));
        let synced = healthy(&conn, &oauth, &oauth_settings, &record, at(3_400), previous);
        assert!(verdict(&synced).ready);
        assert_eq!(verdict(&synced).reason, Reason::SecretSynced);
        assert_eq!(synced.next, Next::At(at(3_400)));
        let token_status = synced.report.token.unwrap();
        assert_eq!(token_status.failed_refresh_attempts, 0, "a success resets");
        assert_eq!(token_status.next_refresh_time, None);
        assert_eq!(token_status.granted_scopes, ["read"]);
        assert_eq!(
            synced.token_times,
            Some(TokenTimes {
                expires_at: Some(at(4_600)),
                next_action_at: Some(at(3_400)),
            })
        );
    }

    #[test]
    fn a_token_too_short_for_the_propagation_margin_is_said() {
        let (conn, oauth) = connection(&[]);
        let settings = settings(SignedDuration::from_hours(1));
        let short = healthy(
            &conn,
            &oauth,
            &settings,
            &token(1_000, 120, None),
            at(1_080),
            TokenStatus::default(),
        );
        let said = verdict(&short);
        assert!(said.ready, "{said:?}");
        assert!(
            said.message
                .contains("The token lives 2m, too short to replace it 2m before it expires"),
            "{said:?}"
        );
        let long = healthy(
            &conn,
            &oauth,
            &settings,
            &token(1_000, 150, None),
            at(1_030),
            TokenStatus::default(),
        );
        assert!(
            !verdict(&long).message.contains("propagation margin"),
            "{:?}",
            verdict(&long)
        );
    }

    #[test]
    fn an_assumed_lifetime_is_said() {
        let (conn, oauth) = connection(&[]);
        let record = TokenRecord {
            lifetime_assumed: true,
            ..token(1_000, 5_400, None)
        };
        let oauth_settings = settings(SignedDuration::from_mins(90));
        let synced = healthy(
            &conn,
            &oauth,
            &oauth_settings,
            &record,
            at(4_600),
            TokenStatus::default(),
        );
        assert!(
            verdict(&synced).message.contains("assumes 90m"),
            "{:?}",
            verdict(&synced)
        );
    }

    #[test]
    fn missing_scopes_or_a_denied_verification_are_insufficient_permissions() {
        let (conn, oauth) = connection(&["read", "write"]);
        let oauth_settings = settings(SignedDuration::from_hours(1));
        let narrow = token(1_000, 3_600, Some("read"));
        let synced = healthy(
            &conn,
            &oauth,
            &oauth_settings,
            &narrow,
            at(3_400),
            TokenStatus::default(),
        );
        let said = verdict(&synced);
        assert_eq!(said.reason, Reason::InsufficientPermissions);
        assert!(
            said.message.contains("missing write (granted: read)"),
            "{said:?}"
        );
        assert!(said.rejection.is_some(), "AuthFailed=True");
        assert_eq!(synced.next, Next::At(at(3_400)), "kept fresh all the same");

        let unsaid = token(1_000, 3_600, None);
        let synced = healthy(
            &conn,
            &oauth,
            &oauth_settings,
            &unsaid,
            at(3_400),
            TokenStatus::default(),
        );
        assert!(
            verdict(&synced).ready,
            "no scope in the answer: as requested"
        );

        let denied = TokenRecord {
            verification_denied: Some("GET https://api/me answered HTTP 403".into()),
            ..token(1_000, 3_600, None)
        };
        let synced = healthy(
            &conn,
            &oauth,
            &oauth_settings,
            &denied,
            at(3_400),
            TokenStatus::default(),
        );
        assert_eq!(verdict(&synced).reason, Reason::InsufficientPermissions);
    }

    #[test]
    fn a_transient_failure_keeps_ready_while_the_token_is_valid_and_backs_off() {
        let (conn, _) = connection(&[]);
        let current = token(1_000, 3_600, None);
        let previous = TokenStatus {
            failed_refresh_attempts: 2,
            ..TokenStatus::default()
        };
        let synced = failed(
            &conn,
            &unavailable(None),
            Some(&current),
            previous,
            at(3_500),
            "k",
        );
        let said = verdict(&synced);
        assert!(said.ready);
        assert_eq!(said.reason, Reason::ProviderUnavailable);
        assert!(said.message.contains("Attempt 3 failed"), "{said:?}");
        let token_status = synced.report.token.as_ref().unwrap();
        assert_eq!(token_status.failed_refresh_attempts, 3);
        assert_eq!(token_status.last_failure_time, Some(at(3_500)));
        let retry = token_status.next_refresh_time.expect("a retry time");
        let wait = retry.duration_since(at(3_500)).as_secs();
        assert!(
            (21..=23).contains(&wait),
            "the third backoff is 20 s: {wait}"
        );
        assert_eq!(synced.next, Next::At(retry));
        assert_eq!(synced.notes, [Note::of_error(&unavailable(None))]);
    }

    #[test]
    fn a_retry_after_longer_than_the_backoff_is_honoured() {
        let (conn, _) = connection(&[]);
        let current = token(1_000, 3_600, None);
        let synced = failed(
            &conn,
            &unavailable(Some(60)),
            Some(&current),
            TokenStatus::default(),
            at(3_500),
            "k",
        );
        let retry = synced.report.token.unwrap().next_refresh_time.unwrap();
        assert!(retry >= at(3_560), "{retry}");
    }

    #[test]
    fn once_the_token_expired_the_failure_is_access_token_expired() {
        let (conn, _) = connection(&[]);
        let current = token(1_000, 3_600, None);
        let synced = failed(
            &conn,
            &unavailable(None),
            Some(&current),
            TokenStatus::default(),
            at(4_600),
            "k",
        );
        let said = verdict(&synced);
        assert!(!said.ready);
        assert_eq!(said.reason, Reason::AccessTokenExpired);
        assert!(said.message.contains("expired at"), "{said:?}");
    }

    #[test]
    fn a_permanent_failure_waits_for_a_change_and_sets_no_retry_time() {
        let (conn, oauth) = connection(&[]);
        let error = Error::InvalidGrant {
            detail: String::new(),
            fix: reauthorize_fix(&conn, &oauth),
        };
        let current = token(1_000, 3_600, None);
        let synced = failed(
            &conn,
            &error,
            Some(&current),
            TokenStatus::default(),
            at(2_000),
            "k",
        );
        assert_eq!(synced.next, Next::AwaitChange);
        let said = verdict(&synced);
        assert_eq!(said.reason, Reason::InvalidGrant);
        assert!(said.rejection.is_some());
        assert!(
            said.message
                .contains("kubectl create secret generic crm-grant -n data")
        );
        let token_status = synced.report.token.unwrap();
        assert_eq!(token_status.next_refresh_time, None);
        assert_eq!(token_status.failed_refresh_attempts, 1);
    }

    #[test]
    fn a_token_issued_is_told_when_the_connection_was_not_ready() {
        let (mut conn, oauth) = connection(&[]);
        let oauth_settings = settings(SignedDuration::from_hours(1));
        let refreshed = |reason| Refreshed {
            record: token(1_000, 3_600, None),
            due: at(3_400),
            reason,
            rejected: None,
        };
        let first = after_refresh(
            &conn,
            &oauth,
            &oauth_settings,
            refreshed(RefreshReason::FirstToken),
            TokenStatus::default(),
            at(1_000),
            "k",
        );
        assert_eq!(first.notes.len(), 1);
        assert_eq!(first.notes[0].reason, Reason::TokenIssued);

        let desired = crate::decide::status::desired_status(&conn, &first.report, at(1_000));
        conn.status = Some(desired);
        let routine = after_refresh(
            &conn,
            &oauth,
            &oauth_settings,
            refreshed(RefreshReason::Due),
            TokenStatus::default(),
            at(3_400),
            "k",
        );
        assert!(routine.notes.is_empty(), "a routine refresh says nothing");
        let rejected = after_refresh(
            &conn,
            &oauth,
            &oauth_settings,
            Refreshed {
                rejected: Some(Error::AccessTokenRejected {
                    url: "https://api/me".into(),
                    detail: String::new(),
                }),
                ..refreshed(RefreshReason::Due)
            },
            TokenStatus::default(),
            at(3_400),
            "k",
        );
        assert_eq!(verdict(&rejected).reason, Reason::AccessTokenExpired);
        assert!(!verdict(&rejected).ready);
        assert!(matches!(rejected.next, Next::At(_)), "retried with backoff");
    }

    #[test]
    fn next_is_counted_from_the_end_of_the_reconcile() {
        assert_eq!(
            Next::At(at(100)).delay(at(90)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(Next::At(at(100)).delay(at(110)), Some(Duration::ZERO));
        assert_eq!(Next::AwaitChange.delay(at(0)), None);
    }
}
