//! Label and field selectors (`?labelSelector=`, `?fieldSelector=`).

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<Req>);

fn split_top(s: &str) -> Vec<String> {
    // Commas inside `in (a, b)` do not separate requirements.
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or(format!("invalid selector {p:?}"))?;
                Ok(inner.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect())
            };
            if let Some((k, rest)) = p.split_once(" notin ") {
                reqs.push(Req::NotIn(k.trim().into(), set(rest)?));
            } else if let Some((k, rest)) = p.split_once(" in ") {
                reqs.push(Req::In(k.trim().into(), set(rest)?));
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push(Req::Ne(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
            } else if let Some(k) = p.strip_prefix('!') {
                reqs.push(Req::NotExists(k.trim().into()));
            } else {
                reqs.push(Req::Exists(p.into()));
            }
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::Ne(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector (`=`, `==`, `!=`) over the fields the kind allows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `s`, refusing fields `allowed` does not accept, as the API server does.
    pub fn parse(s: &str, allowed: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = p.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector {p:?}"));
            };
            if !allowed(k.trim()) {
                return Err(format!("field label not supported: {}", k.trim()));
            }
            out.push((k.trim().to_owned(), eq, v.trim().to_owned()));
        }
        Ok(Self(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| {
            let found = k.split('.').try_fold(obj, |o, part| o.get(part));
            let actual = match found {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *v) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_follow_the_documented_grammar() {
        let o = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "ep", "tier": "gpu"}}});
        for (sel, want) in [
            ("app=ep", true),
            ("app==ep", true),
            ("app!=ep", false),
            ("tier in (gpu, cpu)", true),
            ("tier notin (gpu)", false),
            ("app,tier", true),
            ("!missing", true),
            ("app=ep,tier=cpu", false),
            ("", true),
        ] {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&o), want, "{sel}");
        }
        let meta = |f: &str| f.starts_with("metadata.");
        assert!(FieldSelector::parse("metadata.name=a", &meta).unwrap().matches(&o));
        assert!(!FieldSelector::parse("metadata.namespace!=ns", &meta).unwrap().matches(&o));
        assert!(FieldSelector::parse("spec.x=1", &meta).is_err());
        let ev = json!({"involvedObject": {"name": "exp-1", "kind": "Experiment"}});
        let any = |_: &str| true;
        assert!(
            FieldSelector::parse("involvedObject.name=exp-1,involvedObject.kind=Experiment", &any)
                .unwrap()
                .matches(&ev)
        );
    }
}
