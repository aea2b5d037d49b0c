//! `kubectl-ep`: the kubectl plugin for what YAML cannot do well: push a payload, see RunPod's
//! GPUs, read a run's logs, approve an order, stop a run.

mod approval;
mod orders;
mod pull;
mod runpod;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ep_volume::store::S3Settings;
use ep_volume::sync::{Progress, SyncOptions, push};
use ep_volume::{Payload, PayloadSource, S3Volume};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(name = "kubectl-ep", version, about = "ep-operator's kubectl plugin")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    target: orders::Target,
}

#[derive(Subcommand)]
enum Command {
    /// Sync a payload directory to the network volume and print its digest for spec.payload.digest.
    Push(PushArgs),
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

#[derive(clap::Args)]
struct PushArgs {
    /// The payload root.
    dir: PathBuf,
    /// Paths under DIR to include (repeatable); the whole directory when none is given.
    #[arg(long = "location")]
    locations: Vec<String>,
    /// Gitignore-style patterns to leave out (repeatable).
    #[arg(long = "exclude")]
    excludes: Vec<String>,
    /// The volume's S3 endpoint, e.g. https://s3api-eu-ro-1.runpod.io.
    #[arg(long, env = "EP_S3_ENDPOINT")]
    s3_endpoint: String,
    /// The region: the volume's data center id.
    #[arg(long, env = "EP_S3_REGION")]
    region: String,
    /// The network volume id (the bucket).
    #[arg(long, env = "EP_VOLUME_ID")]
    volume: String,
    /// S3 access key id (RunPod: your user id).
    #[arg(long, env = "EP_S3_ACCESS_KEY_ID", hide_env_values = true)]
    access_key_id: String,
    /// S3 secret access key (RunPod: rps_...).
    #[arg(long, env = "EP_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_access_key: String,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    parallelism: usize,
    /// Check every file on the volume instead of trusting the last sealed push of this directory.
    #[arg(long)]
    verify_all: bool,
    /// Where stat data and the last pushed id are kept ($XDG_CACHE_HOME/ep or ~/.cache/ep).
    #[arg(long, env = "EP_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

fn cache_dir(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ep")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ep")))
}

fn last_push_file(cache: &Path, args: &PushArgs, root: &Path) -> PathBuf {
    let key = format!("{}|{}|{}", args.s3_endpoint, args.volume, root.display());
    cache.join("last-push").join(hex::encode(Sha256::digest(key.as_bytes())))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

async fn run_push(args: PushArgs) -> Result<(), String> {
    let root = args.dir.canonicalize().map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let cache = cache_dir(args.cache_dir.clone());
    let src = PayloadSource {
        root: root.clone(),
        locations: args.locations.clone(),
        excludes: args.excludes.clone(),
        cache_dir: cache.as_ref().map(|c| c.join("hashes")),
    };
    let payload = Payload::build(&src).map_err(|e| e.to_string())?;
    eprintln!("payload: {} files, {}", payload.manifest.files.len(), human(payload.manifest.total_bytes()));
    let previous = cache
        .as_ref()
        .and_then(|c| std::fs::read_to_string(last_push_file(c, &args, &root)).ok())
        .map(|s| s.trim().to_owned());
    let store = S3Volume::new(S3Settings::new(
        &args.s3_endpoint,
        &args.region,
        &args.volume,
        &args.access_key_id,
        &args.secret_access_key,
    ));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let show = |p: Progress| {
        if tty {
            eprint!(
                "\r  {}/{} files, {} / {}   ",
                p.files_done,
                p.files_total,
                human(p.bytes_done),
                human(p.bytes_total)
            );
            let _ = std::io::stderr().flush();
        }
    };
    let opts = SyncOptions { parallelism: args.parallelism, previous, verify_all: args.verify_all };
    let report = push(&store, &payload, &opts, &show).await.map_err(|e| e.to_string())?;
    if tty {
        eprintln!();
    }
    if report.already_sealed {
        eprintln!("already on volume {}: nothing to upload", args.volume);
    } else {
        eprintln!(
            "uploaded {} of {} files ({}), {} already on the volume; manifest sealed ({} S3 requests)",
            report.uploaded_files,
            report.files_total,
            human(report.uploaded_bytes),
            report.present_files,
            report.requests
        );
    }
    if let Some(c) = &cache {
        let f = last_push_file(c, &args, &root);
        if let Some(d) = f.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(f, &payload.id);
    }
    println!("sha256:{}", payload.id);
    eprintln!("put it in your Experiment: spec.payload.digest: \"sha256:{}\"", payload.id);
    Ok(())
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
        Command::Push(args) => rt.block_on(run_push(args)),
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
        Command::Pull { name, dir, checkpoints, attempt, namespace } => rt.block_on(async {
            let (client, ns, _) = orders::connect(namespace, &target).await?;
            pull::pull(client, &ns, &pull::PullArgs { name, dir, checkpoints, attempt }).await
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
