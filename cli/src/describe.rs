//! `kubectl ep describe EXP`: an experiment's story on one screen: where it stands, who approved
//! it, every attempt with its times, cost and outcome, and every phase change of the experiment
//! and of its orders, in time order.

use ep_api::experiment::AttemptStatus;
use ep_api::{Experiment, RunPodOrder};
use kube::api::ListParams;
use kube::{Api, Client};

use serde::Serialize;

use crate::orders::api_error;
use crate::output::Format;

fn time(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.0.to_string())
}

fn usd(x: Option<f64>) -> String {
    match x {
        Some(x) if x > 0.0 && x < 0.01 => format!("${x:.4}"),
        Some(x) => format!("${x:.2}"),
        None => "-".to_owned(),
    }
}

fn attempt_row(a: &AttemptStatus) -> Vec<String> {
    let took = match (&a.started_at, &a.finished_at) {
        (Some(s), Some(f)) => format!("{}s", f.0.duration_since(s.0).as_secs()),
        _ => "-".to_owned(),
    };
    vec![
        a.attempt.to_string(),
        a.order.clone().unwrap_or_else(|| "-".to_owned()),
        a.pod_id.clone().unwrap_or_else(|| "-".to_owned()),
        time(a.started_at.as_ref()),
        took,
        a.outcome.map_or_else(|| "running".to_owned(), |o| format!("{o:?}")),
        a.reason.clone().unwrap_or_else(|| "-".to_owned()),
        usd(a.cost_usd),
    ]
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str("  ");
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One phase change of the experiment or one of its orders.
#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Moment {
    pub at: String,
    pub object: String,
    pub phase: String,
    pub reason: String,
}

/// Why an order's run did not succeed, in its own words (the outcome message ends with the last
/// lines of stderr).
#[derive(Serialize)]
pub struct Why {
    pub order: String,
    pub outcome: String,
    pub message: String,
}

/// What `kubectl ep describe` tells, as data (`-o json|yaml`) and as text.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Story {
    pub name: String,
    pub namespace: String,
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ep_api::experiment::ApprovalRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    pub attempts: Vec<AttemptStatus>,
    pub timeline: Vec<Moment>,
    pub why: Vec<Why>,
}

/// The story of an experiment and its orders.
pub fn story(exp: &Experiment, orders: &[RunPodOrder]) -> Story {
    let st = exp.status.clone().unwrap_or_default();
    let name = exp.metadata.name.clone().unwrap_or_default();
    let mut timeline: Vec<Moment> = st
        .transitions
        .iter()
        .map(|t| Moment {
            at: t.at.0.to_string(),
            object: format!("experiment/{name}"),
            phase: format!("{:?}", t.phase),
            reason: t.reason.clone().unwrap_or_default(),
        })
        .collect();
    let mut why = vec![];
    for o in orders {
        let oname = o.metadata.name.clone().unwrap_or_default();
        for t in o.status.iter().flat_map(|s| s.transitions.iter()) {
            timeline.push(Moment {
                at: t.at.0.to_string(),
                object: format!("order/{oname}"),
                phase: t.phase.as_str().to_owned(),
                reason: t.reason.clone().unwrap_or_default(),
            });
        }
        let Some(outcome) = o.status.as_ref().and_then(|s| s.outcome.as_ref()) else { continue };
        if let Some(m) = outcome.message.as_ref().filter(|_| outcome.state != ep_api::order::OutcomeState::Succeeded) {
            why.push(Why { order: oname, outcome: format!("{:?}", outcome.state), message: m.clone() });
        }
    }
    timeline.sort();
    Story {
        namespace: exp.metadata.namespace.clone().unwrap_or_default(),
        phase: st.phase.map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}")),
        reason: st.reason.clone(),
        message: st.message.clone(),
        gpu: st.gpu.clone(),
        cost_usd: st.cost_usd,
        progress: st.progress.as_ref().map(|p| p.summary.clone()),
        metrics: st.metrics.clone(),
        approval: st.approval.clone(),
        receipt: st.artifacts.as_ref().map(|a| a.receipt.clone()),
        attempts: st.history.iter().chain(st.current_attempt.iter()).cloned().collect(),
        timeline,
        why,
        name,
    }
}

/// The text of `kubectl ep describe` for an experiment and its orders.
pub fn render(exp: &Experiment, orders: &[RunPodOrder]) -> String {
    let s = story(exp, orders);
    let mut out = format!(
        "Name:       {}\nNamespace:  {}\nPhase:      {}{}\n",
        s.name,
        s.namespace,
        s.phase,
        s.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default(),
    );
    let mut field = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push_str(&format!("{k:<12}{v}\n"));
        }
    };
    field("Message:", s.message.clone());
    field("GPU:", s.gpu.clone());
    field("Cost:", s.cost_usd.map(|c| usd(Some(c))));
    field("Progress:", s.progress.clone());
    field("Metrics:", s.metrics.clone());
    field(
        "Approval:",
        s.approval.as_ref().map(|a| {
            format!(
                "{} at {} (envelope {})",
                a.approved_by,
                a.approved_at.0,
                serde_json::to_string(&a.envelope).unwrap_or_default()
            )
        }),
    );
    field("Receipt:", s.receipt.clone());
    out.push_str("Attempts:\n");
    if s.attempts.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let head = ["#", "ORDER", "POD", "STARTED", "TOOK", "OUTCOME", "REASON", "COST"];
        let mut rows = vec![head.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
        rows.extend(s.attempts.iter().map(attempt_row));
        out.push_str(&table(&rows));
    }
    out.push_str("Timeline:\n");
    let mut rows = vec![vec!["AT".to_owned(), "OBJECT".to_owned(), "PHASE".to_owned(), "REASON".to_owned()]];
    rows.extend(s.timeline.into_iter().map(|m| vec![m.at, m.object, m.phase, m.reason]));
    out.push_str(&table(&rows));
    for w in &s.why {
        out.push_str(&format!("Why order/{} ended {}:\n  {}\n", w.order, w.outcome, w.message));
    }
    out
}

/// Prints the description of experiment `name`.
pub async fn describe(client: Client, ns: &str, name: &str, format: Format) -> Result<(), String> {
    let exp = Api::<Experiment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(api_error)?
        .ok_or_else(|| format!("no Experiment {ns}/{name}"))?;
    let orders = Api::<RunPodOrder>::namespaced(client, ns)
        .list(&ListParams::default().labels(&format!("ep.dev/experiment={name}")))
        .await
        .map_err(api_error)?;
    if format.is_text() {
        print!("{}", render(&exp, &orders.items));
        return Ok(());
    }
    format.print(&story(&exp, &orders.items))
}
