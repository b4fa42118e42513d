//! Renders the CRDs that `crds/` holds and `tokenkeeper crd` prints.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::api::SourceConnection;

/// Every CRD of tokenkeeper, as the API server must receive it.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![source_connection_crd()]
}

/// All CRDs as YAML documents separated by `---`.
pub fn render_yaml() -> String {
    crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD always serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn source_connection_crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(SourceConnection::crd()).expect("a CRD always serializes");
    strip_null_from_enums(&mut value);
    for version in value["spec"]["versions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        let spec = &mut version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        // Exactly one method per object, enforced by the API server so that
        // `kubectl apply` shows the mistake at once. A structural schema
        // allows `oneOf` when its branches only carry `required`.
        spec["oneOf"] = json!([
            {"required": ["basic"]},
            {"required": ["apiKey"]},
            {"required": ["oauth2"]},
        ]);
    }
    serde_json::from_value(value).expect("the edited CRD still deserializes")
}

/// schemars lists `null` among the values of an optional enum; the API
/// server rejects the whole CRD for it.
fn strip_null_from_enums(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(variants)) = map.get_mut("enum") {
                variants.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(strip_null_from_enums);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_null_from_enums),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_null_in_any_enum() {
        let yaml = render_yaml();
        let value: Value = serde_yaml::from_str(&yaml).unwrap();
        fn walk(v: &Value) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::Array(variants)) = map.get("enum") {
                        assert!(variants.iter().all(|v| !v.is_null()), "{variants:?}");
                    }
                    map.values().for_each(walk);
                }
                Value::Array(items) => items.iter().for_each(walk),
                _ => {}
            }
        }
        walk(&value);
    }

    #[test]
    fn conditions_are_a_map_keyed_by_type() {
        let value = serde_json::to_value(&crds()[0]).unwrap();
        let conditions = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    }

    #[test]
    fn committed_crds_match_the_binary() {
        let committed = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crds/sourceconnection.yaml"
        ))
        .expect("crds/sourceconnection.yaml exists");
        assert!(
            committed == render_yaml(),
            "crds/ is stale: run `cargo run -- crd > crds/sourceconnection.yaml`"
        );
    }
}
