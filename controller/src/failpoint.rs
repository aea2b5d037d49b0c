//! Named crash points for the crash tests. `EP_CRASH_AT=order.create.after` makes the operator
//! SIGKILL itself the first time it reaches that point, as a power cut would: no destructor, no
//! status write, no shutdown path runs. Unset, a point costs one comparison.

use std::sync::OnceLock;

static AT: OnceLock<Option<String>> = OnceLock::new();

/// The crash points, in the order a run reaches them.
pub const POINTS: &[&str] = &[
    "order.provisioned",
    "order.synced",
    "order.claimed",
    "order.create.before",
    "order.create.after",
    "order.online",
    "order.drain.judged",
    "order.drain.terminated",
];

/// Dies here if `EP_CRASH_AT` names this point.
pub fn hit(point: &str) {
    let at = AT.get_or_init(|| std::env::var("EP_CRASH_AT").ok().filter(|s| !s.is_empty()));
    if at.as_deref() == Some(point) {
        tracing::error!(point, "EP_CRASH_AT: killing the operator here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
