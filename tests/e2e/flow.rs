//! vmdisk doing its job on a real control plane: images resolved by the controller, warmed by
//! the agents of the nodes their cache policy selects, PVCs completed by the webhook as the API
//! server calls it, and pods steered by the real scheduler.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use vmdisk_crds::{
    credentials_secret_name, node_cache_label_key, parse_quantity, CacheEntryState, ImagePhase,
    NodeDiskCache, VMDiskImage, CREDENTIALS_NAMESPACE,
};
use vmdisk_tests::disks::{make_ext4_raw, same_content, to_format};
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;
use vmdisk_tests::throttle::ThrottledProxy;
use vmdisk_webhook::mutate::pvc::volume_bytes_for_disk;

use crate::local::LocalInstall;
use crate::support::{create_image, pull_secret, wait_for};
use crate::Case;

const WAIT: Duration = Duration::from_secs(120);

/// Waits until the image is Ready on `node`; returns it. On a timeout the panic shows the
/// image's last status, the node's NodeDiskCache status and the components' logs.
async fn wait_ready(fx: &LocalInstall, namespace: &str, name: &str, node: &str) -> VMDiskImage {
    let api: Api<VMDiskImage> = Api::namespaced(fx.admin.clone(), namespace);
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        match api.get(name).await {
            Ok(image) => {
                let status = image.status.clone().unwrap_or_default();
                if status.phase == Some(ImagePhase::Ready) {
                    return image;
                }
                last = format!("{status:?}");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cache = Api::<NodeDiskCache>::all(fx.admin.clone())
        .get_opt(node)
        .await
        .map(|c| format!("{:?}", c.and_then(|c| c.status)))
        .unwrap_or_else(|e| e.to_string());
    panic!(
        "VMDiskImage {namespace}/{name} Ready on {node}: last status {last}\nNodeDiskCache {node}: {cache}\nagent log:\n{}\ncontroller log:\n{}\nwebhook log:\n{}",
        fx.agent_log(node),
        fx.controller_log(),
        fx.webhook_log()
    )
}

/// (node, entry state) of every NodeDiskCache row for `digest`.
async fn cache_rows(admin: &Client, digest: &str) -> Vec<(String, CacheEntryState, bool)> {
    let caches: Api<NodeDiskCache> = Api::all(admin.clone());
    let mut rows = Vec::new();
    for cache in caches.list(&Default::default()).await.unwrap().items {
        for e in cache.status.iter().flat_map(|s| s.entries.iter()) {
            if e.digest == digest {
                rows.push((cache.name_any(), e.state, e.pinned));
            }
        }
    }
    rows
}

async fn nodes_labelled(admin: &Client, digest: &str) -> Vec<String> {
    let key = node_cache_label_key(digest).unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|n| n.labels().get(&key).map(String::as_str) == Some("ready"))
        .map(|n| n.name_any())
        .collect()
}

/// A VMDiskImage on a TLS + htpasswd registry (pull secret + caBundle), warmed only on the node
/// its cache policy selects; both PVC forms admitted by the API server through the webhook with
/// digest and size; a pod using one steered to the warm node by the real scheduler.
pub async fn private_image_is_resolved_warmed_where_selected_and_steers_pods(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let ns = case.namespace("e2e-private").await;
    let fakes = fx.fake_nodes();
    let node = fakes[1 % fakes.len()].clone();
    let registry = TestRegistry::start_tls_htpasswd("e2e", "pa55word");
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "private", 32, 4, 1001);
    let qcow2 = to_format(&raw, "qcow2", false);
    let (reference, digest) = push_container_disk(&registry, "disks/private", "v1", &qcow2).await;
    pull_secret(&case.admin(), &ns, &registry.addr, "e2e", "pa55word").await;
    create_image(
        &case.admin(),
        &ns,
        "private",
        json!({"source": {"registry": {"url": reference, "pullSecretRef": {"name": "registry-credentials"},
                                      "caBundle": registry.ca_pem().unwrap()}},
               "format": "raw", "cache": {"nodeSelector": {"kubernetes.io/hostname": node}}}),
    )
    .await;

    let image = wait_ready(&fx, &ns, "private", &node).await;
    let status = image.status.clone().unwrap();
    assert_eq!(status.digest.as_deref(), Some(digest.as_str()));
    assert_eq!(status.warm_nodes, 1);
    assert_eq!(status.virtual_size, Some(32 << 20));
    assert_eq!(status.virtual_size_quantity.as_deref(), Some("32Mi"));
    assert_eq!(status.source_format.as_deref(), Some("qcow2"));
    assert!(
        status.conditions.iter().all(|c| c.status == "True"),
        "{:?}",
        status.conditions
    );

    // The agents got credentials for this registry only, in the credentials namespace.
    let copy = Api::<Secret>::namespaced(case.admin().clone(), CREDENTIALS_NAMESPACE)
        .get(&credentials_secret_name(&image.uid().unwrap()))
        .await
        .expect("the credentials copy");
    let config: serde_json::Value =
        serde_json::from_slice(&copy.data.unwrap()[".dockerconfigjson"].0).unwrap();
    assert_eq!(
        config["auths"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        [&registry.addr]
    );

    // Warm on the selected node only; only it is labelled.
    let rows = cache_rows(&case.admin(), &digest).await;
    assert_eq!(
        rows,
        [(node.clone(), CacheEntryState::Ready, false)],
        "{rows:?}"
    );
    assert_eq!(
        nodes_labelled(&case.admin(), &digest).await,
        std::slice::from_ref(&node)
    );

    // PVCs, as the API server admits them through the webhook.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(case.admin().clone(), &ns);
    let annotated: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "by-annotation", "annotations": {"vmdisk.io/image": "private"}},
        "spec": {}
    }))
    .unwrap();
    let created = pvcs
        .create(&PostParams::default(), &annotated)
        .await
        .unwrap();
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.data_source_ref.as_ref().unwrap().name, "private");
    assert_eq!(
        spec.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    let storage = &spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0;
    assert_eq!(
        parse_quantity(storage).unwrap(),
        volume_bytes_for_disk(32 << 20, true, vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD)
    );
    assert_eq!(created.annotations().get("vmdisk.io/digest"), Some(&digest));
    assert_eq!(
        created.labels().get("vmdisk.io/image").map(String::as_str),
        Some("private")
    );

    let explicit: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "by-reference"},
        "spec": {"dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "private"},
                 "volumeMode": "Block", "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Mi"}}}
    }))
    .unwrap();
    let created = pvcs
        .create(&PostParams::default(), &explicit)
        .await
        .unwrap();
    let spec = created.spec.clone().unwrap();
    let storage = &spec.resources.unwrap().requests.unwrap()["storage"].0;
    assert_eq!(
        parse_quantity(storage).unwrap(),
        32 << 20,
        "raised to the disk's size"
    );
    assert_eq!(created.annotations().get("vmdisk.io/digest"), Some(&digest));

    // Placement: a WaitForFirstConsumer class; the scheduler picks the node for the claim.
    let class_name = format!("{ns}-wffc");
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class_name},
        "provisioner": "kubernetes.io/host-path",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .unwrap();
    let classes: Api<StorageClass> = Api::all(case.admin().clone());
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let doomed = class_name.clone();
    let admin = case.admin().clone();
    case.defer(async move {
        let _ = Api::<StorageClass>::all(admin)
            .delete(&doomed, &DeleteParams::default())
            .await;
    });
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "vm-root", "annotations": {"vmdisk.io/image": "private"}},
        "spec": {"storageClassName": class_name}
    }))
    .unwrap();
    pvcs.create(&PostParams::default(), &claim).await.unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "vm"},
        "spec": {"containers": [{"name": "vm", "image": "registry.invalid/virt-launcher:never"}],
                 "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "vm-root"}}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(case.admin().clone(), &ns);
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let terms = created
        .spec
        .unwrap()
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.preferred_during_scheduling_ignored_during_execution)
        .unwrap_or_default();
    let key = node_cache_label_key(&digest).unwrap();
    assert!(
        terms.iter().any(|t| t
            .preference
            .match_expressions
            .iter()
            .flatten()
            .any(|e| e.key == key)),
        "the webhook adds a preferred term toward warm nodes: {terms:?}"
    );
    let selected = wait_for("the scheduler's choice for vm-root", WAIT, || {
        let pvcs = pvcs.clone();
        async move {
            let pvc = pvcs.get("vm-root").await.map_err(|e| e.to_string())?;
            pvc.annotations()
                .get("volume.kubernetes.io/selected-node")
                .cloned()
                .ok_or_else(|| format!("{:?}", pvc.metadata.annotations))
        }
    })
    .await;
    assert_eq!(selected, node, "the real scheduler picks the warm node");

    // Another team, without the credentials, names the same digest: under the private
    // repository and under one it made up. Neither image resolves (the registry is asked with
    // the team's own, absent, credentials), so neither becomes Ready nor gets a digest a
    // node could serve; each says why in its Resolved condition.
    let other = case.namespace("e2e-team-b").await;
    for (name, url, expected) in [
        (
            "borrowed",
            format!("{}/disks/private@{digest}", registry.addr),
            "refused the credentials",
        ),
        (
            "elsewhere",
            format!("{}/team-b/nothing@{digest}", registry.addr),
            "refused the credentials",
        ),
    ] {
        create_image(
            &case.admin(),
            &other,
            name,
            json!({"source": {"registry": {"url": url, "caBundle": registry.ca_pem().unwrap()}},
                   "format": "raw", "cache": {"nodeSelector": {"kubernetes.io/hostname": node}}}),
        )
        .await;
        let api: Api<VMDiskImage> = Api::namespaced(case.admin().clone(), &other);
        let status = wait_for(&format!("{other}/{name} refused"), WAIT, || {
            let api = api.clone();
            async move {
                let status = api
                    .get(name)
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                let resolved = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Resolved" && c.status == "False");
                resolved
                    .is_some()
                    .then(|| status.clone())
                    .ok_or(format!("{status:?}"))
            }
        })
        .await;
        assert_ne!(status.phase, Some(ImagePhase::Ready), "{name}: {status:?}");
        assert_eq!(status.digest, None, "{name}: {status:?}");
        let message = &status
            .conditions
            .iter()
            .find(|c| c.type_ == "Resolved")
            .unwrap()
            .message;
        assert!(message.contains(expected), "{name}: {message}");
    }
}

/// An agent SIGKILLed while pulling leaves no entry and no staging behind once restarted, and
/// the restarted agent completes the warm.
pub async fn an_agent_killed_mid_warm_finishes_after_restart(fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("e2e-restart").await;
    let fakes = fx.fake_nodes();
    let node = fakes[2 % fakes.len()].clone();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "restart", 64, 24, 2002);
    let (_, digest) = push_container_disk(&registry, "disks/restart", "v1", &raw).await;
    // ~3 s of pulling: long enough to be killed in the middle of it.
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, 4 << 20).await;
    create_image(
        &case.admin(),
        &ns,
        "restart",
        json!({"source": {"registry": {"url": format!("{}/disks/restart:v1", proxy.addr), "insecure": true}},
               "cache": {"nodeSelector": {"kubernetes.io/hostname": node}}}),
    )
    .await;
    let cache = fx.cache_dir(&node);
    let staging = cache.join("staging");
    wait_for("the agent to start pulling", WAIT, || {
        let staging = staging.clone();
        async move {
            let busy = std::fs::read_dir(&staging)
                .map(|d| d.count() > 0)
                .unwrap_or(false);
            busy.then_some(())
                .ok_or_else(|| "staging empty".to_string())
        }
    })
    .await;
    fx.kill_agent(&node);
    let entries = cache.join("entries");
    let committed = std::fs::read_dir(&entries).map(|d| d.count()).unwrap_or(0);
    assert_eq!(committed, 0, "nothing is committed mid-pull");
    proxy.set_rate(1 << 30);
    fx.start_agent(&node);
    wait_ready(&fx, &ns, "restart", &node).await;
    let rows = cache_rows(&case.admin(), &digest).await;
    assert_eq!(rows, [(node.clone(), CacheEntryState::Ready, false)]);
    let leftovers: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "staging after restart: {leftovers:?}");
    let disk = std::fs::read_dir(&entries)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains(&digest[7..20]))
        .expect("the committed entry")
        .path()
        .join("disk.raw");
    assert!(
        same_content(&raw, &disk),
        "the warmed disk equals the source"
    );
}

/// Deleting a VMDiskImage takes its node label and the agents' copy of its credentials with it;
/// the cache entry stays (unpinned) until the budget needs the room.
pub async fn deleting_an_image_clears_its_label_and_credentials(fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("e2e-delete").await;
    let fakes = fx.fake_nodes();
    let node = fakes[0].clone();
    let registry = TestRegistry::start_tls_htpasswd("del", "ete");
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "delete", 16, 2, 3003);
    let (reference, digest) = push_container_disk(&registry, "disks/delete", "v1", &raw).await;
    pull_secret(&case.admin(), &ns, &registry.addr, "del", "ete").await;
    create_image(
        &case.admin(),
        &ns,
        "doomed",
        json!({"source": {"registry": {"url": reference, "pullSecretRef": {"name": "registry-credentials"},
                                      "caBundle": registry.ca_pem().unwrap()}},
               "cache": {"nodeSelector": {"kubernetes.io/hostname": node}, "pinned": true}}),
    )
    .await;
    let image = wait_ready(&fx, &ns, "doomed", &node).await;
    assert_eq!(
        nodes_labelled(&case.admin(), &digest).await,
        std::slice::from_ref(&node)
    );
    assert_eq!(
        cache_rows(&case.admin(), &digest).await,
        [(node.clone(), CacheEntryState::Ready, true)]
    );
    let copies: Api<Secret> = Api::namespaced(case.admin().clone(), CREDENTIALS_NAMESPACE);
    let copy_name = credentials_secret_name(&image.uid().unwrap());
    copies.get(&copy_name).await.expect("the credentials copy");

    Api::<VMDiskImage>::namespaced(case.admin().clone(), &ns)
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the node label to go", WAIT, || {
        let admin = case.admin().clone();
        let digest = digest.clone();
        async move {
            let labelled = nodes_labelled(&admin, &digest).await;
            labelled
                .is_empty()
                .then_some(())
                .ok_or(format!("{labelled:?}"))
        }
    })
    .await;
    wait_for("the credentials copy to go", WAIT, || {
        let copies = copies.clone();
        let copy_name = copy_name.clone();
        async move {
            match copies
                .get_opt(&copy_name)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(_) => Err("still there".into()),
            }
        }
    })
    .await;
    wait_for("the entry to be unpinned", WAIT, || {
        let admin = case.admin().clone();
        let digest = digest.clone();
        let node = node.clone();
        async move {
            let rows = cache_rows(&admin, &digest).await;
            (rows == [(node, CacheEntryState::Ready, false)])
                .then_some(())
                .ok_or(format!("{rows:?}"))
        }
    })
    .await;
}
