//! Writes of the Secrets tokenkeeper manages: the target Secret (only when
//! it differs from what is wanted) and the operator-private state Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tracing::debug;

use crate::api::{FIELD_MANAGER, SourceConnection};
use crate::decide::secrets::{check_size, needs_write, stale_fields, state_secret};
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
    let secret = match write_secret(secrets, existing, desired).await {
        Ok(written) => written,
        Err(kube::Error::Api(status)) if is_refusal(status.code) => {
            return Err(Error::SecretWriteFailed {
                namespace: desired.namespace().unwrap_or_default(),
                fix: refusal_fix(status.code, &conn.name_any(), &name),
                name,
                code: status.code,
                message: status.message,
            });
        }
        Err(error) => return Err(error.into()),
    };
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
    secrets: &Api<Secret>,
    existing: Option<&ReadSecret>,
    desired: &Secret,
) -> Result<ReadSecret, kube::Error> {
    let name = desired.name_any();
    match existing {
        None => {
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            match secrets.create(&params, desired).await {
                // Created meanwhile by someone else (the watch had not told
                // yet): applied over, as a server-side apply create would.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                other => return other.map(ReadSecret::new),
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
                    .await?;
            }
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    read_view(secrets)
        .patch(&name, &params, &Patch::Apply(desired))
        .await
}

/// Creates the state Secret, or replaces the version `resource_version`
/// names: a write that lost a race fails with 409 instead of overwriting.
pub async fn store_state_secret(
    secrets: &Api<Secret>,
    conn: &SourceConnection,
    resource_version: Option<String>,
    data: BTreeMap<String, ByteString>,
) -> Result<Secret, kube::Error> {
    let mut desired = state_secret(conn, data);
    match resource_version {
        None => secrets.create(&PostParams::default(), &desired).await,
        Some(version) => {
            desired.metadata.resource_version = Some(version);
            secrets
                .replace(&desired.name_any(), &PostParams::default(), &desired)
                .await
        }
    }
}
