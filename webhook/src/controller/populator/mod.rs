//! The volume populator: fills PVCs whose `dataSourceRef` names a VMDiskImage, with the
//! semantics of kubernetes-csi/lib-volume-populator (prime PVC in vmdisk's namespace, populator
//! pod, PV claimRef rebind, finalizer, Events), in the webhook's Deployment under the same
//! Lease as the image controller.
//!
//! [`decide::decide`] is the pure rule; [`reconcile`] gathers what it needs from reflector
//! stores (a GET only for the prime's PV), performs the one step it returns, and records
//! Events and metrics.

pub mod decide;
pub mod objects;

use std::sync::Arc;

use std::time::Duration;
use tracing::Instrument as _;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use thiserror::Error;
use vmdisk_crds::{
    populator_pod_name, prime_pvc_name, AccessScope, ApiAccess, VMDiskImage, CLAIM_ANNOTATION,
    COMPONENT_LABEL, FAILED_ATTEMPTS_ANNOTATION, MESSAGE_ANNOTATION, PHASE_ANNOTATION,
    POPULATOR_COMPONENT, POPULATOR_FINALIZER, PROGRESS_ANNOTATION,
};

use crate::metrics::PopulatorMetrics;
use decide::{ClassLookup, Note, Observed, Step};

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

/// What the populator's decisions need to know.
#[derive(Debug, Clone)]
pub struct PopulatorConfig {
    /// vmdisk's namespace: prime PVCs and populator pods live here.
    pub namespace: String,
    /// Where the agents keep the image controller's pull credentials copies.
    pub credentials_namespace: String,
    /// The cache agent's image (populator pods run `vmdisk-cache-agent populate`).
    pub image: String,
    /// The node cache's hostPath, the same as the agents'.
    pub node_cache_dir: String,
    pub filesystem_overhead: f64,
    /// Pods per PVC before giving up.
    pub max_attempts: u32,
    /// First retry delay; doubles per failure, capped at five minutes.
    pub retry_base: Duration,
}

impl Default for PopulatorConfig {
    fn default() -> Self {
        PopulatorSettings::default()
            .resolve(None)
            .expect("the defaults name an image and a cache directory")
    }
}

/// How the populator runs (from the webhook's flags).
#[derive(Debug, Clone)]
pub struct PopulatorSettings {
    pub namespace: String,
    pub credentials_namespace: String,
    /// The cache agent DaemonSet in `namespace`, whose image and `cache` hostPath populator
    /// pods use unless overridden.
    pub agent_daemonset: String,
    pub image: Option<String>,
    pub node_cache_dir: Option<String>,
    pub filesystem_overhead: f64,
    pub max_attempts: u32,
    pub retry_base: Duration,
}

impl Default for PopulatorSettings {
    fn default() -> Self {
        Self {
            namespace: vmdisk_crds::INSTALL_NAMESPACE.into(),
            credentials_namespace: vmdisk_crds::CREDENTIALS_NAMESPACE.into(),
            agent_daemonset: "vmdisk-cache-agent".into(),
            image: Some(format!(
                "ghcr.io/vmdisk/cache-agent:{}",
                env!("CARGO_PKG_VERSION")
            )),
            node_cache_dir: Some("/var/lib/vmdisk/cache".into()),
            filesystem_overhead: vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD,
            max_attempts: 4,
            retry_base: Duration::from_secs(10),
        }
    }
}

impl PopulatorSettings {
    /// The decisions' config: the agents' image and cache directory from their DaemonSet,
    /// unless overridden. `Err` says what is missing.
    pub fn resolve(&self, agents: Option<&DaemonSet>) -> Result<PopulatorConfig, String> {
        let spec = agents.and_then(|d| d.spec.template.spec.as_ref());
        let from_agents = || {
            format!(
                "the cache agent DaemonSet {}/{} was not found (or has no image and no `cache` hostPath volume)",
                self.namespace, self.agent_daemonset
            )
        };
        let image = match &self.image {
            Some(i) => i.clone(),
            None => spec
                .and_then(|s| {
                    s.containers
                        .iter()
                        .find(|c| c.name == "agent")
                        .or(s.containers.first())?
                        .image
                        .clone()
                })
                .ok_or_else(from_agents)?,
        };
        let node_cache_dir = match &self.node_cache_dir {
            Some(d) => d.clone(),
            None => spec
                .and_then(|s| {
                    s.volumes
                        .iter()
                        .flatten()
                        .find(|v| v.name == "cache")?
                        .host_path
                        .as_ref()
                        .map(|h| h.path.clone())
                })
                .ok_or_else(from_agents)?,
        };
        Ok(PopulatorConfig {
            namespace: self.namespace.clone(),
            credentials_namespace: self.credentials_namespace.clone(),
            image,
            node_cache_dir,
            filesystem_overhead: self.filesystem_overhead,
            max_attempts: self.max_attempts,
            retry_base: self.retry_base,
        })
    }
}

#[derive(Debug, Error)]
pub enum PopulatorError {
    #[error("{action} for PVC {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: PopulatorSettings,
    /// The cache agent DaemonSet (one object).
    pub agents: Store<DaemonSet>,
    pub claims: Store<PersistentVolumeClaim>,
    pub images: Store<VMDiskImage>,
    pub classes: Store<StorageClass>,
    pub pods: Store<Pod>,
    pub recorder: Recorder,
    pub metrics: PopulatorMetrics,
}

impl Context {
    async fn note(&self, pvc: &PersistentVolumeClaim, note: &Note) {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.chars().take(1000).collect()),
            action: note.action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pvc.object_ref(&())).await {
            tracing::debug!(error = %e, reason = note.reason, "cannot publish an Event");
        }
    }

    fn prime_of(&self, uid: &str) -> Option<Arc<PersistentVolumeClaim>> {
        self.claims
            .get(&ObjectRef::new(&prime_pvc_name(uid)).within(&self.settings.namespace))
    }

    fn pod_of(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods
            .get(&ObjectRef::new(&populator_pod_name(uid)).within(&self.settings.namespace))
    }

    /// Primes are in flight exactly while a population is: the gauge is derived from them, so
    /// it cannot leak when a claim disappears.
    fn update_in_flight(&self) {
        let primes = self
            .claims
            .state()
            .iter()
            .filter(|c| {
                c.namespace().as_deref() == Some(self.settings.namespace.as_str())
                    && c.labels().get(COMPONENT_LABEL).map(String::as_str)
                        == Some(POPULATOR_COMPONENT)
            })
            .count();
        self.metrics.set_in_flight(primes as i64);
    }
}

fn seconds_since(object: &impl Resource) -> f64 {
    object
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| {
            (Utc::now() - super::image::from_timestamp(&t.0))
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        })
        .unwrap_or(0.0)
}

/// When a claim is looked at again without any watched change.
const SAFETY_NET: Duration = Duration::from_secs(60);

/// Performs the next step for one user PVC.
pub async fn reconcile(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, PopulatorError> {
    let span = tracing::info_span!(
        "populate",
        namespace = %pvc.namespace().unwrap_or_default(),
        name = %pvc.name_any()
    );
    reconcile_claim(pvc, ctx).instrument(span).await
}

async fn reconcile_claim(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, PopulatorError> {
    ctx.update_in_flight();
    let namespace = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let uid = pvc.uid().unwrap_or_default();
    if namespace == ctx.settings.namespace {
        return Ok(Action::await_change());
    }
    let image_name = match decide::referenced_image(&pvc) {
        Ok(None) => return Ok(Action::await_change()),
        Ok(Some(n)) => Some(n),
        Err(_) => None,
    };
    let image = image_name
        .as_ref()
        .and_then(|n| ctx.images.get(&ObjectRef::new(n).within(&namespace)));
    let class_name = pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone());
    let class = class_name
        .as_ref()
        .and_then(|n| ctx.classes.get(&ObjectRef::new(n)));
    let prime = ctx.prime_of(&uid);
    let pod = ctx.pod_of(&uid);
    // The prime's PV, read only once the pod has done its work.
    let pod_succeeded = pod
        .as_ref()
        .and_then(|p| p.status.as_ref()?.phase.as_deref())
        == Some("Succeeded");
    let pv = match prime
        .as_ref()
        .and_then(|p| p.spec.as_ref()?.volume_name.clone())
    {
        Some(pv_name) if pod_succeeded => Api::<PersistentVolume>::all(ctx.client.clone())
            .get_opt(&pv_name)
            .await
            .map_err(|source| PopulatorError::Api {
                action: "reading the prime's PV",
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?,
        _ => None,
    };
    let observed = Observed {
        pvc: &pvc,
        image: image.as_deref(),
        class: match (&class_name, &class) {
            (None, _) => ClassLookup::Unnamed,
            (Some(n), None) => ClassLookup::Missing(n),
            (Some(_), Some(c)) => ClassLookup::Found(c),
        },
        prime: prime.as_deref(),
        pod: pod.as_deref(),
        pv: pv.as_ref(),
    };
    let agents = ctx
        .agents
        .get(&ObjectRef::new(&ctx.settings.agent_daemonset).within(&ctx.settings.namespace));
    let resolved = ctx.settings.resolve(agents.as_deref());
    let config = resolved.clone().unwrap_or_else(|_| PopulatorConfig {
        image: String::new(),
        node_cache_dir: String::new(),
        ..PopulatorConfig::default()
    });
    let mut step = decide::decide(&observed, &config, Utc::now());
    if let (Step::CreatePod { .. }, Err(message)) = (&step, &resolved) {
        // No pod without the agents' image and cache directory.
        step = Step::Annotate {
            status: decide::PvcStatus {
                phase: vmdisk_crds::PopulatePhase::Pending,
                message: message.clone(),
                progress: None,
            },
            note: None,
            outcome: None,
        };
    }
    if !matches!(step, Step::Ignore | Step::Wait { .. }) {
        tracing::info!(step = step_name(&step), "populator step");
    }
    let api_error = |action: &'static str| {
        let (namespace, name) = (namespace.clone(), name.clone());
        move |source| PopulatorError::Api {
            action,
            namespace,
            name,
            source,
        }
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let primes: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    match step {
        Step::Ignore => return Ok(Action::await_change()),
        // Waits end on a change to a watched object; the requeue is a safety net for a change
        // seen by the trigger before the store it is read from.
        Step::Wait { requeue } => return Ok(Action::requeue(requeue.unwrap_or(SAFETY_NET))),
        Step::Annotate {
            status,
            note,
            outcome,
        } => {
            let patch = serde_json::json!({"metadata": {"annotations": {
                PHASE_ANNOTATION: status.phase.as_str(),
                MESSAGE_ANNOTATION: status.message,
                PROGRESS_ANNOTATION: status.progress,
            }}});
            claims
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(api_error("updating the status annotations"))?;
            if let Some(note) = note {
                ctx.note(&pvc, &note).await;
            }
            if let Some(outcome) = outcome {
                let seconds = prime.as_deref().map(seconds_since).unwrap_or(0.0);
                ctx.metrics.observe(outcome.as_str(), seconds);
            }
        }
        Step::AddFinalizer => {
            let patch = finalizers_patch(&pvc, true);
            claims
                .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
                .map_err(api_error("adding the finalizer"))?;
        }
        Step::CreatePrime(prime) => {
            create(&primes, &prime)
                .await
                .map_err(api_error("creating the prime PVC"))?;
        }
        Step::CreatePod { pod, attempt } => {
            create(&pods, &pod)
                .await
                .map_err(api_error("creating the populator pod"))?;
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            ctx.note(
                &pvc,
                &Note {
                    reason: vmdisk_crds::reasons::POPULATOR_CREATED,
                    action: "CreatePod",
                    warning: false,
                    message: format!(
                        "populator pod {}/{} started (attempt {attempt}){}",
                        ctx.settings.namespace,
                        pod.name_any(),
                        node.map(|n| format!(" on node {n}")).unwrap_or_default()
                    ),
                },
            )
            .await;
        }
        Step::RecordFailure { attempt, note } => {
            let patch = serde_json::json!({"metadata": {"annotations": {
                FAILED_ATTEMPTS_ANNOTATION: attempt.to_string()}}});
            primes
                .patch(
                    &prime_pvc_name(&uid),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(api_error("counting a failed attempt"))?;
            ctx.note(&pvc, &note).await;
        }
        Step::DeletePod { retry } => {
            delete(&pods, &populator_pod_name(&uid))
                .await
                .map_err(api_error("deleting the populator pod"))?;
            if retry {
                ctx.metrics.retried();
            }
        }
        Step::BindPv { pv, patch, note } => {
            Api::<PersistentVolume>::all(ctx.client.clone())
                .patch(&pv, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(api_error("handing the PV to the claim"))?;
            ctx.note(&pvc, &note).await;
        }
        Step::DeletePrime { outcome } => {
            delete(&primes, &prime_pvc_name(&uid))
                .await
                .map_err(api_error("deleting the prime PVC"))?;
            if let (Some(outcome), Some(prime)) = (outcome, prime.as_deref()) {
                ctx.metrics.observe(outcome.as_str(), seconds_since(prime));
            }
        }
        Step::RemoveFinalizer => {
            let patch = finalizers_patch(&pvc, false);
            match claims
                .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(api_error("removing the finalizer")(e)),
            }
        }
    }
    ctx.update_in_flight();
    // Each step changes an object the controller watches, which brings the next call.
    Ok(Action::requeue(SAFETY_NET))
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Ignore => "ignore",
        Step::Annotate { .. } => "annotate",
        Step::Wait { .. } => "wait",
        Step::AddFinalizer => "add-finalizer",
        Step::CreatePrime(_) => "create-prime",
        Step::CreatePod { .. } => "create-pod",
        Step::RecordFailure { .. } => "record-failure",
        Step::DeletePod { .. } => "delete-pod",
        Step::BindPv { .. } => "bind-pv",
        Step::DeletePrime { .. } => "delete-prime",
        Step::RemoveFinalizer => "remove-finalizer",
    }
}

/// A JSON patch adding or removing the populator's finalizer, guarded by a `test` of the
/// current list so a concurrent change makes it fail (and retry) instead of clobbering.
fn finalizers_patch(pvc: &PersistentVolumeClaim, add: bool) -> json_patch::Patch {
    let current = pvc.finalizers().to_vec();
    let ops = if add {
        if pvc.metadata.finalizers.is_none() {
            serde_json::json!([{"op": "add", "path": "/metadata/finalizers", "value": [POPULATOR_FINALIZER]}])
        } else {
            serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "add", "path": "/metadata/finalizers/-", "value": POPULATOR_FINALIZER}])
        }
    } else {
        match current.iter().position(|f| f == POPULATOR_FINALIZER) {
            Some(i) => serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "remove", "path": format!("/metadata/finalizers/{i}")}]),
            None => serde_json::json!([]),
        }
    };
    serde_json::from_value(ops).expect("a valid JSON patch")
}

async fn create<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        // Made by an earlier call whose answer was lost: the same object, by name.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn error_policy(
    pvc: Arc<PersistentVolumeClaim>,
    error: &PopulatorError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(
        namespace = pvc.namespace().unwrap_or_default(),
        name = pvc.name_any(),
        error = %crate::error_chain(error),
        "populator step failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Names of prime PVCs or populator pods whose user PVC (by UID) no longer exists: left by a
/// claim whose finalizer someone removed by hand, or deleted while the controller was down
/// before it could add one.
pub fn orphaned<'a>(
    objects: impl IntoIterator<Item = &'a kube::api::ObjectMeta>,
    live_claims: &std::collections::HashSet<String>,
) -> Vec<String> {
    objects
        .into_iter()
        .filter(|o| {
            o.labels
                .as_ref()
                .and_then(|l| l.get(vmdisk_crds::CLAIM_UID_LABEL))
                .is_none_or(|uid| !live_claims.contains(uid))
        })
        .filter_map(|o| o.name.clone())
        .collect()
}

/// How often orphaned primes and pods are looked for.
const ORPHAN_SWEEP: Duration = Duration::from_secs(30);

async fn sweep_orphans(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(ORPHAN_SWEEP).await;
        if ctx.claims.wait_until_ready().await.is_err()
            || ctx.pods.wait_until_ready().await.is_err()
        {
            continue;
        }
        let claims = ctx.claims.state();
        let live: std::collections::HashSet<String> =
            claims.iter().filter_map(|c| c.uid()).collect();
        let primes: Vec<&PersistentVolumeClaim> = claims
            .iter()
            .map(|c| &**c)
            .filter(|c| {
                c.namespace().as_deref() == Some(ctx.settings.namespace.as_str())
                    && c.labels().get(COMPONENT_LABEL).map(String::as_str)
                        == Some(POPULATOR_COMPONENT)
            })
            .collect();
        let pods = ctx.pods.state();
        let prime_api: Api<PersistentVolumeClaim> =
            Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        for name in orphaned(pods.iter().map(|p| &p.metadata), &live) {
            tracing::info!(pod = %name, "deleting a populator pod whose claim is gone");
            let _ = delete(&pod_api, &name).await;
        }
        for name in orphaned(primes.into_iter().map(|p| &p.metadata), &live) {
            tracing::info!(prime = %name, "deleting a prime PVC whose claim is gone");
            let _ = delete(&prime_api, &name).await;
        }
    }
}

/// The user PVC a prime PVC or populator pod works for (`vmdisk.io/claim: <ns>/<name>`).
fn claim_of(object: &impl ResourceExt) -> Option<ObjectRef<PersistentVolumeClaim>> {
    let (namespace, name) = object
        .annotations()
        .get(CLAIM_ANNOTATION)?
        .split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

/// Runs the populator until the future is dropped.
pub async fn run(client: Client, config: PopulatorSettings, metrics: PopulatorMetrics) {
    let selector = format!("{COMPONENT_LABEL}={POPULATOR_COMPONENT}");
    let (images, _images_task) = super::reflect(
        Api::<VMDiskImage>::all(client.clone()),
        watcher::Config::default(),
    );
    let (classes, _classes_task) = super::reflect(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
    );
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    let (pods, _pods_task) = super::reflect(
        pods_api.clone(),
        watcher::Config::default().labels(&selector),
    );
    let (agents, _agents_task) = super::reflect(
        Api::<DaemonSet>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", config.agent_daemonset)),
    );
    let controller = Controller::new(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    );
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
        agents,
        claims: claims.clone(),
        images,
        classes,
        pods,
        metrics,
    });
    // Decisions read these stores: deciding before they are filled takes an image still being
    // listed for a missing one (a new leader did, and the claim then waited for the safety net).
    let (images_ready, classes_ready, pods_ready, agents_ready) = tokio::join!(
        ctx.images.wait_until_ready(),
        ctx.classes.wait_until_ready(),
        ctx.pods.wait_until_ready(),
        ctx.agents.wait_until_ready(),
    );
    if [images_ready, classes_ready, pods_ready, agents_ready]
        .iter()
        .any(Result::is_err)
    {
        tracing::error!("a watch stopped before its first list; the populator is not started");
        return;
    }
    let _sweeper = super::TaskGuard::spawn(sweep_orphans(Arc::clone(&ctx)));
    let waiting_claims = claims.clone();
    controller
        .watches(
            pods_api,
            watcher::Config::default().labels(&selector),
            |pod| claim_of(&pod),
        )
        .watches(
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), &config.namespace),
            watcher::Config::default().labels(&selector),
            |prime| claim_of(&prime),
        )
        // An image appearing or resolving wakes the claims that wait for it.
        .watches(
            Api::<VMDiskImage>::all(client.clone()),
            watcher::Config::default(),
            move |image| {
                let namespace = image.namespace();
                let name = image.name_any();
                waiting_claims
                    .state()
                    .into_iter()
                    .filter(|c| c.namespace() == namespace)
                    .filter(|c| {
                        decide::referenced_image(c).ok().flatten().as_deref() == Some(name.as_str())
                    })
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "populator event");
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_and_pods_of_vanished_claims_are_orphans() {
        let object = |name: &str, uid: Option<&str>| -> Pod {
            let mut p: Pod =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
            if let Some(uid) = uid {
                p.metadata.labels =
                    Some([(vmdisk_crds::CLAIM_UID_LABEL.to_string(), uid.to_string())].into());
            }
            p
        };
        let objects = [
            object("populate-a", Some("a")),
            object("populate-b", Some("b")),
            object("stray", None),
        ];
        let live: std::collections::HashSet<String> = ["a".to_string()].into();
        assert_eq!(
            orphaned(objects.iter().map(|o| &o.metadata), &live),
            ["populate-b", "stray"]
        );
    }

    #[test]
    fn populator_pods_follow_the_agent_daemonset_unless_overridden() {
        let ds: DaemonSet =
            serde_yaml::from_str(include_str!("../../../../deploy/cache-agent.yaml")).unwrap();
        let settings = PopulatorSettings {
            image: None,
            node_cache_dir: None,
            ..PopulatorSettings::default()
        };
        let config = settings.resolve(Some(&ds)).unwrap();
        assert_eq!(config.image, "ghcr.io/vmdisk/cache-agent:0.1.0");
        assert_eq!(config.node_cache_dir, "/var/lib/vmdisk/cache");
        let err = settings.resolve(None).unwrap_err();
        assert!(
            err.contains("vmdisk-system/vmdisk-cache-agent was not found"),
            "{err}"
        );
        let overridden = PopulatorSettings {
            image: Some("mine:1".into()),
            node_cache_dir: Some("/mnt/cache".into()),
            ..PopulatorSettings::default()
        };
        let config = overridden.resolve(None).unwrap();
        assert_eq!(
            (config.image.as_str(), config.node_cache_dir.as_str()),
            ("mine:1", "/mnt/cache")
        );
    }
}
