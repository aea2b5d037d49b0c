//! Checks on the user's machine before a payload is pushed, so a typo costs a second and not a
//! paid pod: every Python file of the payload compiles. The operator checks that the entry's
//! script is in the payload before any pod; it cannot compile Python (its image has no
//! interpreter), so the compile check runs here, with the `python3` on PATH.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Compiles each file (paths relative to `root`, read from stdin) and prints one line per file
/// that does not, as `path:line: message` with the offending text indented below.
const COMPILE_ALL: &str = r#"
import sys
bad = []
for p in sys.stdin.read().splitlines():
    try:
        with open(p, "rb") as f:
            compile(f.read(), p, "exec", dont_inherit=True)
    except SyntaxError as e:
        text = ("\n    " + e.text.strip()) if e.text else ""
        bad.append("%s:%s: %s%s" % (p, e.lineno, e.msg, text))
    except (ValueError, OSError) as e:
        bad.append("%s: %s" % (p, e))
print("\n".join(bad))
sys.exit(1 if bad else 0)
"#;

/// What the check found: Ok(Some(version)) when every file compiled with that Python, Ok(None)
/// when there was nothing to check or no python3 to check with (said on stderr).
pub fn python_compiles<'a>(root: &Path, files: impl Iterator<Item = &'a str>) -> Result<Option<String>, String> {
    let py: Vec<&str> = files.filter(|f| f.ends_with(".py")).collect();
    if py.is_empty() {
        return Ok(None);
    }
    let python = std::env::var("EP_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let version = match Command::new(&python).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => {
            eprintln!("note: no {python} here: the payload's Python files were not compiled before the push");
            return Ok(None);
        }
    };
    let mut child = Command::new(&python)
        .args(["-c", COMPILE_ALL])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{python}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(py.join("\n").as_bytes()).map_err(|e| format!("{python}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{python}: {e}"))?;
    if out.status.success() {
        return Ok(Some(version));
    }
    let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let found = if found.is_empty() { String::from_utf8_lossy(&out.stderr).trim().to_owned() } else { found };
    Err(format!(
        "{}: Python that does not compile ({version}), nothing pushed:\n{found}\n(--no-compile-check pushes anyway)",
        root.display()
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_syntax_error_is_named_with_its_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pkg")).unwrap();
        std::fs::write(dir.path().join("train.py"), "import pkg.model\nprint('ok')\n").unwrap();
        std::fs::write(dir.path().join("pkg/model.py"), "def f(:\n    return 1\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "def (").unwrap();
        let files = ["train.py", "pkg/model.py", "notes.txt"];
        let err = python_compiles(dir.path(), files.iter().copied()).unwrap_err();
        assert!(err.contains("pkg/model.py:1: "), "{err}");
        assert!(err.contains("def f(:"), "{err}");
        assert!(!err.contains("train.py:"), "{err}");
        std::fs::write(dir.path().join("pkg/model.py"), "def f():\n    return 1\n").unwrap();
        assert!(python_compiles(dir.path(), files.iter().copied()).unwrap().unwrap().starts_with("Python 3"));
        assert_eq!(python_compiles(dir.path(), ["notes.txt"].into_iter()).unwrap(), None);
    }
}
