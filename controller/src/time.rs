//! Conversions between chrono (registry, volume files) and Kubernetes `Time` (whole seconds, so
//! status, events and the registry hold the very same instant) or `MicroTime` (phase changes,
//! whose order matters within a second).

use chrono::{DateTime, SubsecRound, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

/// Now, truncated to whole seconds (the precision of Kubernetes timestamps).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0)
}

/// A chrono instant as a Kubernetes `Time`.
pub fn to_k8s(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A Kubernetes `Time` as a chrono instant.
pub fn from_k8s(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), 0).unwrap_or_default()
}

/// Now, to the microsecond.
pub fn precise_now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A chrono instant as a Kubernetes `MicroTime`.
pub fn to_micro(t: DateTime<Utc>) -> MicroTime {
    let micros = t.timestamp_micros();
    MicroTime(Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A Kubernetes `MicroTime` as a chrono instant.
pub fn from_micro(t: &MicroTime) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.0.as_microsecond()).unwrap_or_default()
}
