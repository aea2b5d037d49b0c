//! Resource usage of the command's process tree (from /proc) and of GPUs (from nvidia-smi, when present).

use std::collections::HashMap;
use std::process::Command;

use ep_api::volume::{GpuSample, GpuUsage};

/// Pids of `root` and all its descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some(ppid) = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse().ok())
            {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Resident memory of the tree in bytes, now.
pub fn tree_rss(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .sum()
}

/// GPUs as nvidia-smi reports them; empty without nvidia-smi (no GPU is fine).
pub fn gpus() -> Vec<GpuSample> {
    let Ok(out) = Command::new("nvidia-smi")
        .args(["--query-gpu=uuid,name,utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"])
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout).lines().filter_map(parse_gpu_line).collect()
}

fn parse_gpu_line(line: &str) -> Option<GpuSample> {
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() < 5 {
        return None;
    }
    Some(GpuSample {
        id: f[0].to_owned(),
        name: f[1].to_owned(),
        util_percent: f[2].parse().unwrap_or(0.0),
        memory_used_mib: f[3].parse().unwrap_or(0.0),
        memory_total_mib: f[4].parse().unwrap_or(0.0),
    })
}

/// Running GPU statistics over the samples.
#[derive(Default)]
pub struct GpuStats {
    per_gpu: HashMap<String, (String, f64, f64, u64)>,
}

impl GpuStats {
    pub fn add(&mut self, samples: &[GpuSample]) {
        for s in samples {
            let e = self.per_gpu.entry(s.id.clone()).or_insert_with(|| (s.name.clone(), 0.0, 0.0, 0));
            e.1 += s.util_percent;
            e.2 = e.2.max(s.memory_used_mib);
            e.3 += 1;
        }
    }
    pub fn summary(&self) -> Vec<GpuUsage> {
        let mut v: Vec<GpuUsage> = self
            .per_gpu
            .iter()
            .map(|(id, (name, util, mem, n))| GpuUsage {
                id: id.clone(),
                name: name.clone(),
                util_percent_mean: util / (*n).max(1) as f64,
                memory_peak_mib: *mem,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_parse() {
        let g = parse_gpu_line("GPU-e0488b7e-6932, NVIDIA RTX PRO 4500 Blackwell, 97, 20000, 32607").unwrap();
        assert_eq!((g.id.as_str(), g.util_percent, g.memory_total_mib), ("GPU-e0488b7e-6932", 97.0, 32607.0));
        assert!(parse_gpu_line("garbage").is_none());
        let mut stats = GpuStats::default();
        stats.add(std::slice::from_ref(&g));
        stats.add(&[GpuSample { util_percent: 53.0, memory_used_mib: 25000.0, ..g }]);
        let s = &stats.summary()[0];
        assert_eq!((s.util_percent_mean, s.memory_peak_mib), (75.0, 25000.0));
    }

    #[test]
    fn the_tree_includes_grandchildren() {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh").arg("-c").arg("sleep 5 & sleep 5; wait").process_group(0).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pids = tree(child.id());
        assert!(pids.len() >= 3, "{pids:?}");
        assert!(tree_rss(child.id()) > 0);
        let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
        child.wait().unwrap();
    }
}
