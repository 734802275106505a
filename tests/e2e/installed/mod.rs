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

mod adverse;
pub(crate) mod claims;
mod fill;
mod install;
mod node_pull;
mod teams;

use adverse::*;
use fill::*;
use install::*;
use node_pull::*;
use teams::*;

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
            a_burst_of_claims_of_one_warm_image_all_bind_without_a_retry,
            a_block_pvc_is_filled_on_a_local_loop_device,
            two_teams_on_one_node_never_get_each_others_disk,
            pull_method_node_fills_from_the_runtime_or_falls_back,
            wait_for_first_consumer_follows_the_real_scheduler,
            a_pvc_deleted_mid_way_leaves_nothing_behind,
            a_failing_populator_is_retried_then_given_up,
            a_refused_image_fails_at_once,
            the_walkthrough_examples_apply_as_they_are,
        ],
        // These disturb the installation (the controller's leader killed, the webhook scaled
        // to zero): a claim of another case filled meanwhile would show a new leader's partial
        // timeline or a refused create.
        exclusive: cases![
            the_controller_killed_mid_way_still_finishes,
            an_outage_refuses_only_vmdisk_pvcs_and_says_what_to_do
        ],
        benchmark: false,
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
