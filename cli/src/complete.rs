//! Shell completion. `kubectl ep completion bash|zsh|fish` writes a script for `kubectl-ep`
//! (clap_complete). `kubectl-ep __complete WORDS...` answers kubectl's own completion of
//! `kubectl ep ...` (through `kubectl_complete-ep`) in Cobra's protocol, with the names of the
//! experiments and orders in the namespace.

use std::time::Duration;

use clap::CommandFactory;
use ep_api::{Experiment, RunPodOrder};
use kube::Api;

use crate::orders::{Target, connect};

/// Cobra's directives: complete no file names; or leave it to the shell (file names).
const NO_FILES: &str = ":4";
const FILES: &str = ":0";

/// Subcommands whose first operand names an experiment, and those where an order fits too.
const TAKES_EXPERIMENT: &[&str] = &["approve", "describe", "logs", "pull", "rerun", "stop"];
const TAKES_ORDER: &[&str] = &["approve", "logs", "pull", "stop"];

/// Flags that take a value (the word after them is not an operand).
fn takes_value(flag: &str) -> bool {
    !matches!(
        flag,
        "-y" | "--yes"
            | "-f"
            | "--follow"
            | "--stderr"
            | "--container"
            | "--checkpoints"
            | "--no-follow"
            | "--verify-all"
    ) && !flag.contains('=')
}

/// What to offer after `kubectl ep` + `words` (the last word is the one being completed).
pub async fn complete(words: &[String], target: &Target) {
    let (current, done) = words.split_last().map_or(("", &[][..]), |(c, d)| (c.as_str(), d));
    let cli = crate::Cli::command();
    let (candidates, directive) = match done.split_first() {
        None => {
            (cli.get_subcommands().filter(|c| !c.is_hide_set()).map(|c| c.get_name().to_owned()).collect(), NO_FILES)
        }
        Some((sub, rest)) => {
            if current.starts_with('-') {
                let flags = cli.find_subcommand(sub).map(|c| {
                    c.get_arguments().filter_map(|a| a.get_long().map(|l| format!("--{l}"))).collect::<Vec<_>>()
                });
                (flags.unwrap_or_default(), NO_FILES)
            } else {
                operand(sub, rest, target).await
            }
        }
    };
    for c in candidates.iter().filter(|c| c.starts_with(current)) {
        println!("{c}");
    }
    println!("{directive}");
}

/// Names for the first operand of `sub`, from the cluster; file names for what takes a path.
async fn operand(sub: &str, rest: &[String], target: &Target) -> (Vec<String>, &'static str) {
    let mut operands = 0;
    let mut namespace = None;
    let mut words = rest.iter();
    while let Some(w) = words.next() {
        if w == "-n" || w == "--namespace" {
            namespace = words.next().cloned();
        } else if let Some(ns) = w.strip_prefix("--namespace=") {
            namespace = Some(ns.to_owned());
        } else if w.starts_with('-') {
            if takes_value(w) {
                words.next();
            }
        } else {
            operands += 1;
        }
    }
    if !TAKES_EXPERIMENT.contains(&sub) || operands > 0 {
        return (vec![], if matches!(sub, "run" | "push" | "pull") { FILES } else { NO_FILES });
    }
    let names = tokio::time::timeout(Duration::from_secs(3), async {
        let (client, ns, _) = connect(namespace, target).await.ok()?;
        let mut names: Vec<String> = Api::<Experiment>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|e| e.metadata.name)
            .collect();
        if TAKES_ORDER.contains(&sub)
            && let Ok(orders) = Api::<RunPodOrder>::namespaced(client, &ns).list(&Default::default()).await
        {
            names.extend(orders.items.into_iter().filter_map(|o| o.metadata.name));
        }
        Some(names)
    })
    .await;
    (names.ok().flatten().unwrap_or_default(), NO_FILES)
}
