//! What the README promises and no other test shows: a deleted target
//! Secret comes back with its grant, a clean shutdown hands the Lease over
//! at once, providers that do not rotate refresh tokens or that hang, and
//! spec changes (token request settings, responseFields, refreshBefore)
//! taking effect end to end, and the propagation margin before expiry.

mod common;

use std::time::Duration;

use common::{OAuthServer, Operator, TestNamespace, wait_for};
use jiff::Timestamp;
use serde_json::json;

const READY: Duration = Duration::from_secs(30);

fn grant_from(ns: &TestNamespace, server: &OAuthServer) -> String {
    let token = server.mint_refresh_token("crm.read");
    ns.put_refresh_token(&token);
    token
}

fn refresh_token_connection(server: &OAuthServer) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\nspec:\n  oauth2:\n    \
         tokenUrl: {}\n    grant: refreshToken\n    client:\n      secretRef:\n        name: crm-client\n    \
         refreshTokenSecretRef:\n      name: crm-grant\n      key: refresh_token\n",
        server.token_url()
    )
}

fn client_credentials(server: &OAuthServer, extra: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\nspec:\n  oauth2:\n    \
         tokenUrl: {}\n    grant: clientCredentials\n    scopes: [crm.read]\n    client:\n      secretRef:\n        \
         name: crm-client\n{extra}",
        server.token_url()
    )
}

fn annotation(ns: &TestNamespace, secret: &str, key: &str) -> String {
    ns.jsonpath(
        "secret",
        secret,
        &format!("{{.metadata.annotations.tokenkeeper\\.dev/{key}}}"),
    )
}

/// Waits until the target Secret holds a token issued after `after`.
fn next_token(ns: &TestNamespace, after: &str) -> String {
    wait_for("a refresh", READY, || {
        let issued = annotation(ns, "crm-credentials", "issued-at");
        (!issued.is_empty() && issued != after)
            .then_some(issued.clone())
            .ok_or(issued)
    })
}

#[test]
fn a_deleted_target_secret_comes_back_with_its_grant() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 4, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("deleted-target");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    grant_from(&ns, &server);
    ns.apply_ok(&refresh_token_connection(&server));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let issued = next_token(&ns, "");
    let issued = next_token(&ns, &issued);

    // The target Secret holds the only copy of the rotated grant.
    ns.kubectl_ok(&["delete", "secret", "crm-credentials", "--wait=false"]);
    let kept = wait_for("the target Secret written again", READY, || {
        ns.stored_refresh_token("crm")
            .ok_or_else(|| "no sealed grant yet".to_owned())
    });
    assert!(
        server.is_active(&kept),
        "the grant written again is the live one"
    );
    let mut issued = issued;
    for _ in 0..3 {
        issued = next_token(&ns, &issued);
    }
    let live = ns.stored_refresh_token("crm").unwrap();
    assert_ne!(live, kept, "refreshing went on, rotating from it");
    assert!(server.is_active(&live), "the grant kept is the live one");
    let stats = server.stats();
    assert_eq!(stats["refreshTokenReuse"], 0, "{stats}");
    assert_eq!(stats["errors"], json!({}), "{stats}");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
}

#[test]
fn a_provider_that_does_not_rotate_keeps_its_refresh_token_in_use() {
    // As Google does: no refresh_token in the answers to a refresh.
    let server = OAuthServer::start(json!({
        "accessTokenTtl": 3,
        "rotateRefreshToken": false,
        "omitUnrotatedRefreshToken": true,
    }));
    let ns = TestNamespace::new("no-rotation");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let supplied = grant_from(&ns, &server);
    ns.apply_ok(&refresh_token_connection(&server));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let mut issued = next_token(&ns, "");
    let first_access = ns.secret_value("crm-credentials", "access_token");
    for _ in 0..3 {
        issued = next_token(&ns, &issued);
        assert_eq!(
            ns.stored_refresh_token("crm").as_deref(),
            Some(supplied.as_str()),
            "the refresh token the user supplied stays the grant"
        );
    }
    assert_ne!(
        ns.secret_value("crm-credentials", "access_token"),
        first_access
    );
    assert!(server.is_active(&supplied));
    let stats = server.stats();
    assert_eq!(stats["errors"], json!({}), "{stats}");
    assert!(
        stats["tokenSuccesses"].as_u64().unwrap() >= 4,
        "refreshed with the one refresh token: {stats}"
    );
}

#[test]
fn a_provider_that_hangs_is_unavailable_and_the_token_is_kept() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 300 }));
    let ns = TestNamespace::new("hang");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials(&server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let token = ns.secret_value("crm-credentials", "access_token");

    server.fail("hang");
    ns.force_refresh("crm", "1");
    ns.wait_ready(
        "crm",
        "True",
        "ProviderUnavailable",
        Duration::from_secs(90),
    );
    let message = ns.condition("crm", "Ready", "message");
    assert!(message.contains("no answer within 30 s"), "{message}");
    assert_eq!(ns.secret_value("crm-credentials", "access_token"), token);

    server.fail("off");
    ns.force_refresh("crm", "2");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    assert_ne!(ns.secret_value("crm-credentials", "access_token"), token);
}

#[test]
fn spec_changes_take_effect_end_to_end() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 120 }));
    let ns = TestNamespace::new("spec-changes");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    // A Salesforce-style answer: the API host comes with each token.
    server.control("answer-shape", json!({ "shape": "instance-url" }));
    let fields = "    responseFields: [instance_url]\n";
    ns.apply_ok(&client_credentials(&server, fields));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    assert_eq!(
        ns.secret_value("crm-credentials", "instance_url")
            .as_deref(),
        Some("https://eu42.crm.test")
    );
    let due: Timestamp = annotation(&ns, "crm-credentials", "next-refresh-at")
        .parse()
        .unwrap();

    // New token request settings: a new token at once, not at the due
    // time (two thirds of 120 s).
    let before = ns.secret_value("crm-credentials", "access_token");
    let requests = server.stats()["tokenRequests"].as_u64().unwrap();
    let params = "    extraTokenParams:\n      audience: crm-api\n";
    ns.apply_ok(&client_credentials(&server, &format!("{fields}{params}")));
    wait_for("a token for the new settings", READY, || {
        let now = ns.secret_value("crm-credentials", "access_token");
        (now != before).then_some(()).ok_or(format!("{now:?}"))
    });
    assert!(Timestamp::now() < due, "the new token came before {due}");
    assert_eq!(
        server.stats()["tokenRequests"].as_u64().unwrap(),
        requests + 1
    );

    // refreshBefore: 100 s before the expiry of a 120 s token, less a
    // jitter of at most 5 % of the lifetime.
    let before_expiry = "    refreshBefore: 100s\n";
    ns.apply_ok(&client_credentials(
        &server,
        &format!("{fields}{params}{before_expiry}"),
    ));
    let lead = wait_for("the due time to follow refreshBefore", READY, || {
        let issued: Timestamp = annotation(&ns, "crm-credentials", "issued-at")
            .parse()
            .unwrap();
        let due: Timestamp = annotation(&ns, "crm-credentials", "next-refresh-at")
            .parse()
            .unwrap();
        let lead = due.duration_since(issued).as_secs_f64();
        (lead <= 20.0).then_some(lead).ok_or(format!("{lead} s"))
    });
    assert!(lead >= 14.0, "due {lead} s after issue");

    // A field dropped from responseFields leaves the Secret.
    ns.apply_ok(&client_credentials(
        &server,
        &format!("{params}{before_expiry}"),
    ));
    wait_for("instance_url to leave the Secret", READY, || {
        let value = ns.secret_value("crm-credentials", "instance_url");
        value.is_none().then_some(()).ok_or(format!("{value:?}"))
    });
}

/// A new token reaches the Secret the propagation margin before the old one
/// expires when the lifetime leaves room for it; otherwise two thirds apply
/// and the Ready message says the margin does not fit.
#[test]
fn the_new_token_is_in_the_secret_the_propagation_margin_before_expiry() {
    let roomy = OAuthServer::start(json!({ "accessTokenTtl": 90 }));
    let short = OAuthServer::start(json!({ "accessTokenTtl": 40 }));
    let ns = TestNamespace::new("propagation");
    let _operator = Operator::start_with(&ns, &["--refresh-propagation-margin-seconds", "60"]);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials(&roomy, ""));
    ns.apply_ok(&client_credentials(&short, "").replacen("name: crm\n", "name: brief\n", 1));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    ns.wait_ready("brief", "True", "SecretSynced", READY);
    let lead = |secret: &str| {
        let issued: Timestamp = annotation(&ns, secret, "issued-at").parse().unwrap();
        let due: Timestamp = annotation(&ns, secret, "next-refresh-at").parse().unwrap();
        due.duration_since(issued).as_secs_f64()
    };
    // 90 s: 60 s before expiry instead of at two thirds (60 s after
    // issue), less a jitter of at most 5 % of the lifetime.
    let roomy_lead = lead("crm-credentials");
    assert!(
        (25.0..=30.5).contains(&roomy_lead),
        "due {roomy_lead} s after issue"
    );
    let message = ns.condition("crm", "Ready", "message");
    assert!(!message.contains("propagation margin"), "{message}");
    // 40 s: replacing it 60 s early is impossible; two thirds apply.
    let short_lead = lead("brief-credentials");
    assert!(
        (24.0..=27.0).contains(&short_lead),
        "due {short_lead} s after issue"
    );
    let message = ns.condition("brief", "Ready", "message");
    assert!(
        message.contains("The token lives 40s, too short to replace it 1m before it expires"),
        "{message}"
    );
}

#[test]
fn a_clean_shutdown_hands_the_lease_over_at_once() {
    let ns = TestNamespace::new("lease-release");
    let lease = ns.name.clone();
    // A long lease: a follower that waited for it to expire would take it
    // 30 s after the last renewal.
    let mut args = common::leader_args("tokenkeeper-system", &lease);
    for (flag, value) in [
        ("--lease-duration-seconds", "30"),
        ("--renew-deadline-seconds", "20"),
    ] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = value.to_owned();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = Operator::start_with(&ns, &args);
    let holder = || common::lease_field(&lease, "holderIdentity");
    wait_for("the first replica to lead", READY, || {
        let now = holder();
        now.ends_with(&format!("-{}", first.pid()))
            .then_some(())
            .ok_or(now)
    });
    let second = Operator::start_with(&ns, &args);
    std::thread::sleep(Duration::from_secs(3));
    assert!(holder().ends_with(&format!("-{}", first.pid())));

    let last_renewal: Timestamp = common::lease_field(&lease, "renewTime").parse().unwrap();
    let status = first.stop();
    assert!(status.success(), "{}", first.logs());
    wait_for(
        "the second replica to lead",
        Duration::from_secs(60),
        || {
            let now = holder();
            now.ends_with(&format!("-{}", second.pid()))
                .then_some(())
                .ok_or(now)
        },
    );
    let acquired: Timestamp = common::lease_field(&lease, "acquireTime").parse().unwrap();
    assert!(
        acquired < last_renewal + jiff::SignedDuration::from_secs(30),
        "taken at {acquired}, not released at shutdown (last renewed {last_renewal}, 30 s lease)"
    );
}
