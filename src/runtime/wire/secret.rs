//! Secrets as the API brings them. The metadata watch decodes each as a
//! `SecretMeta`, managedFields skipped. A Secret tokenkeeper reads or writes
//! whole decodes straight into a `ReadSecret`: of its managedFields only
//! which keys tokenkeeper's own entries own, one byte per key, which is all
//! that deciding a write needs (`decide::secrets::needs_write`,
//! `stale_fields`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{WireMeta, resource_as};
use crate::api::{FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY};

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

/// The keys a managedFields entry owns under `path`.
pub(crate) fn entry_keys(entry: &ManagedFieldsEntry, path: &[&str]) -> Vec<String> {
    let Some(fields) = &entry.fields_v1 else {
        return Vec::new();
    };
    let section = path.iter().fold(&fields.0, |node, step| &node[*step]);
    section
        .as_object()
        .into_iter()
        .flat_map(|keys| keys.keys())
        .filter_map(|key| key.strip_prefix("f:"))
        .map(str::to_owned)
        .collect()
}

/// Whether a managedFields entry of this operation is what a plain create
/// (or any write that is not server-side apply) left: `Update`.
pub fn is_create_entry(operation: Option<&str>) -> bool {
    operation == Some("Update")
}

/// The keys one of tokenkeeper's managedFields entries of a Secret owns.
#[derive(Debug, Default, PartialEq)]
pub struct OwnedFields {
    /// The entry is the create's (`is_create_entry`).
    pub created: bool,
    pub labels: Vec<String>,
    pub annotations: Vec<String>,
    pub data: Vec<String>,
}

/// A Secret as tokenkeeper reads it (the Secret cache gives these):
/// without its managedFields, and with what `needs_write` and
/// `stale_fields` read of them instead, which of its keys tokenkeeper owns.
///
/// The ownership is one byte per key the Secret has (its labels, then its
/// annotations, then its data keys, each in order): `APPLIED` when any of
/// tokenkeeper's entries owns the key, `CREATED` when the entry of its
/// create does. Both decisions read ownership only of keys the Secret has,
/// so these bytes say all they need. The Secret cache keeps target Secrets
/// with these bytes instead of their managedFields (tokenkeeper's two
/// entries are a large part of a kept target Secret), and a refresh reads
/// them as they are instead of parsing managedFields again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadSecret {
    secret: Secret,
    ownership: Box<[u8]>,
}

impl ReadSecret {
    /// `secret` as the API gave it, managedFields included. Only of the
    /// Secrets tokenkeeper manages is ownership read; others own nothing.
    pub fn new(mut secret: Secret) -> Self {
        let entries: Vec<OwnedFields> = secret
            .managed_fields()
            .iter()
            .filter(|entry| entry.manager.as_deref() == Some(FIELD_MANAGER))
            .map(|entry| OwnedFields {
                created: is_create_entry(entry.operation.as_deref()),
                labels: entry_keys(entry, &["f:metadata", "f:labels"]),
                annotations: entry_keys(entry, &["f:metadata", "f:annotations"]),
                data: entry_keys(entry, &["f:data"]),
            })
            .collect();
        secret.metadata.managed_fields = None;
        Self::with_owned_fields(secret, &entries)
    }

    /// `secret` without its managedFields, and what tokenkeeper's entries
    /// of them own (`secret_meta` decodes that much of them straight from
    /// the API's answer).
    pub fn with_owned_fields(secret: Secret, entries: &[OwnedFields]) -> Self {
        let ownership = if is_managed(&secret) {
            key_ownership(&secret, entries)
        } else {
            Box::default()
        };
        ReadSecret { secret, ownership }
    }

    /// `secret` (without managedFields) with the `ownership` bytes that
    /// `ReadSecret::new` read of it.
    pub fn with_ownership(secret: Secret, ownership: Box<[u8]>) -> Self {
        ReadSecret { secret, ownership }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    #[cfg(test)]
    pub(crate) fn ownership(&self) -> &[u8] {
        &self.ownership
    }

    pub fn into_parts(self) -> (Secret, Box<[u8]>) {
        (self.secret, self.ownership)
    }

    /// The keys whose ownership byte has a bit of `wanted`.
    pub(crate) fn owned_keys(&self, wanted: u8) -> OwnedKeys<'_> {
        fn owned<'a>(
            keys: impl Iterator<Item = &'a String>,
            flags: &mut std::slice::Iter<'_, u8>,
            wanted: u8,
        ) -> Vec<&'a String> {
            keys.zip(flags)
                .filter(|(_, flag)| **flag & wanted != 0)
                .map(|(key, _)| key)
                .collect()
        }
        let flags = &mut self.ownership.iter();
        OwnedKeys {
            labels: owned(self.secret.labels().keys(), flags, wanted),
            annotations: owned(self.secret.annotations().keys(), flags, wanted),
            data: owned(data_keys(&self.secret).into_iter(), flags, wanted),
        }
    }
}

// So that the API's answers decode straight into a `ReadSecret`
// (`secret_meta`). kube's `Resource` asks for `meta_mut` too; nothing
// changes a `ReadSecret`'s metadata, which its ownership bytes follow.
resource_as!(ReadSecret, Secret, secret.metadata {});

impl std::ops::Deref for ReadSecret {
    type Target = Secret;

    fn deref(&self) -> &Secret {
        &self.secret
    }
}

/// The keys of a Secret that some of tokenkeeper's entries own.
pub(crate) struct OwnedKeys<'a> {
    pub(crate) labels: Vec<&'a String>,
    pub(crate) annotations: Vec<&'a String>,
    pub(crate) data: Vec<&'a String>,
}

/// Whether tokenkeeper manages `secret` (its label says so).
pub fn is_managed(secret: &Secret) -> bool {
    secret.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
}

/// The ownership bytes of `secret` (see `ReadSecret`), from tokenkeeper's
/// managedFields entries of it.
fn key_ownership(secret: &Secret, entries: &[OwnedFields]) -> Box<[u8]> {
    let owners = |keys_of: fn(&OwnedFields) -> &[String]| {
        let mut owned: BTreeMap<&str, u8> = BTreeMap::new();
        for entry in entries {
            let flag = if entry.created {
                CREATED | APPLIED
            } else {
                APPLIED
            };
            for key in keys_of(entry) {
                *owned.entry(key).or_default() |= flag;
            }
        }
        owned
    };
    let labels = owners(|entry| &entry.labels);
    let annotations = owners(|entry| &entry.annotations);
    let data = owners(|entry| &entry.data);
    let flag =
        |owned: &BTreeMap<&str, u8>, key: &String| owned.get(key.as_str()).copied().unwrap_or(0);
    secret
        .labels()
        .keys()
        .map(|key| flag(&labels, key))
        .chain(
            secret
                .annotations()
                .keys()
                .map(|key| flag(&annotations, key)),
        )
        .chain(
            data_keys(secret)
                .into_iter()
                .map(|key| flag(&data, key) & CREATED),
        )
        .collect()
}

/// A key some entry of tokenkeeper's owns.
pub const APPLIED: u8 = 1;
/// A key the entry of tokenkeeper's create owns.
pub const CREATED: u8 = 2;

fn data_keys(secret: &Secret) -> Vec<&String> {
    secret.data.iter().flatten().map(|(key, _)| key).collect()
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
