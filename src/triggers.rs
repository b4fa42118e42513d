//! Which SourceConnections a Secret event concerns, decided from the
//! Secret's metadata alone so that no Secret content is cached.
//!
//! - Secrets tokenkeeper writes (labelled `managed-by`) wake their owner,
//!   except for the versions tokenkeeper itself just wrote: a refresh must
//!   not cost a second reconcile of the same connection.
//! - Secrets users reference wake the connections that name them, found
//!   through an index kept from the connection watch, so an event costs a
//!   lookup rather than a scan of every connection.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::api::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::cached::CachedConnection;
use crate::object_key::{Key, key, key_of, split};
use crate::secret_cache::SecretCache;
use crate::secret_meta::SecretMeta;

#[derive(Default)]
pub struct SecretTriggers {
    references: Mutex<References>,
}

#[derive(Default)]
struct References {
    /// Secret to the names of the connections reading it, sorted. A Vec
    /// rather than a BTreeSet: most Secrets have one reader, and a B-tree
    /// allocates a node for eleven.
    readers: HashMap<Key, Vec<Box<str>>>,
    /// Connection to the names of the Secrets it reads.
    reads: HashMap<Key, Box<[Box<str>]>>,
    /// Connections listed since the watch (re)started; the others are gone.
    listed: Option<HashSet<Key>>,
}

impl References {
    fn set(&mut self, conn: &CachedConnection) {
        let connection = key_of(conn);
        // The cache admits only connections that decode.
        let spec = conn.spec().expect("cached connections decode");
        let names: Box<[Box<str>]> = spec
            .referenced_secret_names()
            .into_iter()
            .map(Box::from)
            .collect();
        if self.reads.get(&connection) == Some(&names) {
            return;
        }
        self.remove(&connection);
        let (namespace, name) = split(&connection);
        for secret in &names {
            let readers = self.readers.entry(key(namespace, secret)).or_default();
            if let Err(at) = readers.binary_search_by(|reader| (**reader).cmp(name)) {
                readers.insert(at, name.into());
            }
        }
        self.reads.insert(connection, names);
    }

    fn remove(&mut self, connection: &Key) {
        let (namespace, name) = split(connection);
        for secret in self.reads.remove(connection).unwrap_or_default() {
            let secret = key(namespace, &secret);
            if let Some(readers) = self.readers.get_mut(&secret) {
                if let Ok(at) = readers.binary_search_by(|reader| (**reader).cmp(name)) {
                    readers.remove(at);
                }
                if readers.is_empty() {
                    self.readers.remove(&secret);
                }
            }
        }
    }
}

impl SecretTriggers {
    /// Keeps the index in step with the connection watch.
    pub fn observe(&self, event: &watcher::Event<CachedConnection>) {
        let mut references = self.references.lock().expect("not poisoned");
        match event {
            watcher::Event::Apply(conn) => references.set(conn),
            watcher::Event::Delete(conn) => references.remove(&key_of(conn)),
            watcher::Event::Init => references.listed = Some(HashSet::new()),
            watcher::Event::InitApply(conn) => {
                references.set(conn);
                if let Some(listed) = references.listed.as_mut() {
                    listed.insert(key_of(conn));
                }
            }
            watcher::Event::InitDone => {
                let listed = references.listed.take().unwrap_or_default();
                let gone: Vec<Key> = references
                    .reads
                    .keys()
                    .filter(|key| !listed.contains(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    references.remove(&key);
                }
            }
        }
    }

    /// The connections to reconcile after `secret` changed.
    pub fn connections_for(
        &self,
        secret: &SecretMeta,
        cache: &SecretCache,
    ) -> Vec<ObjectRef<CachedConnection>> {
        let namespace = secret.namespace().unwrap_or_default();
        if secret.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY) {
            if cache.is_own_write(secret) {
                return Vec::new();
            }
            return secret
                .owner_references()
                .iter()
                .filter(|owner| {
                    owner.controller == Some(true)
                        && owner.kind == CachedConnection::kind(&())
                        && owner.api_version == CachedConnection::api_version(&())
                })
                .map(|owner| ObjectRef::new(&owner.name).within(&namespace))
                .collect();
        }
        let references = self.references.lock().expect("not poisoned");
        references
            .readers
            .get(&key(&namespace, &secret.name_any()))
            .into_iter()
            .flatten()
            .map(|name| ObjectRef::new(name).within(&namespace))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn connection(name: &str, secret: &str) -> CachedConnection {
        let json = serde_json::json!({
            "apiVersion": "tokenkeeper.dev/v1alpha1",
            "kind": "SourceConnection",
            "metadata": {"name": name, "namespace": "data"},
            "spec": {"apiKey": {"secretRef": {"name": secret}}},
        });
        serde_json::from_str(&json.to_string()).expect("valid connection")
    }

    fn secret_meta(name: &str, version: &str, owner: Option<&str>) -> SecretMeta {
        let mut meta = SecretMeta::default();
        meta.metadata.name = Some(name.into());
        meta.metadata.namespace = Some("data".into());
        meta.metadata.resource_version = Some(version.into());
        if let Some(owner) = owner {
            meta.metadata.labels = Some([(LABEL_MANAGED_BY.into(), MANAGED_BY.into())].into());
            meta.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "tokenkeeper.dev/v1alpha1".into(),
                kind: "SourceConnection".into(),
                name: owner.into(),
                uid: "u".into(),
                controller: Some(true),
                ..Default::default()
            }]);
        }
        meta
    }

    fn names(refs: Vec<ObjectRef<CachedConnection>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn referenced_secrets_wake_their_readers_and_follow_spec_changes() {
        let triggers = SecretTriggers::default();
        let cache = SecretCache::default();
        triggers.observe(&watcher::Event::Apply(connection("stripe", "stripe-key")));
        triggers.observe(&watcher::Event::Apply(connection("billing", "stripe-key")));
        let changed = secret_meta("stripe-key", "7", None);
        assert_eq!(
            names(triggers.connections_for(&changed, &cache)),
            ["billing", "stripe"]
        );

        triggers.observe(&watcher::Event::Apply(connection("stripe", "other-key")));
        assert_eq!(
            names(triggers.connections_for(&changed, &cache)),
            ["billing"]
        );
        triggers.observe(&watcher::Event::Delete(connection("billing", "stripe-key")));
        assert!(triggers.connections_for(&changed, &cache).is_empty());
    }

    #[test]
    fn a_relist_forgets_connections_that_are_gone() {
        let triggers = SecretTriggers::default();
        triggers.observe(&watcher::Event::Apply(connection("old", "key")));
        triggers.observe(&watcher::Event::Init);
        triggers.observe(&watcher::Event::InitApply(connection("new", "key")));
        triggers.observe(&watcher::Event::InitDone);
        assert_eq!(
            names(
                triggers.connections_for(&secret_meta("key", "1", None), &SecretCache::default())
            ),
            ["new"]
        );
    }

    #[test]
    fn own_writes_do_not_wake_the_owner_but_other_writes_do() {
        let triggers = SecretTriggers::default();
        let cache = SecretCache::default();
        let mut written = Secret::default();
        written.metadata.name = Some("crm-token".into());
        written.metadata.namespace = Some("data".into());
        written.metadata.resource_version = Some("41".into());
        cache.wrote(crate::decide::ReadSecret::new(written));

        let own = secret_meta("crm-token", "41", Some("crm"));
        assert!(triggers.connections_for(&own, &cache).is_empty());
        let edited = secret_meta("crm-token", "42", Some("crm"));
        assert_eq!(names(triggers.connections_for(&edited, &cache)), ["crm"]);
    }
}
