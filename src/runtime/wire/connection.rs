//! SourceConnections as the controller's cache keeps them: metadata
//! decoded (the queue and the wake-up filter read it on every event), spec
//! and status as the JSON the API server sent, decoded by the one reconcile
//! that works on the connection.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{WireMeta, resource_as};
use crate::api::{SourceConnection, SourceConnectionSpec, SourceConnectionStatus};

#[derive(Clone, Debug)]
pub struct CachedConnection {
    metadata: ObjectMeta,
    spec: Box<RawValue>,
    status: Option<Box<RawValue>>,
}

impl CachedConnection {
    /// The whole connection, decoded.
    pub fn decode(&self) -> Result<SourceConnection, serde_json::Error> {
        Ok(SourceConnection {
            metadata: self.metadata.clone(),
            spec: self.spec()?,
            status: self.status()?,
        })
    }

    pub fn spec(&self) -> Result<SourceConnectionSpec, serde_json::Error> {
        decode(&self.spec)
    }

    pub fn status(&self) -> Result<Option<SourceConnectionStatus>, serde_json::Error> {
        self.status.as_deref().map(decode).transpose()
    }
}

fn decode<T: DeserializeOwned>(json: &RawValue) -> Result<T, serde_json::Error> {
    serde_json::from_str(json.get())
}

impl<'de> Deserialize<'de> for CachedConnection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            metadata: WireMeta,
            spec: Box<RawValue>,
            status: Option<Box<RawValue>>,
        }
        let wire = Wire::deserialize(deserializer)?;
        let cached = CachedConnection {
            metadata: wire.metadata.into(),
            spec: wire.spec,
            status: wire.status,
        };
        // A connection the operator cannot decode is refused here, by the
        // watch, as it was before the cache kept JSON: reconciles then never
        // meet one.
        cached.spec().map_err(D::Error::custom)?;
        cached.status().map_err(D::Error::custom)?;
        Ok(cached)
    }
}

resource_as!(CachedConnection, SourceConnection {});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::wire::LAST_APPLIED;
    use kube::Resource;

    const CONNECTION: &str = r#"{
        "apiVersion": "tokenkeeper.dev/v1alpha1",
        "kind": "SourceConnection",
        "metadata": {"name": "crm", "namespace": "data", "generation": 2,
                     "resourceVersion": "41"},
        "spec": {"oauth2": {
            "tokenUrl": "https://login.example.com/token",
            "grant": "refreshToken",
            "client": {"secretRef": {"name": "crm-client"}},
            "refreshTokenSecretRef": {"name": "crm-grant", "key": "refresh_token"},
            "scopes": ["read", "offline_access"]
        }},
        "status": {"observedGeneration": 2, "secretName": "crm-credentials",
                   "conditions": [{"type": "Ready", "status": "True",
                                   "reason": "SecretSynced", "message": "ok",
                                   "lastTransitionTime": "2026-11-23T16:00:00Z"}]}
    }"#;

    #[test]
    fn a_cached_connection_decodes_to_the_connection_the_api_sent() {
        let cached: CachedConnection = serde_json::from_str(CONNECTION).unwrap();
        let direct: SourceConnection = serde_json::from_str(CONNECTION).unwrap();
        assert_eq!(cached.decode().unwrap(), direct);
        assert_eq!(cached.meta().resource_version.as_deref(), Some("41"));
    }

    #[test]
    fn the_cache_leaves_out_field_ownership_and_the_last_applied_copy() {
        let mut json: serde_json::Value = serde_json::from_str(CONNECTION).unwrap();
        json["metadata"]["managedFields"] = serde_json::json!([{
            "manager": "kubectl", "operation": "Update", "apiVersion": "tokenkeeper.dev/v1alpha1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:oauth2": {}}}
        }]);
        json["metadata"]["annotations"] = serde_json::json!({
            LAST_APPLIED: "{\"spec\":{}}",
            "team": "data"
        });
        json["metadata"]["labels"] = serde_json::json!({"tier": "gold"});
        let cached: CachedConnection = serde_json::from_str(&json.to_string()).unwrap();
        let direct: SourceConnection = serde_json::from_value(json).unwrap();
        assert_eq!(cached.meta().managed_fields, None);
        assert_eq!(
            cached.meta().annotations,
            Some([("team".to_owned(), "data".to_owned())].into())
        );
        let mut expected = direct.metadata.clone();
        expected.managed_fields = None;
        expected.annotations = cached.meta().annotations.clone();
        assert_eq!(cached.meta(), &expected);
    }

    #[test]
    fn a_connection_without_status_has_none() {
        let mut json: serde_json::Value = serde_json::from_str(CONNECTION).unwrap();
        json.as_object_mut().unwrap().remove("status");
        let cached: CachedConnection = serde_json::from_str(&json.to_string()).unwrap();
        assert_eq!(cached.status().unwrap(), None);
        json["status"] = serde_json::Value::Null;
        let cached: CachedConnection = serde_json::from_str(&json.to_string()).unwrap();
        assert_eq!(cached.status().unwrap(), None);
    }

    #[test]
    fn a_connection_the_operator_cannot_read_is_refused_when_cached() {
        let mut json: serde_json::Value = serde_json::from_str(CONNECTION).unwrap();
        json["spec"]["oauth2"]["grant"] = "telepathy".into();
        let refused = serde_json::from_str::<CachedConnection>(&json.to_string());
        assert!(refused.is_err());
    }
}
