//! What vmdisk's reflector stores keep of each object. A store holds every object a watch
//! delivers for as long as the process runs, so what nobody reads is memory for nothing:
//! `managedFields` alone is often half an object, `kubectl apply`'s last-applied annotation
//! repeats the spec. Each watch strips before it stores (kube's
//! `WatchStreamExt::modify`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::VMDiskImage;

/// What no vmdisk component reads on any object: server-side apply's bookkeeping.
pub fn strip_managed_fields(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
}

/// A metadata-only object reduced to its name and the labels in `keep` (the webhook's
/// labelled PVCs: only `vmdisk.io/image` is read).
pub fn strip_metadata_to(meta: &mut ObjectMeta, keep: &[&str]) {
    let taken = std::mem::take(meta);
    *meta = ObjectMeta {
        name: taken.name,
        namespace: taken.namespace,
        labels: taken.labels.map(|mut labels| {
            labels.retain(|k, _| keep.contains(&k.as_str()));
            labels
        }),
        ..ObjectMeta::default()
    };
}

impl VMDiskImage {
    /// What the controller keeps of an image: all but server-side apply's bookkeeping and the
    /// annotations (`kubectl apply`'s last-applied copy repeats the spec).
    pub fn strip_for_controller(&mut self) {
        strip_managed_fields(&mut self.metadata);
        self.metadata.annotations = None;
    }

    /// What the webhook's catalog keeps of an image: its name, its spec without the
    /// registry's CA bundle (up to 256 KiB, read only by the nodes) and what the status says
    /// (phase, digest, sizes, warm nodes), not the conditions' texts nor how nodes pulled it.
    /// Not for the image controller, which writes the conditions.
    pub fn strip_for_catalog(&mut self) {
        let meta = std::mem::take(&mut self.metadata);
        self.metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            deletion_timestamp: meta.deletion_timestamp,
            ..ObjectMeta::default()
        };
        self.spec.source.registry.ca_bundle = None;
        if let Some(status) = self.status.as_mut() {
            status.conditions = Vec::new();
            status.pull = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use std::collections::BTreeMap;

    #[test]
    fn stores_keep_what_is_read() {
        let mut meta = ObjectMeta {
            name: Some("c".into()),
            namespace: Some("ns".into()),
            resource_version: Some("7".into()),
            labels: Some(BTreeMap::from([
                ("vmdisk.io/image".into(), "fedora".into()),
                ("app".into(), "x".into()),
            ])),
            annotations: Some(BTreeMap::from([("big".into(), "y".repeat(1000))])),
            managed_fields: Some(vec![ManagedFieldsEntry::default()]),
            finalizers: Some(vec!["f".into()]),
            ..Default::default()
        };
        strip_metadata_to(&mut meta, &["vmdisk.io/image"]);
        assert_eq!(meta.name.as_deref(), Some("c"));
        assert_eq!(meta.resource_version, None);
        assert_eq!(
            meta.labels,
            Some(BTreeMap::from([(
                "vmdisk.io/image".into(),
                "fedora".into()
            )]))
        );
        assert_eq!(
            (meta.annotations, meta.managed_fields, meta.finalizers),
            (None, None, None)
        );

        let mut image: VMDiskImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": "i", "namespace": "ns", "annotations": {"a": "b"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"source": {"registry": {"url": "r.example/i:1", "caBundle": "PEM"}}},
            "status": {"phase": "Ready", "digest": "sha256:aa", "virtualSize": 5, "warmNodes": 2,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "R",
                                       "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let mut spec = image.spec.clone();
        image.strip_for_catalog();
        spec.source.registry.ca_bundle = None;
        assert_eq!(image.spec, spec);
        assert_eq!(
            (
                image.metadata.name.as_deref(),
                image.metadata.namespace.as_deref()
            ),
            (Some("i"), Some("ns"))
        );
        let status = image.status.unwrap();
        assert_eq!(
            (
                status.digest.as_deref(),
                status.virtual_size,
                status.warm_nodes
            ),
            (Some("sha256:aa"), Some(5), 2)
        );
        assert!(status.conditions.is_empty());
        assert_eq!(
            (image.metadata.annotations, image.metadata.managed_fields),
            (None, None)
        );
    }
}
