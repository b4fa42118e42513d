use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jiff::SignedDuration;
use tokenkeeper::decide::refresh::Limits;
use tokenkeeper::leader::LeaseSettings;
use tokenkeeper::oauth::destination::EndpointPolicy;

// mimalloc: glibc's allocator keeps in its arenas what a cold start
// allocated and freed, a fifth more resident memory at scale
// (benches/README.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokenkeeper::runtime::{run, throttle};
use tokenkeeper::{crdgen, telemetry};

/// Keeps SaaS source credentials fresh in Kubernetes Secrets.
#[derive(Parser)]
#[command(name = "tokenkeeper", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the cluster of the current kubeconfig
    /// (or the in-cluster service account).
    Run(Box<RunArgs>),
    /// Print every CRD as YAML, separated by `---`.
    Crd,
}

#[derive(Args)]
struct RunArgs {
    /// Watch only this namespace; repeat for several (default: all).
    #[arg(
        long = "namespace",
        env = "TOKENKEEPER_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = telemetry::LogFormat::Text)]
    log_format: telemetry::LogFormat,
    /// Where to serve /metrics, /healthz and /readyz ("" to disable).
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_bind_address: String,
    /// Elect a leader through a Lease so that only one replica writes.
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    #[arg(long, default_value = "tokenkeeper-leader")]
    leader_election_lease: String,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// Seconds a lease holds without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds a leader may fail to renew before it steps down.
    #[arg(long, default_value_t = 10)]
    renew_deadline_seconds: u64,
    /// Seconds after its deletion that a connection whose tokens cannot be
    /// revoked is released anyway.
    #[arg(long, default_value_t = 300)]
    revocation_timeout_seconds: u64,
    /// Where to serve the authorization-code flow (/authorize, /callback);
    /// empty disables it.
    #[arg(long, default_value = "")]
    authorization_bind_address: String,
    /// How browsers reach the authorization endpoints (default:
    /// http://<authorization-bind-address>); the provider must accept
    /// <external-url>/callback as redirect URI.
    #[arg(long)]
    external_url: Option<String>,
    /// Seconds a started authorization stays valid.
    #[arg(long, default_value_t = 600)]
    authorization_state_ttl_seconds: u64,
    /// Seconds between lease renewals or attempts.
    #[arg(long, default_value_t = 2)]
    retry_period_seconds: u64,
    /// Token requests started per second, per provider host (a burst of
    /// 20 may start at once after a quiet period; requests held back start
    /// together on 100 ms ticks).
    #[arg(long, default_value_t = 200.0)]
    token_requests_per_second: f64,
    /// Token requests in flight at once, per provider host (at most half of
    /// --concurrent-reconciles, so that one slow provider cannot hold every
    /// reconcile slot).
    #[arg(long, default_value_t = 32)]
    max_concurrent_token_requests: usize,
    /// Normal events published per second across all connections, after
    /// a burst of --event-burst; the rest are dropped (warnings never are).
    #[arg(long, default_value_t = 10.0)]
    event_qps: f64,
    /// Normal events published at once after a quiet period.
    #[arg(long, default_value_t = 100)]
    event_burst: u32,
    /// Connections reconciled at once.
    #[arg(long, default_value_t = 64)]
    concurrent_reconciles: u16,
    /// Seconds a connection waits after a token was issued before it
    /// refreshes again, whatever lifetime the provider answered or the
    /// spec asks for.
    #[arg(long, default_value_t = 30)]
    min_refresh_interval_seconds: u32,
    /// Seconds before a token expires by which its successor is in the
    /// Secret, so that the kubelet's next sync of a mounted Secret volume
    /// brings it to pods in time; applied when the token lives long enough
    /// (this plus --min-refresh-interval-seconds).
    #[arg(long, default_value_t = 120)]
    refresh_propagation_margin_seconds: u32,
    /// The longest token lifetime taken from a provider's answer (longer
    /// ones are clamped and said on the target Secret); also the longest
    /// refreshBefore and defaultTokenLifetime a spec may set.
    #[arg(long, default_value_t = 365 * 24 * 3600, value_parser = clap::value_parser!(u32).range(60..))]
    max_token_lifetime_seconds: u32,
    /// The longest Retry-After of a provider that is honoured.
    #[arg(long, default_value_t = 3600)]
    max_retry_after_seconds: u32,
    /// Allow endpoints on this machine, over plain http too: local
    /// development and tests only (off in the chart).
    #[arg(long)]
    allow_plain_http_loopback: bool,
    /// A network (CIDR) no request goes to, for example the cluster's
    /// service and pod ranges; repeat for several. Link-local networks
    /// (cloud metadata) are always denied.
    #[arg(long = "deny-network", value_delimiter = ',')]
    deny_networks: Vec<ipnet::IpNet>,
    /// Read only Secrets labelled tokenkeeper.dev/source=true (or naming
    /// the connection in their annotation tokenkeeper.dev/source-for), so
    /// that a connection cannot send any Secret of its namespace to a
    /// provider (on in the chart).
    #[arg(long)]
    require_source_label: bool,
    /// Days before a grant's known end (a provider's absolute limit, or the
    /// refresh token's lifetime) that GrantExpiring turns True; at most a
    /// third of the grant's life.
    #[arg(long, default_value_t = 14)]
    grant_expiry_warning_days: u32,
    /// The Secret, in the operator's namespace (--leader-election-namespace,
    /// POD_NAMESPACE), holding the key that seals refresh tokens; created on
    /// first start. Back it up: without it every OAuth connection must be
    /// authorized again.
    #[arg(long, default_value = "tokenkeeper-sealing-key")]
    sealing_key_secret: String,
}

/// mimalloc asks the kernel for transparent huge pages for its arenas, and
/// a huge page is resident as a whole however little of it is used, half
/// the operator's memory at a few hundred connections (benches/README.md).
/// The operator's heap is many small objects, which gain nothing from huge
/// pages.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process; it takes
    // no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

// One thread: the operator waits on the network almost all the time, and
// on two cores the wake-ups between worker threads cost more CPU than the
// work they hand over (benches/README.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", crdgen::render_yaml());
            Ok(())
        }
        Command::Run(args) => {
            let args = *args;
            disable_transparent_huge_pages();
            telemetry::init(args.log_format);
            let metrics_address = match args.metrics_bind_address.as_str() {
                "" => None,
                text => Some(
                    text.parse::<SocketAddr>()
                        .map_err(|e| anyhow::anyhow!("--metrics-bind-address {text:?}: {e}"))?,
                ),
            };
            if args.renew_deadline_seconds >= args.lease_duration_seconds {
                anyhow::bail!(
                    "--renew-deadline-seconds must be shorter than --lease-duration-seconds"
                );
            }
            let leader_election = args.leader_elect.then(|| LeaseSettings {
                namespace: args.leader_election_namespace.clone(),
                name: args.leader_election_lease,
                identity: args
                    .leader_election_identity
                    .unwrap_or_else(default_identity),
                lease_duration: Duration::from_secs(args.lease_duration_seconds),
                renew_deadline: Duration::from_secs(args.renew_deadline_seconds),
                retry_period: Duration::from_secs(args.retry_period_seconds),
            });
            let authorization = match args.authorization_bind_address.as_str() {
                "" => None,
                text => {
                    let bind_address: SocketAddr = text.parse().map_err(|e| {
                        anyhow::anyhow!("--authorization-bind-address {text:?}: {e}")
                    })?;
                    Some(run::AuthorizationSettings {
                        bind_address,
                        external_url: args
                            .external_url
                            .clone()
                            .unwrap_or_else(|| format!("http://{bind_address}")),
                        state_ttl: Duration::from_secs(args.authorization_state_ttl_seconds),
                    })
                }
            };
            let client = kube::Client::try_default().await?;
            let settings = run::Settings {
                namespaces: args.namespaces,
                metrics_address,
                leader_election,
                revocation_timeout: Duration::from_secs(args.revocation_timeout_seconds),
                authorization,
                token_limits: throttle::Limits {
                    per_second: args.token_requests_per_second,
                    concurrency: throttle::per_host_concurrency(
                        args.max_concurrent_token_requests,
                        args.concurrent_reconciles,
                    ),
                    ..throttle::Limits::default()
                },
                event_budget: throttle::EventBudget::new(args.event_qps, args.event_burst),
                concurrency: args.concurrent_reconciles,
                limits: Limits {
                    min_refresh_interval: SignedDuration::from_secs(
                        args.min_refresh_interval_seconds.into(),
                    ),
                    max_token_lifetime: SignedDuration::from_secs(
                        args.max_token_lifetime_seconds.into(),
                    ),
                    max_retry_after: Duration::from_secs(args.max_retry_after_seconds.into()),
                    endpoints: Arc::new(EndpointPolicy::new(
                        args.allow_plain_http_loopback,
                        &args.deny_networks,
                    )),
                    require_source_label: args.require_source_label,
                    grant_expiry_warning: SignedDuration::from_hours(
                        i64::from(args.grant_expiry_warning_days) * 24,
                    ),
                    propagation_margin: SignedDuration::from_secs(
                        args.refresh_propagation_margin_seconds.into(),
                    ),
                },
                operator_namespace: args.leader_election_namespace.clone(),
                sealing_key_secret: args.sealing_key_secret,
            };
            run::run(client, settings).await
        }
    }
}

/// Hostname and process id: unique per replica even outside a pod.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
