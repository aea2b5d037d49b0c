//! Pods as local processes.
//!
//! When a pod's container starts, its start command runs as a local process group with the pod's
//! environment. Where the machine allows it (root, or an unprivileged user namespace), the process
//! gets a private mount namespace in which the volume directory is bind-mounted at the pod's mount
//! path, so a command that writes `/workspace/...` works unchanged, as on RunPod. Elsewhere the
//! command runs without that mount and finds the volume through `EP_WORKSPACE` (see README).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::world::{Pod, PortMapping, StartCommand};

/// How pod processes see the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// `unshare` with these flags: a private mount namespace in which the volume is bind-mounted
    /// at the mount path, and where the machine allows it a PID namespace, which makes the pod a
    /// container: when its first process dies the kernel kills every process left in it, as
    /// terminating a RunPod pod does.
    Namespaces(&'static [&'static str]),
    /// No namespaces: `EP_WORKSPACE` points at the volume directory.
    EnvOnly,
}

/// Flag sets tried in order: as root, then through an unprivileged user namespace; with a PID
/// namespace first, without one if the machine refuses it.
const UNSHARE_FLAGS: [&[&str]; 4] = [
    &["--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"],
    &["--user", "--map-root-user", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"],
    &["--mount", "--propagation", "private"],
    &["--user", "--map-root-user", "--mount", "--propagation", "private"],
];

/// Detects once what this machine allows.
pub fn isolation() -> Isolation {
    static DETECTED: OnceLock<Isolation> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        if std::env::var_os("RUNPOD_SIM_NO_NAMESPACES").is_some() {
            return Isolation::EnvOnly;
        }
        let works = |flags: &[&str]| {
            Command::new("unshare")
                .args(flags)
                .args(["--", "true"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        UNSHARE_FLAGS.into_iter().find(|f| works(f)).map_or(Isolation::EnvOnly, Isolation::Namespaces)
    })
}

/// A running (or stopping) container process group.
#[derive(Debug)]
pub struct PodProcess {
    child: Child,
    kill_at: Option<Instant>,
    exit: Option<i32>,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn group(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// The exit code once the main process ended (signals map to 128 + signal, as docker does).
    pub fn exited(&mut self) -> Option<i32> {
        if self.exit.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            use std::os::unix::process::ExitStatusExt;
            self.exit = Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(9)));
        }
        self.exit
    }

    pub fn alive(&self) -> bool {
        self.exit.is_none()
    }

    /// SIGTERM to the whole group now, SIGKILL after `grace` seconds if anything is left.
    pub fn stop(&mut self, grace: f64) {
        let _ = killpg(self.group(), Signal::SIGTERM);
        self.kill_at = Some(Instant::now() + Duration::from_secs_f64(grace.max(0.0)));
        if grace <= 0.0 {
            self.enforce_grace();
        }
    }

    /// Sends SIGKILL to the group once the grace period is over.
    pub fn enforce_grace(&mut self) {
        if let Some(at) = self.kill_at
            && Instant::now() >= at
        {
            let _ = killpg(self.group(), Signal::SIGKILL);
            self.kill_at = None;
            // Reap it so no zombie remains.
            let _ = self.child.wait().map(|_| self.exited());
        }
        let _ = self.exited();
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = killpg(self.group(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Starts a pod's container command.
pub fn spawn(pod: &Pod, state_dir: &Path) -> std::io::Result<PodProcess> {
    let volume = match &pod.network_volume_id {
        Some(v) => state_dir.join("volumes").join(v),
        None => state_dir.join("pods").join(&pod.id).join("volume"),
    };
    std::fs::create_dir_all(&volume)?;
    let pod_dir = state_dir.join("pods").join(&pod.id);
    std::fs::create_dir_all(&pod_dir)?;
    let log = OpenOptions::new().create(true).append(true).open(pod_dir.join("container.log"))?;
    let mount = &pod.volume_mount_path;
    let mode = isolation();
    let mut cmd = match mode {
        Isolation::Namespaces(flags) => unshare(flags),
        Isolation::EnvOnly => Command::new("/bin/sh"),
    };
    let (inner, argv): (&str, Vec<String>) = match pod.start.as_ref() {
        Some(StartCommand::Shell(line)) => ("exec /bin/sh -c \"$EP_SIM_COMMAND\"", vec![line.clone()]),
        Some(StartCommand::Argv(argv)) => ("shift; exec \"$@\"", argv.clone()),
        None => return Err(std::io::Error::other("no start command")),
    };
    let script = match mode {
        Isolation::EnvOnly => format!("cd \"$EP_WORKSPACE\" && {inner}"),
        Isolation::Namespaces(_) => format!(
            "mkdir -p \"$EP_SIM_MOUNT\" && mount --bind \"$EP_SIM_VOLUME\" \"$EP_SIM_MOUNT\" && cd \"$EP_SIM_MOUNT\" && {inner}"
        ),
    };
    cmd.arg("-c").arg(script).arg("pod");
    if let Some(StartCommand::Argv(_)) = pod.start.as_ref() {
        cmd.arg("--").args(&argv);
    }
    // The pod's own temporary directory, as a container has its own /tmp: what a pod leaves there
    // goes with the simulator's state, not into the host's /tmp.
    let tmp = pod_dir.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    cmd.env("EP_SIM_MOUNT", mount).env("EP_SIM_VOLUME", &volume).env("TMPDIR", &tmp);
    if let Some(StartCommand::Shell(line)) = pod.start.as_ref() {
        cmd.env("EP_SIM_COMMAND", line);
    }
    for (k, v) in &pod.env {
        cmd.env(k, v);
    }
    cmd.env("RUNPOD_POD_ID", &pod.id)
        .env("RUNPOD_API_KEY", &pod.scoped_key)
        .env("RUNPOD_DC_ID", &pod.data_center_id)
        .env("RUNPOD_POD_HOSTNAME", &pod.pod_host_id)
        .env("RUNPOD_GPU_COUNT", pod.gpu_count.to_string())
        .env("RUNPOD_CPU_COUNT", pod.vcpu_count.to_string())
        .env("RUNPOD_VOLUME_ID", pod.network_volume_id.clone().unwrap_or_default())
        .env("RUNPOD_SIM_VOLUME_DIR", &volume);
    match mode {
        Isolation::EnvOnly => cmd.env("EP_WORKSPACE", &volume),
        Isolation::Namespaces(_) => cmd.env("EP_WORKSPACE", mount),
    };
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let child = cmd.spawn()?;
    Ok(PodProcess { child, kill_at: None, exit: None })
}

fn unshare(args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(args).arg("--").arg("/bin/sh");
    c
}

/// Port mappings for a `ports` string such as `22/tcp,8888/http`; public ports are random and
/// change on every start, as on RunPod.
pub fn port_mappings(ports: &str) -> Vec<PortMapping> {
    ports
        .split(',')
        .filter_map(|p| {
            let (port, kind) = p.trim().split_once('/')?;
            let private_port: i32 = port.parse().ok()?;
            let http = kind == "http";
            Some(PortMapping {
                ip: if http { "100.65.0.2".into() } else { "127.0.0.1".into() },
                is_ip_public: !http,
                private_port,
                public_port: if http { private_port } else { fastrand::i32(20000..60000) },
                kind: kind.into(),
            })
        })
        .collect()
}
