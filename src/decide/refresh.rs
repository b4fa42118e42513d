//! When to refresh an OAuth 2.0 token and when to retry a failed refresh:
//! pure functions of a clock reading, the current token and the
//! connection's settings.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::oauth::destination::EndpointPolicy;
use crate::oauth::token::{TokenRecord, fingerprint};
use crate::time::truncate_to_seconds;

/// Lifetime assumed when the provider sends no `expires_in` and the
/// connection sets no `defaultTokenLifetime`.
pub const FALLBACK_TOKEN_LIFETIME: SignedDuration = SignedDuration::from_hours(1);
/// Jitter spreads refreshes of connections created together; it only ever
/// moves a refresh earlier, by at most this much or 5 % of the lifetime.
const MAX_JITTER: SignedDuration = SignedDuration::from_secs(30);
/// Due times fall on this grid of wall-clock time, so that connections due
/// within one slot are refreshed on one wake-up of the operator: on its
/// single thread a wake-up is a large part of a refresh's CPU
/// (benches/README.md). Token requests held back by the rate limit are
/// released on the same grid (`throttle::RELEASE_TICK`).
pub const DUE_TIME_GRID: SignedDuration = SignedDuration::from_millis(100);

/// A kubelet syncs a pod's Secret volumes about once a minute, plus the
/// time-to-live of its Secret cache.
pub const DEFAULT_PROPAGATION_MARGIN: SignedDuration = SignedDuration::from_mins(2);

/// Parses a duration such as `90s`, `5m` or `1h30m`.
pub fn parse_duration(field: &str, text: &str) -> Result<SignedDuration, String> {
    match text.parse::<SignedDuration>() {
        Ok(duration) if duration.is_positive() => Ok(duration),
        Ok(_) => Err(format!(
            "{field} must be a positive duration, got \"{text}\""
        )),
        Err(_) => Err(format!(
            "{field} is not a duration: \"{text}\" (write it like 90s, 5m or 1h30m)"
        )),
    }
}

/// How a connection's refreshes are spaced: its `refreshBefore`, the
/// operator's floor between two refreshes, and how long before expiry a new
/// token must reach the Secret for pods to see it in time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub refresh_before: Option<SignedDuration>,
    /// No lifetime a provider answers and no setting makes a connection
    /// refresh sooner than this after its last token.
    pub min_interval: SignedDuration,
    /// The kubelet updates a mounted Secret only on its next sync, so a
    /// token written later than this before the old one expires reaches
    /// pods too late (`--refresh-propagation-margin-seconds`).
    pub propagation_margin: SignedDuration,
}

impl Schedule {
    /// Whether a token living `lifetime` can be replaced
    /// `propagation_margin` before it expires without refreshing sooner than
    /// `min_interval` after it was issued.
    pub fn propagation_fits(&self, lifetime: SignedDuration) -> bool {
        lifetime
            .checked_sub(self.propagation_margin)
            .is_some_and(|left| left >= self.min_interval.max(SignedDuration::ZERO))
    }
}

/// The operator's bounds on what providers and specs may ask for
/// (`--min-refresh-interval-seconds`, `--max-token-lifetime-seconds`,
/// `--max-retry-after-seconds`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub min_refresh_interval: SignedDuration,
    /// Longer token lifetimes are clamped to this, and `refreshBefore` and
    /// `defaultTokenLifetime` may not exceed it.
    pub max_token_lifetime: SignedDuration,
    /// A provider's `Retry-After` is honoured up to this.
    pub max_retry_after: Duration,
    /// Where requests may go (`--allow-plain-http-loopback`, `--deny-network`).
    pub endpoints: Arc<EndpointPolicy>,
    /// Only Secrets marked as sources are read (`--require-source-label`).
    pub require_source_label: bool,
    /// How long before a grant's known end GrantExpiring turns True
    /// (`--grant-expiry-warning-days`).
    pub grant_expiry_warning: SignedDuration,
    /// See `Schedule::propagation_margin`.
    pub propagation_margin: SignedDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_refresh_interval: SignedDuration::from_secs(30),
            max_token_lifetime: SignedDuration::from_hours(365 * 24),
            max_retry_after: Duration::from_secs(3600),
            endpoints: Arc::default(),
            require_source_label: false,
            grant_expiry_warning: SignedDuration::from_hours(14 * 24),
            propagation_margin: DEFAULT_PROPAGATION_MARGIN,
        }
    }
}

/// When `token` is due for refresh: at two thirds of its lifetime
/// (cert-manager's rule), or `refresh_before` its expiry when that leaves
/// some lifetime, and at the latest `propagation_margin` before expiry when
/// the lifetime allows it; less a jitter that is stable for one connection,
/// and down to the `DUE_TIME_GRID`; never sooner than `min_interval` after
/// it was issued.
pub fn refresh_due_at(token: &TokenRecord, schedule: &Schedule, jitter_key: &str) -> Timestamp {
    let lifetime = token
        .expires_at
        .duration_since(token.issued_at)
        .max(SignedDuration::ZERO);
    // Checked: the times come from a Secret that people may edit.
    let by_rule = token
        .issued_at
        .checked_add(lifetime * 2 / 3)
        .unwrap_or(token.expires_at);
    let planned = match schedule.refresh_before {
        Some(margin) if margin < lifetime => {
            token.expires_at.checked_sub(margin).unwrap_or(by_rule)
        }
        _ => by_rule,
    };
    let latest_for_pods = token
        .expires_at
        .checked_sub(schedule.propagation_margin)
        .ok()
        .filter(|_| schedule.propagation_fits(lifetime));
    let planned = latest_for_pods.map_or(planned, |latest| planned.min(latest));
    let jitter_span = (lifetime / 20).min(MAX_JITTER);
    let jitter = jitter_span.mul_f64(stable_fraction(&[jitter_key]));
    let jittered = planned.checked_sub(jitter).unwrap_or(planned);
    let earliest = token
        .issued_at
        .checked_add(schedule.min_interval.max(SignedDuration::ZERO))
        .unwrap_or(Timestamp::MAX);
    floor_to_grid(jittered)
        .max(ceil_to_millisecond(token.issued_at))
        .max(earliest)
}

/// How long to wait before `due` (a whole millisecond, the timers'
/// resolution); timers never fire early, so a requeue after this delay
/// finds the token due and never wakes just before to do nothing.
pub fn delay_until(now: Timestamp, due: Timestamp) -> Duration {
    let wait = due.duration_since(now);
    if wait.is_positive() {
        Duration::try_from(wait).unwrap_or(Duration::ZERO)
    } else {
        Duration::ZERO
    }
}

/// Why a token is requested now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshReason {
    /// There is no token yet.
    FirstToken,
    /// The user supplied a new refresh token.
    NewRefreshToken,
    /// Token request settings (URL, client, scopes, parameters) changed.
    SettingsChanged,
    /// The force-refresh annotation has a new value.
    Forced,
    /// The last attempt failed for good and something changed since.
    AfterFailure,
    /// The retry time of a transient failure has come.
    Retry,
    /// The token reached its refresh time.
    Due,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Refresh(RefreshReason),
    /// The token is fine until `until`.
    Wait {
        until: Timestamp,
    },
    /// A transient failure is backing off until `until`.
    RetryAt {
        until: Timestamp,
    },
}

/// What decides whether to request a token now.
pub struct PlanInput<'a> {
    pub now: Timestamp,
    pub current: Option<&'a TokenRecord>,
    pub request_hash: &'a str,
    pub new_user_refresh_token: bool,
    pub force_requested: bool,
    /// From status: consecutive failures and when to retry (`None` when the
    /// last failure waits for a change).
    pub failed_attempts: u32,
    pub retry_at: Option<Timestamp>,
    pub schedule: Schedule,
    pub jitter_key: &'a str,
}

/// "Is it due?", recomputed on every reconcile.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let Some(current) = input.current else {
        return match input.retry_at {
            Some(until)
                if input.failed_attempts > 0 && until > input.now && !input.force_requested =>
            {
                Plan::RetryAt { until }
            }
            _ => Plan::Refresh(RefreshReason::FirstToken),
        };
    };
    if input.new_user_refresh_token {
        return Plan::Refresh(RefreshReason::NewRefreshToken);
    }
    if current.request_hash != input.request_hash {
        return Plan::Refresh(RefreshReason::SettingsChanged);
    }
    if input.force_requested {
        return Plan::Refresh(RefreshReason::Forced);
    }
    if input.failed_attempts > 0 {
        return match input.retry_at {
            Some(until) if until > input.now => Plan::RetryAt { until },
            Some(_) => Plan::Refresh(RefreshReason::Retry),
            None => Plan::Refresh(RefreshReason::AfterFailure),
        };
    }
    let due = refresh_due_at(current, &input.schedule, input.jitter_key);
    if input.now >= due {
        Plan::Refresh(RefreshReason::Due)
    } else {
        Plan::Wait { until: due }
    }
}

/// A fraction in [0, 1) that depends only on `parts` (a connection's
/// identity, an attempt): the one jitter of refreshes and retries.
pub fn stable_fraction(parts: &[&str]) -> f64 {
    let hex = fingerprint(parts);
    let value = hex
        .get(..8)
        .and_then(|prefix| u32::from_str_radix(prefix, 16).ok())
        .unwrap_or_default();
    f64::from(value) / (f64::from(u32::MAX) + 1.0)
}

/// Exponential backoff for retried errors: 5 s doubling up to 5 minutes.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(6);
    Duration::from_secs(5 * (1u64 << exponent)).min(Duration::from_secs(300))
}

/// When to retry the `attempt`th failed token request in a row: after the
/// backoff or the provider's `Retry-After` (clamped by the classifier to
/// `Limits::max_retry_after`), whichever is longer, plus up to a tenth more so that connections failing
/// together do not retry together; on a whole second after that.
pub fn retry_at(
    now: Timestamp,
    attempt: u32,
    retry_after: Option<Duration>,
    jitter_key: &str,
) -> Timestamp {
    let base = backoff(attempt).max(retry_after.unwrap_or_default());
    let jitter = base.mul_f64(0.1 * stable_fraction(&[jitter_key, &attempt.to_string()]));
    let wait = base
        .checked_add(jitter)
        .and_then(|wait| SignedDuration::try_from(wait).ok())
        .unwrap_or(SignedDuration::MAX);
    let at = now.checked_add(wait).unwrap_or(Timestamp::MAX);
    truncate_to_seconds(at)
        .checked_add(SignedDuration::from_secs(1))
        .unwrap_or(Timestamp::MAX)
}

/// Due times keep the jitter's sub-second part down to the grid:
/// connections due in the same second reach the provider spread over its
/// slots, not in one burst at its start.
fn floor_to_grid(t: Timestamp) -> Timestamp {
    let grid = DUE_TIME_GRID.as_millis() as i64;
    Timestamp::from_millisecond(t.as_millisecond().div_euclid(grid) * grid).unwrap_or(t)
}

fn ceil_to_millisecond(t: Timestamp) -> Timestamp {
    let floor = Timestamp::from_millisecond(t.as_millisecond()).unwrap_or(t);
    if floor == t {
        t
    } else {
        floor
            .checked_add(SignedDuration::from_millis(1))
            .unwrap_or(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_retry_waits_the_backoff_or_retry_after_plus_at_most_a_tenth() {
        let now = Timestamp::from_second(1_000).unwrap();
        for attempt in 1..=8 {
            let at = retry_at(now, attempt, None, "data/crm");
            let wait = at.duration_since(now).as_secs();
            let base = backoff(attempt).as_secs() as i64;
            assert!(
                wait > base && wait <= base + base / 10 + 1,
                "{attempt}: {wait}"
            );
            assert_eq!(at, retry_at(now, attempt, None, "data/crm"), "stable");
        }
        let honoured = retry_at(now, 1, Some(Duration::from_secs(60)), "data/crm");
        assert!(honoured.duration_since(now).as_secs() >= 60);
    }

    #[test]
    fn tokens_at_the_ends_of_time_give_a_due_time_without_panicking() {
        for (issued, expires) in [
            (Timestamp::MIN, Timestamp::MAX),
            (Timestamp::MAX, Timestamp::MAX),
            (Timestamp::MIN, Timestamp::MIN),
            (Timestamp::MAX, Timestamp::MIN),
        ] {
            let token = TokenRecord {
                issued_at: issued,
                expires_at: expires,
                ..token(0, 60)
            };
            let margin = Some(SignedDuration::from_secs(30));
            for min_interval in [SignedDuration::ZERO, SignedDuration::MAX] {
                for refresh_before in [margin, None] {
                    for propagation_margin in [SignedDuration::ZERO, SignedDuration::MAX] {
                        let schedule = Schedule {
                            refresh_before,
                            min_interval,
                            propagation_margin,
                        };
                        let _ = refresh_due_at(&token, &schedule, "k");
                        let _ = schedule.propagation_fits(SignedDuration::MIN);
                    }
                }
            }
        }
    }

    #[test]
    fn an_absurd_retry_after_does_not_overflow() {
        let now = Timestamp::from_second(1_000).unwrap();
        let at = retry_at(now, 1, Some(Duration::from_secs(u64::MAX)), "k");
        assert_eq!(at, Timestamp::MAX);
        assert_eq!(retry_at(Timestamp::MAX, 1, None, "k"), Timestamp::MAX);
    }

    #[test]
    fn no_token_is_due_sooner_than_the_floor_after_it_was_issued() {
        let floor = Schedule {
            refresh_before: Some(SignedDuration::from_hours(1)),
            min_interval: SignedDuration::from_secs(30),
            propagation_margin: DEFAULT_PROPAGATION_MARGIN,
        };
        for lifetime in [0, 1, 2, 10, 44] {
            let due = refresh_due_at(&token(100, 100 + lifetime), &floor, "ns/a");
            assert_eq!(secs(due), 130, "lifetime {lifetime}");
        }
        let long = refresh_due_at(&token(100, 100 + 3600), &floor, "ns/a");
        assert!(secs(long) > 130);
        let plan = plan(&PlanInput {
            schedule: floor,
            ..input(110, Some(&token(100, 101)))
        });
        assert_eq!(
            plan,
            Plan::Wait {
                until: Timestamp::from_second(130).unwrap()
            }
        );
    }
    use std::collections::BTreeMap;

    fn token(issued: i64, expires: i64) -> TokenRecord {
        TokenRecord {
            access_token: "t".into(),
            token_type: "Bearer".into(),
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(expires).unwrap(),
            lifetime_assumed: false,
            scope: None,
            fields: BTreeMap::new(),
            request_hash: String::new(),
            verification_denied: None,
            oddities: None,
        }
    }

    /// A schedule without the floor or the propagation margin, to see the
    /// rule alone.
    fn before(refresh_before: Option<SignedDuration>) -> Schedule {
        Schedule {
            refresh_before,
            min_interval: SignedDuration::ZERO,
            propagation_margin: SignedDuration::ZERO,
        }
    }

    fn secs(t: Timestamp) -> i64 {
        t.as_second()
    }

    fn input<'a>(now: i64, current: Option<&'a TokenRecord>) -> PlanInput<'a> {
        PlanInput {
            now: Timestamp::from_second(now).unwrap(),
            current,
            request_hash: "",
            new_user_refresh_token: false,
            force_requested: false,
            failed_attempts: 0,
            retry_at: None,
            schedule: before(None),
            jitter_key: "ns/a",
        }
    }

    #[test]
    fn plan_waits_until_due_then_refreshes() {
        let t = token(0, 90);
        let Plan::Wait { until } = plan(&input(10, Some(&t))) else {
            panic!("should wait")
        };
        assert_eq!(
            plan(&PlanInput {
                now: until - SignedDuration::from_millis(1),
                ..input(0, Some(&t))
            }),
            Plan::Wait { until }
        );
        assert_eq!(
            plan(&PlanInput {
                now: until,
                ..input(0, Some(&t))
            }),
            Plan::Refresh(RefreshReason::Due)
        );
        assert_eq!(
            plan(&input(0, None)),
            Plan::Refresh(RefreshReason::FirstToken)
        );
    }

    #[test]
    fn changes_refresh_at_once() {
        let t = token(0, 3600);
        let mut changed = input(10, Some(&t));
        changed.request_hash = "other";
        assert_eq!(
            plan(&changed),
            Plan::Refresh(RefreshReason::SettingsChanged)
        );
        let mut forced = input(10, Some(&t));
        forced.force_requested = true;
        assert_eq!(plan(&forced), Plan::Refresh(RefreshReason::Forced));
        let mut imported = input(10, Some(&t));
        imported.new_user_refresh_token = true;
        assert_eq!(
            plan(&imported),
            Plan::Refresh(RefreshReason::NewRefreshToken)
        );
    }

    #[test]
    fn failures_back_off_or_wait_for_a_change() {
        let t = token(0, 3600);
        let mut backing_off = input(10, Some(&t));
        backing_off.failed_attempts = 2;
        backing_off.retry_at = Some(Timestamp::from_second(20).unwrap());
        assert_eq!(
            plan(&backing_off),
            Plan::RetryAt {
                until: Timestamp::from_second(20).unwrap()
            }
        );
        backing_off.now = Timestamp::from_second(20).unwrap();
        assert_eq!(plan(&backing_off), Plan::Refresh(RefreshReason::Retry));
        let mut permanent = input(10, Some(&t));
        permanent.failed_attempts = 1;
        assert_eq!(plan(&permanent), Plan::Refresh(RefreshReason::AfterFailure));
        let mut no_token_yet = input(10, None);
        no_token_yet.failed_attempts = 1;
        no_token_yet.retry_at = Some(Timestamp::from_second(30).unwrap());
        assert!(matches!(plan(&no_token_yet), Plan::RetryAt { .. }));
    }

    #[test]
    fn two_thirds_of_the_lifetime_less_a_small_jitter() {
        // One hour token issued at t=0: due at 40 min, jitter at most 30 s.
        let due = secs(refresh_due_at(&token(0, 3600), &before(None), "ns/a"));
        assert!((2370..=2400).contains(&due), "{due}");
        // A 90 s token: jitter at most 5 % (4.5 s).
        let due = secs(refresh_due_at(&token(0, 90), &before(None), "ns/a"));
        assert!((55..=60).contains(&due), "{due}");
    }

    #[test]
    fn the_new_token_is_written_the_propagation_margin_before_expiry_when_the_lifetime_allows() {
        let schedule = Schedule {
            refresh_before: None,
            min_interval: SignedDuration::from_secs(30),
            propagation_margin: SignedDuration::from_mins(2),
        };
        // One hour: two thirds leave 20 min, more than the margin.
        let due = secs(refresh_due_at(&token(0, 3600), &schedule, "ns/a"));
        assert!((2370..=2400).contains(&due), "{due}");
        // Five minutes: two thirds would leave 100 s; the margin moves it to 180 s.
        let due = secs(refresh_due_at(&token(0, 300), &schedule, "ns/a"));
        assert!((165..=180).contains(&due), "{due}");
        // Exactly the margin plus the floor: refreshed at the floor.
        let due = secs(refresh_due_at(&token(0, 150), &schedule, "ns/a"));
        assert_eq!(due, 30);
        assert!(schedule.propagation_fits(SignedDuration::from_secs(150)));
        // Shorter: honouring the margin would refresh sooner than the
        // floor, so the rule applies and the status says so.
        assert!(!schedule.propagation_fits(SignedDuration::from_secs(149)));
        let due = secs(refresh_due_at(&token(0, 90), &schedule, "ns/a"));
        assert!((55..=60).contains(&due), "{due}");
        // refreshBefore longer than the margin wins: the earlier of the two.
        let longer = Schedule {
            refresh_before: Some(SignedDuration::from_mins(4)),
            ..schedule
        };
        let due = secs(refresh_due_at(&token(0, 300), &longer, "ns/a"));
        assert!((45..=60).contains(&due), "{due}");
    }

    #[test]
    fn jitter_is_stable_per_connection_and_spreads_connections() {
        let t = token(0, 3600);
        assert_eq!(
            refresh_due_at(&t, &before(None), "ns/a"),
            refresh_due_at(&t, &before(None), "ns/a")
        );
        let distinct: std::collections::BTreeSet<i64> = (0..200)
            .map(|i| secs(refresh_due_at(&t, &before(None), &format!("ns/conn-{i}"))))
            .collect();
        assert!(
            distinct.len() > 20,
            "200 connections spread over {} seconds",
            distinct.len()
        );
    }

    #[test]
    fn refresh_before_overrides_the_rule_when_it_fits() {
        let margin = SignedDuration::from_mins(5);
        let due = secs(refresh_due_at(&token(0, 3600), &before(Some(margin)), "k"));
        assert!((3270..=3300).contains(&due), "{due}");
        // A margin longer than the lifetime would refresh in a loop: the rule applies.
        let due = secs(refresh_due_at(&token(0, 120), &before(Some(margin)), "k"));
        assert!((74..=80).contains(&due), "{due}");
    }

    #[test]
    fn due_times_are_whole_milliseconds_and_never_before_issue() {
        let mut t = token(0, 1);
        t.issued_at = Timestamp::from_millisecond(10_500).unwrap();
        t.expires_at = Timestamp::from_millisecond(10_800).unwrap();
        let due = refresh_due_at(&t, &before(None), "k");
        assert_eq!(due.subsec_nanosecond() % 1_000_000, 0);
        // Two thirds in, less at most 5 % of the lifetime of jitter, down
        // to the grid.
        assert!((10_600..=10_700).contains(&due.as_millisecond()), "{due}");

        t.expires_at = t.issued_at;
        assert_eq!(refresh_due_at(&t, &before(None), "k"), t.issued_at);
        // A token issued between two slots is not due before it was issued.
        t.issued_at = Timestamp::from_microsecond(10_530_400).unwrap();
        t.expires_at = Timestamp::from_millisecond(10_560).unwrap();
        assert_eq!(
            refresh_due_at(&t, &before(None), "k").as_millisecond(),
            10_531
        );
    }

    #[test]
    fn connections_due_in_the_same_second_are_spread_over_its_slots() {
        let t = token(0, 3_600);
        let offsets: std::collections::BTreeSet<i64> = (0..50)
            .map(|i| {
                refresh_due_at(&t, &before(None), &format!("conn-{i}")).as_millisecond() % 1_000
            })
            .collect();
        let grid = DUE_TIME_GRID.as_millis() as i64;
        assert!(offsets.iter().all(|ms| ms % grid == 0), "{offsets:?}");
        assert!(offsets.len() as i64 >= 1_000 / grid - 2, "{offsets:?}");
    }

    #[test]
    fn delay_reaches_the_due_time_exactly() {
        let now = Timestamp::from_millisecond(1_250).unwrap();
        let due = Timestamp::from_second(3).unwrap();
        assert_eq!(delay_until(now, due), Duration::from_millis(1_750));
        assert_eq!(delay_until(due, now), Duration::ZERO);
        assert!(now + SignedDuration::try_from(delay_until(now, due)).unwrap() >= due);
    }

    #[test]
    fn durations_parse_like_kubernetes_users_write_them() {
        assert_eq!(
            parse_duration("f", "5m").unwrap(),
            SignedDuration::from_mins(5)
        );
        assert_eq!(
            parse_duration("f", "1h30m").unwrap(),
            SignedDuration::from_mins(90)
        );
        assert!(parse_duration("f", "0s").unwrap_err().contains("positive"));
        assert!(parse_duration("f", "-5m").is_err());
        assert!(
            parse_duration("f", "10")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
