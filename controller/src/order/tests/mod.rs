#![allow(clippy::unwrap_used, clippy::expect_used)]

mod claim;
mod decide;
mod fakes;
mod reconcile;
mod store;
