//! `kubectl_complete-ep`: what kubectl (1.26 and later) runs to complete `kubectl ep ...`. It
//! hands the words typed so far to `kubectl-ep __complete`, which answers as Cobra programs do:
//! one candidate per line, then a `:<directive>` line.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let sibling = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("kubectl-ep")));
    let program = sibling.filter(|p| p.exists()).unwrap_or_else(|| "kubectl-ep".into());
    match Command::new(program).arg("__complete").args(std::env::args_os().skip(1)).status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        _ => {
            // No candidates, and let the shell complete file names.
            println!(":0");
            ExitCode::SUCCESS
        }
    }
}
