//! `kubectl ep describe EXP`: an experiment's story on one screen: where it stands, who approved
//! it, every attempt with its times, cost and outcome, and every phase change of the experiment
//! and of its orders, in time order.

use ep_api::experiment::AttemptStatus;
use ep_api::{Experiment, RunPodOrder};
use kube::api::ListParams;
use kube::{Api, Client};

use crate::orders::api_error;

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

/// The text of `kubectl ep describe` for an experiment and its orders.
pub fn render(exp: &Experiment, orders: &[RunPodOrder]) -> String {
    let st = exp.status.clone().unwrap_or_default();
    let name = exp.metadata.name.clone().unwrap_or_default();
    let mut out = format!(
        "Name:       {name}\nNamespace:  {}\nPhase:      {}{}\n",
        exp.metadata.namespace.clone().unwrap_or_default(),
        st.phase.map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}")),
        st.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default(),
    );
    let mut field = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push_str(&format!("{k:<12}{v}\n"));
        }
    };
    field("Message:", st.message.clone());
    field("GPU:", st.gpu.clone());
    field("Cost:", st.cost_usd.map(|c| usd(Some(c))));
    field("Progress:", st.progress.as_ref().map(|p| p.summary.clone()));
    field("Metrics:", st.metrics.clone());
    field(
        "Approval:",
        st.approval.as_ref().map(|a| {
            format!(
                "{} at {} (envelope {})",
                a.approved_by,
                a.approved_at.0,
                serde_json::to_string(&a.envelope).unwrap_or_default()
            )
        }),
    );
    field("Receipt:", st.artifacts.as_ref().map(|a| a.receipt.clone()));
    let attempts: Vec<&AttemptStatus> = st.history.iter().chain(st.current_attempt.iter()).collect();
    out.push_str("Attempts:\n");
    if attempts.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let head = ["#", "ORDER", "POD", "STARTED", "TOOK", "OUTCOME", "REASON", "COST"];
        let mut rows = vec![head.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
        rows.extend(attempts.iter().map(|a| attempt_row(a)));
        out.push_str(&table(&rows));
    }
    let mut events: Vec<(String, String, String, String)> = st
        .transitions
        .iter()
        .map(|t| {
            (
                t.at.0.to_string(),
                format!("experiment/{name}"),
                format!("{:?}", t.phase),
                t.reason.clone().unwrap_or_default(),
            )
        })
        .collect();
    for o in orders {
        let oname = o.metadata.name.clone().unwrap_or_default();
        for t in o.status.iter().flat_map(|s| s.transitions.iter()) {
            events.push((
                t.at.0.to_string(),
                format!("order/{oname}"),
                t.phase.as_str().to_owned(),
                t.reason.clone().unwrap_or_default(),
            ));
        }
    }
    events.sort();
    out.push_str("Timeline:\n");
    let mut rows = vec![vec!["AT".to_owned(), "OBJECT".to_owned(), "PHASE".to_owned(), "REASON".to_owned()]];
    rows.extend(events.into_iter().map(|(a, b, c, d)| vec![a, b, c, d]));
    out.push_str(&table(&rows));
    // A failed attempt's own words: the outcome message ends with the last lines of stderr.
    for o in orders {
        let Some(outcome) = o.status.as_ref().and_then(|s| s.outcome.as_ref()) else { continue };
        if let Some(m) = outcome.message.as_ref().filter(|_| outcome.state != ep_api::order::OutcomeState::Succeeded) {
            out.push_str(&format!(
                "Why order/{} ended {:?}:\n  {m}\n",
                o.metadata.name.clone().unwrap_or_default(),
                outcome.state
            ));
        }
    }
    out
}

/// Prints the description of experiment `name`.
pub async fn describe(client: Client, ns: &str, name: &str) -> Result<(), String> {
    let exp = Api::<Experiment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(api_error)?
        .ok_or_else(|| format!("no Experiment {ns}/{name}"))?;
    let orders = Api::<RunPodOrder>::namespaced(client, ns)
        .list(&ListParams::default().labels(&format!("ep.dev/experiment={name}")))
        .await
        .map_err(api_error)?;
    print!("{}", render(&exp, &orders.items));
    Ok(())
}
