//! Operating tokenkeeper: two replicas with one writer, metrics and health
//! endpoints, the Helm chart and the plain manifests rendered from it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    OAuthServer, Operator, OwnControlPlane, REPO, TestNamespace, free_port, http_get, stderr,
    stdout, wait_for,
};
use jiff::Timestamp;
use serde_json::json;

const READY: Duration = Duration::from_secs(30);
/// Access tokens of the leader test: their last third (the margin when
/// they are refreshed) is longer than the 6 s lease plus a start.
const TOKEN_SECONDS: u64 = 20;
const CREDENTIALS: &str = "tokenkeeper.dev/secret-role=credentials";
const VERSIONS: &str = "jsonpath={.items[*].metadata.resourceVersion}";

fn leader_args(lease: &str, port: u16) -> Vec<String> {
    let mut args = common::leader_args("tokenkeeper-system", lease);
    args.extend([
        "--metrics-bind-address".to_owned(),
        format!("127.0.0.1:{port}"),
    ]);
    args
}

fn as_str(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn two_replicas_one_writer_and_the_follower_takes_over_a_killed_leader() {
    let server =
        OAuthServer::start(json!({ "accessTokenTtl": TOKEN_SECONDS, "rotateRefreshToken": true }));
    let ns = TestNamespace::new("leader");
    ns.create_client_secret("crm-client", "crm-client-secret");
    let connections: Vec<String> = (0..6).map(|i| format!("crm-{i}")).collect();
    for name in &connections {
        let token = server.mint_refresh_token("crm.read");
        ns.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            &format!("{name}-grant"),
            &format!("--from-literal=refresh_token={token}"),
        ]);
        ns.apply_ok(&format!(
            "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
             tokenUrl: {}\n    grant: refreshToken\n    client:\n      secretRef:\n        name: crm-client\n    \
             refreshTokenSecretRef:\n      name: {name}-grant\n      key: refresh_token\n",
            server.token_url()
        ));
    }
    let lease = ns.name.clone();
    let ports = [free_port(), free_port()];
    let args: Vec<Vec<String>> = ports
        .iter()
        .map(|port| leader_args(&lease, *port))
        .collect();
    let mut replicas = [
        Operator::start_with(&ns, &as_str(&args[0])),
        Operator::start_with(&ns, &as_str(&args[1])),
    ];
    for name in &connections {
        ns.wait_ready(name, "True", "SecretSynced", READY);
    }

    let holder = || common::lease_field(&lease, "holderIdentity");
    let leader_identity = holder();
    let leader = replicas
        .iter()
        .position(|r| leader_identity.ends_with(&format!("-{}", r.pid())))
        .unwrap_or_else(|| panic!("lease holder {leader_identity:?} is one of the replicas"));
    let follower = 1 - leader;
    let leader_metrics = http_get(ports[leader], "/metrics").1;
    let follower_metrics = http_get(ports[follower], "/metrics").1;
    assert_eq!(
        metric(&leader_metrics, "tokenkeeper_leader"),
        Some(1.0),
        "{leader_metrics}"
    );
    assert_eq!(
        metric(&follower_metrics, "tokenkeeper_leader"),
        Some(0.0),
        "{follower_metrics}"
    );
    assert_eq!(
        http_get(ports[follower], "/readyz").0,
        200,
        "a follower is ready to take over"
    );
    assert!(
        !follower_metrics.contains("result=\"success\""),
        "the follower sent no token request"
    );

    // Killed right after a refresh round was written: a leader killed while
    // a token request is in flight loses the refresh token the provider
    // rotated meanwhile (the crash window the README describes), which is
    // not what this test is about.
    let versions = || stdout(&ns.kubectl(&["get", "secrets", "-l", CREDENTIALS, "-o", VERSIONS]));
    let before_round = versions();
    wait_for("a refresh round", Duration::from_secs(20), || {
        let now = versions();
        let all_rewritten = now
            .split_whitespace()
            .zip(before_round.split_whitespace())
            .all(|(now, before)| now != before);
        all_rewritten.then_some(()).ok_or(now)
    });
    let lease_time = |field: &str| -> Timestamp {
        common::lease_field(&lease, field)
            .parse()
            .unwrap_or_else(|e| panic!("lease {field}: {e}"))
    };
    let killed_at = Instant::now();
    replicas[leader].kill();
    let last_renewal = lease_time("renewTime");

    // From the kill, through the takeover and the new leader's first
    // refresh round, no Secret holds an expired token: the tokens outlive
    // the lease.
    let assert_unexpired = || {
        for name in &connections {
            let sampled = Timestamp::now();
            let expires: Timestamp = ns
                .secret_value(&format!("{name}-credentials"), "expires_at")
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                expires > sampled,
                "{name} held an expired token at {sampled}"
            );
        }
    };
    let new_holder = wait_for(
        "the follower to take the lease",
        Duration::from_secs(15),
        || {
            assert_unexpired();
            let now = holder();
            (now != leader_identity && !now.is_empty())
                .then_some(now.clone())
                .ok_or(now)
        },
    );
    let takeover = killed_at.elapsed();
    assert!(new_holder.ends_with(&format!("-{}", replicas[follower].pid())));
    // The Lease's own facts: the follower took it only after it had gone a
    // whole lease duration unrenewed.
    let acquired = lease_time("acquireTime");
    assert!(
        acquired >= last_renewal + jiff::SignedDuration::from_secs(6),
        "acquired at {acquired}, last renewed at {last_renewal}, lease is 6 s"
    );
    eprintln!("takeover after SIGKILL of the leader: {takeover:?}");
    let after_takeover = versions();
    let end = Instant::now() + Duration::from_secs(TOKEN_SECONDS);
    while Instant::now() < end {
        assert_unexpired();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        versions()
            .split_whitespace()
            .zip(after_takeover.split_whitespace())
            .all(|(now, before)| now != before),
        "the new leader refreshed every connection"
    );
    let stats = server.stats();
    assert_eq!(
        stats["refreshTokenReuse"], 0,
        "the provider saw a refresh token used twice: {stats}"
    );
    assert_eq!(stats["errors"], json!({}), "{stats}");
    assert_eq!(
        metric(
            &http_get(ports[follower], "/metrics").1,
            "tokenkeeper_leader"
        ),
        Some(1.0)
    );
}

#[test]
fn metrics_and_health_follow_the_connections() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("metrics");
    let (_operator, port) = Operator::with_metrics(&ns);
    wait_for("/healthz", READY, || {
        let (code, body) = http_get(port, "/healthz");
        (code == 200).then_some(()).ok_or(body)
    });
    assert_eq!(http_get(port, "/readyz").0, 200);

    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\nspec:\n  oauth2:\n    \
         tokenUrl: {}\n    grant: clientCredentials\n    client:\n      secretRef:\n        name: crm-client\n",
        server.token_url()
    ));
    ns.apply_ok(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: broken\nspec:\n  apiKey:\n    \
         secretRef:\n      name: nowhere\n",
    );
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    ns.wait_ready("broken", "False", "SecretNotFound", READY);

    let labels = |name: &str| format!("namespace=\"{}\",name=\"{name}\"", ns.name);
    let text = wait_for("the connections in /metrics", READY, || {
        let text = http_get(port, "/metrics").1;
        text.contains("reason=\"SecretNotFound\"")
            .then_some(text.clone())
            .ok_or(text)
    });
    // promtool's lint: names, units, `_total` on counters.
    let promtool =
        std::env::var("TOKENKEEPER_PROMTOOL").expect("TOKENKEEPER_PROMTOOL is set by tests/run.sh");
    let mut lint = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut lint.stdin.take().unwrap(),
        prometheus_text(&text).as_bytes(),
    )
    .unwrap();
    let linted = lint.wait_with_output().unwrap();
    assert!(
        linted.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    let expiry: Timestamp = ns
        .secret_value("crm-credentials", "expires_at")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        metric(
            &text,
            &format!(
                "tokenkeeper_connection_token_expiry_timestamp_seconds{{{}}}",
                labels("crm")
            )
        ),
        Some(expiry.as_second() as f64),
        "{text}"
    );
    assert!(
        metric(
            &text,
            &format!(
                "tokenkeeper_connection_next_refresh_timestamp_seconds{{{}}}",
                labels("crm")
            )
        )
        .is_some()
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "tokenkeeper_connection_condition{{{},condition=\"Ready\",status=\"False\",reason=\"SecretNotFound\"}}",
                labels("broken")
            )
        ),
        Some(1.0),
        "{text}"
    );
    let host = format!("127.0.0.1:{}", server.port);
    assert_eq!(
        metric(
            &text,
            &format!("tokenkeeper_token_requests_total{{host=\"{host}\",result=\"success\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "tokenkeeper_reconcile_duration_seconds_count").unwrap() >= 2.0);

    // The values move with the connections.
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "nowhere",
        "--from-literal=api_key=k",
    ]);
    ns.wait_ready("broken", "True", "SecretSynced", READY);
    ns.kubectl_ok(&["delete", "srcconn", "crm"]);
    wait_for("series of the deleted connection to go", READY, || {
        let text = http_get(port, "/metrics").1;
        let gone = !text.contains(&labels("crm"));
        let healed = text.contains(&format!(
            "tokenkeeper_connection_condition{{{},condition=\"Ready\",status=\"True\",reason=\"SecretSynced\"}} 1",
            labels("broken")
        ));
        let stale = text.contains("reason=\"SecretNotFound\"} 1\n")
            && text.contains("condition=\"Ready\",status=\"False\"");
        (gone && healed && !stale).then_some(()).ok_or(text)
    });
}

#[test]
fn the_plain_manifests_are_rendered_from_the_chart() {
    let out = Command::new(format!("{REPO}/deploy/manifests/render.sh"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let committed =
        std::fs::read_to_string(format!("{REPO}/deploy/manifests/tokenkeeper.yaml")).unwrap();
    assert!(
        stdout(&out) == committed,
        "deploy/manifests is stale: deploy/manifests/render.sh > deploy/manifests/tokenkeeper.yaml"
    );
    let chart_crd = std::fs::read_to_string(format!(
        "{REPO}/charts/tokenkeeper/files/sourceconnection.yaml"
    ))
    .unwrap();
    let crd = std::fs::read_to_string(format!("{REPO}/crds/sourceconnection.yaml")).unwrap();
    assert!(
        chart_crd == crd,
        "the chart's CRD differs from crds/: cp crds/sourceconnection.yaml charts/tokenkeeper/files/"
    );
}

#[test]
fn the_chart_lints_renders_every_option_and_installs_with_least_privilege() {
    let helm = common::helm();
    let chart = format!("{REPO}/charts/tokenkeeper");
    let out = Command::new(&helm).args(["lint", &chart]).output().unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // Artifact Hub's metadata agrees with the chart: its CRD, its image.
    let meta: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{chart}/Chart.yaml")).unwrap())
            .unwrap();
    let values: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{chart}/values.yaml")).unwrap())
            .unwrap();
    let annotation = |key: &str| -> serde_json::Value {
        serde_yaml::from_str(
            meta["annotations"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{key}")),
        )
        .unwrap()
    };
    assert_eq!(
        annotation("artifacthub.io/crds")[0]["name"],
        "sourceconnections.tokenkeeper.dev"
    );
    assert_eq!(
        annotation("artifacthub.io/images")[0]["image"],
        format!(
            "{}:{}",
            values["image"]["repository"].as_str().unwrap(),
            meta["appVersion"].as_str().unwrap()
        )
    );
    assert_eq!(meta["annotations"]["artifacthub.io/license"], "Apache-2.0");

    let everything = Command::new(&helm)
        .args(["template", "tk", &chart, "--namespace", "ops"])
        .args([
            "--set",
            "prometheusRule.enabled=true,metrics.serviceMonitor.enabled=true",
        ])
        .args([
            "--set",
            "podDisruptionBudget.enabled=true,networkPolicy.enabled=true",
        ])
        .args(["--set", "networkPolicy.apiServerCIDRs={10.0.0.1/32}"])
        .args([
            "--set-json",
            r#"networkPolicy.authorizationFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ingress"}}}]"#,
        ])
        .args(["--set", "watchNamespaces={team-a,team-b}"])
        .args([
            "--set",
            "limits.tokenRequestsPerSecond=50,limits.concurrentReconciles=8",
        ])
        // --set makes 2.5 a string; a values file or --set-json keeps it a number.
        .args(["--set-json", "limits.eventQPS=2.5"])
        .output()
        .unwrap();
    assert!(everything.status.success(), "{}", stderr(&everything));
    let rendered = stdout(&everything);
    for arg in [
        "--token-requests-per-second=50",
        "--max-concurrent-token-requests=32",
        "--concurrent-reconciles=8",
        "--event-qps=2.5",
        "--event-burst=100",
        "--min-refresh-interval-seconds=30",
        "--refresh-propagation-margin-seconds=120",
        "--max-token-lifetime-seconds=31536000",
        "--max-retry-after-seconds=3600",
    ] {
        assert!(rendered.contains(arg), "{arg} missing");
    }
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "CustomResourceDefinition",
    ] {
        assert!(
            rendered.contains(&format!("kind: {kind}")),
            "{kind} missing"
        );
    }
    assert!(
        !rendered.contains("kind: ClusterRole"),
        "watchNamespaces uses Roles only"
    );
    assert_eq!(
        rendered.matches("\nkind: Role\n").count(),
        4,
        "two watched namespaces, the leader lease and the sealing key"
    );
    for hardening in [
        "runAsNonRoot: true",
        "type: RuntimeDefault",
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
        "- ALL",
    ] {
        assert!(rendered.contains(hardening), "{hardening}");
    }
    assert!(rendered.contains("helm.sh/resource-policy: keep"));
    // The authorization port admits only the peers given.
    let policy = rendered
        .split("\n---")
        .find(|doc| doc.contains("kind: NetworkPolicy"))
        .unwrap();
    assert!(
        policy.contains("from:\n        - namespaceSelector:\n            matchLabels:\n              kubernetes.io/metadata.name: ingress"),
        "{policy}"
    );
    let invalid = Command::new(&helm)
        .args(["template", "tk", &chart, "--set", "logFormat=yaml"])
        .output()
        .unwrap();
    assert!(
        !invalid.status.success(),
        "values.schema.json refuses an unknown log format"
    );
    let no_token_requests = Command::new(&helm)
        .args([
            "template",
            "tk",
            &chart,
            "--set",
            "limits.tokenRequestsPerSecond=0",
        ])
        .output()
        .unwrap();
    assert!(
        !no_token_requests.status.success(),
        "values.schema.json refuses a token request rate of zero"
    );

    // helm install on a control plane of this test's own (it installs the CRD).
    let plane = OwnControlPlane::start("helm");
    let kubeconfig = plane.kubeconfig();
    let install = Command::new(&helm)
        .args([
            "install",
            "tokenkeeper",
            &chart,
            "--namespace",
            "tokenkeeper",
            "--create-namespace",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(install.status.success(), "{}", stderr(&install));
    plane.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/sourceconnections.tokenkeeper.dev",
    ]);
    let keep = plane.kubectl_ok(&[
        "get",
        "crd",
        "sourceconnections.tokenkeeper.dev",
        "-o",
        "jsonpath={.metadata.annotations.helm\\.sh/resource-policy}",
    ]);
    assert_eq!(keep, "keep");

    // What the ServiceAccount may do, as `kubectl auth can-i --list` shows it.
    let sa = "system:serviceaccount:tokenkeeper:tokenkeeper";
    let can = plane.kubectl_ok(&["auth", "can-i", "--list", "--as", sa, "-n", "default"]);
    eprintln!("kubectl auth can-i --list --as {sa}:\n{can}");
    let row = |resource: &str| {
        can.lines()
            .find(|l| l.split_whitespace().next() == Some(resource))
            .unwrap_or_else(|| panic!("{resource} in\n{can}"))
            .to_owned()
    };
    assert!(
        row("secrets").ends_with("[get list watch create patch delete]"),
        "no update on Secrets: {can}"
    );
    assert!(
        row("events.events.k8s.io").ends_with("[create patch]"),
        "{can}"
    );
    assert!(
        row("sourceconnections.tokenkeeper.dev").ends_with("[get list watch patch]"),
        "{can}"
    );
    assert!(
        can.matches("delete").count() == 1 && !can.contains("[*]"),
        "delete on Secrets only, no wildcard:\n{can}"
    );
    let leases = plane.kubectl_ok(&["auth", "can-i", "--list", "--as", sa, "-n", "tokenkeeper"]);
    assert!(
        row_in(&leases, "leases.coordination.k8s.io").ends_with("[get create update]"),
        "{leases}"
    );

    // No kubelet here: run the operator as the Deployment says, with a
    // token of the chart's ServiceAccount.
    let args = plane.deployed_args();
    assert!(args.contains(&"--leader-elect".to_owned()), "{args:?}");
    let operator = plane.run_operator_as_deployed("helm", &[]);
    plane.kubectl_ok(&["create", "namespace", "extract"]);
    let apply = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "apply",
            "-n",
            "extract",
            "-f",
            &format!("{REPO}/deploy/examples/basic-postgres.yaml"),
        ])
        .output()
        .unwrap();
    assert!(apply.status.success(), "{}", stderr(&apply));
    wait_for(
        "the example to become Ready through the installed operator",
        READY,
        || {
            let ready = plane.kubectl_ok(&[
                "get",
                "srcconn",
                "warehouse-db",
                "-n",
                "extract",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
            ]);
            (ready == "SecretSynced").then_some(()).ok_or(ready)
        },
    );
    let holder = plane.kubectl_ok(&[
        "get",
        "lease",
        "tokenkeeper-leader",
        "-n",
        "tokenkeeper",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "tokenkeeper-helm");
    let logs = operator.logs();
    let first_json_line = logs.lines().next().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(first_json_line).is_ok(),
        "--log-format=json: {first_json_line}"
    );
}

fn row_in(listing: &str, resource: &str) -> String {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(resource))
        .unwrap_or_else(|| panic!("{resource} in\n{listing}"))
        .to_owned()
}

/// The admin kubeconfig of the tests, changed as `edit` says, as JSON.
fn admin_kubeconfig_variant(edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let text = common::kubectl_ok(&[
        "config",
        "view",
        "--minify",
        "--raw",
        "--flatten",
        "-o",
        "json",
    ]);
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config["clusters"][0]["cluster"]);
    config
}

#[test]
fn the_operator_identity_keeps_the_connection_settings_of_the_users_kubeconfig() {
    let ns = TestNamespace::new("identity");
    ns.apply_ok(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: api-key\nstringData:\n  api_key: k-1\n",
    );
    ns.apply_ok(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: api\n\
         spec:\n  apiKey:\n    secretRef:\n      name: api-key\n",
    );
    let variants = [
        (
            "insecure-skip-tls-verify",
            admin_kubeconfig_variant(|cluster| {
                let map = cluster.as_object_mut().unwrap();
                map.remove("certificate-authority-data");
                map.insert("insecure-skip-tls-verify".into(), json!(true));
            }),
        ),
        (
            "tls-server-name",
            // The certificate names kubernetes and 127.0.0.1, not
            // localhost: only a client that verifies against
            // tls-server-name gets through.
            admin_kubeconfig_variant(|cluster| {
                let server = cluster["server"]
                    .as_str()
                    .unwrap()
                    .replace("127.0.0.1", "localhost");
                cluster["server"] = json!(server);
                cluster["tls-server-name"] = json!("kubernetes");
            }),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, admin) in variants {
        let admin_path = dir.path().join(format!("{name}.admin.kubeconfig"));
        std::fs::write(&admin_path, admin.to_string()).unwrap();
        let identity = dir.path().join(format!("{name}.operator.kubeconfig"));
        let out = Command::new(format!("{REPO}/tests/cluster/operator-identity.sh"))
            .arg(&admin_path)
            .arg(&identity)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&identity).unwrap()).unwrap();
        let cluster = &written["clusters"][0]["cluster"];
        for (key, value) in admin["clusters"][0]["cluster"].as_object().unwrap() {
            assert_eq!(&cluster[key], value, "{name}: {key} carried over");
        }
        let mut operator = Operator::start_on(&identity, &ns.name, &[]);
        // A new value in the source Secret reaches the target only through
        // this operator.
        let key = format!("k-{name}");
        ns.kubectl_ok(&[
            "patch",
            "secret",
            "api-key",
            "-p",
            &format!(r#"{{"stringData":{{"api_key":"{key}"}}}}"#),
        ]);
        wait_for(&format!("{name}: the target Secret"), READY, || {
            let value = ns.secret_value("api-credentials", "api_key");
            (value.as_deref() == Some(key.as_str()))
                .then_some(())
                .ok_or(format!("{value:?}"))
        });
        let status = operator.stop();
        assert!(status.success(), "{name}: {}", operator.logs());
    }
}

/// A kubeconfig for ServiceAccount `account` of `namespace`: the test
/// cluster's entry with a token of that account as the only credential.
fn service_account_kubeconfig(namespace: &str, account: &str) -> std::path::PathBuf {
    let token = common::kubectl_ok(&["create", "token", account, "-n", namespace]);
    let view = admin_kubeconfig_variant(|_| {});
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": view["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token.trim()}}],
        "contexts": [{"name": account, "context": {"cluster": "cluster", "user": account}}],
        "current-context": account,
    });
    let path = common::artifacts_dir().join(format!("{namespace}-{account}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

/// The chart's namespaced mode (watchNamespaces), installed as Helm renders
/// it: the operator serves the namespaces it watches and cannot read or
/// write Secrets anywhere else.
#[test]
fn the_namespaced_mode_serves_its_namespaces_only() {
    let home = TestNamespace::new("nsmode-home");
    let watched = TestNamespace::new("nsmode-watched");
    let other = TestNamespace::new("nsmode-other");
    let rendered = Command::new(common::helm())
        .args([
            "template",
            "tk-nsmode",
            &format!("{REPO}/charts/tokenkeeper"),
        ])
        .args(["--namespace", &home.name, "--set", "crds.install=false"])
        .args(["--set", &format!("watchNamespaces={{{}}}", watched.name)])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", common::stderr(&rendered));
    let manifest = String::from_utf8(rendered.stdout).unwrap();
    assert!(
        !manifest.contains("kind: ClusterRole"),
        "namespaced mode grants nothing cluster-wide"
    );
    // Every object of the chart names its namespace.
    let applied = common::kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(applied.status.success(), "{}", common::stderr(&applied));
    let account = "tk-nsmode-tokenkeeper";
    let user = format!("system:serviceaccount:{}:{account}", home.name);
    for (namespace, expected) in [(&watched.name, "yes"), (&other.name, "no")] {
        let can = common::kubectl(&[
            "auth", "can-i", "get", "secrets", "-n", namespace, "--as", &user,
        ]);
        assert_eq!(
            common::stdout(&can).trim(),
            expected,
            "get secrets in {namespace}"
        );
    }
    let kubeconfig = service_account_kubeconfig(&home.name, account);
    let _operator = Operator::start_on(
        &kubeconfig,
        &watched.name,
        &[
            "--leader-election-namespace",
            &home.name,
            "--require-source-label",
        ],
    );
    for ns in [&watched, &other] {
        ns.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "stripe-api",
            "--from-literal=api_key=sk_test",
        ]);
        ns.kubectl_ok(&[
            "label",
            "secret",
            "stripe-api",
            "tokenkeeper.dev/source=true",
        ]);
        ns.apply_ok(
            "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: stripe\nspec:\n  \
             apiKey:\n    secretRef:\n      name: stripe-api\n",
        );
    }
    watched.wait_ready("stripe", "True", "SecretSynced", READY);
    assert!(
        home.jsonpath("secret", "tokenkeeper-sealing-key", "{.metadata.name}")
            == "tokenkeeper-sealing-key",
        "the sealing key lives in the release namespace"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(other.jsonpath("srcconn", "stripe", "{.status}"), "");
    assert_eq!(other.secret_value("stripe-credentials", "api_key"), None);
}

/// The pods of `deploy/examples/extraction-*.yaml` read the target Secret
/// as files of a volume (a refreshed token reaches them), never through an
/// environment variable or a subPath mount (which keep the first token).
#[test]
fn the_extraction_examples_read_the_secret_as_files() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::CronJob;
    use k8s_openapi::api::core::v1::PodSpec;
    let read = |file: &str| {
        std::fs::read_to_string(format!("{REPO}/deploy/examples/{file}")).expect("example exists")
    };
    let checked = |spec: &PodSpec, file: &str| {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| {
                v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                    == Some("salesforce-preset-credentials")
            })
            .unwrap_or_else(|| panic!("{file}: the target Secret as a volume"));
        for container in &spec.containers {
            let mount = container
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == volume.name)
                .unwrap_or_else(|| panic!("{file}: {} mounts it", container.name));
            assert!(mount.sub_path.is_none(), "{file}: no subPath");
            let from_secret = container.env.iter().flatten().any(|e| {
                e.value_from
                    .as_ref()
                    .is_some_and(|v| v.secret_key_ref.is_some())
            });
            assert!(!from_secret, "{file}: no token in an environment variable");
        }
    };
    let deployment: Deployment = serde_yaml::from_str(&read("extraction-deployment.yaml")).unwrap();
    checked(
        deployment.spec.unwrap().template.spec.as_ref().unwrap(),
        "extraction-deployment.yaml",
    );
    let cronjob: CronJob = serde_yaml::from_str(&read("extraction-cronjob.yaml")).unwrap();
    let job = cronjob.spec.unwrap().job_template.spec.unwrap();
    checked(
        job.template.spec.as_ref().unwrap(),
        "extraction-cronjob.yaml",
    );
    // The API server here serves Deployments: check it there too (batch/v1
    // CronJob needs 1.21; the typed parse above is its check).
    let ns = TestNamespace::new("extraction-examples");
    let path = format!("{REPO}/deploy/examples/extraction-deployment.yaml");
    let out = ns.kubectl(&["apply", "--dry-run=server", "-f", &path]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The krew manifest that `deploy/krew/package.sh` writes names an archive
/// that exists, with its sha256, holding the plugin and the license, and
/// has the fields krew requires.
#[test]
fn the_krew_manifest_names_the_packaged_plugin() {
    let out = tempfile::tempdir().unwrap();
    let made = Command::new(format!("{REPO}/deploy/krew/package.sh"))
        .arg(env!("CARGO_BIN_EXE_kubectl-tokenkeeper"))
        .arg(out.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let path = String::from_utf8(made.stdout).unwrap();
    let manifest: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path.trim()).unwrap()).unwrap();
    assert_eq!(
        manifest["apiVersion"],
        "krew.googlecontainertools.github.com/v1alpha2"
    );
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["metadata"]["name"], "tokenkeeper");
    let spec = &manifest["spec"];
    let version = spec["version"].as_str().unwrap();
    assert!(
        version.starts_with('v') && version[1..].split('.').count() == 3,
        "{version}"
    );
    for field in ["homepage", "shortDescription"] {
        assert!(
            spec[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}"
        );
    }
    let platform = &spec["platforms"][0];
    assert_eq!(platform["bin"], "kubectl-tokenkeeper");
    assert_eq!(platform["selector"]["matchLabels"]["os"], "linux");
    let uri = platform["uri"].as_str().unwrap();
    let archive = uri.strip_prefix("file://").expect("a local archive");
    let bytes = std::fs::read(archive).unwrap();
    let sha = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(platform["sha256"], sha.as_str());
    let listed = Command::new("tar")
        .args(["-tzf", archive])
        .output()
        .unwrap();
    let names = String::from_utf8(listed.stdout).unwrap();
    assert!(
        names.lines().any(|l| l == "kubectl-tokenkeeper") && names.lines().any(|l| l == "LICENSE"),
        "{names}"
    );
}

/// OpenMetrics text (what /metrics serves) as the Prometheus text format
/// that promtool's lint reads: a counter family's HELP and TYPE name its
/// samples (`…_total`), and OpenMetrics' `# UNIT` and `# EOF` lines go.
fn prometheus_text(open_metrics: &str) -> String {
    let counters: Vec<String> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .map(str::to_owned)
        .collect();
    open_metrics
        .lines()
        .filter(|l| !l.starts_with("# UNIT ") && *l != "# EOF")
        .map(|line| {
            for family in &counters {
                for kind in ["# HELP ", "# TYPE "] {
                    if let Some(rest) = line.strip_prefix(&format!("{kind}{family} ")) {
                        return format!("{kind}{family}_total {rest}\n");
                    }
                }
            }
            format!("{line}\n")
        })
        .collect()
}
