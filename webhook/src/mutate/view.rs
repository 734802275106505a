//! Lean views of the admitted objects: only the fields the mutations read, read in the same
//! pass as the review ([`crate::json_reader`]) and borrowed from the body, everything else
//! skipped (only `vmdisk.io/` labels and annotations are kept; the PVC spec is read field by
//! field, the pod spec and data source references go through serde in place). Parsing whole
//! typed objects was most of the webhook's per-request cost.
//!
//! `Option` presence in a view mirrors presence in the raw JSON (absent or `null` both read as
//! `None`), which is what the patch builders rely on to address existing parents only.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{
    Affinity, PersistentVolumeClaimSpec, TypedLocalObjectReference, TypedObjectReference, Volume,
};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::admission::ObjectView;
use crate::json_reader::{entries_with_prefix, set_once, Entries, JsonReader, ReadError};

/// Keys of labels and annotations the mutations read; others are skipped unparsed (a PVC's
/// `last-applied-configuration` annotation alone can be most of the request).
const RELEVANT_KEY_PREFIX: &str = "vmdisk.io/";

/// The value of `key` among `vmdisk.io/` entries (a repeated key: the last one counts, as in a
/// map).
fn entry<'e>(entries: Option<&'e Entries<'_>>, key: &str) -> Option<&'e str> {
    let (_, value) = entries?.iter().rev().find(|(k, _)| k == key)?;
    Some(value)
}

/// The metadata the mutations read: `vmdisk.io/` labels and annotations, borrowed from the
/// request body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MetaView<'a> {
    /// Only `vmdisk.io/` keys.
    pub labels: Option<Entries<'a>>,
    /// Only `vmdisk.io/` keys.
    pub annotations: Option<Entries<'a>>,
}

impl<'a> MetaView<'a> {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        entry(self.annotations.as_ref(), key)
    }
    pub fn label(&self, key: &str) -> Option<&str> {
        entry(self.labels.as_ref(), key)
    }

    fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError> {
        let (mut labels, mut annotations) = (None, None);
        let mut cursor = r.object("an object or null")?;
        while let Some(key) = r.next_key(&mut cursor)? {
            match &*key {
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
pub struct PvcView<'a> {
    pub metadata: Option<MetaView<'a>>,
    pub spec: Option<PvcSpecView<'a>>,
}

impl<'a> ObjectView<'a> for PvcView<'a> {
    fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError> {
        let (metadata, spec) = read_object(
            r,
            |r| object_or_null(r, MetaView::read),
            |r| object_or_null(r, PvcSpecView::read),
        )?;
        Ok(Self { metadata, spec })
    }
}

/// The parts of a PVC spec the mutation reads or patches; strings borrow from the body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PvcSpecView<'a> {
    pub access_modes: Option<Vec<Cow<'a, str>>>,
    /// Boxed: rarely there, and a view is moved a few times while it is read.
    pub data_source: Option<Box<TypedLocalObjectReference>>,
    pub data_source_ref: Option<Box<TypedObjectReference>>,
    pub resources: Option<ResourcesView<'a>>,
    pub storage_class_name: Option<Cow<'a, str>>,
    pub volume_mode: Option<Cow<'a, str>>,
}

impl<'a> PvcSpecView<'a> {
    fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError> {
        let (mut access_modes, mut data_source, mut data_source_ref) = (None, None, None);
        let (mut resources, mut storage_class_name, mut volume_mode) = (None, None, None);
        let mut cursor = r.object("an object or null")?;
        while let Some(key) = r.next_key(&mut cursor)? {
            match &*key {
                "accessModes" => set_once(
                    r,
                    &mut access_modes,
                    "accessModes",
                    JsonReader::optional_string_array,
                )?,
                // Rare and typed: serde reads them in place.
                "dataSource" => set_once(r, &mut data_source, "dataSource", |r| {
                    optional(r, JsonReader::serde)
                })?,
                "dataSourceRef" => set_once(r, &mut data_source_ref, "dataSourceRef", |r| {
                    optional(r, JsonReader::serde)
                })?,
                "resources" => set_once(r, &mut resources, "resources", |r| {
                    object_or_null(r, ResourcesView::read)
                })?,
                "storageClassName" => set_once(
                    r,
                    &mut storage_class_name,
                    "storageClassName",
                    JsonReader::optional_string,
                )?,
                "volumeMode" => set_once(
                    r,
                    &mut volume_mode,
                    "volumeMode",
                    JsonReader::optional_string,
                )?,
                _ => r.skip_value()?,
            }
        }
        Ok(PvcSpecView {
            access_modes: access_modes.flatten(),
            data_source: data_source.flatten(),
            data_source_ref: data_source_ref.flatten(),
            resources: resources.flatten(),
            storage_class_name: storage_class_name.flatten(),
            volume_mode: volume_mode.flatten(),
        })
    }
}

/// `spec.resources`: only whether `requests` is there, and its `storage`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResourcesView<'a> {
    pub requests: Option<RequestsView<'a>>,
}

impl<'a> ResourcesView<'a> {
    fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError> {
        let requests = only_field(r, "requests", |r| object_or_null(r, RequestsView::read))?;
        Ok(Self { requests })
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestsView<'a> {
    pub storage: Option<Cow<'a, str>>,
}

impl<'a> RequestsView<'a> {
    fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError> {
        let storage = only_field(r, "storage", JsonReader::optional_string)?;
        Ok(Self { storage })
    }
}

/// An object of which only the field `name` is read (`None` if absent or null); the others are
/// skipped.
fn only_field<'a, T>(
    r: &mut JsonReader<'a>,
    name: &str,
    mut read: impl FnMut(&mut JsonReader<'a>) -> Result<Option<T>, ReadError>,
) -> Result<Option<T>, ReadError> {
    let mut value = None;
    let mut cursor = r.object("an object or null")?;
    while let Some(key) = r.next_key(&mut cursor)? {
        if key == name {
            set_once(r, &mut value, name, &mut read)?;
        } else {
            r.skip_value()?;
        }
    }
    Ok(value.flatten())
}

/// A value read by `read`, or null.
fn optional<'a, T>(
    r: &mut JsonReader<'a>,
    read: impl FnOnce(&mut JsonReader<'a>) -> Result<T, ReadError>,
) -> Result<Option<T>, ReadError> {
    if r.null()? {
        Ok(None)
    } else {
        read(r).map(Some)
    }
}

/// Where a PVC spec names its data sources: the admitted view, or a typed spec (a claim
/// template, a PVC in the catalog).
pub trait DataSources {
    fn data_source_ref(&self) -> Option<&TypedObjectReference>;
    fn data_source(&self) -> Option<&TypedLocalObjectReference>;
}

impl DataSources for PvcSpecView<'_> {
    fn data_source_ref(&self) -> Option<&TypedObjectReference> {
        self.data_source_ref.as_deref()
    }
    fn data_source(&self) -> Option<&TypedLocalObjectReference> {
        self.data_source.as_deref()
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
        assert_eq!(m.labels, Some(Vec::new()));
        assert_eq!(m.annotation("vmdisk.io/image"), Some("f"));
        assert_eq!(m.annotations.unwrap().len(), 1);
        let v: PvcView = view_from_json(r#"{"metadata": {"labels": null}}"#).unwrap();
        assert_eq!(v.metadata.unwrap().labels, None);
        assert!(matches!(
            view_from_json::<PvcView>(r#"{"metadata": {"labels": {"vmdisk.io/image": 5}}}"#),
            Err(ReadError::Type(_))
        ));
    }

    /// The spec reader against k8s-openapi's: the same values, the same refusals.
    #[test]
    fn pvc_specs_read_as_the_typed_spec_reads_them() {
        for spec in [
            r#"{}"#,
            r#"{"accessModes": ["ReadWriteOnce", "Read\u0057riteMany"], "storageClassName": "fast", "volumeMode": "Block"}"#,
            r#"{"accessModes": [], "storageClassName": null, "volumeMode": null, "resources": null}"#,
            r#"{"resources": {"limits": {"cpu": "1"}, "requests": {"storage": "20Gi", "cpu": "2"}}}"#,
            r#"{"resources": {"requests": null}, "selector": {"matchLabels": {"a": "b"}}}"#,
            r#"{"dataSource": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "f"}, "dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "p", "namespace": "other"}}"#,
            r#"{"dataSource": null, "dataSourceRef": null, "volumeName": "pv-1"}"#,
        ] {
            let text = format!(r#"{{"spec": {spec}}}"#);
            let view: PvcView = view_from_json(&text).unwrap_or_else(|e| panic!("{spec}: {e}"));
            let view = view.spec.unwrap();
            let typed: PersistentVolumeClaimSpec = serde_json::from_str(spec).unwrap();
            let strings = |v: &Option<Vec<Cow<str>>>| {
                v.as_ref()
                    .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            };
            assert_eq!(strings(&view.access_modes), typed.access_modes, "{spec}");
            assert_eq!(
                view.storage_class_name.as_deref(),
                typed.storage_class_name.as_deref()
            );
            assert_eq!(view.volume_mode.as_deref(), typed.volume_mode.as_deref());
            assert_eq!(view.data_source.as_deref(), typed.data_source.as_ref());
            assert_eq!(
                view.data_source_ref.as_deref(),
                typed.data_source_ref.as_ref()
            );
            let requests = typed.resources.as_ref().and_then(|r| r.requests.as_ref());
            assert_eq!(
                view.resources.as_ref().map(|r| r.requests.is_some()),
                typed.resources.as_ref().map(|_| requests.is_some()),
                "{spec}"
            );
            assert_eq!(
                view.resources
                    .and_then(|r| r.requests)
                    .and_then(|r| r.storage)
                    .as_deref(),
                requests
                    .and_then(|r| r.get("storage"))
                    .map(|q| q.0.as_str())
            );
        }
        for wrong in [
            r#"{"accessModes": "ReadWriteOnce"}"#,
            r#"{"accessModes": [1]}"#,
            r#"{"storageClassName": 5}"#,
            r#"{"resources": []}"#,
            r#"{"dataSourceRef": ["PersistentVolumeClaim"]}"#,
        ] {
            let text = format!(r#"{{"spec": {wrong}}}"#);
            assert!(
                matches!(view_from_json::<PvcView>(&text), Err(ReadError::Type(_))),
                "{wrong}"
            );
            assert!(
                serde_json::from_str::<PersistentVolumeClaimSpec>(wrong).is_err(),
                "{wrong}"
            );
        }
    }

    #[test]
    fn repeated_fields_are_refused_and_unread_ones_skipped() {
        for twice in [
            r#"{"metadata": {}, "metadata": {}}"#,
            r#"{"spec": {}, "spec": {}}"#,
            r#"{"metadata": {"labels": {}, "labels": null}}"#,
            r#"{"spec": {"volumeMode": "Block", "volumeMode": "Filesystem"}}"#,
            r#"{"spec": {"resources": {"requests": {"storage": "1Gi", "storage": "2Gi"}}}}"#,
            r#"{"metadata": {"annotations": {}, "annotations": {}}}"#,
        ] {
            match view_from_json::<PvcView>(twice) {
                Err(ReadError::Type(why)) => assert!(why.contains("duplicate field"), "{why}"),
                other => panic!("{twice}: {other:?}"),
            }
        }
        let v: PvcView = view_from_json(
            r#"{"kind": "PersistentVolumeClaim", "status": {"phase": "Pending"}, "metadata": {"name": "n", "annotations": {"vmdisk.io/image": "n\u0041"}, "managedFields": [{"f:spec": {}}]}, "spec": {"volumeMode": "Block"}}"#,
        )
        .unwrap();
        assert_eq!(
            v.metadata.unwrap().annotation("vmdisk.io/image"),
            Some("nA")
        );
        assert_eq!(v.spec.unwrap().volume_mode.as_deref(), Some("Block"));
        assert!(matches!(
            view_from_json::<PvcView>(r#"{"status": {"phase": }}"#),
            Err(ReadError::Syntax(_))
        ));
    }
}
