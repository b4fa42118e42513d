//! The operator's sealing key: a Secret in its own namespace, created on
//! first start.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::api::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::oauth::seal::{KEY_FIELD, SealingKey, random};

/// Reads the operator's sealing key, creating it on first start. Replicas
/// racing to create it converge on the one that was written first.
pub async fn load_or_create(secrets: &Api<Secret>, name: &str) -> Result<SealingKey, kube::Error> {
    loop {
        if let Some(secret) = secrets.get_opt(name).await? {
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(KEY_FIELD))
                .map(|v| v.0.clone())
                .unwrap_or_default();
            return SealingKey::from_bytes(&bytes).ok_or_else(|| {
                kube::Error::Service(
                    format!(
                        "Secret {name} does not hold a 32-byte key under \"{KEY_FIELD}\"; \
                         restore it from a backup, or delete it to start over (every \
                         connection then needs to be authorized again)"
                    )
                    .into(),
                )
            });
        }
        let bytes = random::<32>();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([(
                    LABEL_MANAGED_BY.to_owned(),
                    MANAGED_BY.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([(
                    "tokenkeeper.dev/purpose".to_owned(),
                    "Seals the refresh tokens kept in target Secrets. Back it up with the \
                     cluster; without it every OAuth connection must be authorized again."
                        .to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                KEY_FIELD.to_owned(),
                ByteString(bytes.to_vec()),
            )])),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(error),
        }
    }
}
