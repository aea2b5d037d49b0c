//! `kube-sim`: serve an in-memory Kubernetes API on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kube-sim",
    version,
    about = "An in-memory Kubernetes API server for tests and the local sandbox (never for production)"
)]
struct Cli {
    /// Address to listen on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig for kubectl and kube-rs here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Load the CRDs in this directory at start.
    #[arg(long)]
    crds: Option<PathBuf>,
    /// Append every resource request (verb, group, resource, namespace, name, User-Agent) to this file.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Users, tokens and groups (YAML: `users: [{name, token, groups}]`): requests are then
    /// authenticated and authorized by RBAC, and the kubeconfig gets one context per user.
    #[arg(long)]
    users: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("kube-sim: a rustls crypto provider was already installed");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let opts = kube_sim::Options {
        listen: cli.listen,
        kubeconfig_out: cli.kubeconfig_out,
        crds: cli.crds,
        audit_log: cli.audit_log,
        users: cli.users,
        ..kube_sim::Options::default()
    };
    let running = match kube_sim::start(opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kube-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", serde_json::json!({"url": running.url, "kubeconfig": running.kubeconfig}));
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return ExitCode::SUCCESS;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    ExitCode::SUCCESS
}
