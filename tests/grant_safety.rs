//! A rotated refresh token exists only in tokenkeeper's write: infrastructure
//! faults must not lose one. On a control plane of the test's own (its API
//! server is stopped and started again) with `oidc-provider` rotating
//! refresh tokens and revoking a grant whose refresh token is used twice.

mod common;

use std::time::Duration;

use common::{OAuthServer, Operator, OwnControlPlane, REPO, wait_for};
use serde_json::json;

const NAMESPACE: &str = "outage";
const CONNECTIONS: usize = 10;

fn connection(name: &str, server: &OAuthServer) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\n  \
         namespace: {NAMESPACE}\nspec:\n  oauth2:\n    tokenUrl: {}\n    grant: refreshToken\n    \
         client:\n      secretRef:\n        name: crm-client\n    refreshTokenSecretRef:\n      \
         name: {name}-grant\n      key: refresh_token\n",
        server.token_url()
    )
}

/// The Ready reasons of every connection, one per line.
fn ready_reasons(plane: &OwnControlPlane) -> Vec<String> {
    let out = plane.kubectl(&[
        "get",
        "srcconn",
        "-n",
        NAMESPACE,
        "-o",
        r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].reason}{"\n"}{end}"#,
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_all_synced(plane: &OwnControlPlane, timeout: Duration) {
    wait_for("every connection SecretSynced", timeout, || {
        let reasons = ready_reasons(plane);
        let synced = reasons.iter().filter(|r| *r == "SecretSynced").count();
        (synced == CONNECTIONS)
            .then_some(())
            .ok_or(format!("{reasons:?}"))
    });
}

#[test]
fn an_api_server_outage_loses_no_rotated_refresh_token() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 4, "rotateRefreshToken": true }));
    let plane = OwnControlPlane::start("outage");
    plane.kubectl_ok(&["apply", "-f", &format!("{REPO}/crds/")]);
    plane.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "-f",
        &format!("{REPO}/crds/"),
    ]);
    plane.kubectl_ok(&["create", "namespace", NAMESPACE]);
    plane.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "crm-client",
        "-n",
        NAMESPACE,
        "--from-literal=client_id=crm-client",
        "--from-literal=client_secret=crm-client-secret",
    ]);
    let operator = Operator::start_on(&plane.kubeconfig(), NAMESPACE, &[]);
    for index in 0..CONNECTIONS {
        if index == CONNECTIONS / 2 {
            // Two groups a token's half-life apart, so that when the API
            // goes some refreshes are in flight and others come due later.
            std::thread::sleep(Duration::from_secs(2));
        }
        let name = format!("crm{index}");
        let token = server.mint_refresh_token("crm.read");
        plane.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            &format!("{name}-grant"),
            "-n",
            NAMESPACE,
            &format!("--from-literal=refresh_token={token}"),
        ]);
        plane.apply_ok(&connection(&name, &server));
    }
    wait_all_synced(&plane, Duration::from_secs(60));

    // Down for four refresh periods, as a control-plane upgrade takes it.
    let apiserver = plane.stop_apiserver();
    std::thread::sleep(Duration::from_secs(16));
    let during = server.stats();
    plane.start_apiserver(&apiserver);

    wait_all_synced(&plane, Duration::from_secs(60));
    let requests = server.stats()["tokenRequests"].as_u64().unwrap();
    wait_for("refreshing to go on", Duration::from_secs(30), || {
        let now = server.stats()["tokenRequests"].as_u64().unwrap();
        (now >= requests + CONNECTIONS as u64)
            .then_some(())
            .ok_or(format!("{now} token requests"))
    });
    wait_all_synced(&plane, Duration::from_secs(30));
    let stats = server.stats();
    assert_eq!(
        stats["refreshTokenReuse"], 0,
        "a rotated refresh token was lost during the outage: {stats} (during: {during})"
    );
    assert_eq!(stats["errors"], json!({}), "{stats}");
    // Both paths were taken: grants issued while the API was going down
    // were kept in memory, refreshes that came due later waited.
    let logs = operator.logs();
    assert!(logs.contains("kept in memory"), "a grant was kept");
    assert!(logs.contains("refreshing when it does"), "a refresh waited");
}
