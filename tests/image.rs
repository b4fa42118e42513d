//! The image `deploy/image/build.sh` builds, run the way a pod runs it:
//! its OCI archive unpacked, nothing added but what the kubelet and the
//! container runtime put into a pod (the ServiceAccount's files,
//! `/etc/resolv.conf`, `/etc/hosts`), chrooted into as UID 65532 without
//! privileges (`podman run` is refused `setrlimit` on this kind of
//! machine), with the chart's arguments and the chart's ServiceAccount.
//! The API server is reached through `KUBERNETES_SERVICE_HOST`; the token
//! endpoint by name through a DNS server, over TLS trusted through the
//! image's CA bundle or the bundle the chart's `trustedCABundle` mounts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Operator, TestNamespace, free_port, stderr, stdout, wait_for};
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const READY: Duration = Duration::from_secs(60);
const TOKEN_HOST: &str = "login.tokenkeeper.test";
const OPERATOR_NAMESPACE: &str = "tokenkeeper-system";

/// The archive tests/run.sh built, or one built now.
fn image_archive() -> PathBuf {
    if let Ok(path) = std::env::var("TOKENKEEPER_IMAGE_ARCHIVE") {
        return PathBuf::from(path);
    }
    let out = Command::new(format!("{REPO}/deploy/image/build.sh"))
        .output()
        .expect("run deploy/image/build.sh");
    assert!(out.status.success(), "build.sh: {}", stderr(&out));
    let printed = stdout(&out);
    let archive = printed
        .lines()
        .find_map(|l| l.strip_prefix("archive "))
        .unwrap_or_else(|| panic!("build.sh printed no archive: {printed}"));
    PathBuf::from(archive.trim())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", stderr(&out));
    stdout(&out)
}

/// The archive's OCI layout, extracted under `dir`, and its one manifest.
fn open_layout(archive: &Path, dir: &Path) -> (PathBuf, Value) {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&layout));
    let index = read_json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = read_json(&blob(&layout, manifests[0]["digest"].as_str().unwrap()));
    (layout, manifest)
}

/// Unpacks the archive's image into `rootfs`; its config.
fn unpack(archive: &Path, dir: &Path, rootfs: &Path) -> Value {
    std::fs::create_dir_all(rootfs).unwrap();
    let (layout, manifest) = open_layout(archive, dir);
    for layer in manifest["layers"].as_array().expect("layers") {
        run(Command::new("tar")
            .arg("-xzf")
            .arg(blob(&layout, layer["digest"].as_str().unwrap()))
            .arg("-C")
            .arg(rootfs));
    }
    read_json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
}

/// Every file and directory under `root`, relative, sorted.
fn tree(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            found.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                pending.push(path);
            }
        }
    }
    found.sort();
    found
}

/// A test CA and a certificate for `TOKEN_HOST` it signed, in `dir`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tokenkeeper test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={TOKEN_HOST}"),
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName=DNS:{TOKEN_HOST}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// The DNS server of tests/image/dns.mjs, stopped on drop; it logs each
/// query it answers.
struct Dns {
    child: Child,
    log: PathBuf,
}

impl Dns {
    fn start(address: &str, name: &str, answer: &str) -> Self {
        use std::io::BufRead;
        let log = common::artifacts_dir().join(format!("dns-{}.log", std::process::id()));
        let mut child = Command::new("node")
            .arg(format!("{REPO}/tests/image/dns.mjs"))
            .args(["--address", address, "--port", "53"])
            .args(["--record", &format!("{name}={answer}")])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start node tests/image/dns.mjs");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "listening",
            "the DNS server did not start (root is needed for port 53)"
        );
        let queries = log.with_extension("queries");
        let mut file = std::fs::File::create(&queries).unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stdout, &mut file);
        });
        Dns {
            child,
            log: queries,
        }
    }

    fn queries(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin kubeconfig's cluster: server host, port and CA (PEM).
fn cluster() -> (String, String, Vec<u8>) {
    let view: Value = serde_json::from_str(&common::kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "--flatten",
        "-o",
        "json",
    ]))
    .unwrap();
    let cluster = &view["clusters"][0]["cluster"];
    let server = url::Url::parse(cluster["server"].as_str().unwrap()).unwrap();
    let ca = cluster["certificate-authority-data"]
        .as_str()
        .expect("the in-cluster configuration needs the cluster's CA");
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(ca)
        .unwrap();
    (
        server
            .host_str()
            .unwrap()
            .trim_matches(['[', ']'])
            .to_owned(),
        server.port_or_known_default().unwrap().to_string(),
        ca,
    )
}

/// The chart's container, as rendered with `sets`.
struct ChartContainer {
    args: Vec<String>,
    /// Each variable, with its value when the chart gives one literally.
    env: Vec<(String, Option<String>)>,
    /// Where each ConfigMap volume is mounted: (mount path, key).
    config_map_mounts: Vec<(String, String)>,
}

/// The container as the chart renders it, watching `namespace`, with free
/// ports and `sets`.
fn chart_container(namespace: &str, sets: &[&str]) -> ChartContainer {
    let helm = common::helm();
    let mut command = Command::new(helm);
    command
        .args([
            "template",
            "tk-image",
            &format!("{REPO}/charts/tokenkeeper"),
        ])
        .args([
            "--namespace",
            OPERATOR_NAMESPACE,
            "--show-only",
            "templates/deployment.yaml",
        ])
        .args(["--set", &format!("watchNamespaces={{{namespace}}}")])
        .args(["--set", &format!("metrics.port={}", free_port())])
        .args(["--set", &format!("authorization.port={}", free_port())]);
    for set in sets {
        command.args(["--set", set]);
    }
    let deployment: Value = serde_yaml::from_str(&run(&mut command)).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let items = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let config_map_mounts = items(&container["volumeMounts"])
        .iter()
        .map(|mount| {
            let volume = items(&pod["volumes"])
                .into_iter()
                .find(|v| v["name"] == mount["name"])
                .expect("a volume for each mount");
            let key = volume["configMap"]["items"][0]["path"]
                .as_str()
                .expect("a ConfigMap key");
            (
                mount["mountPath"].as_str().unwrap().to_owned(),
                key.to_owned(),
            )
        })
        .collect();
    ChartContainer {
        args: items(&container["args"])
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect(),
        env: items(&container["env"])
            .iter()
            .map(|e| {
                let value = e["value"].as_str().map(str::to_owned);
                (e["name"].as_str().unwrap().to_owned(), value)
            })
            .collect(),
        config_map_mounts,
    }
}

/// What the kubelet and the runtime add to a pod's root filesystem.
fn as_a_pod_gets_it(rootfs: &Path, nameserver: &str, ca: &[u8]) {
    let account = rootfs.join("var/run/secrets/kubernetes.io/serviceaccount");
    std::fs::create_dir_all(&account).unwrap();
    let token = common::kubectl_ok(&["create", "token", "tokenkeeper", "-n", OPERATOR_NAMESPACE]);
    std::fs::write(account.join("token"), token.trim()).unwrap();
    std::fs::write(account.join("ca.crt"), ca).unwrap();
    std::fs::write(account.join("namespace"), OPERATOR_NAMESPACE).unwrap();
    std::fs::write(
        rootfs.join("etc/resolv.conf"),
        format!("nameserver {nameserver}\n"),
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
}

/// tokenkeeper from `rootfs` as UID/GID 65532, no new privileges, with only
/// the environment a pod of the chart has.
fn start_from_image(rootfs: &Path, container: &ChartContainer, label: &str) -> Operator {
    let (host, port, _) = cluster();
    // Absolute paths: the environment is cleared before setpriv runs chroot.
    let mut command = Command::new(which("setpriv"));
    command
        .arg("--no-new-privs")
        .arg(which("chroot"))
        .args(["--userspec=65532:65532", "--groups=65532"])
        .arg(rootfs)
        .arg("/tokenkeeper")
        .args(&container.args)
        // The test's provider is on this machine's loopback, which the
        // chart's settings refuse.
        .arg("--allow-plain-http-loopback")
        .env_clear()
        .env("KUBERNETES_SERVICE_HOST", host)
        .env("KUBERNETES_SERVICE_PORT", port);
    for (name, literal) in &container.env {
        let value = match (name.as_str(), literal) {
            ("POD_NAME", None) => "tk-image-0",
            ("POD_NAMESPACE", None) => OPERATOR_NAMESPACE,
            ("RUST_LOG", _) => "info,tokenkeeper=debug",
            (_, Some(value)) => value,
            (other, None) => {
                panic!("the chart sets {other} from elsewhere: say here what a pod gets")
            }
        };
        command.env(name, value);
    }
    Operator::spawn(command, label)
}

fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// The operator's log once it contains `text`.
fn wait_for_log(operator: &Operator, text: &str) -> String {
    common::wait_for(&format!("{text:?} in the operator's log"), READY, || {
        let logs = operator.logs();
        logs.contains(text).then_some(logs.clone()).ok_or(logs)
    })
}

/// Uid, Gid, Groups, CapEff and NoNewPrivs of process `pid`.
fn credentials(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Groups:", "CapEff:", "NoNewPrivs:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn the_image_runs_as_a_pod_would_and_serves_a_connection() {
    let archive = image_archive();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    let config = unpack(&archive, dir.path(), &rootfs);
    assert_eq!(config["config"]["User"], "65532:65532", "{config}");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/tokenkeeper"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["run"]));
    assert_eq!(
        tree(&rootfs),
        [
            "etc",
            "etc/group",
            "etc/passwd",
            "etc/ssl",
            "etc/ssl/certs",
            "etc/ssl/certs/ca-certificates.crt",
            "tokenkeeper",
        ],
        "nothing but the binary, the CA bundle and the users"
    );
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "{passwd}");

    // The provider at a name only the DNS server knows, over TLS with a
    // certificate of a CA that is not in the image's bundle.
    let address = common::own_loopback_address();
    let dns = Dns::start(&address, TOKEN_HOST, &address);
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (test_ca, server_cert, server_key) = certificates(&certs);
    let emulator = common::ProviderEmulator::start_with(
        "google",
        30,
        &[
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
            "--tls-address",
            &format!("{address}:443"),
        ],
    );
    let (_, _, cluster_ca) = cluster();
    as_a_pod_gets_it(&rootfs, &address, &cluster_ca);

    let ns = TestNamespace::new("image");
    let chart = chart_container(&ns.name, &[]);
    assert!(chart.config_map_mounts.is_empty(), "no volume by default");
    ns.create_app_client();
    ns.put_refresh_token(&emulator.mint("read"));
    for secret in ["app-client", "crm-grant"] {
        ns.kubectl_ok(&["label", "secret", secret, "tokenkeeper.dev/source=true"]);
    }
    ns.apply_ok(&format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\nspec:\n  oauth2:\n    \
         tokenUrl: https://{TOKEN_HOST}/token\n    revokeOnDelete: false\n    grant: refreshToken\n    client:\n      \
         secretRef:\n        name: app-client\n    refreshTokenSecretRef:\n      name: crm-grant\n      key: refresh_token\n"
    ));

    // The image's bundle alone does not trust the test CA: the name
    // resolves, TLS refuses.
    let mut operator = start_from_image(&rootfs, &chart, "image-untrusted");
    let pid = operator.pid();
    ns.wait_ready("crm", "False", "ProviderUnavailable", READY);
    assert!(
        dns.queries().contains(&format!("A {TOKEN_HOST}")),
        "the name was looked up through resolv.conf: {}",
        dns.queries()
    );
    assert_eq!(
        credentials(pid),
        [
            "Uid: 65532 65532 65532 65532",
            "Gid: 65532 65532 65532 65532",
            "Groups: 65532",
            "CapEff: 0000000000000000",
            "NoNewPrivs: 1",
        ]
    );
    let logs = wait_for_log(&operator, "invalid peer certificate");
    assert!(
        logs.contains("UnknownIssuer"),
        "the log names the cause: {logs}"
    );
    assert_eq!(
        emulator.stats()["tokenRequests"]
            .as_u64()
            .unwrap_or_default(),
        0
    );
    operator.stop();

    // The image's bundle with the test CA appended: the connection becomes
    // Ready through the image.
    let bundle = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let pristine = std::fs::read(&bundle).unwrap();
    let test_ca = std::fs::read(&test_ca).unwrap();
    std::fs::write(&bundle, [&pristine[..], &test_ca[..]].concat()).unwrap();
    let mut operator = start_from_image(&rootfs, &chart, "image");
    ns.force_refresh("crm", "trusted");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let first = ns.secret_value("crm-credentials", "access_token");
    assert!(
        first.as_deref().is_some_and(|t| t.starts_with("ya29.")),
        "{first:?}"
    );
    assert!(operator.stop().success(), "{}", operator.logs());

    // The chart's trustedCABundle: the image's bundle as built, the test CA
    // in a ConfigMap key the kubelet mounts, SSL_CERT_FILE naming it.
    std::fs::write(&bundle, &pristine).unwrap();
    let chart = chart_container(&ns.name, &["trustedCABundle.configMap=provider-ca"]);
    let [(mount, key)] = &chart.config_map_mounts[..] else {
        panic!("one ConfigMap mount: {:?}", chart.config_map_mounts)
    };
    let mounted = rootfs.join(mount.trim_start_matches('/'));
    std::fs::create_dir_all(&mounted).unwrap();
    std::fs::write(mounted.join(key), &test_ca).unwrap();
    let operator = start_from_image(&rootfs, &chart, "image-ca-bundle");
    ns.force_refresh("crm", "trusted-by-the-chart");
    wait_for(
        "a token fetched through the chart's CA bundle",
        READY,
        || {
            let now = ns.secret_value("crm-credentials", "access_token");
            (now.is_some() && now != first)
                .then_some(())
                .ok_or(format!("{now:?}"))
        },
    );
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    assert!(!operator.logs().contains("panicked"), "{}", operator.logs());
}

/// A registry of the test's own (Debian's docker-registry), stopped on drop.
struct Registry {
    child: Child,
    address: String,
}

impl Registry {
    fn start(dir: &Path) -> Self {
        let binary = std::env::var("TOKENKEEPER_REGISTRY").expect(
            "TOKENKEEPER_REGISTRY is set by tests/run.sh (tests/tools/install-registry.sh)",
        );
        let address = format!("127.0.0.1:{}", free_port());
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = common::artifacts_dir().join(format!("registry-{}.log", std::process::id()));
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, address };
        common::wait_for("the registry", READY, || {
            let probe = std::net::TcpStream::connect(&registry.address);
            probe.map(drop).map_err(|e| e.to_string())
        });
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The README's push command, to a registry of the test's own: the image
/// arrives whole (the archive's layer, the user, the entrypoint).
#[test]
fn the_archive_pushes_to_a_registry_as_the_readme_says() {
    let archive = image_archive();
    let dir = tempfile::tempdir().unwrap();
    let (_, manifest) = open_layout(&archive, dir.path());

    let registry = Registry::start(dir.path());
    let version = env!("CARGO_PKG_VERSION");
    let reference = format!(
        "docker://{}/platform/tokenkeeper:{version}",
        registry.address
    );
    let readme = std::fs::read_to_string(format!("{REPO}/README.md")).unwrap();
    assert!(
        readme.contains(&format!(
            "skopeo copy oci-archive:target/image/tokenkeeper-{version}.oci.tar docker://"
        )),
        "the README's push command names this version's archive"
    );
    // Plain HTTP: the test's registry has no certificate.
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(&reference));
    let pushed: Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &reference,
    ])))
    .unwrap();
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(pushed["Layers"], serde_json::json!(layers), "{pushed}");
    let config: Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--tls-verify=false",
        &reference,
    ])))
    .unwrap();
    assert_eq!(config["config"]["User"], "65532:65532", "{config}");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/tokenkeeper"])
    );
}
