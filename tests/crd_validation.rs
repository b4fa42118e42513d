//! The CRD's schema refuses obviously bad specs at `kubectl apply`, with a
//! message naming the field, instead of a later `InvalidSpec` (issue 24):
//! URL schemes, duration syntax, Secret name, key and namespace syntax,
//! and the sizes of strings, lists and maps. And it refuses nothing the
//! operator accepts: every spec the API server must take is first checked
//! with the operator's own validation (`decide::validate`), so a case the
//! operator would refuse cannot pass for a proof here.

mod common;

use std::process::Output;
use std::sync::Arc;

use common::{REPO, TestNamespace, kubectl_stdin, stderr, stdout};
use serde_json::{Value, json};
use tokenkeeper::api::SourceConnection;
use tokenkeeper::decide::refresh::{Limits, parse_duration};
use tokenkeeper::decide::validate::{Method, oauth_settings, validate};
use tokenkeeper::oauth::destination::EndpointPolicy;

/// An OAuth 2.0 connection that every rule lets through; each case spoils
/// one field of it.
fn oauth(name: &str) -> Value {
    json!({
        "apiVersion": "tokenkeeper.dev/v1alpha1",
        "kind": "SourceConnection",
        "metadata": {"name": name},
        "spec": {"oauth2": {
            "tokenUrl": "https://login.example.test/services/oauth2/token",
            "grant": "clientCredentials",
            "client": {"secretRef": {"name": "crm-client"}},
        }},
    })
}

/// `oauth(name)` with `edit` applied to its `spec`.
fn spoiled(name: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut connection = oauth(name);
    edit(&mut connection["spec"]);
    connection
}

/// A connection with this `spec`.
fn with_spec(name: &str, spec: Value) -> Value {
    let mut connection = oauth(name);
    connection["spec"] = spec;
    connection
}

fn name_of(connection: &Value) -> &str {
    connection["metadata"]["name"].as_str().unwrap()
}

/// What the operator says of `connection` in namespace `ns`: its spec checks
/// (with plain http to loopback allowed, as in development).
fn operator_verdict(ns: &str, connection: &Value) -> Result<(), String> {
    let mut connection = connection.clone();
    connection["metadata"]["namespace"] = json!(ns);
    let conn: SourceConnection = serde_json::from_value(connection).map_err(|e| e.to_string())?;
    let method = validate(&conn).map_err(|e| e.to_string())?;
    if let Method::OAuth2(oauth) = method {
        let limits = Limits {
            endpoints: Arc::new(EndpointPolicy::new(true, &[])),
            ..Limits::default()
        };
        oauth_settings(oauth, &limits).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `kubectl apply`; with `dry_run`, `--dry-run=server`, which validates as
/// a real apply does and stores nothing.
fn apply(ns: &TestNamespace, connection: &Value, dry_run: bool) -> Output {
    let mut args = vec!["-n", ns.name.as_str(), "apply", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    kubectl_stdin(&args, &connection.to_string())
}

/// The operator accepts `connection`, and so must the API server.
fn assert_accepted(ns: &TestNamespace, connection: &Value) {
    let name = name_of(connection);
    if let Err(error) = operator_verdict(&ns.name, connection) {
        panic!("the operator refuses {name}, so it shows nothing of the schema: {error}");
    }
    let out = apply(ns, connection, true);
    assert!(
        out.status.success(),
        "the API server refused {name}, which the operator accepts: {}\n{connection}",
        stderr(&out)
    );
}

/// Why the API server refuses a value, as its message says it. The words
/// differ between Kubernetes versions (1.20 words them as go-openapi does;
/// later versions as `field.TooLong` and `field.TooMany` do), the bound
/// does not.
#[derive(Clone, Copy, Debug)]
enum Why {
    Pattern,
    TooLong(usize),
    TooMany(usize),
}

impl Why {
    fn said_in(self, error: &str) -> bool {
        let any = |phrases: &[String]| phrases.iter().any(|p| error.contains(p.as_str()));
        match self {
            Why::Pattern => error.contains("should match"),
            Why::TooLong(max) => any(&[
                format!("should be at most {max} chars long"),
                format!("may not be longer than {max}"),
                format!("may not be more than {max} bytes"),
            ]),
            Why::TooMany(max) => any(&[
                format!("should have at most {max} items"),
                format!("should have at most {max} properties"),
                format!("must have at most {max} items"),
            ]),
        }
    }
}

/// `kubectl apply` of `connection` fails, naming `field` (list items may be
/// named by the list or by `list[index]`) and saying `why`.
fn assert_refused(ns: &TestNamespace, connection: &Value, field: &str, why: Why) {
    let name = name_of(connection);
    let out = apply(ns, connection, false);
    let error = stderr(&out);
    assert!(
        !out.status.success(),
        "the API server took {name} (spoiled in {field}): {}",
        stdout(&out)
    );
    let names_field = error.contains(&format!("{field}:")) || error.contains(&format!("{field}["));
    assert!(
        names_field && why.said_in(&error),
        "{name}: the refusal should name {field} and say {why:?}: {error}"
    );
}

/// Nothing of what was refused got stored.
fn assert_nothing_stored(ns: &TestNamespace) {
    let listing = ns.kubectl_ok(&["get", "srcconn", "-o", "name"]);
    assert_eq!(listing.trim(), "", "refused connections were stored");
}

#[test]
fn urls_must_be_http_or_https() {
    let ns = TestNamespace::new("crd-urls");
    let long = format!("https://login.example.test/{}", "a".repeat(2100));
    let cases: Vec<(&str, Value, &str, Why)> = vec![
        (
            "ftp",
            spoiled("ftp", |s| s["oauth2"]["tokenUrl"] = json!("ftp://x")),
            "spec.oauth2.tokenUrl",
            Why::Pattern,
        ),
        (
            "javascript",
            spoiled("javascript", |s| {
                s["oauth2"]["tokenUrl"] = json!("javascript:alert(1)")
            }),
            "spec.oauth2.tokenUrl",
            Why::Pattern,
        ),
        (
            "no-scheme",
            spoiled("no-scheme", |s| {
                s["oauth2"]["tokenUrl"] = json!("login.example.test/token")
            }),
            "spec.oauth2.tokenUrl",
            Why::Pattern,
        ),
        (
            "file",
            spoiled("file", |s| {
                s["oauth2"]["grant"] = json!("authorizationCode");
                s["oauth2"]["authorizationUrl"] = json!("file:///etc/passwd");
            }),
            "spec.oauth2.authorizationUrl",
            Why::Pattern,
        ),
        (
            "gopher",
            spoiled("gopher", |s| {
                s["oauth2"]["revocationUrl"] = json!("gopher://x/revoke")
            }),
            "spec.oauth2.revocationUrl",
            Why::Pattern,
        ),
        (
            "ldap",
            spoiled("ldap", |s| {
                s["oauth2"]["verification"] = json!({"url": "ldap://x/userinfo"})
            }),
            "spec.oauth2.verification.url",
            Why::Pattern,
        ),
        (
            "long-url",
            spoiled("long-url", |s| s["oauth2"]["tokenUrl"] = json!(long)),
            "spec.oauth2.tokenUrl",
            Why::TooLong(2048),
        ),
    ];
    for (_, connection, field, why) in &cases {
        assert_refused(&ns, connection, field, *why);
    }

    let longest = format!("https://login.example.test/{}", "a".repeat(2048 - 27));
    assert_eq!(longest.len(), 2048);
    let good = [
        "https://login.salesforce.com/services/oauth2/token",
        "HTTPS://LOGIN.EXAMPLE.TEST/TOKEN",
        "Https://login.example.test:8443/token?tenant=a&b=c#x",
        "http://127.0.0.1:9400/token",
        "https://[::1]:8443/token",
        "https://bücher.example/token",
        &longest,
    ];
    for (index, url) in good.iter().enumerate() {
        let name = format!("good-url-{index}");
        assert_accepted(
            &ns,
            &spoiled(&name, |s| {
                s["oauth2"]["tokenUrl"] = json!(url);
                s["oauth2"]["revocationUrl"] = json!(url);
                s["oauth2"]["verification"] = json!({"url": url});
            }),
        );
    }
    assert_nothing_stored(&ns);
}

/// Durations the operator's parser takes must pass, in all the forms it
/// takes; texts that are no duration, or never a positive one, must not.
#[test]
fn durations_are_checked_as_the_operator_parses_them() {
    let ns = TestNamespace::new("crd-durations");
    let good = [
        "90s",
        "5m",
        "15m",
        "2h",
        "1h30m",
        "1h 30m",
        "1.5h",
        "5 m",
        "1 hour",
        "10hrs 30mins",
        "10 hours, 30 minutes",
        "1 hour, 59 minutes, 59 seconds, 999 milliseconds",
        "3 mins 34.123 secs",
        "2h 30m 0,123456789s",
        "1s 1.5msecs",
        "500ms",
        "100µs",
        "250us",
        "1h\t30m",
        "5m ",
        "+5m",
        "01:30:00",
        "1:2:3.5",
        "PT5M",
        "pt1h30m",
        "PT1,5H",
        "PT0.5S",
    ];
    for (index, text) in good.iter().enumerate() {
        assert!(
            parse_duration("f", text).is_ok(),
            "{text:?} is not a duration to the operator"
        );
        let name = format!("good-duration-{index}");
        assert_accepted(
            &ns,
            &spoiled(&name, |s| {
                s["oauth2"]["refreshBefore"] = json!(text);
                s["oauth2"]["defaultTokenLifetime"] = json!(text);
            }),
        );
    }

    let bad = [
        "soon",
        "5",
        "1d",
        "1 day",
        "2 weeks",
        "P1D",
        "5M",
        "-5m",
        "5m ago",
        " 5m",
        "5 minutes please",
        "1h; rm -rf /",
        "0x10s",
    ];
    for (index, text) in bad.iter().enumerate() {
        assert!(
            parse_duration("f", text).is_err(),
            "{text:?} is a duration to the operator: the schema may not refuse it"
        );
        let name = format!("bad-duration-{index}");
        let field = if index % 2 == 0 {
            "refreshBefore"
        } else {
            "defaultTokenLifetime"
        };
        assert_refused(
            &ns,
            &spoiled(&name, |s| s["oauth2"][field] = json!(text)),
            &format!("spec.oauth2.{field}"),
            Why::Pattern,
        );
    }
    assert_refused(
        &ns,
        &spoiled("long-duration", |s| {
            s["oauth2"]["refreshBefore"] = json!(format!("1h{}30m", " ".repeat(130)))
        }),
        "spec.oauth2.refreshBefore",
        Why::TooLong(128),
    );
    assert_nothing_stored(&ns);
}

#[test]
fn secret_names_keys_and_namespaces_have_kubernetes_syntax() {
    let ns = TestNamespace::new("crd-names");
    let cases: Vec<(Value, &str, Why)> = vec![
        (
            spoiled("target-name", |s| s["target"] = json!({"name": "Bad_Name"})),
            "spec.target.name",
            Why::Pattern,
        ),
        (
            spoiled("target-dots", |s| s["target"] = json!({"name": "a..b"})),
            "spec.target.name",
            Why::Pattern,
        ),
        (
            spoiled("target-long", |s| {
                s["target"] = json!({"name": "a".repeat(254)})
            }),
            "spec.target.name",
            Why::TooLong(253),
        ),
        (
            spoiled("client-name", |s| {
                s["oauth2"]["client"]["secretRef"]["name"] = json!("crm_client")
            }),
            "spec.oauth2.client.secretRef.name",
            Why::Pattern,
        ),
        (
            spoiled("client-namespace", |s| {
                s["oauth2"]["client"]["secretRef"]["namespace"] = json!("Kube-System")
            }),
            "spec.oauth2.client.secretRef.namespace",
            Why::Pattern,
        ),
        (
            spoiled("client-id-key", |s| {
                s["oauth2"]["client"]["secretRef"]["clientIdKey"] = json!("client id")
            }),
            "spec.oauth2.client.secretRef.clientIdKey",
            Why::Pattern,
        ),
        (
            spoiled("refresh-key", |s| {
                s["oauth2"]["grant"] = json!("refreshToken");
                s["oauth2"]["refreshTokenSecretRef"] =
                    json!({"name": "crm-grant", "key": "refresh/token"});
            }),
            "spec.oauth2.refreshTokenSecretRef.key",
            Why::Pattern,
        ),
        (
            spoiled("response-field", |s| {
                s["oauth2"]["responseFields"] = json!(["instance url"])
            }),
            "spec.oauth2.responseFields",
            Why::Pattern,
        ),
        (
            spoiled("label-value", |s| {
                s["target"] = json!({"labels": {"team": "data platform"}})
            }),
            "spec.target.labels.team",
            Why::Pattern,
        ),
        (
            with_spec(
                "basic-name",
                json!({"basic": {"secretRef": {"name": "Warehouse_Login"}}}),
            ),
            "spec.basic.secretRef.name",
            Why::Pattern,
        ),
        (
            with_spec(
                "basic-key",
                json!({"basic": {"secretRef": {"name": "login", "usernameKey": "user name"}}}),
            ),
            "spec.basic.secretRef.usernameKey",
            Why::Pattern,
        ),
        (
            with_spec(
                "api-key-key",
                json!({"apiKey": {"secretRef": {"name": "stripe", "key": "api key"}}}),
            ),
            "spec.apiKey.secretRef.key",
            Why::Pattern,
        ),
    ];
    for (connection, field, why) in &cases {
        assert_refused(&ns, connection, field, *why);
    }

    let longest = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(longest.len(), 253);
    for (index, target) in ["a", "db-credentials", "a.b-c.d1", "0", &longest]
        .iter()
        .enumerate()
    {
        let name = format!("good-name-{index}");
        assert_accepted(
            &ns,
            &spoiled(&name, |s| {
                s["target"] =
                    json!({"name": target, "labels": {"team": "data-platform", "tier": "0"}});
                s["oauth2"]["client"]["secretRef"]["namespace"] = json!(ns.name);
                s["oauth2"]["client"]["secretRef"]["clientIdKey"] = json!("Client.ID_1");
                s["oauth2"]["responseFields"] = json!(["instance_url", "id-token.v2"]);
            }),
        );
    }
    assert_accepted(
        &ns,
        &with_spec(
            "good-basic",
            json!({"basic": {"secretRef": {"name": "warehouse-db-login", "usernameKey": "user", "passwordKey": "pass"}}}),
        ),
    );
    assert_nothing_stored(&ns);
}

#[test]
fn scopes_parameters_and_maps_are_bounded() {
    let ns = TestNamespace::new("crd-sizes");
    let scopes = |count: usize| json!((0..count).map(|i| format!("scope.{i}")).collect::<Vec<_>>());
    let map = |count: usize| {
        json!(
            (0..count)
                .map(|i| (format!("p{i}"), json!("v")))
                .collect::<serde_json::Map<_, _>>()
        )
    };
    let cases: Vec<(Value, &str, Why)> = vec![
        (
            spoiled("long-scope", |s| {
                s["oauth2"]["scopes"] = json!(["x".repeat(5000)])
            }),
            "spec.oauth2.scopes",
            Why::TooLong(256),
        ),
        (
            spoiled("many-scopes", |s| s["oauth2"]["scopes"] = scopes(100)),
            "spec.oauth2.scopes",
            Why::TooMany(64),
        ),
        (
            spoiled("many-required", |s| {
                s["oauth2"]["requiredScopes"] = scopes(100)
            }),
            "spec.oauth2.requiredScopes",
            Why::TooMany(64),
        ),
        (
            spoiled("many-auth-params", |s| {
                s["oauth2"]["authorizationParams"] = map(100)
            }),
            "spec.oauth2.authorizationParams",
            Why::TooMany(32),
        ),
        (
            spoiled("many-token-params", |s| {
                s["oauth2"]["extraTokenParams"] = map(33)
            }),
            "spec.oauth2.extraTokenParams",
            Why::TooMany(32),
        ),
        (
            spoiled("long-param", |s| {
                s["oauth2"]["extraTokenParams"] = json!({"audience": "x".repeat(5000)})
            }),
            "spec.oauth2.extraTokenParams.audience",
            Why::TooLong(4096),
        ),
        (
            spoiled("many-fields", |s| {
                s["oauth2"]["responseFields"] = scopes(33)
            }),
            "spec.oauth2.responseFields",
            Why::TooMany(32),
        ),
        (
            spoiled("many-labels", |s| s["target"] = json!({"labels": map(33)})),
            "spec.target.labels",
            Why::TooMany(32),
        ),
        (
            spoiled("long-label", |s| {
                s["target"] = json!({"labels": {"team": "a".repeat(64)}})
            }),
            "spec.target.labels.team",
            Why::TooLong(63),
        ),
        (
            spoiled("many-annotations", |s| {
                s["target"] = json!({"annotations": map(33)})
            }),
            "spec.target.annotations",
            Why::TooMany(32),
        ),
        (
            spoiled("long-annotation", |s| {
                s["target"] = json!({"annotations": {"note": "x".repeat(4097)}})
            }),
            "spec.target.annotations.note",
            Why::TooLong(4096),
        ),
    ];
    for (connection, field, why) in &cases {
        assert_refused(&ns, connection, field, *why);
    }
    assert_nothing_stored(&ns);
}

/// A spec with every field set, at every maximum, is stored: the limits
/// include their bounds.
#[test]
fn a_spec_at_every_maximum_is_stored() {
    let ns = TestNamespace::new("crd-maxima");
    let scopes: Vec<String> = (0..64)
        .map(|i| format!("{i:03}{}", "s".repeat(253)))
        .collect();
    let params = |prefix: &str| {
        (0..32)
            .map(|i| (format!("{prefix}{i}"), json!("v".repeat(4096))))
            .collect::<serde_json::Map<_, _>>()
    };
    let fields: Vec<String> = (0..32)
        .map(|i| format!("f{i:02}{}", "x".repeat(250)))
        .collect();
    let url = format!("https://login.example.test/{}", "a".repeat(2048 - 27));
    let key = "k".repeat(253);
    let target = format!(
        "{}.{}.{}.{}",
        "t".repeat(63),
        "u".repeat(63),
        "v".repeat(63),
        "w".repeat(61)
    );
    let labels = (0..32)
        .map(|i| (format!("l{i}"), json!(format!("{i:02}{}", "l".repeat(61)))))
        .collect::<serde_json::Map<_, _>>();
    let connection = with_spec(
        "maxima",
        json!({
            "oauth2": {
                "tokenUrl": url,
                "authorizationUrl": url,
                "revocationUrl": url,
                "verification": {"url": url},
                "grant": "refreshToken",
                "client": {
                    "secretRef": {
                        "name": "c".repeat(253),
                        "namespace": ns.name,
                        "clientIdKey": key,
                        "clientSecretKey": key,
                    },
                    "authMethod": "clientSecretPost",
                },
                "refreshTokenSecretRef": {"name": "g".repeat(253), "namespace": ns.name, "key": key},
                "scopes": scopes,
                "requiredScopes": scopes,
                "authorizationParams": params("a"),
                "extraTokenParams": params("e"),
                "refreshBefore": "1 hour, 59 minutes, 59 seconds, 999 milliseconds",
                "defaultTokenLifetime": format!("1h{}30m", " ".repeat(123)),
                "responseFields": fields,
            },
            "target": {"name": target, "labels": labels, "annotations": params("n")},
        }),
    );
    if let Err(error) = operator_verdict(&ns.name, &connection) {
        panic!("the operator refuses the spec at every maximum: {error}");
    }
    // `kubectl create`: `apply` would copy the whole object into an
    // annotation, which has a limit of its own.
    let out = kubectl_stdin(
        &["-n", &ns.name, "create", "-f", "-"],
        &connection.to_string(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = ns.kubectl_ok(&["get", "srcconn", "maxima", "-o", "json"]);
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["spec"], connection["spec"]);
}

/// The examples a user starts from, as `kubectl apply -f` takes them.
#[test]
fn the_examples_pass() {
    let ns = TestNamespace::new("crd-examples");
    let dir = format!("{REPO}/deploy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        // The extraction pods that consume the Secrets: tests/operate.rs.
        .filter(|path| {
            !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("extraction-"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {dir}");
    for file in files {
        let out = ns.kubectl(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", file.display(), stderr(&out));
        assert!(
            stdout(&out).contains("sourceconnection.tokenkeeper.dev/"),
            "{}: {}",
            file.display(),
            stdout(&out)
        );
    }
}

/// Every string, list and map of the spec has a maximum, so that no field
/// added later goes unbounded without a decision. No cluster needed.
#[test]
fn every_string_list_and_map_of_the_spec_is_bounded() {
    fn walk(path: &str, schema: &Value, unbounded: &mut Vec<String>) {
        match schema["type"].as_str() {
            Some("string") if schema.get("enum").is_none() && schema.get("maxLength").is_none() => {
                unbounded.push(format!("{path}: maxLength"));
            }
            Some("array") => {
                if schema.get("maxItems").is_none() {
                    unbounded.push(format!("{path}: maxItems"));
                }
                walk(&format!("{path}[]"), &schema["items"], unbounded);
            }
            Some("object") => {
                if let Some(values) = schema.get("additionalProperties") {
                    if schema.get("maxProperties").is_none() {
                        unbounded.push(format!("{path}: maxProperties"));
                    }
                    walk(&format!("{path}.*"), values, unbounded);
                }
                if let Some(properties) = schema["properties"].as_object() {
                    for (name, property) in properties {
                        walk(&format!("{path}.{name}"), property, unbounded);
                    }
                }
            }
            _ => {}
        }
    }
    let crd = serde_json::to_value(&tokenkeeper::crdgen::crds()[0]).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["type"], "object");
    let mut unbounded = Vec::new();
    walk("spec", spec, &mut unbounded);
    assert!(
        unbounded.is_empty(),
        "fields without a maximum: {unbounded:#?}"
    );
}
