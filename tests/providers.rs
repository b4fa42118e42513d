//! Presets against emulators of real providers' documented behaviour
//! (`tests/providers/emulator.mjs`): each family's success and error
//! bodies, rotation and revocation, as `../shared/reference/providers.md`
//! records them. The connections name a preset and point its endpoints at
//! the emulator; everything else (client authentication, scopes, response
//! fields, lifetimes, the error dialect, the way of revoking) comes from
//! the catalogue.

mod common;

use std::time::Duration;

use common::{Operator, ProviderEmulator, TestNamespace, describes_event, wait_for};

const READY: Duration = Duration::from_secs(30);

/// One family's documented behaviour, and what the preset must make of it.
struct Family {
    preset: &'static str,
    token_path: &'static str,
    /// Where the emulator revokes, when the preset revokes.
    revocation_path: Option<&'static str>,
    /// How the preset authenticates the client.
    client_auth: &'static str,
    /// A field of the token response the target Secret must carry.
    response_field: Option<&'static str>,
    /// The reason a dead refresh token must show.
    dead_grant: &'static str,
    /// The lifetime the preset assumes, for a provider that sends none.
    assumed_lifetime: Option<i64>,
}

fn connection(name: &str, family: &Family, emulator: &ProviderEmulator, preset: bool) -> String {
    let provider = if preset {
        format!("    provider: {}\n", family.preset)
    } else {
        String::new()
    };
    // An introspection endpoint that answers 404 at first: the preset's
    // assumed lifetime applies until the test names the real one (the same
    // origin, so the grant stays bound to it).
    let introspection = match family.assumed_lifetime {
        Some(_) => format!("    introspectionUrl: \"{}\"\n", emulator.url("/nowhere")),
        None => String::new(),
    };
    let revocation = match family.revocation_path {
        Some(path) => format!("    revocationUrl: \"{}\"\n", emulator.url(path)),
        None => "    revokeOnDelete: false\n".to_owned(),
    };
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n\
         {provider}    tokenUrl: \"{token}\"\n    authorizationUrl: \"{authorize}\"\n{revocation}{introspection}    \
         verification:\n      url: \"{me}\"\n    grant: refreshToken\n    client:\n      secretRef:\n        \
         name: app-client\n    refreshTokenSecretRef:\n      name: crm-grant\n      key: refresh_token\n",
        token = emulator.url(family.token_path),
        authorize = emulator.url("/authorize"),
        me = emulator.url("/me"),
    )
}

/// When the target Secret's token was issued and expires (Unix seconds).
fn token_times(ns: &TestNamespace) -> (i64, i64) {
    let issued: jiff::Timestamp = ns
        .jsonpath(
            "secret",
            "crm-credentials",
            "{.metadata.annotations.tokenkeeper\\.dev/issued-at}",
        )
        .parse()
        .expect("issued-at");
    let expires: jiff::Timestamp = ns
        .secret_value("crm-credentials", "expires_at")
        .expect("expires_at")
        .parse()
        .expect("a time");
    (issued.as_second(), expires.as_second())
}

/// `family`'s emulator, a namespace `test` with the emulator's client and a
/// refresh token it issued, and the operator.
fn started(family: &str, test: &str) -> (ProviderEmulator, TestNamespace, Operator) {
    let emulator = ProviderEmulator::start(family, 6);
    let ns = TestNamespace::new(test);
    let operator = Operator::start(&ns);
    ns.create_app_client();
    ns.put_refresh_token(&emulator.mint("read"));
    (emulator, ns, operator)
}

fn stat(emulator: &ProviderEmulator, name: &str) -> u64 {
    emulator.stats()[name].as_u64().unwrap_or_default()
}

/// A connection using `family`'s preset against its emulator: Ready with
/// the preset's response fields and client authentication, refreshed with
/// rotation; a dead grant and a rotated client secret are the rejections
/// users act on, with the fix; deleting it revokes the provider's way.
fn exercise(family: Family) {
    let (emulator, ns, _operator) = started(family.preset, &format!("preset-{}", family.preset));
    let manifest = connection("crm", &family, &emulator, true);
    ns.apply_ok(&manifest);
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    if let Some(assumed) = family.assumed_lifetime {
        let (issued, expires) = token_times(&ns);
        assert_eq!(expires - issued, assumed);
        // With the provider's introspection endpoint, the real end.
        ns.apply_ok(&manifest.replace("/nowhere", "/services/oauth2/introspect"));
        ns.force_refresh("crm", "introspected");
        let message = ns.wait_ready_saying("crm", "True", "SecretSynced", READY);
        wait_for("the introspected expiry", READY, || {
            let message = ns.condition("crm", "Ready", "message");
            message
                .contains("introspection")
                .then_some(())
                .ok_or(message)
        });
        let (issued, expires) = token_times(&ns);
        assert!(expires - issued <= 7, "{message}");
    }
    if let Some(field) = family.response_field {
        assert!(
            ns.secret_value("crm-credentials", field).is_some(),
            "{}: {field} in the target Secret",
            family.preset
        );
    }
    let auth = emulator.stats()["clientAuth"].clone();
    assert!(
        auth.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|m| m == family.client_auth)),
        "{}: the client authenticated with {auth}",
        family.preset
    );
    // Several refreshes, rotation included, keep it Ready.
    wait_for("three refreshes", Duration::from_secs(40), || {
        let refreshes = stat(&emulator, "refreshes");
        (refreshes >= 3).then_some(()).ok_or(refreshes.to_string())
    });
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    // The user disconnects the app: the provider's own words become the
    // rejection, with how to re-authorize.
    emulator.control("revoke-all", serde_json::json!({}));
    let message = ns.wait_ready_saying("crm", "False", family.dead_grant, READY);
    assert_eq!(ns.condition("crm", "AuthFailed", "status"), "True");
    assert!(
        message.contains("kubectl"),
        "{}: the fix in {message}",
        family.preset
    );

    // A new grant heals it; then the app's client secret is rotated at the
    // provider: the client is refused, not every grant.
    ns.put_refresh_token(&emulator.mint("read"));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    emulator.control("client-secret", serde_json::json!({"secret": "rotated"}));
    ns.force_refresh("crm", "after-secret-rotation");
    ns.wait_ready("crm", "False", "InvalidClient", READY);
    emulator.control("client-secret", serde_json::json!({"secret": "secret-1"}));
    ns.force_refresh("crm", "secret-back");
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    if family.revocation_path.is_some() {
        ns.kubectl_ok(&["delete", "srcconn", "crm", "--timeout=60s"]);
        let revocations = emulator.stats()["revocations"].clone();
        assert!(
            revocations.as_array().is_some_and(|r| !r.is_empty()),
            "{}: revoked on delete: {revocations}",
            family.preset
        );
    }
}

#[test]
fn hubspot_dead_refresh_tokens_are_invalid_grant() {
    exercise(Family {
        preset: "hubspot",
        token_path: "/oauth/v1/token",
        revocation_path: None,
        client_auth: "post",
        response_field: Some("hub_id"),
        dead_grant: "InvalidGrant",
        assumed_lifetime: None,
    });
}

#[test]
fn slack_errors_in_ok_false_envelopes_are_rejections() {
    exercise(Family {
        preset: "slack",
        token_path: "/api/oauth.v2.access",
        revocation_path: None,
        client_auth: "basic",
        response_field: None,
        dead_grant: "InvalidGrant",
        assumed_lifetime: None,
    });
}

#[test]
fn github_errors_with_http_200_are_rejections() {
    exercise(Family {
        preset: "github",
        token_path: "/login/oauth/access_token",
        revocation_path: None,
        client_auth: "post",
        response_field: None,
        dead_grant: "InvalidGrant",
        assumed_lifetime: None,
    });
}

#[test]
fn microsoft_aadsts_codes_decide_the_reason() {
    exercise(Family {
        preset: "microsoft",
        token_path: "/common/oauth2/v2.0/token",
        revocation_path: None,
        client_auth: "post",
        response_field: None,
        dead_grant: "RefreshTokenExpired",
        assumed_lifetime: None,
    });
}

#[test]
fn salesforce_answers_without_expires_in_and_revokes_on_delete() {
    exercise(Family {
        preset: "salesforce",
        token_path: "/services/oauth2/token",
        revocation_path: Some("/services/oauth2/revoke"),
        client_auth: "post",
        response_field: Some("instance_url"),
        // "expired access/refresh token" is what Salesforce says of any
        // dead grant.
        dead_grant: "RefreshTokenExpired",
        assumed_lifetime: Some(15 * 60),
    });
}

#[test]
fn dropbox_revokes_with_the_access_token() {
    let (emulator, ns, _operator) = started("dropbox", "preset-dropbox");
    let family = Family {
        preset: "dropbox",
        token_path: "/oauth2/token",
        revocation_path: Some("/2/auth/token/revoke"),
        client_auth: "basic",
        response_field: None,
        dead_grant: "InvalidGrant",
        assumed_lifetime: None,
    };
    ns.apply_ok(&connection("box", &family, &emulator, true));
    ns.wait_ready("box", "True", "SecretSynced", READY);
    ns.kubectl_ok(&["delete", "srcconn", "box", "--timeout=60s"]);
    let revocations = emulator.stats()["revocations"].clone();
    let kinds: Vec<&str> = revocations
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["bearer"], "{revocations}");
}

/// Without a preset, the generic rules read the same bodies: a 4xx body
/// that names the refresh token as unknown is a dead grant (not a provider
/// outage retried forever), and an error in an HTTP 200 body is an error.
#[test]
fn without_a_preset_dead_grants_are_still_rejections() {
    for (family, path) in [
        ("hubspot", "/oauth/v1/token"),
        ("slack", "/api/oauth.v2.access"),
        ("github", "/login/oauth/access_token"),
    ] {
        let (emulator, ns, _operator) = started(family, &format!("generic-{family}"));
        let custom = Family {
            preset: family,
            token_path: path,
            revocation_path: None,
            client_auth: "post",
            response_field: None,
            dead_grant: "InvalidGrant",
            assumed_lifetime: None,
        };
        // Slack wants HTTP Basic unless told: say it, as a user would.
        let manifest = connection("crm", &custom, &emulator, false).replace(
            "    client:\n      secretRef:",
            "    client:\n      authMethod: clientSecretPost\n      secretRef:",
        );
        ns.apply_ok(&manifest);
        ns.wait_ready("crm", "True", "SecretSynced", READY);
        emulator.control("revoke-all", serde_json::json!({}));
        ns.force_refresh("crm", "after-revocation");
        ns.wait_ready("crm", "False", "InvalidGrant", READY);
        assert_eq!(ns.condition("crm", "AuthFailed", "status"), "True");
        let describe = ns.kubectl_ok(&["describe", "srcconn", "crm"]);
        assert!(
            describes_event(&describe, "Warning", "InvalidGrant"),
            "{family}: {describe}"
        );
    }
}

/// A grant with a known end (LinkedIn-style absolute lifetime) says so ahead
/// of time, and re-authorizing clears it.
#[test]
fn a_grant_that_ends_says_so_ahead_and_the_metric_shows_it() {
    let emulator = ProviderEmulator::start("github", 6);
    let ns = TestNamespace::new("grant-expiry");
    let (_operator, port) = Operator::with_metrics(&ns);
    ns.create_app_client();
    ns.put_refresh_token(&emulator.mint("read"));
    let family = Family {
        preset: "github",
        token_path: "/login/oauth/access_token",
        revocation_path: None,
        client_auth: "post",
        response_field: None,
        dead_grant: "InvalidGrant",
        assumed_lifetime: None,
    };
    ns.apply_ok(&connection("crm", &family, &emulator, true));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    // GitHub sends refresh_token_expires_in (about six months): the end is
    // known, and far.
    wait_for("the grant's end in the status", READY, || {
        let end = ns.jsonpath("srcconn", "crm", "{.status.grantExpiresAt}");
        (!end.is_empty()).then_some(end.clone()).ok_or(end)
    });
    assert_eq!(ns.condition("crm", "GrantExpiring", "status"), "False");
    assert_eq!(ns.condition("crm", "GrantExpiring", "reason"), "GrantValid");
    // `kubectl get -o wide` shows the preset and the grant's state.
    let wide = ns.kubectl_ok(&["get", "srcconn", "crm", "-o", "wide"]);
    assert!(
        wide.contains("PROVIDER") && wide.contains("GRANT EXPIRING") && wide.contains("github"),
        "{wide}"
    );
    let (_, metrics) = common::http_get(port, "/metrics");
    assert!(
        metrics.contains("tokenkeeper_connection_grant_expiry_timestamp_seconds{"),
        "{metrics}"
    );
    // The refresh token's lifetime shortened to a minute: it ends soon.
    emulator.control("grant-deadline", serde_json::json!({"seconds": 40}));
    ns.force_refresh("crm", "short-grant");
    wait_for("GrantExpiring", READY, || {
        let status = ns.condition("crm", "GrantExpiring", "status");
        (status == "True").then_some(()).ok_or(status)
    });
    assert_eq!(ns.condition("crm", "Ready", "status"), "True");
    let message = ns.condition("crm", "GrantExpiring", "message");
    assert!(message.contains("Re-authorize"), "{message}");
    let describe = ns.kubectl_ok(&["describe", "srcconn", "crm"]);
    assert!(
        describes_event(&describe, "Warning", "GrantExpiring"),
        "{describe}"
    );
    // Re-authorized: a new grant, whose end is far again.
    emulator.control(
        "grant-deadline",
        serde_json::json!({"seconds": 100_000_000}),
    );
    ns.put_refresh_token(&emulator.mint("read"));
    wait_for("GrantExpiring cleared", READY, || {
        let status = ns.condition("crm", "GrantExpiring", "status");
        (status == "False").then_some(()).ok_or(status)
    });
    ns.wait_ready("crm", "True", "SecretSynced", READY);
}

/// The README's provider table names every preset, and the examples that
/// use presets resolve into endpoints the operator accepts.
#[test]
fn the_readme_and_examples_follow_the_catalogue() {
    let readme = std::fs::read_to_string(format!("{}/README.md", common::REPO)).unwrap();
    for id in tokenkeeper::providers::catalogue().keys() {
        assert!(
            readme.contains(&format!("| `{id}` |")),
            "README's provider table lacks {id}"
        );
    }
    for name in ["salesforce", "google", "hubspot"] {
        let path = format!("{}/deploy/examples/oauth-preset-{name}.yaml", common::REPO);
        let text = std::fs::read_to_string(&path).unwrap();
        let connection = text
            .split("\n---\n")
            .find(|doc| doc.contains("kind: SourceConnection"))
            .expect("a SourceConnection");
        let conn: tokenkeeper::api::SourceConnection = serde_yaml::from_str(connection).unwrap();
        let oauth = conn.spec.oauth2.as_ref().unwrap();
        assert_eq!(oauth.provider.as_deref(), Some(name));
        let resolved = tokenkeeper::decide::preset::resolve(oauth).unwrap();
        tokenkeeper::decide::validate::oauth_settings(&resolved.oauth, &Default::default())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(resolved.oauth.token_url.starts_with("https://"), "{path}");
    }
}
