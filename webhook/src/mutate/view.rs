//! Lean views of the admitted objects: only the fields the mutations read, decoded in the same
//! pass as the review, everything else skipped unparsed (only `vmdisk.io/` labels and
//! annotations are kept). Parsing whole typed objects was most of the webhook's per-request
//! cost.
//!
//! `Option` presence in a view mirrors presence in the raw JSON (absent or `null` both read as
//! `None`), which is what the patch builders rely on to address existing parents only.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, PersistentVolumeClaimSpec, TypedLocalObjectReference, TypedObjectReference, Volume,
};
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// Accepts a JSON object or null, never an array: serde's derived structs also accept
/// sequences, and a patch addressing members of an array-valued `metadata` would not apply.
fn object_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    struct ObjectOrNull<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOrNull<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(ObjectOrNull(PhantomData))
}

/// Keys of labels and annotations the mutations read; others are skipped unparsed (a PVC's
/// `last-applied-configuration` annotation alone can be most of the request).
const RELEVANT_KEY_PREFIX: &str = "vmdisk.io/";

/// A labels or annotations map keeping only `vmdisk.io/` keys. Presence is kept: an object
/// with no relevant key reads as `Some(empty)`, null or absent as `None`.
fn relevant_entries<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct RelevantKey;
    impl<'de> DeserializeSeed<'de> for RelevantKey {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for RelevantKey {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string key")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.starts_with(RELEVANT_KEY_PREFIX).then(|| v.to_string()))
        }
    }
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of strings or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key_seed(RelevantKey)? {
                match key {
                    Some(k) => {
                        out.insert(k, map.next_value::<String>()?);
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(Entries)
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct MetaView {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only `vmdisk.io/` keys.
    #[serde(default, deserialize_with = "relevant_entries")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Only `vmdisk.io/` keys.
    #[serde(default, deserialize_with = "relevant_entries")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl MetaView {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }
}

/// A PersistentVolumeClaim as the PVC mutation sees it.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct PvcView {
    #[serde(default, deserialize_with = "object_or_null")]
    pub metadata: Option<MetaView>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub spec: Option<PvcSpecView>,
}

/// The parts of a PVC spec the mutation reads or patches.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PvcSpecView {
    #[serde(default)]
    pub access_modes: Option<Vec<String>>,
    #[serde(default)]
    pub data_source: Option<TypedLocalObjectReference>,
    #[serde(default)]
    pub data_source_ref: Option<TypedObjectReference>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub resources: Option<ResourcesView>,
    #[serde(default)]
    pub storage_class_name: Option<String>,
    #[serde(default)]
    pub volume_mode: Option<String>,
}

/// `spec.resources`: only whether `requests` is there, and its `storage`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct ResourcesView {
    #[serde(default, deserialize_with = "object_or_null")]
    pub requests: Option<RequestsView>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct RequestsView {
    #[serde(default)]
    pub storage: Option<String>,
}

/// Where a PVC spec names its data sources: the admitted view, or a typed spec (a claim
/// template, a PVC in the catalog).
pub trait DataSources {
    fn data_source_ref(&self) -> Option<&TypedObjectReference>;
    fn data_source(&self) -> Option<&TypedLocalObjectReference>;
}

impl DataSources for PvcSpecView {
    fn data_source_ref(&self) -> Option<&TypedObjectReference> {
        self.data_source_ref.as_ref()
    }
    fn data_source(&self) -> Option<&TypedLocalObjectReference> {
        self.data_source.as_ref()
    }
}

impl DataSources for PersistentVolumeClaimSpec {
    fn data_source_ref(&self) -> Option<&TypedObjectReference> {
        self.data_source_ref.as_ref()
    }
    fn data_source(&self) -> Option<&TypedLocalObjectReference> {
        self.data_source.as_ref()
    }
}

/// The part of a pod spec the affinity mutation reads.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct PodSpecView {
    #[serde(default)]
    pub volumes: Option<Vec<Volume>>,
    #[serde(default)]
    pub affinity: Option<Affinity>,
}

/// A Pod as the affinity mutation sees it.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct PodView {
    #[serde(default, deserialize_with = "object_or_null")]
    pub spec: Option<PodSpecView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_not_objects() {
        assert!(serde_json::from_str::<PvcView>(r#"{"metadata": []}"#).is_err());
        assert!(serde_json::from_str::<PodView>(r#"{"spec": [1]}"#).is_err());
        let v: PvcView = serde_json::from_str(r#"{"metadata": null, "spec": {}}"#).unwrap();
        assert!(v.metadata.is_none() && v.spec.is_some());
    }

    #[test]
    fn only_vmdisk_entries_are_kept_and_presence_is_preserved() {
        let v: PvcView = serde_json::from_str(
            r#"{"metadata": {"labels": {"app": "x"}, "annotations": {"vmdisk.io/image": "f", "big": {"nested": [1]}}}}"#,
        )
        .unwrap();
        let m = v.metadata.unwrap();
        assert_eq!(m.labels, Some(BTreeMap::new()));
        assert_eq!(m.annotation("vmdisk.io/image"), Some("f"));
        assert_eq!(m.annotations.unwrap().len(), 1);
        let v: PvcView = serde_json::from_str(r#"{"metadata": {"labels": null}}"#).unwrap();
        assert_eq!(v.metadata.unwrap().labels, None);
        assert!(serde_json::from_str::<PvcView>(
            r#"{"metadata": {"labels": {"vmdisk.io/image": 5}}}"#
        )
        .is_err());
    }
}
