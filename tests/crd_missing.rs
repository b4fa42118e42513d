//! `tokenkeeper run` on a cluster without the CRD stops at once and says
//! how to install it. Uses a control plane of its own, since removing the
//! CRD from the shared one would delete other tests' connections.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{REPO, stderr};

struct OwnControlPlane {
    dir: PathBuf,
}

impl OwnControlPlane {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("tokenkeeper-nocrd-{}", std::process::id()));
        let plane = OwnControlPlane { dir };
        let status = Command::new(format!("{REPO}/tests/cluster/up.sh"))
            .arg(&plane.dir)
            .status()
            .expect("run tests/cluster/up.sh");
        assert!(status.success(), "control plane did not start");
        plane
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(format!("{REPO}/tests/cluster/down.sh"))
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn run_fails_fast_when_the_crd_is_missing() {
    let plane = OwnControlPlane::start();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenkeeper"))
        .arg("run")
        .env("KUBECONFIG", plane.dir.join("kubeconfig"))
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
