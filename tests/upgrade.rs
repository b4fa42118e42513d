//! `helm upgrade` from the previous chart release
//! (`tests/fixtures/tokenkeeper-0.1.0.tgz`, the package a chart repository
//! serves) to this chart, on a control plane of the test's own: the CRD is
//! the same object afterwards, the operator's Deployment is replaced, and a
//! connection made under the previous release stays Ready through the new
//! operator, its rotating grant carried over without anyone authorizing
//! again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{OAuthServer, OwnControlPlane, stderr, stdout, wait_for};
use serde_json::json;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const READY: Duration = Duration::from_secs(60);
const PREVIOUS: &str = "tests/fixtures/tokenkeeper-0.1.0.tgz";
/// The test provider is on this machine, which the chart's settings refuse.
const LOOPBACK_PROVIDER: &[&str] = &["--allow-plain-http-loopback"];

fn helm(plane: &OwnControlPlane, args: &[&str]) -> String {
    let helm = common::helm();
    let out = Command::new(helm)
        .args(args)
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .output()
        .unwrap();
    assert!(out.status.success(), "helm {args:?}: {}", stderr(&out));
    stdout(&out)
}

fn chart_version(chart: &str) -> String {
    let helm = common::helm();
    let out = Command::new(helm)
        .args(["show", "chart", chart])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let chart: serde_json::Value = serde_yaml::from_str(&stdout(&out)).unwrap();
    chart["version"].as_str().unwrap().to_owned()
}

fn semver(version: &str) -> Vec<u64> {
    version
        .split('.')
        .map(|part| part.parse().unwrap())
        .collect()
}

fn connection_field(plane: &OwnControlPlane, path: &str) -> String {
    plane.kubectl_ok(&[
        "get",
        "srcconn",
        "crm",
        "-n",
        "extract",
        "-o",
        &format!("jsonpath={path}"),
    ])
}

fn access_token(plane: &OwnControlPlane) -> String {
    plane.kubectl_ok(&[
        "get",
        "secret",
        "crm-credentials",
        "-n",
        "extract",
        "-o",
        "jsonpath={.data.access_token}",
    ])
}

fn wait_synced(plane: &OwnControlPlane, what: &str) {
    wait_for(what, READY, || {
        let reason = connection_field(plane, "{.status.conditions[?(@.type==\"Ready\")].reason}");
        (reason == "SecretSynced").then_some(()).ok_or(reason)
    });
}

#[test]
fn a_helm_upgrade_from_the_previous_chart_keeps_connections_ready() {
    let previous = Path::new(REPO).join(PREVIOUS);
    let previous = previous.to_str().unwrap();
    let current = format!("{REPO}/charts/tokenkeeper");
    let (from, to) = (chart_version(previous), chart_version(&current));
    assert!(
        semver(&from) < semver(&to),
        "{from} → {to}: bump the chart's version"
    );

    let plane = OwnControlPlane::start("upgrade");
    helm(
        &plane,
        &[
            "install",
            "tokenkeeper",
            previous,
            "--namespace",
            "tokenkeeper",
            "--create-namespace",
        ],
    );
    plane.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/sourceconnections.tokenkeeper.dev",
    ]);
    let crd_uid = || {
        plane.kubectl_ok(&[
            "get",
            "crd",
            "sourceconnections.tokenkeeper.dev",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
    };
    let uid_before = crd_uid();

    let server = OAuthServer::start(json!({ "accessTokenTtl": 60, "rotateRefreshToken": true }));
    plane.kubectl_ok(&["create", "namespace", "extract"]);
    plane.apply_ok(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: crm-client\n  namespace: extract\n  labels:\n    \
         tokenkeeper.dev/source: \"true\"\nstringData:\n  client_id: crm-client\n  client_secret: crm-client-secret\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: crm-grant\n  namespace: extract\n  labels:\n    \
         tokenkeeper.dev/source: \"true\"\nstringData:\n  refresh_token: {}\n\
         ---\napiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\n  namespace: extract\n\
         spec:\n  oauth2:\n    tokenUrl: {}\n    grant: refreshToken\n    client:\n      secretRef:\n        name: crm-client\n    \
         refreshTokenSecretRef:\n      name: crm-grant\n      key: refresh_token\n",
        server.mint_refresh_token("crm.read"),
        server.token_url()
    ));
    let mut previous_operator =
        plane.run_operator_as_deployed("upgrade-previous", LOOPBACK_PROVIDER);
    wait_synced(&plane, "Ready under the previous release");
    let token_before = access_token(&plane);

    helm(
        &plane,
        &[
            "upgrade",
            "tokenkeeper",
            &current,
            "--namespace",
            "tokenkeeper",
        ],
    );
    // The rollout stops the old pod.
    assert!(
        previous_operator.stop().success(),
        "{}",
        previous_operator.logs()
    );

    assert_eq!(
        crd_uid(),
        uid_before,
        "the CRD is the same object, never deleted"
    );
    let chart_label = plane.deployment_field(
        "{.metadata.labels.helm\\.sh/chart} {.spec.template.spec.containers[0].image}",
    );
    assert!(
        chart_label.starts_with(&format!("tokenkeeper-{to} ")),
        "{chart_label}"
    );
    assert!(
        chart_label.ends_with(&format!(":{to}")),
        "the new image: {chart_label}"
    );
    assert!(
        plane
            .deployed_args()
            .contains(&"--refresh-propagation-margin-seconds=120".to_owned()),
        "the new release's arguments"
    );
    let history = helm(
        &plane,
        &[
            "history",
            "tokenkeeper",
            "--namespace",
            "tokenkeeper",
            "-o",
            "json",
        ],
    );
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 2, "{history}");
    assert_eq!(history[1]["status"], "deployed", "{history}");

    // The new operator takes the connection over and refreshes it with the
    // grant the previous one rotated last.
    let issued_before = server.stats()["tokenSuccesses"].as_u64().unwrap();
    let upgraded = plane.run_operator_as_deployed("upgrade-upgraded", LOOPBACK_PROVIDER);
    plane.kubectl_ok(&[
        "annotate",
        "srcconn",
        "crm",
        "-n",
        "extract",
        "--overwrite",
        "tokenkeeper.dev/force-refresh=after-upgrade",
    ]);
    wait_for("a token from the upgraded operator", READY, || {
        let now = access_token(&plane);
        (now != token_before).then_some(()).ok_or(now)
    });
    wait_synced(&plane, "Ready under the new release");
    assert_eq!(
        connection_field(
            &plane,
            "{.status.conditions[?(@.type==\"AuthFailed\")].status}"
        ),
        "False"
    );
    let stats = server.stats();
    assert!(
        stats["tokenSuccesses"].as_u64().unwrap() > issued_before,
        "{stats}"
    );
    assert_eq!(
        stats["refreshTokenReuse"], 0,
        "no rotated refresh token was used twice: {stats}"
    );
    assert!(!upgraded.logs().contains("panicked"), "{}", upgraded.logs());
}
