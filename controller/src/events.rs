//! The operator's one event recorder: every Event it publishes goes through here, Normal for
//! progress and Warning only for what a person should look at (decided by the reason).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::reason::Reason;

/// Publishes Events for any object.
///
/// kube-runtime's recorder keeps every Event it published in the last minutes (to count repeats
/// as a series) and walks that whole cache on every publish: at a thousand experiments that walk
/// grew with the number of objects. The recorders are sharded by object, so each walk covers a
/// fraction of them; an object's repeats still meet in its one shard.
#[derive(Clone)]
pub struct Events {
    recorders: std::sync::Arc<[Recorder]>,
}

/// Recorder shards.
const SHARDS: usize = 32;

/// The longest note an Event carries (the API server refuses more than 1 KiB).
const MAX_NOTE: usize = 1000;

impl Events {
    pub fn new(client: &kube::Client, identity: &str) -> Self {
        let reporter = Reporter { controller: "ep-operator".into(), instance: Some(identity.to_owned()) };
        Self { recorders: (0..SHARDS).map(|_| Recorder::new(client.clone(), reporter.clone())).collect() }
    }

    fn shard(&self, reference: &ObjectReference) -> &Recorder {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let key = (&reference.uid, &reference.namespace, &reference.name);
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        &self.recorders[usize::try_from(h).unwrap_or_default() % self.recorders.len()]
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
        if let Err(e) = self.shard(reference).publish(&ev, reference).await {
            tracing::debug!(error = %e, %reason, "event not published");
        }
    }
}
