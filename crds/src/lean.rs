//! What vmdisk's reflector stores keep of each object. A store holds every object a watch
//! delivers for as long as the process runs, so what nobody reads is memory for nothing:
//! `managedFields` alone is often half an object, `kubectl apply`'s last-applied annotation
//! repeats the spec, and a Node's status lists every image on it. Each watch strips before it
//! stores (kube's `WatchStreamExt::modify`).

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::VMDiskImage;

/// What no vmdisk component reads on any object: server-side apply's bookkeeping.
pub fn strip_managed_fields(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
}

/// A metadata-only object reduced to its identity and the labels in `keep` (the webhook's
/// labelled PVCs: only `vmdisk.io/image` is read).
pub fn strip_metadata_to(meta: &mut ObjectMeta, keep: &[&str]) {
    strip_managed_fields(meta);
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| keep.contains(&k.as_str()));
    }
}

impl VMDiskImage {
    /// What the webhook's catalog and the agents keep of an image: its spec and what the
    /// status says (phase, digest, sizes, warm nodes), not its annotations or the conditions'
    /// texts. Not for the image controller, which writes the conditions.
    pub fn strip_for_catalog(&mut self) {
        strip_managed_fields(&mut self.metadata);
        self.metadata.annotations = None;
        if let Some(status) = self.status.as_mut() {
            status.conditions = Vec::new();
        }
    }
}

/// What an agent keeps of its own Node: its identity and labels (which the images' node
/// selectors match), not its status (which lists every container image on the node).
pub fn strip_node_to_labels(node: &mut Node) {
    let meta = std::mem::take(&mut node.metadata);
    *node = Node::default();
    node.metadata = ObjectMeta {
        name: meta.name,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        ..ObjectMeta::default()
    };
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
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
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
            "spec": {"source": {"registry": {"url": "r.example/i:1"}}},
            "status": {"phase": "Ready", "digest": "sha256:aa", "virtualSize": 5, "warmNodes": 2,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "R",
                                       "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let spec = image.spec.clone();
        image.strip_for_catalog();
        assert_eq!(image.spec, spec);
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

        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {"pool": "gpu"}, "annotations": {"a": "b"}},
            "status": {"images": [{"names": ["x"], "sizeBytes": 1}]}
        }))
        .unwrap();
        strip_node_to_labels(&mut node);
        assert_eq!(
            node.metadata.labels,
            Some(BTreeMap::from([("pool".into(), "gpu".into())]))
        );
        assert_eq!(node.metadata.name.as_deref(), Some("n"), "the store's key");
        assert!(node.status.is_none() && node.metadata.annotations.is_none());
    }
}
