//! The `ep-operator` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ep_operator::crdgen;
use ep_operator::registry::PgRegistry;
use ep_operator::settings::{Settings, SettingsWatcher};

#[derive(Parser)]
#[command(
    name = "ep-operator",
    version,
    about = "Runs ML training experiments on RunPod GPU pods from Kubernetes resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: reconcile Experiments, RunPodOrders and RunPodProviders.
    Run(Box<RunArgs>),
    /// Print every CRD as YAML (or write one file per CRD into a directory).
    Crd {
        /// Write `<name>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Apply the exp_registry migrations (idempotent).
    Migrate {
        /// PostgreSQL URL, e.g. postgres://user@host:5432/db.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Validate a settings file and print the effective settings.
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
    /// Print every condition reason with its kind, failure domain and meaning (Markdown).
    Reasons,
    /// Print the API reference of the three kinds (docs/api.md), generated from the CRD schemas.
    ApiReference,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig file [default: KUBECONFIG, ~/.kube/config, or the in-cluster service account].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Settings file, hot reloaded (mount it from a ConfigMap) [default: the embedded settings].
    #[arg(long, env = "EP_SETTINGS")]
    settings: Option<PathBuf>,
    /// PostgreSQL URL of the exp_registry mirror; without it the mirror is off.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Address of /metrics, /livez and /readyz.
    #[arg(long, env = "EP_LISTEN", default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,
    /// Elect a leader through a Lease so that only one replica acts (on by default; set
    /// `--leader-election=false` only where exactly one replica can ever run).
    #[arg(long, env = "EP_LEADER_ELECTION", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ep-system")]
    lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, env = "EP_LEASE_NAME", default_value = "ep-operator")]
    lease_name: String,
    /// How long the Lease lasts without renewal: a crashed leader is replaced after this.
    #[arg(long, env = "EP_LEASE_DURATION", default_value = "15s")]
    lease_duration: ep_api::GoDuration,
    /// Identity in the Lease [default: POD_NAME, else the host name and process id].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The ep-runner binary to upload to volumes [default: ep-runner beside this binary].
    #[arg(long, env = "EP_RUNNER_BINARY")]
    runner_binary: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SettingsCommand {
    /// Check a settings file; prints the effective settings (defaults filled in) or every error.
    Check {
        /// The settings file; omit to check the embedded default.
        file: Option<PathBuf>,
    },
    /// Print the JSON schema of a settings file, or write it under `settings` into a chart's
    /// values.schema.json.
    Schema {
        /// The values.schema.json to update in place.
        #[arg(long)]
        values: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Several dependencies use rustls; install one process-wide provider before any of them.
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("ep-operator: a rustls crypto provider was already installed");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ep-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Run(a) => {
            let runner_binary = match a.runner_binary {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("ep-runner"),
            };
            let identity = a.identity.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            });
            let opts = ep_operator::run::RunOptions {
                kubeconfig: a.kubeconfig,
                settings: a.settings,
                database_url: a.database_url,
                listen: a.listen,
                leader_election: a.leader_election,
                lease_namespace: a.lease_namespace,
                lease_name: a.lease_name,
                lease_duration: a.lease_duration.get(),
                identity,
                runner_binary,
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(ep_operator::run::run(opts))?;
        }
        Command::Crd { out_dir: None } => print!("{}", crdgen::crd_stream()?),
        Command::Crd { out_dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            for (name, yaml) in crdgen::crd_files()? {
                let path = dir.join(name);
                std::fs::write(&path, yaml)?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Migrate { database_url } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let registry = PgRegistry::connect(&database_url).await?;
                registry.migrate().await?;
                eprintln!("exp_registry is up to date");
                Ok::<_, Box<dyn std::error::Error>>(())
            })?;
        }
        Command::Reasons => print!("{}", ep_operator::reason::Reason::markdown_table()),
        Command::ApiReference => print!("{}", crdgen::api_reference()),
        Command::Settings { command: SettingsCommand::Schema { values: None } } => {
            println!("{}", serde_json::to_string_pretty(&Settings::json_schema())?);
        }
        Command::Settings { command: SettingsCommand::Schema { values: Some(path) } } => {
            let text = std::fs::read_to_string(&path)?;
            std::fs::write(&path, crdgen::values_schema(&text)?)?;
            eprintln!("wrote {}", path.display());
        }
        Command::Settings { command: SettingsCommand::Check { file } } => {
            let settings = match file {
                Some(path) => SettingsWatcher::load(&path)?.1.current().as_ref().clone(),
                None => Settings::embedded_default(),
            };
            print!("{}", serde_saphyr::to_string(&settings)?);
        }
    }
    Ok(())
}
