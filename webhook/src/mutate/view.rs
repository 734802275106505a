//! Lean views of the admitted objects: only the fields the mutations read, read in the same
//! pass as the review ([`crate::json_reader`]), everything else skipped (only `vmdisk.io/`
//! labels and annotations are kept; specs go through serde in place). Parsing whole typed
//! objects was most of the webhook's per-request cost.
//!
//! `Option` presence in a view mirrors presence in the raw JSON (absent or `null` both read as
//! `None`), which is what the patch builders rely on to address existing parents only.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, PersistentVolumeClaimSpec, TypedLocalObjectReference, TypedObjectReference, Volume,
};
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::admission::ObjectView;
use crate::json_reader::{entries_with_prefix, set_once, JsonReader, ReadError};

/// Keys of labels and annotations the mutations read; others are skipped unparsed (a PVC's
/// `last-applied-configuration` annotation alone can be most of the request).
const RELEVANT_KEY_PREFIX: &str = "vmdisk.io/";

#[derive(Debug, Default, Clone, PartialEq)]
pub struct MetaView {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// Only `vmdisk.io/` keys.
    pub labels: Option<BTreeMap<String, String>>,
    /// Only `vmdisk.io/` keys.
    pub annotations: Option<BTreeMap<String, String>>,
}

impl MetaView {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn read(r: &mut JsonReader<'_>) -> Result<Self, ReadError> {
        let (mut name, mut namespace, mut labels, mut annotations) = (None, None, None, None);
        let mut cursor = r.object("an object or null")?;
        while let Some(key) = r.next_key(&mut cursor)? {
            match &*key {
                "name" => set_once(r, &mut name, "name", JsonReader::optional_string)?,
                "namespace" => {
                    set_once(r, &mut namespace, "namespace", JsonReader::optional_string)?
                }
                "labels" => set_once(r, &mut labels, "labels", |r| {
                    entries_with_prefix(r, RELEVANT_KEY_PREFIX)
                })?,
                "annotations" => set_once(r, &mut annotations, "annotations", |r| {
                    entries_with_prefix(r, RELEVANT_KEY_PREFIX)
                })?,
                _ => r.skip_value()?,
            }
        }
        Ok(MetaView {
            name: name.flatten().map(Into::into),
            namespace: namespace.flatten().map(Into::into),
            labels: labels.flatten(),
            annotations: annotations.flatten(),
        })
    }
}

/// An object or null, never an array: a patch addressing members of an array-valued
/// `metadata` would not apply.
fn object_or_null<'a, T>(
    r: &mut JsonReader<'a>,
    read: impl FnOnce(&mut JsonReader<'a>) -> Result<T, ReadError>,
) -> Result<Option<T>, ReadError> {
    match r.peek()? {
        b'n' => r.null().map(|_| None),
        b'{' => read(r).map(Some),
        _ => {
            // Let the reader name what it found.
            r.object("an object or null").map(|_| None)
        }
    }
}

/// [`object_or_null`] for fields serde decodes: its derived structs also accept sequences.
fn deserialize_object_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
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

/// A value (object or null) serde decodes in place.
fn serde_object_or_null<T: DeserializeOwned>(
    r: &mut JsonReader<'_>,
) -> Result<Option<T>, ReadError> {
    object_or_null(r, JsonReader::serde)
}

/// Reads an object's `metadata` and `spec` with the given readers, skipping the rest.
fn read_object<'a, M, S>(
    r: &mut JsonReader<'a>,
    metadata: impl FnOnce(&mut JsonReader<'a>) -> Result<Option<M>, ReadError>,
    spec: impl FnOnce(&mut JsonReader<'a>) -> Result<Option<S>, ReadError>,
) -> Result<(Option<M>, Option<S>), ReadError> {
    let (mut meta, mut sp) = (None, None);
    let (mut metadata, mut spec) = (Some(metadata), Some(spec));
    let mut cursor = r.object("an object")?;
    while let Some(key) = r.next_key(&mut cursor)? {
        match &*key {
            "metadata" => match metadata.take() {
                Some(read) => meta = read(r)?,
                None => return Err(r.wrong_type("duplicate field `metadata`")),
            },
            "spec" => match spec.take() {
                Some(read) => sp = read(r)?,
                None => return Err(r.wrong_type("duplicate field `spec`")),
            },
            _ => r.skip_value()?,
        }
    }
    Ok((meta, sp))
}

/// A PersistentVolumeClaim as the PVC mutation sees it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PvcView {
    pub metadata: Option<MetaView>,
    pub spec: Option<PvcSpecView>,
}

impl ObjectView<'_> for PvcView {
    fn read(r: &mut JsonReader<'_>) -> Result<Self, ReadError> {
        let (metadata, spec) = read_object(
            r,
            |r| object_or_null(r, MetaView::read),
            serde_object_or_null,
        )?;
        Ok(Self { metadata, spec })
    }
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
    #[serde(default, deserialize_with = "deserialize_object_or_null")]
    pub resources: Option<ResourcesView>,
    #[serde(default)]
    pub storage_class_name: Option<String>,
    #[serde(default)]
    pub volume_mode: Option<String>,
}

/// `spec.resources`: only whether `requests` is there, and its `storage`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct ResourcesView {
    #[serde(default, deserialize_with = "deserialize_object_or_null")]
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
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PodView {
    pub spec: Option<PodSpecView>,
}

impl ObjectView<'_> for PodView {
    fn read(r: &mut JsonReader<'_>) -> Result<Self, ReadError> {
        let (_, spec) = read_object(
            r,
            |r| r.skip_value().map(|_| None::<()>),
            serde_object_or_null,
        )?;
        Ok(Self { spec })
    }
}

/// Reads a view from an object's JSON text (tests and tools; admission reads it in place).
pub fn view_from_json<'a, V: ObjectView<'a>>(text: &'a str) -> Result<V, ReadError> {
    let mut r = JsonReader::new(text);
    let view = V::read(&mut r)?;
    r.finish()?;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_not_objects() {
        assert!(view_from_json::<PvcView>(r#"{"metadata": []}"#).is_err());
        assert!(view_from_json::<PodView>(r#"{"spec": [1]}"#).is_err());
        assert!(view_from_json::<PvcView>(r#"{"spec": {"resources": []}}"#).is_err());
        let v: PvcView = view_from_json(r#"{"metadata": null, "spec": {}}"#).unwrap();
        assert!(v.metadata.is_none() && v.spec.is_some());
    }

    #[test]
    fn only_vmdisk_entries_are_kept_and_presence_is_preserved() {
        let v: PvcView = view_from_json(
            r#"{"metadata": {"labels": {"app": "x"}, "annotations": {"vmdisk.io/image": "f", "big": {"nested": [1]}}}}"#,
        )
        .unwrap();
        let m = v.metadata.unwrap();
        assert_eq!(m.labels, Some(BTreeMap::new()));
        assert_eq!(m.annotation("vmdisk.io/image"), Some("f"));
        assert_eq!(m.annotations.unwrap().len(), 1);
        let v: PvcView = view_from_json(r#"{"metadata": {"labels": null}}"#).unwrap();
        assert_eq!(v.metadata.unwrap().labels, None);
        assert!(matches!(
            view_from_json::<PvcView>(r#"{"metadata": {"labels": {"vmdisk.io/image": 5}}}"#),
            Err(ReadError::Type(_))
        ));
    }

    #[test]
    fn repeated_fields_are_refused_and_unread_ones_skipped() {
        for twice in [
            r#"{"metadata": {}, "metadata": {}}"#,
            r#"{"spec": {}, "spec": {}}"#,
            r#"{"metadata": {"name": "a", "name": "b"}}"#,
            r#"{"metadata": {"annotations": {}, "annotations": {}}}"#,
        ] {
            match view_from_json::<PvcView>(twice) {
                Err(ReadError::Type(why)) => assert!(why.contains("duplicate field"), "{why}"),
                other => panic!("{twice}: {other:?}"),
            }
        }
        let v: PvcView = view_from_json(
            r#"{"kind": "PersistentVolumeClaim", "status": {"phase": "Pending"}, "metadata": {"name": "n\u0041", "managedFields": [{"f:spec": {}}]}, "spec": {"volumeMode": "Block"}}"#,
        )
        .unwrap();
        assert_eq!(v.metadata.unwrap().name.as_deref(), Some("nA"));
        assert_eq!(v.spec.unwrap().volume_mode.as_deref(), Some("Block"));
        assert!(matches!(
            view_from_json::<PvcView>(r#"{"status": {"phase": }}"#),
            Err(ReadError::Syntax(_))
        ));
    }
}
