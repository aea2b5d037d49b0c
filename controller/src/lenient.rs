//! Watch streams that survive one malformed object. The controllers watch `Lenient<K>`: an object
//! that does not decode as `K` (a field an older or newer version wrote, a hand edit past the
//! schema) arrives with its metadata and the decode error instead of failing the whole list, so
//! one bad object never stops the others from being reconciled.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An object of kind `K`, or its metadata and why it does not decode as `K`.
#[derive(Clone, Debug)]
pub struct Lenient<K> {
    meta: ObjectMeta,
    pub inner: Result<Arc<K>, String>,
}

impl<K> Lenient<K> {
    /// The decoded object, if it decoded.
    pub fn get(&self) -> Option<&Arc<K>> {
        self.inner.as_ref().ok()
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let meta: ObjectMeta =
            value.get("metadata").and_then(|m| serde_json::from_value(m.clone()).ok()).unwrap_or_default();
        // The path of the offending field makes the error actionable ("spec.image: invalid type").
        let inner = serde_path_to_error::deserialize::<_, K>(value).map(Arc::new).map_err(|e| e.to_string());
        Ok(Self { meta, inner })
    }
}

impl<K: Serialize> Serialize for Lenient<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.inner {
            Ok(k) => k.serialize(s),
            Err(_) => serde_json::json!({"metadata": self.meta}).serialize(s),
        }
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ep_api::Experiment;

    use super::*;

    #[test]
    fn a_malformed_object_keeps_its_metadata_and_the_reason() {
        let list: Vec<Lenient<Experiment>> = serde_json::from_value(serde_json::json!([
            {"apiVersion": "ep.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "bad", "namespace": "ns"},
             "spec": {"image": 7}},
        ]))
        .unwrap();
        assert_eq!(list[0].meta().name.as_deref(), Some("bad"));
        let err = list[0].inner.as_ref().unwrap_err();
        assert!(err.contains("image") || err.contains("entry"), "{err}");
        let good: Lenient<Experiment> =
            serde_json::from_value(serde_json::to_value(crate::fixtures::quickstart()).unwrap()).unwrap();
        assert_eq!(good.get().unwrap().metadata.name.as_deref(), Some("quickstart"));
    }
}
