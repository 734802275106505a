//! The objects the populator makes, built from plain values: the prime PVC, the populator pod
//! and the PV patch that hands the filled volume to the user's PVC.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::ResourceExt;
use serde_json::json;
use vmdisk_crds::{
    format_bytes_quantity, node_cache_label_key, populator_pod_name, prime_pvc_name,
    usable_disk_bytes, volume_bytes_for_disk, ImageReference, VMDiskImage, ATTEMPT_ANNOTATION,
    CLAIM_ANNOTATION, CLAIM_UID_LABEL, COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL,
    POPULATED_FROM_ANNOTATION, POPULATOR_COMPONENT, POPULATOR_SERVICE_ACCOUNT, QEMU_UID,
    SELECTED_NODE_ANNOTATION,
};

use super::PopulatorConfig;
use crate::credentials::DOCKER_CONFIG_KEY;

/// Where the populator pod sees the volume.
pub const FILESYSTEM_MOUNT: &str = "/target";
pub const DISK_FILE: &str = "disk.img";
pub const BLOCK_DEVICE: &str = "/dev/vmdisk-target";
/// Where the populator pod sees its pull credentials (a Secret volume).
pub const CREDENTIALS_MOUNT: &str = "/var/run/vmdisk/credentials";
const CREDENTIALS_VOLUME: &str = "credentials";
/// Where a node-pull populator pod sees the containerDisk (an image volume).
pub const IMAGE_MOUNT: &str = "/var/run/vmdisk/image";
const IMAGE_VOLUME: &str = "image";

/// Where the populator pod gets the disk, and so where it may run.
#[derive(Debug, Clone, Copy)]
pub enum PodSource<'a> {
    /// From the node cache (warming it from the registry when cold); on `node` when the
    /// claim's node is chosen (WaitForFirstConsumer), else preferring nodes that hold the disk.
    Cache { node: Option<&'a str> },
    /// From the image mounted by the node's runtime, on one of these nodes (which mount image
    /// volumes).
    Runtime { nodes: &'a [String] },
}

fn labels(claim_uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (COMPONENT_LABEL.to_string(), POPULATOR_COMPONENT.to_string()),
        (CLAIM_UID_LABEL.to_string(), claim_uid.to_string()),
    ])
}

fn claim_key(pvc: &PersistentVolumeClaim) -> String {
    format!("{}/{}", pvc.namespace().unwrap_or_default(), pvc.name_any())
}

/// True for a Block-mode claim.
pub fn is_block(pvc: &PersistentVolumeClaim) -> bool {
    pvc.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block")
}

/// The requested size of a claim, in bytes.
pub fn requested_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    let text = &pvc
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?
        .0;
    vmdisk_crds::parse_quantity(text).ok()
}

/// Bytes the prime PVC asks for: the claim's request, or the disk's need when that is more (a
/// claim admitted before its image's size was known asks for less than the disk). A PV larger
/// than its claim binds to it all the same.
pub fn prime_bytes(
    pvc: &PersistentVolumeClaim,
    image: &VMDiskImage,
    config: &PopulatorConfig,
) -> Option<u64> {
    let needed = image
        .status
        .as_ref()
        .and_then(|s| s.virtual_size)
        .map(|disk| volume_bytes_for_disk(disk, !is_block(pvc), config.filesystem_overhead));
    requested_bytes(pvc).max(needed)
}

/// The prime PVC: the user's claim without its data source, in vmdisk's namespace, so the
/// storage class provisions an empty volume (on the selected node, for WaitForFirstConsumer),
/// as large as the disk needs.
pub fn prime_pvc(
    pvc: &PersistentVolumeClaim,
    image: &VMDiskImage,
    config: &PopulatorConfig,
    selected_node: Option<&str>,
) -> PersistentVolumeClaim {
    let uid = pvc.uid().unwrap_or_default();
    let mut spec = pvc.spec.clone().unwrap_or_default();
    if let Some(bytes) = prime_bytes(pvc, image, config) {
        if Some(bytes) > requested_bytes(pvc) {
            let resources = spec.resources.get_or_insert_with(Default::default);
            resources
                .requests
                .get_or_insert_with(Default::default)
                .insert(
                    "storage".to_string(),
                    Quantity(format_bytes_quantity(bytes)),
                );
        }
    }
    let mut annotations = BTreeMap::from([(CLAIM_ANNOTATION.to_string(), claim_key(pvc))]);
    if let Some(node) = selected_node {
        annotations.insert(SELECTED_NODE_ANNOTATION.to_string(), node.to_string());
    }
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(prime_pvc_name(&uid)),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels(&uid)),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: spec.access_modes,
            resources: spec.resources,
            storage_class_name: spec.storage_class_name,
            volume_mode: spec.volume_mode,
            ..Default::default()
        }),
        status: None,
    }
}

/// The populator pod: `vmdisk-cache-agent populate` from the agent's image, the prime PVC as a
/// block device or a mount (the disk sized to fit the prime), and the source: the node cache
/// mounted, or the image itself as an image volume (see [`PodSource`]).
pub fn populator_pod(
    pvc: &PersistentVolumeClaim,
    prime_claim: &PersistentVolumeClaim,
    image: &VMDiskImage,
    digest: &str,
    config: &PopulatorConfig,
    attempt: u32,
    source_of_disk: PodSource,
) -> Result<Pod, String> {
    let on_node = matches!(source_of_disk, PodSource::Runtime { .. });
    let uid = pvc.uid().unwrap_or_default();
    let source = &image.spec.source.registry;
    let reference = ImageReference::parse(&source.url)
        .map_err(|e| e.to_string())?
        .with_digest(digest)
        .to_string();
    let prime = prime_pvc_name(&uid);
    let block = is_block(pvc);
    let target = if block {
        BLOCK_DEVICE.to_string()
    } else {
        format!("{FILESYSTEM_MOUNT}/{DISK_FILE}")
    };
    let mut args = vec![
        "populate".to_string(),
        reference.clone(),
        "--format".into(),
        image.spec.format.to_string(),
        "--target".into(),
        target,
        "--termination-log".into(),
        "/dev/termination-log".into(),
        "--progress-pvc".into(),
        format!("{}/{prime}", config.namespace),
    ];
    if on_node {
        args.extend(["--source-dir".into(), IMAGE_MOUNT.into()]);
    } else {
        args.extend([
            "--cache-dir".into(),
            config.node_cache_dir.clone(),
            "--parallel-copies".into(),
            config.parallel_copies.to_string(),
        ]);
    }
    if !block {
        let volume = requested_bytes(prime_claim).ok_or("the claim requests no storage size")?;
        args.extend([
            "--size".into(),
            usable_disk_bytes(volume, config.filesystem_overhead).to_string(),
            "--owner".into(),
            format!("{QEMU_UID}:{QEMU_UID}"),
        ]);
    }
    // The node's runtime pulls with its own configuration and the pod's pull secret.
    if source.insecure == Some(true) && !on_node {
        args.push("--insecure".into());
    }
    let credentials = source.pull_secret_ref.is_some();
    if credentials && !on_node {
        args.extend([
            "--docker-config".into(),
            format!("{CREDENTIALS_MOUNT}/{DOCKER_CONFIG_KEY}"),
        ]);
    }
    let mut env = vec![json!({"name": "RUST_LOG", "value": "info"})];
    if let (Some(pem), false) = (&source.ca_bundle, on_node) {
        env.push(json!({"name": "VMDISK_CA_BUNDLE", "value": pem}));
    }
    let source_mount = if on_node {
        json!({"name": IMAGE_VOLUME, "mountPath": IMAGE_MOUNT, "readOnly": true})
    } else {
        json!({"name": "cache", "mountPath": config.node_cache_dir})
    };
    let mut device = if block {
        json!({"volumeDevices": [{"name": "target", "devicePath": BLOCK_DEVICE}],
               "volumeMounts": [source_mount, {"name": "tmp", "mountPath": "/tmp"}]})
    } else {
        json!({"volumeMounts": [{"name": "target", "mountPath": FILESYSTEM_MOUNT},
                                source_mount,
                                {"name": "tmp", "mountPath": "/tmp"}]})
    };
    if credentials && !on_node {
        device["volumeMounts"].as_array_mut().expect("a list").push(
            json!({"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_MOUNT, "readOnly": true}),
        );
    }
    let mut container = json!({
        "name": "populate",
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vmdisk-cache-agent"],
        "args": args,
        "env": env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        // A small CPU request: most populates wait on I/O (or a copy slot), and each pod's
        // request holds its share of the node while it runs: at 100m a 2-core node took 17 of a
        // burst of 100 at once and the scheduler held back the rest. No CPU limit.
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        // Root writes the root-owned node cache and gives disk.img to qemu's user; nothing else.
        "securityContext": {"runAsUser": 0, "runAsGroup": 0, "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}},
    });
    for (k, v) in device.as_object().expect("an object") {
        container[k] = v.clone();
    }
    let source_volume = if on_node {
        // Pinned to the resolved digest; the kubelet checks the pod may use it.
        json!({"name": IMAGE_VOLUME, "image": {"reference": reference, "pullPolicy": "IfNotPresent"}})
    } else {
        json!({"name": "cache", "hostPath": {"path": config.node_cache_dir, "type": "DirectoryOrCreate"}})
    };
    let mut spec = json!({
        "restartPolicy": "Never",
        "serviceAccountName": POPULATOR_SERVICE_ACCOUNT,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "target", "persistentVolumeClaim": {"claimName": prime}},
            source_volume,
            // The root filesystem is read-only; qemu-img may want scratch space.
            {"name": "tmp", "emptyDir": {}},
        ],
    });
    // The pod's own copy of the credentials (see `credentials_secret_of`), read by the node's
    // kubelet: mounted for `populate` to pull with, or the kubelet's own pull secret.
    if credentials && on_node {
        spec["imagePullSecrets"] = json!([{"name": populator_pod_name(&uid)}]);
    } else if credentials {
        spec["volumes"].as_array_mut().expect("a list").push(json!(
            {"name": CREDENTIALS_VOLUME, "secret": {"secretName": populator_pod_name(&uid), "defaultMode": 0o400}}));
    }
    let required: Option<Vec<&str>> = match source_of_disk {
        PodSource::Cache { node } => node.map(|n| vec![n]),
        PodSource::Runtime { nodes } => Some(nodes.iter().map(String::as_str).collect()),
    };
    match required {
        // Through the scheduler, never `nodeName`: the node comes from the claim's
        // `selected-node` annotation, which a user can write too, and the scheduler keeps
        // honouring the node's taints and cordon for this root pod with a hostPath.
        Some(nodes) => {
            spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": nodes}]}]}}});
        }
        None => {
            if let Some(key) = node_cache_label_key(digest) {
                spec["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "preference": {"matchExpressions": [{"key": key, "operator": "Exists"}]}}]}});
            }
        }
    }
    // Only the taints the platform team listed (`--populator-tolerations`).
    if !config.tolerations.is_empty() {
        spec["tolerations"] =
            serde_json::to_value(&config.tolerations).map_err(|e| e.to_string())?;
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": populator_pod_name(&uid),
            "namespace": config.namespace,
            "labels": labels(&uid),
            "annotations": {CLAIM_ANNOTATION: claim_key(pvc), ATTEMPT_ANNOTATION: attempt.to_string()},
        },
        "spec": spec,
    });
    serde_json::from_value(pod).map_err(|e| format!("building the populator pod: {e}"))
}

/// The Secret a populator pod mounts its pull credentials from, which must exist before the pod
/// starts (written by the populator, owned by the prime PVC); `None` for an image without a
/// pull secret.
pub fn credentials_secret_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let mounted = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == CREDENTIALS_VOLUME)
        .and_then(|v| v.secret.as_ref()?.secret_name.clone());
    mounted.or_else(|| Some(spec.image_pull_secrets.as_ref()?.first()?.name.clone()))
}

/// True for a pod that mounts the image from the node's runtime (`pullMethod: node`).
pub fn pulls_on_node(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| {
            v.iter()
                .any(|v| v.name == IMAGE_VOLUME && v.image.is_some())
        })
}

/// The node a populator pod is held to (its required node affinity), if any.
pub fn required_node(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// The merge patch handing the prime's PV to the user's claim: the PV controller then binds
/// the claim and marks the prime Lost.
pub fn pv_rebind_patch(pvc: &PersistentVolumeClaim, image_name: &str) -> serde_json::Value {
    json!({
        "metadata": {"annotations": {
            POPULATED_FROM_ANNOTATION: format!("{}/{image_name}", pvc.namespace().unwrap_or_default())
        }},
        "spec": {"claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": pvc.namespace(),
            "name": pvc.name_any(),
            "uid": pvc.uid(),
            "resourceVersion": pvc.resource_version(),
        }},
    })
}
