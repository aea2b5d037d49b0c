//! `kubectl-ep`: the kubectl plugin for what YAML cannot do well: push a payload, see RunPod's
//! GPUs, read a run's logs, approve an order, stop a run.

mod approval;
mod complete;
mod describe;
mod orders;
mod output;
mod preflight;
mod pull;
mod push;
mod run;
mod runpod;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kubectl-ep", version, about = "ep-operator's kubectl plugin")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    target: orders::Target,
}

#[derive(Subcommand)]
enum Command {
    /// Sync a payload directory to the network volume and print its digest for spec.payload.digest.
    Push(Box<push::PushArgs>),
    /// Push a directory, put its digest into an Experiment, apply it, and follow it (phase,
    /// progress, the script's output) until it ends; Ctrl-C stops following, not the run.
    Run {
        /// The payload directory.
        dir: PathBuf,
        /// The Experiment's YAML (its spec.payload.locations and excludes apply to DIR).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Apply and return without following.
        #[arg(long)]
        no_follow: bool,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Approve spending after showing what it may spend: an Experiment within an envelope (its
    /// current order and its retries), or one RunPodOrder. The approver recorded is the user the
    /// API server authenticates.
    Approve {
        /// An Experiment, or a RunPodOrder.
        name: String,
        /// Approve without asking.
        #[arg(short, long)]
        yes: bool,
        #[arg(short, long)]
        namespace: Option<String>,
        #[command(flatten)]
        bounds: orders::EnvelopeArgs,
    },
    /// RunPod's GPU catalog as the operator sees it through each RunPodProvider, cheapest first.
    Gpus {
        /// Only this RunPodProvider.
        #[arg(long)]
        provider: Option<String>,
        /// At least this much GPU memory, GB.
        #[arg(long)]
        min_vram: Option<i32>,
        /// At most this USD per GPU-hour (the cheaper cloud).
        #[arg(long)]
        max_price: Option<f64>,
        /// In stock at this data center (e.g. EU-RO-1).
        #[arg(long = "dc")]
        data_center: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: runpod::Output,
    },
    /// What a run printed: the training script's stdout and stderr from the volume, or with
    /// --container the pod's container log from RunPod (REST v2).
    Logs {
        /// A RunPodOrder, or an Experiment (its current, else last, order).
        name: String,
        /// The pod's container log (image pull, start-up, the runner before it reached the volume).
        #[arg(long)]
        container: bool,
        /// Only the last N lines (of each stream).
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing what the run writes until it ends.
        #[arg(short, long)]
        follow: bool,
        /// Only what the script wrote to stderr.
        #[arg(long)]
        stderr: bool,
        /// The experiment's attempt N (default: the current, else the last).
        #[arg(long)]
        attempt: Option<i32>,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Download an attempt's verified artifacts, each checked against its sha256 in the receipt.
    Pull {
        /// An Experiment (its current, else last, attempt) or a RunPodOrder.
        name: String,
        /// Where to put them (default: <name>-a<attempt>).
        dir: Option<PathBuf>,
        /// Also the checkpoints (left out by default: they can be large).
        #[arg(long)]
        checkpoints: bool,
        /// The experiment's attempt N.
        #[arg(long)]
        attempt: Option<i32>,
        #[arg(short, long)]
        namespace: Option<String>,
        /// `json` or `yaml`: each file with its size and verified sha256, on stdout.
        #[arg(short, long, value_enum, default_value = "text")]
        output: output::Format,
    },
    /// An experiment's story: phase and why, approval, every attempt (times, cost, outcome), every
    /// phase change of it and its orders, and why a failed attempt failed.
    Describe {
        /// An Experiment.
        name: String,
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: output::Format,
    },
    /// A completion script for bash, zsh or fish (`source <(kubectl-ep completion bash)`); kubectl's
    /// own completion of `kubectl ep ...` goes through kubectl_complete-ep.
    Completion { shell: clap_complete::Shell },
    /// Completion candidates for the words typed (Cobra's protocol, for kubectl_complete-ep).
    #[command(name = "__complete", hide = true)]
    Complete {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Run a finished experiment again: a new attempt, with retries counted afresh.
    Rerun {
        /// An Experiment that Succeeded or Failed.
        name: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Drain a run: its results are collected and verified, then the pod is deleted.
    Stop {
        /// A RunPodOrder, or an Experiment (its current order is stopped).
        name: String,
        /// Why, as a person would say it; kept in status and the registry.
        #[arg(long)]
        reason: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("kubectl-ep: a rustls crypto provider was already installed");
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl-ep: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = cli.target;
    let result = match cli.command {
        Command::Push(args) => rt.block_on(push::run_push(*args, &target)),
        Command::Run { dir, file, no_follow, namespace } => rt.block_on(async {
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            run::run(client, &ns, &dir, &file, !no_follow).await
        }),
        Command::Approve { name, yes, namespace, bounds } => rt.block_on(async {
            let (client, ns, user) = orders::connect(namespace, &target).await?;
            orders::approve(client, &ns, &name, &user, yes, &bounds).await
        }),
        Command::Gpus { provider, min_vram, max_price, data_center, output } => rt.block_on(async {
            let (client, _, _) = orders::connect(None, &target).await?;
            let f = runpod::GpuFilter { provider, min_vram, max_price, data_center };
            runpod::gpus(client, &f, output).await
        }),
        Command::Logs { name, container, tail, follow, stderr, attempt, namespace } => rt.block_on(async {
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            runpod::logs(client, &ns, &runpod::LogsArgs { name, container, tail, follow, stderr, attempt }).await
        }),
        Command::Pull { name, dir, checkpoints, attempt, namespace, output } => rt.block_on(async {
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            pull::pull(client, &ns, &pull::PullArgs { name, dir, checkpoints, attempt, output }).await
        }),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "kubectl-ep",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Complete { words } => {
            rt.block_on(complete::complete(&words, &target));
            Ok(())
        }
        Command::Describe { name, namespace, output } => rt.block_on(async {
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            describe::describe(client, &ns, &name, output).await
        }),
        Command::Rerun { name, namespace } => rt.block_on(async {
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            approval::rerun(client, &ns, &name).await
        }),
        Command::Stop { name, reason, namespace } => rt.block_on(async {
            if reason.trim().is_empty() {
                return Err("--reason must say why the run stops".to_owned());
            }
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            orders::stop(client, &ns, &name, &reason).await
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl-ep: {e}");
            ExitCode::FAILURE
        }
    }
}
