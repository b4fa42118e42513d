//! The Secrets of a SourceConnection as pure values: the values read from
//! the user's Secrets, the target and state Secrets tokenkeeper wants, and
//! whether the copy in the cluster is ours and already says that. No I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::{
    LABEL_CONNECTION, LABEL_MANAGED_BY, LABEL_SECRET_ROLE, MANAGED_BY, OAuth2Auth,
    SECRET_ROLE_CREDENTIALS, SECRET_ROLE_STATE, SourceConnection, target_keys,
};
use crate::decide::validate::StaticMethod;
use crate::error::Error;
use crate::runtime::wire::{APPLIED, CREATED, ReadSecret};

/// The keys the target Secret holds for a static method, read from the
/// user's source Secret.
pub fn static_credentials(
    method: StaticMethod<'_>,
    source: &Secret,
) -> Result<BTreeMap<String, ByteString>, Error> {
    let wanted: Vec<(&str, &str, &'static str)> = match method {
        StaticMethod::Basic(basic) => vec![
            (
                target_keys::USERNAME,
                basic.secret_ref.username_key.as_str(),
                "basic.secretRef.usernameKey",
            ),
            (
                target_keys::PASSWORD,
                basic.secret_ref.password_key.as_str(),
                "basic.secretRef.passwordKey",
            ),
        ],
        StaticMethod::ApiKey(api_key) => vec![(
            target_keys::API_KEY,
            api_key.secret_ref.key.as_str(),
            "apiKey.secretRef.key",
        )],
    };
    let mut data = BTreeMap::new();
    for (target_key, source_key, field) in wanted {
        let value = secret_key(source, source_key, field)?;
        data.insert(target_key.to_owned(), ByteString(value));
    }
    Ok(data)
}

/// The non-empty value of `key` in `secret`, or `MissingKey` naming the
/// keys the Secret does have (never their values).
pub fn secret_key(secret: &Secret, key: &str, field: &'static str) -> Result<Vec<u8>, Error> {
    let values = secret_values(secret);
    match values.get(key) {
        Some(value) if !value.is_empty() => Ok(value.clone()),
        _ => {
            let present: Vec<&str> = values.keys().map(String::as_str).collect();
            Err(Error::MissingKey {
                namespace: secret.namespace().unwrap_or_default(),
                name: secret.name_any(),
                key: key.to_owned(),
                field,
                present: if present.is_empty() {
                    " (it has no keys)".to_owned()
                } else {
                    format!(" (it has: {})", present.join(", "))
                },
            })
        }
    }
}

/// The client id and secret of an OAuth 2.0 connection, from its client
/// Secret as read (`None`: it does not exist) in `namespace`.
pub fn client_credentials(
    oauth: &OAuth2Auth,
    namespace: &str,
    secret: Option<&Secret>,
) -> Result<(String, String), Error> {
    let reference = &oauth.client.secret_ref;
    let secret = secret.ok_or_else(|| Error::SecretNotFound {
        namespace: namespace.to_owned(),
        name: reference.name.clone(),
        field: "oauth2.client.secretRef",
        example_literals: format!(
            "--from-literal={}=CLIENT_ID --from-literal={}=CLIENT_SECRET",
            reference.client_id_key, reference.client_secret_key
        ),
    })?;
    Ok((
        text(secret_key(
            secret,
            &reference.client_id_key,
            "oauth2.client.secretRef.clientIdKey",
        )?),
        text(secret_key(
            secret,
            &reference.client_secret_key,
            "oauth2.client.secretRef.clientSecretKey",
        )?),
    ))
}

/// The label that marks a Secret any connection of its namespace may read
/// (with `--require-source-label`).
pub const LABEL_SOURCE: &str = "tokenkeeper.dev/source";
/// The annotation that names the connections (comma-separated) that may
/// read a Secret (with `--require-source-label`).
pub const ANNOTATION_SOURCE_FOR: &str = "tokenkeeper.dev/source-for";

/// With `required` (`--require-source-label`), the Secret that `conn`
/// reads for `field` must say it may be: labelled as a source, or naming
/// `conn` in its annotation.
pub fn check_source(
    conn: &SourceConnection,
    secret: &Secret,
    field: &'static str,
    required: bool,
) -> Result<(), Error> {
    let name = conn.name_any();
    let labelled = secret.labels().get(LABEL_SOURCE).map(String::as_str) == Some("true");
    let named = secret
        .annotations()
        .get(ANNOTATION_SOURCE_FOR)
        .is_some_and(|list| list.split(',').any(|entry| entry.trim() == name));
    if !required || labelled || named {
        return Ok(());
    }
    Err(Error::SourceNotAllowed {
        namespace: secret.namespace().unwrap_or_default(),
        name: secret.name_any(),
        field,
        connection: name,
    })
}

/// A secret value as text, without the line break `echo` and editors add.
pub fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// The user's Secret that a static method copies, by name and spec field.
pub fn static_source(method: StaticMethod<'_>) -> (&str, &'static str) {
    match method {
        StaticMethod::Basic(basic) => (&basic.secret_ref.name, "basic.secretRef"),
        StaticMethod::ApiKey(api_key) => (&api_key.secret_ref.name, "apiKey.secretRef"),
    }
}

/// Example `--from-literal` flags for the kubectl command that creates a
/// missing source Secret.
pub fn example_literals(method: StaticMethod<'_>) -> String {
    match method {
        StaticMethod::Basic(basic) => format!(
            "--from-literal={}=USERNAME --from-literal={}=PASSWORD",
            basic.secret_ref.username_key, basic.secret_ref.password_key
        ),
        StaticMethod::ApiKey(api_key) => {
            format!("--from-literal={}=API_KEY", api_key.secret_ref.key)
        }
    }
}

/// A Secret's values by key, merging `stringData` (which the API server
/// folds into `data`, but an unsaved object may still carry).
fn secret_values(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut values: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(key, value)| (key.clone(), value.0.clone()))
        .collect();
    for (key, value) in secret.string_data.iter().flatten() {
        values.insert(key.clone(), value.clone().into_bytes());
    }
    values
}

/// The target Secret as tokenkeeper wants it: the given data, the user's
/// labels and annotations plus tokenkeeper's own labels, and a controller
/// owner reference so that it goes when the SourceConnection goes.
pub fn target_secret(
    conn: &SourceConnection,
    data: BTreeMap<String, ByteString>,
    own_annotations: BTreeMap<String, String>,
) -> Secret {
    let mut labels = conn.spec.target.labels.clone();
    labels.extend(managed_labels(conn, SECRET_ROLE_CREDENTIALS));
    let mut annotations = conn.spec.target.annotations.clone();
    annotations.extend(own_annotations);
    managed_secret(conn, conn.target_secret_name(), labels, annotations, data)
}

/// The operator-private state Secret of an OAuth 2.0 connection.
pub fn state_secret(conn: &SourceConnection, data: BTreeMap<String, ByteString>) -> Secret {
    let annotations = BTreeMap::from([(
        "tokenkeeper.dev/description".to_owned(),
        format!(
            "Operator-private state of SourceConnection {}: a pending authorization, or a \
             grant just given until tokenkeeper moves it into Secret {}. Do not mount, copy \
             or edit.",
            conn.name_any(),
            conn.target_secret_name()
        ),
    )]);
    managed_secret(
        conn,
        conn.state_secret_name(),
        managed_labels(conn, SECRET_ROLE_STATE),
        annotations,
        data,
    )
}

fn managed_labels(conn: &SourceConnection, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_CONNECTION.to_owned(), conn.name_any()),
        (LABEL_SECRET_ROLE.to_owned(), role.to_owned()),
    ])
}

fn managed_secret(
    conn: &SourceConnection,
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    data: BTreeMap<String, ByteString>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: conn.namespace(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: conn.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The most bytes of values a Secret's data may hold (the API server's
/// `MaxSecretSize`).
pub const MAX_SECRET_DATA_BYTES: usize = 1024 * 1024;
/// The most bytes of keys and values an object's annotations may hold.
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;

/// Refuses a Secret the API server would refuse for its size, before it is
/// sent: the connection then says which part is too large and why.
pub fn check_size(desired: &Secret) -> Result<(), Error> {
    let data: usize = desired.data.iter().flatten().map(|(_, v)| v.0.len()).sum();
    let annotations: usize = desired
        .annotations()
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    let too_large = |part, size, limit, fix| Error::SecretTooLarge {
        namespace: desired.namespace().unwrap_or_default(),
        name: desired.name_any(),
        part,
        size,
        limit,
        fix,
    };
    if data > MAX_SECRET_DATA_BYTES {
        return Err(too_large(
            "data",
            data,
            MAX_SECRET_DATA_BYTES,
            "The provider's answer is that large: list fewer spec.oauth2.responseFields, or \
             ask the provider for smaller tokens.",
        ));
    }
    if annotations > MAX_ANNOTATION_BYTES {
        return Err(too_large(
            "annotations",
            annotations,
            MAX_ANNOTATION_BYTES,
            "Shorten spec.target.annotations; the sealed refresh token is kept there too, so a \
             provider whose refresh tokens are that large cannot be served.",
        ));
    }
    Ok(())
}

/// Refuses to take over a Secret that this SourceConnection does not own.
pub fn check_ownership(conn: &SourceConnection, existing: Option<&Secret>) -> Result<(), Error> {
    match existing {
        Some(existing) if !is_owned_by(conn, existing) => Err(Error::TargetSecretConflict {
            namespace: existing.namespace().unwrap_or_default(),
            name: existing.name_any(),
        }),
        _ => Ok(()),
    }
}

/// Like `check_ownership`, for the state Secret, whose name the user
/// cannot choose.
pub fn check_state_ownership(
    conn: &SourceConnection,
    existing: Option<&Secret>,
) -> Result<(), Error> {
    match existing {
        Some(existing) if !is_owned_by(conn, existing) => Err(Error::StateSecretConflict {
            namespace: existing.namespace().unwrap_or_default(),
            name: existing.name_any(),
        }),
        _ => Ok(()),
    }
}

/// The Secret `conn` wrote its credentials to before `spec.target.name`
/// changed, as its status says.
pub fn renamed_target(conn: &SourceConnection) -> Option<String> {
    let written = conn.status.as_ref()?.secret_name.clone()?;
    (written != conn.target_secret_name()).then_some(written)
}

/// Whether `secret` is a target Secret `conn` wrote: owned by it and
/// labelled as its credentials (never its state Secret or a user's).
pub fn is_own_target(conn: &SourceConnection, secret: &Secret) -> bool {
    is_owned_by(conn, secret)
        && secret.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        && secret.labels().get(LABEL_SECRET_ROLE).map(String::as_str)
            == Some(SECRET_ROLE_CREDENTIALS)
}

fn is_owned_by(conn: &SourceConnection, secret: &Secret) -> bool {
    let uid = conn.uid();
    secret
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && Some(&owner.uid) == uid.as_ref())
}

/// Whether the Secret in the cluster differs from what tokenkeeper wants,
/// including labels or annotations tokenkeeper applied earlier and no
/// longer wants. Fields other writers added are left alone.
pub fn needs_write(existing: Option<&ReadSecret>, desired: &Secret) -> bool {
    let Some(existing) = existing else {
        return true;
    };
    if existing.data.as_ref().map(|d| d.len()) != desired.data.as_ref().map(|d| d.len())
        || desired
            .data
            .iter()
            .flatten()
            .any(|(key, value)| existing.data.as_ref().and_then(|d| d.get(key)) != Some(value))
    {
        return true;
    }
    if existing.type_ != desired.type_ {
        return true;
    }
    let desired_owners = desired.owner_references();
    if desired_owners
        .iter()
        .any(|owner| !existing.owner_references().contains(owner))
    {
        return true;
    }
    let applied = existing.owned_keys(APPLIED);
    map_differs(existing.labels(), desired.labels(), &applied.labels)
        || map_differs(
            existing.annotations(),
            desired.annotations(),
            &applied.annotations,
        )
}

fn map_differs(
    existing: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
    previously_applied: &[&String],
) -> bool {
    desired
        .iter()
        .any(|(key, value)| existing.get(key) != Some(value))
        || previously_applied
            .iter()
            .any(|key| !desired.contains_key(*key) && existing.contains_key(*key))
}

/// Keys of a target Secret that tokenkeeper set when it created the Secret
/// and no longer wants.
///
/// tokenkeeper creates a target Secret with a plain create, which costs
/// the control plane less than a server-side apply that creates
/// (tests/bench/api-cost.sh), and writes it by server-side apply from then
/// on. The create leaves an entry of operation `Update` in managedFields
/// that keeps owning what it set, and server-side apply does not remove a
/// field another entry still owns: these keys are removed by a merge patch.
#[derive(Debug, Default, PartialEq)]
pub struct StaleFields {
    labels: BTreeSet<String>,
    annotations: BTreeSet<String>,
    data: BTreeSet<String>,
}

impl StaleFields {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty() && self.data.is_empty()
    }

    /// A JSON merge patch that removes the keys.
    pub fn removal_patch(&self) -> serde_json::Value {
        let nulls = |keys: &BTreeSet<String>| {
            keys.iter()
                .map(|key| (key.clone(), serde_json::Value::Null))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "metadata": {"labels": nulls(&self.labels), "annotations": nulls(&self.annotations)},
            "data": nulls(&self.data),
        })
    }
}

pub fn stale_fields(existing: &ReadSecret, desired: &Secret) -> StaleFields {
    let created = existing.owned_keys(CREATED);
    let no_data = BTreeMap::new();
    let desired_data = desired.data.as_ref().unwrap_or(&no_data);
    StaleFields {
        labels: unwanted(created.labels, desired.labels()),
        annotations: unwanted(created.annotations, desired.annotations()),
        data: unwanted(created.data, desired_data),
    }
}

/// The `owned` keys (of the Secret) that `want` does not hold.
fn unwanted<V>(owned: Vec<&String>, want: &BTreeMap<String, V>) -> BTreeSet<String> {
    owned
        .into_iter()
        .filter(|key| !want.contains_key(*key))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        ApiKeyAuth, ApiKeySecretRef, BasicAuth, BasicAuthSecretRef, FIELD_MANAGER,
        SourceConnectionSpec,
    };
    use crate::decide::validate::{Method, validate};
    use crate::runtime::wire::secret::{entry_keys, is_create_entry};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    /// The static method a test connection names.
    fn static_method(conn: &SourceConnection) -> StaticMethod<'_> {
        match validate(conn).unwrap() {
            Method::Static(method) => method,
            Method::OAuth2(_) => panic!("a static connection"),
        }
    }

    fn basic_conn() -> SourceConnection {
        let mut conn = SourceConnection::new(
            "warehouse",
            SourceConnectionSpec {
                basic: Some(BasicAuth {
                    secret_ref: BasicAuthSecretRef {
                        name: "warehouse-login".into(),
                        namespace: None,
                        username_key: "user".into(),
                        password_key: "pass".into(),
                    },
                }),
                api_key: None,
                oauth2: None,
                target: Default::default(),
            },
        );
        conn.metadata.namespace = Some("extract".into());
        conn.metadata.uid = Some("uid-1".into());
        conn
    }

    fn secret(name: &str, pairs: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("extract".into()),
                ..Default::default()
            },
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn basic_maps_configured_keys_to_stable_target_keys() {
        let conn = basic_conn();
        let method = static_method(&conn);
        let source = secret(
            "warehouse-login",
            &[("user", "etl"), ("pass", "s3cret"), ("other", "x")],
        );
        let data = static_credentials(method, &source).unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            vec!["password", "username"]
        );
        assert_eq!(data["username"].0, b"etl");
        assert_eq!(data["password"].0, b"s3cret");
    }

    #[test]
    fn missing_key_names_the_keys_present_but_no_values() {
        let conn = basic_conn();
        let method = static_method(&conn);
        let source = secret(
            "warehouse-login",
            &[("user", "etl"), ("password", "hunter2")],
        );
        let err = static_credentials(method, &source).unwrap_err();
        assert_eq!(err.reason(), "MissingKey");
        let text = err.to_string();
        assert!(text.contains("\"pass\""), "{text}");
        assert!(text.contains("it has: password, user"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("etl\""),
            "{text}"
        );
    }

    #[test]
    fn empty_value_counts_as_missing() {
        let conn = basic_conn();
        let method = static_method(&conn);
        let source = secret("warehouse-login", &[("user", "etl"), ("pass", "")]);
        assert_eq!(
            static_credentials(method, &source).unwrap_err().reason(),
            "MissingKey"
        );
    }

    #[test]
    fn cross_namespace_reference_is_refused() {
        let mut conn = basic_conn();
        conn.spec.basic.as_mut().unwrap().secret_ref.namespace = Some("kube-system".into());
        let err = validate(&conn).unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(err.to_string().contains("kube-system"));
        conn.spec.basic.as_mut().unwrap().secret_ref.namespace = Some("extract".into());
        assert!(validate(&conn).is_ok());
    }

    #[test]
    fn exactly_one_method() {
        let mut conn = basic_conn();
        conn.spec.api_key = Some(ApiKeyAuth {
            secret_ref: ApiKeySecretRef {
                name: "k".into(),
                namespace: None,
                key: "api_key".into(),
            },
        });
        assert!(
            validate(&conn)
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
        conn.spec.basic = None;
        conn.spec.api_key = None;
        assert!(
            validate(&conn)
                .unwrap_err()
                .to_string()
                .contains("no authentication method")
        );
    }

    #[test]
    fn target_may_not_overwrite_an_input_or_be_malformed() {
        let mut conn = basic_conn();
        conn.spec.target.name = Some("warehouse-login".into());
        assert!(
            validate(&conn)
                .unwrap_err()
                .to_string()
                .contains("overwrite the input")
        );
        conn.spec.target.name = Some("Bad_Name".into());
        assert!(
            validate(&conn)
                .unwrap_err()
                .to_string()
                .contains("not a valid Secret name")
        );
        conn.spec.target.name = None;
        assert_eq!(conn.target_secret_name(), "warehouse-credentials");
        conn.spec
            .target
            .labels
            .insert(LABEL_MANAGED_BY.into(), "me".into());
        assert_eq!(
            validate(&conn).unwrap_err().reason(),
            crate::error::Reason::InvalidSpec
        );
    }

    #[test]
    fn target_secret_is_owned_and_labelled() {
        let mut conn = basic_conn();
        conn.spec.target.labels.insert("team".into(), "data".into());
        let desired = target_secret(&conn, BTreeMap::new(), BTreeMap::new());
        assert_eq!(
            desired.labels()["app.kubernetes.io/managed-by"],
            "tokenkeeper"
        );
        assert_eq!(desired.labels()["tokenkeeper.dev/connection"], "warehouse");
        assert_eq!(desired.labels()["team"], "data");
        let owner = &desired.owner_references()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            ("uid-1", Some(true))
        );
        assert!(check_ownership(&conn, Some(&desired)).is_ok());
        let foreign = secret("warehouse-credentials", &[]);
        assert_eq!(
            check_ownership(&conn, Some(&foreign)).unwrap_err().reason(),
            "TargetSecretConflict"
        );
    }

    #[test]
    fn unchanged_secret_needs_no_write() {
        let conn = basic_conn();
        let source = secret("warehouse-login", &[("user", "etl"), ("pass", "s3cret")]);
        let data = static_credentials(static_method(&conn), &source).unwrap();
        let desired = target_secret(&conn, data, BTreeMap::new());
        let mut existing = desired.clone();
        existing.metadata.resource_version = Some("7".into());
        existing
            .labels_mut()
            .insert("added-by-someone-else".into(), "x".into());
        assert!(!needs_write(Some(&read(&existing)), &desired));
        assert!(needs_write(None, &desired));

        let mut rotated = existing.clone();
        rotated
            .data
            .as_mut()
            .unwrap()
            .insert("password".into(), ByteString(b"new".to_vec()));
        assert!(needs_write(Some(&read(&rotated)), &desired));
    }

    #[test]
    fn label_dropped_from_spec_is_removed() {
        let conn = basic_conn();
        let desired = target_secret(&conn, BTreeMap::new(), BTreeMap::new());
        let mut existing = desired.clone();
        existing.labels_mut().insert("team".into(), "data".into());
        assert!(
            !needs_write(Some(&read(&existing)), &desired),
            "someone else's label stays"
        );
        existing.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(serde_json::json!({
                "f:metadata": {"f:labels": {"f:team": {}, "f:app.kubernetes.io/managed-by": {}}}
            }))),
            ..Default::default()
        }]);
        assert!(
            needs_write(Some(&read(&existing)), &desired),
            "our own stale label goes"
        );
    }

    #[test]
    fn what_the_create_set_and_is_no_longer_wanted_is_stale() {
        let conn = basic_conn();
        let mut desired = target_secret(
            &conn,
            BTreeMap::from([("password".to_owned(), ByteString(b"p".to_vec()))]),
            BTreeMap::new(),
        );
        let mut existing = desired.clone();
        existing.labels_mut().insert("team".into(), "data".into());
        existing.labels_mut().insert("theirs".into(), "x".into());
        existing
            .annotations_mut()
            .insert("note".into(), "old".into());
        existing
            .data
            .get_or_insert_default()
            .insert("username".into(), ByteString(b"u".to_vec()));
        let entry = |operation: &str, fields: serde_json::Value| ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            operation: Some(operation.into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        };
        existing.metadata.managed_fields = Some(vec![entry(
            "Update",
            serde_json::json!({
                "f:metadata": {
                    "f:labels": {"f:team": {}, "f:app.kubernetes.io/managed-by": {}},
                    "f:annotations": {"f:note": {}},
                },
                "f:data": {"f:username": {}, "f:password": {}},
            }),
        )]);
        assert!(needs_write(Some(&read(&existing)), &desired));
        let stale = stale_fields(&read(&existing), &desired);
        assert_eq!(
            stale.removal_patch(),
            serde_json::json!({
                "metadata": {"labels": {"team": null}, "annotations": {"note": null}},
                "data": {"username": null},
            }),
            "someone else's label stays; wanted keys stay"
        );

        // Applied fields are server-side apply's to remove.
        existing.metadata.managed_fields = Some(vec![entry(
            "Apply",
            serde_json::json!({"f:metadata": {"f:labels": {"f:team": {}}}}),
        )]);
        assert!(stale_fields(&read(&existing), &desired).is_empty());

        // Nothing is stale once the Secret holds only what is wanted.
        desired.labels_mut().insert("team".into(), "data".into());
        desired
            .annotations_mut()
            .insert("note".into(), "new".into());
        desired
            .data
            .get_or_insert_default()
            .insert("username".into(), ByteString(b"u".to_vec()));
        existing.metadata.managed_fields = Some(vec![entry(
            "Update",
            serde_json::json!({"f:metadata": {"f:labels": {"f:team": {}}}, "f:data": {"f:username": {}}}),
        )]);
        assert!(stale_fields(&read(&existing), &desired).is_empty());
    }

    /// A Secret as the Secret cache gives it.
    fn read(secret: &Secret) -> ReadSecret {
        ReadSecret::new(secret.clone())
    }

    /// The keys under `path` that tokenkeeper's entries (or only the entry
    /// of its create) own and `secret` has, read from the managedFields
    /// themselves.
    fn owned_in_managed_fields(secret: &Secret, path: &[&str], create_only: bool) -> Vec<String> {
        let mut keys: Vec<String> = secret
            .managed_fields()
            .iter()
            .filter(|e| e.manager.as_deref() == Some(FIELD_MANAGER))
            .filter(|e| !create_only || is_create_entry(e.operation.as_deref()))
            .flat_map(|e| entry_keys(e, path))
            .filter(|key| match path {
                ["f:data"] => secret.data.as_ref().is_some_and(|d| d.contains_key(key)),
                [_, "f:labels"] => secret.labels().contains_key(key),
                _ => secret.annotations().contains_key(key),
            })
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// The ownership bytes name the keys the managedFields do.
    fn ownership_matches_managed_fields(secret: &Secret) {
        let read = read(secret);
        let names = |keys: Vec<&String>| keys.into_iter().cloned().collect::<Vec<_>>();
        let labels = ["f:metadata", "f:labels"];
        let annotations = ["f:metadata", "f:annotations"];
        // Data keys carry only the create's ownership (see key_ownership).
        for (wanted, create_only) in [(APPLIED, false), (CREATED, true)] {
            let owned = read.owned_keys(wanted);
            let mut cases = vec![
                (owned.labels, &labels[..]),
                (owned.annotations, &annotations),
            ];
            if create_only {
                cases.push((owned.data, &["f:data"]));
            }
            for (keys, path) in cases {
                assert_eq!(
                    names(keys),
                    owned_in_managed_fields(secret, path, create_only),
                    "{path:?}, the create's only: {create_only}"
                );
            }
        }
    }

    /// A target Secret as tokenkeeper's create and then a refresh leave it:
    /// the create entry keeps what the refresh did not change; the refresh
    /// (server-side apply) owns everything it applied.
    fn created_then_refreshed(conn: &SourceConnection) -> Secret {
        let mut secret = target_secret(
            conn,
            BTreeMap::from([
                ("username".to_owned(), ByteString(b"u".to_vec())),
                ("password".to_owned(), ByteString(b"p".to_vec())),
            ]),
            BTreeMap::from([
                ("note".to_owned(), "n".to_owned()),
                ("issued".to_owned(), "i".to_owned()),
            ]),
        );
        secret.labels_mut().insert("team".into(), "data".into());
        secret.labels_mut().insert("theirs".into(), "x".into());
        let keys = |keys: &[&str]| {
            keys.iter()
                .map(|k| (format!("f:{k}"), serde_json::json!({})))
                .collect::<serde_json::Map<_, _>>()
        };
        let ours: Vec<&str> = secret
            .labels()
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "theirs")
            .collect();
        let entry =
            |manager: &str, operation: &str, fields: serde_json::Value| ManagedFieldsEntry {
                manager: Some(manager.into()),
                operation: Some(operation.into()),
                fields_v1: Some(FieldsV1(fields)),
                ..Default::default()
            };
        secret.metadata.managed_fields = Some(vec![
            entry(
                FIELD_MANAGER,
                "Update",
                serde_json::json!({
                    "f:metadata": {"f:labels": keys(&ours), "f:annotations": keys(&["note"]),
                                   "f:ownerReferences": {}},
                    "f:data": keys(&["username"]),
                    "f:type": {},
                }),
            ),
            entry(
                FIELD_MANAGER,
                "Apply",
                serde_json::json!({
                    "f:metadata": {"f:labels": keys(&ours), "f:annotations": keys(&["note", "issued"])},
                    "f:data": keys(&["username", "password"]),
                }),
            ),
            entry(
                "kubectl-label",
                "Update",
                serde_json::json!({"f:metadata": {"f:labels": keys(&["theirs"])}}),
            ),
        ]);
        secret
    }

    #[test]
    fn the_ownership_bytes_say_what_the_managed_fields_say() {
        let conn = basic_conn();
        let refreshed = created_then_refreshed(&conn);
        ownership_matches_managed_fields(&refreshed);
        // Among the cases: dropping "note" (the create still owns it) is a
        // removal; dropping "issued" (only applied) is server-side apply's.
        let mut without_note = refreshed.clone();
        without_note.annotations_mut().remove("note");
        assert!(!stale_fields(&read(&refreshed), &without_note).is_empty());
        let mut without_issued = refreshed.clone();
        without_issued.annotations_mut().remove("issued");
        assert!(stale_fields(&read(&refreshed), &without_issued).is_empty());
        assert!(needs_write(Some(&read(&refreshed)), &without_issued));

        let mut just_created = refreshed.clone();
        just_created
            .metadata
            .managed_fields
            .as_mut()
            .unwrap()
            .remove(1);
        ownership_matches_managed_fields(&just_created);
        let mut unowned = refreshed;
        unowned.metadata.managed_fields = None;
        ownership_matches_managed_fields(&unowned);
    }

    #[test]
    fn the_ownership_bytes_name_each_key_in_order() {
        let conn = basic_conn();
        let refreshed = created_then_refreshed(&conn);
        // Labels: managed-by, connection, secret-role, team (ours, created
        // and applied) and theirs; annotations issued (applied), note
        // (both); data password (applied only, so nothing), username.
        let labels = refreshed.labels().len();
        let read = ReadSecret::new(refreshed.clone());
        let ownership = read.ownership();
        let (label_flags, rest) = ownership.split_at(labels);
        assert!(label_flags.iter().filter(|f| **f == 0).count() == 1);
        assert_eq!(rest, [APPLIED, APPLIED | CREATED, 0, CREATED]);
    }

    #[test]
    fn secrets_over_the_api_limits_are_refused_before_sending() {
        let conn = basic_conn();
        let data = |bytes: usize| BTreeMap::from([("k".to_owned(), ByteString(vec![b'x'; bytes]))]);
        let notes = |bytes: usize| BTreeMap::from([("n".to_owned(), "y".repeat(bytes))]);
        assert!(check_size(&target_secret(&conn, data(MAX_SECRET_DATA_BYTES), notes(1))).is_ok());
        let too_much_data = check_size(&target_secret(
            &conn,
            data(MAX_SECRET_DATA_BYTES + 1),
            notes(1),
        ))
        .unwrap_err();
        assert_eq!(
            too_much_data.reason(),
            crate::error::Reason::SecretWriteFailed
        );
        assert!(
            too_much_data.to_string().contains("bytes of data"),
            "{too_much_data}"
        );
        let too_many_notes =
            check_size(&target_secret(&conn, data(1), notes(MAX_ANNOTATION_BYTES)))
                .unwrap_err()
                .to_string();
        assert!(
            too_many_notes.contains("bytes of annotations"),
            "{too_many_notes}"
        );
        assert!(too_many_notes.contains("262144"), "{too_many_notes}");
    }
}
