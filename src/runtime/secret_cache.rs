//! Reads of Secrets that cost an API request only when the Secret changed.
//!
//! The metadata-only watch of Secrets tells which version of each Secret
//! is current (or that it does not exist). A Secret's contents are read
//! once per version and kept only for Secrets a connection reads, so a
//! routine refresh reads nothing from the API: the client Secret, the
//! imported refresh token and the target Secret (which tokenkeeper itself
//! wrote last) are all at the versions read or written before.
//!
//! Until the watch of a namespace (or of all) has listed its Secrets once,
//! nothing is known there and every read goes to the API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, GetParams};
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};

use crate::decide::secrets::ANNOTATION_SOURCE_FOR;
use crate::runtime::object_key::{Key, key, key_of, split};
use crate::runtime::relist::Relisting;
use crate::runtime::wire::secret::is_managed;
use crate::runtime::wire::{ReadSecret, SecretMeta};

/// What one watch covers: a namespace, or all of them (`None`).
pub type Scope = Option<String>;

#[derive(Default)]
pub struct SecretCache {
    /// Scopes whose watch has listed its Secrets at least once.
    listed: Mutex<HashSet<Scope>>,
    /// Listings in progress after a (re)start of a watch: each Secret's
    /// version.
    relisting: Mutex<HashMap<Scope, Relisting<Box<str>>>>,
    /// Every Secret the watches have seen, and every Secret kept. One map
    /// rather than one for versions and one for contents, so that each key
    /// is kept once.
    secrets: Mutex<HashMap<Key, Known>>,
}

fn in_scope(key: &Key, scope: &Scope) -> bool {
    scope
        .as_ref()
        .is_none_or(|namespace| split(key).0 == namespace)
}

#[derive(Default)]
struct Known {
    /// The current resourceVersion as the watch says; `None` when the
    /// Secret does not exist (any more) but what tokenkeeper wrote is kept.
    version: Option<Box<str>>,
    kept: Option<Box<Entry>>,
}

impl Known {
    fn is_empty(&self) -> bool {
        self.version.is_none() && self.kept.is_none()
    }
}

struct Entry {
    version: Box<str>,
    /// The slimmed Secret as JSON (`Kept`): one allocation instead of a
    /// hundred small ones, a sixth of the decoded size, for a decode per
    /// read.
    json: Box<[u8]>,
    /// tokenkeeper wrote this version itself.
    own: bool,
    /// Of a Secret tokenkeeper manages, which keys it owns (see
    /// `ReadSecret`), in place of the managedFields.
    ownership: Box<[u8]>,
}

/// A Secret less what every kept entry would repeat: its kind and
/// apiVersion, and the name, namespace and resourceVersion that the cache's
/// key and `Entry::version` hold (about 100 of a target Secret's bytes).
#[derive(Serialize, Deserialize)]
struct Kept {
    metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<BTreeMap<String, ByteString>>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    immutable: Option<bool>,
}

impl Entry {
    fn new(version: String, read: ReadSecret, own: bool) -> Box<Self> {
        let managed = is_managed(&read);
        let (secret, ownership) = read.into_parts();
        let metadata = secret.metadata;
        let kept = Kept {
            metadata: ObjectMeta {
                // What reconciling never reads: of an input Secret's
                // annotations, only which connections may read it.
                creation_timestamp: None,
                uid: None,
                annotations: match managed {
                    true => metadata.annotations,
                    false => metadata.annotations.map(|all| {
                        all.into_iter()
                            .filter(|(key, _)| key == ANNOTATION_SOURCE_FOR)
                            .collect()
                    }),
                },
                // What the cache's key and the entry hold.
                name: None,
                namespace: None,
                resource_version: None,
                ..metadata
            },
            data: secret.data,
            type_: secret.type_,
            immutable: secret.immutable,
        };
        Box::new(Entry {
            version: version.into_boxed_str(),
            json: serde_json::to_vec(&kept)
                .expect("a Secret serializes")
                .into_boxed_slice(),
            own,
            ownership,
        })
    }

    /// The Secret `key` names, as kept.
    fn secret(&self, key: &str) -> Arc<ReadSecret> {
        let kept: Kept =
            serde_json::from_slice(&self.json).expect("the cache holds Secrets it encoded");
        let (namespace, name) = split(key);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                resource_version: Some(self.version.to_string()),
                ..kept.metadata
            },
            data: kept.data,
            type_: kept.type_,
            immutable: kept.immutable,
            string_data: None,
        };
        Arc::new(ReadSecret::with_ownership(secret, self.ownership.clone()))
    }
}

impl SecretCache {
    /// Follows the watch of `scope`.
    pub fn observe(&self, scope: &Scope, event: &watcher::Event<SecretMeta>) {
        match event {
            watcher::Event::Apply(meta) => {
                if let Some(version) = &meta.metadata.resource_version {
                    self.lock().entry(key_of(meta)).or_default().version =
                        Some(version.as_str().into());
                }
            }
            watcher::Event::Delete(meta) => {
                // What tokenkeeper wrote itself is remembered past a
                // deletion: it may be the only copy of a grant.
                self.update(key_of(meta), |known| {
                    known.version = None;
                    known.kept = known.kept.take().filter(|e| e.own);
                });
            }
            watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone => {
                let listed = self
                    .relisting
                    .lock()
                    .expect("not poisoned")
                    .entry(scope.clone())
                    .or_default()
                    .observe(event, |meta| {
                        meta.metadata.resource_version.as_deref().map(Box::from)
                    });
                let Some(mut listed) = listed else {
                    return;
                };
                let mut secrets = self.lock();
                secrets.retain(|key, known| {
                    if !in_scope(key, scope) {
                        return true;
                    }
                    known.version = listed.remove(key);
                    known.kept = known
                        .kept
                        .take()
                        .filter(|e| e.own || known.version.as_ref() == Some(&e.version));
                    !known.is_empty()
                });
                secrets.extend(listed.into_iter().map(|(key, version)| {
                    let known = Known {
                        version: Some(version),
                        kept: None,
                    };
                    (key, known)
                }));
                drop(secrets);
                self.listed
                    .lock()
                    .expect("not poisoned")
                    .insert(scope.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Known>> {
        self.secrets.lock().expect("not poisoned")
    }

    /// Changes what is known of `key`, if anything, and forgets it once
    /// nothing is left.
    fn update(&self, key: Key, change: impl FnOnce(&mut Known)) {
        let mut secrets = self.lock();
        if let Some(known) = secrets.get_mut(&key) {
            change(known);
            if known.is_empty() {
                secrets.remove(&key);
            }
        }
    }

    /// Records a Secret as tokenkeeper just wrote it (the API's answer).
    pub fn wrote(&self, secret: ReadSecret) {
        let Some(version) = secret.resource_version() else {
            return;
        };
        let key = key_of(&secret);
        let entry = Entry::new(version.clone(), secret, true);
        let mut secrets = self.lock();
        let known = secrets.entry(key).or_default();
        known.version = Some(version.into_boxed_str());
        known.kept = Some(entry);
    }

    /// True when `meta` is the version tokenkeeper wrote last: its watch
    /// event is the echo of our own write.
    pub fn is_own_write(&self, meta: &SecretMeta) -> bool {
        let secrets = self.lock();
        secrets
            .get(&key_of(meta))
            .and_then(|known| known.kept.as_ref())
            .is_some_and(|e| {
                e.own && meta.metadata.resource_version.as_deref() == Some(&*e.version)
            })
    }

    /// The Secret as tokenkeeper last wrote it, even if it was changed or
    /// deleted since.
    pub fn last_written(&self, namespace: &str, name: &str) -> Option<Arc<ReadSecret>> {
        let key = key(namespace, name);
        let secrets = self.lock();
        secrets
            .get(&key)
            .and_then(|known| known.kept.as_ref())
            .filter(|e| e.own)
            .map(|e| e.secret(&key))
    }

    /// Forgets what was kept for these Secrets (their connection is gone).
    pub fn forget(&self, namespace: &str, names: &[String]) {
        for name in names {
            self.update(key(namespace, name), |known| known.kept = None);
        }
    }

    /// What the watch says of `key`: `None` before the first listing
    /// completed, `Some(None)` when it does not exist.
    fn known_version(&self, key: &Key) -> Option<Option<Box<str>>> {
        let listed = self.listed.lock().expect("not poisoned");
        if !listed.contains(&None) && !listed.contains(&Some(split(key).0.to_owned())) {
            return None;
        }
        drop(listed);
        Some(self.lock().get(key).and_then(|known| known.version.clone()))
    }

    /// The Secret `name` in `secrets`' namespace: from what was read or
    /// written before when that is still the current version, otherwise
    /// from the API.
    pub async fn get(
        &self,
        secrets: &Api<Secret>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<ReadSecret>>, kube::Error> {
        let key = key(namespace, name);
        match self.known_version(&key) {
            Some(None) => Ok(None),
            Some(Some(version)) => {
                if let Some(entry) = self.lock().get(&key).and_then(|known| known.kept.as_ref())
                    && entry.version == version
                {
                    return Ok(Some(entry.secret(&key)));
                }
                self.read_at(secrets, key, &version).await
            }
            None => self.read(secrets, key).await,
        }
    }

    /// Reads `name` from the API, bypassing what is kept.
    pub async fn get_fresh(
        &self,
        secrets: &Api<Secret>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<ReadSecret>>, kube::Error> {
        self.read(secrets, key(namespace, name)).await
    }

    /// Reads a version the watch already brought: the API server answers
    /// from its watch cache, for about half the control-plane CPU of a read
    /// from etcd (tests/bench/api-cost.sh), and a cold start makes one such
    /// read per connection. A server whose cache lags too far behind
    /// answers 504; etcd answers then.
    async fn read_at(
        &self,
        secrets: &Api<Secret>,
        key: Key,
        version: &str,
    ) -> Result<Option<Arc<ReadSecret>>, kube::Error> {
        match read_view(secrets)
            .get_with(split(&key).1, &GetParams::at(version))
            .await
        {
            Ok(secret) => Ok(Some(self.keep_read(key, secret))),
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                self.update(key, |known| known.kept = None);
                Ok(None)
            }
            Err(kube::Error::Api(status)) if status.code == 504 => self.read(secrets, key).await,
            Err(error) => Err(error),
        }
    }

    async fn read(
        &self,
        secrets: &Api<Secret>,
        key: Key,
    ) -> Result<Option<Arc<ReadSecret>>, kube::Error> {
        let Some(secret) = read_view(secrets).get_opt(split(&key).1).await? else {
            self.update(key, |known| known.kept = None);
            return Ok(None);
        };
        Ok(Some(self.keep_read(key, secret)))
    }

    /// Keeps a Secret read from the API and gives it as kept, so that a
    /// reconcile sees the same whether it was read now or before.
    fn keep_read(&self, key: Key, secret: ReadSecret) -> Arc<ReadSecret> {
        let Some(version) = secret.resource_version() else {
            return Arc::new(secret);
        };
        let entry = Entry::new(version, secret, false);
        let read = entry.secret(&key);
        self.lock().entry(key).or_default().kept = Some(entry);
        read
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
    use crate::api::{FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY};

    fn meta(name: &str, version: &str) -> SecretMeta {
        let mut meta = SecretMeta::default();
        meta.metadata.name = Some(name.into());
        meta.metadata.namespace = Some("data".into());
        meta.metadata.resource_version = Some(version.into());
        meta
    }

    fn secret(name: &str, version: &str) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.into());
        secret.metadata.namespace = Some("data".into());
        secret.metadata.resource_version = Some(version.into());
        secret
    }

    fn key(name: &str) -> Key {
        super::key("data", name)
    }

    const ALL: Scope = None;

    #[test]
    fn a_namespace_is_known_once_its_own_watch_listed() {
        let cache = SecretCache::default();
        let data = Some("data".to_owned());
        let other = Some("other".to_owned());
        cache.observe(&data, &watcher::Event::Init);
        cache.observe(&data, &watcher::Event::InitApply(meta("a", "1")));
        cache.observe(&data, &watcher::Event::InitDone);
        cache.observe(&other, &watcher::Event::Init);
        assert_eq!(cache.known_version(&key("a")), Some(Some("1".into())));
        assert_eq!(
            cache.known_version(&super::key("other", "b")),
            None,
            "not listed yet"
        );
        cache.observe(&other, &watcher::Event::InitDone);
        assert_eq!(
            cache.known_version(&key("a")),
            Some(Some("1".into())),
            "another namespace's listing keeps this one's versions"
        );
    }

    #[test]
    fn nothing_is_known_before_the_first_listing() {
        let cache = SecretCache::default();
        cache.observe(&ALL, &watcher::Event::Apply(meta("a", "1")));
        assert_eq!(cache.known_version(&key("a")), None);
        cache.observe(&ALL, &watcher::Event::Init);
        cache.observe(&ALL, &watcher::Event::InitApply(meta("a", "2")));
        assert_eq!(cache.known_version(&key("a")), None);
        cache.observe(&ALL, &watcher::Event::InitDone);
        assert_eq!(cache.known_version(&key("a")), Some(Some("2".into())));
        assert_eq!(cache.known_version(&key("missing")), Some(None));
    }

    #[test]
    fn own_writes_are_recognised_until_someone_else_writes() {
        let cache = SecretCache::default();
        cache.observe(&ALL, &watcher::Event::Init);
        cache.observe(&ALL, &watcher::Event::InitDone);
        cache.wrote(ReadSecret::new(secret("target", "10")));
        assert!(cache.is_own_write(&meta("target", "10")));
        assert_eq!(cache.known_version(&key("target")), Some(Some("10".into())));
        cache.observe(&ALL, &watcher::Event::Apply(meta("target", "11")));
        assert!(!cache.is_own_write(&meta("target", "11")));
        cache.observe(&ALL, &watcher::Event::Delete(meta("target", "12")));
        assert_eq!(cache.known_version(&key("target")), Some(None));
        assert!(cache.last_written("data", "target").is_some());
        cache.forget("data", &["target".to_owned()]);
        assert!(cache.last_written("data", "target").is_none());
    }

    #[test]
    fn a_kept_secret_reads_back_as_written_without_its_history() {
        let cache = SecretCache::default();
        let mut written = secret("target", "3");
        written.metadata.labels = Some([(LABEL_MANAGED_BY.into(), MANAGED_BY.into())].into());
        written.metadata.annotations =
            Some([("tokenkeeper.dev/issued-at".into(), "t".into())].into());
        written.metadata.uid = Some("uid".into());
        written.type_ = Some("Opaque".into());
        written.data = Some(
            [(
                "access_token".into(),
                k8s_openapi::ByteString(b"at-1".to_vec()),
            )]
            .into(),
        );
        cache.wrote(ReadSecret::new(written.clone()));
        let kept = cache.last_written("data", "target").expect("kept");
        assert_eq!(kept.data, written.data);
        assert_eq!(kept.metadata.annotations, written.metadata.annotations);
        assert_eq!(kept.metadata.labels, written.metadata.labels);
        assert_eq!(
            kept.metadata.uid, None,
            "what reconciling never reads is dropped"
        );
        assert_eq!(kept.metadata.name.as_deref(), Some("target"));
        assert_eq!(kept.metadata.namespace.as_deref(), Some("data"));
        assert_eq!(kept.metadata.resource_version.as_deref(), Some("3"));
        assert_eq!(kept.type_, written.type_);

        let secrets = cache.lock();
        let json = &secrets[&key("target")].kept.as_ref().expect("kept").json;
        let json = std::str::from_utf8(json).unwrap();
        for repeated in [
            "\"kind\"",
            "\"apiVersion\"",
            "\"name\"",
            "\"namespace\"",
            "\"resourceVersion\"",
        ] {
            assert!(
                !json.contains(repeated),
                "{repeated} is in the key or the entry: {json}"
            );
        }
    }

    #[test]
    fn a_kept_secret_keeps_which_of_its_keys_tokenkeeper_owns_not_its_managed_fields() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
        let entry =
            |manager: &str, operation: &str, fields: serde_json::Value| ManagedFieldsEntry {
                manager: Some(manager.into()),
                operation: Some(operation.into()),
                time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                )),
                fields_v1: Some(FieldsV1(fields)),
                ..Default::default()
            };
        let cache = SecretCache::default();
        let mut written = secret("target", "4");
        written.metadata.labels = Some(
            [
                (LABEL_MANAGED_BY.into(), MANAGED_BY.into()),
                ("theirs".into(), "x".into()),
            ]
            .into(),
        );
        written.data = Some(
            [
                ("created".into(), k8s_openapi::ByteString(b"c".to_vec())),
                ("applied".into(), k8s_openapi::ByteString(b"a".to_vec())),
            ]
            .into(),
        );
        let managed_by = format!("f:{LABEL_MANAGED_BY}");
        written.metadata.managed_fields = Some(vec![
            entry(
                FIELD_MANAGER,
                "Update",
                serde_json::json!({
                    "f:metadata": {"f:labels": {&managed_by: {}}, "f:ownerReferences": {}},
                    "f:data": {"f:created": {}, "f:gone": {}},
                    "f:type": {},
                }),
            ),
            entry(
                FIELD_MANAGER,
                "Apply",
                serde_json::json!({
                    "f:metadata": {"f:labels": {&managed_by: {}}},
                    "f:data": {"f:created": {}, "f:applied": {}},
                }),
            ),
            entry(
                "kubectl",
                "Update",
                serde_json::json!({"f:metadata": {"f:labels": {"f:theirs": {}}}}),
            ),
        ]);
        cache.wrote(ReadSecret::new(written.clone()));

        let secrets = cache.lock();
        let kept = secrets[&key("target")].kept.as_ref().expect("kept");
        let json = std::str::from_utf8(&kept.json).unwrap();
        assert!(!json.contains("managedFields"), "{json}");
        drop(secrets);
        let read = cache.last_written("data", "target").expect("kept");
        assert_eq!(read.metadata.managed_fields, None);
        use crate::runtime::wire::{APPLIED, CREATED};
        assert_eq!(
            read.ownership(),
            [APPLIED | CREATED, 0, 0, CREATED],
            "labels managed-by (ours, by the create and any write) and theirs; data applied \
             (by a write that is not the create: not a byte's worth) and created"
        );
        assert_eq!(read.ownership(), ReadSecret::new(written).ownership());
    }

    #[test]
    fn a_relist_updates_versions_and_keeps_own_writes() {
        let cache = SecretCache::default();
        cache.observe(&ALL, &watcher::Event::Init);
        cache.observe(&ALL, &watcher::Event::InitDone);
        cache.wrote(ReadSecret::new(secret("kept", "1")));
        cache.wrote(ReadSecret::new(secret("changed", "1")));
        cache.observe(&ALL, &watcher::Event::Init);
        cache.observe(&ALL, &watcher::Event::InitApply(meta("kept", "1")));
        cache.observe(&ALL, &watcher::Event::InitApply(meta("changed", "5")));
        cache.observe(&ALL, &watcher::Event::InitDone);
        assert!(cache.is_own_write(&meta("kept", "1")));
        assert_eq!(
            cache.known_version(&key("changed")),
            Some(Some("5".into())),
            "the changed Secret is read again"
        );
        assert!(
            cache.last_written("data", "changed").is_some(),
            "what tokenkeeper wrote is kept to restore it"
        );
    }
}
