//! Pure computation of a SourceConnection's status. Conditions whose status
//! did not change keep their `lastTransitionTime`, so an unchanged outcome
//! yields an identical status and the controller writes nothing.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use kube::runtime::events::EventType;

use crate::api::{SourceConnection, SourceConnectionStatus};
use crate::error::{Error, Reason};
use crate::time::truncate_to_seconds;

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_AUTH_FAILED: &str = "AuthFailed";
/// True from shortly before a grant's known end (a provider's absolute
/// limit, or the refresh token's lifetime): a person must re-authorize.
pub const CONDITION_GRANT_EXPIRING: &str = "GrantExpiring";

/// When a grant dies whatever is refreshed, and when to say so.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantExpiry {
    pub expires_at: Timestamp,
    pub warn_at: Timestamp,
    /// Where the end comes from, in words.
    pub source: String,
}

/// What the conditions say.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    /// Set when the provider rejected the credentials: `AuthFailed=True`.
    pub rejection: Option<(Reason, String)>,
}

impl Verdict {
    pub fn ready(message: String) -> Self {
        Verdict {
            ready: true,
            reason: Reason::SecretSynced,
            message,
            rejection: None,
        }
    }

    /// The connection cannot be served for `error`.
    pub fn failed(error: &Error) -> Self {
        Verdict {
            ready: false,
            reason: error.reason(),
            message: error.to_string(),
            rejection: error
                .is_auth_failure()
                .then(|| (error.reason(), error.to_string())),
        }
    }
}

/// Something to tell the user through an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: Reason,
    pub message: String,
}

impl Note {
    pub fn normal(reason: Reason, message: String) -> Self {
        Note {
            type_: EventType::Normal,
            reason,
            message,
        }
    }

    pub fn warning(reason: Reason, message: String) -> Self {
        Note {
            type_: EventType::Warning,
            reason,
            message,
        }
    }

    /// A Warning that says what `error` says.
    pub fn of_error(error: &Error) -> Self {
        Note::warning(error.reason(), error.to_string())
    }
}

/// The OAuth 2.0 fields of the status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStatus {
    pub next_refresh_time: Option<Timestamp>,
    pub granted_scopes: Vec<String>,
    pub failed_refresh_attempts: u32,
    pub last_failure_time: Option<Timestamp>,
    pub force_refresh_handled: Option<String>,
    pub authorization_url: Option<String>,
    pub grant_sealing_key: Option<String>,
    pub authorized_account: Option<String>,
    pub provider_endpoints: BTreeMap<String, String>,
    pub grant_expiry: Option<GrantExpiry>,
    /// How to re-authorize, for the GrantExpiring condition.
    pub reauthorize_fix: Option<String>,
}

impl TokenStatus {
    /// The token fields `conn` carries now.
    pub fn current(conn: &SourceConnection) -> Self {
        let Some(status) = &conn.status else {
            return Self::default();
        };
        let time = |t: &Option<Time>| t.as_ref().map(|t| t.0);
        TokenStatus {
            next_refresh_time: time(&status.next_refresh_time),
            granted_scopes: status.granted_scopes.clone(),
            failed_refresh_attempts: status
                .failed_refresh_attempts
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or_default(),
            last_failure_time: time(&status.last_failure_time),
            force_refresh_handled: status.force_refresh_handled.clone(),
            authorization_url: status.authorization_url.clone(),
            grant_sealing_key: status.grant_sealing_key.clone(),
            authorized_account: status.authorized_account.clone(),
            provider_endpoints: status.provider_endpoints.clone(),
            grant_expiry: None,
            reauthorize_fix: None,
        }
    }
}

/// What a reconcile found; `None` fields keep what the status has.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `None` keeps the conditions as they are (a retry is pending).
    pub verdict: Option<Verdict>,
    pub secret_name: Option<String>,
    pub token: Option<TokenStatus>,
}

/// The status `conn` should have after `report`, given what it has now.
/// `now` stamps conditions that change status.
pub fn desired_status(
    conn: &SourceConnection,
    report: &Report,
    now: Timestamp,
) -> SourceConnectionStatus {
    let current = conn.status.clone().unwrap_or_default();
    let generation = conn.metadata.generation;
    let now = Time(truncate_to_seconds(now));

    let conditions = match &report.verdict {
        None => current
            .conditions
            .iter()
            .cloned()
            .map(|mut c| {
                c.observed_generation = generation;
                c
            })
            .collect(),
        Some(verdict) => {
            let ready = condition(
                CONDITION_READY,
                verdict.ready,
                verdict.reason,
                &verdict.message,
            );
            let auth_failed = match &verdict.rejection {
                Some((reason, message)) => condition(CONDITION_AUTH_FAILED, true, *reason, message),
                None => condition(
                    CONDITION_AUTH_FAILED,
                    false,
                    Reason::NotRejected,
                    "No credential of this connection has been rejected.",
                ),
            };
            let expiring = report
                .token
                .as_ref()
                .and_then(|t| Some((t.grant_expiry.as_ref()?, t.reauthorize_fix.as_deref())))
                .map(|(expiry, fix)| grant_condition(expiry, fix, now.0));
            [Some(ready), Some(auth_failed), expiring]
                .into_iter()
                .flatten()
                .map(|mut wanted| {
                    wanted.observed_generation = generation;
                    wanted.last_transition_time = current
                        .conditions
                        .iter()
                        .find(|c| c.type_ == wanted.type_ && c.status == wanted.status)
                        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
                    wanted
                })
                .collect()
        }
    };

    let token = report
        .token
        .clone()
        .unwrap_or_else(|| TokenStatus::current(conn));
    let time = |t: Option<Timestamp>| t.map(|t| Time(truncate_to_seconds(t)));
    SourceConnectionStatus {
        observed_generation: generation,
        conditions,
        secret_name: report.secret_name.clone().or(current.secret_name),
        next_refresh_time: time(token.next_refresh_time),
        granted_scopes: token.granted_scopes,
        failed_refresh_attempts: (token.failed_refresh_attempts > 0)
            .then(|| i32::try_from(token.failed_refresh_attempts).unwrap_or(i32::MAX)),
        last_failure_time: time(token.last_failure_time),
        force_refresh_handled: token.force_refresh_handled,
        authorization_url: token.authorization_url,
        grant_sealing_key: token.grant_sealing_key,
        authorized_account: token.authorized_account,
        provider_endpoints: token.provider_endpoints,
        grant_expires_at: match (&report.verdict, &token.grant_expiry) {
            (Some(_), expiry) => time(expiry.as_ref().map(|e| e.expires_at)),
            (None, _) => current.grant_expires_at,
        },
    }
}

/// The GrantExpiring condition for `expiry` at `now`.
fn grant_condition(expiry: &GrantExpiry, fix: Option<&str>, now: Timestamp) -> Condition {
    let end = crate::time::rfc3339(expiry.expires_at);
    if now >= expiry.warn_at {
        let fix = fix.unwrap_or("authorize it again");
        condition(
            CONDITION_GRANT_EXPIRING,
            true,
            Reason::GrantExpiring,
            &format!(
                "The grant ends at {end} ({}); no refresh can extend it. Re-authorize before \
                 then: {fix}",
                expiry.source
            ),
        )
    } else {
        condition(
            CONDITION_GRANT_EXPIRING,
            false,
            Reason::GrantValid,
            &format!(
                "The grant ends at {end} ({}); this condition turns True at {}.",
                expiry.source,
                crate::time::rfc3339(expiry.warn_at)
            ),
        )
    }
}

/// Whether `desired` turns the GrantExpiring condition True, which
/// `conn`'s status did not have: the moment for a Warning event.
pub fn grant_expiry_began(
    conn: &SourceConnection,
    desired: &SourceConnectionStatus,
) -> Option<String> {
    let expiring = |conditions: &[Condition]| {
        conditions
            .iter()
            .find(|c| c.type_ == CONDITION_GRANT_EXPIRING && c.status == "True")
            .map(|c| c.message.clone())
    };
    let before = conn.status.as_ref().and_then(|s| expiring(&s.conditions));
    match (before, expiring(&desired.conditions)) {
        (None, Some(message)) => Some(message),
        _ => None,
    }
}

/// The condition of `conn` with the given type, if any.
pub fn find_condition<'a>(conn: &'a SourceConnection, type_: &str) -> Option<&'a Condition> {
    conn.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Whether the status `conn` carries already says the same as `desired`.
pub fn is_current(conn: &SourceConnection, desired: &SourceConnectionStatus) -> bool {
    conn.status.as_ref() == Some(desired)
}

/// A short label for logs: `namespace/name`.
pub fn display_name(conn: &impl kube::Resource) -> String {
    format!(
        "{}/{}",
        conn.namespace().unwrap_or_default(),
        conn.name_any()
    )
}

fn condition(type_: &str, status: bool, reason: Reason, message: &str) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.as_str().to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiKeyAuth, ApiKeySecretRef, SourceConnectionSpec};

    fn conn() -> SourceConnection {
        let mut conn = SourceConnection::new(
            "stripe",
            SourceConnectionSpec {
                basic: None,
                api_key: Some(ApiKeyAuth {
                    secret_ref: ApiKeySecretRef {
                        name: "stripe".into(),
                        namespace: None,
                        key: "api_key".into(),
                    },
                }),
                oauth2: None,
                target: Default::default(),
            },
        );
        conn.metadata.namespace = Some("extract".into());
        conn.metadata.generation = Some(3);
        conn
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn synced() -> Report {
        Report {
            verdict: Some(Verdict::ready(
                "Secret stripe-credentials holds the current credentials.".into(),
            )),
            secret_name: Some("stripe-credentials".into()),
            token: Some(TokenStatus::default()),
        }
    }

    fn failed(error: &Error) -> Report {
        Report {
            verdict: Some(Verdict::failed(error)),
            secret_name: None,
            token: None,
        }
    }

    fn find_in<'a>(status: &'a SourceConnectionStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn synced_is_ready_and_not_rejected() {
        let status = desired_status(&conn(), &synced(), at(1_000));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.secret_name.as_deref(), Some("stripe-credentials"));
        let ready = find_in(&status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "SecretSynced")
        );
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(ready.last_transition_time, Time(at(1_000)));
        let auth = find_in(&status, "AuthFailed");
        assert_eq!(
            (auth.status.as_str(), auth.reason.as_str()),
            ("False", "NotRejected")
        );
    }

    #[test]
    fn unchanged_outcome_gives_identical_status() {
        let mut conn = conn();
        conn.status = Some(desired_status(&conn, &synced(), at(1_000)));
        assert!(is_current(
            &conn,
            &desired_status(&conn, &synced(), at(5_000))
        ));
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conn = conn();
        conn.status = Some(desired_status(
            &conn,
            &failed(&Error::InvalidSpec("first".into())),
            at(1_000),
        ));
        let status = desired_status(
            &conn,
            &failed(&Error::InvalidSpec("second".into())),
            at(2_000),
        );
        let ready = find_in(&status, "Ready");
        assert_eq!(ready.message, "second");
        assert_eq!(
            ready.last_transition_time,
            Time(at(1_000)),
            "False -> False keeps the time"
        );
        conn.status = Some(status);
        let healed = desired_status(&conn, &synced(), at(3_000));
        assert_eq!(
            find_in(&healed, "Ready").last_transition_time,
            Time(at(3_000))
        );
        assert_eq!(
            find_in(&healed, "AuthFailed").last_transition_time,
            Time(at(1_000))
        );
    }

    #[test]
    fn a_rejection_sets_auth_failed() {
        let error = Error::InvalidGrant {
            detail: String::new(),
            fix: "re-authorize".into(),
        };
        let status = desired_status(&conn(), &failed(&error), at(1_000));
        let auth = find_in(&status, "AuthFailed");
        assert_eq!(
            (auth.status.as_str(), auth.reason.as_str()),
            ("True", "InvalidGrant")
        );
        assert_eq!(find_in(&status, "Ready").status, "False");
    }

    #[test]
    fn keeping_the_verdict_keeps_conditions_and_token_fields() {
        let mut conn = conn();
        let mut report = failed(&Error::InvalidSpec("x".into()));
        report.token = Some(TokenStatus {
            failed_refresh_attempts: 2,
            next_refresh_time: Some(at(50)),
            ..Default::default()
        });
        conn.status = Some(desired_status(&conn, &report, at(10)));
        let kept = desired_status(
            &conn,
            &Report {
                verdict: None,
                secret_name: None,
                token: None,
            },
            at(20),
        );
        assert!(is_current(&conn, &kept));
        assert_eq!(kept.failed_refresh_attempts, Some(2));
    }

    #[test]
    fn failure_keeps_the_last_secret_name() {
        let mut conn = conn();
        conn.status = Some(desired_status(&conn, &synced(), at(1_000)));
        let status = desired_status(
            &conn,
            &failed(&Error::InvalidSpec("broken".into())),
            at(2_000),
        );
        assert_eq!(status.secret_name.as_deref(), Some("stripe-credentials"));
        assert_eq!(find_in(&status, "Ready").reason, "InvalidSpec");
    }

    #[test]
    fn times_are_stored_at_second_precision() {
        let precise = Timestamp::from_millisecond(1_000_999).unwrap();
        let status = desired_status(&conn(), &synced(), precise);
        assert_eq!(status.conditions[0].last_transition_time, Time(at(1_000)));
    }
}
