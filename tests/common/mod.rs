//! Shared fixtures for the integration tests: a namespace per test on the
//! real control plane that `tests/run.sh` started, the operator as a child
//! process, and kubectl as the user would run it. Everything a fixture
//! starts or creates is stopped or deleted when it is dropped, also when
//! the test fails.
#![allow(dead_code)]

use base64::Engine as _;
use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The kubeconfig of the control plane under test.
pub fn kubeconfig() -> String {
    std::env::var("TOKENKEEPER_TEST_KUBECONFIG").expect(
        "TOKENKEEPER_TEST_KUBECONFIG is not set: run the integration tests with tests/run.sh, \
         which starts a local control plane",
    )
}

/// helm, as tests/run.sh installed it (tests/tools/install-helm.sh).
pub fn helm() -> String {
    std::env::var("TOKENKEEPER_HELM").expect("TOKENKEEPER_HELM is set by tests/run.sh")
}

/// The kubeconfig the operator runs with: the Helm chart's ServiceAccount
/// (see tests/cluster/operator-identity.sh), so that every scenario proves
/// the chart's RBAC suffices.
pub fn operator_kubeconfig() -> String {
    std::env::var("TOKENKEEPER_TEST_OPERATOR_KUBECONFIG").expect(
        "TOKENKEEPER_TEST_OPERATOR_KUBECONFIG is not set: run the integration tests with tests/run.sh",
    )
}

/// The flags of a replica with leader election on the Lease `lease` in
/// `lease_namespace`: a 6 s lease, so that tests see takeovers quickly.
pub fn leader_args(lease_namespace: &str, lease: &str) -> Vec<String> {
    [
        "--leader-elect",
        "--leader-election-namespace",
        lease_namespace,
        "--leader-election-lease",
        lease,
        "--lease-duration-seconds",
        "6",
        "--renew-deadline-seconds",
        "4",
        "--retry-period-seconds",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A field of the Lease's spec (`holderIdentity`, `renewTime`, ...) in
/// `tokenkeeper-system`, as kubectl prints it; empty when there is none.
pub fn lease_field(lease: &str, field: &str) -> String {
    let out = kubectl(&[
        "get",
        "lease",
        lease,
        "-n",
        "tokenkeeper-system",
        "-o",
        &format!("jsonpath={{.spec.{field}}}"),
    ]);
    found_or_empty(&format!("get lease {lease}"), out)
}

/// kubectl's output; empty when it says the object does not exist (NotFound),
/// a test failure for any other error.
pub fn found_or_empty(what: &str, out: Output) -> String {
    if out.status.success() {
        return stdout(&out);
    }
    let error = stderr(&out);
    assert!(
        error.contains("(NotFound)"),
        "kubectl {what} failed: {error}"
    );
    String::new()
}

/// The kubectl output format that prints each SourceConnection's Ready
/// reason on a line of its own.
pub const READY_REASONS: &str =
    r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].reason}{"\n"}{end}"#;

/// `Ok` when `reasons` (as `READY_REASONS` prints them) are `count` times
/// SecretSynced; the reasons otherwise.
pub fn all_synced(reasons: &str, count: usize) -> Result<(), String> {
    let synced = reasons.lines().filter(|r| *r == "SecretSynced").count();
    (synced == count)
        .then_some(())
        .ok_or_else(|| reasons.to_owned())
}

/// A free TCP port on 127.0.0.1, never the same twice in one test binary.
/// Picked below the kernel's ephemeral range: a port inside it can be taken
/// by any outgoing connection of a concurrent test between this pick and the
/// server's bind. (tests/cluster/up.sh picks from the band below this one.)
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let band = ephemeral_low.saturating_sub(4000).max(1024)..ephemeral_low.max(1025);
    let width = band.len();
    let mut handed_out = HANDED_OUT.lock().unwrap();
    let start =
        std::hash::BuildHasher::hash_one(&RandomState::new(), handed_out.len()) as usize % width;
    let port = (0..width)
        .map(|step| band.start + ((start + step) % width) as u16)
        .find(|port| {
            !handed_out.contains(port) && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()
        })
        .expect("a free port below the ephemeral range");
    handed_out.insert(port);
    port
}

/// A loopback address of this test's own (127.0.100–199.x), where
/// well-known ports such as 53 and 443 are free to bind.
pub fn own_loopback_address() -> String {
    format!(
        "127.0.{}.{}",
        100 + std::process::id() % 100,
        2 + free_port() % 250
    )
}

/// Where tests keep logs and artifacts for a person to read after a run.
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(REPO).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Adds measured figures to `figures.txt` among the artifacts, which
/// `tests/run.sh` prints at the end: tests measure, but never assert on time.
pub fn record_figures(text: &str) {
    use std::io::Write;
    let path = artifacts_dir().join("figures.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(text.as_bytes());
    }
}

/// A fresh namespace, deleted on drop.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(test: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tk-{}-{}-{}",
            test.replace('_', "-"),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let name: String = name
            .chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches('-')
            .to_owned();
        kubectl_ok(&["create", "namespace", &name]);
        TestNamespace { name }
    }

    /// `kubectl -n <ns> ARGS`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        kubectl(&all)
    }

    /// Like `kubectl`, panicking with kubectl's stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        succeeded(args, self.kubectl(args))
    }

    /// Secret `crm-client` with the client id and secret of the test
    /// provider's OAuth 2.0 client, as a user creates it.
    pub fn create_client_secret(&self, id: &str, secret: &str) {
        self.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "crm-client",
            &format!("--from-literal=client_id={id}"),
            &format!("--from-literal=client_secret={secret}"),
        ]);
    }

    /// Secret `app-client` with the client of the provider emulators
    /// (`client-1` / `secret-1`).
    pub fn create_app_client(&self) {
        self.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "app-client",
            "--from-literal=client_id=client-1",
            "--from-literal=client_secret=secret-1",
        ]);
    }

    /// Secret `crm-grant` holding `token` under `refresh_token`, created or
    /// replaced as a user does (`kubectl create --dry-run | kubectl apply`).
    pub fn put_refresh_token(&self, token: &str) {
        let manifest = self.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "crm-grant",
            &format!("--from-literal=refresh_token={token}"),
            "--dry-run=client",
            "-o",
            "yaml",
        ]);
        self.apply_ok(&manifest);
    }

    /// Asks for a refresh of `connection` as a user does: the force-refresh
    /// annotation set to `value` (each new value is acted on once).
    pub fn force_refresh(&self, connection: &str, value: &str) {
        self.kubectl_ok(&[
            "annotate",
            "--overwrite",
            "srcconn",
            connection,
            &format!("tokenkeeper.dev/force-refresh={value}"),
        ]);
    }

    /// `kubectl apply -f -` of the given manifest.
    pub fn apply(&self, manifest: &str) -> Output {
        kubectl_stdin(&["-n", &self.name, "apply", "-f", "-"], manifest)
    }

    pub fn apply_ok(&self, manifest: &str) {
        let out = self.apply(manifest);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{manifest}",
            stderr(&out)
        );
    }

    /// A jsonpath query on one object; empty when the object or field is
    /// missing. Any other kubectl failure fails the test: an unreachable API
    /// server must not pass for an object that is gone.
    pub fn jsonpath(&self, kind: &str, name: &str, path: &str) -> String {
        let out = self.kubectl(&["get", kind, name, "-o", &format!("jsonpath={path}")]);
        found_or_empty(&format!("get {kind} {name}"), out)
    }

    pub fn condition(&self, connection: &str, type_: &str, field: &str) -> String {
        self.jsonpath(
            "sourceconnection",
            connection,
            &format!("{{.status.conditions[?(@.type==\"{type_}\")].{field}}}"),
        )
    }

    /// Waits until the connection's Ready condition has the given status and reason.
    pub fn wait_ready(&self, connection: &str, status: &str, reason: &str, timeout: Duration) {
        wait_for(
            &format!("{connection} Ready={status} reason={reason}"),
            timeout,
            || {
                let got_status = self.condition(connection, "Ready", "status");
                let got_reason = self.condition(connection, "Ready", "reason");
                (got_status == status && got_reason == reason)
                    .then_some(())
                    .ok_or(format!("Ready={got_status} reason={got_reason}"))
            },
        );
    }

    /// Like `wait_ready`, then the Ready condition's message.
    pub fn wait_ready_saying(
        &self,
        connection: &str,
        status: &str,
        reason: &str,
        timeout: Duration,
    ) -> String {
        self.wait_ready(connection, status, reason, timeout);
        self.condition(connection, "Ready", "message")
    }

    /// The refresh token tokenkeeper keeps for connection `name` (sealed in
    /// its target Secret `target`), opened with the operator's sealing key
    /// from `operator_namespace`, as only a cluster admin could.
    pub fn stored_refresh_token_in(
        &self,
        name: &str,
        target: &str,
        operator_namespace: &str,
    ) -> Option<String> {
        let sealed = self.jsonpath(
            "secret",
            target,
            "{.metadata.annotations.tokenkeeper\\.dev/sealed-grant}",
        );
        let uid = self.jsonpath("srcconn", name, "{.metadata.uid}");
        let keyring = sealing_keys(operator_namespace)?;
        keyring
            .open(&sealed, &uid)
            .ok()
            .map(|o| o.grant.refresh_token)
    }

    /// `stored_refresh_token_in` for a connection with the default target
    /// name and an operator in the `default` namespace.
    pub fn stored_refresh_token(&self, name: &str) -> Option<String> {
        self.stored_refresh_token_in(name, &format!("{name}-credentials"), "default")
    }

    /// A Secret's value for `key`, decoded; `None` when the Secret or key is missing.
    pub fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        let escaped = key.replace('.', "\\.");
        let encoded = self.jsonpath("secret", secret, &format!("{{.data.{escaped}}}"));
        if encoded.is_empty() {
            return None;
        }
        let out = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(encoded.as_bytes())?;
                child.wait_with_output()
            })
            .expect("run base64");
        Some(String::from_utf8(out.stdout).expect("utf-8 secret value"))
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// The operator binary running against the test cluster, watching one
/// namespace. Stopped on drop.
pub struct Operator {
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl Operator {
    pub fn start(namespace: &TestNamespace) -> Self {
        Self::start_with(namespace, &[])
    }

    pub fn start_with(namespace: &TestNamespace, extra_args: &[&str]) -> Self {
        Self::start_on(
            Path::new(&operator_kubeconfig()),
            &namespace.name,
            extra_args,
        )
    }

    /// The operator on the control plane of `kubeconfig`, watching
    /// `namespace`, allowed to reach the tests' providers on this machine.
    pub fn start_on(kubeconfig: &Path, namespace: &str, extra_args: &[&str]) -> Self {
        Self::launch(kubeconfig, namespace, extra_args, true)
    }

    /// The operator for `namespace` serving /metrics on a free port, and
    /// that port.
    pub fn with_metrics(namespace: &TestNamespace) -> (Self, u16) {
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let operator = Self::start_with(namespace, &["--metrics-bind-address", &address]);
        (operator, port)
    }

    /// The operator as it runs in a cluster: no endpoint on this machine.
    pub fn start_as_in_production(namespace: &TestNamespace, extra_args: &[&str]) -> Self {
        let kubeconfig = operator_kubeconfig();
        Self::launch(Path::new(&kubeconfig), &namespace.name, extra_args, false)
    }

    fn launch(kubeconfig: &Path, namespace: &str, extra_args: &[&str], development: bool) -> Self {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log_path = artifacts_dir().join(format!(
            "operator-{namespace}-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let log = File::create(&log_path).expect("create operator log");
        let mut args = vec!["run", "--namespace", namespace];
        if !extra_args.contains(&"--metrics-bind-address") {
            args.extend(["--metrics-bind-address", "127.0.0.1:0"]);
        }
        // Tokens of the tests live seconds; the floor of 30 s between two
        // refreshes is tested on its own (never_fall_over.rs).
        if !extra_args.contains(&"--min-refresh-interval-seconds") {
            args.extend(["--min-refresh-interval-seconds", "1"]);
        }
        if development {
            args.push("--allow-plain-http-loopback");
        }
        let child = Command::new(env!("CARGO_BIN_EXE_tokenkeeper"))
            .args(args)
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,tokenkeeper=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tokenkeeper run");
        Operator {
            child: Some(child),
            log_path,
        }
    }

    /// An operator started by `command` (a wrapper such as chroot that
    /// execs tokenkeeper), logging to an artifact named after `label`.
    pub fn spawn(mut command: Command, label: &str) -> Self {
        let log_path = artifacts_dir().join(format!(
            "operator-{label}-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let log = File::create(&log_path).expect("create operator log");
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        Operator {
            child: Some(child),
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("operator running").id()
    }

    /// SIGSTOP: the process keeps its state and timers but runs no more,
    /// as in a paused VM or a frozen cgroup.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL, as a node failure or the OOM killer would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("operator running");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for operator") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("operator did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
}

pub fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .output()
        .expect("run kubectl")
}

pub fn kubectl_ok(args: &[&str]) -> String {
    succeeded(args, kubectl(args))
}

pub fn kubectl_stdin(args: &[&str], input: &str) -> Output {
    kubectl_stdin_on(Path::new(&kubeconfig()), args, input)
}

/// `kubectl ARGS` on the control plane of `kubeconfig`, with `input` on its
/// standard input.
fn kubectl_stdin_on(kubeconfig: &Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().expect("wait for kubectl")
}

/// kubectl's standard output, or a panic with its standard error.
fn succeeded(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether `kubectl describe` output lists an event of this type and
/// reason. Matched by column, not by spacing: the Type column is as wide
/// as its widest entry, so "Normal" is followed by two spaces or, when a
/// Warning is listed too, by three.
pub fn describes_event(describe: &str, type_: &str, reason: &str) -> bool {
    describe
        .lines()
        .any(|line| line.split_whitespace().take(2).eq([type_, reason]))
}

/// Polls `check` until it returns Ok or `timeout` passes; then fails with
/// the last thing `check` said.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The real OAuth 2.0 provider of the tests (`oidc-provider`, see
/// tests/oauth/server.mjs) on a free loopback port. Stopped on drop.
pub struct OAuthServer {
    child: Child,
    pub issuer: String,
    pub port: u16,
    http: reqwest::blocking::Client,
}

impl OAuthServer {
    /// Starts the provider with the given options (see server.mjs), e.g.
    /// `{"accessTokenTtl": 4}`.
    pub fn start(options: serde_json::Value) -> Self {
        use std::io::BufRead;
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log = File::create(artifacts_dir().join(format!(
            "oauth-server-{}-{}.log",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        )))
        .expect("create the provider's log");
        let mut child = Command::new("node")
            .arg(format!("{REPO}/tests/oauth/server.mjs"))
            .arg(options.to_string())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start node tests/oauth/server.mjs (run npm ci in tests/oauth)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the provider's address");
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("the provider did not start: {line:?}"));
        OAuthServer {
            child,
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            port: ready["port"].as_u64().unwrap() as u16,
            // Node closes a connection idle for 5 s (its keepAliveTimeout);
            // a pooled connection reused right then fails the request.
            http: reqwest::blocking::Client::builder()
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
        }
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// Calls one of the provider's out-of-band test controls.
    pub fn control(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.http
            .post(format!("{}/test/{path}", self.issuer))
            .json(&body)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("test control {path}: {e}"))
    }

    /// Every token, authorization code and PKCE verifier that crossed the
    /// token endpoint so far.
    pub fn secrets_seen(&self) -> Vec<String> {
        self.stats()["secretsSeen"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// Every refresh token and PKCE verifier that crossed the token
    /// endpoint so far.
    pub fn grant_secrets_seen(&self) -> Vec<String> {
        self.stats()["grantSecretsSeen"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    pub fn stats(&self) -> serde_json::Value {
        self.control("stats", serde_json::json!({}))
    }

    /// A refresh token for a grant of `scope`, as a user who consented
    /// elsewhere would hand it over.
    pub fn mint_refresh_token(&self, scope: &str) -> String {
        self.control("mint-refresh-token", serde_json::json!({ "scope": scope }))["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn is_active(&self, token: &str) -> bool {
        self.control("introspect", serde_json::json!({ "token": token }))["active"] == true
    }

    pub fn fail(&self, mode: &str) {
        self.control(
            "failure",
            serde_json::json!({ "mode": mode, "retryAfter": 3 }),
        );
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that none of `secrets` appears in the operator's log, the
/// namespace's events or the SourceConnections (spec and status): as text,
/// base64 (at any alignment within a longer encoded text), or the byte
/// list a `Debug` of bytes prints.
pub fn assert_no_secret_leaks(ns: &TestNamespace, secrets: &[String]) {
    let events = ns.kubectl_ok(&["get", "events", "-o", "yaml"]);
    let connections = ns.kubectl_ok(&["get", "srcconn", "-o", "yaml"]);
    let mut logs = String::new();
    for entry in std::fs::read_dir(artifacts_dir())
        .expect("artifacts dir")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("operator-{}-", ns.name)) {
            logs.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    assert!(!logs.is_empty(), "no operator log found for {}", ns.name);
    let secrets: Vec<&String> = secrets.iter().filter(|s| s.len() >= 8).collect();
    assert!(!secrets.is_empty(), "no secret values to look for");
    for secret in secrets {
        for form in leak_forms(secret) {
            for (place, text) in [
                ("operator log", &logs),
                ("events", &events),
                ("SourceConnections", &connections),
            ] {
                assert!(
                    !text.contains(form.as_str()),
                    "a secret value leaked into the {place} (as {form:?})"
                );
            }
        }
    }
}

/// The ways a secret value can show up in text: itself, its base64 at the
/// three alignments it can have inside a longer encoded value (full groups
/// only), and its bytes as `Debug` lists them.
fn leak_forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let bytes = secret.as_bytes();
    let mut forms = vec![secret.to_owned()];
    for skip in 0..3 {
        let rest = &bytes[skip..];
        let whole_groups = rest.len() / 3 * 4;
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::URL_SAFE,
        ] {
            let encoded = engine.encode(rest);
            forms.push(encoded[..whole_groups].to_owned());
        }
    }
    let listed: Vec<String> = bytes.iter().map(u8::to_string).collect();
    forms.push(listed.join(", "));
    forms.sort();
    forms.dedup();
    forms
}

/// A control plane of a test's own, for tests that change cluster-wide
/// things (CRDs, Helm releases). Stopped on drop.
pub struct OwnControlPlane {
    pub dir: PathBuf,
}

impl OwnControlPlane {
    pub fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tokenkeeper-{name}-{}", std::process::id()));
        let plane = OwnControlPlane { dir };
        let status = Command::new(format!("{REPO}/tests/cluster/up.sh"))
            .arg(&plane.dir)
            .status()
            .expect("run tests/cluster/up.sh");
        assert!(status.success(), "control plane did not start");
        plane
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .expect("run kubectl")
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        succeeded(args, self.kubectl(args))
    }

    /// A kubeconfig for ServiceAccount `account` of `namespace` on this
    /// control plane, a token as its only credential, saved as `file`.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        account: &str,
        file: &str,
    ) -> PathBuf {
        let token = self.kubectl_ok(&["create", "token", account, "-n", namespace]);
        let server = self.kubectl_ok(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        let path = self.dir.join(file);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
                 users:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
                self.dir.join("certs/apiserver.crt").display(),
                token.trim()
            ),
        )
        .unwrap();
        path
    }

    /// A jsonpath query on Deployment `tokenkeeper` in namespace
    /// `tokenkeeper`, as the chart installed it.
    pub fn deployment_field(&self, path: &str) -> String {
        self.kubectl_ok(&[
            "get",
            "deployment",
            "tokenkeeper",
            "-n",
            "tokenkeeper",
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    /// The container arguments of that Deployment.
    pub fn deployed_args(&self) -> Vec<String> {
        let args = self.deployment_field("{.spec.template.spec.containers[0].args}");
        serde_json::from_str(&args).unwrap_or_else(|e| panic!("{e}: {args}"))
    }

    /// The operator as that Deployment runs it (no kubelet here): its
    /// arguments with free loopback ports, then `extra_args`, a token of the
    /// chart's ServiceAccount, pod name `tokenkeeper-{label}`.
    pub fn run_operator_as_deployed(&self, label: &str, extra_args: &[&str]) -> Operator {
        let args: Vec<String> = self
            .deployed_args()
            .into_iter()
            .map(|arg| match arg.split_once('=') {
                Some((flag @ ("--metrics-bind-address" | "--authorization-bind-address"), _)) => {
                    format!("{flag}=127.0.0.1:{}", free_port())
                }
                _ => arg,
            })
            .collect();
        let kubeconfig = self.service_account_kubeconfig(
            "tokenkeeper",
            "tokenkeeper",
            &format!("operator-{label}.kubeconfig"),
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokenkeeper"));
        command
            .args(&args)
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", format!("tokenkeeper-{label}"))
            .env("POD_NAMESPACE", "tokenkeeper")
            .env("RUST_LOG", "info,tokenkeeper=debug");
        Operator::spawn(command, label)
    }

    /// `kubectl apply -f -` of `manifest` on this control plane.
    pub fn apply_ok(&self, manifest: &str) {
        let out = kubectl_stdin_on(&self.kubeconfig(), &["apply", "-f", "-"], manifest);
        assert!(out.status.success(), "kubectl apply: {}", stderr(&out));
    }

    /// The pid of the kube-apiserver up.sh (or `start_apiserver`) started
    /// last, and its command line.
    fn apiserver(&self) -> (u32, Vec<String>) {
        let pids = std::fs::read_to_string(self.dir.join("pids")).expect("the pids file");
        let pid: u32 = pids
            .lines()
            .filter_map(|line| line.strip_prefix("kube-apiserver "))
            .next_back()
            .and_then(|pid| pid.trim().parse().ok())
            .expect("a kube-apiserver pid");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        (pid, args)
    }

    /// Stops the kube-apiserver as a control-plane upgrade does (SIGTERM);
    /// returns its command line for `start_apiserver`.
    pub fn stop_apiserver(&self) -> Vec<String> {
        let (pid, args) = self.apiserver();
        assert!(!args.is_empty(), "kube-apiserver {pid} is running");
        signal(pid, "TERM");
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        signal(pid, "KILL");
        args
    }

    /// Starts the kube-apiserver again with the command line it had, on the
    /// same port and etcd; recorded in the pids file so that drop stops it.
    pub fn start_apiserver(&self, args: &[String]) {
        // In its own session and in the background, as up.sh starts it.
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#"log="$1"; shift; setsid "$@" >>"$log" 2>&1 </dev/null & echo $!"#)
            .arg("bash")
            .arg(self.dir.join("logs/kube-apiserver.log"))
            .args(args)
            .output()
            .expect("start kube-apiserver");
        let mut pids = File::options()
            .append(true)
            .open(self.dir.join("pids"))
            .expect("the pids file");
        writeln!(pids, "kube-apiserver {}", stdout(&out).trim()).unwrap();
        wait_for(
            "the API server to answer again",
            Duration::from_secs(60),
            || {
                let out = self.kubectl(&["get", "--raw", "/readyz"]);
                out.status.success().then_some(()).ok_or(stderr(&out))
            },
        );
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

/// GET on the operator's HTTP port.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    match reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")) {
        Ok(response) => (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

/// The operator's sealing keys, read from its key Secret in `namespace`.
pub fn sealing_keys(namespace: &str) -> Option<tokenkeeper::oauth::seal::Keyring> {
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig(), "get", "secret", "-n"])
        .args([namespace, "tokenkeeper-sealing-key", "-o", "json"])
        .output()
        .expect("run kubectl");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_slice(&out.stdout).ok()?;
    tokenkeeper::oauth::seal::Keyring::from_data(&secret.data?).ok()
}

/// Fails when any Secret of `namespace` holds one of `values` in plaintext,
/// in its data (decoded) or its annotations.
pub fn assert_no_secret_holds(namespace: &str, values: &[String]) {
    assert!(!values.is_empty(), "nothing to look for");
    let out = Command::new("kubectl")
        .args([
            "--kubeconfig",
            &kubeconfig(),
            "get",
            "secrets",
            "-n",
            namespace,
        ])
        .args(["-o", "json"])
        .output()
        .expect("run kubectl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a Secret list");
    for secret in list["items"].as_array().into_iter().flatten() {
        let name = secret["metadata"]["name"].as_str().unwrap_or_default();
        let mut texts: Vec<String> = Vec::new();
        for value in secret["data"]
            .as_object()
            .into_iter()
            .flat_map(|d| d.values())
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().unwrap_or_default())
                .unwrap_or_default();
            texts.push(String::from_utf8_lossy(&decoded).into_owned());
        }
        for value in secret["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flat_map(|a| a.values())
        {
            texts.push(value.as_str().unwrap_or_default().to_owned());
        }
        for value in values {
            assert!(
                !texts.iter().any(|t| t.contains(value.as_str())),
                "Secret {namespace}/{name} holds a refresh token or PKCE verifier in plaintext"
            );
        }
    }
}

/// `kubectl tokenkeeper -n <namespace> ...` as a user runs it: the plugin
/// found on PATH.
pub fn kubectl_plugin(namespace: &str) -> Command {
    let dir = Path::new(env!("CARGO_BIN_EXE_kubectl-tokenkeeper"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("kubectl");
    command
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig())
        .args(["tokenkeeper", "-n", namespace]);
    command
}

/// An emulator of one provider family's documented token endpoint
/// (`tests/providers/emulator.mjs`): its success and error bodies, rotation,
/// revocation; stopped on drop (and when this process dies: its stdin
/// closes).
pub struct ProviderEmulator {
    child: Child,
    pub port: u16,
    http: reqwest::blocking::Client,
}

impl ProviderEmulator {
    /// `family` as the emulator names it (hubspot, slack, github, ...),
    /// with access tokens that live `access_ttl` seconds.
    pub fn start(family: &str, access_ttl: u32) -> Self {
        Self::start_with(family, access_ttl, &[])
    }

    /// `start` with more of the emulator's arguments (`--tls-*`).
    pub fn start_with(family: &str, access_ttl: u32, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let log = File::create(artifacts_dir().join(format!(
            "emulator-{family}-{}-{}.log",
            std::process::id(),
            free_port()
        )))
        .expect("create the emulator's log");
        let mut child = Command::new("node")
            .arg(format!("{REPO}/tests/providers/emulator.mjs"))
            .args(["--family", family, "--access-ttl", &access_ttl.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start node tests/providers/emulator.mjs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the emulator's port");
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("the {family} emulator did not start: {line:?}"));
        ProviderEmulator {
            child,
            port: ready["port"].as_u64().unwrap() as u16,
            http: reqwest::blocking::Client::builder()
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn control(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.http
            .post(self.url(&format!("/control/{path}")))
            .json(&body)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("emulator control {path}: {e}"))
    }

    pub fn stats(&self) -> serde_json::Value {
        self.http
            .get(self.url("/control/stats"))
            .send()
            .and_then(|r| r.json())
            .expect("emulator stats")
    }

    /// A live grant, as if a person consented elsewhere.
    pub fn mint(&self, scope: &str) -> String {
        self.control("mint", serde_json::json!({ "scope": scope }))["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned()
    }
}

impl Drop for ProviderEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
