//! The agent's report and the image controller against a real API server: an agent publishes
//! its node's NodeDiskCache and labels, the controller resolves an image (from a real registry
//! reachable by this process) and aggregates the warm-node count.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use vmdisk_cache_agent::report::{node_cache_status, CacheEntryView, NodeReporter};
use vmdisk_crds::{
    node_cache_label_key, CacheEntryState, DiskFormat, ImagePhase, NodeDiskCache, VMDiskImage,
};
use vmdisk_tests::disks::make_ext4_raw;
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;
use vmdisk_webhook::controller::image::{reconcile, Context};
use vmdisk_webhook::controller::RegistryResolver;

use crate::support::{client, install_crds, TestNamespace};

#[tokio::test]
async fn agent_report_and_controller_status_on_a_real_cluster() {
    let Some(client) = client("cache").await else {
        return;
    };
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "vmdisk-e2e-cache").await;

    // A real image in a real registry on this machine.
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "e2e", 16, 1, 99);
    let (reference, digest) = push_container_disk(&registry, "e2e/disk", "1", &raw).await;

    // The agent side, on the cluster's first node.
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .remove(0);
    let node_name = node.metadata.name.clone().unwrap();
    let reporter = NodeReporter::new(client.clone(), node_name.clone());
    reporter.ensure_cache_object().await.unwrap();
    let view = CacheEntryView {
        digest: digest.clone(),
        format: DiskFormat::Raw,
        state: CacheEntryState::Ready,
        source_format: Some("raw".into()),
        virtual_size: Some(16 << 20),
        ..Default::default()
    };
    reporter
        .publish(&node_cache_status(&[view], 1 << 30, 1 << 29, 16 << 20))
        .await
        .unwrap();
    reporter
        .sync_labels(&[digest.clone()].into())
        .await
        .unwrap();
    let labels = nodes
        .get(&node_name)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels
            .get(&node_cache_label_key(&digest).unwrap())
            .map(String::as_str),
        Some("ready")
    );

    // The controller side.
    let images: Api<VMDiskImage> = Api::namespaced(client.clone(), &ns.name);
    let image: VMDiskImage = serde_json::from_value(json!({
        "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
        "metadata": {"name": "disk", "namespace": ns.name},
        "spec": {"source": {"registry": {"url": reference, "insecure": true}}, "format": "raw"}
    }))
    .unwrap();
    let created = images.create(&PostParams::default(), &image).await.unwrap();
    let (caches, mut writer) = kube::runtime::reflector::store::<NodeDiskCache>();
    let api: Api<NodeDiskCache> = Api::all(client.clone());
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(
        api.get(&node_name).await.unwrap(),
    ));
    let ctx = Arc::new(Context {
        client: client.clone(),
        resolver: Arc::new(RegistryResolver::new(client.clone())),
        caches,
    });
    reconcile(Arc::new(created), ctx).await.unwrap();
    let status = images.get("disk").await.unwrap().status.unwrap();
    assert_eq!(status.digest.as_deref(), Some(digest.as_str()));
    assert_eq!(status.warm_nodes, 1);
    assert_eq!(status.phase, Some(ImagePhase::Ready));

    // Clean up the node label.
    reporter.sync_labels(&Default::default()).await.unwrap();
    let _ = nodes
        .patch(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {}})),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}
