//! The operator's one event recorder: every Event it publishes goes through here, Normal for
//! progress and Warning only for what a person should look at (decided by the reason).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::reason::Reason;

/// Publishes Events for any object.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

/// The longest note an Event carries (the API server refuses more than 1 KiB).
const MAX_NOTE: usize = 1000;

impl Events {
    pub fn new(client: kube::Client, identity: &str) -> Self {
        let reporter = Reporter { controller: "ep-operator".into(), instance: Some(identity.to_owned()) };
        Self { recorder: Recorder::new(client, reporter) }
    }

    /// Publishes one Event; its type follows the reason. A failure to publish is logged, never fatal.
    pub async fn publish(&self, reference: &ObjectReference, reason: Reason, action: &str, note: &str) {
        let ev = Event {
            type_: if reason.is_warning() { EventType::Warning } else { EventType::Normal },
            reason: reason.as_str().to_owned(),
            note: Some(note.chars().take(MAX_NOTE).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::debug!(error = %e, %reason, "event not published");
        }
    }
}
