//! Basic and API-key connections end to end on a real API server, driven
//! with kubectl as a user would.

mod common;

use std::time::Duration;

use common::{Operator, REPO, TestNamespace, describes_event, stderr, stdout, wait_for};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn example(file: &str) -> String {
    std::fs::read_to_string(format!("{REPO}/deploy/examples/{file}")).expect("example exists")
}

fn api_key_connection(name: &str, secret: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\n\
         spec:\n  apiKey:\n    secretRef:\n      name: {secret}\n"
    )
}

#[test]
fn basic_example_fills_the_target_secret_and_reports_ready() {
    let ns = TestNamespace::new("basic-example");
    let _operator = Operator::start(&ns);
    let out = ns.kubectl(&[
        "apply",
        "-f",
        &format!("{REPO}/deploy/examples/basic-postgres.yaml"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    ns.wait_ready("warehouse-db", "True", "SecretSynced", READY_TIMEOUT);
    let target = "warehouse-db-credentials";
    assert_eq!(
        ns.secret_value(target, "username").as_deref(),
        Some("extractor")
    );
    assert_eq!(
        ns.secret_value(target, "password").as_deref(),
        Some("correct-horse-battery-staple")
    );
    assert_eq!(
        ns.jsonpath("secret", target, "{.metadata.labels.team}"),
        "data-platform"
    );
    assert_eq!(
        ns.jsonpath(
            "secret",
            target,
            "{.metadata.labels.app\\.kubernetes\\.io/managed-by}"
        ),
        "tokenkeeper"
    );
    let owner = ns.jsonpath(
        "secret",
        target,
        "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller}",
    );
    assert_eq!(owner, "SourceConnection/warehouse-db/true");
    assert_eq!(
        ns.jsonpath("srcconn", "warehouse-db", "{.status.secretName}"),
        target
    );
    assert_eq!(
        ns.condition("warehouse-db", "AuthFailed", "status"),
        "False"
    );

    let describe = wait_for(
        "the SecretSynced event in kubectl describe",
        READY_TIMEOUT,
        || {
            let text = ns.kubectl_ok(&["describe", "srcconn", "warehouse-db"]);
            describes_event(&text, "Normal", "SecretSynced")
                .then_some(text.clone())
                .ok_or(text)
        },
    );
    assert!(
        describe.contains("Type:                  Ready"),
        "{describe}"
    );
    assert!(
        describe.contains("Created Secret warehouse-db-credentials"),
        "{describe}"
    );

    let listing = ns.kubectl_ok(&["get", "srcconn"]);
    let header: Vec<&str> = listing.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "REASON", "SECRET", "AGE"]);
    assert!(
        listing.contains("warehouse-db   True    SecretSynced   warehouse-db-credentials"),
        "{listing}"
    );
}

#[test]
fn api_key_example_fills_the_named_target_secret() {
    let ns = TestNamespace::new("apikey-example");
    let _operator = Operator::start(&ns);
    ns.apply_ok(&example("apikey-stripe.yaml"));
    ns.wait_ready("stripe", "True", "SecretSynced", READY_TIMEOUT);
    assert_eq!(
        ns.secret_value("stripe-extract", "api_key").as_deref(),
        Some("sk_test_example_only")
    );
    assert_eq!(
        ns.jsonpath(
            "secret",
            "stripe-extract",
            "{.metadata.annotations.tokenkeeper\\.dev/description}"
        ),
        "Stripe key for the nightly extraction job"
    );
    let keys = ns.jsonpath("secret", "stripe-extract", "{.data}");
    assert!(
        !keys.contains("password"),
        "only api_key is written: {keys}"
    );
}

#[test]
fn missing_secret_is_reported_and_heals_when_created() {
    let ns = TestNamespace::new("missing-secret");
    let _operator = Operator::start(&ns);
    ns.apply_ok(&api_key_connection("hubspot", "hubspot-key"));
    let message = ns.wait_ready_saying("hubspot", "False", "SecretNotFound", READY_TIMEOUT);
    assert!(
        message.contains(&format!("Secret {}/hubspot-key", ns.name)),
        "{message}"
    );
    assert!(
        message.contains("kubectl create secret generic hubspot-key"),
        "{message}"
    );
    assert_eq!(ns.condition("hubspot", "AuthFailed", "status"), "False");
    wait_for("the Warning event", READY_TIMEOUT, || {
        let text = ns.kubectl_ok(&["describe", "srcconn", "hubspot"]);
        describes_event(&text, "Warning", "SecretNotFound")
            .then_some(())
            .ok_or(text)
    });
    assert_eq!(
        ns.jsonpath("secret", "hubspot-credentials", "{.metadata.name}"),
        ""
    );

    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "hubspot-key",
        "--from-literal=api_key=pat-123",
    ]);
    ns.wait_ready("hubspot", "True", "SecretSynced", Duration::from_secs(10));
    assert_eq!(
        ns.secret_value("hubspot-credentials", "api_key").as_deref(),
        Some("pat-123")
    );
}

#[test]
fn missing_key_names_the_key_and_heals_when_added() {
    let ns = TestNamespace::new("missing-key");
    let _operator = Operator::start(&ns);
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "db",
        "--from-literal=user=etl",
        "--from-literal=pwd=x1",
    ]);
    ns.apply_ok(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: db\n\
         spec:\n  basic:\n    secretRef:\n      name: db\n      usernameKey: user\n",
    );
    let message = ns.wait_ready_saying("db", "False", "MissingKey", READY_TIMEOUT);
    assert!(
        message.contains("no non-empty key \"password\""),
        "{message}"
    );
    assert!(message.contains("it has: pwd, user"), "{message}");
    assert!(
        !message.contains("x1") && !message.contains("etl"),
        "no values in messages: {message}"
    );

    ns.kubectl_ok(&[
        "patch",
        "secret",
        "db",
        "-p",
        r#"{"stringData":{"password":"x2"}}"#,
    ]);
    ns.wait_ready("db", "True", "SecretSynced", Duration::from_secs(10));
    assert_eq!(
        ns.secret_value("db-credentials", "password").as_deref(),
        Some("x2")
    );
}

#[test]
fn cross_namespace_reference_is_refused() {
    let ns = TestNamespace::new("cross-ns");
    let _operator = Operator::start(&ns);
    ns.apply_ok(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: sneaky\n\
         spec:\n  apiKey:\n    secretRef:\n      name: default-token\n      namespace: kube-system\n",
    );
    let message = ns.wait_ready_saying("sneaky", "False", "InvalidSpec", READY_TIMEOUT);
    assert!(message.contains("kube-system"), "{message}");
    assert_eq!(
        ns.jsonpath("secret", "sneaky-credentials", "{.metadata.name}"),
        ""
    );
}

#[test]
fn invalid_specs_are_rejected_by_the_api_server() {
    let ns = TestNamespace::new("schema");
    let two_methods = "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: two\n\
        spec:\n  apiKey:\n    secretRef:\n      name: a\n  basic:\n    secretRef:\n      name: b\n";
    let out = ns.apply(two_methods);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("oneOf"), "{}", stderr(&out));

    let no_method = "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: none\nspec: {}\n";
    let out = ns.apply(no_method);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("oneOf"), "{}", stderr(&out));

    let no_secret_name = "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: noname\n\
        spec:\n  apiKey:\n    secretRef:\n      key: token\n";
    let out = ns.apply(no_secret_name);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spec.apiKey.secretRef.name: Required value"),
        "{}",
        stderr(&out)
    );

    let bad_grant = "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: badgrant\n\
        spec:\n  oauth2:\n    tokenUrl: https://example.test/token\n    grant: password\n    client:\n      secretRef:\n        name: c\n";
    let out = ns.apply(bad_grant);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spec.oauth2.grant: Unsupported value: \"password\""),
        "{}",
        stderr(&out)
    );

    let listing = ns.kubectl_ok(&["get", "srcconn", "-o", "name"]);
    assert_eq!(listing.trim(), "", "nothing was stored");
}

#[test]
fn rotating_the_source_secret_updates_the_target() {
    let ns = TestNamespace::new("rotation");
    let _operator = Operator::start(&ns);
    ns.apply_ok(&example("basic-postgres.yaml"));
    ns.wait_ready("warehouse-db", "True", "SecretSynced", READY_TIMEOUT);
    ns.kubectl_ok(&[
        "patch",
        "secret",
        "warehouse-db-login",
        "-p",
        r#"{"stringData":{"pass":"rotated-pw"}}"#,
    ]);
    wait_for(
        "the new password in the target Secret",
        Duration::from_secs(10),
        || {
            let value = ns.secret_value("warehouse-db-credentials", "password");
            (value.as_deref() == Some("rotated-pw"))
                .then_some(())
                .ok_or(format!("{value:?}"))
        },
    );
}

#[test]
fn a_deleted_target_secret_is_restored() {
    let ns = TestNamespace::new("restore");
    let _operator = Operator::start(&ns);
    ns.apply_ok(&example("apikey-stripe.yaml"));
    ns.wait_ready("stripe", "True", "SecretSynced", READY_TIMEOUT);
    ns.kubectl_ok(&["delete", "secret", "stripe-extract", "--wait=false"]);
    wait_for(
        "the target Secret to come back",
        Duration::from_secs(10),
        || {
            ns.secret_value("stripe-extract", "api_key")
                .ok_or("missing".to_owned())
        },
    );
}

#[test]
fn deleting_the_connection_garbage_collects_the_target() {
    let ns = TestNamespace::new("gc");
    let _operator = Operator::start(&ns);
    ns.apply_ok(&example("apikey-stripe.yaml"));
    ns.wait_ready("stripe", "True", "SecretSynced", READY_TIMEOUT);
    ns.kubectl_ok(&["delete", "srcconn", "stripe"]);
    // The garbage collector notices new CRDs on its 30 s discovery resync.
    wait_for(
        "the target Secret to be collected",
        Duration::from_secs(90),
        || {
            let name = ns.jsonpath("secret", "stripe-extract", "{.metadata.name}");
            name.is_empty().then_some(()).ok_or(name)
        },
    );
    assert_eq!(
        ns.jsonpath("secret", "stripe-api", "{.metadata.name}"),
        "stripe-api",
        "the input stays"
    );
}

#[test]
fn an_existing_foreign_secret_is_not_overwritten() {
    let ns = TestNamespace::new("conflict");
    let _operator = Operator::start(&ns);
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "stripe-extract",
        "--from-literal=api_key=hand-made",
    ]);
    ns.apply_ok(&example("apikey-stripe.yaml"));
    ns.wait_ready("stripe", "False", "TargetSecretConflict", READY_TIMEOUT);
    assert_eq!(
        ns.secret_value("stripe-extract", "api_key").as_deref(),
        Some("hand-made")
    );
    let message = ns.condition("stripe", "Ready", "message");
    assert!(
        message.contains("kubectl delete secret stripe-extract"),
        "{message}"
    );
}

#[test]
fn generation_is_observed_and_a_quiet_connection_is_not_rewritten() {
    let ns = TestNamespace::new("quiet");
    let operator = Operator::start(&ns);
    ns.apply_ok(&example("basic-postgres.yaml"));
    ns.wait_ready("warehouse-db", "True", "SecretSynced", READY_TIMEOUT);
    assert_eq!(
        ns.jsonpath("srcconn", "warehouse-db", "{.metadata.generation}"),
        "1"
    );
    assert_eq!(
        ns.jsonpath("srcconn", "warehouse-db", "{.status.observedGeneration}"),
        "1"
    );

    ns.kubectl_ok(&[
        "patch",
        "srcconn",
        "warehouse-db",
        "--type=merge",
        "-p",
        r#"{"spec":{"target":{"labels":{"team":"analytics"}}}}"#,
    ]);
    wait_for("observedGeneration 2", READY_TIMEOUT, || {
        let observed = ns.jsonpath("srcconn", "warehouse-db", "{.status.observedGeneration}");
        (observed == "2").then_some(()).ok_or(observed)
    });
    assert_eq!(
        ns.condition("warehouse-db", "Ready", "observedGeneration"),
        "2"
    );
    wait_for("the new label on the target", READY_TIMEOUT, || {
        let team = ns.jsonpath(
            "secret",
            "warehouse-db-credentials",
            "{.metadata.labels.team}",
        );
        (team == "analytics").then_some(()).ok_or(team)
    });

    // Let the dust settle, then watch both objects over a quiet period.
    std::thread::sleep(Duration::from_secs(2));
    let versions = || {
        (
            ns.jsonpath("srcconn", "warehouse-db", "{.metadata.resourceVersion}"),
            ns.jsonpath(
                "secret",
                "warehouse-db-credentials",
                "{.metadata.resourceVersion}",
            ),
        )
    };
    let before = versions();
    let ready_since = ns.condition("warehouse-db", "Ready", "lastTransitionTime");
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(versions(), before, "no write while nothing changes");
    assert_eq!(
        ns.condition("warehouse-db", "Ready", "lastTransitionTime"),
        ready_since
    );
    let logs = operator.logs();
    let reconciles =
        logs.matches("Created Secret").count() + logs.matches("Updated Secret").count();
    assert_eq!(
        reconciles,
        2,
        "one create and one label update:\n{}",
        operator.logs()
    );
}

/// tokenkeeper creates the target Secret with a plain create and updates it
/// by server-side apply; what the spec no longer asks for must still go.
#[test]
fn what_the_spec_drops_leaves_the_target_secret() {
    let ns = TestNamespace::new("spec-drops");
    let _operator = Operator::start(&ns);
    ns.apply_ok(&example("basic-postgres.yaml"));
    ns.wait_ready("warehouse-db", "True", "SecretSynced", READY_TIMEOUT);
    let target = "warehouse-db-credentials";
    assert_eq!(
        ns.jsonpath("secret", target, "{.metadata.labels.team}"),
        "data-platform"
    );
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "warehouse-db-key",
        "--from-literal=api_key=k-123",
    ]);
    ns.kubectl_ok(&["label", "secret", target, "added-by-someone-else=yes"]);

    ns.kubectl_ok(&[
        "patch",
        "srcconn",
        "warehouse-db",
        "--type=merge",
        "-p",
        r#"{"spec":{"basic":null,"apiKey":{"secretRef":{"name":"warehouse-db-key"}},"target":null}}"#,
    ]);
    wait_for("the API key in the target", READY_TIMEOUT, || {
        let key = ns.secret_value(target, "api_key");
        (key.as_deref() == Some("k-123"))
            .then_some(())
            .ok_or(format!("{key:?}"))
    });
    wait_for("the dropped label and keys gone", READY_TIMEOUT, || {
        let keys = ns.jsonpath("secret", target, "{.data}");
        let team = ns.jsonpath("secret", target, "{.metadata.labels.team}");
        (team.is_empty() && !keys.contains("username") && !keys.contains("password"))
            .then_some(())
            .ok_or(format!("team={team:?} data={keys}"))
    });
    assert_eq!(
        ns.jsonpath("secret", target, "{.metadata.labels.added-by-someone-else}"),
        "yes",
        "someone else's label stays"
    );
}

#[test]
fn sigterm_stops_the_operator_cleanly() {
    let ns = TestNamespace::new("sigterm");
    let mut operator = Operator::start(&ns);
    ns.apply_ok(&example("apikey-stripe.yaml"));
    ns.wait_ready("stripe", "True", "SecretSynced", READY_TIMEOUT);
    let status = operator.stop();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        operator.logs()
    );
    assert!(
        operator.logs().contains("tokenkeeper controller stopped"),
        "{}",
        operator.logs()
    );
}

#[test]
fn crd_subcommand_prints_what_crds_holds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenkeeper"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let committed = std::fs::read_to_string(format!("{REPO}/crds/sourceconnection.yaml")).unwrap();
    assert!(
        stdout(&out) == committed,
        "crds/ differs from `tokenkeeper crd`; regenerate it"
    );
}

#[test]
fn absent_is_told_from_a_failed_kubectl() {
    let ns = TestNamespace::new("helpers");
    assert_eq!(
        ns.jsonpath("secret", "no-such-secret", "{.metadata.name}"),
        ""
    );
    // A kubectl that fails for another reason must not read as "gone".
    let failed =
        std::panic::catch_unwind(|| ns.jsonpath("nosuchkind", "anything", "{.metadata.name}"));
    assert!(
        failed.is_err(),
        "an unknown resource type is a test failure"
    );
}
