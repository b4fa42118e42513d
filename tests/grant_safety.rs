//! A rotated refresh token exists only in tokenkeeper's write: infrastructure
//! faults must not lose one. With `oidc-provider` rotating refresh tokens and
//! revoking a grant whose refresh token is used twice: an API server stopped
//! and started again (on a control plane of the test's own), and a leader
//! frozen past its lease.

mod common;

use std::time::Duration;

use common::{
    OAuthServer, Operator, OwnControlPlane, READY_REASONS, REPO, TestNamespace, all_synced,
    wait_for,
};
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

fn wait_all_synced(plane: &OwnControlPlane, timeout: Duration) {
    wait_for("every connection SecretSynced", timeout, || {
        let out = plane.kubectl(&["get", "srcconn", "-n", NAMESPACE, "-o", READY_REASONS]);
        all_synced(&String::from_utf8_lossy(&out.stdout), CONNECTIONS)
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
    // Two replicas: the outage is longer than the lease, and only the
    // leader holds the grants its failed writes could not store.
    let lease_args = common::leader_args("default", "tokenkeeper-leader");
    let lease_args: Vec<&str> = lease_args.iter().map(String::as_str).collect();
    let replicas = [
        Operator::start_on(&plane.kubeconfig(), NAMESPACE, &lease_args),
        Operator::start_on(&plane.kubeconfig(), NAMESPACE, &lease_args),
    ];
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
    let logs = replicas[0].logs() + &replicas[1].logs();
    assert!(logs.contains("kept in memory"), "a grant was kept");
    assert!(logs.contains("refreshing when it does"), "a refresh waited");
}

#[test]
fn a_leader_that_thaws_after_its_lease_sends_no_token_request() {
    const CONNECTIONS: usize = 50;
    const ROUNDS: usize = 5;
    let server = OAuthServer::start(json!({ "accessTokenTtl": 6, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("fence");
    ns.create_client_secret("crm-client", "crm-client-secret");
    let mut manifests = Vec::new();
    for index in 0..CONNECTIONS {
        let name = format!("crm{index}");
        let token = server.mint_refresh_token("crm.read");
        manifests.push(format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-grant\nstringData:\n  \
             refresh_token: {token}\n"
        ));
        manifests
            .push(connection(&name, &server).replace(&format!("  namespace: {NAMESPACE}\n"), ""));
    }
    ns.apply_ok(&manifests.join("---\n"));
    let lease = ns.name.clone();
    let args = common::leader_args("tokenkeeper-system", &lease);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut replicas = [
        Operator::start_with(&ns, &args),
        Operator::start_with(&ns, &args),
    ];
    let synced = |ns: &TestNamespace| {
        all_synced(
            &ns.kubectl_ok(&["get", "srcconn", "-o", READY_REASONS]),
            CONNECTIONS,
        )
    };
    wait_for(
        "every connection SecretSynced",
        Duration::from_secs(90),
        || synced(&ns),
    );
    let holder = || common::lease_field(&lease, "holderIdentity");

    for round in 0..ROUNDS {
        let identity = holder();
        let leader = replicas
            .iter()
            .position(|r| identity.ends_with(&format!("-{}", r.pid())))
            .unwrap_or_else(|| panic!("round {round}: {identity:?} is one of the replicas"));
        // The provider holds token requests unanswered while the leader is
        // stopped, so that none is answered into a frozen process: that
        // window (the provider rotated, the answer never arrived) is the
        // crash window no replica can close, and not what this tests.
        server.fail("hang");
        std::thread::sleep(Duration::from_millis(300));
        replicas[leader].freeze();
        server.fail("off");
        let new_holder = wait_for(
            "the other replica to take the lease",
            Duration::from_secs(30),
            || {
                let now = holder();
                (now != identity && !now.is_empty())
                    .then_some(now.clone())
                    .ok_or(now)
            },
        );
        // Past the lease, and long enough for refreshes to come due in the
        // frozen replica and be done by the new leader.
        std::thread::sleep(Duration::from_secs(6));
        let requests = server.stats()["tokenRequests"].as_u64().unwrap();
        replicas[leader].thaw();
        let status = wait_for(
            "the thawed replica to step down",
            Duration::from_secs(30),
            || replicas[leader].exited().ok_or("still running".to_owned()),
        );
        assert!(!status.success(), "it exits to follow from a clean slate");
        let logs = replicas[leader].logs();
        assert!(
            logs.contains("was not renewed within the renew deadline")
                || logs.contains("another replica holds the lease"),
            "round {round}: {logs}"
        );
        assert!(
            server.stats()["tokenRequests"].as_u64().unwrap() >= requests,
            "{new_holder} went on refreshing"
        );
        replicas[leader] = Operator::start_with(&ns, &args);
        let stats = server.stats();
        assert_eq!(
            stats["refreshTokenReuse"], 0,
            "round {round}: a thawed leader used a refresh token the new leader had rotated: {stats}"
        );
    }
    wait_for(
        "every connection SecretSynced",
        Duration::from_secs(60),
        || synced(&ns),
    );
    let stats = server.stats();
    assert_eq!(stats["refreshTokenReuse"], 0, "{stats}");
    assert_eq!(
        stats["errors"].get("invalid_grant"),
        None,
        "no grant was revoked: {stats}"
    );
}
