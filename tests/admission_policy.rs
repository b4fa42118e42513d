//! The chart's optional ValidatingAdmissionPolicy (`admissionPolicy.enabled`),
//! which lets tokenkeeper's ServiceAccount write only Opaque Secrets labelled
//! `app.kubernetes.io/managed-by: tokenkeeper` and change or delete no Secret
//! that was not labelled so before.
//!
//! Only its shape is tested here, not what it does: ValidatingAdmissionPolicy
//! needs Kubernetes >= 1.30 and the test control plane is 1.20, so no API
//! server in this test suite has ever accepted or enforced the policy.
//! Checked: kubectl reads the rendered objects as a ValidatingAdmissionPolicy
//! and its binding; every field belongs to the admissionregistration.k8s.io/v1
//! API types (a round trip through k8s-openapi's types keeps everything); and
//! the parts that make it safe are there (the ServiceAccount it matches, the
//! operations, the Opaque and label checks on the new and the old object,
//! Deny). On a control plane that serves the kind (`tests/run.sh
//! --use-current-cluster` against Kubernetes >= 1.30) the API server also
//! validates it in a server-side dry run.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const LABEL: &str = "app.kubernetes.io/managed-by";
const POLICY_TEMPLATE: &str = "templates/admissionpolicy.yaml";

fn helm() -> String {
    std::env::var("TOKENKEEPER_HELM").expect("TOKENKEEPER_HELM is set by tests/run.sh")
}

fn chart() -> String {
    format!("{REPO}/charts/tokenkeeper")
}

/// `helm template tk <chart> --namespace ops ARGS`.
fn helm_template(args: &[&str]) -> Output {
    Command::new(helm())
        .args(["template", "tk", &chart(), "--namespace", "ops"])
        .args(args)
        .output()
        .expect("run helm")
}

/// What `helm template` renders with `args`; panics with helm's error when
/// it fails.
fn render(args: &[&str]) -> String {
    let out = helm_template(args);
    assert!(
        out.status.success(),
        "helm template {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// The rendered documents as JSON values (documents holding only comments
/// left out).
fn documents(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---")
        .map(|doc| doc.trim_start_matches("---"))
        .filter(|doc| {
            doc.lines().any(|line| {
                let line = line.trim();
                !line.is_empty() && !line.starts_with('#')
            })
        })
        .map(|doc| {
            serde_yaml::from_str::<Value>(doc)
                .unwrap_or_else(|error| panic!("helm rendered invalid YAML ({error}):\n{doc}"))
        })
        .collect()
}

/// The one document of `kind`.
fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|doc| doc["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected, found {found:#?}");
    found[0]
}

/// Fails unless `doc` is exactly a `T`: a key that `T` does not have (a
/// misspelt or misplaced field), a value of the wrong type or another
/// apiVersion or kind makes the round trip fail or lose something.
fn assert_round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
    let name = std::any::type_name::<T>();
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|error| panic!("not a {name}: {error}\n{doc:#}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_eq!(
        back, *doc,
        "{name} does not keep every field of the rendered object (left: after the round trip)"
    );
}

/// `kubectl ARGS` with `input` on its standard input.
fn kubectl_with_input(args: &[&str], input: &str) -> Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("kubectl's stdin")
        .write_all(input.as_bytes())
        .expect("write to kubectl");
    child.wait_with_output().expect("wait for kubectl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whitespace collapsed, so that line breaks in the template do not matter.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The CEL test that `object` (`object` or `oldObject`) carries the label.
fn labelled(object: &str) -> String {
    format!(
        "(has({object}.metadata.labels) && '{LABEL}' in {object}.metadata.labels && \
         {object}.metadata.labels['{LABEL}'] == 'tokenkeeper')"
    )
}

#[test]
fn the_admission_policy_confines_the_service_account_to_its_own_opaque_secrets() {
    let lint = Command::new(helm())
        .args(["lint", &chart(), "--set", "admissionPolicy.enabled=true"])
        .output()
        .expect("run helm");
    assert!(
        lint.status.success(),
        "{}{}",
        text(&lint.stdout),
        text(&lint.stderr)
    );
    let rendered = render(&["--set", "admissionPolicy.enabled=true"]);
    let docs = documents(&rendered);
    let policy = only(&docs, "ValidatingAdmissionPolicy");
    let binding = only(&docs, "ValidatingAdmissionPolicyBinding");
    assert_round_trips::<ValidatingAdmissionPolicy>(policy);
    assert_round_trips::<ValidatingAdmissionPolicyBinding>(binding);

    // kubectl reads them as the two kinds (offline: the 1.20 control plane's
    // discovery does not know them, so `kubectl apply --dry-run=client`
    // cannot map them there).
    let alone = render(&[
        "--set",
        "admissionPolicy.enabled=true",
        "--show-only",
        POLICY_TEMPLATE,
    ]);
    let read = kubectl_with_input(
        &[
            "--kubeconfig",
            "/dev/null",
            "label",
            "--local",
            "--dry-run=client",
            "-o",
            "name",
            "-f",
            "-",
            "shape=checked",
        ],
        &alone,
    );
    assert!(read.status.success(), "kubectl: {}", text(&read.stderr));
    let listed = text(&read.stdout);
    let names: Vec<&str> = listed.lines().collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].starts_with("validatingadmissionpolic")
            && !names[0].contains("binding")
            && names[0].ends_with(".admissionregistration.k8s.io/tk-tokenkeeper-secrets"),
        "{names:?}"
    );
    assert!(
        names[1].starts_with("validatingadmissionpolicybinding")
            && names[1].ends_with(".admissionregistration.k8s.io/tk-tokenkeeper-secrets"),
        "{names:?}"
    );

    // Only the operator's ServiceAccount is matched, on every write of a
    // Secret in any namespace, and a policy that cannot be evaluated refuses.
    let spec = &policy["spec"];
    assert_eq!(spec["failurePolicy"], "Fail");
    assert_eq!(
        spec["matchConditions"],
        json!([{
            "name": "tokenkeeper-service-account",
            "expression": "request.userInfo.username == 'system:serviceaccount:ops:tk-tokenkeeper'"
        }])
    );
    assert_eq!(
        spec["matchConstraints"],
        json!({"resourceRules": [{
            "apiGroups": [""],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE", "DELETE"],
            "resources": ["secrets"]
        }]}),
        "all Secrets, no selector that would leave some out"
    );

    // The checks: Opaque and the label on what is written (CREATE, UPDATE),
    // the label on what was there (UPDATE, DELETE). In CEL `object` is null
    // on DELETE and `oldObject` on CREATE, hence the operation guards.
    let validations = spec["validations"].as_array().expect("validations");
    let expressions: Vec<String> = validations
        .iter()
        .map(|v| words(v["expression"].as_str().expect("an expression")))
        .collect();
    assert_eq!(
        expressions,
        [
            "request.operation == 'DELETE' || object.type == 'Opaque'".to_owned(),
            format!("request.operation == 'DELETE' || {}", labelled("object")),
            format!("request.operation == 'CREATE' || {}", labelled("oldObject")),
        ]
    );
    // Each refusal says what was refused and why.
    let label = format!("{LABEL}=tokenkeeper");
    for (validation, why) in validations
        .iter()
        .zip(["Opaque", label.as_str(), label.as_str()])
    {
        assert_eq!(validation["reason"], "Forbidden", "{validation:#}");
        let message = words(validation["message"].as_str().expect("a message"));
        assert!(
            message.starts_with("Refused") && message.contains(why),
            "{message}"
        );
        let dynamic = words(
            validation["messageExpression"]
                .as_str()
                .expect("a messageExpression"),
        );
        for part in [
            "'Refused '",
            "request.operation",
            "request.namespace",
            "request.name",
            why,
        ] {
            assert!(dynamic.contains(part), "{part} missing in {dynamic}");
        }
    }

    // The binding enforces it for every matched request.
    assert_eq!(
        binding["spec"],
        json!({"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]})
    );
    assert_eq!(policy["metadata"]["name"], "tk-tokenkeeper-secrets");

    // The ServiceAccount matched is the one the operator runs as.
    for (values, user) in [
        (
            "admissionPolicy.enabled=true,serviceAccount.name=keeper",
            "system:serviceaccount:ops:keeper",
        ),
        (
            "admissionPolicy.enabled=true,serviceAccount.create=false,serviceAccount.name=existing",
            "system:serviceaccount:ops:existing",
        ),
    ] {
        let docs = documents(&render(&["--set", values]));
        let policy = only(&docs, "ValidatingAdmissionPolicy");
        assert_eq!(
            policy["spec"]["matchConditions"][0]["expression"],
            format!("request.userInfo.username == '{user}'"),
            "{values}"
        );
    }

    // values.schema.json knows the value.
    for values in ["admissionPolicy.enable=true", "admissionPolicy.enabled=yes"] {
        assert!(
            !helm_template(&["--set", values]).status.success(),
            "values.schema.json refuses {values}"
        );
    }

    // A control plane that serves the kind validates the objects, CEL
    // included; the 1.20 one of tests/run.sh does not.
    if let Ok(kubeconfig) = std::env::var("TOKENKEEPER_TEST_KUBECONFIG") {
        let resources = kubectl_with_input(
            &[
                "--kubeconfig",
                &kubeconfig,
                "api-resources",
                "--api-group",
                "admissionregistration.k8s.io",
                "-o",
                "name",
            ],
            "",
        );
        assert!(
            resources.status.success(),
            "kubectl api-resources: {}",
            text(&resources.stderr)
        );
        if text(&resources.stdout)
            .lines()
            .any(|line| line.starts_with("validatingadmissionpolicies."))
        {
            let dry_run = kubectl_with_input(
                &[
                    "--kubeconfig",
                    &kubeconfig,
                    "apply",
                    "--dry-run=server",
                    "--validate=strict",
                    "-f",
                    "-",
                ],
                &alone,
            );
            assert!(
                dry_run.status.success(),
                "the API server refuses the policy: {}",
                text(&dry_run.stderr)
            );
        } else {
            eprintln!(
                "the control plane under test does not serve ValidatingAdmissionPolicy \
                 (Kubernetes < 1.30): the policy was not sent to an API server"
            );
        }
    }
}

#[test]
fn the_admission_policy_is_off_by_default() {
    let runs: [&[&str]; 2] = [&[], &["--set", "admissionPolicy.enabled=false"]];
    for args in runs {
        let rendered = render(args);
        assert!(
            !rendered.contains("ValidatingAdmissionPolicy"),
            "{args:?} renders a policy"
        );
        let docs = documents(&rendered);
        assert!(!docs.is_empty(), "the chart renders");
        assert!(
            docs.iter()
                .all(|doc| doc["apiVersion"] != "admissionregistration.k8s.io/v1"),
            "{args:?}"
        );
    }
}
