use clap::{Parser, Subcommand};
use tokenkeeper::{controller, crdgen, telemetry};

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
    Run {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "TOKENKEEPER_NAMESPACE")]
        namespace: Option<String>,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = telemetry::LogFormat::Text)]
        log_format: telemetry::LogFormat,
    },
    /// Print every CRD as YAML, separated by `---`.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", crdgen::render_yaml());
            Ok(())
        }
        Command::Run {
            namespace,
            log_format,
        } => {
            telemetry::init(log_format);
            let client = kube::Client::try_default().await?;
            controller::run(client, controller::Settings { namespace }).await
        }
    }
}
