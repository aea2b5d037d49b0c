//! `runpod-sim`: start a local RunPod and print its endpoints as one JSON line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use runpod_sim::{SimOptions, WorldConfig};

#[derive(Parser)]
#[command(
    name = "runpod-sim",
    version,
    about = "A local RunPod: GraphQL, REST v2, network-volume S3, pods as processes"
)]
struct Cli {
    /// Address of the API (GraphQL at /graphql, REST v2 under /v2, admin under /_sim).
    #[arg(long, default_value = "127.0.0.1:0")]
    api_listen: SocketAddr,
    /// Address of the network volumes' S3 API.
    #[arg(long, default_value = "127.0.0.1:0")]
    s3_listen: SocketAddr,
    /// Directory holding volume contents and pod logs.
    #[arg(long)]
    state_dir: PathBuf,
    /// World configuration (YAML); the built-in default world when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// API key to accept (overrides the config).
    #[arg(long, env = "RUNPOD_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Simulated seconds per real second (overrides the config).
    #[arg(long)]
    clock_speed: Option<f64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("runpod-sim: a rustls crypto provider was already installed");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => {
            match std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|t| WorldConfig::from_yaml(&t)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("runpod-sim: config {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        }
        None => WorldConfig::default(),
    };
    if let Some(speed) = cli.clock_speed {
        config.clock_speed = speed;
    }
    let opts = SimOptions {
        api_listen: cli.api_listen,
        s3_listen: cli.s3_listen,
        state_dir: cli.state_dir,
        config,
        api_key: cli.api_key,
    };
    let running = match runpod_sim::start(opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runpod-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string(&running.endpoints) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("runpod-sim: {e}"),
    }
    wait_for_stop().await;
    drop(running);
    ExitCode::SUCCESS
}

/// Ctrl-C or SIGTERM (what kubectl, systemd and test harnesses send).
async fn wait_for_stop() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
