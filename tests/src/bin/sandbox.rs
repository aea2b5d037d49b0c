//! `make sandbox`: the main job on an embedded default, start to finish.
//!
//! Today it starts what exists: a throwaway PostgreSQL, the registry migrations, and the
//! operator's settings (embedded default or `EP_SETTINGS`), mirrored into the registry; then it
//! prints the registry queries people run. The simulators and the controllers join as they land.

use std::path::PathBuf;
use std::process::ExitCode;

use ep_operator::registry::{PgRegistry, Registry};
use ep_operator::settings::{EMBEDDED_DEFAULT, Settings, SettingsWatcher, content_hash};
use ep_testkit::postgres::TempPostgres;
use sqlx::Row;

const QUERIES: [&str; 4] = [
    "SELECT name, status FROM exp_registry.experiments WHERE name = 'quickstart';",
    "SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name;",
    "SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING';",
    "SELECT worker_id, last_seen, running_jobs FROM exp_registry.worker_heartbeats;",
];

#[tokio::main(flavor = "current_thread")]
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
    println!("==> operator settings {source} (sha256 {})", &sha[..12]);
    println!("    policies: {}", settings.policies.keys().cloned().collect::<Vec<_>>().join(", "));
    println!("    gpu aliases: {}", settings.gpu_aliases.len());
    registry.record_settings(&sha, &serde_json::to_value(&settings)?, chrono::Utc::now()).await?;

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
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM exp_registry.settings").fetch_one(registry.pool()).await?;
    println!("    exp_registry.settings: {applied} row(s)");

    println!(
        "==> not yet part of the sandbox: runpod-sim, kube-sim and the controllers, so no experiment runs yet \
         (see `issues`: the RunPod, kube-sim, data-plane and control-plane issues complete it)"
    );
    if std::env::var_os("KEEP").is_some() {
        println!("==> KEEP set: PostgreSQL stays up at {url}; press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    println!("==> stopping");
    drop(pg);
    Ok(())
}
