//! Property-based fuzzing of what a provider or a Secret can feed the
//! operator: token endpoint answers (any status, body, `Retry-After` and
//! content type), token records read back from an edited Secret, and the
//! schedule computed from them at any clock reading. Nothing may panic,
//! and the bounds hold: no refresh sooner than the floor, no retry sooner
//! than the backoff.
//!
//! `FUZZ_CASES` sets the number of cases (default 100,000, what CI runs);
//! for a longer run: `FUZZ_CASES=10000000 cargo test --release --test fuzz`.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{Map, Value, json};

use tokenkeeper::decide::classify::{FailureContext, classify};
use tokenkeeper::decide::refresh::{
    PlanInput, Schedule, backoff, delay_until, plan, refresh_due_at, retry_at,
};
use tokenkeeper::error::Error;
use tokenkeeper::oauth::client::read_token_answer;
use tokenkeeper::oauth::token::{Lifetimes, TokenRecord};

/// Every error rule of the catalogue, tried on every generated body.
static ALL_RULES: std::sync::LazyLock<Vec<tokenkeeper::providers::ErrorRule>> =
    std::sync::LazyLock::new(|| {
        tokenkeeper::providers::catalogue()
            .values()
            .flat_map(|p| p.errors.iter().cloned())
            .collect()
    });

fn config() -> Config {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(100_000);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// Numbers and texts where lenient readers of lifetimes go wrong.
fn lifetime_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(0.4)),
        Just(json!(1e12)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!("3600")),
        Just(json!(" 3600 ")),
        Just(json!("1e400")),
        Just(json!("NaN")),
        Just(json!("inf")),
        Just(json!("-inf")),
        Just(Value::Null),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        any::<i64>().prop_map(|n| json!(n.to_string())),
        ".{0,12}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        lifetime_value(),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A token endpoint answer: the RFC 6749 fields, each absent, of its
/// type, or of another type, plus unknown fields.
fn answer_fields() -> impl Strategy<Value = Map<String, Value>> {
    let text = || prop_oneof![".{0,40}".prop_map(Value::String), json_value()];
    (
        prop::option::of(text()),
        prop::option::of(prop_oneof![
            Just(json!("Bearer")),
            Just(json!("bearer")),
            json_value()
        ]),
        prop::option::of(lifetime_value()),
        prop::option::of(text()),
        prop::option::of(prop_oneof![
            Just(json!("a b,c")),
            Just(json!(["a", 1, null])),
            json_value()
        ]),
        prop::option::of(lifetime_value()),
        prop::option::of(prop_oneof![
            Just(json!("invalid_grant")),
            Just(json!("invalid_client")),
            Just(json!("insufficient_scope")),
            Just(json!("temporarily_unavailable")),
            json_value()
        ]),
        prop::option::of(text()),
        prop::collection::btree_map("[a-z_]{1,12}", json_value(), 0..3),
    )
        .prop_map(
            |(access, kind, expires, refresh, scope, rt_expires, error, description, extra)| {
                let mut fields: Map<String, Value> = extra.into_iter().collect();
                let named = [
                    ("access_token", access),
                    ("token_type", kind),
                    ("expires_in", expires),
                    ("refresh_token", refresh),
                    ("scope", scope),
                    ("refresh_token_expires_in", rt_expires),
                    ("error", error),
                    ("error_description", description),
                ];
                for (name, value) in named {
                    if let Some(value) = value {
                        fields.insert(name.to_owned(), value);
                    }
                }
                fields
            },
        )
}

/// The bytes of an answer: JSON, form-encoded, or anything at all.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => answer_fields().prop_map(|f| serde_json::to_vec(&Value::Object(f)).unwrap()),
        2 => answer_fields().prop_map(|f| {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (name, value) in &f {
                match value {
                    Value::String(text) => form.append_pair(name, text),
                    other => form.append_pair(name, &other.to_string()),
                };
            }
            form.finish().into_bytes()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("application/json".to_owned()),
        Just("application/json; charset=utf-8".to_owned()),
        Just("application/x-www-form-urlencoded".to_owned()),
        Just("text/html".to_owned()),
        ".{0,30}",
    ])
}

fn retry_after() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        Just("Wed, 21 Oct 2015 07:28:00 GMT".to_owned()),
        Just("-1".to_owned()),
        ".{0,12}",
    ])
}

/// Any instant jiff can represent.
fn instant() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        Just(Timestamp::MIN),
        Just(Timestamp::MAX),
        Just(Timestamp::UNIX_EPOCH),
        (Timestamp::MIN.as_second()..=Timestamp::MAX.as_second())
            .prop_map(|s| Timestamp::from_second(s).unwrap()),
        // Around today, where real clocks are.
        (1_700_000_000i64..2_000_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
    ]
}

fn duration_up_to(most: i64) -> impl Strategy<Value = SignedDuration> {
    prop_oneof![
        Just(SignedDuration::ZERO),
        Just(SignedDuration::from_secs(most)),
        (0..=most).prop_map(SignedDuration::from_secs),
    ]
}

/// The operator's settings, within what its flags and validation allow.
#[derive(Debug, Clone)]
struct Settings {
    lifetimes: Lifetimes,
    schedule: Schedule,
    max_retry_after: Duration,
}

fn settings() -> impl Strategy<Value = Settings> {
    let year = 365 * 24 * 3600;
    (
        duration_up_to(100 * year),
        60i64..=100 * year,
        duration_up_to(24 * 3600),
        prop::option::of(duration_up_to(100 * year)),
        0u64..=7 * 24 * 3600,
        duration_up_to(24 * 3600),
    )
        .prop_map(
            |(default, max, min_interval, refresh_before, retry, propagation_margin)| {
                let max = SignedDuration::from_secs(max);
                Settings {
                    lifetimes: Lifetimes {
                        default: default.clamp(SignedDuration::from_secs(1), max),
                        max,
                    },
                    schedule: Schedule {
                        refresh_before: refresh_before.map(|b| b.min(max)),
                        min_interval,
                        propagation_margin,
                    },
                    max_retry_after: Duration::from_secs(retry),
                }
            },
        )
}

/// Each token request answered: read, classified or recorded, and
/// scheduled, as a reconcile does.
fn answer_then_schedule(
    status: u16,
    retry_after: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    now: Timestamp,
    settings: &Settings,
    attempt: u32,
) -> Result<(), TestCaseError> {
    let jitter_key = "fuzz/connection";
    match read_token_answer(status, retry_after, content_type, body) {
        Ok(issued) => {
            prop_assert!((200..300).contains(&status));
            let record = TokenRecord::issued(now, &issued, settings.lifetimes, None, &[], "h");
            prop_assert!(record.expires_at >= record.issued_at);
            let lifetime = record.expires_at.duration_since(record.issued_at);
            prop_assert!(
                lifetime <= settings.lifetimes.max || record.expires_at == Timestamp::MAX,
                "lifetime {lifetime:?} beyond the maximum"
            );
            let due = refresh_due_at(&record, &settings.schedule, jitter_key);
            if let Ok(floor) = record.issued_at.checked_add(settings.schedule.min_interval) {
                prop_assert!(due >= floor, "due {due} before the floor {floor}");
            }
            let _ = delay_until(now, due);
            let planned = plan(&PlanInput {
                now,
                current: Some(&record),
                request_hash: "h",
                new_user_refresh_token: false,
                force_requested: false,
                failed_attempts: 0,
                retry_at: None,
                schedule: settings.schedule,
                jitter_key,
            });
            let _ = format!("{planned:?}");
        }
        Err(failure) => {
            let context = FailureContext {
                now,
                token_endpoint: "https://provider.test/token",
                refresh_token_expires_at: None,
                reauthorize_fix: "kubectl tokenkeeper authorize",
                client_secret_namespace: "ns",
                client_secret_name: "client",
                max_retry_after: settings.max_retry_after,
                // Every rule of the catalogue is tried on every body.
                dialect: &ALL_RULES,
            };
            let error = classify(&failure, &context);
            let _ = (error.to_string(), error.reason(), error.retry());
            let retry_after = match &error {
                Error::ProviderUnavailable { retry_after, .. } => *retry_after,
                _ => None,
            };
            prop_assert!(retry_after.is_none_or(|wait| wait <= settings.max_retry_after));
            let at = retry_at(now, attempt, retry_after, jitter_key);
            if let Ok(earliest) =
                now.checked_add(SignedDuration::try_from(backoff(attempt)).unwrap())
            {
                prop_assert!(at >= earliest, "retry at {at} before the backoff");
            }
            let _ = failure.rotated_refresh_token();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn no_answer_panics_or_escapes_the_bounds(
        status in prop_oneof![100u16..600, Just(200u16), Just(400u16), Just(429u16), Just(503u16)],
        retry_after in retry_after(),
        content_type in content_type(),
        body in body(),
        now in instant(),
        settings in settings(),
        attempt in any::<u32>(),
    ) {
        answer_then_schedule(
            status,
            retry_after.as_deref(),
            content_type.as_deref(),
            &body,
            now,
            &settings,
            attempt,
        )?;
    }

    #[test]
    fn no_edited_secret_panics_the_schedule(
        issued_at in prop_oneof![instant().prop_map(|t| t.to_string()), ".{0,30}"],
        expires_at in prop_oneof![instant().prop_map(|t| t.to_string()), ".{0,30}"],
        now in instant(),
        settings in settings(),
        failed_attempts in any::<u32>(),
        retry in prop::option::of(instant()),
    ) {
        let data = BTreeMap::from([
            ("access_token".to_owned(), ByteString(b"at".to_vec())),
            ("token_type".to_owned(), ByteString(b"Bearer".to_vec())),
            ("expires_at".to_owned(), ByteString(expires_at.into_bytes())),
        ]);
        let annotations = BTreeMap::from([
            ("tokenkeeper.dev/issued-at".to_owned(), issued_at),
            ("tokenkeeper.dev/request-hash".to_owned(), "h".to_owned()),
        ]);
        let record = TokenRecord::from_target(&data, &annotations, &[]);
        let planned = plan(&PlanInput {
            now,
            current: record.as_ref(),
            request_hash: "h",
            new_user_refresh_token: false,
            force_requested: false,
            failed_attempts,
            retry_at: retry,
            schedule: settings.schedule,
            jitter_key: "fuzz/connection",
        });
        let _ = format!("{planned:?}");
        if let Some(record) = &record {
            let due = refresh_due_at(record, &settings.schedule, "fuzz/connection");
            let _ = delay_until(now, due);
        }
    }
}
