#![allow(clippy::unwrap_used, clippy::expect_used)]

mod claim;
mod decide;
mod fakes;
mod reconcile;
mod store;

/// A time `secs` seconds after a fixed instant.
pub fn t(secs: f64) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    let whole = secs.floor();
    #[allow(clippy::cast_possible_truncation)]
    let nanos = ((secs - whole) * 1e9) as u32;
    #[allow(clippy::cast_possible_truncation)]
    chrono::Utc.timestamp_opt(1_800_000_000 + whole as i64, nanos).unwrap()
}
