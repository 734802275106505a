//! The volume populator: fills PVCs whose `dataSourceRef` names a VMDiskImage, with the
//! semantics of kubernetes-csi/lib-volume-populator (prime PVC in vmdisk's namespace, populator
//! pod, PV claimRef rebind, finalizer, Events), under the same Lease as the image controller.
//!
//! [`decide`] is the pure rule and [`objects`] builds what it creates; [`mod@reconcile`] performs
//! one step per call; [`sweep`] removes what vanished claims left; [`settings`] says how it
//! runs; [`run`] wires the watches.

pub mod decide;
pub mod objects;
pub mod reconcile;
pub mod settings;
pub mod sweep;
#[cfg(test)]
mod tests;
pub mod timeline;

use std::sync::Arc;

use crate::events::Recorder;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use vmdisk_crds::{
    AccessScope, ApiAccess, VMDiskImage, CLAIM_ANNOTATION, COMPONENT_LABEL, POPULATOR_COMPONENT,
};

use vmdisk_support::Failures;

use crate::metrics::PopulatorMetrics;
use crate::tasks::{Reflected, TaskGuard};
pub use reconcile::{error_policy, reconcile, Context, PopulatorError};
pub use settings::{PopulatorConfig, PopulatorSettings};

/// What the populator asks of the API server (besides the image controller's grants, which
/// include VMDiskImages and Events).
pub const API_ACCESS: &[ApiAccess] = &[
    // Every claim (to find the ones naming a VMDiskImage); finalizer and status annotations.
    ApiAccess::new(
        "",
        "persistentvolumeclaims",
        &["list", "watch", "patch"],
        AccessScope::Cluster,
    ),
    // Prime PVCs.
    ApiAccess::new(
        "",
        "persistentvolumeclaims",
        &["create", "delete", "patch"],
        AccessScope::InstallNamespace,
    ),
    ApiAccess::new(
        "",
        "pods",
        &["create", "delete", "list", "watch"],
        AccessScope::InstallNamespace,
    ),
    ApiAccess::new(
        "",
        "persistentvolumes",
        &["get", "patch"],
        AccessScope::Cluster,
    ),
    ApiAccess::new(
        "storage.k8s.io",
        "storageclasses",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
    // The cache agent DaemonSet: populator pods run its image on its cache directory.
    ApiAccess::new(
        "apps",
        "daemonsets",
        &["list", "watch"],
        AccessScope::InstallNamespace,
    ),
];

/// The user PVC a prime PVC or populator pod works for (`vmdisk.io/claim: <ns>/<name>`).
fn claim_of(object: &impl ResourceExt) -> Option<ObjectRef<PersistentVolumeClaim>> {
    let (namespace, name) = object
        .annotations()
        .get(CLAIM_ANNOTATION)?
        .split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

/// Claims that may wait for a populator pod: those naming a VMDiskImage, not bound yet.
fn waiting_for_pods(
    claims: &[Arc<PersistentVolumeClaim>],
) -> Vec<ObjectRef<PersistentVolumeClaim>> {
    claims
        .iter()
        .filter(|c| decide::referenced_image(c).ok().flatten().is_some())
        .filter(|c| {
            c.spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .is_none_or(str::is_empty)
        })
        .map(|c| ObjectRef::from_obj(&**c))
        .collect()
}

/// What the populator keeps of a claim that is not its concern (no VMDiskImage as its data
/// source, no finalizer of its own): its identity only. Every PVC of the cluster is watched
/// (nothing selects on a dataSourceRef), and most are other claims.
pub fn strip_unrelated_claim(pvc: &mut PersistentVolumeClaim) {
    let ours = !matches!(decide::referenced_image(pvc), Ok(None))
        || pvc
            .finalizers()
            .iter()
            .any(|f| f == vmdisk_crds::POPULATOR_FINALIZER);
    if !ours {
        let meta = std::mem::take(&mut pvc.metadata);
        *pvc = PersistentVolumeClaim {
            metadata: kube::api::ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                ..Default::default()
            },
            ..Default::default()
        };
    }
}

/// Runs the populator until the stop (reconciles in flight finish) or until the future is
/// dropped.
pub async fn run(
    client: Client,
    images: &Reflected<VMDiskImage>,
    config: PopulatorSettings,
    runtimes: crate::node_pull::NodeRuntimes,
    metrics: PopulatorMetrics,
    stop: vmdisk_support::process::Stop,
) {
    let selector = format!("{COMPONENT_LABEL}={POPULATOR_COMPONENT}");
    let classes = Reflected::spawn(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
    );
    let pods = Reflected::spawn(
        Api::<Pod>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().labels(&selector),
    );
    let primes = Reflected::spawn(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().labels(&selector),
    );
    let agents = Reflected::spawn(
        Api::<DaemonSet>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", config.agent_daemonset)),
    );
    let controller = crate::tasks::lean_controller(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
        strip_unrelated_claim,
        |_| {},
    )
    .graceful_shutdown_on(stop.cancelled_owned());
    let claims = controller.store();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "vmdisk-populator".into(),
                instance: None,
            },
        ),
        client: client.clone(),
        settings: config.clone(),
        agents: agents.store(),
        claims: claims.clone(),
        primes: primes.store(),
        images: images.store(),
        classes: classes.store(),
        pods: pods.store(),
        metrics,
        failures: Failures::new(reconcile::ERROR_BACKOFF),
        timelines: Default::default(),
        copier: crate::credentials::CredentialsCopier::new(
            client.clone(),
            vmdisk_crds::CREDENTIALS_NAMESPACE,
        ),
        runtimes,
    });
    // Decisions read these stores: deciding before they are filled takes an image still being
    // listed for a missing one (a new leader did, and the claim then waited for the safety net).
    let nodes = ctx.runtimes.store();
    let (images_ready, classes_ready, pods_ready, primes_ready, agents_ready, nodes_ready) = tokio::join!(
        crate::tasks::ready(&ctx.images),
        crate::tasks::ready(&ctx.classes),
        crate::tasks::ready(&ctx.pods),
        crate::tasks::ready(&ctx.primes),
        crate::tasks::ready(&ctx.agents),
        crate::tasks::ready(&nodes),
    );
    if [
        images_ready,
        classes_ready,
        pods_ready,
        primes_ready,
        agents_ready,
        nodes_ready,
    ]
    .iter()
    .any(Result::is_err)
    {
        tracing::error!("a watch stopped before its first list; the populator is not started");
        return;
    }
    let _sweeper = TaskGuard::spawn(sweep::sweep_orphans(Arc::clone(&ctx)));
    let waiting_claims = claims.clone();
    let claims_for_agents = claims.clone();
    // Every trigger fires once its store holds the change, so the reconcile it starts sees it.
    let pod_changes = pods.trigger(claim_of);
    let prime_changes = primes.trigger(claim_of);
    // An image appearing or resolving wakes the claims that wait for it.
    let image_changes = images.trigger(move |image: &VMDiskImage| {
        let namespace = image.metadata.namespace.as_deref();
        let name = image.name_any();
        // Most claims are not vmdisk's (stripped to their identity): the cheap tests first.
        waiting_claims
            .state()
            .into_iter()
            .filter(|c| c.spec.is_some() && c.metadata.namespace.as_deref() == namespace)
            .filter(|c| {
                decide::referenced_image(c).ok().flatten().as_deref() == Some(name.as_str())
            })
            .map(|c| ObjectRef::from_obj(&*c))
            .collect::<Vec<_>>()
    });
    // The agent DaemonSet appearing (or changing) wakes the claims that wait for a pod.
    let agent_changes =
        agents.trigger(move |_: &DaemonSet| waiting_for_pods(&claims_for_agents.state()));
    controller
        .reconcile_on(pod_changes)
        .reconcile_on(prime_changes)
        .reconcile_on(image_changes)
        .reconcile_on(agent_changes)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "populator event");
            }
            futures::future::ready(())
        })
        .await;
}
