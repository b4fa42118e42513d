//! What enqueues a connection: which watch events of SourceConnections and
//! of Secrets wake which connection's reconcile.
//!
//! - `ConnectionWakes`: a new generation (the spec changed), changed
//!   annotations (`tokenkeeper.dev/force-refresh`), the start of deletion,
//!   or a connection not seen before. Not a status write, which is most
//!   events, tokenkeeper's own included. It decides as kube-runtime's
//!   `predicate_filter` does, keeping two hashes per connection instead of
//!   three Strings.
//! - `SecretTriggers`: a Secret tokenkeeper writes wakes its owner, except
//!   for the version tokenkeeper itself just wrote (a refresh must not cost
//!   a second reconcile); a Secret users reference wakes the connections
//!   that name it, found through an index kept from the connection watch.
//!   Decided from the Secret's metadata alone, so no Secret content is
//!   cached for it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::api::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::runtime::object_key::{Key, key, key_of, split};
use crate::runtime::relist::Relisting;
use crate::runtime::secret_cache::SecretCache;
use crate::runtime::wire::{CachedConnection, SecretMeta};

#[derive(Default)]
pub struct ConnectionWakes {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashMap<Key, Seen>,
    relisting: Relisting<()>,
}

/// Hashes, not copies: a uid tells a connection from a new one of the same
/// name, and the rest tells whether anything that wakes changed.
#[derive(Clone, Copy, PartialEq)]
struct Seen {
    uid: u64,
    wakes: u64,
}

impl Seen {
    fn of(conn: &CachedConnection) -> Self {
        let meta = conn.meta();
        Seen {
            uid: hash(&meta.uid),
            wakes: hash(&(
                meta.generation,
                &meta.annotations,
                meta.deletion_timestamp.is_some(),
            )),
        }
    }
}

fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

impl ConnectionWakes {
    /// Whether `conn`, as the watch brings it now, should be reconciled.
    pub fn wakes(&self, conn: &CachedConnection) -> bool {
        let seen = Seen::of(conn);
        let mut state = self.state.lock().expect("not poisoned");
        state.seen.insert(key_of(conn), seen) != Some(seen)
    }

    /// Forgets deleted connections, including those deleted while the
    /// watch was down (gone from its next listing).
    pub fn observe(&self, event: &watcher::Event<CachedConnection>) {
        let mut state = self.state.lock().expect("not poisoned");
        if let watcher::Event::Delete(conn) = event {
            state.seen.remove(&key_of(conn));
        }
        if let Some(listed) = state.relisting.observe(event, |_| Some(())) {
            state.seen.retain(|key, _| listed.contains_key(key));
        }
    }
}

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
    relisting: Relisting<()>,
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
            watcher::Event::Apply(conn) | watcher::Event::InitApply(conn) => references.set(conn),
            watcher::Event::Delete(conn) => references.remove(&key_of(conn)),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        if let Some(listed) = references.relisting.observe(event, |_| Some(())) {
            let gone: Vec<Key> = references
                .reads
                .keys()
                .filter(|key| !listed.contains_key(*key))
                .cloned()
                .collect();
            for key in gone {
                references.remove(&key);
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

    fn connection(uid: &str, generation: i64) -> CachedConnection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tokenkeeper.dev/v1alpha1",
            "kind": "SourceConnection",
            "metadata": {"name": "crm", "namespace": "data", "uid": uid,
                         "generation": generation, "resourceVersion": "1"},
            "spec": {"apiKey": {"secretRef": {"name": "crm", "key": "api_key"}}},
        }))
        .unwrap()
    }

    #[test]
    fn a_status_write_does_not_wake_a_spec_change_does() {
        let wakes = ConnectionWakes::default();
        let conn = connection("u1", 1);
        assert!(wakes.wakes(&conn), "first seen");
        let mut status_written = conn.clone();
        status_written.meta_mut().resource_version = Some("2".into());
        assert!(!wakes.wakes(&status_written));
        assert!(wakes.wakes(&connection("u1", 2)), "new generation");
        let mut annotated = connection("u1", 2);
        annotated.meta_mut().annotations =
            Some([("tokenkeeper.dev/force-refresh".into(), "1".into())].into());
        assert!(wakes.wakes(&annotated), "force-refresh");
        let mut deleting = annotated.clone();
        deleting.meta_mut().deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert!(wakes.wakes(&deleting), "deletion starts");
        assert!(!wakes.wakes(&deleting));
    }

    #[test]
    fn a_connection_made_again_under_the_same_name_wakes() {
        let wakes = ConnectionWakes::default();
        assert!(wakes.wakes(&connection("u1", 1)));
        // Deleted and created again while the watch was down: the relist
        // brings the new one, same name and generation.
        wakes.observe(&watcher::Event::Init);
        assert!(wakes.wakes(&connection("u2", 1)));
        wakes.observe(&watcher::Event::InitApply(connection("u2", 1)));
        wakes.observe(&watcher::Event::InitDone);
        assert!(!wakes.wakes(&connection("u2", 1)));
    }

    #[test]
    fn deleted_connections_are_forgotten() {
        let wakes = ConnectionWakes::default();
        assert!(wakes.wakes(&connection("u1", 1)));
        wakes.observe(&watcher::Event::Delete(connection("u1", 1)));
        assert!(wakes.state.lock().unwrap().seen.is_empty());
        assert!(wakes.wakes(&connection("u1", 1)));
        wakes.observe(&watcher::Event::Init);
        wakes.observe(&watcher::Event::InitDone);
        assert!(
            wakes.state.lock().unwrap().seen.is_empty(),
            "not in the listing"
        );
    }
}

#[cfg(test)]
mod secret_trigger_tests {
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
        cache.wrote(crate::runtime::wire::ReadSecret::new(written));

        let own = secret_meta("crm-token", "41", Some("crm"));
        assert!(triggers.connections_for(&own, &cache).is_empty());
        let edited = secret_meta("crm-token", "42", Some("crm"));
        assert_eq!(names(triggers.connections_for(&edited, &cache)), ["crm"]);
    }
}
