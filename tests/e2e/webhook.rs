//! The webhook's catalog and mutations against a real API server: reflectors fill from the
//! cluster, and the patched PVC and Pod are accepted by the apiserver (server-side dry run).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use vmdisk_crds::VMDiskImage;
use vmdisk_webhook::admission::decode_patch_field;
use vmdisk_webhook::catalog::kube::KubeCatalog;
use vmdisk_webhook::catalog::ImageCatalog;
use vmdisk_webhook::metrics::Resource;
use vmdisk_webhook::mutate::MutationConfig;
use vmdisk_webhook::routes::{Handled, Webhook};

use crate::support::{client, install_crds, TestNamespace};

const DIGEST: &str = "sha256:6f1a0c3ad3b0e7c1f0f5a6f0a0d1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3";

fn review(namespace: &str, kind: &str, resource: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "e2e", "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "namespace": namespace, "operation": "CREATE", "object": object,
        }
    }))
    .unwrap()
}

fn patched(webhook: &Webhook, resource: Resource, body: &[u8], object: &Value) -> Value {
    let Handled::Answer(answer, _) = webhook.admit(resource, body) else {
        panic!("bad request");
    };
    let encoded: Value = serde_json::from_slice(&answer.to_json()).unwrap();
    let patch = decode_patch_field(&encoded["response"]["patch"]).expect("a patch");
    let mut out = object.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

#[tokio::test]
async fn catalog_syncs_from_the_cluster_and_patches_validate() {
    let Some(client) = client("webhook").await else {
        return;
    };
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "vmdisk-e2e-webhook").await;

    let images: Api<VMDiskImage> = Api::namespaced(client.clone(), &ns.name);
    let image: VMDiskImage = serde_json::from_value(json!({
        "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
        "metadata": {"name": "fedora", "namespace": ns.name},
        "spec": {"source": {"registry": {"url": "quay.io/containerdisks/fedora:40"}}}
    }))
    .unwrap();
    images.create(&PostParams::default(), &image).await.unwrap();
    images
        .patch_status(
            "fedora",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"digest": DIGEST, "virtualSize": 1073741824u64}})),
        )
        .await
        .unwrap();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let labelled: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "root", "labels": {"vmdisk.io/image": "fedora"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}
    }))
    .unwrap();
    pvcs.create(&PostParams::default(), &labelled)
        .await
        .unwrap();

    let (catalog, tasks) = KubeCatalog::start(client.clone());
    for _ in 0..300 {
        if catalog.is_synced() && catalog.claim_image(&ns.name, "root").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(catalog.is_synced());
    use vmdisk_webhook::mutate::ImageLookup;
    assert_eq!(
        catalog.image(&ns.name, "fedora").unwrap().digest(),
        Some(DIGEST)
    );
    assert_eq!(
        catalog.claim_image(&ns.name, "root").as_deref(),
        Some("fedora")
    );

    let webhook = Webhook::new(Arc::clone(&catalog) as _, MutationConfig::default());
    let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "by-annotation", "namespace": ns.name, "annotations": {"vmdisk.io/image": "fedora"}},
        "spec": {"volumeMode": "Filesystem"}});
    let out = patched(
        &webhook,
        Resource::Pvc,
        &review(
            &ns.name,
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            pvc.clone(),
        ),
        &pvc,
    );
    let out: PersistentVolumeClaim = serde_json::from_value(out).unwrap();
    // The apiserver must accept what the webhook produced.
    pvcs.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &out,
    )
    .await
    .expect("patched PVC validates on the apiserver");

    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "vm-", "namespace": ns.name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}],
                 "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}]}});
    let out = patched(
        &webhook,
        Resource::Pod,
        &review(&ns.name, "Pod", "pods", pod.clone()),
        &pod,
    );
    let out: Pod = serde_json::from_value(out).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &out,
    )
    .await
    .expect("patched Pod validates on the apiserver");
    for t in tasks {
        t.abort();
    }
}
