//! The chart's alert rules, checked and unit-tested with promtool (from
//! Debian's prometheus package; `tests/tools/install-promtool.sh`): each
//! alert fires after its `for` on a failing series, not on a healthy or
//! recovering one, with the labels and annotations the README documents.
//! No cluster needed.

use std::process::Command;

use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn tool(variable: &str, script: &str) -> String {
    if let Ok(path) = std::env::var(variable) {
        return path;
    }
    let out = Command::new(format!("{REPO}/tests/tools/{script}"))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The PrometheusRule's groups as the chart renders them.
fn rendered_groups() -> Value {
    let helm = tool("TOKENKEEPER_HELM", "install-helm.sh");
    let out = Command::new(helm)
        .args(["template", "tk", &format!("{REPO}/charts/tokenkeeper")])
        .args(["--set", "prometheusRule.enabled=true"])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    rule["spec"].clone()
}

/// The annotation `name` of `alert`, with `labels` put in for
/// `{{ $labels.x }}` as Prometheus does.
fn annotation(groups: &Value, alert: &str, name: &str, labels: &[(&str, &str)]) -> String {
    let rule = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .find(|r| r["alert"] == alert)
        .unwrap_or_else(|| panic!("alert {alert}"));
    let mut text = rule["annotations"][name].as_str().unwrap().to_owned();
    for (label, value) in labels {
        text = text.replace(&format!("{{{{ $labels.{label} }}}}"), value);
    }
    assert!(!text.contains("{{"), "{alert} {name}: {text}");
    text
}

fn promtool(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(tool("TOKENKEEPER_PROMTOOL", "install-promtool.sh"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// One alert's unit test: input series, and at each time the alerts expected.
fn case(series: Value, checks: Value) -> Value {
    json!({"interval": "1m", "input_series": series, "alert_rule_test": checks})
}

#[test]
fn every_alert_fires_after_its_wait_and_only_on_failure() {
    let groups = rendered_groups();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&groups).unwrap(),
    )
    .unwrap();
    let checked = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let conn = [("namespace", "data"), ("name", "crm")];
    let auth_failed = [
        ("namespace", "data"),
        ("name", "crm"),
        ("reason", "InvalidGrant"),
    ];
    let connection_alert = |alert: &str, labels: &[(&str, &str)], severity: &str| {
        let mut expected = json!({"severity": severity});
        for (label, value) in labels {
            expected[*label] = json!(value);
        }
        json!({
            "exp_labels": expected,
            "exp_annotations": {
                "summary": annotation(&groups, alert, "summary", labels),
                "description": annotation(&groups, alert, "description", labels),
            }
        })
    };
    let condition = |name: &str, condition: &str, status: &str, reason: &str, values: &str| {
        json!({
            "series": format!(
                "tokenkeeper_connection_condition{{namespace=\"data\",name=\"{name}\",condition=\"{condition}\",status=\"{status}\",reason=\"{reason}\"}}"
            ),
            "values": values,
        })
    };
    let tests = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            // Rejected for 5 minutes: fires; a healthy connection never.
            case(
                json!([
                    condition("crm", "AuthFailed", "True", "InvalidGrant", "1x15"),
                    condition("ok", "AuthFailed", "False", "NotRejected", "1x15"),
                ]),
                json!([
                    {"eval_time": "4m", "alertname": "TokenkeeperConnectionAuthFailed", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "TokenkeeperConnectionAuthFailed",
                     "exp_alerts": [connection_alert("TokenkeeperConnectionAuthFailed", &auth_failed, "warning")]},
                ]),
            ),
            // A rejection that recovers within its wait never fires.
            case(
                json!([condition("crm", "AuthFailed", "True", "InvalidGrant", "1 1 1 _ _ _ _ _ _ _")]),
                json!([{"eval_time": "8m", "alertname": "TokenkeeperConnectionAuthFailed", "exp_alerts": []}]),
            ),
            // A token 5 minutes from expiry that is not refreshed: fires
            // after 2 minutes; one kept 20 minutes ahead by refreshes never.
            case(
                json!([
                    {"series": "tokenkeeper_connection_token_expiry_timestamp_seconds{namespace=\"data\",name=\"crm\"}", "values": "300x10"},
                    {"series": "tokenkeeper_connection_token_expiry_timestamp_seconds{namespace=\"data\",name=\"ok\"}", "values": "1200+60x10"},
                ]),
                json!([
                    {"eval_time": "1m", "alertname": "TokenkeeperTokenExpiringSoon", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "TokenkeeperTokenExpiringSoon",
                     "exp_alerts": [connection_alert("TokenkeeperTokenExpiringSoon", &conn, "critical")]},
                ]),
            ),
            // A grant whose end is near.
            case(
                json!([
                    condition("crm", "GrantExpiring", "True", "GrantExpiring", "1x10"),
                    condition("ok", "GrantExpiring", "False", "GrantValid", "1x10"),
                ]),
                json!([
                    {"eval_time": "4m", "alertname": "TokenkeeperGrantExpiring", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "TokenkeeperGrantExpiring",
                     "exp_alerts": [connection_alert("TokenkeeperGrantExpiring", &conn, "warning")]},
                ]),
            ),
            // The sealing key Secret written back: fires at once, for an hour.
            case(
                json!([{"series": "tokenkeeper_sealing_key_restored_total{instance=\"a\"}", "values": "0 0 0 1 1 1 1 1 1 1"}]),
                json!([
                    {"eval_time": "2m", "alertname": "TokenkeeperSealingKeyRestored", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "TokenkeeperSealingKeyRestored",
                     "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "a"},
                        "exp_annotations": {
                            "summary": annotation(&groups, "TokenkeeperSealingKeyRestored", "summary", &[]),
                            "description": annotation(&groups, "TokenkeeperSealingKeyRestored", "description", &[]),
                        }}]},
                ]),
            ),
            // No replica leads for 5 minutes: fires; one leading: never.
            case(
                json!([{"series": "tokenkeeper_leader{instance=\"a\"}", "values": "0x10"}]),
                json!([
                    {"eval_time": "4m", "alertname": "TokenkeeperNoLeader", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "TokenkeeperNoLeader",
                     "exp_alerts": [{"exp_labels": {"severity": "critical"},
                        "exp_annotations": {
                            "summary": annotation(&groups, "TokenkeeperNoLeader", "summary", &[]),
                            "description": annotation(&groups, "TokenkeeperNoLeader", "description", &[]),
                        }}]},
                ]),
            ),
            case(
                json!([{"series": "tokenkeeper_leader{instance=\"a\"}", "values": "1x10"}]),
                json!([{"eval_time": "8m", "alertname": "TokenkeeperNoLeader", "exp_alerts": []}]),
            ),
        ],
    });
    std::fs::write(
        dir.path().join("tests.yaml"),
        serde_yaml::to_string(&tests).unwrap(),
    )
    .unwrap();
    let tested = promtool(&["test", "rules", "tests.yaml"], dir.path());
    assert!(
        tested.status.success(),
        "{}{}",
        String::from_utf8_lossy(&tested.stdout),
        String::from_utf8_lossy(&tested.stderr)
    );
    // What the README promises the annotations say.
    let summary = annotation(
        &groups,
        "TokenkeeperConnectionAuthFailed",
        "summary",
        &auth_failed,
    );
    assert!(summary.contains("data/crm"), "{summary}");
    let fix = annotation(&groups, "TokenkeeperGrantExpiring", "description", &conn);
    assert!(
        fix.contains("kubectl describe srcconn crm -n data"),
        "{fix}"
    );
}
