//! Phase `installed`: vmdisk installed as a user installs it, running as pods on the real node.
//!
//! The images are built by `deploy/images/build.sh` and pushed to `VMDISK_E2E_REGISTRY`, a
//! plain-HTTP registry that this machine and the cluster's nodes and pods reach. An overlay of
//! `deploy/` pins them with kustomize `images:` (and, for the test, keeps the webhook and the
//! controller on the real node, moves the node cache to a scratch directory and shortens the
//! populator's retries); cert-manager's
//! CRDs are present but no cert-manager runs, so `certs/no-cert-manager.sh` makes the
//! certificate. Fake nodes are cordoned so that pods the populator makes land where pods run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use vmdisk_crds::{
    node_cache_label_key, CacheEntryState, ImagePhase, NodeDiskCache, VMDiskImage,
    INSTALL_NAMESPACE, POPULATOR_FINALIZER,
};
use vmdisk_tests::disks::{make_ext4_raw, same_content, to_format};
use vmdisk_tests::images::{build_and_push, cannot_build, BuiltImages};
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;
use vmdisk_tests::throttle::ThrottledProxy;

use crate::support::{api_error, create_image, wait_for, Env};
use crate::{cases, Case, Phase};

/// A plain-HTTP registry this machine and the cluster's nodes and pods reach (host:port).
pub const REGISTRY_ENV: &str = "VMDISK_E2E_REGISTRY";
const WAIT: Duration = Duration::from_secs(240);

pub fn phase() -> Phase<Installed> {
    Phase {
        name: "installed",
        cases: cases![
            installed_as_a_user_does_and_running_on_the_real_node,
            a_filesystem_pvc_is_filled_cold_then_warm_and_kubevirt_can_use_it,
            a_1mi_claim_of_an_image_no_node_has_warmed_holds_the_whole_disk,
            a_block_pvc_is_filled_on_a_local_loop_device,
            wait_for_first_consumer_follows_the_real_scheduler,
            a_pvc_deleted_mid_way_leaves_nothing_behind,
            a_failing_populator_is_retried_then_given_up,
            a_refused_image_fails_at_once,
            the_controller_killed_mid_way_still_finishes,
            the_walkthrough_examples_apply_as_they_are,
        ],
        exclusive: cases![an_outage_refuses_only_vmdisk_pvcs_and_says_what_to_do],
    }
}

pub struct Installed {
    pub env: Env,
    pub admin: Client,
    /// host:port of the registry nodes pull from.
    pub registry: String,
    pub images: BuiltImages,
    pub real_node: String,
    /// The node cache on the real node (a hostPath on this machine).
    pub cache_dir: PathBuf,
    overlay: PathBuf,
    cordoned: Vec<String>,
}

fn is_real(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .is_some_and(|i| !i.kubelet_version.is_empty())
}

/// The node's pressure conditions that are true (`DiskPressure: <message>`).
fn under_pressure(node: &Node) -> Vec<String> {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions
        .into_iter()
        .flatten()
        .filter(|c| c.type_.ends_with("Pressure") && c.status == "True")
        .map(|c| format!("{}: {}", c.type_, c.message.as_deref().unwrap_or("")))
        .collect()
}

impl Installed {
    pub async fn setup(env: Env) -> Result<Self, String> {
        let registry = std::env::var(REGISTRY_ENV).map_err(|_| {
            format!("{REGISTRY_ENV} is not set (a plain-HTTP registry, host:port, that this machine and the cluster's nodes reach)")
        })?;
        if let Some(reason) = cannot_build() {
            return Err(reason);
        }
        let admin = env.admin().await;
        let nodes: Api<Node> = Api::all(admin.clone());
        let all = nodes.list(&ListParams::default()).await.unwrap().items;
        let real_node = all
            .iter()
            .find(|n| is_real(n))
            .map(|n| n.name_any())
            .ok_or("no node of the cluster runs pods (a real kubelet)")?;
        let pressure = all
            .iter()
            .filter(|n| n.name_any() == real_node)
            .flat_map(under_pressure)
            .collect::<Vec<_>>();
        // Under pressure the kubelet evicts pods and garbage-collects images, the sandbox
        // image among them: nothing would start and every wait below would only time out.
        assert!(
            pressure.is_empty(),
            "node {real_node} reports {}: free what it lacks (disk: the filesystem holding the \
             kubelet's and containerd's directories) and run again",
            pressure.join(", ")
        );
        let images = tokio::task::spawn_blocking({
            let (root, bin_dir, registry) =
                (env.root.clone(), env.bin_dir.clone(), registry.clone());
            move || build_and_push(&root, &bin_dir, &registry, crate::support::image_tag())
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("building and pushing the images: {e}"));
        if let Some(dir) = &env.prereq_crds {
            env.kubectl(&["apply", "-f", &dir.display().to_string()]);
        }
        // Pods the populator makes must land where pods run.
        let mut cordoned = Vec::new();
        for node in all.iter().filter(|n| !is_real(n)) {
            nodes
                .patch(
                    &node.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"unschedulable": true}})),
                )
                .await
                .unwrap();
            cordoned.push(node.name_any());
        }
        let cache_dir = PathBuf::from(format!(
            "/var/tmp/vmdisk-e2e-cache-{:08x}",
            rand::random::<u32>()
        ));
        // kustomize wants the overlay's resources as relative paths.
        let overlay = env
            .root
            .join(format!("target/e2e-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&overlay).unwrap();
        let pin = |image: &str| {
            let (name, tag) = image.rsplit_once(':').unwrap();
            (name.to_string(), tag.to_string())
        };
        let (webhook_name, webhook_tag) = pin(&images.webhook);
        let (controller_name, controller_tag) = pin(&images.controller);
        let (agent_name, agent_tag) = pin(&images.cache_agent);
        let kustomization = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": ["../../deploy"],
            "images": [
                {"name": "ghcr.io/vmdisk/webhook", "newName": webhook_name, "newTag": webhook_tag},
                {"name": "ghcr.io/vmdisk/controller", "newName": controller_name, "newTag": controller_tag},
                {"name": "ghcr.io/vmdisk/cache-agent", "newName": agent_name, "newTag": agent_tag},
            ],
            "patches": [
                {"target": {"kind": "Deployment", "name": "vmdisk-webhook"}, "patch": json!([
                    {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {"kubernetes.io/hostname": real_node}},
                ]).to_string()},
                {"target": {"kind": "Deployment", "name": "vmdisk-controller"}, "patch": json!([
                    {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {"kubernetes.io/hostname": real_node}},
                    {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--populator-max-attempts=2"},
                    {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--populator-retry-seconds=1"},
                ]).to_string()},
                {"target": {"kind": "DaemonSet", "name": "vmdisk-cache-agent"}, "patch": json!([
                    {"op": "replace", "path": "/spec/template/spec/volumes/0/hostPath/path", "value": cache_dir},
                    {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--resync-seconds=5"},
                ]).to_string()},
            ],
        });
        std::fs::write(
            overlay.join("kustomization.yaml"),
            serde_yaml::to_string(&kustomization).unwrap(),
        )
        .unwrap();
        let overlay_arg = overlay
            .strip_prefix(&env.root)
            .unwrap()
            .display()
            .to_string();
        env.kubectl(&["apply", "-k", &overlay_arg]);
        // No cert-manager controller here: the fallback script makes the certificate.
        let out = std::process::Command::new("bash")
            .arg(env.root.join("certs/no-cert-manager.sh"))
            .env("KUBECONFIG", &env.kubeconfig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no-cert-manager.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        env.rollout(INSTALL_NAMESPACE, "deployment/vmdisk-webhook");
        env.rollout(INSTALL_NAMESPACE, "deployment/vmdisk-controller");
        let fixture = Self {
            env,
            admin,
            registry,
            images,
            real_node,
            cache_dir,
            overlay,
            cordoned,
        };
        fixture.wait_for_agent().await;
        Ok(fixture)
    }

    async fn wait_for_agent(&self) {
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), INSTALL_NAMESPACE);
        let node = self.real_node.clone();
        wait_for("the cache agent pod on the real node", WAIT, || {
            let pods = pods.clone();
            let node = node.clone();
            async move {
                let list = pods
                    .list(
                        &ListParams::default()
                            .labels("app.kubernetes.io/name=vmdisk-cache-agent")
                            .fields(&format!("spec.nodeName={node}")),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let ready = list.items.iter().any(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                });
                ready.then_some(()).ok_or_else(|| {
                    format!(
                        "{:?}",
                        list.items
                            .iter()
                            .map(|p| p.status.clone())
                            .collect::<Vec<_>>()
                    )
                })
            }
        })
        .await;
    }

    pub async fn teardown(&self) {
        crate::local::delete_case_namespaces(&self.env, &self.admin).await;
        let overlay_arg = self
            .overlay
            .strip_prefix(&self.env.root)
            .unwrap()
            .display()
            .to_string();
        let _ = self.env.kubectl_status(&[
            "delete",
            "-k",
            &overlay_arg,
            "--ignore-not-found",
            "--wait=false",
        ]);
        crate::local::uninstall(&self.env, &self.admin).await;
        let nodes: Api<Node> = Api::all(self.admin.clone());
        for node in &self.cordoned {
            let _ = nodes
                .patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"unschedulable": null}})),
                )
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.cache_dir);
        let _ = std::fs::remove_dir_all(&self.overlay);
    }

    /// The bridge registry, to push test disks to.
    fn registry(&self) -> TestRegistry {
        TestRegistry::running_at(&self.registry)
    }
}

/// Waits until the populator marks claim `namespace/name` Failed; returns its message.
async fn wait_given_up(admin: &Client, namespace: &str, name: &str) -> String {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), namespace);
    let failed = wait_for(&format!("claim {name} to be given up"), WAIT, || {
        let claims = claims.clone();
        async move {
            let c = claims.get(name).await.map_err(|e| e.to_string())?;
            (c.annotations().get("vmdisk.io/phase").map(String::as_str) == Some("Failed"))
                .then(|| c.clone())
                .ok_or(format!("{:?}", c.annotations()))
        }
    })
    .await;
    failed
        .annotations()
        .get("vmdisk.io/message")
        .cloned()
        .unwrap_or_default()
}

async fn wait_resolved(admin: &Client, namespace: &str, name: &str) -> VMDiskImage {
    let api: Api<VMDiskImage> = Api::namespaced(admin.clone(), namespace);
    wait_for(&format!("VMDiskImage {name} resolved"), WAIT, || {
        let api = api.clone();
        async move {
            let i = api.get(name).await.map_err(|e| e.to_string())?;
            i.digest()
                .is_some()
                .then_some(i.clone())
                .ok_or(format!("{:?}", i.status))
        }
    })
    .await
}

async fn create_pvc(
    admin: &Client,
    namespace: &str,
    pvc: serde_json::Value,
) -> PersistentVolumeClaim {
    let pvc: PersistentVolumeClaim = serde_json::from_value(pvc).unwrap();
    Api::<PersistentVolumeClaim>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap()
}

/// Waits until the claim is Bound; returns it and how long that took from `since`.
async fn wait_bound(
    admin: &Client,
    namespace: &str,
    name: &str,
    since: Instant,
) -> (PersistentVolumeClaim, Duration) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), namespace);
    let pvc = wait_for(&format!("PVC {namespace}/{name} Bound"), WAIT, || {
        let api = api.clone();
        async move {
            let p = api.get(name).await.map_err(|e| e.to_string())?;
            let bound = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            bound
                .then_some(p.clone())
                .ok_or(format!("{:?} {:?}", p.status, p.metadata.annotations))
        }
    })
    .await;
    (pvc, since.elapsed())
}

/// The Events recorded on an object, as (reason, note, times): repeats of an Event with the
/// same reason and action are one series.
async fn events_of(admin: &Client, namespace: &str, name: &str) -> Vec<(String, String, i32)> {
    let api: Api<Event> = Api::namespaced(admin.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            let times = e.series.as_ref().map_or(1, |s| s.count);
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                times,
            )
        })
        .collect()
}

/// Nothing of the population is left: no prime, no pod, no finalizer.
async fn assert_cleaned_up(admin: &Client, pvc: &PersistentVolumeClaim) {
    let uid = pvc.uid().unwrap();
    let primes: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(admin.clone(), &pvc.namespace().unwrap());
    let name = pvc.name_any();
    wait_for(
        "the prime PVC, the populator pod and the finalizer to go",
        WAIT,
        || {
            let (primes, pods, claims, uid, name) = (
                primes.clone(),
                pods.clone(),
                claims.clone(),
                uid.clone(),
                name.clone(),
            );
            async move {
                let prime = primes
                    .get_opt(&vmdisk_crds::prime_pvc_name(&uid))
                    .await
                    .map_err(|e| e.to_string())?;
                let pod = pods
                    .get_opt(&vmdisk_crds::populator_pod_name(&uid))
                    .await
                    .map_err(|e| e.to_string())?;
                let finalizer = claims
                    .get_opt(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_some_and(|c| c.finalizers().iter().any(|f| f == POPULATOR_FINALIZER));
                (prime.is_none() && pod.is_none() && !finalizer)
                    .then_some(())
                    .ok_or(format!(
                        "prime {} pod {} finalizer {finalizer}",
                        prime.is_some(),
                        pod.is_some()
                    ))
            }
        },
    )
    .await;
}

/// Runs a pod on the real node that mounts `claim` (a Filesystem mount at /vm, or a Block
/// device at /dev/vm) and `host_dir` at /src, and runs `script` with the agent image's shell
/// and qemu-img; returns its log. Fails when the script fails.
async fn check_pod(
    fx: &Installed,
    namespace: &str,
    claim: &str,
    block: bool,
    host_dir: &std::path::Path,
    script: &str,
) -> String {
    let name = format!("check-{claim}");
    let mut container = json!({
        "name": "check", "image": fx.images.cache_agent, "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "src", "mountPath": "/src", "readOnly": true}],
        "securityContext": {"runAsUser": 0},
    });
    if block {
        container["volumeDevices"] = json!([{"name": "vm", "devicePath": "/dev/vm"}]);
    } else {
        container["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "vm", "mountPath": "/vm"}));
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container],
                 "volumes": [{"name": "vm", "persistentVolumeClaim": {"claimName": claim}},
                             {"name": "src", "hostPath": {"path": host_dir}}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(fx.admin.clone(), namespace);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let phase = wait_for(&format!("pod {name} to finish"), WAIT, || {
        let pods = pods.clone();
        let name = name.clone();
        async move {
            let p = pods.get(&name).await.map_err(|e| e.to_string())?;
            match p.status.as_ref().and_then(|s| s.phase.clone()).as_deref() {
                Some(phase @ ("Succeeded" | "Failed")) => Ok(phase.to_string()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let log = pods
        .logs(&name, &Default::default())
        .await
        .unwrap_or_default();
    assert_eq!(phase, "Succeeded", "{name}: {log}");
    log
}

/// A containerDisk pushed to the bridge registry: (url as pods see it, local raw source).
async fn disk_image(
    fx: &Installed,
    dir: &std::path::Path,
    name: &str,
    size_mib: u64,
    data_mib: u64,
    seed: u64,
    qcow2: bool,
) -> (String, PathBuf) {
    let raw = make_ext4_raw(dir, name, size_mib, data_mib, seed);
    let layer = if qcow2 {
        to_format(&raw, "qcow2", false)
    } else {
        raw.clone()
    };
    let (reference, _) =
        push_container_disk(&fx.registry(), &format!("e2e/{name}"), "v1", &layer).await;
    (reference, raw)
}

/// The API server calls the webhook pod through its Service, with the caBundle
/// `certs/no-cert-manager.sh` patched in; the agent pod warms an image on the real node.
async fn installed_as_a_user_does_and_running_on_the_real_node(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let deployment = Api::<Deployment>::namespaced(admin.clone(), INSTALL_NAMESPACE)
        .get("vmdisk-webhook")
        .await
        .unwrap();
    assert_eq!(deployment.status.and_then(|s| s.ready_replicas), Some(2));
    // Both controller replicas are ready: one leads, the other stands by.
    let controller = Api::<Deployment>::namespaced(admin.clone(), INSTALL_NAMESPACE)
        .get("vmdisk-controller")
        .await
        .unwrap();
    assert_eq!(controller.status.and_then(|s| s.ready_replicas), Some(2));
    let hooks = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get("vmdisk")
        .await
        .unwrap();
    for hook in hooks.webhooks.unwrap() {
        assert!(
            hook.client_config
                .ca_bundle
                .is_some_and(|b| !b.0.is_empty()),
            "{}: no caBundle",
            hook.name
        );
        assert!(
            hook.client_config.service.is_some(),
            "{}: called through the Service",
            hook.name
        );
    }
    let ns = case.namespace("e2e-installed").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, _) = disk_image(&fx, work.path(), "warmed", 24, 2, 301, true).await;
    create_image(
        &admin,
        &ns,
        "warmed",
        json!({"source": {"registry": {"url": url, "insecure": true}}}),
    )
    .await;
    let image = wait_resolved(&admin, &ns, "warmed").await;
    let digest = image.digest().unwrap().to_string();
    // The agent pod on the real node warms it and says so.
    let caches: Api<NodeDiskCache> = Api::all(admin.clone());
    let node = fx.real_node.clone();
    wait_for("the agent pod to warm the image", WAIT, || {
        let (caches, node, digest) = (caches.clone(), node.clone(), digest.clone());
        async move {
            let c = caches.get(&node).await.map_err(|e| e.to_string())?;
            let ready = c.status.as_ref().is_some_and(|s| {
                s.entries
                    .iter()
                    .any(|e| e.digest == digest && e.state == CacheEntryState::Ready)
            });
            ready.then_some(()).ok_or(format!("{:?}", c.status))
        }
    })
    .await;
    let labels = Api::<Node>::all(admin.clone())
        .get(&fx.real_node)
        .await
        .unwrap()
        .labels()
        .clone();
    assert_eq!(
        labels
            .get(&node_cache_label_key(&digest).unwrap())
            .map(String::as_str),
        Some("ready")
    );
    // The image controller reports the warm node and the disk's size; the webhook sizes PVCs
    // from that once its own watch has it (a user waits for `kubectl get vmdi` to say Ready).
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &ns);
    let image = wait_for("the image Ready with its size", WAIT, || {
        let images = images.clone();
        async move {
            let i = images.get("warmed").await.map_err(|e| e.to_string())?;
            let status = i.status.clone().unwrap_or_default();
            (status.phase == Some(ImagePhase::Ready) && status.virtual_size.is_some())
                .then_some(status)
                .ok_or(format!("{:?}", i.status))
        }
    })
    .await;
    assert_eq!(image.warm_nodes, 1);
    let template = json!({"metadata": {"name": "mutated", "annotations": {"vmdisk.io/image": "warmed"}}, "spec": {}});
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    wait_for("the webhook to size PVCs from the image", WAIT, || {
        let claims = claims.clone();
        let pvc: PersistentVolumeClaim = serde_json::from_value(template.clone()).unwrap();
        async move {
            claims
                .create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &pvc,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    // Admission through the Service.
    let pvc = create_pvc(&admin, &ns, template).await;
    assert_eq!(pvc.annotations().get("vmdisk.io/digest"), Some(&digest));
    assert!(pvc.spec.unwrap().data_source_ref.is_some());
}

/// An annotated PVC of the default class: filled cold (the populator pod pulls), then a second
/// one from the cache the first left on the node; a pod mounting each finds KubeVirt's layout.
async fn a_filesystem_pvc_is_filled_cold_then_warm_and_kubevirt_can_use_it(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-fs").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "fedora", 64, 8, 302, true).await;
    // No prefetch: the first populate finds the cache cold.
    create_image(&admin, &ns, "fedora", json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "64Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "fedora").await;
    let mut times = Vec::new();
    for (name, expect) in [("cold", "cold: pulled"), ("warm", "warm: cache hit")] {
        let started = Instant::now();
        let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": "fedora"}}, "spec": {}})).await;
        let (bound, took) = wait_bound(&admin, &ns, name, started).await;
        times.push((name, took));
        let pv = Api::<PersistentVolume>::all(admin.clone())
            .get(bound.spec.as_ref().unwrap().volume_name.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(
            pv.annotations()
                .get("vmdisk.io/populated-from")
                .map(String::as_str),
            Some(format!("{ns}/fedora").as_str())
        );
        assert_cleaned_up(&admin, &pvc).await;
        let events = events_of(&admin, &ns, name).await;
        let finished = events
            .iter()
            .find(|(r, _, _)| r == "PopulatorFinished")
            .unwrap_or_else(|| panic!("{events:?}"));
        assert!(finished.1.contains(expect), "{name}: {finished:?}");
        assert!(
            events.iter().any(|(r, _, _)| r == "PopulatorCreated"),
            "{events:?}"
        );
        // The last status comes after the clean-up.
        let claims = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns);
        let claim = wait_for("the claim's phase Succeeded", WAIT, || {
            let claims = claims.clone();
            async move {
                let claim = claims.get(name).await.map_err(|e| e.to_string())?;
                let phase = claim.annotations().get("vmdisk.io/phase").cloned();
                (phase.as_deref() == Some("Succeeded"))
                    .then_some(claim)
                    .ok_or(format!("phase {phase:?}"))
            }
        })
        .await;
        assert_eq!(
            claim
                .annotations()
                .get("vmdisk.io/progress")
                .map(String::as_str),
            Some("100%")
        );
        // Where the time went; a step that failed, a second pod or a change the populator only
        // found through its safety net fails the case, however fast it was.
        let timeline = claim
            .annotations()
            .get("vmdisk.io/timeline")
            .cloned()
            .unwrap_or_else(|| panic!("{name}: no timeline: {:?}", claim.annotations()));
        println!("{name} fill timeline: {timeline}");
        for stage in [
            "prime +",
            "pod +",
            "scheduled +",
            "copied +",
            "rebound +",
            "bound +",
        ] {
            assert!(
                timeline.contains(stage),
                "{name}: {stage} missing: {timeline}"
            );
        }
        assert!(
            timeline.ends_with("; errors 0, extra attempts 0, missed changes 0"),
            "{name}: a retry nobody asked for: {timeline}"
        );
        // KubeVirt's view: /disk.img, raw, qemu's, the source disk.
        std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
        let log = check_pod(&fx, &ns, name, false, work.path(),
            "stat -c '%u:%g %s' /vm/disk.img && qemu-img info --output=json /vm/disk.img | grep '\"format\"' && qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw").await;
        assert!(log.contains("107:107"), "{log}");
        assert!(log.contains("\"format\": \"raw\""), "{log}");
        assert!(log.contains("Images are identical"), "{log}");
    }
    println!(
        "time from PVC create to Bound: cold {:.1}s, warm {:.1}s",
        times[0].1.as_secs_f64(),
        times[1].1.as_secs_f64()
    );
}

/// The cold path sizes its disks: the image controller reads the qcow2 header from the first
/// bytes of the layer (no node warms the image: `prefetch: false`), so a claim asking for 1Mi
/// is raised to the disk's size at admission; one admitted before the image existed keeps 1Mi,
/// and the populator provisions its volume at the disk's size instead. Both hold the disk.
async fn a_1mi_claim_of_an_image_no_node_has_warmed_holds_the_whole_disk(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-cold-size").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "coldsize", 96, 4, 304, true).await;
    let disk_bytes = std::fs::metadata(&raw).unwrap().len();
    let claim = |name: &str| {
        json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": "coldsize"}},
               "spec": {"resources": {"requests": {"storage": "1Mi"}}}})
    };
    // Admitted while the image does not exist yet: nothing knows the disk's size.
    let early = create_pvc(&admin, &ns, claim("early")).await;
    assert_eq!(
        early
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "1Mi"
    );
    create_image(&admin, &ns, "coldsize", json!({"source": {"registry": {"url": url, "insecure": true}}, "cache": {"prefetch": false}})).await;
    let image = wait_for("the image sized from its layer's first bytes", WAIT, || {
        let api: Api<VMDiskImage> = Api::namespaced(admin.clone(), &ns);
        async move {
            let i = api.get("coldsize").await.map_err(|e| e.to_string())?;
            let s = i.status.clone().unwrap_or_default();
            s.virtual_size
                .is_some()
                .then_some(s)
                .ok_or(format!("{:?}", i.status))
        }
    })
    .await;
    assert_eq!(image.virtual_size, Some(disk_bytes));
    assert_eq!(image.source_format.as_deref(), Some("qcow2"));
    assert_eq!(image.warm_nodes, 0, "no node has warmed it");
    let after = create_pvc(&admin, &ns, claim("after")).await;
    let raised = vmdisk_crds::parse_quantity(
        &after
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
    )
    .unwrap();
    assert!(raised >= disk_bytes, "raised at admission to {raised}");
    std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
    for name in ["early", "after"] {
        let (bound, _) = wait_bound(&admin, &ns, name, Instant::now()).await;
        let capacity = vmdisk_crds::parse_quantity(
            &bound.status.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
        )
        .unwrap();
        assert!(capacity >= disk_bytes, "{name}: a {capacity}-byte volume");
        let log = check_pod(
            &fx,
            &ns,
            name,
            false,
            work.path(),
            "qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw",
        )
        .await;
        assert!(log.contains("Images are identical"), "{name}: {log}");
    }
}

/// A Block claim on a local PV over a loop device: the raw disk lands on the device, the
/// stale bytes of its holes zeroed.
async fn a_block_pvc_is_filled_on_a_local_loop_device(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-block").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "block", 48, 4, 303, false).await;
    create_image(
        &admin,
        &ns,
        "block",
        json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "48Mi"}),
    )
    .await;
    wait_resolved(&admin, &ns, "block").await;
    let backing = work.path().join("device.img");
    std::fs::write(&backing, vec![0x5au8; 64 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    {
        let device = device.clone();
        case.defer(async move {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &device])
                .status();
        });
    }
    let class = format!("{ns}-local");
    let sc: StorageClass = serde_json::from_value(json!({"metadata": {"name": class},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"})).unwrap();
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    let pvc = create_pvc(
        &admin,
        &ns,
        json!({"metadata": {"name": "disk", "annotations": {"vmdisk.io/image": "block"}},
        "spec": {"volumeMode": "Block", "storageClassName": class}}),
    )
    .await;
    // A static PV binds a claim directly: reserve it for the populator's prime.
    let pv_name = format!("{ns}-loop");
    let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "storageClassName": class, "persistentVolumeReclaimPolicy": "Retain", "local": {"path": device},
                 "claimRef": {"namespace": INSTALL_NAMESPACE, "name": vmdisk_crds::prime_pvc_name(&pvc.uid().unwrap())},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": [fx.real_node]}]}]}}}})).unwrap();
    Api::<PersistentVolume>::all(admin.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    {
        let (admin, class, pv_name) = (admin.clone(), class.clone(), pv_name.clone());
        case.defer(async move {
            let _ = Api::<PersistentVolume>::all(admin.clone())
                .delete(&pv_name, &DeleteParams::default())
                .await;
            let _ = Api::<StorageClass>::all(admin)
                .delete(&class, &DeleteParams::default())
                .await;
        });
    }
    let (bound, took) = wait_bound(&admin, &ns, "disk", Instant::now()).await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(pv_name.as_str())
    );
    assert_cleaned_up(&admin, &pvc).await;
    let head = work.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&device).unwrap()[..48 << 20]).unwrap();
    assert!(
        same_content(&raw, &head),
        "the device holds the disk, holes zeroed"
    );
    println!("block: PVC Bound {:.1}s after create", took.as_secs_f64());
}

/// WaitForFirstConsumer: the real scheduler picks the node for the consumer, the populator
/// fills the volume there, and the consumer starts on it.
async fn wait_for_first_consumer_follows_the_real_scheduler(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-wffc").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "wffc", 32, 4, 304, true).await;
    create_image(
        &admin,
        &ns,
        "wffc",
        json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "32Mi"}),
    )
    .await;
    wait_resolved(&admin, &ns, "wffc").await;
    let class = format!("{ns}-wffc");
    let sc: StorageClass = serde_json::from_value(json!({"metadata": {"name": class},
        "provisioner": "kubernetes.io/host-path", "volumeBindingMode": "WaitForFirstConsumer"}))
    .unwrap();
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    {
        let (admin, class) = (admin.clone(), class.clone());
        case.defer(async move {
            let _ = Api::<StorageClass>::all(admin)
                .delete(&class, &DeleteParams::default())
                .await;
        });
    }
    let pvc = create_pvc(
        &admin,
        &ns,
        json!({"metadata": {"name": "root", "annotations": {"vmdisk.io/image": "wffc"}},
        "spec": {"storageClassName": class}}),
    )
    .await;
    std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
    // The consumer: scheduled by the real scheduler, started once the claim is filled.
    let log = check_pod(
        &fx,
        &ns,
        "root",
        false,
        work.path(),
        "qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw",
    )
    .await;
    assert!(log.contains("Images are identical"), "{log}");
    let claim = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns)
        .get("root")
        .await
        .unwrap();
    assert_eq!(
        claim
            .annotations()
            .get("volume.kubernetes.io/selected-node"),
        Some(&fx.real_node)
    );
    assert_cleaned_up(&admin, &pvc).await;
}

/// Deleting the claim while its populator pod pulls: pod, prime, PV, finalizer and the pod's
/// staging on the node all go.
async fn a_pvc_deleted_mid_way_leaves_nothing_behind(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-abort").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, _) = disk_image(&fx, work.path(), "abort", 96, 48, 305, false).await;
    // Slowed down so the claim can be deleted while the pull runs.
    let host = fx.registry.rsplit_once(':').unwrap().0.to_string();
    let proxy = ThrottledProxy::start(&host, &fx.registry, 2 << 20).await;
    let slow = url.replace(&fx.registry, &proxy.addr);
    create_image(&admin, &ns, "abort", json!({"source": {"registry": {"url": slow, "insecure": true}}, "size": "96Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "abort").await;
    let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": "doomed", "annotations": {"vmdisk.io/image": "abort"}}, "spec": {}})).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let pod_name = vmdisk_crds::populator_pod_name(&pvc.uid().unwrap());
    wait_for("the populator pod to run", WAIT, || {
        let (pods, pod_name) = (pods.clone(), pod_name.clone());
        async move {
            let p = pods.get_opt(&pod_name).await.map_err(|e| e.to_string())?;
            let running = p
                .as_ref()
                .and_then(|p| p.status.as_ref()?.phase.clone())
                .as_deref()
                == Some("Running");
            running
                .then_some(())
                .ok_or(format!("{:?}", p.and_then(|p| p.status)))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    claims
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the claim to go", WAIT, || {
        let claims = claims.clone();
        async move {
            claims
                .get_opt("doomed")
                .await
                .map_err(|e| e.to_string())?
                .map_or(Ok(()), |c| Err(format!("{:?}", c.finalizers())))
        }
    })
    .await;
    assert_cleaned_up(&admin, &pvc).await;
    proxy.set_rate(1 << 30);
    // The node keeps no half-written staging.
    let staging = fx.cache_dir.join("staging");
    wait_for("the node's staging to empty", WAIT, || {
        let staging = staging.clone();
        async move {
            let left: Vec<_> = std::fs::read_dir(&staging)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            left.is_empty().then_some(()).ok_or(format!("{left:?}"))
        }
    })
    .await;
}

/// A registry that goes away after the image resolved: the pod fails, is retried once (the
/// overlay allows two attempts), then the claim is marked Failed with Events saying why.
async fn a_failing_populator_is_retried_then_given_up(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-retry").await;
    let host = fx.registry.rsplit_once(':').unwrap().0.to_string();
    let mut flaky = TestRegistry::start_plain_on(&host);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let raw = make_ext4_raw(work.path(), "flaky", 16, 1, 306);
    let (url, _) = push_container_disk(&flaky, "e2e/flaky", "v1", &raw).await;
    create_image(&admin, &ns, "flaky", json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "16Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "flaky").await;
    flaky.stop();
    let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": "flaky", "annotations": {"vmdisk.io/image": "flaky"}}, "spec": {}})).await;
    let message = wait_given_up(&admin, &ns, "flaky").await;
    assert!(
        message.contains("failed after 2 attempt(s), no attempts left"),
        "{message}"
    );
    // The Event follows the annotation.
    let events = wait_for("the Events of the failures", WAIT, || {
        let admin = admin.clone();
        let ns = ns.clone();
        async move {
            let events = events_of(&admin, &ns, "flaky").await;
            let failures: Vec<&String> = events
                .iter()
                .filter(|(r, _, _)| r == "PopulatorFailed")
                .map(|(_, n, _)| n)
                .collect();
            let retried = failures
                .iter()
                .any(|n| n.contains("attempt 1 of 2 failed, retrying"));
            let given_up = failures.iter().any(|n| n.contains("no attempts left"));
            (retried && given_up)
                .then_some(events.clone())
                .ok_or(format!("{events:?}"))
        }
    })
    .await;
    let created: i32 = events
        .iter()
        .filter(|(r, _, _)| r == "PopulatorCreated")
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(created, 2, "two pods: {events:?}");
    assert_cleaned_up(&admin, &pvc).await;
}

/// An image vmdisk refuses (a qcow2 naming a backing file): no retry, the claim says why.
async fn a_refused_image_fails_at_once(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-refused").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let overlay = work.path().join("evil.qcow2");
    vmdisk_tests::disks::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow"])
            .arg(&overlay)
            .arg("16M"),
    );
    let (url, _) = push_container_disk(&fx.registry(), "e2e/evil", "v1", &overlay).await;
    create_image(&admin, &ns, "evil", json!({"source": {"registry": {"url": url, "insecure": true}}, "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "evil").await;
    let pvc = create_pvc(
        &admin,
        &ns,
        json!({"metadata": {"name": "evil", "annotations": {"vmdisk.io/image": "evil"}},
        "spec": {"resources": {"requests": {"storage": "32Mi"}}}}),
    )
    .await;
    let message = wait_given_up(&admin, &ns, "evil").await;
    assert!(
        message.contains("after 1 attempt(s), retrying cannot help")
            && message.contains("backing file"),
        "{message}"
    );
    assert_cleaned_up(&admin, &pvc).await;
}

/// The leading controller replica dies while a populator pod works: the other replica takes
/// the Lease over and finishes from what the cluster shows.
async fn the_controller_killed_mid_way_still_finishes(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-failover").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "failover", 64, 24, 308, false).await;
    let host = fx.registry.rsplit_once(':').unwrap().0.to_string();
    let proxy = ThrottledProxy::start(&host, &fx.registry, 4 << 20).await;
    create_image(&admin, &ns, "failover", json!({"source": {"registry": {"url": url.replace(&fx.registry, &proxy.addr), "insecure": true}}, "size": "64Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "failover").await;
    let started = Instant::now();
    let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": "survivor", "annotations": {"vmdisk.io/image": "failover"}}, "spec": {}})).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let pod_name = vmdisk_crds::populator_pod_name(&pvc.uid().unwrap());
    wait_for("the populator pod", WAIT, || {
        let (pods, pod_name) = (pods.clone(), pod_name.clone());
        async move {
            pods.get_opt(&pod_name)
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .ok_or_else(|| "not yet".into())
        }
    })
    .await;
    let lease = Api::<Lease>::namespaced(admin.clone(), INSTALL_NAMESPACE)
        .get("vmdisk-controller")
        .await
        .unwrap();
    let leader = lease.spec.and_then(|s| s.holder_identity).unwrap();
    pods.delete(&leader, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let killed = Instant::now();
    proxy.set_rate(1 << 30);
    let (_, bound) = wait_bound(&admin, &ns, "survivor", started).await;
    println!(
        "failover: PVC Bound {:.1}s after create, {:.1}s after the leader was killed",
        bound.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    assert_cleaned_up(&admin, &pvc).await;
    std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
    let log = check_pod(
        &fx,
        &ns,
        "survivor",
        false,
        work.path(),
        "qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw",
    )
    .await;
    assert!(log.contains("Images are identical"), "{log}");
    let checked = started.elapsed();
    fx.env
        .rollout(INSTALL_NAMESPACE, "deployment/vmdisk-controller");
    println!(
        "failover: disk checked {:.1}s after create, controller rolled out again at {:.1}s",
        checked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// The README's walkthrough: `deploy/examples/` applied as they are, through the installed
/// webhook. The image names a public registry the cluster may not reach, so the pod is only
/// dry-run (its image would be pulled) and nothing waits for a fill.
async fn the_walkthrough_examples_apply_as_they_are(fx: Arc<Installed>, case: Case) {
    const NAMESPACE: &str = "vms";
    let admin = case.admin();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
    wait_for("an earlier vms namespace to go", WAIT, || {
        let namespaces = namespaces.clone();
        async move {
            match namespaces.get_opt(NAMESPACE).await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still there".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    fx.env
        .kubectl(&["apply", "-f", "deploy/examples/1-image.yaml"]);
    let out = fx
        .env
        .kubectl(&["apply", "-f", "deploy/examples/2-pvcs.yaml"]);
    assert!(out.contains("fedora-root created"), "{out}");
    let dry = fx.env.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        "deploy/examples/3-pod.yaml",
    ]);
    assert!(dry.contains("disk-check created (server dry run)"), "{dry}");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NAMESPACE);
    let root = claims.get("fedora-root").await.unwrap();
    let source = root
        .spec
        .as_ref()
        .and_then(|s| s.data_source_ref.as_ref())
        .unwrap();
    assert_eq!(
        (source.kind.as_str(), source.name.as_str()),
        ("VMDiskImage", "fedora")
    );
    assert_eq!(
        root.labels().get("vmdisk.io/image").map(String::as_str),
        Some("fedora")
    );
    let size = &root
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["storage"];
    // spec.size 8Gi plus the filesystem overhead: the image is not resolved here.
    assert!(
        vmdisk_crds::parse_quantity(&size.0).unwrap() > 8 << 30,
        "{size:?}"
    );
    let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
}

/// With the webhook stopped: PVCs and pods that do not concern vmdisk are created at once;
/// a PVC naming a VMDiskImage is refused, naming what to fix.
async fn an_outage_refuses_only_vmdisk_pvcs_and_says_what_to_do(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-outage").await;
    let scale = |replicas: i32| {
        let admin = admin.clone();
        async move {
            Api::<Deployment>::namespaced(admin, INSTALL_NAMESPACE)
                .patch(
                    "vmdisk-webhook",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": replicas}})),
                )
                .await
                .unwrap();
        }
    };
    scale(0).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    wait_for("the webhook pods to go", WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=vmdisk-webhook"))
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .is_empty()
                .then_some(())
                .ok_or(format!("{} left", list.items.len()))
        }
    })
    .await;
    let timed = |what: &'static str, started: Instant| {
        let took = started.elapsed();
        println!(
            "outage: {what} created in {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        assert!(
            took < Duration::from_secs(2),
            "{what} waited {took:?} for a webhook that is down"
        );
    };
    let started = Instant::now();
    create_pvc(&admin, &ns, json!({"metadata": {"name": "plain"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}})).await;
    timed("a plain PVC", started);
    let started = Instant::now();
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "uses-plain"}, "spec": {
        "containers": [{"name": "c", "image": fx.images.cache_agent, "command": ["true"]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "plain"}}]}}))
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    timed("a pod using a PVC", started);
    let refused = api_error(
        Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "vm", "annotations": {"vmdisk.io/image": "fedora"}}, "spec": {}})).unwrap())
            .await,
    );
    println!("outage: a vmdisk PVC is refused: {}", refused.message);
    assert!(
        refused.message.contains("pvc.vmdisk.io") && refused.message.contains("vmdisk-webhook"),
        "{}",
        refused.message
    );
    scale(2).await;
    fx.env
        .rollout(INSTALL_NAMESPACE, "deployment/vmdisk-webhook");
    // Back: the same PVC is admitted.
    let again = create_pvc(&admin, &ns, json!({"metadata": {"name": "vm", "annotations": {"vmdisk.io/image": "fedora"}}, "spec": {"resources": {"requests": {"storage": "1Mi"}}}})).await;
    assert!(again.spec.unwrap().data_source_ref.is_some());
}
