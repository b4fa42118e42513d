//! Status writes, each made once.
//!
//! A connection can be reconciled again before the watch brings back the
//! status tokenkeeper just wrote (the first listing of the Secrets it reads
//! and the echo of its target Secret both wake it). The cache then still
//! shows the connection as it was before the write, and the same status
//! would be written a second time. So a write is remembered with the
//! resourceVersion of the connection it was decided on: while the cache
//! still shows that version, the same status is not written again; any
//! other version (the echo, or someone else's change) forgets it.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::{FIELD_MANAGER, SourceConnection, SourceConnectionStatus};
use crate::runtime::object_key::{Key, key_of};

/// Writes a connection's status by server-side apply, once per change.
pub struct StatusWriter {
    client: Client,
    echoes: StatusEchoes,
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        StatusWriter {
            client,
            echoes: StatusEchoes::default(),
        }
    }

    /// Writes `desired` unless it is written already (onto the version of
    /// `conn` the cache still shows).
    pub async fn write(
        &self,
        conn: &SourceConnection,
        desired: &SourceConnectionStatus,
    ) -> Result<(), kube::Error> {
        let key = key_of(conn);
        let version = conn.resource_version().unwrap_or_default();
        if self.echoes.already_written(&key, &version, desired) {
            return Ok(());
        }
        let api: Api<SourceConnection> =
            Api::namespaced(self.client.clone(), &conn.namespace().unwrap_or_default());
        let body = json!({
            "apiVersion": SourceConnection::api_version(&()),
            "kind": SourceConnection::kind(&()),
            "status": desired,
        });
        api.patch_status(
            &conn.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        self.echoes.wrote(key, &version, desired);
        Ok(())
    }

    /// The cache shows `version` of the connection now (`None`: deleted).
    pub fn observed(&self, key: &Key, version: Option<&str>) {
        self.echoes.observed(key, version);
    }
}

#[derive(Default)]
struct StatusEchoes {
    pending: Mutex<HashMap<Key, Pending>>,
}

struct Pending {
    /// The connection's resourceVersion the write was decided on.
    decided_on: Box<str>,
    written: u64,
}

impl StatusEchoes {
    /// Records that `status` was written onto version `decided_on`.
    pub fn wrote(&self, key: Key, decided_on: &str, status: &SourceConnectionStatus) {
        let pending = Pending {
            decided_on: decided_on.into(),
            written: fingerprint(status),
        };
        self.lock().insert(key, pending);
    }

    /// True when `status` was already written onto `version`, the version
    /// the cache still shows.
    pub fn already_written(
        &self,
        key: &Key,
        version: &str,
        status: &SourceConnectionStatus,
    ) -> bool {
        let mut pending = self.lock();
        match pending.get(key) {
            Some(write) if &*write.decided_on == version => write.written == fingerprint(status),
            Some(_) => {
                pending.remove(key);
                false
            }
            None => false,
        }
    }

    /// The cache shows `version` of the connection now (`None`: deleted).
    pub fn observed(&self, key: &Key, version: Option<&str>) {
        let mut pending = self.lock();
        if pending
            .get(key)
            .is_some_and(|write| Some(&*write.decided_on) != version)
        {
            pending.remove(key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pending>> {
        self.pending.lock().expect("not poisoned")
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The status without its transition times: a second reconcile in a later
/// second would stamp a later time on the same change, and the first
/// write's time is the right one.
fn fingerprint(status: &SourceConnectionStatus) -> u64 {
    let mut status = status.clone();
    for condition in &mut status.conditions {
        condition.last_transition_time = Time(jiff::Timestamp::UNIX_EPOCH);
    }
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(&status)
        .expect("a status serializes")
        .hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn status(reason: &str, second: i64) -> SourceConnectionStatus {
        SourceConnectionStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: reason.into(),
                message: "m".into(),
                observed_generation: Some(1),
                last_transition_time: Time(jiff::Timestamp::from_second(second).unwrap()),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_same_status_is_not_written_twice_onto_the_same_version() {
        let echoes = StatusEchoes::default();
        let key: Key = "ns/a".into();
        echoes.wrote(key.clone(), "5", &status("SecretSynced", 100));
        assert!(echoes.already_written(&key, "5", &status("SecretSynced", 101)));
        assert!(!echoes.already_written(&key, "5", &status("InvalidGrant", 101)));
    }

    #[test]
    fn any_other_version_forgets_the_write() {
        let echoes = StatusEchoes::default();
        let key: Key = "ns/a".into();
        echoes.wrote(key.clone(), "5", &status("SecretSynced", 100));
        echoes.observed(&key, Some("5"));
        assert_eq!(echoes.len(), 1, "a relisted old version is no echo");
        echoes.observed(&key, Some("6"));
        assert_eq!(echoes.len(), 0);

        // The echo came before the write was recorded: the next look at
        // a newer version forgets it.
        echoes.wrote(key.clone(), "6", &status("SecretSynced", 100));
        assert!(!echoes.already_written(&key, "7", &status("SecretSynced", 100)));
        assert_eq!(echoes.len(), 0);

        echoes.wrote(key.clone(), "8", &status("SecretSynced", 100));
        echoes.observed(&key, None);
        assert_eq!(echoes.len(), 0, "deleted");
    }
}
