//! `ep-runner`: runs one attempt inside the pod. It reads `ep/runs/<run-id>/spec.json` under the
//! workspace, verifies and materializes the payload, runs the command, heartbeats, and writes the
//! terminal files. It talks to nothing but files under the workspace, except, on transports
//! without terminateAfter, one call at the pod's deadline to end its own pod (see `deadline`).

mod deadline;
mod files;
mod run;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

/// How long a run stopped at the pod's deadline has to write terminal.json before the pod ends.
const DEADLINE_GRACE: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Run { run_id, workspace } = cli.command;
    // The container log (RunPod's `GET /v2/pods/{id}/logs`) is where a person looks when the
    // volume shows nothing: say at once that the runner started and where it looks.
    eprintln!("ep-runner {}: run {run_id} starting (volume at {})", env!("CARGO_PKG_VERSION"), workspace.display());
    let (stop, ended) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let switch = deadline::Switch::from_env()
        .map(|s| (s.deadline, deadline::arm(s, stop.clone(), ended.clone(), DEADLINE_GRACE)));
    let code = outcome(&run_id, run::run(&workspace, &run_id, &stop));
    ended.store(true, Ordering::Relaxed);
    // The pod bills until someone ends it: the operator does after collecting the results; if it
    // cannot, the switch does at the deadline, as terminateAfter would.
    if let Some((at, armed)) = switch {
        eprintln!("ep-runner: run {run_id} is over; the pod ends itself at {at} unless the operator ends it first");
        let _ = armed.join();
    }
    code
}

fn outcome(run_id: &str, result: Result<run::Outcome, run::RunError>) -> ExitCode {
    {
        match result {
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
        }
    }
}
