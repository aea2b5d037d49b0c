//! `make sandbox`: the main job on an embedded default, start to finish, with what exists today.
//!
//! Starts a throwaway PostgreSQL with the registry and the operator's settings, runpod-sim and
//! kube-sim as processes, applies the CRDs and the quickstart with kubectl, pushes the quickstart
//! payload to the simulated volume with `kubectl ep push`, and prints what kubectl and the registry
//! show. The controllers that turn the Experiment into a paid pod are not built yet, so the
//! Experiment is accepted and stays without status; the sandbox says so rather than pretending.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use ep_operator::registry::{PgRegistry, Registry};
use ep_operator::settings::{EMBEDDED_DEFAULT, Settings, SettingsWatcher, content_hash};
use ep_testkit::postgres::TempPostgres;
use ep_testkit::sim::{KubeSimProcess, RunPodSimProcess, workspace_bin};
use ep_testkit::{tools, workspace_root};
use sqlx::Row;

const QUERIES: [&str; 4] = [
    "SELECT name, status FROM exp_registry.experiments WHERE name = 'quickstart';",
    "SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name;",
    "SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING';",
    "SELECT worker_id, last_seen, running_jobs FROM exp_registry.worker_heartbeats;",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("sandbox: a rustls crypto provider was already installed");
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox: {e}");
            ExitCode::FAILURE
        }
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    let bin = tools::kubectl().map_err(|e| e.to_string())?;
    let out = Command::new(bin).env("KUBECONFIG", kubeconfig).args(args).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    println!("==> starting a throwaway PostgreSQL");
    let pg = TempPostgres::start()?;
    let url = pg.create_database("ep").await?;
    println!("    {url}");
    println!("==> applying exp_registry migrations (twice: the second is a no-op)");
    let registry = PgRegistry::connect(&url).await?;
    registry.migrate().await?;
    registry.migrate().await?;
    let (source, text) = match std::env::var_os("EP_SETTINGS") {
        Some(p) => {
            let path = PathBuf::from(p);
            SettingsWatcher::load(&path)?;
            (path.display().to_string(), std::fs::read_to_string(&path)?)
        }
        None => ("<embedded default>".to_owned(), EMBEDDED_DEFAULT.to_owned()),
    };
    let settings = Settings::from_yaml(&source, &text)?;
    let sha = content_hash(text.as_bytes());
    println!(
        "==> operator settings {source} (sha256 {}): policies {}",
        &sha[..12],
        settings.policies.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    registry.record_settings(&sha, &serde_json::to_value(&settings)?, chrono::Utc::now()).await?;

    println!("==> starting runpod-sim (clock x60) and kube-sim");
    let rp = RunPodSimProcess::start(None, &["--clock-speed", "60"])?;
    let root = workspace_root();
    let ks = KubeSimProcess::start(Some(&root.join("crds")))?;
    let kc = ks.kubeconfig();
    println!("    RunPod API {}  volume S3 {}", rp.get("api"), rp.get("s3"));
    println!("    Kubernetes API {}  (KUBECONFIG={})", ks.url, kc.display());

    println!("==> kubectl apply -f examples/quickstart/ (the provider pointed at runpod-sim)");
    let quick = root.join("examples/quickstart");
    let staged = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&quick)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let mut text = std::fs::read_to_string(&p)?;
            text = text
                .replace("https://api.runpod.io", &rp.get("api"))
                .replace("https://s3api-eu-ro-1.runpod.io", &rp.get("s3"))
                .replace("rpa_REPLACE_ME", &rp.get("api_key"))
                .replace("user_REPLACE_ME", &rp.get("s3_access_key"))
                .replace("rps_REPLACE_ME", &rp.get("s3_secret_key"));
            std::fs::write(staged.path().join(p.file_name().unwrap_or_default()), text)?;
        }
    }
    print!("{}", indent(&kubectl(&kc, &["apply", "-f", &staged.path().display().to_string()])?));

    println!("==> kubectl ep push examples/quickstart (to the simulated network volume)");
    let push = Command::new(workspace_bin("kubectl-ep")?)
        .args(["push", &quick.display().to_string(), "--exclude", "*.yaml"])
        .env("EP_S3_ENDPOINT", rp.get("s3"))
        .env("EP_S3_REGION", "EU-RO-1")
        .env("EP_VOLUME_ID", "tgb8bx6fwl")
        .env("EP_S3_ACCESS_KEY_ID", rp.get("s3_access_key"))
        .env("EP_S3_SECRET_ACCESS_KEY", rp.get("s3_secret_key"))
        .env("EP_CACHE_DIR", staged.path().join("cache"))
        .output()?;
    print!("{}", indent(&String::from_utf8_lossy(&push.stderr)));
    print!("{}", indent(&String::from_utf8_lossy(&push.stdout)));

    println!("==> kubectl get rpp,exp -A");
    print!("{}", indent(&kubectl(&kc, &["get", "rpp,exp", "-A"])?));

    println!("==> registry queries");
    for q in QUERIES {
        println!("$ psql -c \"{q}\"");
        let rows = sqlx::query(q).fetch_all(registry.pool()).await?;
        println!("    ({} rows)", rows.len());
        for r in rows {
            let cols: Vec<String> =
                (0..r.len()).map(|i| r.try_get::<String, _>(i).unwrap_or_else(|_| "?".into())).collect();
            println!("    {}", cols.join(" | "));
        }
    }
    println!(
        "==> not built yet: the operator's controllers (RunPodProvider, Experiment, RunPodOrder reconcilers and the registry\n    \
         mirror). Until they land the Experiment is accepted and validated but nothing orders a pod, so it stays\n    \
         without status and the registry has no experiment rows."
    );
    if std::env::var_os("KEEP").is_some() {
        println!(
            "==> KEEP set: everything stays up. KUBECONFIG={}  DATABASE_URL={url}  RUNPOD_API_BASE_URL={}",
            kc.display(),
            rp.get("api")
        );
        println!("    press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    println!("==> stopping");
    drop(ks);
    drop(rp);
    drop(pg);
    Ok(())
}
