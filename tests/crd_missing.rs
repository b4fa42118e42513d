//! `tokenkeeper run` on a cluster without the CRD stops at once and says
//! how to install it. Uses a control plane of its own, since removing the
//! CRD from the shared one would delete other tests' connections.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{OwnControlPlane, stderr};

#[test]
fn run_fails_fast_when_the_crd_is_missing() {
    let plane = OwnControlPlane::start("nocrd");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenkeeper"))
        .arg("run")
        .env("KUBECONFIG", plane.kubeconfig())
        .output()
        .expect("run tokenkeeper");
    assert!(!out.status.success(), "must not run without its CRD");
    let text = stderr(&out);
    assert!(
        text.contains("CRD (sourceconnections.tokenkeeper.dev) is not installed"),
        "{text}"
    );
    assert!(text.contains("kubectl apply -f crds/"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "fails fast, not after retries"
    );
}
