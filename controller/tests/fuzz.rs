//! The parsers of everything a run, a script or a person hands the operator, fuzzed on stable Rust:
//! each seed of `tests/corpus` is mutated (bytes flipped, inserted, deleted, truncated, spliced with
//! JSON and YAML tokens) and every parser must answer with a value or an error naming its file,
//! never a panic; what parses must survive a round trip. `EP_FUZZ_CASES` raises the number of cases
//! (CI runs the default; a longer run is `EP_FUZZ_CASES=200000 cargo test -p ep-operator --test fuzz`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ep_api::volume::{self, Heartbeat, PayloadManifest, Progress, Results, RunSpec, Terminal, keys};
use ep_operator::settings::Settings;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Tokens that steer mutations into the interesting corners of JSON, YAML and our formats.
const TOKENS: &[&str] = &[
    "NaN",
    "-Infinity",
    "Infinity",
    "null",
    "\"",
    "\\",
    "\\u0000",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "1e309",
    "-0",
    "18446744073709551616",
    "\"version\": 2",
    "'",
    "&a",
    "*a",
    "!!binary",
    "~",
    "\n  ",
    "- ",
    ": {",
    "\u{feff}",
];

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(name)).unwrap()
}

#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, usize),
    Delete(usize, usize),
    Truncate(usize),
    Repeat(usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let one = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(i, t)| Edit::Insert(i, t)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ];
    proptest::collection::vec(one, 0..6)
}

fn mutate(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match *e {
            Edit::Flip(i, x) if !b.is_empty() => {
                let i = i % b.len();
                b[i] ^= x;
            }
            Edit::Flip(..) => {}
            Edit::Insert(i, t) => {
                let i = at(i, b.len());
                b.splice(i..i, TOKENS[t].bytes());
            }
            Edit::Delete(i, n) => {
                let i = at(i, b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Edit::Truncate(i) => b.truncate(at(i, b.len())),
            Edit::Repeat(i, n) => {
                let i = at(i, b.len());
                let end = (i + n).min(b.len());
                let part = b[i..end].to_vec();
                b.splice(i..i, part);
            }
        }
    }
    b
}

fn cases() -> u32 {
    std::env::var("EP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

/// Runs `check` on the seed and on `cases()` mutations of it.
fn fuzz(name: &str, check: impl Fn(&[u8]) -> Result<(), TestCaseError>) {
    let base = seed(name);
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let result = runner.run(&edits(), |e| check(&mutate(base.clone(), &e)));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// A versioned run file: parses to a value that round-trips, or to an error naming the file.
fn versioned<T>(name: &'static str)
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + volume::Versioned + PartialEq + std::fmt::Debug,
{
    let seed_value: Result<T, _> = volume::parse(name, &seed(name));
    assert!(seed_value.is_ok(), "the {name} seed is valid: {seed_value:?}");
    fuzz(name, |bytes| {
        match volume::parse::<T>(name, bytes) {
            Ok(v) => {
                let again: T = volume::parse(name, &serde_json::to_vec(&v).unwrap())
                    .map_err(|e| TestCaseError::fail(format!("round trip: {e}")))?;
                prop_assert_eq!(again, v);
            }
            Err(e) => prop_assert!(e.to_string().contains(name), "error does not name {}: {}", name, e),
        }
        Ok(())
    });
}

#[test]
fn run_files_never_panic_and_round_trip() {
    versioned::<Heartbeat>(keys::HEARTBEAT);
    versioned::<Terminal>(keys::TERMINAL);
    versioned::<RunSpec>(keys::SPEC);
    versioned::<PayloadManifest>("manifest.json");
}

#[test]
fn results_yield_finite_metrics_or_a_reason() {
    let required = ["f1".to_owned(), "auc".to_owned()];
    let r = Results::parse(&seed("results.json")).unwrap();
    assert_eq!(r.metrics(&required).unwrap().len(), 3, "f1, auc, epochs; NaN and Infinity dropped");
    fuzz("results.json", |bytes| {
        if let Ok(r) = Results::parse(bytes) {
            match r.metrics(&required) {
                Ok(m) => prop_assert!(m.values().all(|v| v.is_finite()), "{:?}", m),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }
        Ok(())
    });
}

#[test]
fn progress_parses_or_is_ignored() {
    assert!(serde_json::from_slice::<Progress>(&seed("progress.json")).is_ok());
    fuzz("progress.json", |bytes| {
        if let Ok(p) = serde_json::from_slice::<Progress>(bytes) {
            let again: Progress = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
            prop_assert_eq!(again.step, p.step);
        }
        Ok(())
    });
}

#[test]
fn settings_are_valid_or_refused_with_the_file_named() {
    let text = String::from_utf8(seed("settings.yaml")).unwrap();
    assert!(Settings::from_yaml("settings.yaml", &text).is_ok());
    fuzz("settings.yaml", |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match Settings::from_yaml("settings.yaml", &text) {
            Ok(s) => prop_assert!(s.validate().is_empty() && !s.policies.is_empty()),
            Err(e) => prop_assert!(e.to_string().contains("settings.yaml"), "{}", e),
        }
        Ok(())
    });
}
