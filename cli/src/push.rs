//! `kubectl ep push DIR`: a payload directory synced to the network volume, content-addressed, with
//! its digest printed for `spec.payload.digest`. The volume's endpoint and keys come from a
//! RunPodProvider and its Secret (as the operator reads them), or from flags for a volume the
//! cluster does not know.

use std::io::Write;
use std::path::{Path, PathBuf};

use ep_api::provider::RunPodProvider;
use ep_volume::store::S3Settings;
use ep_volume::sync::{Progress, SyncOptions, push};
use ep_volume::{Payload, PayloadSource, S3Volume};
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use crate::orders::{Target, api_error, connect};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct PushArgs {
    /// The payload root.
    pub dir: PathBuf,
    /// Paths under DIR to include (repeatable); the whole directory when none is given.
    #[arg(long = "location")]
    pub locations: Vec<String>,
    /// Gitignore-style patterns to leave out (repeatable).
    #[arg(long = "exclude")]
    pub excludes: Vec<String>,
    /// The RunPodProvider whose network volume receives the payload (its S3 endpoint and keys are
    /// read from the cluster); used unless all the --s3-*/--volume/--region flags are given.
    #[arg(long, default_value = "default")]
    pub provider: String,
    #[command(flatten)]
    pub explicit: ExplicitVolume,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    pub parallelism: usize,
    /// Check every file on the volume instead of trusting the last sealed push of this directory.
    #[arg(long)]
    pub verify_all: bool,
    /// Push even when a Python file of the payload does not compile (checked with python3).
    #[arg(long)]
    pub no_compile_check: bool,
    /// Where stat data and the last pushed id are kept ($XDG_CACHE_HOME/ep or ~/.cache/ep).
    #[arg(long, env = "EP_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// `json` or `yaml`: the digest and what was uploaded, on stdout (default: the digest alone).
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: crate::output::Format,
    /// The entry the payload is pushed for (`kubectl ep run`): its script must be in the payload.
    #[arg(skip)]
    pub entry: Option<(String, ep_api::experiment::Entry)>,
}

/// A volume named by flags, for one the cluster does not know.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ExplicitVolume {
    /// The volume's S3 endpoint, e.g. https://s3api-eu-ro-1.runpod.io.
    #[arg(long, env = "EP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// The region: the volume's data center id.
    #[arg(long, env = "EP_S3_REGION")]
    pub region: Option<String>,
    /// The network volume id (the bucket).
    #[arg(long, env = "EP_VOLUME_ID")]
    pub volume: Option<String>,
    /// S3 access key id (RunPod: your user id).
    #[arg(long, env = "EP_S3_ACCESS_KEY_ID", hide_env_values = true)]
    pub access_key_id: Option<String>,
    /// S3 secret access key (RunPod: rps_...).
    #[arg(long, env = "EP_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub secret_access_key: Option<String>,
}

/// The volume to push to and a label for it (endpoint and volume id, which key the push cache).
async fn volume(args: &PushArgs, target: &Target) -> Result<(S3Volume, String), String> {
    let e = &args.explicit;
    if let (Some(endpoint), Some(region), Some(vol), Some(key), Some(secret)) =
        (&e.s3_endpoint, &e.region, &e.volume, &e.access_key_id, &e.secret_access_key)
    {
        let store = S3Volume::new(S3Settings::new(endpoint, region, vol, key, secret));
        return Ok((store, format!("{endpoint}|{vol}")));
    }
    let (client, _, _) = connect(None, target).await?;
    provider_volume(&client, &args.provider).await
}

/// The network volume of a RunPodProvider, with the keys of its Secret.
pub async fn provider_volume(client: &Client, name: &str) -> Result<(S3Volume, String), String> {
    let provider =
        Api::<RunPodProvider>::all(client.clone()).get_opt(name).await.map_err(api_error)?.ok_or_else(|| {
            format!("RunPodProvider {name} does not exist (--provider, or the --s3-* flags for a volume of your own)")
        })?;
    let store = ep_operator::pool::volume(client, &provider).await.map_err(|e| e.to_string())?;
    Ok((store, format!("{}|{}", provider.spec.s3.endpoint, provider.spec.network_volume.id)))
}

fn cache_dir(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ep")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ep")))
}

fn last_push_file(cache: &Path, label: &str, root: &Path) -> PathBuf {
    let key = format!("{label}|{}", root.display());
    cache.join("last-push").join(hex::encode(Sha256::digest(key.as_bytes())))
}

pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// What a push did, for `-o json|yaml`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pushed {
    /// For `spec.payload.digest`.
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
    /// Blobs the volume held already.
    pub present_files: u64,
    pub s3_requests: u64,
}

/// `kubectl ep push`: prints the digest on stdout (or, with -o, what was pushed).
pub async fn run_push(args: PushArgs, target: &Target) -> Result<(), String> {
    let (store, label) = volume(&args, target).await?;
    let pushed = push_to(&store, &label, &args).await?;
    if !args.output.is_text() {
        return args.output.print(&pushed);
    }
    println!("{}", pushed.digest);
    eprintln!("put it in your Experiment: spec.payload.digest: \"{}\"", pushed.digest);
    Ok(())
}

/// Pushes `args.dir` to `store`.
pub async fn push_to(store: &S3Volume, label: &str, args: &PushArgs) -> Result<Pushed, String> {
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
    if let Some((file, entry)) = &args.entry {
        ep_operator::order::entry::gate(entry, &payload.manifest, &payload.id)
            .map_err(|b| format!("{file}: {}", b.message.replace("no pod was created", "nothing pushed")))?;
    }
    if !args.no_compile_check
        && let Some(python) =
            crate::preflight::python_compiles(&root, payload.manifest.files.iter().map(|f| f.path.as_str()))?
    {
        eprintln!("Python files compile ({python})");
    }
    let previous = cache
        .as_ref()
        .and_then(|c| std::fs::read_to_string(last_push_file(c, label, &root)).ok())
        .map(|s| s.trim().to_owned());
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
    let report = push(store, &payload, &opts, &show).await.map_err(|e| e.to_string())?;
    if tty {
        eprintln!();
    }
    if report.already_sealed {
        eprintln!("already on the volume: nothing to upload");
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
        let f = last_push_file(c, label, &root);
        if let Some(d) = f.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(f, &payload.id);
    }
    Ok(Pushed {
        digest: format!("sha256:{}", payload.id),
        files: report.files_total,
        bytes: report.bytes_total,
        uploaded_files: report.uploaded_files,
        uploaded_bytes: report.uploaded_bytes,
        present_files: report.present_files,
        s3_requests: report.requests,
    })
}
