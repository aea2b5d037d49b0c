//! `kube-sim`: an in-memory Kubernetes API server for tests and the local sandbox.
//!
//! It serves discovery, OpenAPI v3, CRUD, list and watch with resource versions, the status
//! subresource, optimistic concurrency, merge / JSON / apply patches, finalizers, owner-reference
//! garbage collection, CRD registration with structural schema validation, defaults and CEL, and
//! Table output from printer columns, so that kube-rs and kubectl 1.35 work against it as they
//! are. Production always runs on a real cluster; see README.md for what this does less of.

pub mod admission;
pub mod auth;
pub mod builtin;
pub mod errors;
pub mod fields;
pub mod http;
pub mod protobuf;
pub mod rbac;
pub mod registry;
pub mod selectors;
pub mod store;
pub mod table;
pub mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use tokio::task::JoinHandle;

/// How to start a kube-sim.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    /// Where to write a kubeconfig for kubectl and kube-rs.
    pub kubeconfig_out: Option<PathBuf>,
    /// CRD manifests (YAML, one or more documents per file) to load at start.
    pub crds: Option<PathBuf>,
    /// Watch events kept for resuming watches; older resource versions get 410 Gone.
    pub history: usize,
    /// Append every resource request to this file as a JSON line (verb, apiGroup, resource,
    /// subresource, namespace, name, userAgent), e.g. to check RBAC rules against real calls.
    pub audit_log: Option<PathBuf>,
    /// Users, tokens and groups (see [`auth`]); with it every request is authenticated and
    /// authorized by RBAC, without it everyone is an administrator.
    pub users: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig_out: None,
            crds: None,
            history: store::HISTORY,
            audit_log: None,
            users: None,
        }
    }
}

/// A running server; stops when dropped.
pub struct RunningKubeSim {
    pub addr: SocketAddr,
    pub url: String,
    /// The CA (PEM) of the serving certificate when kube-sim serves HTTPS (with `--users`).
    pub ca_pem: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub state: http::Shared,
    task: JoinHandle<()>,
}

impl RunningKubeSim {
    /// A kube client for this server.
    pub fn client(&self) -> Result<kube::Client, Box<dyn std::error::Error + Send + Sync>> {
        let url: axum::http::Uri = self.url.parse()?;
        Ok(kube::Client::try_from(kube::Config::new(url))?)
    }
}

impl Drop for RunningKubeSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes a kubeconfig pointing at `url` with the administrator's context `kube-sim` (the
/// default); [`auth::write_kubeconfig`] adds one context per user.
pub fn write_kubeconfig(path: &Path, url: &str) -> std::io::Result<()> {
    auth::write_kubeconfig(path, url, None, &[])
}

/// Loads every CRD document found in `dir`'s `.yaml`/`.yml`/`.json` files.
fn load_crds(state: &http::Shared, dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
    {
        let text = std::fs::read_to_string(&path)?;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        let mut api = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(res) = api.registry.get("apiextensions.k8s.io", "v1", "customresourcedefinitions").cloned() else {
            continue;
        };
        for doc in docs.into_iter().filter(|d| d["kind"] == "CustomResourceDefinition") {
            api.create(&res, "", doc, &store::WriteOptions::default())
                .map_err(|e| std::io::Error::other(format!("{}: {}", path.display(), e.message)))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Starts a kube-sim.
pub async fn start(opts: Options) -> std::io::Result<RunningKubeSim> {
    let mut st = store::State::new(opts.history);
    if let Some(path) = &opts.audit_log {
        st.audit = Some(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    }
    if let Some(path) = &opts.users {
        st.auth = auth::Authenticator::from_file(path)?;
    }
    let users = st.auth.users.clone();
    let state: http::Shared = Arc::new(Mutex::new(st));
    if let Some(dir) = &opts.crds {
        load_crds(&state, dir)?;
    }
    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    // Users mean tokens, and tokens travel only over TLS.
    let tls = if opts.users.is_some() { Some(tls::generate(addr)?) } else { None };
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
    if let Some(path) = &opts.kubeconfig_out {
        auth::write_kubeconfig(path, &url, ca_pem.as_deref(), &users)?;
    }
    let app = Router::new().fallback(http::dispatch).with_state(state.clone());
    let task = match tls {
        Some(t) => tokio::spawn(tls::serve(listener, t.acceptor, app)),
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "kube-sim listener stopped");
            }
        }),
    };
    Ok(RunningKubeSim { addr, url, ca_pem, kubeconfig: opts.kubeconfig_out, state, task })
}
