//! The chart's Grafana dashboard: a ConfigMap Grafana's sidecar picks up
//! (off by default), and every PromQL expression in it evaluated by
//! promtool against series recorded from a live operator — a healthy
//! connection, a revoked grant and a missing Secret — with the labels a
//! ServiceMonitor scrape adds, so a misspelt metric or label returns
//! nothing and fails here.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{OAuthServer, Operator, TestNamespace, http_get, stderr, stdout, wait_for};
use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const READY: Duration = Duration::from_secs(30);
/// What Grafana puts in for its variables when the expressions run.
const RATE_INTERVAL: &str = "5m";

fn helm_template(args: &[&str]) -> String {
    let helm = common::helm();
    let out = Command::new(helm)
        .args(["template", "tk", &format!("{REPO}/charts/tokenkeeper")])
        .args(["--namespace", "monitoring-test"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// The dashboard as the chart ships it, from the rendered ConfigMap.
fn shipped_dashboard() -> Value {
    assert!(
        !helm_template(&[]).contains("grafana_dashboard"),
        "the dashboard is off by default"
    );
    let rendered = helm_template(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Operators",
        "--show-only",
        "templates/grafana-dashboard.yaml",
    ]);
    let config_map: Value = serde_yaml::from_str(&rendered).unwrap();
    assert_eq!(config_map["kind"], "ConfigMap");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        config_map["metadata"]["annotations"]["grafana_folder"],
        "Operators"
    );
    serde_json::from_str(config_map["data"]["tokenkeeper.json"].as_str().unwrap())
        .expect("the dashboard is JSON")
}

/// Each panel's title and its expressions, Grafana's variables put in.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            found.push((
                panel["title"].as_str().unwrap().to_owned(),
                expr.replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$namespace", ".*"),
            ));
        }
    }
    found
}

/// The live scrape's samples as promtool input series over ten minutes,
/// with the target labels a ServiceMonitor with honorLabels adds:
/// counters grow by their value each minute, gauges stay.
fn input_series(scrape: &str) -> Vec<Value> {
    let counters: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            matches!(kind, "counter" | "histogram").then_some(name)
        })
        .collect();
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok().filter(|v: &f64| v.is_finite())?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}').to_owned()),
                None => (series, String::new()),
            };
            let mut labels: Vec<String> = labels
                .split("\",")
                .filter(|l| !l.is_empty())
                .map(|l| format!("{}\"", l.trim_end_matches('"')))
                .collect();
            labels.extend([
                r#"job="tokenkeeper""#.to_owned(),
                r#"instance="10.0.0.7:8080""#.to_owned(),
                r#"pod="tokenkeeper-5d8f7-x2x9k""#.to_owned(),
            ]);
            if !labels.iter().any(|l| l.starts_with("namespace=")) {
                labels.push(r#"namespace="tokenkeeper""#.to_owned());
            }
            let counter = counters.iter().any(|c| name.starts_with(c));
            let values = if counter {
                format!("0+{value}x10")
            } else {
                format!("{value}+0x10")
            };
            Some(json!({"series": format!("{name}{{{}}}", labels.join(",")), "values": values}))
        })
        .collect()
}

/// A live operator with a Ready connection, a revoked grant and a missing
/// Secret: its /metrics text, and the namespace.
fn live_scrape() -> (String, TestNamespace, OAuthServer, Operator) {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let ns = TestNamespace::new("dashboard");
    let (operator, port) = Operator::with_metrics(&ns);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.put_refresh_token(&server.mint_refresh_token("crm.read"));
    let refresh_token = |name: &str, secret: &str| {
        format!(
            "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
             tokenUrl: {}\n    grant: refreshToken\n    client:\n      secretRef:\n        name: crm-client\n    \
             refreshTokenSecretRef:\n      name: {secret}\n      key: refresh_token\n",
            server.token_url()
        )
    };
    ns.apply_ok(&refresh_token("crm", "crm-grant"));
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "revoked-grant",
        "--from-literal=refresh_token=not-a-grant-of-this-provider",
    ]);
    ns.apply_ok(&refresh_token("revoked", "revoked-grant"));
    ns.apply_ok(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: broken\nspec:\n  apiKey:\n    \
         secretRef:\n      name: nowhere\n",
    );
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    ns.wait_ready("revoked", "False", "InvalidGrant", READY);
    ns.wait_ready("broken", "False", "SecretNotFound", READY);
    let scrape = wait_for("every connection in /metrics", READY, || {
        let text = http_get(port, "/metrics").1;
        let missing: Vec<String> = ["SecretSynced", "InvalidGrant", "SecretNotFound"]
            .iter()
            .map(|r| format!("reason=\"{r}\""))
            .chain(
                [
                    "tokenkeeper_connection_token_expiry_timestamp_seconds{",
                    "tokenkeeper_connection_grant_expiry_timestamp_seconds{",
                    "tokenkeeper_token_request_duration_seconds_bucket{",
                ]
                .map(str::to_owned),
            )
            .filter(|wanted| !text.contains(wanted.as_str()))
            .collect();
        missing
            .is_empty()
            .then_some(text.clone())
            .ok_or_else(|| format!("missing {missing:?} in\n{text}"))
    });
    (scrape, ns, server, operator)
}

#[test]
fn every_dashboard_query_answers_from_the_operators_series() {
    let dashboard = shipped_dashboard();
    let expressions = expressions(&dashboard);
    assert!(expressions.len() >= 10, "{expressions:?}");
    let service_monitor = helm_template(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--show-only",
        "templates/servicemonitor.yaml",
    ]);
    assert!(
        service_monitor.contains("honorLabels: true"),
        "the connections' namespace label survives the scrape: {service_monitor}"
    );

    let (scrape, ns, server, _operator) = live_scrape();
    let not_ready = |name: &str, reason: &str| json!({"labels": format!("{{namespace=\"{}\", name=\"{name}\", reason=\"{reason}\"}}", ns.name), "value": 1});
    let mut checks: Vec<Value> = expressions
        .iter()
        .map(|(_, expr)| {
            json!({"expr": format!("count({expr}) > bool 0"), "eval_time": "10m",
                   "exp_samples": [{"labels": "{}", "value": 1}]})
        })
        .collect();
    // Two panels whose answer is known exactly.
    let (_, listing) = expressions
        .iter()
        .find(|(title, _)| title == "Connections not ready")
        .expect("the panel of connections not ready");
    checks.push(json!({"expr": listing, "eval_time": "10m", "exp_samples": [
        not_ready("broken", "SecretNotFound"),
        not_ready("revoked", "InvalidGrant"),
    ]}));
    let (_, failures) = expressions
        .iter()
        .find(|(title, _)| title == "Refresh failures by host")
        .expect("the panel of refresh failures");
    checks.push(json!({"expr": format!("count({failures}) by (host, result)"), "eval_time": "10m",
        "exp_samples": [{"labels": format!("{{host=\"127.0.0.1:{}\", result=\"InvalidGrant\"}}", server.port), "value": 1}]}));

    let dir = tempfile::tempdir().unwrap();
    // Each expression as a recording rule, so that check rules parses them all.
    let rules = json!({"groups": [{"name": "dashboard", "rules": expressions.iter().enumerate().map(|(i, (_, expr))| {
        json!({"record": format!("tokenkeeper:dashboard_panel_{i}:value"), "expr": expr})
    }).collect::<Vec<_>>()}]});
    std::fs::write(dir.path().join("panels.yml"), rules.to_string()).unwrap();
    let tests = json!({
        "rule_files": ["panels.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series(&scrape), "promql_expr_test": checks}],
    });
    std::fs::write(dir.path().join("panels_test.yml"), tests.to_string()).unwrap();
    let promtool =
        std::env::var("TOKENKEEPER_PROMTOOL").expect("TOKENKEEPER_PROMTOOL is set by tests/run.sh");
    for args in [
        &["check", "rules", "panels.yml"][..],
        &["test", "rules", "panels_test.yml"][..],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}
