//! `kubectl ep pull EXP [DIR]`: an attempt's artifacts from the network volume, each checked
//! against the sha256 the runner recorded and the operator verified before the pod was deleted.
//! The volume's endpoint and keys come from the RunPodProvider and its Secret: nothing to copy.

use std::path::{Path, PathBuf};

use ep_api::RunPodOrder;
use ep_api::experiment::ArtifactRef;
use ep_api::provider::RunPodProvider;
use ep_api::volume::{Terminal, keys};
use ep_volume::store::VolumeStore;
use kube::{Api, Client, ResourceExt};

use serde::Serialize;

use crate::orders::api_error;
use crate::output::Format;

/// What `pull` fetches.
pub struct PullArgs {
    pub name: String,
    pub dir: Option<PathBuf>,
    pub checkpoints: bool,
    pub attempt: Option<i32>,
    pub output: Format,
}

/// One file pulled, for `-o json|yaml`.
#[derive(Serialize)]
struct Pulled {
    path: String,
    size: i64,
    sha256: String,
    /// False when retention deleted it from the volume after verification.
    present: bool,
}

/// A progress bar on stderr, redrawn at most every tenth of a second (a terminal only).
struct Bar {
    total: i64,
    done: i64,
    drawn: std::time::Instant,
}

impl Bar {
    fn add(&mut self, n: u64, name: &str) {
        self.done += i64::try_from(n).unwrap_or(0);
        if self.drawn.elapsed() >= std::time::Duration::from_millis(100) || self.done >= self.total {
            self.drawn = std::time::Instant::now();
            let frac = if self.total > 0 { self.done as f64 / self.total as f64 } else { 1.0 };
            let filled = ((frac * 30.0) as usize).min(30);
            eprint!(
                "\r[{}{}] {:>3.0}% {} / {}  {name:<40.40}",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                frac * 100.0,
                human(self.done),
                human(self.total)
            );
            let _ = std::io::Write::flush(&mut std::io::stderr());
        }
    }
}

/// A file's place under the download directory: its key below the run's artifacts prefix, with
/// no way out of the directory.
fn relative(prefix: &str, key: &str) -> Option<PathBuf> {
    let rel = Path::new(key.strip_prefix(prefix)?);
    rel.components().all(|c| matches!(c, std::path::Component::Normal(_))).then(|| rel.to_path_buf())
}

fn human(bytes: i64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// The verified artifacts of the order's run: the status lists up to 100; beyond that the
/// runner's terminal.json on the volume names the rest (with their sha256).
async fn listed(order: &RunPodOrder, store: &impl VolumeStore) -> Result<(String, Vec<ArtifactRef>), String> {
    let name = order.name_any();
    let st = order.status.clone().unwrap_or_default();
    let arts = st.outcome.and_then(|o| o.artifacts).ok_or_else(|| {
        format!("RunPodOrder {name} has no verified artifacts (phase {:?}): its run has not been judged yet", st.phase)
    })?;
    if arts.omitted == 0 {
        return Ok((arts.prefix, arts.items));
    }
    let run = st.run_id.unwrap_or_default();
    let key = keys::run_file(&run, keys::TERMINAL);
    let bytes = store.get(&key).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("{key} is gone"))?;
    let terminal: Terminal = serde_json::from_slice(&bytes).map_err(|e| format!("{key}: {e}"))?;
    let items = terminal
        .artifacts
        .into_iter()
        .map(|a| ArtifactRef {
            key: format!("{}{}", arts.prefix, a.path),
            size: i64::try_from(a.size).unwrap_or(i64::MAX),
            sha256: a.sha256,
        })
        .collect();
    Ok((arts.prefix, items))
}

/// Downloads the verified artifacts of an experiment's attempt (the current or last one, or
/// `--attempt N`) into DIR (default `<experiment>-a<N>`), checkpoints only with `--checkpoints`.
pub async fn pull(client: Client, ns: &str, a: &PullArgs) -> Result<(), String> {
    let order = crate::runpod::order_of(&client, ns, &a.name, a.attempt).await?;
    let provider = Api::<RunPodProvider>::all(client.clone())
        .get_opt(&order.spec.provider_ref)
        .await
        .map_err(api_error)?
        .ok_or_else(|| format!("spec.providerRef {} does not exist", order.spec.provider_ref))?;
    let store = ep_operator::pool::volume(&client, &provider).await.map_err(|e| e.to_string())?;
    let (prefix, items) = listed(&order, &store).await?;
    let run = order.spec.template(order.status.as_ref()).cloned();
    let attempt = run.as_ref().map_or(1, |r| r.attempt);
    let ckpt = run.and_then(|r| r.checkpoints).map_or_else(|| "checkpoints/".to_owned(), |c| c.path);
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}-a{attempt}", a.name)));
    let chosen: Vec<(PathBuf, &ArtifactRef)> = items
        .iter()
        .filter_map(|i| relative(&prefix, &i.key).map(|r| (r, i)))
        .filter(|(r, _)| a.checkpoints || !r.starts_with(&ckpt))
        .collect();
    let total: i64 = chosen.iter().map(|(_, i)| i.size).sum();
    let (mut done, mut missing) = (0i64, 0usize);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar = Bar { total, done: 0, drawn: std::time::Instant::now() };
    let mut pulled = vec![];
    for (n, (rel, item)) in chosen.iter().enumerate() {
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let shown = rel.display().to_string();
        let mut on_bytes = |b: u64| {
            if tty {
                bar.add(b, &shown);
            }
        };
        let got = store.download(&item.key, &dest, &mut on_bytes).await.map_err(|e| e.to_string())?;
        let rel_s = rel.display().to_string();
        pulled.push(Pulled { path: rel_s, size: item.size, sha256: item.sha256.clone(), present: got.is_some() });
        let Some((size, sha)) = got else {
            // Retention deleted it after verification (KeepLast, Discard).
            if !tty {
                eprintln!(
                    "[{}/{}] {} no longer on the volume (checkpoint retention)",
                    n + 1,
                    chosen.len(),
                    rel.display()
                );
            }
            missing += 1;
            continue;
        };
        if sha != item.sha256 || i64::try_from(size).ok() != Some(item.size) {
            let _ = std::fs::remove_file(&dest);
            return Err(format!(
                "{}: the volume holds {size} bytes with sha256 {sha}, but the verified receipt says {} bytes with {}; removed",
                rel.display(),
                item.size,
                item.sha256
            ));
        }
        done += item.size;
        if tty {
            continue;
        }
        eprintln!(
            "[{}/{}] {} {} sha256 ok ({} of {})",
            n + 1,
            chosen.len(),
            rel.display(),
            human(item.size),
            human(done),
            human(total)
        );
    }
    if tty {
        eprintln!();
    }
    if !a.output.is_text() {
        return a.output.print(&pulled);
    }
    let skipped = items.len() - chosen.len();
    println!(
        "{} files ({}) verified into {}{}{}",
        chosen.len() - missing,
        human(done),
        dir.display(),
        if skipped > 0 { format!("; {skipped} checkpoint files left (--checkpoints)") } else { String::new() },
        if missing > 0 { format!("; {missing} deleted by retention") } else { String::new() }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_never_leads_out_of_the_download_directory() {
        let p = "ep/runs/r1/artifacts/";
        assert_eq!(relative(p, "ep/runs/r1/artifacts/results.json"), Some(PathBuf::from("results.json")));
        assert_eq!(relative(p, "ep/runs/r1/artifacts/checkpoints/e3.pt"), Some(PathBuf::from("checkpoints/e3.pt")));
        assert_eq!(relative(p, "ep/runs/r1/artifacts/../../r2/x"), None);
        assert_eq!(relative(p, "ep/runs/r1/artifacts//etc/passwd"), None);
        assert_eq!(relative(p, "elsewhere/x"), None);
    }
}
