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
    default_lifetime: SignedDuration,
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
            humanize(default_lifetime)
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
    default_lifetime: SignedDuration,
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
    let mut synced = healthy(
        conn,
        oauth,
        default_lifetime,
        record,
        refreshed.due,
        previous,
    );
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
