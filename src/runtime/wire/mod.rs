//! The slim views in which watches and the caches keep API objects: what the
//! operator reads of them is decoded, the rest is skipped while parsing
//! (managedFields, kubectl's last-applied copy), so it costs neither
//! allocations nor memory. Pure: decoding only, no I/O.

pub mod connection;
pub mod secret;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::Deserialize;
use serde::de::IgnoredAny;

pub use connection::CachedConnection;
pub use secret::{APPLIED, CREATED, ReadSecret, SecretMeta};

/// `ObjectMeta` less what the cache never reads: fields not named here
/// (`selfLink`) are skipped unread, and kubectl's last-applied copy of the
/// object is dropped.
///
/// `Managed` decodes the managedFields: by default they are skipped too.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireMeta<Managed = IgnoredAny> {
    pub(crate) managed_fields: Option<Managed>,
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    uid: Option<String>,
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl<Managed> From<WireMeta<Managed>> for ObjectMeta {
    fn from(wire: WireMeta<Managed>) -> Self {
        let annotations = wire.annotations.map(|mut annotations| {
            annotations.remove(LAST_APPLIED);
            annotations
        });
        ObjectMeta {
            annotations,
            creation_timestamp: wire.creation_timestamp,
            deletion_grace_period_seconds: wire.deletion_grace_period_seconds,
            deletion_timestamp: wire.deletion_timestamp,
            finalizers: wire.finalizers,
            generate_name: wire.generate_name,
            generation: wire.generation,
            labels: wire.labels,
            managed_fields: None,
            name: wire.name,
            namespace: wire.namespace,
            owner_references: wire.owner_references,
            resource_version: wire.resource_version,
            self_link: None,
            uid: wire.uid,
        }
    }
}

/// Implements `Resource` for a type that stands for `$as` in watches and
/// caches but decodes less of it: the same kind, group, version and plural,
/// and its metadata in a `metadata` field. Extra items of the impl, such as
/// `metadata_api`, go in the braces. The metadata is in another field when
/// its path comes after `$as` (`secret.metadata`).
macro_rules! resource_as {
    ($view:ty, $as:ty { $($extra:item)* }) => {
        resource_as!($view, $as, metadata { $($extra)* });
    };
    ($view:ty, $as:ty, $($meta:ident).+ { $($extra:item)* }) => {
        impl ::kube::Resource for $view {
            type DynamicType = ();
            type Scope = ::kube::core::NamespaceResourceScope;

            fn kind(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$as as ::kube::Resource>::kind(dt)
            }

            fn group(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$as as ::kube::Resource>::group(dt)
            }

            fn version(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$as as ::kube::Resource>::version(dt)
            }

            fn plural(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$as as ::kube::Resource>::plural(dt)
            }

            fn meta(&self) -> &::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.$($meta).+
            }

            fn meta_mut(
                &mut self,
            ) -> &mut ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.$($meta).+
            }

            $($extra)*
        }
    };
}
pub(crate) use resource_as;
