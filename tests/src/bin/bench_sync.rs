//! `make bench-sync`: payload sync and hashing against named baselines, measured in one run.
//!
//! Payload: 2,000 files of mixed sizes (~0.9 GiB). One S3 server (runpod-sim's network-volume S3,
//! a separate process). Each tool writes under its own prefix of the same volume:
//! - first upload: ours (hashing included) vs `rclone sync` vs `aws s3 sync`;
//! - re-sync after one file changed: ours (with the previous push known) vs each again;
//! - sha256 of the whole payload on one core: ours vs `sha256sum`.
//!
//! Prints the ratios (ours / theirs: below 1 means ours is faster) and our S3 request counts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use ep_testkit::sim::RunPodSimProcess;
use ep_volume::store::S3Settings;
use ep_volume::sync::{SyncOptions, push};
use ep_volume::{Payload, PayloadSource, S3Volume};

const VOLUME: &str = "benchvolume";

fn lcg_fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn make_payload(root: &Path) -> std::io::Result<(usize, u64)> {
    let mut total = 0u64;
    let mut n = 0usize;
    let mut write = |rel: String, size: usize, seed: u64| -> std::io::Result<()> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut buf = vec![0u8; size];
        lcg_fill(&mut buf, seed);
        std::fs::write(p, buf)?;
        total += size as u64;
        n += 1;
        Ok(())
    };
    for i in 0..1900u64 {
        write(format!("src/pkg{}/mod{i}.py", i % 40), 1024 + (i as usize * 37) % 9000, i)?;
    }
    for i in 0..90u64 {
        write(format!("data/shard{i}.bin"), (1 << 20) + (i as usize * 47_000) % (4 << 20), 10_000 + i)?;
    }
    for i in 0..10u64 {
        write(format!("weights/part{i}.bin"), 60 << 20, 20_000 + i)?;
    }
    Ok((n, total))
}

fn timed(label: &str, mut cmd: Command) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd.output().map_err(|e| format!("{label}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{label} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|c| c.exists()))
}

async fn ours(
    store: &S3Volume,
    root: &Path,
    cache: &Path,
    previous: Option<String>,
) -> Result<(f64, Payload, u64, u64), String> {
    let t = Instant::now();
    let payload =
        Payload::build(&PayloadSource { root: root.into(), cache_dir: Some(cache.into()), ..PayloadSource::default() })
            .map_err(|e| e.to_string())?;
    let built = t.elapsed().as_secs_f64();
    let report = push(store, &payload, &SyncOptions { parallelism: 16, previous, verify_all: false }, &|_| {})
        .await
        .map_err(|e| e.to_string())?;
    let total = t.elapsed().as_secs_f64();
    println!("  ours: manifest {built:.3}s + push {:.3}s", total - built);
    Ok((total, payload, report.requests, report.uploaded_files))
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-sync: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = tmp.path().join("payload");
    let (files, bytes) = make_payload(&root).map_err(|e| e.to_string())?;
    println!("payload: {files} files, {:.2} GiB", bytes as f64 / f64::from(1u32 << 30));
    let world = format!(
        "volumes:\n  - {{id: {VOLUME}, name: bench, sizeGb: 200, dataCenterId: EU-RO-1}}\ndataCenters:\n  - {{id: EU-RO-1, name: Romania, location: RO}}\n"
    );
    let sim = RunPodSimProcess::start(Some(&world), &[]).map_err(|e| e.to_string())?;
    let s3 = sim.get("s3");
    let (key, secret) = (sim.get("s3_access_key"), sim.get("s3_secret_key"));
    let store = S3Volume::new(S3Settings::new(&s3, "EU-RO-1", VOLUME, &key, &secret));
    let cache = tmp.path().join("cache");

    let venv_aws = ep_testkit::workspace_root().join(".tools/awscli/bin/aws");
    let aws = if venv_aws.exists() { Some(venv_aws) } else { which("aws") };
    let rclone = which("rclone");
    let aws_config = tmp.path().join("aws-config");
    std::fs::write(&aws_config, "[default]\ns3 =\n    addressing_style = path\n    max_concurrent_requests = 16\n")
        .map_err(|e| e.to_string())?;
    let aws_cmd = |dest: &str| {
        let mut c = Command::new(aws.clone().unwrap_or_default());
        c.args(["s3", "sync", "--only-show-errors", root.to_str().unwrap_or(""), dest, "--endpoint-url", &s3])
            .env("AWS_ACCESS_KEY_ID", &key)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .env("AWS_DEFAULT_REGION", "eu-ro-1")
            .env("AWS_CONFIG_FILE", &aws_config)
            .env_remove("AWS_CA_BUNDLE");
        c
    };
    let rclone_remote = format!(
        ":s3,provider=Other,endpoint='{s3}',access_key_id={key},secret_access_key={secret},region=eu-ro-1,force_path_style=true:{VOLUME}/rclone"
    );
    let rclone_cmd = || {
        let mut c = Command::new(rclone.clone().unwrap_or_default());
        c.args(["sync", root.to_str().unwrap_or(""), &rclone_remote, "--transfers", "8", "--checkers", "16"])
            .env_remove("AWS_CA_BUNDLE");
        c
    };

    // First upload.
    let (ours_first, first, ours_first_req, ours_first_up) = ours(&store, &root, &cache, None).await?;
    let rclone_first = if rclone.is_some() { Some(timed("rclone sync", rclone_cmd())?) } else { None };
    let aws_first =
        if aws.is_some() { Some(timed("aws s3 sync", aws_cmd(&format!("s3://{VOLUME}/awscli")))?) } else { None };

    // One file changes.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let changed = root.join("src/pkg7/mod7.py");
    let mut f = std::fs::OpenOptions::new().append(true).open(&changed).map_err(|e| e.to_string())?;
    f.write_all(b"# changed\n").map_err(|e| e.to_string())?;
    drop(f);
    let (ours_re, _second, ours_re_req, ours_re_up) = ours(&store, &root, &cache, Some(first.id.clone())).await?;
    let rclone_re = if rclone.is_some() { Some(timed("rclone sync (re-sync)", rclone_cmd())?) } else { None };
    let aws_re = if aws.is_some() {
        Some(timed("aws s3 sync (re-sync)", aws_cmd(&format!("s3://{VOLUME}/awscli")))?)
    } else {
        None
    };

    // Hashing on one core.
    let mut paths: Vec<PathBuf> = first.files.values().cloned().collect();
    paths.sort();
    let t = Instant::now();
    for p in &paths {
        ep_volume::manifest::sha256_file(p).map_err(|e| e.to_string())?;
    }
    let ours_hash = t.elapsed().as_secs_f64();
    let list = tmp.path().join("files.txt");
    std::fs::write(&list, paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n"))
        .map_err(|e| e.to_string())?;
    let mut sum = Command::new("sh");
    sum.arg("-c").arg(format!("xargs -a {} sha256sum > /dev/null", list.display()));
    let sha256sum = timed("sha256sum", sum)?;

    println!();
    println!("{:<40} {:>10} {:>14} {:>14}", "measurement", "ours (s)", "baseline (s)", "ours/theirs");
    let row = |what: &str, o: f64, b: Option<f64>| match b {
        Some(b) => println!("{what:<40} {o:>10.3} {b:>14.3} {:>14.3}", o / b),
        None => println!("{what:<40} {o:>10.3} {:>14} {:>14}", "not installed", "-"),
    };
    row("first upload vs rclone sync", ours_first, rclone_first);
    row("first upload vs aws s3 sync", ours_first, aws_first);
    row("re-sync, one file changed vs rclone", ours_re, rclone_re);
    row("re-sync, one file changed vs aws s3 sync", ours_re, aws_re);
    row("sha256, one core vs sha256sum", ours_hash, Some(sha256sum));
    println!();
    println!("ours, first upload: {ours_first_up} objects written, {ours_first_req} S3 requests");
    println!("ours, re-sync:      {ours_re_up} object written + 1 manifest, {ours_re_req} S3 requests");
    println!(
        "hashing throughput: ours {:.0} MB/s, sha256sum {:.0} MB/s (ratio {:.2})",
        bytes as f64 / ours_hash / 1e6,
        bytes as f64 / sha256sum / 1e6,
        sha256sum / ours_hash
    );
    Ok(())
}
