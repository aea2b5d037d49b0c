//! Operator settings: one YAML file (mounted from a ConfigMap), validated, hot reloaded.
//!
//! A settings file that fails to parse or validate never replaces the settings in force; the
//! refusal names the field and is reported (log, reload status, and from there metrics and Events).

mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ep_api::{CloudType, GoDuration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use watch::{Rejection, ReloadStatus, SettingsHandle, SettingsWatcher};

/// The operator's settings file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// How often RunPod is polled (one list call per provider per interval).
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: GoDuration,
    /// How often the runner writes its heartbeat.
    #[serde(default = "defaults::heartbeat_interval")]
    pub heartbeat_interval: GoDuration,
    /// A run whose heartbeat is older than this is lost.
    #[serde(default = "defaults::heartbeat_timeout")]
    pub heartbeat_timeout: GoDuration,
    /// A pod whose runtime has not appeared by then is terminated.
    #[serde(default = "defaults::runtime_start_deadline")]
    pub runtime_start_deadline: GoDuration,
    /// Time left, after a run's maxRuntime and stop grace, to collect its results before the pod's
    /// dead-man's switch (terminateAfter, or the runner's own on REST v2) ends it.
    #[serde(default = "defaults::drain_grace")]
    pub drain_grace: GoDuration,
    /// How much work runs at once.
    #[serde(default)]
    pub concurrency: Concurrency,
    /// GPU aliases authors may use, mapped to RunPod gpu type ids.
    #[serde(default)]
    pub gpu_aliases: BTreeMap<String, String>,
    /// Order policies by canonical name.
    #[serde(default)]
    #[schemars(extend("minProperties" = 1, "propertyNames" = {"pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}))]
    pub policies: BTreeMap<String, Policy>,
    /// Spending limits.
    #[serde(default)]
    pub budgets: Budgets,
    /// What to do with pods the account holds that no order owns.
    #[serde(default)]
    pub orphans: Orphans,
}

mod defaults {
    use ep_api::GoDuration;
    pub fn poll_interval() -> GoDuration {
        GoDuration::from_secs(10)
    }
    pub fn heartbeat_interval() -> GoDuration {
        GoDuration::from_secs(10)
    }
    pub fn heartbeat_timeout() -> GoDuration {
        GoDuration::from_secs(60)
    }
    pub fn runtime_start_deadline() -> GoDuration {
        GoDuration::from_secs(20 * 60)
    }
    pub fn drain_grace() -> GoDuration {
        GoDuration::from_secs(5 * 60)
    }
    pub fn max_lifetime() -> GoDuration {
        GoDuration::from_secs(12 * 3600)
    }
    pub fn terminate_grace() -> GoDuration {
        GoDuration::from_secs(15 * 60)
    }
    pub const fn reconciles() -> u16 {
        4
    }
    pub const fn syncs() -> u16 {
        2
    }
    pub const fn container_disk_gb() -> u32 {
        50
    }
    pub const fn yes() -> bool {
        true
    }
}

/// Concurrency limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Concurrency {
    /// Reconciles running at once per kind.
    #[serde(default = "defaults::reconciles")]
    #[schemars(range(min = 1))]
    pub reconciles: u16,
    /// Payload syncs running at once.
    #[serde(default = "defaults::syncs")]
    #[schemars(range(min = 1))]
    pub syncs: u16,
}

impl Default for Concurrency {
    fn default() -> Self {
        Self { reconciles: defaults::reconciles(), syncs: defaults::syncs() }
    }
}

/// An order policy: how pods of this kind are rented.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Other names that resolve to this policy (e.g. the pipeline's `paper_train`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Cloud tier.
    #[serde(default)]
    pub cloud_type: CloudType,
    /// Container disk size in GB.
    #[serde(default = "defaults::container_disk_gb")]
    #[schemars(range(min = 1, max = 4000))]
    pub container_disk_gb: u32,
    /// Whether an order needs `spec.approved: true` before anything is paid.
    #[serde(default = "defaults::yes")]
    pub requires_approval: bool,
    /// Longest a pod of this policy may live.
    #[serde(default = "defaults::max_lifetime")]
    pub max_lifetime: GoDuration,
    /// Added to the lifetime for RunPod's terminateAfter dead-man's switch.
    #[serde(default = "defaults::terminate_grace")]
    pub terminate_grace: GoDuration,
    /// Highest price in USD per hour this policy accepts.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_cost_per_hour: Option<f64>,
}

/// Spending limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Budgets {
    /// Limits for namespaces without their own entry.
    #[serde(default)]
    pub default: Option<NamespaceBudget>,
    /// Limits per namespace.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceBudget>,
}

/// Limits for one namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceBudget {
    /// USD the namespace may spend per UTC day (reservations of running orders included).
    #[schemars(range(min = 0))]
    pub max_usd_per_day: f64,
    /// USD the namespace may spend per UTC calendar month; none: no monthly bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_usd_per_month: Option<f64>,
    /// GPUs the namespace may hold at once.
    pub max_concurrent_gpus: u32,
}

/// Orphan pod handling.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Orphans {
    /// Report (default) or Terminate.
    #[serde(default)]
    pub action: OrphanAction,
}

/// What to do with a pod no order owns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OrphanAction {
    /// Record it in the registry and the provider's status.
    #[default]
    Report,
    /// Also terminate it.
    Terminate,
}

/// One thing wrong with a settings file, with the path of the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A settings file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings file {path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("settings file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("settings file {path}: {}", join(.errors))]
    Invalid { path: String, errors: Vec<FieldError> },
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// An order policy name that matches no canonical name or alias.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown order policy {name:?}; known policies: {known}")]
pub struct UnknownPolicy {
    pub name: String,
    pub known: String,
}

impl Settings {
    /// Parses and validates a settings document. `path` only names the file in errors.
    pub fn from_yaml(path: &str, text: &str) -> Result<Self, SettingsError> {
        // An empty file is a mistake (a truncated ConfigMap, a wrong mount), never "no policies and
        // no budgets": refusing it keeps the last good settings.
        if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            return Err(SettingsError::Parse {
                path: path.to_owned(),
                message: "the file is empty; it needs at least `policies` (see docs/operator.md)".into(),
            });
        }
        let settings: Self = serde_saphyr::from_str(text)
            .map_err(|e| SettingsError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let errors = settings.validate();
        if errors.is_empty() { Ok(settings) } else { Err(SettingsError::Invalid { path: path.to_owned(), errors }) }
    }

    /// Every problem found, each naming its field. Empty means valid.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |field: String, message: String| errs.push(FieldError { field, message });
        let positive = [
            ("pollInterval", &self.poll_interval),
            ("heartbeatInterval", &self.heartbeat_interval),
            ("heartbeatTimeout", &self.heartbeat_timeout),
            ("runtimeStartDeadline", &self.runtime_start_deadline),
            ("drainGrace", &self.drain_grace),
        ];
        for (field, d) in positive {
            if d.get() == Duration::ZERO {
                err(field.into(), "must be greater than zero".into());
            } else if d.get() < Duration::from_secs(1) {
                // RunPod rate-limits its API; a sub-second poll or heartbeat only burns that budget.
                err(field.into(), format!("{d} is below the floor of 1s"));
            }
        }
        if self.policies.is_empty() {
            err("policies".into(), "no order policy is defined: every order would be refused".into());
        }
        if self.heartbeat_timeout.get() < self.heartbeat_interval.get() * 2 {
            err(
                "heartbeatTimeout".into(),
                format!(
                    "{} is shorter than two heartbeat intervals ({} each): one late heartbeat would fail a healthy run",
                    self.heartbeat_timeout, self.heartbeat_interval
                ),
            );
        }
        if self.concurrency.reconciles == 0 {
            err("concurrency.reconciles".into(), "must be at least 1".into());
        }
        if self.concurrency.syncs == 0 {
            err("concurrency.syncs".into(), "must be at least 1".into());
        }
        for (alias, id) in &self.gpu_aliases {
            if alias.trim().is_empty() {
                err("gpuAliases".into(), "an alias name is empty".into());
            }
            if id.trim().is_empty() {
                err(format!("gpuAliases.{alias}"), "maps to an empty gpu type id".into());
            }
        }
        let mut names: BTreeMap<&str, String> = BTreeMap::new();
        for (name, policy) in &self.policies {
            let at = |f: &str| format!("policies.{name}.{f}");
            if !is_dns_label(name) {
                err(format!("policies.{name}"), "a canonical policy name must be lower case letters, digits and '-' (put other spellings in aliases)".into());
            }
            if let Some(first) = names.insert(name, format!("policy {name}")) {
                err(format!("policies.{name}"), format!("name already used by {first}"));
            }
            for alias in &policy.aliases {
                if let Some(first) = names.insert(alias, format!("policy {name}")) {
                    err(at("aliases"), format!("alias {alias:?} is already used by {first}"));
                }
            }
            if policy.container_disk_gb == 0 || policy.container_disk_gb > 4000 {
                err(at("containerDiskGb"), format!("{} is outside 1..4000", policy.container_disk_gb));
            }
            if policy.max_lifetime.get() == Duration::ZERO {
                err(at("maxLifetime"), "must be greater than zero".into());
            }
            if let Some(c) = policy.max_cost_per_hour.filter(|c| !(c.is_finite() && *c >= 0.0)) {
                err(at("maxCostPerHour"), format!("{c} must be a non-negative number"));
            }
        }
        let budgets = self.budgets.default.iter().map(|b| ("budgets.default".to_owned(), b));
        let per_ns = self.budgets.namespaces.iter().map(|(ns, b)| (format!("budgets.namespaces.{ns}"), b));
        for (field, b) in budgets.chain(per_ns) {
            for (key, v) in [("maxUsdPerDay", Some(b.max_usd_per_day)), ("maxUsdPerMonth", b.max_usd_per_month)] {
                if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                    err(format!("{field}.{key}"), format!("{v} must be a non-negative number"));
                }
            }
        }
        errs
    }

    /// Resolves a policy by canonical name or alias, returning the canonical name too.
    pub fn policy(&self, name: &str) -> Result<(&str, &Policy), UnknownPolicy> {
        self.policies
            .iter()
            .find(|(canonical, p)| canonical.as_str() == name || p.aliases.iter().any(|a| a == name))
            .map(|(c, p)| (c.as_str(), p))
            .ok_or_else(|| UnknownPolicy { name: name.to_owned(), known: self.known_policies() })
    }

    fn known_policies(&self) -> String {
        if self.policies.is_empty() {
            return "none (add one under `policies` in the settings file)".into();
        }
        self.policies
            .iter()
            .map(
                |(n, p)| {
                    if p.aliases.is_empty() { n.clone() } else { format!("{n} (aliases: {})", p.aliases.join(", ")) }
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Maps a GPU alias to its RunPod id; anything else is taken as a RunPod id as written
    /// (it is checked against the live catalog, never against a list kept here).
    pub fn resolve_gpu<'a>(&'a self, name: &'a str) -> &'a str {
        self.gpu_aliases.get(name).map_or(name, String::as_str)
    }

    /// The budget that applies to a namespace.
    pub fn budget_for(&self, namespace: &str) -> Option<&NamespaceBudget> {
        self.budgets.namespaces.get(namespace).or(self.budgets.default.as_ref())
    }

    /// The JSON schema of a settings file (draft 7, every subschema inline), as the chart's
    /// values.schema.json holds it under `settings` so that Helm refuses what the operator would.
    pub fn json_schema() -> serde_json::Value {
        let generator =
            schemars::generate::SchemaSettings::draft07().with(|s| s.inline_subschemas = true).into_generator();
        let mut schema = generator.into_root_schema_for::<Self>().to_value();
        if let Some(o) = schema.as_object_mut() {
            o.remove("$schema");
            o.remove("title");
            o.insert(
                "description".into(),
                "The operator's settings file (docs/settings.md), generated from its types by `make crds`.".into(),
            );
        }
        schema
    }

    /// The settings the operator runs with when no file is given.
    pub fn embedded_default() -> Self {
        // The embedded default is a constant document validated by a unit test.
        Self::from_yaml("<embedded>", EMBEDDED_DEFAULT)
            .unwrap_or_else(|e| unreachable!("embedded settings are invalid: {e}"))
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Hex sha256 of a settings document: the identity used for change detection and the registry.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The settings used by the sandbox and when no file is mounted.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yaml");

#[cfg(test)]
mod tests;
