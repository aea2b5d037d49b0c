//! The shape the controller's code keeps: small files and functions, modules without cycles,
//! reasons only through the one enum, and every reason documented where operators read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ep_operator::reason::Reason;

fn sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let mut text = std::fs::read_to_string(&p).unwrap();
                // Inline unit tests are test code: they may use fixtures and spell words out.
                if let Some(at) = text.find("#[cfg(test)]\nmod tests {") {
                    text.truncate(at);
                }
                out.push((p, text));
            }
        }
    }
    out.sort();
    out
}

fn short(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap().display().to_string()
}

/// Unit-test code (files named tests.rs, or under a tests/ directory).
fn is_test(p: &Path) -> bool {
    p.file_name().is_some_and(|f| f == "tests.rs") || p.components().any(|c| c.as_os_str() == "tests")
}

#[test]
fn no_file_is_over_500_lines() {
    let long: Vec<String> = sources()
        .iter()
        .filter(|(_, t)| t.lines().count() > 500)
        .map(|(p, t)| format!("{} ({} lines)", short(p), t.lines().count()))
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}

/// Each `fn` with its length, found by rustfmt's layout: the body ends at the first line holding
/// only `}` at the indentation the `fn` started at.
fn functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let trimmed = l.trim_start();
        let indent = &l[..l.len() - trimmed.len()];
        let sig =
            trimmed.trim_start_matches("pub(crate) ").trim_start_matches("pub(super) ").trim_start_matches("pub ");
        let sig = sig.trim_start_matches("async ");
        if !sig.starts_with("fn ") || l.trim_end().ends_with(';') {
            continue;
        }
        let name = sig[3..].split(['(', '<']).next().unwrap_or_default().to_owned();
        let end = lines[i + 1..].iter().position(|x| *x == format!("{indent}}}")).map_or(1, |n| n + 2);
        out.push((name, end));
    }
    out
}

#[test]
fn no_function_reaches_80_lines() {
    let mut long = Vec::new();
    for (p, text) in sources() {
        for (name, n) in functions(&text) {
            if n >= 80 {
                long.push(format!("{}::{name} ({n} lines)", short(&p)));
            }
        }
    }
    assert!(long.is_empty(), "split these: {long:?}");
}

/// The top-level module a file belongs to (`order` for src/order/launch.rs).
fn module_of(p: &Path) -> Option<String> {
    let rel = p.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    Some(first.trim_end_matches(".rs").to_owned())
}

#[test]
fn top_level_modules_form_no_cycle() {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (p, text) in sources().iter().filter(|(p, _)| !is_test(p)) {
        let Some(me) = module_of(p) else { continue };
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("use crate::") || l.contains("crate::")) {
            for part in line.split("crate::").skip(1) {
                let target: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !target.is_empty() && target != me && target != "time" {
                    deps.entry(me.clone()).or_default().insert(target);
                }
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(n: &str, deps: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) {
        if done.contains(n) {
            return;
        }
        if let Some(at) = path.iter().position(|x| x == n) {
            panic!("module cycle: {} -> {n}", path[at..].join(" -> "));
        }
        path.push(n.to_owned());
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, path, done);
        }
        path.pop();
        done.insert(n.to_owned());
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        visit(m, &deps, &mut Vec::new(), &mut done);
    }
    assert!(deps.contains_key("order") && deps["order"].contains("reason"), "{deps:?}");
}

#[test]
fn no_reason_or_outcome_word_is_compared_as_a_string_in_the_controller() {
    let words: BTreeSet<String> = Reason::ALL
        .iter()
        .map(|r| r.as_str().to_owned())
        .chain(["Succeeded", "Failed", "Stopped", "FailedStatusDivergence"].map(String::from))
        .collect();
    let mut found = Vec::new();
    for (p, text) in sources().iter().filter(|(p, _)| !is_test(p) && !p.ends_with("reason.rs")) {
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for w in &words {
                let q = format!("\"{w}\"");
                let compared =
                    [format!("== {q}"), format!("!= {q}"), format!("{q} =>"), format!("| {q}"), format!("{q} |")]
                        .iter()
                        .any(|c| line.contains(c.as_str()))
                        || (line.contains(&q)
                            && (line.contains("==") || line.contains("!=") || line.contains("matches!")));
                if compared {
                    found.push(format!("{}:{}: {}", short(p), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "use crate::reason::Reason instead:\n{}", found.join("\n"));
}

#[test]
fn every_reason_is_documented_in_the_operator_guide() {
    let guide = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator.md")).unwrap();
    let begin = "<!-- reasons:begin (generated by `ep-operator reasons`; a test keeps it in sync) -->\n";
    let end = "<!-- reasons:end -->";
    let start = guide.find(begin).expect("docs/operator.md has the reasons table") + begin.len();
    let stop = guide[start..].find(end).expect("the table ends") + start;
    assert_eq!(
        guide[start..stop],
        Reason::markdown_table(),
        "run `ep-operator reasons` and paste it into docs/operator.md"
    );
}
