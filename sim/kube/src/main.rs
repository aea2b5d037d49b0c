//! `kube-sim`: An in-memory Kubernetes API server for tests.
//!
//! Only the command-line surface exists so far; every command reports that it is not available
//! in this build instead of pretending to work.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kube-sim",
    version,
    about = "An in-memory Kubernetes API server for tests (not available in this build yet)"
)]
struct Cli {
    /// Arguments of the command.
    args: Vec<String>,
}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("kube-sim: not available in this build yet; see the project's open issues");
    ExitCode::from(2)
}
