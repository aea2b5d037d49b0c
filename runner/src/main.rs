//! `ep-runner`: runs one attempt inside the pod. It reads `ep/runs/<run-id>/spec.json` under the
//! workspace, verifies and materializes the payload, runs the command, heartbeats, and writes the
//! terminal files. It talks to nothing but files under the workspace: no network is needed.

mod files;
mod run;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ep-runner", version, about = "Runs one ep-operator experiment attempt inside a pod")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the attempt described by ep/runs/<RUN_ID>/spec.json.
    Run {
        /// The run id.
        #[arg(long)]
        run_id: String,
        /// The volume's mount path (RunPod: /workspace; runpod-sim without namespaces sets EP_WORKSPACE).
        #[arg(long, env = "EP_WORKSPACE", default_value = "/workspace")]
        workspace: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { run_id, workspace } => match run::run(&workspace, &run_id) {
            Ok(run::Outcome::Succeeded) => ExitCode::SUCCESS,
            Ok(run::Outcome::AlreadyFinished) => {
                eprintln!("ep-runner: run {run_id} has finished already (terminal.json exists); nothing to do");
                ExitCode::SUCCESS
            }
            Ok(run::Outcome::Ended(state)) => {
                eprintln!("ep-runner: run {run_id} ended {state:?}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("ep-runner: run {run_id}: {e}");
                ExitCode::from(2)
            }
        },
    }
}
