//! A tenant's spec cannot make the operator send its tokens and client
//! secrets where they should not go: URLs are parsed, plain http and this
//! machine are refused outside development, link-local (cloud metadata)
//! and configured networks are refused, also when a name resolves there.
//! The operator runs as in production (no --allow-plain-http-loopback).

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{OAuthServer, Operator, TestNamespace};
use serde_json::json;

const READY: Duration = Duration::from_secs(30);

fn client_credentials(name: &str, token_url: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
         tokenUrl: \"{token_url}\"\n    grant: clientCredentials\n    client:\n      secretRef:\n        \
         name: crm-client\n"
    )
}

/// Counts the connections made to it, answering none.
fn listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, accepted)
}

#[test]
fn endpoints_are_checked_before_anything_is_sent() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let (port, accepted) = listener();
    let ns = TestNamespace::new("endpoints");
    let _operator = Operator::start_as_in_production(&ns, &["--deny-network", "10.0.0.0/8"]);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let cases = [
        (
            "plain-loopback",
            server.token_url(),
            "--allow-plain-http-loopback",
        ),
        (
            "userinfo",
            "http://localhost:x@10.0.0.5:9200/".to_owned(),
            "user name or password",
        ),
        (
            "metadata",
            "https://169.254.169.254/latest/api/token".to_owned(),
            "link-local",
        ),
        (
            "denied-network",
            "https://10.1.2.3/token".to_owned(),
            "--deny-network",
        ),
        // Passes a look at the text; resolves to loopback, which the
        // resolver the operator connects with refuses.
        (
            "resolves-to-loopback",
            format!("https://localhost:{port}/token"),
            "resolves to an address the operator does not send to: loopback",
        ),
    ];
    for (name, url, _) in &cases {
        ns.apply_ok(&client_credentials(name, url));
    }
    for (name, _, rule) in &cases {
        let message = ns.wait_ready_saying(name, "False", "InvalidSpec", READY);
        assert!(message.contains(rule), "{name}: {message}");
    }
    assert_eq!(
        server.stats()["tokenRequests"],
        0,
        "nothing reached the provider"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing connected to localhost"
    );
    common::assert_no_secret_leaks(&ns, &["crm-client-secret".to_owned()]);
}

fn refresh_token_grant(name: &str, token_url: &str, revocation_url: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
         tokenUrl: \"{token_url}\"\n    revocationUrl: \"{revocation_url}\"\n    grant: refreshToken\n    \
         client:\n      secretRef:\n        name: crm-client\n    refreshTokenSecretRef:\n      name: crm-grant\n      \
         key: refresh_token\n"
    )
}

/// Connection `crm` of the refreshToken grant with `provider`, Ready; the
/// revocation URL it names.
fn ready_connection(ns: &TestNamespace, provider: &OAuthServer) -> String {
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&provider.mint_refresh_token("crm.read"));
    let revocation = format!("{}/revocation", provider.token_url());
    ns.apply_ok(&refresh_token_grant(
        "crm",
        &provider.token_url(),
        &revocation,
    ));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    revocation
}

/// Someone who may edit the connection but not read its Secrets points
/// its endpoints at a server of theirs: the grant is not sent there, on
/// refresh or on deletion, and the connection asks for a new consent.
#[test]
fn a_grant_goes_only_to_the_endpoints_it_was_given_for() {
    let provider = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let attacker = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("grant-binding");
    let _operator = Operator::start(&ns);
    let revocation = ready_connection(&ns, &provider);

    ns.apply_ok(&refresh_token_grant(
        "crm",
        &attacker.token_url(),
        &revocation,
    ));
    let message = ns.wait_ready_saying("crm", "False", "AuthorizationRequired", READY);
    let origin = |url: &str| tokenkeeper::oauth::seal::origin_of(url);
    assert!(
        message.contains("needs a new consent")
            && message.contains(&origin(&provider.token_url()))
            && message.contains(&origin(&attacker.token_url())),
        "{message}"
    );
    ns.force_refresh("crm", "after-redirect");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        attacker.stats()["tokenRequests"].as_u64(),
        Some(0),
        "no token request reached the other endpoint"
    );

    // Back to the provider it was given for: the grant works again.
    ns.apply_ok(&refresh_token_grant(
        "crm",
        &provider.token_url(),
        &revocation,
    ));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    // A verification URL of theirs would receive each new access token.
    let (port, accepted) = listener();
    let original = refresh_token_grant("crm", &provider.token_url(), &revocation);
    ns.apply_ok(&format!(
        "{original}    verification:\n      url: \"http://127.0.0.1:{port}/me\"\n"
    ));
    let message = ns.wait_ready_saying("crm", "False", "AuthorizationRequired", READY);
    assert!(message.contains("verification endpoint"), "{message}");
    ns.force_refresh("crm", "after-verification-redirect");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no access token sent there"
    );
    ns.apply_ok(&original);
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    // The revocation endpoint is redirected, then the connection deleted:
    // nothing is revoked anywhere, and an event says so.
    let elsewhere = format!("{}/revocation", attacker.token_url());
    ns.apply_ok(&refresh_token_grant(
        "crm",
        &provider.token_url(),
        &elsewhere,
    ));
    ns.wait_ready("crm", "False", "AuthorizationRequired", READY);
    ns.kubectl_ok(&["delete", "srcconn", "crm", "--wait=true", "--timeout=60s"]);
    assert_eq!(
        attacker.stats()["revocationRequests"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "no revocation request reached the other endpoint"
    );
    let events = ns.kubectl_ok(&["get", "events", "-o", "wide"]);
    assert!(
        events.contains("RevocationAbandoned") && events.contains("Did not revoke"),
        "{events}"
    );
    let mut seen = attacker.secrets_seen();
    seen.extend(attacker.grant_secrets_seen());
    assert!(
        seen.is_empty(),
        "the other server saw {} secrets",
        seen.len()
    );
}

/// The key id of the seal on `secret`'s grant.
fn seal_key_id(ns: &TestNamespace, secret: &str) -> String {
    let sealed = ns.jsonpath(
        "secret",
        secret,
        "{.metadata.annotations.tokenkeeper\\.dev/sealed-grant}",
    );
    sealed.split('.').nth(1).unwrap_or_default().to_owned()
}

/// A new sealing key seals from the next write on while the old ones still
/// open; a key Secret deleted while the operator runs is written back with
/// the same keys, and that is counted.
#[test]
fn sealing_keys_rotate_and_a_deleted_key_secret_comes_back() {
    let provider = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("sealing-keys");
    let port = common::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let args = [
        "--leader-election-namespace",
        ns.name.as_str(),
        "--metrics-bind-address",
        metrics.as_str(),
    ];
    let mut operator = Operator::start_with(&ns, &args);
    ready_connection(&ns, &provider);
    let first = common::sealing_keys(&ns.name).expect("the operator's keys");
    assert_eq!(seal_key_id(&ns, "crm-credentials"), first.sealing_key_id());

    let rotate = common::kubectl_plugin(&ns.name)
        .args(["rotate-key"])
        .output()
        .unwrap();
    assert!(
        rotate.status.success(),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    let rotated = common::sealing_keys(&ns.name).expect("the rotated keys");
    assert_eq!(rotated.key_ids().len(), 2);
    let new_id = rotated.sealing_key_id().to_owned();
    assert_ne!(new_id, first.sealing_key_id());
    // The next write seals with the new key.
    std::thread::sleep(Duration::from_secs(6));
    ns.force_refresh("crm", "after-rotation");
    common::wait_for("the grant sealed with the new key", READY, || {
        let id = seal_key_id(&ns, "crm-credentials");
        (id == new_id).then_some(()).ok_or(id)
    });
    let stored = ns
        .stored_refresh_token_in("crm", "crm-credentials", &ns.name)
        .expect("the grant opens");
    assert!(provider.is_active(&stored));

    // Deleted while the operator runs: back with both keys.
    ns.kubectl_ok(&[
        "delete",
        "secret",
        "tokenkeeper-sealing-key",
        "--wait=false",
    ]);
    common::wait_for("the key Secret written back", READY, || {
        let keys = common::sealing_keys(&ns.name).ok_or("absent")?;
        (keys.key_ids() == rotated.key_ids())
            .then_some(())
            .ok_or(format!("{:?}", keys.key_ids()))
    });
    let (_, text) = common::http_get(port, "/metrics");
    assert!(
        text.contains("tokenkeeper_sealing_key_restored_total 1"),
        "{text}"
    );
    // A restart opens the grant with the keys written back.
    operator.stop();
    let _operator = Operator::start_with(&ns, &args);
    ns.force_refresh("crm", "after-restart");
    common::wait_for("a refresh after the restart", READY, || {
        let handled = ns.jsonpath("srcconn", "crm", "{.status.forceRefreshHandled}");
        (handled == "after-restart").then_some(()).ok_or(handled)
    });
    ns.wait_ready("crm", "True", "SecretSynced", READY);
}

fn api_key_connection(name: &str, secret: &str, target: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  apiKey:\n    \
         secretRef:\n      name: {secret}\n  target:\n    name: {target}\n"
    )
}

/// With --require-source-label (on in the chart), a connection reads only
/// Secrets marked as sources, so it cannot send any Secret of its
/// namespace to a provider.
#[test]
fn only_secrets_marked_as_sources_are_read() {
    let ns = TestNamespace::new("source-label");
    let _operator = Operator::start_with(&ns, &["--require-source-label"]);
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "payroll-db",
        "--from-literal=api_key=not-for-tokenkeeper",
    ]);
    ns.apply_ok(&api_key_connection("exfil", "payroll-db", "exfil-out"));
    let message = ns.wait_ready_saying("exfil", "False", "InvalidSpec", READY);
    assert!(
        message.contains("not marked as a source")
            && message.contains("kubectl label secret payroll-db"),
        "{message}"
    );
    assert_eq!(ns.secret_value("exfil-out", "api_key"), None);

    // Named in the Secret's annotation: only that connection may read it.
    ns.kubectl_ok(&[
        "annotate",
        "secret",
        "payroll-db",
        "tokenkeeper.dev/source-for=payroll, other",
    ]);
    ns.apply_ok(&api_key_connection("payroll", "payroll-db", "payroll-out"));
    ns.wait_ready("payroll", "True", "SecretSynced", READY);
    ns.kubectl_ok(&["annotate", "srcconn", "exfil", "example.com/poke=1"]);
    ns.wait_ready("exfil", "False", "InvalidSpec", READY);

    // Labelled as a source: every connection of the namespace may.
    ns.kubectl_ok(&[
        "label",
        "secret",
        "payroll-db",
        "tokenkeeper.dev/source=true",
    ]);
    ns.wait_ready("exfil", "True", "SecretSynced", READY);
    assert_eq!(
        ns.secret_value("exfil-out", "api_key").as_deref(),
        Some("not-for-tokenkeeper")
    );
}

/// A target Secret created by someone else between the operator's read and
/// its create is not taken over: the connection reports the conflict and
/// the Secret keeps its content (the race is injected by the test build).
#[test]
fn a_secret_created_in_the_gap_before_the_create_is_not_taken_over() {
    let ns = TestNamespace::new("create-race");
    let _operator = Operator::start(&ns);
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "stripe-api",
        "--from-literal=api_key=sk_test",
    ]);
    let manifest = api_key_connection("stripe", "stripe-api", "stripe-out").replace(
        "metadata:\n  name: stripe\n",
        "metadata:\n  name: stripe\n  annotations:\n    tokenkeeper.dev/test-inject-create-race: \"yes\"\n",
    );
    ns.apply_ok(&manifest);
    ns.wait_ready("stripe", "False", "TargetSecretConflict", READY);
    assert_eq!(
        ns.secret_value("stripe-out", "owner").as_deref(),
        Some("someone-else")
    );
    assert_eq!(ns.secret_value("stripe-out", "api_key"), None);
    let managed = ns.jsonpath(
        "secret",
        "stripe-out",
        "{.metadata.labels.app\\.kubernetes\\.io/managed-by}",
    );
    assert_eq!(managed, "");
}

/// A renamed target: the Secret the connection no longer names is deleted
/// (it held live credentials), and an OAuth 2.0 grant moves to the new one.
#[test]
fn a_renamed_target_moves_the_grant_and_deletes_the_old_secret() {
    let provider = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("renamed-target");
    let _operator = Operator::start(&ns);
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "stripe-api",
        "--from-literal=api_key=sk_test",
    ]);
    ns.apply_ok(&api_key_connection("stripe", "stripe-api", "stripe-out"));
    ns.wait_ready("stripe", "True", "SecretSynced", READY);
    ns.apply_ok(&api_key_connection(
        "stripe",
        "stripe-api",
        "stripe-renamed",
    ));
    common::wait_for("the old Secret deleted", READY, || {
        let left = ns.jsonpath("secret", "stripe-out", "{.metadata.name}");
        left.is_empty().then_some(()).ok_or(left)
    });
    assert_eq!(
        ns.secret_value("stripe-renamed", "api_key").as_deref(),
        Some("sk_test")
    );
    let describe = ns.kubectl_ok(&["describe", "srcconn", "stripe"]);
    assert!(
        common::describes_event(&describe, "Normal", "RenamedSecretDeleted"),
        "{describe}"
    );

    // OAuth 2.0 with a rotating provider: the user's refresh token was used
    // up, so the grant must move with the target.
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&provider.mint_refresh_token("crm.read"));
    let revocation = format!("{}/revocation", provider.token_url());
    let connection = refresh_token_grant("crm", &provider.token_url(), &revocation);
    ns.apply_ok(&connection);
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let grant = ns.stored_refresh_token("crm").expect("a grant");
    ns.apply_ok(&format!("{connection}  target:\n    name: crm-renamed\n"));
    common::wait_for("the old target deleted", READY, || {
        let left = ns.jsonpath("secret", "crm-credentials", "{.metadata.name}");
        left.is_empty().then_some(()).ok_or(left)
    });
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let moved = ns
        .stored_refresh_token_in("crm", "crm-renamed", "default")
        .expect("the grant in the new target");
    assert!(moved == grant || provider.is_active(&moved));
    assert!(provider.is_active(&moved), "the grant still works");
}
