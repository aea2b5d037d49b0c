//! The launch contract's last check before money is spent: the script the entry runs is in the
//! payload. A typo in `spec.entry` is found here, before any pod, not after a paid pod started.

use ep_api::experiment::Entry;
use ep_api::volume::PayloadManifest;

use crate::reason::{Blocked, Reason};

/// Interpreters whose first operand is the script they run.
fn interpreter(program: &str) -> bool {
    let base = program.rsplit('/').next().unwrap_or(program);
    base.starts_with("python") || matches!(base, "bash" | "sh" | "zsh" | "Rscript" | "julia" | "node" | "perl" | "ruby")
}

/// Options of those interpreters that take the next word as their value (not a script).
const WITH_VALUE: &[&str] = &["-W", "-X", "-O", "--rcfile", "--init-file"];

/// The payload-relative script the entry runs, when it names one: the program itself when it is a
/// relative path (`./train.sh`, `scripts/train.py`), else an interpreter's first operand. None when
/// the entry runs a module (`python -m pkg`), inline code (`-c`), or a program from the image.
pub fn script(entry: &Entry) -> Option<String> {
    let mut words = entry.command.iter().chain(entry.args.iter());
    let program = words.next()?;
    let relative = |w: &str| !w.starts_with('/') && (w.contains('/') || w.contains('.'));
    if !interpreter(program) {
        return relative(program).then(|| program.trim_start_matches("./").to_owned());
    }
    let mut skip = false;
    for w in words {
        if skip {
            skip = false;
            continue;
        }
        match w.as_str() {
            "-m" | "-c" => return None,
            w if WITH_VALUE.contains(&w) => skip = true,
            w if w.starts_with('-') => {}
            w => return relative(w).then(|| w.trim_start_matches("./").to_owned()),
        }
    }
    None
}

/// Refuses a payload that lacks the entry's script.
pub fn gate(entry: &Entry, manifest: &PayloadManifest, payload_id: &str) -> Result<(), Blocked> {
    let Some(script) = script(entry) else { return Ok(()) };
    if manifest.files.iter().any(|f| f.path == script) {
        return Ok(());
    }
    let mut held: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).take(10).collect();
    if manifest.files.len() > 10 {
        held.push("...");
    }
    Err(Blocked::new(
        Reason::InvalidPayload,
        format!(
            "spec.entry runs {script}, which payload sha256:{payload_id} does not hold (it holds {}): fix \
             spec.entry or the payload; no pod was created",
            held.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cmd: &[&str], args: &[&str]) -> Entry {
        Entry {
            command: cmd.iter().map(|s| (*s).to_owned()).collect(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn the_script_is_found_in_the_shapes_people_write() {
        assert_eq!(script(&entry(&["python3", "train.py"], &["--epochs", "3"])).as_deref(), Some("train.py"));
        assert_eq!(script(&entry(&["python", "-u", "scripts/train.py"], &[])).as_deref(), Some("scripts/train.py"));
        assert_eq!(script(&entry(&["python3", "-W", "ignore", "./t.py"], &[])).as_deref(), Some("t.py"));
        assert_eq!(script(&entry(&["bash"], &["run.sh"])).as_deref(), Some("run.sh"));
        assert_eq!(script(&entry(&["./train.sh"], &[])).as_deref(), Some("train.sh"));
        assert_eq!(script(&entry(&["python3", "-m", "pkg.train"], &[])), None);
        assert_eq!(script(&entry(&["python3", "-c", "print(1)"], &[])), None);
        assert_eq!(script(&entry(&["/usr/bin/nvidia-smi"], &[])), None);
        assert_eq!(script(&entry(&["torchrun", "--nproc", "2"], &[])), None);
    }

    #[test]
    fn a_missing_script_is_refused_naming_what_the_payload_holds() {
        let manifest: PayloadManifest = serde_json::from_value(serde_json::json!({"version": 1, "files": [
            {"path": "train.py", "size": 1, "sha256": "00", "mode": 420}
        ]}))
        .unwrap();
        assert!(gate(&entry(&["python3", "train.py"], &[]), &manifest, "ab").is_ok());
        let b = gate(&entry(&["python3", "trian.py"], &[]), &manifest, "ab").unwrap_err();
        assert_eq!(b.reason, Reason::InvalidPayload);
        assert!(b.message.contains("runs trian.py") && b.message.contains("holds train.py"), "{}", b.message);
    }
}
