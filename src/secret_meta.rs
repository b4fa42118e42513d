//! Secrets as the API brings them.
//!
//! The metadata-only watch brings every Secret in scope at the start and
//! the echo of every write tokenkeeper makes: one per refresh. Of each it
//! reads the name, version, labels and owners. The API server also sends
//! the managedFields: for a target Secret, two entries of nested field sets
//! that `PartialObjectMeta` decodes into dozens of allocations. They are
//! skipped while parsing here, as `crate::cached` does for connections.
//!
//! A whole Secret that tokenkeeper reads or writes (the answer to each
//! refresh's write) is decoded straight into a `ReadSecret`: of the
//! managedFields only which keys tokenkeeper's entries own. Decoding the
//! answer as a whole `Secret` (managedFields as JSON trees) was 7 % of the
//! operator's CPU at 10,000 connections; this takes a third less time
//! (3.5 against 5.3 µs for a refreshed target Secret, in a loop).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::api::FIELD_MANAGER;
use crate::cached::{WireMeta, resource_as};
use crate::decide::{OwnedFields, ReadSecret, is_create_entry};

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

impl<'de> Deserialize<'de> for ReadSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            metadata: WireMeta<Vec<WireManagedFieldsEntry>>,
            data: Option<BTreeMap<String, ByteString>>,
            #[serde(rename = "type")]
            type_: Option<String>,
            immutable: Option<bool>,
        }
        let mut wire = Wire::deserialize(deserializer)?;
        let owned: Vec<OwnedFields> = wire
            .metadata
            .managed_fields
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|entry| entry.manager.as_deref() == Some(FIELD_MANAGER))
            .map(|entry| {
                let fields = entry.fields_v1.unwrap_or_default();
                OwnedFields {
                    created: is_create_entry(entry.operation.as_deref()),
                    labels: fields.metadata.labels.0,
                    annotations: fields.metadata.annotations.0,
                    data: fields.data.0,
                }
            })
            .collect();
        let secret = Secret {
            metadata: wire.metadata.into(),
            data: wire.data,
            type_: wire.type_,
            immutable: wire.immutable,
            string_data: None,
        };
        Ok(ReadSecret::with_owned_fields(secret, &owned))
    }
}

/// Of a managedFields entry, whose it is and the field sets `ReadSecret`
/// reads; the rest of its fieldsV1 is skipped unread.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireManagedFieldsEntry {
    manager: Option<String>,
    operation: Option<String>,
    #[serde(rename = "fieldsV1")]
    fields_v1: Option<SecretFieldSets>,
}

#[derive(Default, Deserialize)]
struct SecretFieldSets {
    #[serde(rename = "f:metadata", default)]
    metadata: MetadataFieldSets,
    #[serde(rename = "f:data", default)]
    data: FieldNames,
}

#[derive(Default, Deserialize)]
struct MetadataFieldSets {
    #[serde(rename = "f:labels", default)]
    labels: FieldNames,
    #[serde(rename = "f:annotations", default)]
    annotations: FieldNames,
}

/// The names of a field set's `f:` members (map keys, labels, data keys).
#[derive(Default)]
struct FieldNames(Vec<String>);

impl<'de> Deserialize<'de> for FieldNames {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> Visitor<'de> for Names {
            type Value = FieldNames;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field set")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FieldNames, A::Error> {
                let mut names = Vec::new();
                while let Some(mut member) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    if member.starts_with("f:") {
                        member.drain(..2);
                        names.push(member);
                    }
                }
                Ok(FieldNames(names))
            }
        }
        deserializer.deserialize_map(Names)
    }
}

/// The Secrets of `secrets`, read as `ReadSecret`s.
pub fn read_view(secrets: &Api<Secret>) -> Api<ReadSecret> {
    let client = secrets.clone().into_client();
    match secrets.namespace() {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    }
}

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

    /// A target Secret as the API answers its refresh: the create's entry,
    /// the apply's, and a user's label.
    const TARGET_SECRET: &str = r#"{
        "kind": "Secret", "apiVersion": "v1",
        "metadata": {
            "name": "crm-credentials", "namespace": "data", "resourceVersion": "57",
            "uid": "8313a14c", "creationTimestamp": "2026-11-24T06:04:43Z",
            "labels": {"app.kubernetes.io/managed-by": "tokenkeeper", "team": "growth"},
            "annotations": {"tokenkeeper.dev/issued-at": "2026-11-24T06:05:58Z",
                            "kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "ownerReferences": [{"apiVersion": "tokenkeeper.dev/v1alpha1", "kind": "SourceConnection",
                                 "name": "crm", "uid": "605f49c9", "controller": true}],
            "managedFields": [
                {"manager": "tokenkeeper", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-11-24T06:04:43Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:data": {".": {}, "f:username": {}},
                              "f:metadata": {"f:labels": {".": {}, "f:app.kubernetes.io/managed-by": {}},
                                             "f:ownerReferences": {".": {}, "k:{\"uid\":\"605f49c9\"}": {}}},
                              "f:type": {}}},
                {"manager": "kubectl-label", "operation": "Update", "apiVersion": "v1",
                 "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}}}},
                {"manager": "tokenkeeper", "operation": "Apply", "apiVersion": "v1",
                 "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:data": {"f:access_token": {}, "f:username": {}},
                              "f:metadata": {"f:annotations": {"f:tokenkeeper.dev/issued-at": {}},
                                             "f:labels": {"f:app.kubernetes.io/managed-by": {}}}}}
            ]
        },
        "data": {"access_token": "YXQ=", "username": "dQ=="},
        "type": "Opaque"
    }"#;

    #[test]
    fn a_secret_decodes_as_read_secret_needs_it_with_the_ownership_of_its_managed_fields() {
        let ours: ReadSecret = serde_json::from_str(TARGET_SECRET).unwrap();
        let mut whole: Secret = serde_json::from_str(TARGET_SECRET).unwrap();
        whole
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove("kubectl.kubernetes.io/last-applied-configuration");
        assert_eq!(ours, ReadSecret::new(whole));
        assert_eq!(ours.metadata.managed_fields, None);
        use crate::decide::{APPLIED, CREATED};
        assert_eq!(
            ours.ownership(),
            [APPLIED | CREATED, 0, APPLIED, 0, CREATED],
            "labels managed-by (both entries) and team (the user's); annotation issued-at \
             (applied); data access_token (applied only: no byte's worth) and username (created)"
        );

        let mut theirs = serde_json::from_str::<serde_json::Value>(TARGET_SECRET).unwrap();
        theirs["metadata"]["labels"] = serde_json::json!({"team": "growth"});
        let theirs: ReadSecret = serde_json::from_value(theirs).unwrap();
        assert!(
            theirs.ownership().is_empty(),
            "a Secret tokenkeeper does not manage owns nothing"
        );
    }

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
