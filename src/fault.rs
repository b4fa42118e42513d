//! Faults the test suite's build (`fault-injection` feature) injects on
//! request of an annotation, for races a test cannot otherwise provoke.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::api::SourceConnection;

/// A connection with this annotation finds a Secret of someone else's
/// created under its target's name between its read and its create.
pub const CREATE_RACE_ANNOTATION: &str = "tokenkeeper.dev/test-inject-create-race";

/// Creates a foreign Secret named `name` when `conn` asks for the race.
pub async fn create_in_the_way(conn: &SourceConnection, secrets: &Api<Secret>, name: &str) {
    if !conn.annotations().contains_key(CREATE_RACE_ANNOTATION) {
        return;
    }
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "owner".to_owned(),
            ByteString(b"someone-else".to_vec()),
        )])),
        ..Default::default()
    };
    let _ = secrets.create(&PostParams::default(), &foreign).await;
}
