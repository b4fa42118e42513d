//! Pure computation of a SourceConnection's status from the outcome of a
//! reconcile. Conditions whose status did not change keep their
//! `lastTransitionTime`, so an unchanged outcome yields an identical status
//! and the controller writes nothing.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::api::{SourceConnection, SourceConnectionStatus};
use crate::error::Error;

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_AUTH_FAILED: &str = "AuthFailed";
pub const REASON_SECRET_SYNCED: &str = "SecretSynced";
pub const REASON_NOT_REJECTED: &str = "NotRejected";

/// What a reconcile achieved.
pub enum Outcome<'a> {
    /// The target Secret holds the current credentials.
    Synced { secret_name: String },
    /// The connection cannot be served; the error says why.
    Failed(&'a Error),
}

/// The status the SourceConnection should have after `outcome`, given what
/// it has now. `now` is only used for conditions that change status.
pub fn desired_status(
    conn: &SourceConnection,
    outcome: &Outcome<'_>,
    now: Timestamp,
) -> SourceConnectionStatus {
    let current = conn.status.clone().unwrap_or_default();
    let generation = conn.metadata.generation;
    let now = Time(truncate_to_seconds(now));

    let (ready, auth_failed, secret_name) = match outcome {
        Outcome::Synced { secret_name } => (
            condition(
                CONDITION_READY,
                true,
                REASON_SECRET_SYNCED,
                format!("Secret {secret_name} holds the current credentials."),
            ),
            not_rejected(),
            Some(secret_name.clone()),
        ),
        Outcome::Failed(error) => (
            condition(CONDITION_READY, false, error.reason(), error.to_string()),
            if error.is_auth_failure() {
                condition(
                    CONDITION_AUTH_FAILED,
                    true,
                    error.reason(),
                    error.to_string(),
                )
            } else {
                not_rejected()
            },
            current.secret_name.clone(),
        ),
    };

    let conditions = [ready, auth_failed]
        .into_iter()
        .map(|mut wanted| {
            wanted.observed_generation = generation;
            wanted.last_transition_time = current
                .conditions
                .iter()
                .find(|c| c.type_ == wanted.type_ && c.status == wanted.status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            wanted
        })
        .collect();

    SourceConnectionStatus {
        observed_generation: generation,
        conditions,
        secret_name,
        token_expires_at: current.token_expires_at,
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
pub fn display_name(conn: &SourceConnection) -> String {
    format!(
        "{}/{}",
        conn.namespace().unwrap_or_default(),
        conn.name_any()
    )
}

fn not_rejected() -> Condition {
    condition(
        CONDITION_AUTH_FAILED,
        false,
        REASON_NOT_REJECTED,
        "No credential of this connection has been rejected.".into(),
    )
}

fn condition(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// The API server stores times with second precision; comparing a stored
/// time with an untruncated one would always differ and cause a write.
fn truncate_to_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).expect("a valid timestamp stays valid")
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

    fn synced() -> Outcome<'static> {
        Outcome::Synced {
            secret_name: "stripe-credentials".into(),
        }
    }

    #[test]
    fn synced_is_ready_and_not_rejected() {
        let status = desired_status(&conn(), &synced(), at(1_000));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.secret_name.as_deref(), Some("stripe-credentials"));
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(ready.reason, "SecretSynced");
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(ready.last_transition_time, Time(at(1_000)));
        let auth = &status.conditions[1];
        assert_eq!(
            (auth.type_.as_str(), auth.status.as_str()),
            ("AuthFailed", "False")
        );
    }

    #[test]
    fn unchanged_outcome_gives_identical_status() {
        let mut conn = conn();
        conn.status = Some(desired_status(&conn, &synced(), at(1_000)));
        let again = desired_status(&conn, &synced(), at(5_000));
        assert!(is_current(&conn, &again));
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conn = conn();
        let missing = Error::InvalidSpec("first".into());
        conn.status = Some(desired_status(&conn, &Outcome::Failed(&missing), at(1_000)));
        let other = Error::InvalidSpec("second".into());
        let status = desired_status(&conn, &Outcome::Failed(&other), at(2_000));
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
            Time(at(1_000)),
            "AuthFailed stayed False"
        );
    }

    #[test]
    fn failure_keeps_the_last_secret_name() {
        let mut conn = conn();
        conn.status = Some(desired_status(&conn, &synced(), at(1_000)));
        let err = Error::InvalidSpec("broken".into());
        let status = desired_status(&conn, &Outcome::Failed(&err), at(2_000));
        assert_eq!(status.secret_name.as_deref(), Some("stripe-credentials"));
        assert_eq!(find_in(&status, "Ready").reason, "InvalidSpec");
    }

    #[test]
    fn times_are_stored_at_second_precision() {
        let precise = Timestamp::from_millisecond(1_000_999).unwrap();
        let status = desired_status(&conn(), &synced(), precise);
        assert_eq!(status.conditions[0].last_transition_time, Time(at(1_000)));
    }

    fn find_in<'a>(status: &'a SourceConnectionStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }
}
