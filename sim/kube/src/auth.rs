//! Authentication by static bearer tokens ("Authenticating › Static token file"): `--users FILE`
//! names each user, token and groups; without it every request is an administrator, as before.
//!
//! ```yaml
//! users:
//!   - {name: alice, token: alice-token, groups: ["ep:authors"]}
//!   - {name: "system:serviceaccount:ep-system:ep-operator", token: op-token}
//! ```
//!
//! Every authenticated user is in `system:authenticated`; a service account's name also puts it
//! in `system:serviceaccounts` and `system:serviceaccounts:NAMESPACE`, as the API server's
//! service-account authenticator does.

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::errors::ApiError;

/// The token of the administrator context kube-sim always writes.
pub const ADMIN_TOKEN: &str = "kube-sim";
/// Its user name.
pub const ADMIN_USER: &str = "kube-sim:admin";

/// Who sent a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    fn new(name: &str, groups: &[String]) -> Self {
        let mut all: Vec<String> = groups.to_vec();
        if let Some(ns) = name.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')).map(|(ns, _)| ns)
        {
            all.extend(["system:serviceaccounts".to_owned(), format!("system:serviceaccounts:{ns}")]);
        }
        all.push("system:authenticated".into());
        all.dedup();
        Self { name: name.into(), uid: format!("kube-sim-{name}"), groups: all }
    }

    pub fn admin() -> Self {
        Self::new(ADMIN_USER, &["system:masters".into()])
    }

    /// `system:masters` bypasses authorization, as in Kubernetes.
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }

    /// The `userInfo` of reviews and of admission's `request`.
    pub fn to_json(&self) -> Value {
        json!({"username": self.name, "uid": self.uid, "groups": self.groups})
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserEntry>,
}

/// One user of `--users`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub token: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Token to user; `None` when every request is an administrator.
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    tokens: Option<HashMap<String, UserInfo>>,
    pub users: Vec<UserEntry>,
}

impl Authenticator {
    /// Reads a users file; a user without a name or token, or a token used twice, is refused.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let file: UsersFile =
            serde_saphyr::from_str(&text).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        let mut tokens = HashMap::from([(ADMIN_TOKEN.to_owned(), UserInfo::admin())]);
        for (i, u) in file.users.iter().enumerate() {
            if u.name.is_empty() || u.token.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{}: users[{i}]: name and token must not be empty",
                    path.display()
                )));
            }
            if tokens.insert(u.token.clone(), UserInfo::new(&u.name, &u.groups)).is_some() {
                return Err(std::io::Error::other(format!(
                    "{}: users[{i}] ({}): token already used by another user",
                    path.display(),
                    u.name
                )));
            }
        }
        Ok(Self { tokens: Some(tokens), users: file.users })
    }

    /// Whether requests are authenticated (and therefore authorized).
    pub fn enforcing(&self) -> bool {
        self.tokens.is_some()
    }

    /// The request's user, or 401 for a missing or unknown bearer token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
        let Some(tokens) = &self.tokens else { return Ok(UserInfo::admin()) };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        token.and_then(|t| tokens.get(t)).cloned().ok_or_else(|| ApiError {
            code: 401,
            reason: "Unauthorized",
            message: "Unauthorized".into(),
            details: None,
        })
    }
}

/// Writes a kubeconfig with the administrator context (the default) and one context per user,
/// named after the user, so `kubectl --context alice` acts as alice.
pub fn write_kubeconfig(path: &Path, url: &str, ca_pem: Option<&str>, users: &[UserEntry]) -> std::io::Result<()> {
    let mut entries = vec![("kube-sim".to_owned(), ADMIN_TOKEN.to_owned())];
    entries.extend(users.iter().map(|u| (u.name.clone(), u.token.clone())));
    let users_yaml: Vec<Value> = entries.iter().map(|(n, t)| json!({"name": n, "user": {"token": t}})).collect();
    let contexts: Vec<Value> = entries
        .iter()
        .map(|(n, _)| json!({"name": n, "context": {"cluster": "kube-sim", "user": n, "namespace": "default"}}))
        .collect();
    let mut cluster = json!({"server": url});
    if let Some(pem) = ca_pem {
        use base64::Engine as _;
        cluster["certificate-authority-data"] = base64::engine::general_purpose::STANDARD.encode(pem).into();
    }
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kube-sim", "cluster": cluster}],
        "users": users_yaml, "contexts": contexts, "current-context": "kube-sim",
    });
    // JSON is YAML: kubectl and kube-rs read it as a kubeconfig.
    std::fs::write(path, serde_json::to_string_pretty(&config).map_err(std::io::Error::other)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_users_and_service_accounts_get_their_groups() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("users.yaml");
        std::fs::write(
            &f,
            "users:\n  - {name: alice, token: a, groups: [\"ep:authors\"]}\n  - {name: \"system:serviceaccount:ep-system:op\", token: s}\n",
        )
        .unwrap();
        let auth = Authenticator::from_file(&f).unwrap();
        let with = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            h
        };
        assert_eq!(auth.authenticate(&with("a")).unwrap().groups, ["ep:authors", "system:authenticated"]);
        assert_eq!(
            auth.authenticate(&with("s")).unwrap().groups,
            ["system:serviceaccounts", "system:serviceaccounts:ep-system", "system:authenticated"]
        );
        assert!(auth.authenticate(&with(ADMIN_TOKEN)).unwrap().is_master());
        assert_eq!(auth.authenticate(&with("nope")).unwrap_err().code, 401);
        assert_eq!(auth.authenticate(&HeaderMap::new()).unwrap_err().code, 401);
        std::fs::write(&f, "users:\n  - {name: a, token: t}\n  - {name: b, token: t}\n").unwrap();
        assert!(Authenticator::from_file(&f).unwrap_err().to_string().contains("users[1] (b): token already used"));
    }
}
