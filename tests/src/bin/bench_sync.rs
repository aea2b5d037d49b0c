//! `make bench-sync`: payload sync and hashing against named baselines, measured in the same run.
//!
//! Payload: 2,000 files of mixed sizes (~0.9 GiB). One S3 server per run (runpod-sim's
//! network-volume S3, a separate process). Each tool writes under its own prefix of the volume:
//! - first upload: ours (hashing included) vs `rclone sync` vs `aws s3 sync`;
//! - re-sync after one file changed: ours (with the previous push known) vs each again;
//! - sha256 of the whole payload on one core: ours vs `openssl dgst -sha256` and `sha256sum`;
//! - the payload's manifest built on every core vs one core of `openssl dgst -sha256`.
//!
//! `EP_BENCH_RUNS` runs (default 3); each ratio is printed per run and as the median of the runs
//! (ours / theirs in seconds: below 1 means ours is faster), with our S3 request counts.

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

/// CPU seconds of a process (user + system), and with `children` of its waited-for children.
fn cpu_s(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // utime, stime, cutime, cstime are fields 14 to 17; in clock ticks (100 a second on Linux).
    (at(11) + at(12) + if children { at(13) + at(14) } else { 0.0 }) / 100.0
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
    let runs: usize = std::env::var("EP_BENCH_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(3).max(1);
    let mut all = vec![];
    for n in 1..=runs {
        println!("== run {n} of {runs}");
        match run().await {
            Ok(m) => all.push(m),
            Err(e) => {
                eprintln!("bench-sync: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    summary(&all);
    ExitCode::SUCCESS
}

/// One run's figures: (what, ours in seconds, the baseline's, when it is installed).
struct Measured {
    rows: Vec<(&'static str, f64, Option<f64>)>,
    first_requests: u64,
    files: usize,
    re_requests: u64,
    re_written: u64,
    cores: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn summary(all: &[Measured]) {
    let Some(first) = all.first() else { return };
    println!();
    println!("== median of {} runs ({} cores)", all.len(), first.cores);
    println!("{:<46} {:>10} {:>14} {:>12}", "measurement", "ours (s)", "baseline (s)", "ours/theirs");
    for (i, (what, _, _)) in first.rows.iter().enumerate() {
        let ours = median(all.iter().map(|m| m.rows[i].1).collect());
        let theirs: Vec<f64> = all.iter().filter_map(|m| m.rows[i].2).collect();
        let ratios: Vec<f64> = all.iter().filter_map(|m| m.rows[i].2.map(|b| m.rows[i].1 / b)).collect();
        if theirs.is_empty() {
            println!("{what:<46} {ours:>10.3} {:>14} {:>12}", "not installed", "-");
        } else {
            println!("{what:<46} {ours:>10.3} {:>14.3} {:>12.3}", median(theirs), median(ratios));
        }
    }
    let ratio = |label: &str| {
        let i = first.rows.iter().position(|r| r.0 == label)?;
        Some(median(all.iter().filter_map(|m| m.rows[i].2.map(|b| b / m.rows[i].1)).collect()))
    };
    println!();
    if let Some(x) = ratio(HASH_VS_OPENSSL) {
        println!("sha256 throughput, one core: {x:.2}x openssl's (median)");
    }
    if let Some(x) = ratio(MANIFEST_VS_OPENSSL) {
        println!("manifest on {} cores: {x:.2}x one core of openssl (median)", first.cores);
    }
    let per_file = median(all.iter().map(|m| m.first_requests as f64 / m.files as f64).collect());
    println!("first upload: {per_file:.3} S3 requests per file (median)");
    let re = all.iter().map(|m| format!("{} object(s) + 1 manifest in {} requests", m.re_written, m.re_requests));
    println!("re-sync, one file changed: {}", re.collect::<Vec<_>>().join("; "));
}

const HASH_VS_OPENSSL: &str = "sha256, one core vs openssl dgst -sha256";
const MANIFEST_VS_OPENSSL: &str = "manifest, all cores vs openssl on one core";

async fn run() -> Result<Measured, String> {
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

    // First upload, with the CPU each side spent on it (the client, and runpod-sim serving it).
    let sim_pid = sim.pid().to_string();
    let cpu = || (cpu_s("self", true), cpu_s(&sim_pid, false));
    let before = cpu();
    let (ours_first, first, ours_first_req, ours_first_up) = ours(&store, &root, &cache, None).await?;
    let mid = cpu();
    let rclone_first = if rclone.is_some() { Some(timed("rclone sync", rclone_cmd())?) } else { None };
    let after = cpu();
    println!(
        "  CPU seconds, first upload: ours {:.2} + runpod-sim {:.2}; rclone {:.2} + runpod-sim {:.2}",
        mid.0 - before.0,
        mid.1 - before.1,
        after.0 - mid.0,
        after.1 - mid.1
    );
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

    // Hashing on one core: ours, openssl (the machine's SHA-256 as OpenSSL does it), sha256sum.
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
    let one_core = |tool: &str| {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("xargs -a {} {tool} > /dev/null", list.display()));
        c
    };
    let openssl = which("openssl").map(|_| timed("openssl dgst", one_core("openssl dgst -sha256"))).transpose()?;
    let sha256sum = timed("sha256sum", one_core("sha256sum"))?;
    // The whole manifest on every core, no stat cache.
    let t = Instant::now();
    Payload::build(&PayloadSource { root: root.clone(), ..PayloadSource::default() }).map_err(|e| e.to_string())?;
    let ours_manifest = t.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);

    let rows = vec![
        ("first upload vs rclone sync", ours_first, rclone_first),
        ("first upload vs aws s3 sync", ours_first, aws_first),
        ("re-sync, one file changed vs rclone", ours_re, rclone_re),
        ("re-sync, one file changed vs aws s3 sync", ours_re, aws_re),
        (HASH_VS_OPENSSL, ours_hash, openssl),
        ("sha256, one core vs sha256sum", ours_hash, Some(sha256sum)),
        (MANIFEST_VS_OPENSSL, ours_manifest, openssl),
    ];
    println!("{:<46} {:>10} {:>14} {:>12}", "measurement", "ours (s)", "baseline (s)", "ours/theirs");
    for (what, o, b) in &rows {
        match b {
            Some(b) => println!("{what:<46} {o:>10.3} {b:>14.3} {:>12.3}", o / b),
            None => println!("{what:<46} {o:>10.3} {:>14} {:>12}", "not installed", "-"),
        }
    }
    println!("ours, first upload: {ours_first_up} objects written, {ours_first_req} S3 requests for {files} files");
    println!("ours, re-sync:      {ours_re_up} object written + 1 manifest, {ours_re_req} S3 requests");
    println!(
        "hashing throughput, one core: ours {:.0} MB/s, openssl {}, sha256sum {:.0} MB/s; manifest on {cores} cores {:.0} MB/s",
        bytes as f64 / ours_hash / 1e6,
        openssl.map_or_else(|| "-".to_owned(), |o| format!("{:.0} MB/s", bytes as f64 / o / 1e6)),
        bytes as f64 / sha256sum / 1e6,
        bytes as f64 / ours_manifest / 1e6,
    );
    Ok(Measured {
        rows,
        first_requests: ours_first_req,
        files,
        re_requests: ours_re_req,
        re_written: ours_re_up,
        cores,
    })
}
