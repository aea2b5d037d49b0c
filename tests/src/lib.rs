//! Test harness shared by every cross-process test and by `make sandbox`.
//!
//! Everything a test needs is started here, on free ports, and stopped on drop; nothing depends on
//! a service left running by hand.

pub mod authority;
pub mod e2e;
pub mod platform;
pub mod postgres;
pub mod registry;
pub mod sim;
pub mod stack;
pub mod tools;
pub mod volume;

use std::path::PathBuf;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map_or(here.clone(), std::path::Path::to_path_buf)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A harness step failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
