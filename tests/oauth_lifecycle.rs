//! OAuth 2.0 connections end to end: a real API server, the real
//! `oidc-provider` with lifetimes of seconds, the operator binary, and
//! kubectl reading back what a user would read.

mod common;

use std::time::{Duration, Instant};

use common::{
    OAuthServer, Operator, TestNamespace, assert_no_secret_leaks, describes_event, http_get,
    wait_for,
};
use jiff::Timestamp;
use serde_json::json;

const READY: Duration = Duration::from_secs(30);

fn client_credentials(name: &str, server: &OAuthServer, extra: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
         tokenUrl: {}\n    grant: clientCredentials\n    scopes: [crm.read]\n    client:\n      secretRef:\n        \
         name: crm-client\n{extra}",
        server.token_url()
    )
}

fn refresh_token_grant(name: &str, server: &OAuthServer, extra: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
         tokenUrl: {}\n    grant: refreshToken\n    client:\n      secretRef:\n        name: crm-client\n    \
         refreshTokenSecretRef:\n      name: crm-grant\n      key: refresh_token\n{extra}",
        server.token_url()
    )
}

fn timestamp(text: &str) -> Timestamp {
    text.parse()
        .unwrap_or_else(|_| panic!("not a timestamp: {text:?}"))
}

/// Samples the target Secret for `period`, asserting every sample holds an
/// unexpired token; returns the distinct access tokens seen.
fn sample_freshness(ns: &TestNamespace, secret: &str, period: Duration) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    let end = Instant::now() + period;
    while Instant::now() < end {
        let sampled_at = Timestamp::now();
        let token = ns
            .secret_value(secret, "access_token")
            .expect("access_token present");
        let expires_at = timestamp(
            &ns.secret_value(secret, "expires_at")
                .expect("expires_at present"),
        );
        assert!(
            expires_at > sampled_at,
            "the Secret held an expired token at {sampled_at} (expired {expires_at})"
        );
        if tokens.last() != Some(&token) {
            tokens.push(token);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    tokens
}

/// The refresh token tokenkeeper keeps is the one the provider
/// considers live. Read and asked again when a rotation slipped in between.
fn stored_refresh_token_is_live(ns: &TestNamespace, server: &OAuthServer) -> String {
    wait_for(
        "the stored refresh token to be live",
        Duration::from_secs(10),
        || {
            let stored = ns
                .stored_refresh_token("crm")
                .ok_or("no refresh token stored")?;
            if server.is_active(&stored) {
                Ok(stored)
            } else {
                Err("inactive".to_owned())
            }
        },
    )
}

fn status_field(ns: &TestNamespace, name: &str, field: &str) -> String {
    ns.jsonpath("srcconn", name, &format!("{{.status.{field}}}"))
}

/// A connection that failed for good waits for a change: no retry time in
/// its status or its metrics, and no token request after the first backoff
/// a transient failure would wait (5 s and up to a tenth, to a whole second).
fn waits_for_a_change(ns: &TestNamespace, server: &OAuthServer, name: &str, metrics_port: u16) {
    assert_eq!(status_field(ns, name, "nextRefreshTime"), "");
    let text = http_get(metrics_port, "/metrics").1;
    let labels = format!("namespace=\"{}\",name=\"{name}\"", ns.name);
    assert!(
        text.contains(&format!(
            "tokenkeeper_connection_failed_refresh_attempts{{{labels}}}"
        )),
        "the connection's series are served: {text}"
    );
    assert!(
        !text.contains(&format!(
            "tokenkeeper_connection_next_refresh_timestamp_seconds{{{labels}}}"
        )),
        "no next refresh planned: {text}"
    );
    let requests = token_requests(server);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        token_requests(server),
        requests,
        "no retry while nothing changes"
    );
}

fn token_requests(server: &OAuthServer) -> u64 {
    server.stats()["tokenRequests"].as_u64().unwrap()
}

#[test]
fn client_credentials_tokens_are_kept_fresh() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 4 }));
    let ns = TestNamespace::new("oauth-cc");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials(
        "crm",
        &server,
        "    requiredScopes: [crm.read]\n",
    ));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    let target = "crm-credentials";
    let keys = ns.jsonpath("secret", target, "{.data}");
    for key in ["access_token", "token_type", "expires_at", "scope"] {
        assert!(keys.contains(key), "{key} in {keys}");
    }
    assert!(!keys.contains("refresh_token"));
    assert_eq!(
        ns.secret_value(target, "token_type").as_deref(),
        Some("Bearer")
    );
    assert_eq!(
        ns.secret_value(target, "scope").as_deref(),
        Some("crm.read")
    );

    let tokens = sample_freshness(&ns, target, Duration::from_secs(14));
    assert!(
        tokens.len() >= 4,
        "refreshed repeatedly: {} distinct tokens",
        tokens.len()
    );
    assert_eq!(status_field(&ns, "crm", "grantedScopes"), r#"["crm.read"]"#);
    // Routine refresh times are on the Secret, not in the status.
    let annotation = |key: &str| {
        ns.jsonpath(
            "secret",
            target,
            &format!("{{.metadata.annotations.tokenkeeper\\.dev/{key}}}"),
        )
    };
    let last = timestamp(&annotation("issued-at"));
    let next = timestamp(&annotation("next-refresh-at"));
    let expires = timestamp(&ns.secret_value(target, "expires_at").unwrap());
    assert!(last < next && next < expires, "{last} < {next} < {expires}");
    assert_eq!(status_field(&ns, "crm", "nextRefreshTime"), "");
    assert_eq!(
        ns.jsonpath("secret", "crm-tokenkeeper-state", "{.metadata.name}"),
        "",
        "no state without a refresh token"
    );

    let listing = ns.kubectl_ok(&["get", "srcconn", "crm"]);
    let row = listing.lines().nth(1).unwrap();
    assert!(
        row.contains("True") && row.contains("SecretSynced") && row.contains(target),
        "{listing}"
    );
    let mut secrets = tokens;
    secrets.extend(server.secrets_seen());
    secrets.push("crm-client-secret".into());
    assert_no_secret_leaks(&ns, &secrets);
}

#[test]
fn wrong_client_secret_is_invalid_client_and_heals_when_fixed() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 30 }));
    let ns = TestNamespace::new("oauth-client");
    let (_operator, metrics_port) = Operator::with_metrics(&ns);
    ns.create_client_secret("crm-post-client", "not-the-right-secret");
    ns.apply_ok(&client_credentials(
        "crm",
        &server,
        "      authMethod: clientSecretPost\n",
    ));
    ns.wait_ready("crm", "False", "InvalidClient", READY);
    assert_eq!(ns.condition("crm", "AuthFailed", "status"), "True");
    assert_eq!(ns.condition("crm", "AuthFailed", "reason"), "InvalidClient");
    let message = ns.condition("crm", "Ready", "message");
    assert!(
        message.contains(&format!("kubectl edit secret crm-client -n {}", ns.name)),
        "{message}"
    );
    wait_for("the InvalidClient event", READY, || {
        let text = ns.kubectl_ok(&["describe", "srcconn", "crm"]);
        describes_event(&text, "Warning", "InvalidClient")
            .then_some(())
            .ok_or(text)
    });
    waits_for_a_change(&ns, &server, "crm", metrics_port);

    ns.kubectl_ok(&[
        "patch",
        "secret",
        "crm-client",
        "-p",
        r#"{"stringData":{"client_secret":"crm-post-client-secret"}}"#,
    ]);
    ns.wait_ready("crm", "True", "SecretSynced", Duration::from_secs(15));
    assert_eq!(ns.condition("crm", "AuthFailed", "status"), "False");
    assert_eq!(status_field(&ns, "crm", "failedRefreshAttempts"), "");
    let mut secrets = server.secrets_seen();
    secrets.extend([
        "not-the-right-secret".into(),
        "crm-post-client-secret".into(),
    ]);
    assert_no_secret_leaks(&ns, &secrets);
}

#[test]
fn rotating_refresh_tokens_over_many_cycles_never_leave_an_expired_token() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 3, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("oauth-rotation");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let first = server.mint_refresh_token("crm.read crm.write");
    ns.put_refresh_token(&first);
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    let tokens = sample_freshness(&ns, "crm-credentials", Duration::from_secs(20));
    assert!(tokens.len() >= 6, "{} refreshes", tokens.len());
    let stats = server.stats();
    assert_eq!(
        stats["refreshTokenReuse"], 0,
        "the provider saw a reused refresh token: {stats}"
    );
    assert_eq!(stats["errors"], json!({}), "{stats}");

    // The refresh token travels sealed in the target Secret's annotation;
    // no state Secret is needed for an imported grant.
    let sealed = ns.jsonpath(
        "secret",
        "crm-credentials",
        "{.metadata.annotations.tokenkeeper\\.dev/sealed-grant}",
    );
    assert!(sealed.starts_with("v2."), "{sealed}");
    assert_eq!(
        ns.jsonpath("secret", "crm-tokenkeeper-state", "{.metadata.name}"),
        ""
    );
    let current = stored_refresh_token_is_live(&ns, &server);
    assert!(!sealed.contains(&current) && !sealed.contains(&first));
    assert_ne!(current, first, "rotated");
    assert!(
        !server.is_active(&first),
        "the first refresh token was consumed"
    );
    assert!(
        !ns.jsonpath("secret", "crm-credentials", "{.data}")
            .contains("refresh_token")
    );
    assert_eq!(
        status_field(&ns, "crm", "grantedScopes"),
        r#"["crm.read","crm.write"]"#
    );

    // Every refresh token of the rotations, not only the first and last.
    let mut secrets = tokens;
    secrets.extend(server.secrets_seen());
    secrets.extend([first, current, "crm-client-secret".into()]);
    assert_no_secret_leaks(&ns, &secrets);
}

#[test]
fn a_revoked_grant_is_invalid_grant_until_a_new_refresh_token_arrives() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 3 }));
    let ns = TestNamespace::new("oauth-revoked");
    let (_operator, metrics_port) = Operator::with_metrics(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let first = server.mint_refresh_token("crm.read");
    ns.put_refresh_token(&first);
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    server.control("revoke-grants", json!({}));
    ns.wait_ready("crm", "False", "InvalidGrant", READY);
    assert_eq!(ns.condition("crm", "AuthFailed", "reason"), "InvalidGrant");
    let describe = wait_for("the InvalidGrant event", READY, || {
        let text = ns.kubectl_ok(&["describe", "srcconn", "crm"]);
        describes_event(&text, "Warning", "InvalidGrant")
            .then_some(text.clone())
            .ok_or(text)
    });
    assert!(
        describe.contains("Re-authorize the connection"),
        "{describe}"
    );
    assert!(
        describe.contains(&format!(
            "kubectl create secret generic crm-grant -n {}",
            ns.name
        )),
        "{describe}"
    );
    waits_for_a_change(&ns, &server, "crm", metrics_port);

    let second = server.mint_refresh_token("crm.read");
    ns.put_refresh_token(&second);
    ns.wait_ready("crm", "True", "SecretSynced", Duration::from_secs(15));
    assert_eq!(ns.condition("crm", "AuthFailed", "status"), "False");
    sample_freshness(&ns, "crm-credentials", Duration::from_secs(5));
    let mut secrets = server.secrets_seen();
    secrets.extend([first, second, "crm-client-secret".into()]);
    assert_no_secret_leaks(&ns, &secrets);
}

#[test]
fn an_expired_refresh_token_is_reported_as_such() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 2, "refreshTokenTtl": 7 }));
    let ns = TestNamespace::new("oauth-rt-expired");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    // The provider reports refresh_token_expires_in, so tokenkeeper knows
    // the lifetime and can tell expiry from revocation.
    let message = ns.wait_ready_saying("crm", "False", "RefreshTokenExpired", READY);
    assert!(
        message.contains("The refresh token expired at"),
        "{message}"
    );
    assert!(
        message.contains("kubectl create secret generic crm-grant"),
        "{message}"
    );
    assert_eq!(
        ns.condition("crm", "AuthFailed", "reason"),
        "RefreshTokenExpired"
    );
}

#[test]
fn narrowed_scopes_are_insufficient_permissions() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 3 }));
    let ns = TestNamespace::new("oauth-scopes");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read crm.write"));
    ns.apply_ok(&refresh_token_grant(
        "crm",
        &server,
        "    requiredScopes: [crm.read, crm.write]\n",
    ));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    server.control("narrow-scopes", json!({ "scope": "crm.read" }));
    let message = ns.wait_ready_saying("crm", "False", "InsufficientPermissions", READY);
    assert!(
        message.contains("missing crm.write (granted: crm.read)"),
        "{message}"
    );
    assert_eq!(
        ns.condition("crm", "AuthFailed", "reason"),
        "InsufficientPermissions"
    );
    // The narrower token still works for what it allows, and stays fresh.
    assert_eq!(
        ns.secret_value("crm-credentials", "scope").as_deref(),
        Some("crm.read")
    );
    sample_freshness(&ns, "crm-credentials", Duration::from_secs(5));
}

#[test]
fn an_unavailable_provider_backs_off_keeps_the_token_and_recovers() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 120 }));
    let ns = TestNamespace::new("oauth-outage");
    let mut operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let token = ns.secret_value("crm-credentials", "access_token").unwrap();

    server.fail("500");
    ns.force_refresh("crm", "1");
    let message = ns.wait_ready_saying("crm", "True", "ProviderUnavailable", READY);
    assert!(
        message.contains("HTTP 500") && message.contains("keeps the current access token"),
        "{message}"
    );
    assert_eq!(status_field(&ns, "crm", "failedRefreshAttempts"), "1");
    assert!(timestamp(&status_field(&ns, "crm", "nextRefreshTime")) > Timestamp::now());
    assert_eq!(
        ns.secret_value("crm-credentials", "access_token")
            .as_deref(),
        Some(token.as_str())
    );

    server.fail("html");
    wait_for("a second attempt that met an HTML page", READY, || {
        let message = ns.condition("crm", "Ready", "message");
        message
            .contains("non-JSON body (text/html")
            .then_some(())
            .ok_or(message)
    });
    assert_eq!(status_field(&ns, "crm", "failedRefreshAttempts"), "2");

    // The backoff lives in status: a restarted operator waits for it too,
    // and counts on from there.
    let retry_at = timestamp(&status_field(&ns, "crm", "nextRefreshTime"));
    operator.stop();
    let requests = token_requests(&server) as usize;
    let _operator = Operator::start(&ns);
    let first_after_restart = wait_for(
        "the first token request after the restart",
        Duration::from_secs(60),
        || {
            let stats = server.stats();
            stats["tokenRequestTimes"][requests]
                .as_i64()
                .ok_or(stats.to_string())
        },
    );
    assert!(
        first_after_restart >= retry_at.as_millisecond(),
        "requested at {first_after_restart} ms, before the retry time {retry_at}"
    );
    wait_for("the third failure counted", READY, || {
        let attempts = status_field(&ns, "crm", "failedRefreshAttempts");
        (attempts == "3").then_some(()).ok_or(attempts)
    });

    // A Retry-After longer than the backoff is honoured.
    server.control("failure", json!({ "mode": "429", "retryAfter": 60 }));
    wait_for(
        "an attempt told to slow down",
        Duration::from_secs(60),
        || {
            let message = ns.condition("crm", "Ready", "message");
            message
                .contains("HTTP 429 Too Many Requests, Retry-After 60 s")
                .then_some(())
                .ok_or(message)
        },
    );
    let failed_at = timestamp(&status_field(&ns, "crm", "lastFailureTime"));
    let retry_at = timestamp(&status_field(&ns, "crm", "nextRefreshTime"));
    assert!(
        retry_at.duration_since(failed_at).as_secs() >= 60,
        "failed at {failed_at}, retry at {retry_at}"
    );
    assert_eq!(
        ns.secret_value("crm-credentials", "access_token")
            .as_deref(),
        Some(token.as_str())
    );

    // A new force-refresh value does not wait for the retry time.
    server.fail("off");
    ns.force_refresh("crm", "2");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    assert_ne!(
        ns.secret_value("crm-credentials", "access_token")
            .as_deref(),
        Some(token.as_str())
    );
    assert_eq!(status_field(&ns, "crm", "failedRefreshAttempts"), "");
    assert_eq!(status_field(&ns, "crm", "forceRefreshHandled"), "2");
}

#[test]
fn a_provider_that_stays_down_lets_the_token_expire_visibly_then_recovers() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 4 }));
    let port = server.port;
    let ns = TestNamespace::new("oauth-down");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    drop(server);
    let message = ns.wait_ready_saying("crm", "False", "AccessTokenExpired", READY);
    assert!(
        message.contains("could not connect") && message.contains("expired at"),
        "{message}"
    );
    assert_eq!(
        ns.condition("crm", "AuthFailed", "status"),
        "False",
        "an outage is not a rejection"
    );

    let _server = OAuthServer::start(json!({ "accessTokenTtl": 4, "port": port }));
    ns.wait_ready("crm", "True", "SecretSynced", Duration::from_secs(60));
}

#[test]
fn a_missing_expires_in_uses_the_configured_lifetime_and_says_so() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 600, "omitExpiresIn": true }));
    let ns = TestNamespace::new("oauth-no-expiry");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials(
        "crm",
        &server,
        "    defaultTokenLifetime: 90s\n",
    ));
    let message = ns.wait_ready_saying("crm", "True", "SecretSynced", READY);
    assert!(
        message.contains("no expires_in") && message.contains("assumes 90s"),
        "{message}"
    );
    let issued = timestamp(&ns.jsonpath(
        "secret",
        "crm-credentials",
        "{.metadata.annotations.tokenkeeper\\.dev/issued-at}",
    ));
    let expires = timestamp(&ns.secret_value("crm-credentials", "expires_at").unwrap());
    assert_eq!(expires.duration_since(issued).as_secs(), 90);
}

#[test]
fn the_force_refresh_annotation_refreshes_once_per_value() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 600 }));
    let ns = TestNamespace::new("oauth-force");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let first = ns.secret_value("crm-credentials", "access_token").unwrap();

    ns.force_refresh("crm", "2026-11-23T10:00:00Z");
    let second = wait_for("a new token", Duration::from_secs(10), || {
        let token = ns.secret_value("crm-credentials", "access_token").unwrap();
        (token != first).then_some(token.clone()).ok_or(token)
    });
    wait_for("forceRefreshHandled", Duration::from_secs(10), || {
        let handled = status_field(&ns, "crm", "forceRefreshHandled");
        (handled == "2026-11-23T10:00:00Z")
            .then_some(())
            .ok_or(handled)
    });
    // Touching the connection without a new value refreshes nothing.
    let requests = token_requests(&server);
    ns.kubectl_ok(&["label", "srcconn", "crm", "touched=yes"]);
    ns.kubectl_ok(&["annotate", "srcconn", "crm", "unrelated=1"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(token_requests(&server), requests);
    assert_eq!(
        ns.secret_value("crm-credentials", "access_token")
            .as_deref(),
        Some(second.as_str())
    );
}

#[test]
fn killing_the_operator_right_after_a_rotation_loses_no_refresh_token() {
    // Refreshes 4 s apart: the kill lands right after one is stored and
    // well before the next is requested, even when kubectl is slow to tell.
    // (A kill between the provider's answer and the write loses the
    // rotated token by construction, whatever the operator does.)
    let server = OAuthServer::start(json!({ "accessTokenTtl": 6, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("oauth-kill");
    let mut operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    let stored_version = || ns.jsonpath("secret", "crm-credentials", "{.metadata.resourceVersion}");
    for round in 0..3 {
        let before = stored_version();
        wait_for(
            "a rotation to be persisted",
            Duration::from_secs(10),
            || {
                let now = stored_version();
                (now != before).then_some(()).ok_or(now)
            },
        );
        // SIGKILL as soon as the new refresh token is stored, while the
        // operator may be about to refresh again.
        operator.kill();
        std::thread::sleep(Duration::from_millis(200 * round));
        operator = Operator::start(&ns);
    }
    std::thread::sleep(Duration::from_secs(7));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let stats = server.stats();
    assert_eq!(stats["refreshTokenReuse"], 0, "{stats}");
    assert_eq!(stats["errors"], json!({}), "{stats}");
    stored_refresh_token_is_live(&ns, &server);
    sample_freshness(&ns, "crm-credentials", Duration::from_secs(5));
}

#[test]
fn the_client_credentials_example_becomes_ready() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("oauth-example");
    let _operator = Operator::start(&ns);
    let example = std::fs::read_to_string(format!(
        "{}/deploy/examples/oauth-client-credentials.yaml",
        common::REPO
    ))
    .unwrap()
    .replace("http://127.0.0.1:9400", &server.issuer);
    ns.apply_ok(&example);
    ns.wait_ready("crm-reporting", "True", "SecretSynced", READY);
    assert!(
        ns.secret_value("crm-reporting-credentials", "access_token")
            .is_some()
    );
    wait_for("the TokenIssued event", READY, || {
        let text = ns.kubectl_ok(&["describe", "srcconn", "crm-reporting"]);
        describes_event(&text, "Normal", "TokenIssued")
            .then_some(())
            .ok_or(text)
    });
}

#[test]
fn a_verification_request_turns_a_role_change_into_insufficient_permissions() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 3 }));
    let ns = TestNamespace::new("oauth-verify-403");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read crm.write"));
    let verification = format!(
        "    verification:\n      url: {}/test/api?scope=crm.write\n",
        server.issuer
    );
    ns.apply_ok(&refresh_token_grant("crm", &server, &verification));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    server.control("narrow-scopes", json!({ "scope": "crm.read" }));
    let message = ns.wait_ready_saying("crm", "False", "InsufficientPermissions", READY);
    assert!(
        message.contains("answered HTTP 403, insufficient_scope"),
        "{message}"
    );
    assert_eq!(
        ns.condition("crm", "AuthFailed", "reason"),
        "InsufficientPermissions"
    );
    // Stable between refreshes, and refreshing goes on.
    let version = ns.jsonpath(
        "srcconn",
        "crm",
        "{.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
    );
    sample_freshness(&ns, "crm-credentials", Duration::from_secs(5));
    assert_eq!(
        ns.condition("crm", "Ready", "reason"),
        "InsufficientPermissions"
    );
    assert_eq!(
        ns.jsonpath(
            "srcconn",
            "crm",
            "{.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}"
        ),
        version
    );
}

#[test]
fn a_verification_request_refusing_the_token_is_access_token_expired_and_retried() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 120 }));
    let ns = TestNamespace::new("oauth-verify-401");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let verification = format!("    verification:\n      url: {}/test/api\n", server.issuer);
    ns.apply_ok(&client_credentials("crm", &server, &verification));
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    server.control("api-mode", json!({ "mode": "401" }));
    ns.force_refresh("crm", "1");
    let message = ns.wait_ready_saying("crm", "False", "AccessTokenExpired", READY);
    assert!(
        message.contains("refused the access token just issued (HTTP 401, invalid_token)"),
        "{message}"
    );
    assert_eq!(status_field(&ns, "crm", "failedRefreshAttempts"), "1");

    server.control("api-mode", json!({ "mode": "normal" }));
    ns.wait_ready("crm", "True", "SecretSynced", Duration::from_secs(30));
}

fn revoking(server: &OAuthServer, extra: &str) -> String {
    format!(
        "    revocationUrl: {}/token/revocation\n{extra}",
        server.issuer
    )
}

fn wait_gone(ns: &TestNamespace, kind: &str, name: &str, timeout: Duration) {
    wait_for(&format!("{kind} {name} to be gone"), timeout, || {
        let found = ns.jsonpath(kind, name, "{.metadata.name}");
        found.is_empty().then_some(()).ok_or(found)
    });
}

fn event_reasons(ns: &TestNamespace) -> String {
    ns.kubectl_ok(&[
        "get",
        "events",
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ])
}

#[test]
fn deleting_a_connection_revokes_its_tokens_before_its_secrets_go() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("oauth-revoke");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    ns.apply_ok(&refresh_token_grant("crm", &server, &revoking(&server, "")));
    // No grant: only its access token is revoked.
    ns.apply_ok(&client_credentials("cc", &server, &revoking(&server, "")));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    ns.wait_ready("cc", "True", "SecretSynced", READY);
    for name in ["crm", "cc"] {
        wait_for("the revocation finalizer", READY, || {
            let finalizers = ns.jsonpath("srcconn", name, "{.metadata.finalizers}");
            finalizers
                .contains("tokenkeeper.dev/revoke-tokens")
                .then_some(())
                .ok_or(finalizers)
        });
    }
    let refresh_token = stored_refresh_token_is_live(&ns, &server);
    let access_token = ns.secret_value("crm-credentials", "access_token").unwrap();
    let cc_token = ns.secret_value("cc-credentials", "access_token").unwrap();
    assert!(server.is_active(&access_token));

    ns.kubectl_ok(&["delete", "srcconn", "crm", "cc", "--wait=false"]);
    wait_gone(&ns, "srcconn", "crm", READY);
    wait_gone(&ns, "srcconn", "cc", READY);
    // What reached the revocation endpoint: revoking the refresh token ends
    // the whole grant at this provider, so the access token's own request
    // is what shows that it was sent.
    let sent = server.stats()["revocationRequests"].clone();
    let requests = sent.as_array().unwrap();
    let sent_with = |token: &str, hint: &str| {
        requests
            .iter()
            .any(|r| r["token"] == token && r["hint"] == hint && r["status"] == 200)
    };
    assert!(sent_with(&refresh_token, "refresh_token"), "{sent}");
    assert!(sent_with(&access_token, "access_token"), "{sent}");
    assert!(sent_with(&cc_token, "access_token"), "{sent}");
    assert_eq!(requests.len(), 3, "{sent}");
    assert!(!server.is_active(&refresh_token));
    assert!(!server.is_active(&access_token));
    assert!(!server.is_active(&cc_token));
    assert!(event_reasons(&ns).contains("TokensRevoked"));
    // The garbage collector notices new CRDs on its 30 s discovery resync.
    wait_gone(&ns, "secret", "crm-credentials", Duration::from_secs(90));
    let mut secrets = server.secrets_seen();
    secrets.extend([refresh_token, access_token, cc_token]);
    assert_no_secret_leaks(&ns, &secrets);
}

#[test]
fn an_unreachable_provider_delays_deletion_only_for_the_bound() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("oauth-revoke-down");
    let _operator = Operator::start_with(&ns, &["--revocation-timeout-seconds", "12"]);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&client_credentials("crm", &server, &revoking(&server, "")));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    wait_for("the revocation finalizer", READY, || {
        let finalizers = ns.jsonpath("srcconn", "crm", "{.metadata.finalizers}");
        finalizers
            .contains("tokenkeeper.dev/revoke-tokens")
            .then_some(())
            .ok_or(finalizers)
    });

    server.fail("500");
    let deleted = Instant::now();
    ns.kubectl_ok(&["delete", "srcconn", "crm", "--wait=false"]);
    wait_for("a RevocationFailed event", READY, || {
        let reasons = event_reasons(&ns);
        reasons
            .contains("RevocationFailed")
            .then_some(())
            .ok_or(reasons)
    });
    assert_eq!(
        ns.jsonpath("srcconn", "crm", "{.metadata.name}"),
        "crm",
        "held while retrying"
    );
    wait_gone(&ns, "srcconn", "crm", Duration::from_secs(40));
    let held = deleted.elapsed();
    assert!(
        held >= Duration::from_secs(11),
        "released only after the bound: {held:?}"
    );
    assert!(event_reasons(&ns).contains("RevocationAbandoned"));
}

#[test]
fn a_shared_grant_can_opt_out_of_revocation() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("oauth-revoke-optout");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    ns.apply_ok(&refresh_token_grant(
        "crm",
        &server,
        &revoking(&server, "    revokeOnDelete: false\n"),
    ));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let refresh_token = stored_refresh_token_is_live(&ns, &server);
    assert_eq!(ns.jsonpath("srcconn", "crm", "{.metadata.finalizers}"), "");
    ns.kubectl_ok(&["delete", "srcconn", "crm"]);
    assert!(
        server.is_active(&refresh_token),
        "a shared grant stays alive"
    );
}

fn shape_answers(server: &OAuthServer, shape: &str, times: Option<u64>) {
    let mut body = json!({ "shape": shape });
    if let Some(times) = times {
        body["times"] = json!(times);
    }
    server.control("answer-shape", body);
}

fn ready_message(ns: &TestNamespace, name: &str) -> String {
    ns.condition(name, "Ready", "message")
}

#[test]
fn odd_but_clear_answers_are_read_and_said() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 3, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("oauth-odd");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    shape_answers(&server, "azure-v1", None);
    let first = server.mint_refresh_token("crm.read");
    ns.put_refresh_token(&first);
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let said = ready_message(&ns, "crm");
    assert!(said.contains("expires_in was a string"), "{said}");
    let tokens = sample_freshness(&ns, "crm-credentials", Duration::from_secs(8));
    assert!(tokens.len() >= 2, "refreshed: {} tokens", tokens.len());

    shape_answers(&server, "linkedin", None);
    wait_for(
        "an answer without token_type to be read",
        Duration::from_secs(20),
        || {
            let said = ready_message(&ns, "crm");
            said.contains("token_type was absent")
                .then_some(())
                .ok_or(said)
        },
    );
    assert_eq!(
        ns.secret_value("crm-credentials", "token_type").as_deref(),
        Some("Bearer")
    );
    let stats = server.stats();
    assert_eq!(stats["refreshTokenReuse"], 0, "{stats}");
    assert_eq!(stats["errors"], json!({}), "{stats}");
}

#[test]
fn a_rotated_refresh_token_in_an_unusable_answer_is_kept() {
    // Tokens of 8 s: refreshed every few seconds, so that the test can
    // read the stored refresh token while it is the live one.
    let server = OAuthServer::start(json!({ "accessTokenTtl": 8, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("oauth-unusable");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let first = server.mint_refresh_token("crm.read");
    ns.put_refresh_token(&first);
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let before = stored_refresh_token_is_live(&ns, &server);

    // The provider rotates the refresh token and answers without an access
    // token, once; the next answers are whole again.
    shape_answers(&server, "no-access-token", Some(1));
    wait_for(
        "the unusable answer to be sent",
        Duration::from_secs(20),
        || {
            let stats = server.stats();
            (stats["shapedAnswers"].as_u64() == Some(1))
                .then_some(())
                .ok_or(stats.to_string())
        },
    );
    assert!(!server.is_active(&before), "the provider rotated it");
    // The retry after the backoff uses the rotated refresh token.
    let requests = token_requests(&server);
    wait_for(
        "a token issued after the unusable answer",
        Duration::from_secs(40),
        || {
            let done = token_requests(&server) > requests
                && ns.condition("crm", "Ready", "reason") == "SecretSynced";
            done.then_some(()).ok_or(ready_message(&ns, "crm"))
        },
    );
    let stats = server.stats();
    assert_eq!(
        stats["refreshTokenReuse"], 0,
        "the rotated refresh token was lost and the old one reused: {stats}"
    );
    assert_eq!(stats["errors"], json!({}), "{stats}");
    let after = stored_refresh_token_is_live(&ns, &server);
    assert_ne!(after, before);
}

#[test]
fn lifetimes_out_of_range_are_clamped_or_defaulted_and_said() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("oauth-lifetimes");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    shape_answers(&server, "huge-lifetime", None);
    ns.apply_ok(&client_credentials("crm", &server, ""));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let said = ready_message(&ns, "crm");
    assert!(said.contains("was clamped to 31536000 s"), "{said}");
    let expires = timestamp(&ns.secret_value("crm-credentials", "expires_at").unwrap());
    let year_ahead = Timestamp::now() + jiff::SignedDuration::from_hours(366 * 24);
    assert!(expires < year_ahead, "{expires}");

    // expires_in 0: the configured default lifetime, not a refresh loop.
    shape_answers(&server, "zero-lifetime", None);
    ns.apply_ok(&client_credentials(
        "zero",
        &server,
        "    defaultTokenLifetime: 2h\n",
    ));
    ns.wait_ready("zero", "True", "SecretSynced", READY);
    let said = ready_message(&ns, "zero");
    assert!(said.contains("read as not given"), "{said}");
    assert!(said.contains("assumes 2h"), "{said}");
    let issued = timestamp(&ns.jsonpath(
        "secret",
        "zero-credentials",
        "{.metadata.annotations.tokenkeeper\\.dev/issued-at}",
    ));
    let expires = timestamp(&ns.secret_value("zero-credentials", "expires_at").unwrap());
    assert_eq!(expires.duration_since(issued).as_secs(), 7200);
}

/// The first refresh of an imported refresh token is when the provider
/// says how long the grant lives; the status that first says Ready already
/// carries it, without waiting for another reconcile.
#[test]
fn the_first_ready_status_says_when_the_grant_ends() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 600, "refreshTokenTtl": 86400 }));
    let ns = TestNamespace::new("grant-end");
    let _operator = Operator::start(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    // Every version of the connection, as a watch delivers them.
    let mut watch = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &common::kubeconfig(), "-n", &ns.name])
        .args([
            "get",
            "srcconn",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl get --watch");
    let stdout = watch.stdout.take().unwrap();
    let (versions, received) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        let reader = std::io::BufReader::new(stdout);
        let stream = serde_json::Deserializer::from_reader(reader).into_iter::<serde_json::Value>();
        for event in stream.map_while(Result::ok) {
            if versions.send(event["object"].clone()).is_err() {
                break;
            }
        }
    });
    ns.apply_ok(&refresh_token_grant("crm", &server, ""));
    let deadline = Instant::now() + READY;
    let first_ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let object = received
            .recv_timeout(left)
            .expect("a Ready version within 30 s");
        let ready = object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            break object;
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let ends = first_ready["status"]["grantExpiresAt"]
        .as_str()
        .unwrap_or_default();
    assert!(!ends.is_empty(), "{:#}", first_ready["status"]);
    let left = timestamp(ends).duration_since(Timestamp::now()).as_secs();
    assert!(
        (86_000..=86_400).contains(&left),
        "the grant ends in {left} s"
    );
}
