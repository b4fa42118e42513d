//! The scale benchmark: N SourceConnections with rotating refresh tokens
//! on a real kube-apiserver, refreshed by the release build of tokenkeeper
//! against the benchmark's own token server, measured from the outside.
//!
//!   tests/bench/run.sh [CONNECTIONS] [MEASURE_SECONDS]
//!
//! That script starts the control plane; this program then creates the
//! connections, starts the operator, and measures over a fixed window:
//! freshness of the target Secrets (from a watch of the API), refresh
//! lateness, API writes and token requests per refresh, the operator's RSS
//! and CPU, cold start, and the CPU of a minimal "POST token + PUT Secret"
//! loop doing the same number of refreshes with the same HTTP clients.
//!
//! The program runs in three roles: the benchmark (default), the token
//! server (`token-server`) and the baseline loop (`baseline`); the last two
//! are separate processes so that each one's CPU is measured apart.

mod measure;
mod token_server;

// The baselines run in this binary: with the operator's allocator, so that
// the cost ratios compare the work and not the allocators.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{AsyncBufReadExt as _, StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, WatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use tokenkeeper::api::{LABEL_SECRET_ROLE, SECRET_ROLE_CREDENTIALS, SourceConnection};
use tokenkeeper::oauth::token::{ANNOTATION_NEXT_REFRESH_AT, KEY_ACCESS_TOKEN};
use tokenkeeper::runtime::throttle::{HostThrottle, Limits};
use tokenkeeper::runtime::wire::SecretMeta;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use measure::{ProcessSample, control_plane_cpu, percentile, request_counts};

const NAMESPACE: &str = "bench";
const BASELINE_NAMESPACE: &str = "bench-baseline";
/// How long the paced baseline runs (at most the measured window).
const PACED_BASELINE_SECONDS: f64 = 60.0;
/// How many refreshes the baseline at the token limit does at most: half a
/// minute at the default 200 token requests per second.
const LIMITED_BASELINE_REFRESHES: u64 = 6000;
const CREATE_CONCURRENCY: usize = 48;

struct Options {
    connections: usize,
    token_lifetime: u64,
    measure: u64,
    operator: PathBuf,
    cold_start_timeout: u64,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        connections: 1000,
        token_lifetime: 120,
        measure: 240,
        operator: PathBuf::from("target/release/tokenkeeper"),
        cold_start_timeout: 900,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().context("missing value");
        match arg.as_str() {
            "--connections" => o.connections = value()?.parse()?,
            "--token-lifetime" => o.token_lifetime = value()?.parse()?,
            "--measure" => o.measure = value()?.parse()?,
            "--operator" => o.operator = value()?.into(),
            "--cold-start-timeout" => o.cold_start_timeout = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str);
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, and then there is nothing to test here.
    if !args.iter().any(|a| a == "--bench") && !matches!(role, Some("token-server" | "baseline")) {
        eprintln!(
            "the scale benchmark runs through tests/bench/run.sh (cargo bench --bench scale)"
        );
        return Ok(());
    }
    let args: Vec<String> = args.into_iter().filter(|a| a != "--bench").collect();
    // The baseline runs on the same kind of runtime as the operator.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("token-server") => runtime.block_on(run_token_server(&args[1..])),
        Some("baseline") => runtime.block_on(baseline(&args[1..])),
        _ => runtime.block_on(benchmark(options(&args)?)),
    }
}

async fn run_token_server(args: &[String]) -> anyhow::Result<()> {
    let lifetime = args.first().context("lifetime")?.parse()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    token_server::serve(listener, lifetime).await
}

/// Spawns this program in another role; its first stdout line is returned.
async fn spawn_role(args: &[&str]) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next_line().await?.context("no output")?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, first))
}

async fn mint(http: &reqwest::Client, base: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let body = http
        .post(format!("{base}/mint?count={count}"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(serde_json::from_str(&body)?)
}

async fn server_stats(http: &reqwest::Client, base: &str) -> anyhow::Result<serde_json::Value> {
    let body = http
        .get(format!("{base}/stats"))
        .send()
        .await?
        .text()
        .await?;
    Ok(serde_json::from_str(&body)?)
}

fn secret(name: &str, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    }
}

async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(name).await?.is_some() {
        namespaces.delete(name, &DeleteParams::default()).await?;
        while namespaces.get_opt(name).await?.is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    Ok(())
}

fn connection_name(i: usize) -> String {
    format!("c{i:05}")
}

async fn create_connections(
    client: &Client,
    token_url: &str,
    refresh_tokens: Vec<String>,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let connections: Api<SourceConnection> = Api::namespaced(client.clone(), NAMESPACE);
    secrets
        .create(
            &PostParams::default(),
            &secret(
                "oauth-client",
                [
                    ("client_id".to_owned(), token_server::CLIENT_ID.to_owned()),
                    (
                        "client_secret".to_owned(),
                        token_server::CLIENT_SECRET.to_owned(),
                    ),
                ]
                .into(),
            ),
        )
        .await?;
    futures::stream::iter(refresh_tokens.into_iter().enumerate())
        .map(|(i, refresh_token)| {
            let secrets = secrets.clone();
            let connections = connections.clone();
            async move {
                let name = connection_name(i);
                let grant = format!("{name}-grant");
                secrets
                    .create(
                        &PostParams::default(),
                        &secret(&grant, [("refresh_token".to_owned(), refresh_token)].into()),
                    )
                    .await?;
                let conn: SourceConnection = serde_json::from_value(json!({
                    "apiVersion": "tokenkeeper.dev/v1alpha1",
                    "kind": "SourceConnection",
                    "metadata": {"name": name},
                    "spec": {"oauth2": {
                        "tokenUrl": token_url,
                        "grant": "refreshToken",
                        "client": {"secretRef": {"name": "oauth-client"}},
                        "refreshTokenSecretRef": {"name": grant, "key": "refresh_token"},
                        "revokeOnDelete": false,
                    }},
                }))?;
                connections.create(&PostParams::default(), &conn).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// What the benchmark knows of one connection's target Secret, from the
/// watch: the token in it, and when that token truly expires, from what
/// the token server wrote into it (the request's millisecond) and the
/// lifetime it issues, not from what the operator wrote beside it.
#[derive(Default, Clone)]
struct Observed {
    access_token: String,
    true_expires_at_ms: Option<i64>,
    planned_refresh_at: Option<i64>,
}

#[derive(Default)]
struct Observations {
    /// The lifetime the token server issues.
    lifetime_ms: i64,
    secrets: HashMap<String, Observed>,
    ready: HashSet<String>,
    /// Window measurements: set while measuring.
    measuring: bool,
    refreshes_seen: u64,
    lateness_ms: Vec<i64>,
    /// How long before the replaced token truly expired its successor was
    /// requested.
    margins_ms: Vec<i64>,
    fresh_samples: u64,
    samples: u64,
    stale_examples: Vec<String>,
}

fn observe_secret(obs: &mut Observations, secret: &Secret) {
    let Some(owner) = owner_of(secret) else {
        return;
    };
    let data = secret.data.clone().unwrap_or_default();
    let Some(access_token) = data
        .get(KEY_ACCESS_TOKEN)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    else {
        // An emptied Secret holds no token: not fresh.
        obs.secrets.remove(&owner);
        return;
    };
    let requested_at = token_server::requested_at_ms(&access_token);
    let planned_refresh_at = secret
        .annotations()
        .get(ANNOTATION_NEXT_REFRESH_AT)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(|t| t.as_millisecond());
    let previous = obs.secrets.get(&owner).cloned();
    if let Some(previous) = &previous
        && previous.access_token != access_token
        && obs.measuring
    {
        obs.refreshes_seen += 1;
        if let (Some(planned), Some(requested)) = (previous.planned_refresh_at, requested_at) {
            obs.lateness_ms.push(requested - planned);
        }
        if let (Some(expired), Some(requested)) = (previous.true_expires_at_ms, requested_at) {
            obs.margins_ms.push(expired - requested);
        }
    }
    let lifetime_ms = obs.lifetime_ms;
    obs.secrets.insert(
        owner,
        Observed {
            access_token,
            true_expires_at_ms: requested_at.map(|at| at + lifetime_ms),
            planned_refresh_at,
        },
    );
}

/// The connection a target Secret belongs to.
fn owner_of(secret: &Secret) -> Option<String> {
    secret.owner_references().first().map(|o| o.name.clone())
}

fn is_ready(conn: &SourceConnection) -> bool {
    conn.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Watches the target Secrets and the connections, as an outside observer
/// does; returns once both have listed, so that their initial lists do not
/// land in the operator's cold start.
async fn spawn_watches(client: &Client, obs: Arc<Mutex<Observations>>) -> anyhow::Result<()> {
    let (listed_tx, mut listed_rx) = tokio::sync::mpsc::channel::<()>(2);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let config = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{LABEL_SECRET_ROLE}={SECRET_ROLE_CREDENTIALS}"));
    let secret_obs = obs.clone();
    let secrets_listed = listed_tx.clone();
    tokio::spawn(async move {
        let mut stream = watcher(secrets, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                    observe_secret(&mut secret_obs.lock().expect("not poisoned"), &secret);
                }
                // A deleted Secret holds no token: not fresh.
                Ok(watcher::Event::Delete(secret)) => {
                    if let Some(owner) = owner_of(&secret) {
                        secret_obs
                            .lock()
                            .expect("not poisoned")
                            .secrets
                            .remove(&owner);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let _ = secrets_listed.try_send(());
                }
                _ => {}
            }
        }
    });
    let connections: Api<SourceConnection> = Api::namespaced(client.clone(), NAMESPACE);
    tokio::spawn(async move {
        let config = watcher::Config::default().any_semantic();
        let mut stream = watcher(connections, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(conn) | watcher::Event::InitApply(conn)) => {
                    let mut obs = obs.lock().expect("not poisoned");
                    if is_ready(&conn) {
                        obs.ready.insert(conn.name_any());
                    } else {
                        obs.ready.remove(&conn.name_any());
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let _ = listed_tx.try_send(());
                }
                _ => {}
            }
        }
    });
    for _ in 0..2 {
        listed_rx.recv().await.context("a benchmark watch ended")?;
    }
    Ok(())
}

/// Waits until the control plane has digested the creation of the
/// connections (its CPU use drops below a fifth of a core), so the cold
/// start measures the operator's start on a settled cluster, as when it
/// restarts in a real one.
async fn wait_for_settled_control_plane() -> Duration {
    let started = Instant::now();
    let mut before = control_plane_cpu();
    while started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = control_plane_cpu();
        if now - before < 0.4 {
            break;
        }
        before = now;
    }
    started.elapsed()
}

/// Once a second while measuring: which connections' Secrets hold a token
/// that has not expired by the token server's account.
fn spawn_freshness_sampler(obs: Arc<Mutex<Observations>>, connections: usize) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = Timestamp::now().as_millisecond();
            let mut obs = obs.lock().expect("not poisoned");
            if !obs.measuring {
                continue;
            }
            let fresh = (0..connections)
                .filter(|i| is_fresh(obs.secrets.get(&connection_name(*i)), now))
                .count();
            obs.samples += connections as u64;
            obs.fresh_samples += fresh as u64;
            if fresh < connections && obs.stale_examples.len() < 5 {
                let stale: Vec<String> = (0..connections)
                    .map(connection_name)
                    .filter(|n| !is_fresh(obs.secrets.get(n), now))
                    .take(3)
                    .collect();
                obs.stale_examples
                    .push(format!("{} at {}", stale.join(","), Timestamp::now()));
            }
        }
    });
}

/// Whether `observed` holds a token the token server issued and that has
/// not expired at `now_ms`.
fn is_fresh(observed: Option<&Observed>, now_ms: i64) -> bool {
    observed
        .and_then(|o| o.true_expires_at_ms)
        .is_some_and(|at| at > now_ms)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn benchmark(o: Options) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("KUBECONFIG must point at the benchmark's control plane")?;
    let http = reqwest::Client::new();
    let (mut token_server, port) =
        spawn_role(&["token-server", &o.token_lifetime.to_string()]).await?;
    let server_pid = token_server.id().unwrap_or_default();
    let base = format!("http://127.0.0.1:{port}");
    let token_url = format!("{base}/token");

    eprintln!("[bench] creating {} connections", o.connections);
    let created = Instant::now();
    ensure_namespace(&client, NAMESPACE).await?;
    let refresh_tokens = mint(&http, &base, o.connections).await?;
    create_connections(&client, &token_url, refresh_tokens).await?;
    eprintln!(
        "[bench] created {} connections and Secrets in {:.1}s",
        o.connections,
        created.elapsed().as_secs_f64()
    );

    let obs = Arc::new(Mutex::new(Observations {
        lifetime_ms: i64::try_from(o.token_lifetime)?.saturating_mul(1000),
        ..Observations::default()
    }));
    spawn_watches(&client, obs.clone()).await?;
    spawn_freshness_sampler(obs.clone(), o.connections);
    let settled = wait_for_settled_control_plane().await;
    eprintln!(
        "[bench] the benchmark's watches listed; the control plane settled after {:.0}s more",
        settled.as_secs_f64()
    );

    std::fs::create_dir_all("target/bench")?;
    let log = std::fs::File::create("target/bench/operator.log")?;
    let metrics_port = free_port()?;
    let plane_cpu_at_start = control_plane_cpu();
    let others_at_start = (
        ProcessSample::read(std::process::id())?.cpu_seconds,
        ProcessSample::read(server_pid)?.cpu_seconds,
    );
    let requests_at_start = request_counts(&client).await?;
    let started = Instant::now();
    // TOKENKEEPER_BENCH_WRAPPER runs the operator under a profiler, e.g.
    // "perf record -g -o target/bench/perf.data", or "heaptrack -o
    // target/bench/heap" with TOKENKEEPER_BENCH_BUILD_FLAGS=--no-default-features.
    let wrapper: Vec<String> = std::env::var("TOKENKEEPER_BENCH_WRAPPER")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let (program, wrapper_args) = match wrapper.split_first() {
        Some((program, rest)) => (
            PathBuf::from(program),
            rest.iter()
                .cloned()
                .chain([o.operator.display().to_string()])
                .collect(),
        ),
        None => (o.operator.clone(), Vec::new()),
    };
    let mut operator = Command::new(&program)
        .args(&wrapper_args)
        .args([
            "run",
            "--namespace",
            NAMESPACE,
            "--leader-elect",
            "--leader-election-namespace",
            NAMESPACE,
            "--metrics-bind-address",
            &format!("127.0.0.1:{metrics_port}"),
            // The benchmark's token server is on this machine, over http.
            "--allow-plain-http-loopback",
        ])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let wrapper_pid = operator.id().context("operator pid")?;
    // What is measured and stopped is the operator, not a profiler around it.
    let operator_pid = loop {
        if let Some(pid) = measure::process_running(wrapper_pid, &o.operator) {
            break pid;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the operator process did not appear under {}",
                program.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Cold start: from the operator's start to every connection Ready.
    let mut peak_rss_cold = 0;
    let cold_start = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(status) = operator.try_wait()? {
            bail!(
                "the operator exited during cold start ({status}); see target/bench/operator.log"
            );
        }
        peak_rss_cold = peak_rss_cold.max(ProcessSample::read(operator_pid)?.rss_kib);
        let ready = obs.lock().expect("not poisoned").ready.len();
        if ready >= o.connections {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(o.cold_start_timeout) {
            bail!("only {ready} of {} connections became Ready", o.connections);
        }
    };
    let cold_plane_cpu = control_plane_cpu() - plane_cpu_at_start;
    let cold_operator_cpu = ProcessSample::read(operator_pid)?.cpu_seconds;
    // The benchmark's own watches and the token server share the cores.
    let cold_benchmark_cpu =
        ProcessSample::read(std::process::id())?.cpu_seconds - others_at_start.0;
    let cold_token_server_cpu = ProcessSample::read(server_pid)?.cpu_seconds - others_at_start.1;
    let cold_requests = server_stats(&http, &base).await?["requests"]
        .as_u64()
        .unwrap_or_default();
    // What the API server served meanwhile (all clients), per connection.
    let requests_after_cold_start = request_counts(&client).await?;
    let per_connection = |before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>| {
        deltas(before, after)
            .into_iter()
            .map(|(resource, n)| (resource, n / o.connections as f64))
            .filter(|(_, n)| *n >= 0.01)
            .collect::<BTreeMap<_, _>>()
    };
    let cold_writes = per_connection(&requests_at_start.writes, &requests_after_cold_start.writes);
    let cold_reads = per_connection(&requests_at_start.reads, &requests_after_cold_start.reads);
    eprintln!(
        "[bench] all {} Ready after {:.1}s; measuring for {}s",
        o.connections,
        cold_start.as_secs_f64(),
        o.measure
    );

    // The window.
    let requests_before = request_counts(&client).await?;
    let stats_before = server_stats(&http, &base).await?;
    let cpu_before = ProcessSample::read(operator_pid)?;
    let server_cpu_before = ProcessSample::read(server_pid)?;
    let plane_cpu_before = control_plane_cpu();
    obs.lock().expect("not poisoned").measuring = true;
    let window_start = Instant::now();
    let mut peak_rss = 0;
    while window_start.elapsed() < Duration::from_secs(o.measure) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(status) = operator.try_wait()? {
            bail!("the operator exited while measured ({status}); see target/bench/operator.log");
        }
        peak_rss = peak_rss.max(ProcessSample::read(operator_pid)?.rss_kib);
    }
    obs.lock().expect("not poisoned").measuring = false;
    let window = window_start.elapsed().as_secs_f64();
    let cpu_after = ProcessSample::read(operator_pid)?;
    let server_cpu_after = ProcessSample::read(server_pid)?;
    let plane_cpu = control_plane_cpu() - plane_cpu_before;
    let stats_after = server_stats(&http, &base).await?;
    let requests_after = request_counts(&client).await?;
    let _ = Command::new("kill")
        .args(["-TERM", &operator_pid.to_string()])
        .status()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(20), operator.wait()).await;

    let counter = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_default();
    let token_requests = counter(&stats_after, "requests") - counter(&stats_before, "requests");
    let provider_refreshes =
        counter(&stats_after, "refreshed") - counter(&stats_before, "refreshed");
    let reused = counter(&stats_after, "reused");
    let rejected = counter(&stats_after, "rejected");
    let writes = deltas(&requests_before.writes, &requests_after.writes);
    let reads = deltas(&requests_before.reads, &requests_after.reads);
    let total_writes: f64 = writes.values().sum();
    let total_reads: f64 = reads.values().sum();
    let operator_cpu = cpu_after.cpu_seconds - cpu_before.cpu_seconds;
    let server_cpu = server_cpu_after.cpu_seconds - server_cpu_before.cpu_seconds;

    let (refreshes_seen, mut lateness, mut margins, freshness, stale_examples) = {
        let obs = obs.lock().expect("not poisoned");
        (
            obs.refreshes_seen,
            obs.lateness_ms.clone(),
            obs.margins_ms.clone(),
            obs.fresh_samples as f64 / obs.samples.max(1) as f64,
            obs.stale_examples.clone(),
        )
    };
    lateness.sort_unstable();
    margins.sort_unstable();

    // The baseline: the same number of refreshes, nothing but POST token +
    // PUT Secret, with the operator's HTTP clients.
    eprintln!("[bench] baseline: {provider_refreshes} refreshes of POST token + PUT Secret");
    let back_to_back = run_baseline(&token_url, &base, provider_refreshes, &[]).await?;
    // The same loop with its token requests started by the operator's own
    // limiter: as fast as the operator may ever refresh.
    let limited_count = provider_refreshes.clamp(1, LIMITED_BASELINE_REFRESHES);
    eprintln!("[bench] baseline at the token limit: {limited_count} refreshes");
    let limited = run_baseline(&token_url, &base, limited_count, &[TOKEN_LIMIT]).await?;
    // And with the operator's watch of Secrets added: what an operator
    // pays before it reads or decides anything, for noticing at once a
    // Secret someone else changed or deleted.
    eprintln!("[bench] baseline at the token limit with a Secret watch: {limited_count} refreshes");
    let watched = run_baseline(&token_url, &base, limited_count, &[TOKEN_LIMIT, WATCHED]).await?;
    eprintln!(
        "[bench] baseline at the token limit receiving its echoes: {limited_count} refreshes"
    );
    let received = run_baseline(&token_url, &base, limited_count, &[TOKEN_LIMIT, RECEIVED]).await?;
    // The same loop again at the operator's pace: refreshes spread over
    // time, each paying its own wake-up, as the operator's do.
    let paced_seconds = window.min(PACED_BASELINE_SECONDS);
    let paced_count = ((provider_refreshes as f64 / window) * paced_seconds).round() as u64;
    eprintln!(
        "[bench] baseline at the operator's pace: {paced_count} refreshes over {paced_seconds:.0}s"
    );
    let paced = run_baseline(
        &token_url,
        &base,
        paced_count,
        &[&paced_seconds.to_string()],
    )
    .await?;
    let _ = token_server.kill().await;

    let per_refresh = |x: f64| x / provider_refreshes.max(1) as f64;
    let operator_cost = per_refresh(operator_cpu);
    let baseline_cost = back_to_back.cpu_per_refresh();
    let limited_cost = limited.cpu_per_refresh();
    let watched_cost = watched.cpu_per_refresh();
    let received_cost = received.cpu_per_refresh();
    let paced_cost = paced.cpu_per_refresh();
    // One cost over another; a loop too short for the CPU clock reads 0.
    let ratio = |cost: f64, to: f64| cost / to.max(f64::MIN_POSITIVE);
    let ms = |p: f64| percentile(&lateness, p).map_or("n/a".into(), |v| format!("{v} ms"));
    let detail =
        |counts: &BTreeMap<String, f64>| listing(counts, provider_refreshes.max(1) as f64, 3);
    let rows = [
        (
            "freshness (connection-seconds with a token unexpired by the token server's account)"
                .to_owned(),
            format!("{:.3} %", freshness * 100.0),
            "100.000 %",
        ),
        (
            "refresh lateness p50 / p99 / max (requested - the operator's planned time)".to_owned(),
            format!("{} / {} / {}", ms(0.50), ms(0.99), ms(1.0)),
            "p99 < 1 s",
        ),
        (
            "margin p50 / p1 / min (the old token's true expiry - the new one's request)"
                .to_owned(),
            format!(
                "{} / {} / {}",
                margin_s(&margins, 0.5),
                margin_s(&margins, 0.01),
                margin_s(&margins, 0.0)
            ),
            "> 0",
        ),
        (
            "API writes per refresh".to_owned(),
            format!("{:.3}  ({})", per_refresh(total_writes), detail(&writes)),
            "<= 1.05",
        ),
        (
            "API reads per refresh (all clients, the benchmark's own included)".to_owned(),
            format!("{:.3}  ({})", per_refresh(total_reads), detail(&reads)),
            "",
        ),
        (
            "token requests per refresh".to_owned(),
            format!(
                "{:.3}  ({token_requests} requests, {refreshes_seen} new tokens seen in Secrets)",
                token_requests as f64 / refreshes_seen.max(1) as f64
            ),
            "1.00",
        ),
        (
            "operator RSS peak (measured window / cold start)".to_owned(),
            format!(
                "{:.1} MiB / {:.1} MiB",
                peak_rss as f64 / 1024.0,
                peak_rss_cold as f64 / 1024.0
            ),
            "< 64 MiB at 10,000",
        ),
        (
            "operator CPU per 1,000 refreshes".to_owned(),
            format!("{:.2} s", operator_cost * 1000.0),
            "",
        ),
        (
            "cold start (operator start to all Ready)".to_owned(),
            format!(
                "{:.1} s  ({cold_requests} token requests; CPU: control plane {:.0} s, operator {:.0} s, token server {:.0} s, benchmark {:.0} s)",
                cold_start.as_secs_f64(),
                cold_plane_cpu,
                cold_operator_cpu,
                cold_token_server_cpu,
                cold_benchmark_cpu
            ),
            "< 60 s at 10,000",
        ),
        (
            "cold start API requests per connection (writes / reads)".to_owned(),
            format!(
                "{}  /  {}",
                listing(&cold_writes, 1.0, 2),
                listing(&cold_reads, 1.0, 2)
            ),
            "",
        ),
        (
            "baseline CPU per 1,000 refreshes (POST token + PUT Secret)".to_owned(),
            format!(
                "{:.2} s  ({} refreshes back to back, {:.0} per second)",
                baseline_cost * 1000.0,
                back_to_back.refreshes,
                back_to_back.per_second()
            ),
            "",
        ),
        (
            "operator cost / baseline cost".to_owned(),
            format!("{:.2}", ratio(operator_cost, baseline_cost)),
            "<= 1.2",
        ),
        (
            "baseline at the operator's token limit, CPU per 1,000 refreshes".to_owned(),
            format!(
                "{:.2} s  ({} refreshes, {:.0} per second; operator cost / this {:.2})",
                limited_cost * 1000.0,
                limited.refreshes,
                limited.per_second(),
                ratio(operator_cost, limited_cost)
            ),
            "",
        ),
        (
            "the same with the operator's watch of Secrets, CPU per 1,000 refreshes".to_owned(),
            format!(
                "{:.2} s  ({} refreshes, {} echoes seen; this / baseline at the token limit {:.2}; operator cost / this {:.2})",
                watched_cost * 1000.0,
                watched.refreshes,
                watched.echoes,
                ratio(watched_cost, limited_cost),
                ratio(operator_cost, watched_cost)
            ),
            "",
        ),
        (
            "the same receiving the watch's events, nothing decoded".to_owned(),
            format!(
                "{:.2} s  ({} refreshes, {} echoes seen; this / baseline at the token limit {:.2})",
                received_cost * 1000.0,
                received.refreshes,
                received.echoes,
                ratio(received_cost, limited_cost),
            ),
            "",
        ),
        (
            "baseline at the operator's pace, CPU per 1,000 refreshes".to_owned(),
            format!(
                "{:.2} s  (operator cost / paced baseline cost {:.2})",
                paced_cost * 1000.0,
                ratio(operator_cost, paced_cost)
            ),
            "",
        ),
    ];
    println!();
    println!(
        "tokenkeeper scale benchmark: {} connections, {} s tokens with rotation, {:.0} s measured, {} refreshes",
        o.connections, o.token_lifetime, window, provider_refreshes
    );
    println!("{:<62} {:<70} goal", "", "");
    for (name, value, goal) in &rows {
        println!("{name:<62} {value:<70} {goal}");
    }
    println!(
        "provider: {reused} reused refresh tokens, {rejected} rejected requests; CPU in the window: token server {:.1} s, control plane {:.1} s, operator {:.1} s",
        server_cpu, plane_cpu, operator_cpu
    );
    if !stale_examples.is_empty() {
        println!("stale samples, first seen: {}", stale_examples.join("; "));
    }
    let report = json!({
        "connections": o.connections,
        "token_lifetime_s": o.token_lifetime,
        "window_s": window,
        "refreshes": provider_refreshes,
        "freshness": freshness,
        "lateness_ms": {"p50": percentile(&lateness, 0.5), "p99": percentile(&lateness, 0.99), "max": percentile(&lateness, 1.0), "samples": lateness.len()},
        "margin_ms": {"p50": percentile(&margins, 0.5), "p1": percentile(&margins, 0.01), "min": percentile(&margins, 0.0), "samples": margins.len()},
        "writes_per_refresh": per_refresh(total_writes),
        "writes": writes,
        "reads_per_refresh": per_refresh(total_reads),
        "reads": reads,
        "token_requests_per_refresh": token_requests as f64 / refreshes_seen.max(1) as f64,
        "rss_peak_mib": peak_rss as f64 / 1024.0,
        "rss_peak_cold_start_mib": peak_rss_cold as f64 / 1024.0,
        "cpu_s_per_1000_refreshes": operator_cost * 1000.0,
        "cold_start_s": cold_start.as_secs_f64(),
        "cold_start_cpu_s": {
            "control_plane": cold_plane_cpu,
            "operator": cold_operator_cpu,
            "token_server": cold_token_server_cpu,
            "benchmark": cold_benchmark_cpu,
        },
        "cold_start_requests_per_connection": {"writes": cold_writes, "reads": cold_reads},
        "window_cpu_s": {"control_plane": plane_cpu, "operator": operator_cpu, "token_server": server_cpu},
        "baseline_cpu_s_per_1000_refreshes": baseline_cost * 1000.0,
        "cost_ratio": ratio(operator_cost, baseline_cost),
        "baseline_refreshes_per_s": back_to_back.per_second(),
        "token_limit_baseline_cpu_s_per_1000_refreshes": limited_cost * 1000.0,
        "token_limit_baseline_refreshes_per_s": limited.per_second(),
        "cost_ratio_token_limit": ratio(operator_cost, limited_cost),
        "watched_baseline_cpu_s_per_1000_refreshes": watched_cost * 1000.0,
        "watched_baseline_echoes": watched.echoes,
        "cost_ratio_watched": ratio(operator_cost, watched_cost),
        "received_baseline_cpu_s_per_1000_refreshes": received_cost * 1000.0,
        "received_baseline_echoes": received.echoes,
        "paced_baseline_cpu_s_per_1000_refreshes": paced_cost * 1000.0,
        "cost_ratio_paced": ratio(operator_cost, paced_cost),
        "reused_refresh_tokens": reused,
        "rejected_requests": rejected,
    });
    let path = format!("target/bench/scale-{}.json", o.connections);
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    eprintln!("[bench] figures written to {path}");
    // Figures measure; these are failures, whatever the figures.
    if reused > 0 || freshness < 1.0 || margins.first().is_some_and(|m| *m <= 0) {
        bail!(
            "correctness failure: {reused} reused refresh tokens, freshness {:.3} %, \
             smallest margin {} (the provider was up throughout)",
            freshness * 100.0,
            margin_s(&margins, 0.0)
        );
    }
    Ok(())
}

/// A percentile of margins in milliseconds, in seconds.
fn margin_s(margins: &[i64], p: f64) -> String {
    percentile(margins, p).map_or("n/a".into(), |v| format!("{:.1} s", v as f64 / 1000.0))
}

/// "resource count, …" with each count divided by `per`.
fn listing(counts: &BTreeMap<String, f64>, per: f64, decimals: usize) -> String {
    counts
        .iter()
        .map(|(resource, n)| format!("{resource} {:.decimals$}", n / per))
        .collect::<Vec<_>>()
        .join(", ")
}

fn deltas(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or_default()))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// What one run of the baseline role reports.
#[derive(Deserialize)]
struct BaselineRun {
    refreshes: u64,
    cpu_seconds: f64,
    elapsed_seconds: f64,
    /// Watch events of the loop's own writes, when it watched.
    echoes: u64,
}

impl BaselineRun {
    fn cpu_per_refresh(&self) -> f64 {
        self.cpu_seconds / self.refreshes.max(1) as f64
    }

    fn per_second(&self) -> f64 {
        self.refreshes as f64 / self.elapsed_seconds.max(f64::MIN_POSITIVE)
    }
}

/// Runs the baseline role for `refreshes` (at least one), with `pace` as
/// its next argument: none (back to back), `TOKEN_LIMIT` or seconds; and
/// `WATCHED` or `RECEIVED` after `TOKEN_LIMIT` for the loops that also
/// follow their Secrets.
async fn run_baseline(
    token_url: &str,
    base: &str,
    refreshes: u64,
    pace: &[&str],
) -> anyhow::Result<BaselineRun> {
    let count = refreshes.max(1).to_string();
    let mut args = vec!["baseline", token_url, &count, base];
    args.extend(pace);
    let (mut child, line) = spawn_role(&args).await?;
    let _ = child.wait().await;
    serde_json::from_str(&line).with_context(|| format!("the baseline's report {line:?}"))
}

/// How the baseline spaces its refreshes.
#[derive(Clone)]
enum Pace {
    /// As fast as the token server and the API server answer.
    BackToBack,
    /// Started through the operator's own token-request limiter with its
    /// default limits, as the operator's refreshes are.
    TokenLimit(Arc<HostThrottle>),
    /// Spread evenly over this many seconds, each started on its own.
    Spread(f64),
}

/// The baseline role's argument that selects `Pace::TokenLimit`.
const TOKEN_LIMIT: &str = "token-limit";
/// The baseline role's arguments, after the pace, that make the loop also
/// follow its namespace's Secrets, so that it receives the echo of each of
/// its writes: `WATCHED` as the operator does (a metadata-only watch decoded
/// as `SecretMeta` by kube-runtime's watcher), `RECEIVED` with nothing
/// decoded (the same watch's lines counted): what following costs before
/// anything is read of an event.
const WATCHED: &str = "watched";
const RECEIVED: &str = "received";

/// How the baseline follows its Secrets.
#[derive(Clone, Copy, PartialEq)]
enum Follow {
    Not,
    Watched,
    Received,
}

/// The minimal loop the operator is compared with: per refresh, one token
/// request and one Secret write, nothing read, nothing decided.
async fn baseline(args: &[String]) -> anyhow::Result<()> {
    let token_url = args.first().context("token url")?.clone();
    let refreshes: u64 = args.get(1).context("refresh count")?.parse()?;
    let base = args.get(2).context("server base")?.clone();
    let pace = match args.get(3).map(String::as_str) {
        None => Pace::BackToBack,
        Some(TOKEN_LIMIT) => Pace::TokenLimit(Arc::new(HostThrottle::new(Limits::default()))),
        Some(seconds) => Pace::Spread(seconds.parse()?),
    };
    let follow = match args.get(4).map(String::as_str) {
        None => Follow::Not,
        Some(WATCHED) => Follow::Watched,
        Some(RECEIVED) => Follow::Received,
        Some(other) => bail!("unknown baseline argument {other:?}"),
    };
    let prefix = match (&pace, follow) {
        (Pace::BackToBack, _) => "b",
        (Pace::TokenLimit(_), Follow::Watched) => "w",
        (Pace::TokenLimit(_), Follow::Received) => "r",
        (Pace::TokenLimit(_), Follow::Not) => "l",
        (Pace::Spread(_), _) => "p",
    };
    const WORKERS: usize = 32;
    let client = Client::try_default().await?;
    // The operator's client, with its development rules: the token server is on this machine.
    let http = tokenkeeper::oauth::client::http_client(Arc::new(
        tokenkeeper::oauth::destination::EndpointPolicy::new(true, &[]),
    ))?;
    ensure_namespace(&client, BASELINE_NAMESPACE).await?;
    let tokens = mint(&reqwest::Client::new(), &base, WORKERS).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), BASELINE_NAMESPACE);
    for i in 0..WORKERS {
        let created = secrets
            .create(
                &PostParams::default(),
                &secret(&format!("{prefix}{i}"), BTreeMap::new()),
            )
            .await;
        match created {
            // Left by an earlier run of this role on the same cluster.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            other => drop(other?),
        }
    }
    let echoes = Arc::new(AtomicU64::new(0));
    match follow {
        Follow::Not => {}
        Follow::Watched => {
            let metadata: Api<SecretMeta> = Api::namespaced(client.clone(), BASELINE_NAMESPACE);
            let mut events = watcher(metadata, watcher::Config::default().any_semantic()).boxed();
            // Started and listed before the loop, as the operator's watch is.
            loop {
                match events.try_next().await? {
                    Some(watcher::Event::InitDone) => break,
                    Some(_) => {}
                    None => bail!("the Secret watch ended before it listed"),
                }
            }
            let echoes = echoes.clone();
            tokio::spawn(async move {
                while let Ok(Some(event)) = events.try_next().await {
                    if let watcher::Event::Apply(meta) = event
                        && meta
                            .metadata
                            .name
                            .as_deref()
                            .is_some_and(|n| n.starts_with(prefix))
                    {
                        echoes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        Follow::Received => {
            let listed = secrets.list_metadata(&ListParams::default()).await?;
            let version = listed.metadata.resource_version.unwrap_or_default();
            let request = kube::core::Request::new(format!(
                "/api/v1/namespaces/{BASELINE_NAMESPACE}/secrets"
            ))
            .watch_metadata(&WatchParams::default(), &version)?;
            let mut lines = client.request_stream(request).await?;
            let echoes = echoes.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                while let Ok(read) = lines.read_until(b'\n', &mut line).await
                    && read > 0
                {
                    // Only this run's writes change Secrets in the namespace.
                    if line.starts_with(br#"{"type":"MODIFIED""#) {
                        echoes.fetch_add(1, Ordering::Relaxed);
                    }
                    line.clear();
                }
            });
        }
    }
    let before = ProcessSample::read(std::process::id())?;
    let started = Instant::now();
    let per_worker = refreshes.div_ceil(WORKERS as u64);
    let workers = tokens
        .into_iter()
        .enumerate()
        .map(|(i, mut refresh_token)| {
            let secrets = secrets.clone();
            let http = http.clone();
            let token_url = token_url.clone();
            let pace = pace.clone();
            async move {
                let no_params = BTreeMap::new();
                let name = format!("{prefix}{i}");
                for k in 0..per_worker {
                    if let Pace::Spread(seconds) = pace {
                        // Worker i's k-th refresh, interleaved with the others'.
                        let slot = (k as f64 + i as f64 / WORKERS as f64) / per_worker as f64;
                        let at = started + Duration::from_secs_f64(seconds * slot);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    let limiter_slot = match &pace {
                        Pace::TokenLimit(throttle) => Some(throttle.acquire(&token_url).await),
                        _ => None,
                    };
                    let issued = tokenkeeper::oauth::client::request_token(
                        &http,
                        tokenkeeper::oauth::client::TokenRequest {
                            token_url: &token_url,
                            client_id: token_server::CLIENT_ID,
                            client_secret: token_server::CLIENT_SECRET,
                            auth_method: Default::default(),
                            scopes: &[],
                            extra_params: &no_params,
                            grant: tokenkeeper::oauth::client::Grant::RefreshToken(&refresh_token),
                            timeout: tokenkeeper::oauth::client::REQUEST_TIMEOUT,
                        },
                    )
                    .await
                    .map_err(|f| anyhow::anyhow!("token request failed: {f:?}"))?;
                    drop(limiter_slot);
                    if let Some(next) = issued.refresh_token.clone() {
                        refresh_token = next;
                    }
                    let expires_at = Timestamp::now()
                        + jiff::SignedDuration::try_from(issued.expires_in.unwrap_or_default())?;
                    let body = secret(
                        &name,
                        [
                            ("access_token".to_owned(), issued.access_token.clone()),
                            ("refresh_token".to_owned(), refresh_token.clone()),
                            ("expires_at".to_owned(), expires_at.to_string()),
                        ]
                        .into(),
                    );
                    secrets
                        .replace(&name, &PostParams::default(), &body)
                        .await?;
                }
                anyhow::Ok(())
            }
        });
    futures::future::try_join_all(workers).await?;
    let refreshes = per_worker * WORKERS as u64;
    if follow != Follow::Not {
        // The last writes' echoes are part of the cost.
        let deadline = Instant::now() + Duration::from_secs(10);
        while echoes.load(Ordering::Relaxed) < refreshes && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let after = ProcessSample::read(std::process::id())?;
    println!(
        "{}",
        json!({
            "refreshes": refreshes,
            "cpu_seconds": after.cpu_seconds - before.cpu_seconds,
            "elapsed_seconds": started.elapsed().as_secs_f64(),
            "echoes": echoes.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
