//! The admitted objects as the mutations see them, decoded with serde from the object's raw
//! JSON: k8s-openapi's types for the parts a decision reads (a PVC's spec, a pod's volumes and
//! affinity), only the `vmdisk.io/` labels and annotations of the metadata, everything else
//! skipped unread (a PVC's `last-applied-configuration` annotation alone can be most of the
//! request).
//!
//! `Option` presence mirrors presence in the JSON (absent or `null` both read as `None`), and
//! a part a patch may address must be an object (an array is refused, the object then does not
//! fit): the patch builders rely on this to address existing parents only.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Affinity, PersistentVolumeClaimSpec, PodSpec, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::review::{from_object, object_or_null};
use crate::mutate::pvc::PvcObject;

/// Keys of labels and annotations the mutations read; others are skipped unparsed.
const RELEVANT_KEY_PREFIX: &str = "vmdisk.io/";

/// Decodes an admitted object through the view `V`; the error is why it does not fit.
pub fn decode_object<'a, V: Deserialize<'a>>(raw: &'a RawValue) -> Result<V, String> {
    from_object(raw.get()).map_err(|e| e.to_string())
}

/// A PersistentVolumeClaim as the PVC mutation sees it.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct PvcView {
    /// Only `vmdisk.io/` labels and annotations.
    #[serde(default, deserialize_with = "vmdisk_metadata")]
    pub metadata: Option<ObjectMeta>,
    #[serde(default)]
    pub spec: Option<PersistentVolumeClaimSpec>,
}

impl PvcView {
    pub fn object(&self) -> PvcObject<'_> {
        PvcObject {
            metadata: self.metadata.as_ref(),
            spec: self.spec.as_ref(),
        }
    }
}

/// A Pod as the affinity mutation sees it.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct PodView {
    /// Only `volumes` and `affinity`.
    #[serde(default, deserialize_with = "volumes_and_affinity")]
    pub spec: Option<PodSpec>,
}

fn vmdisk_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ObjectMeta>, D::Error> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default, deserialize_with = "vmdisk_entries")]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default, deserialize_with = "vmdisk_entries")]
        annotations: Option<BTreeMap<String, String>>,
    }
    Ok(object_or_null::<D, Wire>(d)?.map(|m| ObjectMeta {
        labels: m.labels,
        annotations: m.annotations,
        ..Default::default()
    }))
}

fn volumes_and_affinity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PodSpec>, D::Error> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        volumes: Option<Vec<Volume>>,
        #[serde(default)]
        affinity: Option<Affinity>,
    }
    Ok(object_or_null::<D, Wire>(d)?.map(|s| PodSpec {
        volumes: s.volumes,
        affinity: s.affinity,
        ..Default::default()
    }))
}

/// A map key, borrowed from the body unless it holds escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// The `vmdisk.io/` entries of a labels or annotations map (null: `None`); other values are
/// skipped unread. A repeated key: the last one counts, as in any JSON reader.
fn vmdisk_entries<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of strings or null")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(Key(key)) = map.next_key()? {
                if key.starts_with(RELEVANT_KEY_PREFIX) {
                    kept.insert(key.into_owned(), map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a, V: Deserialize<'a>>(text: &'a str) -> Result<V, String> {
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| e.to_string())?;
        decode_object(raw)
    }

    #[test]
    fn arrays_are_not_objects() {
        for array in [
            r#"[]"#,
            r#"{"metadata": []}"#,
            r#"{"metadata": {"labels": []}}"#,
            r#"{"metadata": {"annotations": ["vmdisk.io/image"]}}"#,
            r#"{"spec": {"resources": []}}"#,
            r#"{"spec": {"resources": {"requests": []}}}"#,
            r#"{"spec": []}"#,
        ] {
            assert!(view::<PvcView>(array).is_err(), "{array}");
        }
        for array in [r#"{"spec": [1]}"#, r#"{"spec": []}"#, r#"[]"#] {
            assert!(view::<PodView>(array).is_err(), "{array}");
        }
        let v: PvcView = view(r#"{"metadata": null, "spec": {}}"#).unwrap();
        assert!(v.metadata.is_none() && v.spec.is_some());
        let v: PodView = view(r#"{"metadata": [], "spec": null}"#).unwrap();
        assert!(v.spec.is_none(), "a pod's metadata is not read");
    }

    #[test]
    fn only_vmdisk_entries_are_kept_and_presence_is_preserved() {
        let v: PvcView = view(
            r#"{"metadata": {"labels": {"app": "x"}, "annotations": {"vmdisk.io/image": "f", "big": {"nested": [1]}}}}"#,
        )
        .unwrap();
        let m = v.metadata.unwrap();
        assert_eq!(m.labels, Some(BTreeMap::new()));
        let annotations = m.annotations.unwrap();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations["vmdisk.io/image"], "f");
        let v: PvcView = view(r#"{"metadata": {"labels": null}}"#).unwrap();
        assert_eq!(v.metadata.unwrap().labels, None);
        let v: PvcView = view(r#"{"kind": "PersistentVolumeClaim"}"#).unwrap();
        assert_eq!(v, PvcView::default());
        assert!(view::<PvcView>(r#"{"metadata": {"labels": {"vmdisk.io/image": 5}}}"#).is_err());
    }

    /// The spec is k8s-openapi's own: the same values, the same refusals.
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
            let view: PvcView = view(&text).unwrap_or_else(|e| panic!("{spec}: {e}"));
            let typed: PersistentVolumeClaimSpec = serde_json::from_str(spec).unwrap();
            assert_eq!(view.spec, Some(typed), "{spec}");
        }
        for wrong in [
            r#"{"accessModes": "ReadWriteOnce"}"#,
            r#"{"accessModes": [1]}"#,
            r#"{"storageClassName": 5}"#,
            r#"{"resources": []}"#,
            r#"{"dataSourceRef": ["PersistentVolumeClaim"]}"#,
        ] {
            let text = format!(r#"{{"spec": {wrong}}}"#);
            assert!(view::<PvcView>(&text).is_err(), "{wrong}");
            assert!(
                serde_json::from_str::<PersistentVolumeClaimSpec>(wrong).is_err(),
                "{wrong}"
            );
        }
    }

    /// Fields the views declare are refused when repeated (serde's derives refuse them);
    /// inside k8s-openapi's types and label maps the last one counts, as in the JSON the patch
    /// is applied to.
    #[test]
    fn repeated_fields_are_refused_and_unread_ones_skipped() {
        for twice in [
            r#"{"metadata": {}, "metadata": {}}"#,
            r#"{"spec": {}, "spec": {}}"#,
            r#"{"metadata": {"labels": {}, "labels": null}}"#,
            r#"{"metadata": {"annotations": {}, "annotations": {}}}"#,
        ] {
            match view::<PvcView>(twice) {
                Err(why) => assert!(why.contains("duplicate field"), "{why}"),
                other => panic!("{twice}: {other:?}"),
            }
        }
        assert!(view::<PodView>(r#"{"spec": {"volumes": [], "volumes": []}}"#).is_err());
        let v: PvcView = view(
            r#"{"spec": {"volumeMode": "Block", "volumeMode": "Filesystem"}, "metadata": {"labels": {"vmdisk.io/image": "a", "vmdisk.io/image": "b"}}}"#,
        )
        .unwrap();
        assert_eq!(v.spec.unwrap().volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(v.metadata.unwrap().labels.unwrap()["vmdisk.io/image"], "b");

        let v: PvcView = view(
            r#"{"kind": "PersistentVolumeClaim", "status": {"phase": "Pending"}, "metadata": {"name": "n", "annotations": {"vmdisk.io/image": "n\u0041"}, "managedFields": [{"f:spec": {}}]}, "spec": {"volumeMode": "Block"}}"#,
        )
        .unwrap();
        assert_eq!(
            v.metadata.unwrap().annotations.unwrap()["vmdisk.io/image"],
            "nA"
        );
        assert_eq!(v.spec.unwrap().volume_mode.as_deref(), Some("Block"));
        assert!(view::<PvcView>(r#"{"status": {"phase": }}"#).is_err());
    }

    #[test]
    fn a_pods_volumes_and_affinity_are_read_typed() {
        let v: PodView = view(
            r#"{"spec": {"containers": [{"name": "c", "image": 5}], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}], "affinity": {"nodeAffinity": {}}}}"#,
        )
        .unwrap();
        let spec = v.spec.unwrap();
        let volumes = spec.volumes.unwrap();
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "root"
        );
        assert!(spec.affinity.unwrap().node_affinity.is_some());
        assert!(spec.containers.is_empty(), "containers are not read");
        assert!(view::<PodView>(r#"{"spec": {"volumes": [{"name": 1}]}}"#).is_err());
    }
}
