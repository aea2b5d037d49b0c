#![allow(clippy::unwrap_used, clippy::expect_used)]

mod decide;
mod fakes;
mod reconcile;
mod store;
