//! [`PvcMutation`]: how a VMDiskImage-backed PVC is completed at CREATE.

use k8s_openapi::api::core::v1::PersistentVolumeClaimSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Map, Value};
use vmdisk_crds::{
    format_bytes_quantity, parse_quantity, DIGEST_ANNOTATION, GROUP, IMAGE_ANNOTATION, IMAGE_KIND,
    IMAGE_LABEL,
};

use super::patch::PatchBuilder;
use super::{ImageLookup, Mutation, MutationConfig};

/// How a PVC asks for a VMDiskImage, if it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageClaim<'a> {
    /// `spec.dataSourceRef` names the image.
    DataSourceRef(&'a str),
    /// Only the legacy `spec.dataSource` names the image (the apiserver does not fill
    /// `dataSourceRef` before admission).
    LegacyDataSource(&'a str),
    /// A plain PVC annotated `vmdisk.io/image: <name>` (the transparent form).
    Annotation(&'a str),
}

impl<'a> ImageClaim<'a> {
    pub fn image_name(&self) -> &'a str {
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
pub fn image_claim<'a>(
    spec: Option<&'a PersistentVolumeClaimSpec>,
    annotation: Option<&'a str>,
) -> (Option<ImageClaim<'a>>, Option<String>) {
    let source_ref = spec.and_then(|s| s.data_source_ref.as_ref());
    let source = spec.and_then(|s| s.data_source.as_ref());
    if let Some(r) = source_ref {
        if names_image(r.api_group.as_deref(), &r.kind) {
            return (Some(ImageClaim::DataSourceRef(&r.name)), None);
        }
    } else if let Some(s) = source {
        if names_image(s.api_group.as_deref(), &s.kind) {
            return (Some(ImageClaim::LegacyDataSource(&s.name)), None);
        }
    }
    match annotation {
        Some(name) if source_ref.is_none() && source.is_none() => {
            (Some(ImageClaim::Annotation(name)), None)
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

pub use vmdisk_crds::volume_bytes_for_disk;

/// The parts of an admitted PVC the decision reads. `None` is a part the object lacks (absent
/// or null), and likewise for `labels`, `annotations`, `resources` and `requests` inside: the
/// patch then adds that part whole instead of a member of it, so it always applies.
#[derive(Debug, Default, Clone, Copy)]
pub struct PvcObject<'a> {
    pub metadata: Option<&'a ObjectMeta>,
    pub spec: Option<&'a PersistentVolumeClaimSpec>,
}

impl<'a> PvcObject<'a> {
    fn label(&self, key: &str) -> Option<&'a str> {
        self.metadata?.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn annotation(&self, key: &str) -> Option<&'a str> {
        self.metadata?
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

/// What a VMDiskImage-backed PVC gains at CREATE. Each field is a change to make; `None`
/// leaves that part of the PVC alone. Names come from the admitted PVC, borrowed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PvcMutation<'a> {
    /// The image a `dataSourceRef` to add names (group `vmdisk.io`, kind `VMDiskImage`).
    pub data_source_ref: Option<&'a str>,
    pub storage: Option<String>,
    pub access_modes: Option<Vec<String>>,
    pub storage_class_name: Option<String>,
    pub image_label: Option<&'a str>,
    pub digest_annotation: Option<String>,
    pub warnings: Vec<String>,
}

impl<'a> PvcMutation<'a> {
    fn only_warnings(warnings: Vec<String>) -> Self {
        Self {
            warnings,
            ..Default::default()
        }
    }

    /// Decides the changes for a PVC at CREATE. `namespace` is the request's namespace.
    pub fn plan(
        pvc: PvcObject<'a>,
        namespace: &str,
        images: &dyn ImageLookup,
        config: &MutationConfig,
    ) -> Self {
        let annotation = pvc.annotation(IMAGE_ANNOTATION);
        let (claim, conflict) = image_claim(pvc.spec, annotation);
        let mut warnings: Vec<String> = conflict.into_iter().collect();
        let Some(claim) = claim else {
            return Self::only_warnings(warnings);
        };
        let image_name = claim.image_name();
        let empty_spec = PersistentVolumeClaimSpec::default();
        let spec = pvc.spec.unwrap_or(&empty_spec);

        if let Some(ns) = spec
            .data_source_ref
            .as_ref()
            .and_then(|r| r.namespace.as_deref())
            .filter(|ns| *ns != namespace)
        {
            warnings.push(format!(
                "dataSourceRef names VMDiskImage {ns}/{image_name} in another namespace; vmdisk fills PVCs only from images in their own namespace"
            ));
            return Self::only_warnings(warnings);
        }

        let mut out = PvcMutation::default();
        if !matches!(claim, ImageClaim::DataSourceRef(_)) {
            // Annotation form, or legacy dataSource only: the populator contract is
            // dataSourceRef (equal to dataSource when both are set, as validation requires).
            out.data_source_ref = Some(image_name);
        }
        if pvc.label(IMAGE_LABEL) != Some(image_name) {
            out.image_label = Some(image_name);
        }

        let image = images.image(namespace, image_name);
        if spec.access_modes.as_ref().is_none_or(|m| m.is_empty()) {
            out.access_modes = Some(
                image
                    .as_ref()
                    .and_then(|i| i.spec.access_modes.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| config.default_access_modes.clone()),
            );
        }
        if spec.storage_class_name.is_none() {
            out.storage_class_name = image
                .as_ref()
                .and_then(|i| i.spec.storage_class_name.clone());
        }
        if image.is_none() {
            warnings.push(format!(
                "VMDiskImage {namespace}/{image_name} not found: the PVC stays Pending until it exists"
            ));
        }

        let filesystem_mode = spec.volume_mode.as_deref() != Some("Block");
        let requested = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| (q.0.as_str(), parse_quantity(&q.0)));
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
        out.storage = match (requested, required) {
            (None, Some(required)) => Some(format_bytes_quantity(required)),
            (Some((text, Ok(have))), Some(required)) if have < required => {
                let new = format_bytes_quantity(required);
                warnings.push(format!(
                    "storage request raised from {text} to {new}: the disk of VMDiskImage {image_name} needs it{}",
                    if filesystem_mode { " (with filesystem overhead)" } else { "" }
                ));
                Some(new)
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

        match image.as_ref().and_then(|i| i.digest()) {
            Some(digest) if pvc.annotation(DIGEST_ANNOTATION) != Some(digest) => {
                out.digest_annotation = Some(digest.to_string());
            }
            Some(_) => {}
            None if image.is_some() => warnings.push(format!(
                "VMDiskImage {namespace}/{image_name} is not resolved to a digest yet: the PVC will be filled once it is"
            )),
            None => {}
        }
        // A digest the webhook did not write (the image's is not known yet) is never used.
        if let Some(given) = pvc.annotation(DIGEST_ANNOTATION) {
            if out.digest_annotation.is_none() && image.as_ref().and_then(|i| i.digest()).is_none()
            {
                warnings.push(format!(
                    "{DIGEST_ANNOTATION} {given} is ignored: the PVC is filled from the digest VMDiskImage {namespace}/{image_name} resolves to"
                ));
            }
        }
        out.warnings = warnings;
        out
    }

    /// The JSON patch, addressing only parents that exist in `pvc` (a missing parent is
    /// added whole).
    pub fn patch(&self, pvc: PvcObject) -> Option<json_patch::Patch> {
        let mut b = PatchBuilder::default();
        let entry =
            |key: &str, value: &str| Value::Object(Map::from_iter([(key.into(), value.into())]));
        let labels = self.image_label.map(|v| (IMAGE_LABEL, v));
        let annotations = self
            .digest_annotation
            .as_deref()
            .map(|v| (DIGEST_ANNOTATION, v));
        match pvc.metadata {
            None => {
                let mut metadata = Map::new();
                for (field, member) in [("labels", labels), ("annotations", annotations)] {
                    if let Some((key, value)) = member {
                        metadata.insert(field.into(), entry(key, value));
                    }
                }
                if !metadata.is_empty() {
                    b.add(&["metadata"], Value::Object(metadata));
                }
            }
            Some(m) => {
                for (field, member, exists) in [
                    ("labels", labels, m.labels.is_some()),
                    ("annotations", annotations, m.annotations.is_some()),
                ] {
                    match member {
                        Some((key, value)) if exists => {
                            b.add(&["metadata", field, key], value.into())
                        }
                        Some((key, value)) => b.add(&["metadata", field], entry(key, value)),
                        None => {}
                    }
                }
            }
        }
        let data_source_ref = self
            .data_source_ref
            .map(|name| json!({"apiGroup": GROUP, "kind": IMAGE_KIND, "name": name}));
        let access_modes = self.access_modes.as_ref().map(|m| json!(m));
        let storage_class_name = self.storage_class_name.as_deref().map(Value::from);
        let storage = self.storage.as_deref();
        match pvc.spec {
            None => {
                let mut spec = Map::new();
                for (field, value) in [
                    ("dataSourceRef", data_source_ref),
                    ("accessModes", access_modes),
                    ("storageClassName", storage_class_name),
                    (
                        "resources",
                        storage.map(|s| json!({"requests": {"storage": s}})),
                    ),
                ] {
                    if let Some(value) = value {
                        spec.insert(field.into(), value);
                    }
                }
                if !spec.is_empty() {
                    b.add(&["spec"], Value::Object(spec));
                }
            }
            Some(spec) => {
                for (field, value) in [
                    ("dataSourceRef", data_source_ref),
                    ("accessModes", access_modes),
                    ("storageClassName", storage_class_name),
                ] {
                    if let Some(value) = value {
                        b.add(&["spec", field], value);
                    }
                }
                if let Some(storage) = storage {
                    match spec.resources.as_ref().map(|r| r.requests.is_some()) {
                        None => b.add(
                            &["spec", "resources"],
                            json!({"requests": {"storage": storage}}),
                        ),
                        Some(false) => b.add(
                            &["spec", "resources", "requests"],
                            json!({"storage": storage}),
                        ),
                        Some(true) => b.add(
                            &["spec", "resources", "requests", "storage"],
                            storage.into(),
                        ),
                    }
                }
            }
        }
        b.build()
    }
}

/// Decides and builds the patch for a PVC at CREATE.
pub fn mutate_pvc(
    pvc: PvcObject,
    namespace: &str,
    images: &dyn ImageLookup,
    config: &MutationConfig,
) -> Mutation {
    let plan = PvcMutation::plan(pvc, namespace, images, config);
    Mutation {
        patch: plan.patch(pvc),
        warnings: plan.warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::tests_support::{image, Images};
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;

    /// The mutation of a PVC given as JSON, its parts read as k8s-openapi reads them.
    fn mutate(images: &Images, pvc: &Value) -> Mutation {
        let metadata: Option<ObjectMeta> = serde_json::from_value(pvc["metadata"].clone()).unwrap();
        let spec: Option<PersistentVolumeClaimSpec> =
            serde_json::from_value(pvc["spec"].clone()).unwrap();
        let object = PvcObject {
            metadata: metadata.as_ref(),
            spec: spec.as_ref(),
        };
        mutate_pvc(object, "vms", images, &MutationConfig::default())
    }

    /// Runs the mutation on a PVC given as JSON and returns the patched PVC and the warnings.
    fn run(images: &Images, pvc: Value) -> (Option<PersistentVolumeClaim>, Vec<String>) {
        let m = mutate(images, &pvc);
        let patched = m.patch.map(|p| {
            let mut doc = pvc;
            json_patch::patch(&mut doc, &p).unwrap();
            serde_json::from_value(doc).unwrap()
        });
        (patched, m.warnings)
    }

    fn pvc(spec: Value, annotations: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "vms", "annotations": annotations}, "spec": spec})
    }

    fn storage(p: &PersistentVolumeClaim) -> Option<String> {
        p.spec
            .as_ref()?
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")
            .map(|q| q.0.clone())
    }

    #[test]
    fn plain_pvc_is_untouched() {
        let (p, w) = run(
            &Images::default(),
            pvc(
                json!({"resources": {"requests": {"storage": "1Gi"}}}),
                json!({}),
            ),
        );
        assert!(p.is_none() && w.is_empty());
    }

    #[test]
    fn annotation_form_gets_data_source_ref_size_and_digest() {
        let imgs = Images::with(image(
            "fedora",
            Some("sha256:abc"),
            Some(3 << 30),
            Some("local-path"),
        ));
        let (out, w) = run(
            &imgs,
            pvc(
                json!({"volumeMode": "Block"}),
                json!({"vmdisk.io/image": "fedora"}),
            ),
        );
        assert!(w.is_empty(), "{w:?}");
        let out = out.unwrap();
        let spec = out.spec.as_ref().unwrap();
        let r = spec.data_source_ref.as_ref().unwrap();
        assert_eq!(
            (r.api_group.as_deref(), r.kind.as_str(), r.name.as_str()),
            (Some("vmdisk.io"), "VMDiskImage", "fedora")
        );
        assert_eq!(storage(&out).as_deref(), Some("3Gi"));
        assert_eq!(
            spec.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_string()][..])
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some("local-path"));
        assert_eq!(
            out.metadata.labels.as_ref().unwrap()["vmdisk.io/image"],
            "fedora"
        );
        assert_eq!(
            out.metadata.annotations.as_ref().unwrap()["vmdisk.io/digest"],
            "sha256:abc"
        );
        assert_eq!(
            out.metadata.annotations.as_ref().unwrap()["vmdisk.io/image"],
            "fedora"
        );
    }

    #[test]
    fn too_small_request_is_raised_with_a_warning() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(1 << 30), None));
        let (out, w) = run(
            &imgs,
            pvc(
                json!({"volumeMode": "Filesystem", "resources": {"requests": {"storage": "1Mi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
                json!({}),
            ),
        );
        let bytes = parse_quantity(&storage(&out.unwrap()).unwrap()).unwrap();
        assert_eq!(
            bytes,
            volume_bytes_for_disk(1 << 30, true, vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD)
        );
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("raised from 1Mi"), "{}", w[0]);
    }

    #[test]
    fn big_enough_request_and_explicit_class_are_kept() {
        let imgs = Images::with(image(
            "fedora",
            Some("sha256:abc"),
            Some(1 << 30),
            Some("fast"),
        ));
        let (out, _) = run(
            &imgs,
            pvc(
                json!({"volumeMode": "Block", "storageClassName": "", "accessModes": ["ReadWriteMany"],
                   "resources": {"requests": {"storage": "20Gi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
                json!({}),
            ),
        );
        let out = out.unwrap();
        let spec = out.spec.as_ref().unwrap();
        assert_eq!(storage(&out).as_deref(), Some("20Gi"));
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(
            spec.access_modes.as_ref().unwrap(),
            &vec!["ReadWriteMany".to_string()]
        );
    }

    #[test]
    fn missing_image_warns_but_still_completes_the_reference() {
        let (out, w) = run(
            &Images::default(),
            pvc(json!({}), json!({"vmdisk.io/image": "nope"})),
        );
        assert!(w.iter().any(|w| w.contains("vms/nope not found")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("no storage request")), "{w:?}");
        assert_eq!(
            out.unwrap().spec.unwrap().data_source_ref.unwrap().name,
            "nope"
        );
    }

    #[test]
    fn a_digest_given_for_an_unresolved_image_is_said_to_be_ignored() {
        let imgs = Images::with(image("fedora", None, None, None));
        let forged = format!("sha256:{}", "f".repeat(64));
        let (_, w) = run(
            &imgs,
            pvc(
                json!({"resources": {"requests": {"storage": "5Gi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
                json!({"vmdisk.io/digest": forged}),
            ),
        );
        assert!(
            w.iter()
                .any(|w| w.contains(&forged) && w.contains("ignored")),
            "{w:?}"
        );
    }

    #[test]
    fn unresolved_image_warns_and_records_no_digest() {
        let imgs = Images::with(image("fedora", None, None, None));
        let (out, w) = run(
            &imgs,
            pvc(
                json!({"resources": {"requests": {"storage": "5Gi"}},
                   "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
                json!({}),
            ),
        );
        assert!(w.iter().any(|w| w.contains("not resolved")), "{w:?}");
        assert!(out
            .unwrap()
            .metadata
            .annotations
            .is_none_or(|a| !a.contains_key(DIGEST_ANNOTATION)));
    }

    #[test]
    fn legacy_data_source_gains_an_equal_data_source_ref() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(1 << 30), None));
        let (out, _) = run(
            &imgs,
            pvc(
                json!({"resources": {"requests": {"storage": "20Gi"}},
                   "dataSource": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}),
                json!({}),
            ),
        );
        let spec = out.unwrap().spec.unwrap();
        assert_eq!(spec.data_source_ref.unwrap().name, "fedora");
        assert_eq!(spec.data_source.unwrap().name, "fedora");
    }

    #[test]
    fn other_sources_pass_through_and_annotation_conflict_warns() {
        let (out, w) = run(
            &Images::default(),
            pvc(
                json!({"dataSourceRef": {"apiGroup": "cdi.kubevirt.io", "kind": "VolumeImportSource", "name": "x"}}),
                json!({"vmdisk.io/image": "fedora"}),
            ),
        );
        assert!(out.is_none());
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("ignored"));
    }

    #[test]
    fn cross_namespace_reference_is_left_alone() {
        let (out, w) = run(
            &Images::default(),
            pvc(
                json!({"dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "f", "namespace": "other"}}),
                json!({}),
            ),
        );
        assert!(out.is_none());
        assert!(w[0].contains("another namespace"));
    }

    #[test]
    fn mutation_is_idempotent() {
        let imgs = Images::with(image(
            "fedora",
            Some("sha256:abc"),
            Some(3 << 30),
            Some("local-path"),
        ));
        let (once, _) = run(
            &imgs,
            pvc(
                json!({"volumeMode": "Filesystem"}),
                json!({"vmdisk.io/image": "fedora"}),
            ),
        );
        let (twice, w) = run(&imgs, serde_json::to_value(once.unwrap()).unwrap());
        assert!(twice.is_none());
        assert!(w.is_empty());
    }

    #[test]
    fn missing_parents_are_added_whole() {
        let imgs = Images::with(image("fedora", Some("sha256:abc"), Some(1 << 30), None));
        let doc = json!({"spec": {"dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}, "resources": {}}});
        let (out, _) = run(&imgs, doc);
        let out = out.unwrap();
        assert_eq!(
            out.metadata.labels.as_ref().unwrap()["vmdisk.io/image"],
            "fedora"
        );
        assert!(storage(&out).is_some());
        let mut doc = json!({"metadata": {"annotations": {"vmdisk.io/image": "fedora"}}});
        let m = mutate(&imgs, &doc);
        json_patch::patch(&mut doc, &m.patch.unwrap()).unwrap();
        assert_eq!(doc["spec"]["dataSourceRef"]["name"], "fedora");
    }
}
