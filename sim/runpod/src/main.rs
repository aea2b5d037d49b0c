//! `runpod-sim`: A local stand-in for RunPod.
//!
//! Only the command-line surface exists so far; every command reports that it is not available
//! in this build instead of pretending to work.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "runpod-sim", version, about = "A local stand-in for RunPod (not available in this build yet)")]
struct Cli {
    /// Arguments of the command.
    args: Vec<String>,
}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("runpod-sim: not available in this build yet; see the project's open issues");
    ExitCode::from(2)
}
