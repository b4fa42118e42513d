//! Writes of the Secrets tokenkeeper manages: the target Secret (only when
//! it differs from what is wanted) and the operator-private state Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use tracing::debug;

use crate::api::{FIELD_MANAGER, SourceConnection};
use crate::decide::secrets::{
    check_ownership, check_size, is_own_target, needs_write, stale_fields, state_secret,
};
use crate::decide::status::{Note, display_name};
use crate::error::{Error, Reason};
use crate::runtime::secret_cache::read_view;
use crate::runtime::wire::ReadSecret;

/// What a target Secret write did.
pub struct Written {
    /// The Secret as the API answered the write.
    pub secret: ReadSecret,
    pub note: Note,
}

/// Applies `desired` when the cluster's copy (`existing`) differs; returns
/// the Secret as written and a note that says so, or `None` when nothing
/// needed writing.
pub async fn apply_if_changed(
    conn: &SourceConnection,
    secrets: &Api<Secret>,
    existing: Option<&ReadSecret>,
    desired: &Secret,
) -> Result<Option<Written>, Error> {
    if !needs_write(existing, desired) {
        return Ok(None);
    }
    check_size(desired)?;
    let name = desired.name_any();
    let secret = write_secret(conn, secrets, existing, desired).await?;
    let verb = if existing.is_some() {
        "Updated"
    } else {
        "Created"
    };
    debug!(connection = %display_name(conn), secret = %name, "{verb} Secret");
    Ok(Some(Written {
        secret,
        note: Note::normal(
            Reason::SecretSynced,
            format!("{verb} Secret {name} with the current credentials"),
        ),
    }))
}

/// An answer that says the write itself is refused, so that sending it
/// again unchanged fails again: unlike a conflict (409, resolved by the
/// next read), throttling (429) or a namespace being deleted (404).
fn is_refusal(code: u16) -> bool {
    (400..500).contains(&code) && !matches!(code, 404 | 409 | 429)
}

/// What to do about a refused write, by the API's answer.
fn refusal_fix(code: u16, connection: &str, secret: &str) -> String {
    match code {
        403 => "A ResourceQuota or an admission policy forbids it, or tokenkeeper's \
                ServiceAccount lacks RBAC for Secrets here: kubectl describe resourcequota; \
                kubectl auth can-i create secrets \
                --as=system:serviceaccount:<operator namespace>:tokenkeeper"
            .to_owned(),
        413 => format!("Secret {secret} is too large for the API server."),
        422 => format!(
            "Fix spec.target (labels, annotations, name) of SourceConnection {connection} so \
             that it makes a valid Secret."
        ),
        _ => "tokenkeeper retries with backoff; kubectl get events shows each attempt.".to_owned(),
    }
}

/// Creates the Secret when there is none (a plain create costs the control
/// plane less than a server-side apply that creates), and otherwise applies
/// it, first removing what the create set and is no longer wanted (see
/// `decide::secrets::stale_fields`).
async fn write_secret(
    conn: &SourceConnection,
    secrets: &Api<Secret>,
    existing: Option<&ReadSecret>,
    desired: &Secret,
) -> Result<ReadSecret, Error> {
    let name = desired.name_any();
    let refused = |error| write_error(conn, desired, error);
    match existing {
        None => {
            #[cfg(feature = "fault-injection")]
            crate::fault::create_in_the_way(conn, secrets, &name).await;
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            match secrets.create(&params, desired).await {
                // Created meanwhile (the watch had not told yet): applied
                // over only when it is this connection's, never taken over.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let found = secrets.get_opt(&name).await?;
                    check_ownership(conn, found.as_ref())?;
                }
                other => return other.map(ReadSecret::new).map_err(refused),
            }
        }
        Some(existing) => {
            let stale = stale_fields(existing, desired);
            if !stale.is_empty() {
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..Default::default()
                };
                secrets
                    .patch(&name, &params, &Patch::Merge(stale.removal_patch()))
                    .await
                    .map_err(refused)?;
            }
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    read_view(secrets)
        .patch(&name, &params, &Patch::Apply(desired))
        .await
        .map_err(refused)
}

/// A failed write as the connection reports it: a refusal says why and
/// what to do; anything else is retried.
fn write_error(conn: &SourceConnection, desired: &Secret, error: kube::Error) -> Error {
    match error {
        kube::Error::Api(status) if is_refusal(status.code) => {
            let name = desired.name_any();
            Error::SecretWriteFailed {
                namespace: desired.namespace().unwrap_or_default(),
                fix: refusal_fix(status.code, &conn.name_any(), &name),
                name,
                code: status.code,
                message: status.message,
            }
        }
        error => error.into(),
    }
}

/// Deletes Secret `old`, which `conn` wrote before its target was renamed
/// and which still holds live credentials; only when it is exactly that
/// Secret (owned by `conn`, labelled as its credentials, unchanged since
/// read). `None` when there was nothing to delete.
pub async fn delete_renamed_target(
    conn: &SourceConnection,
    secrets: &Api<Secret>,
    old: &str,
) -> Result<Option<Note>, Error> {
    let Some(found) = secrets.get_opt(old).await? else {
        return Ok(None);
    };
    if !is_own_target(conn, &found) {
        return Ok(None);
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: found.uid(),
            resource_version: found.resource_version(),
        }),
        ..Default::default()
    };
    match secrets.delete(old, &params).await {
        Ok(_) => Ok(Some(Note::normal(
            Reason::RenamedSecretDeleted,
            format!(
                "Deleted Secret {old}: spec.target.name now names {}, and the old Secret still \
                 held live credentials",
                conn.target_secret_name()
            ),
        ))),
        Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Creates the state Secret, or changes the version `existing` is to hold
/// exactly `data`: a write that lost a race fails with 409 instead of
/// overwriting. A merge patch carrying the resourceVersion does that with
/// the `patch` verb, so the operator needs no `update` on Secrets.
pub async fn store_state_secret(
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    existing: Option<&Secret>,
    data: BTreeMap<String, ByteString>,
) -> Result<Secret, kube::Error> {
    let desired = state_secret(conn, data);
    let Some(existing) = existing else {
        return secrets.create(&PostParams::default(), &desired).await;
    };
    let patch = state_patch(existing, &desired);
    secrets
        .patch(
            &desired.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
}

/// The merge patch that turns `existing` into `desired` (data, labels,
/// annotations, owners), conditional on `existing`'s version.
fn state_patch(existing: &Secret, desired: &Secret) -> serde_json::Value {
    let mut data = serde_json::Map::new();
    for key in existing.data.iter().flat_map(|d| d.keys()) {
        data.insert(key.clone(), serde_json::Value::Null);
    }
    for (key, value) in desired.data.iter().flatten() {
        data.insert(
            key.clone(),
            serde_json::to_value(value).expect("bytes serialize"),
        );
    }
    serde_json::json!({
        "metadata": {
            "resourceVersion": existing.resource_version(),
            "labels": desired.metadata.labels,
            "annotations": desired.metadata.annotations,
            "ownerReferences": desired.metadata.owner_references,
        },
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_patch_removes_what_is_no_longer_wanted_and_is_conditional() {
        let mut existing = Secret::default();
        existing.metadata.resource_version = Some("41".into());
        existing.data = Some(BTreeMap::from([
            ("old".to_owned(), ByteString(b"x".to_vec())),
            ("kept".to_owned(), ByteString(b"y".to_vec())),
        ]));
        let desired = Secret {
            data: Some(BTreeMap::from([(
                "kept".to_owned(),
                ByteString(b"z".to_vec()),
            )])),
            ..Default::default()
        };
        let patch = state_patch(&existing, &desired);
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
        assert_eq!(patch["data"]["old"], serde_json::Value::Null);
        assert_eq!(patch["data"]["kept"], "eg==");
    }
}
