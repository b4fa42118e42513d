//! Secrets as the metadata-only watch brings them.
//!
//! The watch brings every Secret in scope at the start and the echo of
//! every write tokenkeeper makes: one per refresh. Of each it reads the
//! name, version, labels and owners. The API server also sends the
//! managedFields: for a target Secret, two entries of nested field sets
//! that `PartialObjectMeta` decodes into dozens of allocations. They are
//! skipped while parsing here, as `crate::cached` does for connections.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

use crate::cached::{WireMeta, resource_as};

/// A Secret's metadata, without its managedFields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretMeta {
    pub metadata: ObjectMeta,
}

impl<'de> Deserialize<'de> for SecretMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            metadata: WireMeta,
        }
        let wire = Wire::deserialize(deserializer)?;
        Ok(SecretMeta {
            metadata: wire.metadata.into(),
        })
    }
}

resource_as!(SecretMeta, Secret {
    /// Lists and watches ask for `PartialObjectMetadata`: no Secret data
    /// crosses the wire.
    fn metadata_api() -> bool {
        true
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use kube::core::PartialObjectMeta;

    const SECRET_METADATA: &str = r#"{
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {
            "name": "crm-credentials", "namespace": "data", "resourceVersion": "41",
            "uid": "8313a14c", "creationTimestamp": "2026-11-24T06:04:43Z",
            "labels": {"app.kubernetes.io/managed-by": "tokenkeeper"},
            "annotations": {"tokenkeeper.dev/issued-at": "2026-11-24T06:05:58Z"},
            "ownerReferences": [{"apiVersion": "tokenkeeper.dev/v1alpha1", "kind": "SourceConnection",
                                 "name": "crm", "uid": "605f49c9", "controller": true}],
            "managedFields": [{"manager": "tokenkeeper", "operation": "Apply",
                               "apiVersion": "v1", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:data": {"f:access_token": {}}}}]
        }
    }"#;

    #[test]
    fn the_watched_metadata_is_partial_object_metadata_less_its_managed_fields() {
        let ours: SecretMeta = serde_json::from_str(SECRET_METADATA).unwrap();
        let kube: PartialObjectMeta<Secret> = serde_json::from_str(SECRET_METADATA).unwrap();
        assert!(kube.metadata.managed_fields.is_some());
        assert_eq!(
            ours.metadata,
            ObjectMeta {
                managed_fields: None,
                ..kube.metadata
            }
        );
        assert!(SecretMeta::metadata_api());
        assert_eq!(
            SecretMeta::url_path(&(), Some("data")),
            Secret::url_path(&(), Some("data"))
        );
    }
}
