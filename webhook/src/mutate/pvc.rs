//! `PvcMutation`: how a VMDiskImage-backed PVC is completed at CREATE.

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    TypedObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vmdisk_crds::{
    format_bytes_quantity, parse_quantity, DIGEST_ANNOTATION, GROUP, IMAGE_ANNOTATION, IMAGE_KIND,
    IMAGE_LABEL,
};

use super::{ImageLookup, Mutation, MutationConfig};

const MIB: u64 = 1 << 20;

/// How a PVC asks for a VMDiskImage, if it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageClaim {
    /// `spec.dataSourceRef` names the image.
    DataSourceRef(String),
    /// Only the legacy `spec.dataSource` names the image (the apiserver does not fill
    /// `dataSourceRef` before admission).
    LegacyDataSource(String),
    /// A plain PVC annotated `vmdisk.io/image: <name>` (the transparent form).
    Annotation(String),
}

impl ImageClaim {
    pub fn image_name(&self) -> &str {
        match self {
            ImageClaim::DataSourceRef(n)
            | ImageClaim::LegacyDataSource(n)
            | ImageClaim::Annotation(n) => n,
        }
    }
}

fn names_image(api_group: Option<&str>, kind: &str) -> bool {
    api_group == Some(GROUP) && kind == IMAGE_KIND
}

/// Finds which image (if any) a PVC spec asks for, and whether an annotation conflicts with a
/// data source of another kind (returned as a warning).
pub fn image_claim(
    spec: Option<&PersistentVolumeClaimSpec>,
    annotation: Option<&str>,
) -> (Option<ImageClaim>, Option<String>) {
    let source_ref = spec.and_then(|s| s.data_source_ref.as_ref());
    let source = spec.and_then(|s| s.data_source.as_ref());
    if let Some(r) = source_ref {
        if names_image(r.api_group.as_deref(), &r.kind) {
            return (Some(ImageClaim::DataSourceRef(r.name.clone())), None);
        }
    } else if let Some(s) = source {
        if names_image(s.api_group.as_deref(), &s.kind) {
            return (Some(ImageClaim::LegacyDataSource(s.name.clone())), None);
        }
    }
    match annotation {
        Some(name) if source_ref.is_none() && source.is_none() => {
            (Some(ImageClaim::Annotation(name.to_string())), None)
        }
        Some(name) => (
            None,
            Some(format!(
                "annotation {IMAGE_ANNOTATION}={name} ignored: the PVC already has a data source of another kind"
            )),
        ),
        None => (None, None),
    }
}

/// Bytes a volume needs to hold a disk of `disk_bytes`, rounded up to whole MiB. Filesystem
/// volumes also need room for the filesystem (`overhead` fraction of the volume).
pub fn volume_bytes_for_disk(disk_bytes: u64, filesystem_mode: bool, overhead: f64) -> u64 {
    let needed = if filesystem_mode && overhead > 0.0 {
        (disk_bytes as f64 / (1.0 - overhead.clamp(0.0, 0.5))).ceil() as u64
    } else {
        disk_bytes
    };
    needed.div_ceil(MIB).saturating_mul(MIB)
}

/// Decides the patch for a PVC at CREATE. `namespace` is the request's namespace.
pub fn mutate_pvc(
    pvc: &PersistentVolumeClaim,
    namespace: &str,
    images: &dyn ImageLookup,
    config: &MutationConfig,
) -> Mutation<PersistentVolumeClaim> {
    let annotation = pvc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(IMAGE_ANNOTATION))
        .map(String::as_str);
    let (claim, conflict) = image_claim(pvc.spec.as_ref(), annotation);
    let mut warnings: Vec<String> = conflict.into_iter().collect();
    let Some(claim) = claim else {
        return Mutation {
            patched: None,
            warnings,
        };
    };
    let image_name = claim.image_name().to_string();
    let mut out = pvc.clone();
    let spec = out.spec.get_or_insert_with(Default::default);

    if let Some(ns) = spec
        .data_source_ref
        .as_ref()
        .and_then(|r| r.namespace.as_deref())
        .filter(|ns| *ns != namespace)
    {
        warnings.push(format!(
            "dataSourceRef names VMDiskImage {ns}/{image_name} in another namespace; vmdisk fills PVCs only from images in their own namespace"
        ));
        return Mutation {
            patched: None,
            warnings,
        };
    }

    match &claim {
        ImageClaim::Annotation(_) | ImageClaim::LegacyDataSource(_) => {
            spec.data_source_ref = Some(TypedObjectReference {
                api_group: Some(GROUP.to_string()),
                kind: IMAGE_KIND.to_string(),
                name: image_name.clone(),
                namespace: None,
            });
            if matches!(claim, ImageClaim::LegacyDataSource(_)) {
                // Keep dataSource and dataSourceRef equal, as API validation requires.
                spec.data_source = Some(TypedLocalObjectReference {
                    api_group: Some(GROUP.to_string()),
                    kind: IMAGE_KIND.to_string(),
                    name: image_name.clone(),
                });
            }
        }
        ImageClaim::DataSourceRef(_) => {}
    }

    out.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(IMAGE_LABEL.to_string(), image_name.clone());

    let image = images.image(namespace, &image_name);
    let spec = out.spec.get_or_insert_with(Default::default);
    let no_access_modes = spec.access_modes.as_ref().is_none_or(|m| m.is_empty());
    match &image {
        None => warnings.push(format!(
            "VMDiskImage {namespace}/{image_name} not found: the PVC stays Pending until it exists"
        )),
        Some(image) => {
            if no_access_modes {
                spec.access_modes = Some(
                    image
                        .spec
                        .access_modes
                        .clone()
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| config.default_access_modes.clone()),
                );
            }
            if spec.storage_class_name.is_none() {
                spec.storage_class_name = image.spec.storage_class_name.clone();
            }
        }
    }
    if image.is_none() && no_access_modes {
        spec.access_modes = Some(config.default_access_modes.clone());
    }

    let filesystem_mode = spec.volume_mode.as_deref() != Some("Block");
    let requested = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| (q.0.clone(), parse_quantity(&q.0)));
    let required = match image.as_ref().map(|i| i.required_disk_bytes()) {
        Some(Ok(Some(disk))) => Some(volume_bytes_for_disk(
            disk,
            filesystem_mode,
            config.filesystem_overhead,
        )),
        Some(Ok(None)) => {
            warnings.push(format!(
                "VMDiskImage {namespace}/{image_name} has no size yet (not inspected by any node and no spec.size): the PVC size was not checked"
            ));
            None
        }
        Some(Err(e)) => {
            warnings.push(format!(
                "VMDiskImage {namespace}/{image_name} has an invalid spec.size: {e}"
            ));
            None
        }
        None => None,
    };
    let new_size = match (requested, required) {
        (None, Some(required)) => Some(required),
        (Some((text, Ok(have))), Some(required)) if have < required => {
            warnings.push(format!(
                "storage request raised from {text} to {}: the disk of VMDiskImage {image_name} needs it{}",
                format_bytes_quantity(required),
                if filesystem_mode { " (with filesystem overhead)" } else { "" }
            ));
            Some(required)
        }
        (Some((text, Err(e))), _) => {
            warnings.push(format!("storage request {text:?} not understood: {e}"));
            None
        }
        (None, None) => {
            warnings.push(format!(
                "no storage request and the size of VMDiskImage {namespace}/{image_name} is unknown: set spec.resources.requests.storage"
            ));
            None
        }
        _ => None,
    };
    if let Some(bytes) = new_size {
        spec.resources
            .get_or_insert_with(VolumeResourceRequirements::default)
            .requests
            .get_or_insert_with(Default::default)
            .insert("storage".to_string(), Quantity(format_bytes_quantity(bytes)));
    }

    match image.as_ref().and_then(|i| i.digest()) {
        Some(digest) => {
            out.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(DIGEST_ANNOTATION.to_string(), digest.to_string());
        }
        None if image.is_some() => warnings.push(format!(
            "VMDiskImage {namespace}/{image_name} is not resolved to a digest yet: the PVC will be filled once it is"
        )),
        None => {}
    }

    let changed = out != *pvc;
    Mutation {
        patched: changed.then_some(out),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::tests_support::{image, Images};
    use serde_json::json;

    fn pvc(spec: serde_json::Value, annotations: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "vms", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn storage(p: &PersistentVolumeClaim) -> Option<String> {
        p.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?.get("storage").map(|q| q.0.clone())
    }

    fn config() -> MutationConfig {
        MutationConfig::default()
    }

    #[test]
    fn volume_bytes_adds_filesystem_overhead_and_rounds_to_mib() {
        assert_eq!(volume_bytes_for_disk(10 << 30, false, 0.055), 10 << 30);
        let fs = volume_bytes_for_disk(10 << 30, true, 0.055);
        assert!(fs > 10 << 30 && fs % MIB == 0);
        assert!((fs as f64 * (1.0 - 0.055)) >= (10u64 << 30) as f64);
        assert_eq!(volume_bytes_for_disk(1, false, 0.0), MIB);
    }

    #[test]
    fn plain_pvc_is_untouched() {
        let p = pvc(json!({"resources": {"requests": {"storage": "1Gi"}}}), json!({}));
        assert_eq!(mutate_pvc(&p, "vms", &Images::default(), &config()), Mutation::unchanged());
    }

    #[test]
    fn annotation_form_gets_data_source_ref_size_and_digest() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(3 << 30), Some("local-path")));
        let p = pvc(json!({"volumeMode": "Block"}), json!({"vmdisk.io/image": "fedora"}));
        let m = mutate_pvc(&p, "vms", &imgs, &config());
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let out = m.patched.unwrap();
        let spec = out.spec.as_ref().unwrap();
        let r = spec.data_source_ref.as_ref().unwrap();
        assert_eq!((r.api_group.as_deref(), r.kind.as_str(), r.name.as_str()), (Some("vmdisk.io"), "VMDiskImage", "fedora"));
        assert_eq!(storage(&out).as_deref(), Some("3Gi"));
        assert_eq!(spec.access_modes.as_deref(), Some(&["ReadWriteOnce".to_string()][..]));
        assert_eq!(spec.storage_class_name.as_deref(), Some("local-path"));
        assert_eq!(out.metadata.labels.as_ref().unwrap()["vmdisk.io/image"], "fedora");
        assert_eq!(out.metadata.annotations.as_ref().unwrap()["vmdisk.io/digest"], "sha256:abc");
    }

    #[test]
    fn too_small_request_is_raised_with_a_warning() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(1 << 30), None));
        let p = pvc(
            json!({"volumeMode": "Filesystem", "resources": {"requests": {"storage": "1Mi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
            json!({}),
        );
        let m = mutate_pvc(&p, "vms", &imgs, &config());
        let out = m.patched.unwrap();
        let bytes = parse_quantity(&storage(&out).unwrap()).unwrap();
        assert_eq!(bytes, volume_bytes_for_disk(1 << 30, true, 0.055));
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("raised from 1Mi"), "{}", m.warnings[0]);
    }

    #[test]
    fn big_enough_request_and_explicit_class_are_kept() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(1 << 30), Some("fast")));
        let p = pvc(
            json!({"volumeMode": "Block", "storageClassName": "", "accessModes": ["ReadWriteMany"],
                   "resources": {"requests": {"storage": "20Gi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
            json!({}),
        );
        let out = mutate_pvc(&p, "vms", &imgs, &config()).patched.unwrap();
        let spec = out.spec.as_ref().unwrap();
        assert_eq!(storage(&out).as_deref(), Some("20Gi"));
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(spec.access_modes.as_ref().unwrap(), &vec!["ReadWriteMany".to_string()]);
    }

    #[test]
    fn missing_image_warns_but_still_completes_the_reference() {
        let p = pvc(json!({}), json!({"vmdisk.io/image": "nope"}));
        let m = mutate_pvc(&p, "vms", &Images::default(), &config());
        assert!(m.warnings.iter().any(|w| w.contains("vms/nope not found")), "{:?}", m.warnings);
        assert!(m.warnings.iter().any(|w| w.contains("no storage request")), "{:?}", m.warnings);
        let out = m.patched.unwrap();
        assert_eq!(out.spec.unwrap().data_source_ref.unwrap().name, "nope");
    }

    #[test]
    fn unresolved_image_warns_and_records_no_digest() {
        let imgs = Images::with(image("fedora", None, None, None));
        let p = pvc(
            json!({"resources": {"requests": {"storage": "5Gi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
            json!({}),
        );
        let m = mutate_pvc(&p, "vms", &imgs, &config());
        assert!(m.warnings.iter().any(|w| w.contains("not resolved")), "{:?}", m.warnings);
        let out = m.patched.unwrap();
        assert!(out.metadata.annotations.is_none_or(|a| !a.contains_key(DIGEST_ANNOTATION)));
    }

    #[test]
    fn legacy_data_source_gains_an_equal_data_source_ref() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(1 << 30), None));
        let p = pvc(
            json!({"resources": {"requests": {"storage": "20Gi"}},
                   "dataSource": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
            json!({}),
        );
        let out = mutate_pvc(&p, "vms", &imgs, &config()).patched.unwrap();
        let spec = out.spec.unwrap();
        assert_eq!(spec.data_source_ref.unwrap().name, "fedora");
        assert_eq!(spec.data_source.unwrap().name, "fedora");
    }

    #[test]
    fn other_sources_pass_through_and_annotation_conflict_warns() {
        let p = pvc(
            json!({"dataSourceRef": {"apiGroup": "cdi.kubevirt.io", "kind": "VolumeImportSource", "name": "x"}}),
            json!({"vmdisk.io/image": "fedora"}),
        );
        let m = mutate_pvc(&p, "vms", &Images::default(), &config());
        assert_eq!(m.patched, None);
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("ignored"));
    }

    #[test]
    fn cross_namespace_reference_is_left_alone() {
        let p = pvc(
            json!({"dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "f", "namespace": "other"}}),
            json!({}),
        );
        let m = mutate_pvc(&p, "vms", &Images::default(), &config());
        assert_eq!(m.patched, None);
        assert!(m.warnings[0].contains("another namespace"));
    }

    #[test]
    fn mutation_is_idempotent() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(3 << 30), Some("local-path")));
        let p = pvc(json!({"volumeMode": "Filesystem"}), json!({"vmdisk.io/image": "fedora"}));
        let once = mutate_pvc(&p, "vms", &imgs, &config()).patched.unwrap();
        let twice = mutate_pvc(&once, "vms", &imgs, &config());
        assert_eq!(twice.patched, None);
        assert!(twice.warnings.is_empty());
    }
}
