//! `tokenkeeper run` on a cluster without the CRD stops at once and says
//! how to install it. Uses a control plane of its own, since removing the
//! CRD from the shared one would delete other tests' connections.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::OwnControlPlane;

#[test]
fn run_fails_fast_when_the_crd_is_missing() {
    let plane = OwnControlPlane::start("nocrd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenkeeper"))
        .arg("run")
        .env("KUBECONFIG", plane.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tokenkeeper");
    // It stops by itself: a generous bound only tells a stop from retrying
    // forever (which would otherwise hang the test).
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tokenkeeper kept running without its CRD instead of stopping");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().expect("output");
    assert!(!status.success(), "must not run without its CRD");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("CRD (sourceconnections.tokenkeeper.dev) is not installed"),
        "{text}"
    );
    assert!(text.contains("kubectl apply -f crds/"), "{text}");
}
