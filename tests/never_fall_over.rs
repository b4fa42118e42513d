//! One tenant's odd provider, spec or bug must not take the others down:
//! a panicking reconcile, lifetimes that would make a connection refresh
//! in a loop, Secrets the API server refuses, and a provider that never
//! answers. Real API server, real `oidc-provider`, the operator binary
//! built with the `fault-injection` feature.

mod common;

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{OAuthServer, Operator, TestNamespace, describes_event, http_get, wait_for};
use jiff::Timestamp;
use serde_json::json;

const READY: Duration = Duration::from_secs(30);

fn api_key_connection(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\n{annotations}\
         spec:\n  apiKey:\n    secretRef:\n      name: api-key\n"
    )
}

/// The user's Secret `api-key` with the key `k-1`.
fn api_key_secret(ns: &TestNamespace) {
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "api-key",
        "--from-literal=api_key=k-1",
    ]);
}

fn client_credentials(name: &str, token_url: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
         tokenUrl: {token_url}\n    grant: clientCredentials\n    scopes: [crm.read]\n    client:\n      secretRef:\n        \
         name: crm-client\n"
    )
}

fn token_requests(server: &OAuthServer) -> u64 {
    server.stats()["tokenRequests"].as_u64().unwrap_or_default()
}

#[test]
fn a_bug_in_one_reconcile_stops_only_that_connection() {
    let ns = TestNamespace::new("panic");
    let (mut operator, port) = Operator::with_metrics(&ns);
    api_key_secret(&ns);
    let inject = "  annotations:\n    tokenkeeper.dev/test-inject-panic: \"yes\"\n";
    ns.apply_ok(&api_key_connection("buggy", inject));
    ns.apply_ok(&api_key_connection("fine", ""));

    ns.wait_ready("buggy", "False", "InternalError", READY);
    ns.wait_ready("fine", "True", "SecretSynced", READY);
    let message = ns.condition("buggy", "Ready", "message");
    assert!(
        message.contains("bug") && message.contains("kubectl logs"),
        "{message}"
    );
    let describe = ns.kubectl_ok(&["describe", "sourceconnection", "buggy"]);
    assert!(
        describes_event(&describe, "Warning", "InternalError"),
        "{describe}"
    );
    // Retried with backoff, counted, and the operator still serves.
    wait_for("a second panic, after the backoff", READY, || {
        let text = http_get(port, "/metrics").1;
        let panics = text
            .lines()
            .find_map(|l| l.strip_prefix("tokenkeeper_reconcile_panics_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_default();
        (panics >= 2.0).then_some(()).ok_or(text)
    });
    assert!(operator.exited().is_none(), "{}", operator.logs());
    ns.kubectl_ok(&[
        "patch",
        "secret",
        "api-key",
        "-p",
        r#"{"stringData":{"api_key":"k-2"}}"#,
    ]);
    wait_for("the other connection to follow its Secret", READY, || {
        let value = ns.secret_value("fine-credentials", "api_key");
        (value.as_deref() == Some("k-2"))
            .then_some(())
            .ok_or(format!("{value:?}"))
    });

    // Once the cause is gone, the connection recovers on its own.
    ns.kubectl_ok(&[
        "annotate",
        "sourceconnection",
        "buggy",
        "tokenkeeper.dev/test-inject-panic-",
    ]);
    ns.wait_ready("buggy", "True", "SecretSynced", READY);
}

#[test]
fn no_provider_lifetime_makes_a_connection_refresh_faster_than_the_floor() {
    // Tokens of one second: without a floor, a refresh every second.
    let server = OAuthServer::start(json!({ "accessTokenTtl": 1 }));
    let ns = TestNamespace::new("floor");
    let _operator = Operator::start_with(&ns, &["--min-refresh-interval-seconds", "8"]);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials("crm", &server.token_url()));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    let before = token_requests(&server);
    std::thread::sleep(Duration::from_secs(24));
    let sent = token_requests(&server) - before;
    // 24 s at one refresh per 8 s at most: 3, or 4 when the window starts
    // just before one.
    assert!(
        (1..=4).contains(&sent),
        "{sent} token requests in 24 s with a floor of 8 s"
    );
    let issued = ns.jsonpath(
        "secret",
        "crm-credentials",
        "{.metadata.annotations.tokenkeeper\\.dev/issued-at}",
    );
    let next = ns.jsonpath(
        "secret",
        "crm-credentials",
        "{.metadata.annotations.tokenkeeper\\.dev/next-refresh-at}",
    );
    let (issued, next): (Timestamp, Timestamp) = (issued.parse().unwrap(), next.parse().unwrap());
    assert_eq!(next.duration_since(issued).as_secs(), 8, "{issued} {next}");
}

#[test]
fn a_secret_the_api_server_refuses_shows_on_the_connection() {
    let ns = TestNamespace::new("quota");
    let _operator = Operator::start(&ns);
    api_key_secret(&ns);
    // Room for the Secrets there are and no more: the target Secret's
    // create is forbidden (403) for as long as the quota stays.
    ns.kubectl_ok(&["create", "quota", "secrets", "--hard=secrets=100"]);
    let used = wait_for("the quota to count the Secrets", READY, || {
        let used = ns.jsonpath("quota", "secrets", "{.status.used.secrets}");
        (!used.is_empty()).then_some(used.clone()).ok_or(used)
    });
    ns.kubectl_ok(&[
        "patch",
        "quota",
        "secrets",
        "-p",
        &format!(r#"{{"spec":{{"hard":{{"secrets":"{used}"}}}}}}"#),
    ]);
    wait_for("the quota to hold no more", READY, || {
        let hard = ns.jsonpath("quota", "secrets", "{.status.hard.secrets}");
        (hard == used).then_some(()).ok_or(hard)
    });
    ns.apply_ok(&api_key_connection("db", ""));
    let message = ns.wait_ready_saying("db", "False", "SecretWriteFailed", READY);
    assert!(
        message.contains("HTTP 403") && message.contains("exceeded quota"),
        "{message}"
    );
    assert!(
        message.contains("kubectl describe resourcequota"),
        "{message}"
    );
    let describe = ns.kubectl_ok(&["describe", "sourceconnection", "db"]);
    assert!(
        describes_event(&describe, "Warning", "SecretWriteFailed"),
        "{describe}"
    );

    ns.kubectl_ok(&[
        "patch",
        "quota",
        "secrets",
        "-p",
        r#"{"spec":{"hard":{"secrets":"5"}}}"#,
    ]);
    ns.wait_ready("db", "True", "SecretSynced", Duration::from_secs(60));
    assert_eq!(
        ns.secret_value("db-credentials", "api_key").as_deref(),
        Some("k-1")
    );
}

#[test]
fn a_refresh_token_too_large_to_keep_is_said_and_not_sent_to_the_api() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 4, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("too-large");
    let operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    ns.apply_ok(&format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\nspec:\n  oauth2:\n    \
         tokenUrl: {}\n    grant: refreshToken\n    client:\n      secretRef:\n        name: crm-client\n    \
         refreshTokenSecretRef:\n      name: crm-grant\n      key: refresh_token\n",
        server.token_url()
    ));
    ns.apply_ok(&client_credentials("other", &server.token_url()));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    server.control("answer-shape", json!({ "shape": "huge-refresh-token" }));
    let message = ns.wait_ready_saying("crm", "False", "SecretWriteFailed", READY);
    assert!(
        message.contains("bytes of annotations") && message.contains("262144"),
        "{message}"
    );
    // Checked before sending: the API server never saw the write.
    assert!(
        !operator.logs().contains("Too long"),
        "the write was sent: {}",
        operator.logs()
    );
    // The other connection of the same provider goes on.
    let other_before = ns.jsonpath(
        "secret",
        "other-credentials",
        "{.metadata.annotations.tokenkeeper\\.dev/issued-at}",
    );
    wait_for("the other connection to refresh", READY, || {
        let now = ns.jsonpath(
            "secret",
            "other-credentials",
            "{.metadata.annotations.tokenkeeper\\.dev/issued-at}",
        );
        (now != other_before).then_some(()).ok_or(now)
    });
    assert_eq!(ns.condition("other", "Ready", "reason"), "SecretSynced");
}

#[test]
fn an_answer_beyond_a_mebibyte_is_refused_without_reading_it_whole() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("oversized");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    // Two oversized answers: the first and its retry 5 s later leave time
    // to see that none was written, even on a loaded machine; the next
    // retry (10 s later) gets a whole one.
    server.control("answer-shape", json!({ "shape": "oversized", "times": 2 }));
    ns.apply_ok(&client_credentials("crm", &server.token_url()));
    let message = ns.wait_ready_saying("crm", "False", "ProviderUnavailable", READY);
    assert!(message.contains("larger than 1024 KiB"), "{message}");
    assert_eq!(
        ns.jsonpath("secret", "crm-credentials", "{.metadata.name}"),
        ""
    );
    // The answers are whole again: the retry after the backoff takes one.
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let token = ns
        .secret_value("crm-credentials", "access_token")
        .unwrap_or_default();
    assert!(
        !token.is_empty() && token.len() < 4096,
        "{} bytes",
        token.len()
    );
}

/// Accepts connections and never answers, as a provider whose backend hangs.
struct DeadProvider {
    port: u16,
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl DeadProvider {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                keep.lock().unwrap().push(stream);
            }
        });
        DeadProvider { port, _held: held }
    }

    fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

/// The target Secrets' refresh times: per connection, when its token was
/// due and when the next one was issued.
#[derive(Default)]
struct Lateness {
    /// connection → (issued-at, next-refresh-at) last seen.
    last: BTreeMap<String, (Timestamp, Timestamp)>,
    /// Seconds from a token's due time to the issue of the next one.
    samples: Vec<f64>,
    expired_seen: usize,
}

impl Lateness {
    fn sample(&mut self, ns: &TestNamespace, names: &[String]) {
        let now = Timestamp::now();
        let list = ns.kubectl_ok(&["get", "secrets", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        for item in list["items"].as_array().into_iter().flatten() {
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            let Some(connection) = name.strip_suffix("-credentials") else {
                continue;
            };
            if !names.iter().any(|n| n == connection) {
                continue;
            }
            let annotation = |key: &str| -> Option<Timestamp> {
                item["metadata"]["annotations"][key].as_str()?.parse().ok()
            };
            let (Some(issued), Some(next)) = (
                annotation("tokenkeeper.dev/issued-at"),
                annotation("tokenkeeper.dev/next-refresh-at"),
            ) else {
                continue;
            };
            let expires: Option<Timestamp> = item["data"]["expires_at"]
                .as_str()
                .and_then(|b64| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.decode(b64).ok()
                })
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| text.parse().ok());
            if expires.is_some_and(|at| at <= now) {
                self.expired_seen += 1;
            }
            if let Some((seen_issued, seen_next)) = self.last.get(connection)
                && issued > *seen_issued
            {
                self.samples
                    .push(issued.duration_since(*seen_next).as_secs_f64());
            }
            self.last.insert(connection.to_owned(), (issued, next));
        }
    }

    fn summary(&self) -> String {
        let mut sorted = self.samples.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        format!(
            "{} refreshes, lateness p50 {:.1} s, p90 {:.1} s, max {:.1} s (1 s resolution: issued-at is whole seconds)",
            sorted.len(),
            at(0.5),
            at(0.9),
            at(1.0)
        )
    }
}

/// Watches the healthy connections for `period`, sampling once a second.
fn observe(ns: &TestNamespace, names: &[String], period: Duration) -> Lateness {
    let mut lateness = Lateness::default();
    let end = Instant::now() + period;
    while Instant::now() < end {
        lateness.sample(ns, names);
        std::thread::sleep(Duration::from_secs(1));
    }
    lateness
}

#[test]
fn a_dead_provider_does_not_starve_other_tenants() {
    // Healthy tokens of 6 s, refreshed about every 4 s; eight reconcile
    // slots, so that connections waiting on the dead provider would take
    // them all if they could.
    let server = OAuthServer::start(json!({ "accessTokenTtl": 6 }));
    let dead = DeadProvider::start();
    let ns = TestNamespace::new("dead-provider");
    let _operator = Operator::start_with(&ns, &["--concurrent-reconciles", "8"]);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let healthy: Vec<String> = (0..20).map(|i| format!("healthy-{i}")).collect();
    for name in &healthy {
        ns.apply_ok(&client_credentials(name, &server.token_url()));
    }
    for name in &healthy {
        ns.wait_ready(name, "True", "SecretSynced", READY);
    }
    let alone = observe(&ns, &healthy, Duration::from_secs(20));

    for i in 0..20 {
        ns.apply_ok(&client_credentials(&format!("dead-{i}"), &dead.token_url()));
    }
    let beside_dead = observe(&ns, &healthy, Duration::from_secs(45));
    let figures = format!(
        "a_dead_provider_does_not_starve_other_tenants: 20 healthy connections (6 s tokens, \
         8 reconcile slots)\n  alone:                                {}\n  \
         beside 20 on a provider that hangs:   {}\n",
        alone.summary(),
        beside_dead.summary()
    );
    print!("{figures}");
    common::record_figures(&figures);

    assert_eq!(
        alone.expired_seen, 0,
        "expired tokens without the dead provider"
    );
    assert_eq!(
        beside_dead.expired_seen,
        0,
        "healthy connections served expired tokens while the dead provider held the operator: {}",
        beside_dead.summary()
    );
    assert!(
        beside_dead.samples.len() >= healthy.len() * 5,
        "healthy connections kept refreshing: {}",
        beside_dead.summary()
    );
    for name in &healthy {
        assert_eq!(
            ns.condition(name, "Ready", "reason"),
            "SecretSynced",
            "{name}"
        );
    }
}
