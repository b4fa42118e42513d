//! Basic and API-key connections: copy the user's Secret into the target.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

use crate::api::SourceConnection;
use crate::decide::secrets::{
    check_ownership, check_source, example_literals, static_credentials, static_source,
    target_secret,
};
use crate::decide::status::{Report, TokenStatus, Verdict};
use crate::decide::validate::StaticMethod;
use crate::error::Error;
use crate::reconcile::{Context, Next, Synced};
use crate::runtime::wire::ReadSecret;
use crate::write::secret::apply_if_changed;

/// Static credentials are re-read this often even without a watch event,
/// as a safety net; watches normally bring changes within a second.
const RESYNC_INTERVAL: Duration = Duration::from_secs(3600);

pub async fn sync(
    conn: &SourceConnection,
    method: StaticMethod<'_>,
    ctx: &Context,
) -> Result<Synced, Error> {
    let namespace = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let (source_name, field) = static_source(method);
    let source = ctx
        .secrets
        .get(&secrets, &namespace, source_name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            namespace: namespace.clone(),
            name: source_name.to_owned(),
            field,
            example_literals: example_literals(method),
        })?;
    check_source(conn, &source, field, ctx.limits.require_source_label)?;
    let data = static_credentials(method, &source)?;

    let target_name = conn.target_secret_name();
    let existing = ctx.secrets.get(&secrets, &namespace, &target_name).await?;
    check_ownership(conn, existing.as_deref().map(ReadSecret::secret))?;
    let desired = target_secret(conn, data, BTreeMap::new());
    let mut notes = Vec::new();
    if let Some(written) = apply_if_changed(conn, &secrets, existing.as_deref(), &desired).await? {
        ctx.secrets.wrote(written.secret);
        notes.push(written.note);
    }
    Ok(Synced {
        report: Report {
            verdict: Some(Verdict::ready(format!(
                "Secret {target_name} holds the current credentials."
            ))),
            secret_name: Some(target_name),
            token: Some(TokenStatus::default()),
        },
        next: Next::In(RESYNC_INTERVAL),
        notes,
        token_times: None,
    })
}
