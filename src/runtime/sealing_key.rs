//! The operator's sealing keys: a Secret in its own namespace, created on
//! first start, read again every few seconds so that a rotation
//! (`kubectl tokenkeeper rotate-key`) takes effect without a restart.
//!
//! A key Secret that disappears or loses a key while the operator runs is
//! written again from memory, loudly (error log, metric): replacing it with
//! a new key would strand every grant sealed with the old one.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{error, info, warn};

use crate::api::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::metrics::Metrics;
use crate::oauth::seal::{EXCHANGE_KEY_FIELD, Keyring, SharedKeyring, key_number, random};

/// How often the key Secret is read again.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Reads the operator's keys, creating the key Secret on first start and
/// adding the X25519 key to one written by an older version. Replicas
/// racing to create it converge on the one that was written first.
pub async fn load_or_create(
    secrets: &Api<Secret>,
    name: &str,
) -> Result<(Keyring, BTreeMap<String, ByteString>), kube::Error> {
    loop {
        let Some(secret) = secrets.get_opt(name).await? else {
            info!(secret = name, "creating the sealing key Secret");
            match secrets
                .create(
                    &PostParams::default(),
                    &key_secret(name, Keyring::generate_data()),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error),
            }
            continue;
        };
        let data = secret.data.unwrap_or_default();
        if !data.contains_key(EXCHANGE_KEY_FIELD) {
            let patch = json!({
                "metadata": {"resourceVersion": secret.metadata.resource_version},
                "data": {EXCHANGE_KEY_FIELD: ByteString(random::<32>().to_vec())},
            });
            match secrets
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error),
            }
            continue;
        }
        let keyring = Keyring::from_data(&data).map_err(|problem| {
            kube::Error::Service(
                format!(
                    "Secret {name}: {problem}; restore it from a backup, or delete it to start \
                     over (every OAuth 2.0 connection then needs to be authorized again)"
                )
                .into(),
            )
        })?;
        return Ok((keyring, data));
    }
}

fn key_secret(name: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                LABEL_MANAGED_BY.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                "tokenkeeper.dev/purpose".to_owned(),
                "Seals the refresh tokens kept in target Secrets. Back it up with the cluster; \
                 without it every OAuth connection must be authorized again. Add a key with \
                 `kubectl tokenkeeper rotate-key`; never remove one that grants still use."
                    .to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// What reading the key Secret again calls for. Pure.
#[derive(Debug, PartialEq)]
pub enum KeyCheck {
    Unchanged,
    /// Keys were added (a rotation): use them.
    Reload(BTreeMap<String, ByteString>),
    /// The Secret is gone or lost keys the operator holds: write these
    /// keys (the ones in memory plus any added) back.
    Restore(BTreeMap<String, ByteString>),
}

pub fn check_keys(
    known: &BTreeMap<String, ByteString>,
    found: Option<&BTreeMap<String, ByteString>>,
) -> KeyCheck {
    let Some(found) = found else {
        return KeyCheck::Restore(known.clone());
    };
    let is_key = |entry: &String| key_number(entry).is_some() || entry == EXCHANGE_KEY_FIELD;
    let lost = known
        .iter()
        .filter(|(entry, _)| is_key(entry))
        .any(|(entry, value)| found.get(entry) != Some(value));
    if lost {
        let mut merged = found.clone();
        merged.extend(known.iter().map(|(k, v)| (k.clone(), v.clone())));
        return KeyCheck::Restore(merged);
    }
    if found
        .keys()
        .any(|entry| is_key(entry) && !known.contains_key(entry))
    {
        return KeyCheck::Reload(found.clone());
    }
    KeyCheck::Unchanged
}

/// Reads the key Secret every `CHECK_INTERVAL`, for the operator's life.
pub async fn keep_keys(
    secrets: Api<Secret>,
    name: String,
    keyring: SharedKeyring,
    mut known: BTreeMap<String, ByteString>,
    metrics: std::sync::Arc<Metrics>,
) {
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let found = match secrets.get_opt(&name).await {
            Ok(found) => found,
            Err(error) => {
                warn!(secret = %name, %error, "could not read the sealing key Secret");
                continue;
            }
        };
        let found_data = found.as_ref().map(|s| s.data.clone().unwrap_or_default());
        match check_keys(&known, found_data.as_ref()) {
            KeyCheck::Unchanged => {}
            KeyCheck::Reload(data) => match Keyring::from_data(&data) {
                Ok(loaded) => {
                    info!(secret = %name, sealing_key = loaded.sealing_key_id(), "new sealing key; grants are sealed with it from their next write");
                    keyring.replace(loaded);
                    known = data;
                }
                Err(problem) => {
                    error!(secret = %name, %problem, "the sealing key Secret holds a bad key; keeping the keys in use");
                }
            },
            KeyCheck::Restore(data) => {
                metrics.sealing_key_restored.inc();
                error!(
                    secret = %name,
                    "the sealing key Secret was deleted or lost keys that sealed grants use; writing the keys back from memory (restore it from a backup if the operator restarted meanwhile)"
                );
                let written = match found {
                    None => secrets
                        .create(&PostParams::default(), &key_secret(&name, data.clone()))
                        .await
                        .map(drop),
                    Some(found) => {
                        let patch = json!({
                            "metadata": {"resourceVersion": found.metadata.resource_version},
                            "data": data,
                        });
                        secrets
                            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                            .map(drop)
                    }
                };
                match written {
                    Ok(()) => {
                        if let Ok(loaded) = Keyring::from_data(&data) {
                            keyring.replace(loaded);
                        }
                        known = data;
                    }
                    Err(error) => {
                        error!(secret = %name, %error, "could not write the sealing key Secret back")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: u8) -> ByteString {
        ByteString(vec![b; 32])
    }

    fn known() -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            ("key".to_owned(), bytes(1)),
            (EXCHANGE_KEY_FIELD.to_owned(), bytes(2)),
        ])
    }

    #[test]
    fn a_deleted_secret_is_restored_with_every_key() {
        assert_eq!(check_keys(&known(), None), KeyCheck::Restore(known()));
    }

    #[test]
    fn an_added_key_is_loaded() {
        let mut found = known();
        found.insert("key-2".into(), bytes(3));
        assert_eq!(
            check_keys(&known(), Some(&found)),
            KeyCheck::Reload(found.clone())
        );
        assert_eq!(check_keys(&found, Some(&found)), KeyCheck::Unchanged);
    }

    #[test]
    fn a_removed_or_replaced_key_is_written_back() {
        let mut replaced = known();
        replaced.insert("key".into(), bytes(9));
        assert_eq!(
            check_keys(&known(), Some(&replaced)),
            KeyCheck::Restore(known())
        );
        let mut removed = known();
        removed.remove(EXCHANGE_KEY_FIELD);
        removed.insert("key-2".into(), bytes(3));
        let mut merged = known();
        merged.insert("key-2".into(), bytes(3));
        assert_eq!(
            check_keys(&known(), Some(&removed)),
            KeyCheck::Restore(merged)
        );
    }
}
