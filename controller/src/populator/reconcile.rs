//! One step for one user PVC: gathers what [`super::decide::decide`] needs from reflector
//! stores (a GET only for the prime's PV, once the pod has done its work), performs the step it
//! returns, and records Events and metrics; `error_policy` and the [`Context`] every reconcile
//! shares.

use std::sync::Arc;
use std::time::Duration;

use crate::events::Recorder;
use chrono::Utc;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use thiserror::Error;
use tracing::Instrument as _;
use vmdisk_crds::{
    populator_pod_name, prime_pvc_name, PopulatePhase, PullMethod, VMDiskImage,
    FAILED_ATTEMPTS_ANNOTATION, MESSAGE_ANNOTATION, PHASE_ANNOTATION, POPULATED_ANNOTATION,
    POPULATOR_FINALIZER, PROGRESS_ANNOTATION, SELECTED_NODE_ANNOTATION, TIMELINE_ANNOTATION,
};
use vmdisk_support::{Backoff, Failures};

use super::decide::{self, ClassLookup, Note, Observed, Step};
use super::settings::{PopulatorConfig, PopulatorSettings};
use super::timeline::{self, Stage, Timelines};
use crate::credentials::CredentialsCopier;
use crate::metrics::PopulatorMetrics;
use crate::node_pull::NodeRuntimes;

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
    #[error("PVC {namespace}/{name}: {message}")]
    Credentials {
        namespace: String,
        name: String,
        message: String,
    },
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: PopulatorSettings,
    /// The cache agent DaemonSet (one object).
    pub agents: Store<DaemonSet>,
    pub claims: Store<PersistentVolumeClaim>,
    /// The prime PVCs, in the populator's namespace.
    pub primes: Store<PersistentVolumeClaim>,
    pub images: Store<VMDiskImage>,
    pub classes: Store<StorageClass>,
    pub pods: Store<Pod>,
    pub recorder: Recorder,
    pub metrics: PopulatorMetrics,
    /// Consecutive failed steps per claim: each retried after [`ERROR_BACKOFF`]'s delay.
    pub failures: Failures<ObjectRef<PersistentVolumeClaim>>,
    /// Where the time of each population in flight went.
    pub timelines: Timelines,
    /// Writes each populator pod's pull credentials.
    pub copier: CredentialsCopier,
    /// Which nodes mount images as volumes (`pullMethod: node`).
    pub runtimes: NodeRuntimes,
}

/// How long a claim whose step failed waits before the next try: doubling per consecutive
/// failure of that claim, capped.
pub const ERROR_BACKOFF: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));

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
        self.primes
            .get(&ObjectRef::new(&prime_pvc_name(uid)).within(&self.settings.namespace))
    }

    fn pod_of(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods
            .get(&ObjectRef::new(&populator_pod_name(uid)).within(&self.settings.namespace))
    }

    /// Primes are in flight exactly while a population is: the gauge is derived from them, so
    /// it cannot leak when a claim disappears.
    fn update_in_flight(&self) {
        self.metrics.set_in_flight(self.primes.state().len() as i64);
    }
}

fn seconds_since(object: &impl Resource) -> f64 {
    object
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| {
            (Utc::now() - crate::time::from_timestamp(&t.0))
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
    let key = ObjectRef::from_obj(&*pvc);
    let result = reconcile_claim(pvc, Arc::clone(&ctx))
        .instrument(span)
        .await;
    if result.is_ok() {
        ctx.failures.succeeded(&key);
    }
    result
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
        == Some("Succeeded")
        || prime
            .as_ref()
            .is_some_and(|p| p.annotations().contains_key(POPULATED_ANNOTATION));
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
    let agents = ctx
        .agents
        .get(&ObjectRef::new(&ctx.settings.agent_daemonset).within(&ctx.settings.namespace));
    let resolved = ctx.settings.resolve(agents.as_deref());
    // Where the node's runtime could mount the image, for images it pulls: the scheduler's
    // node for WaitForFirstConsumer, else any node.
    let method = image
        .as_deref()
        .map(|i| decide::pull::pull_method(i, ctx.settings.default_pull_method));
    let node_pull = method.filter(|m| *m != PullMethod::Pod).map(|_| {
        let waits_for_consumer = class
            .as_ref()
            .and_then(|c| c.volume_binding_mode.as_deref())
            == Some("WaitForFirstConsumer");
        let selected = pvc
            .annotations()
            .get(SELECTED_NODE_ANNOTATION)
            .filter(|_| waits_for_consumer);
        ctx.runtimes.node_pull(selected.map(String::as_str))
    });
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
        agent_missing: resolved.as_ref().err().map(String::as_str),
        node_pull: node_pull.as_ref(),
    };
    // Without the DaemonSet the config's image and cache directory are never used: `decide`
    // makes no pod while `agent_missing` says why.
    let config = resolved.clone().unwrap_or_else(|_| PopulatorConfig {
        image: String::new(),
        node_cache_dir: String::new(),
        ..PopulatorConfig::default()
    });
    let step = decide::decide(&observed, &config, Utc::now());
    if !matches!(step, Step::Ignore | Step::Wait { .. }) {
        tracing::info!(step = step_name(&step), "populator step");
    }
    let key = ObjectRef::from_obj(&*pvc);
    if !matches!(step, Step::Ignore) {
        let now = std::time::Instant::now();
        let seen = timeline::visible_stages(&pvc, prime.as_deref(), pod.as_deref());
        let acts = !matches!(step, Step::Wait { .. });
        ctx.timelines.with(&key, now, |t| {
            seen.into_iter().for_each(|s| t.mark(s, now));
            if t.look(now, SAFETY_NET) && acts {
                t.missed_change();
                tracing::warn!(
                    step = step_name(&step),
                    "the safety net found work: a watched change did not wake this claim"
                );
            }
        });
    }
    let mark = |stage: Stage| {
        ctx.timelines.with(&key, std::time::Instant::now(), |t| {
            t.mark(stage, std::time::Instant::now())
        })
    };
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
        // Waits end on a change to a watched object; the requeue is a safety net that should
        // find nothing to do (the timeline counts the times it did).
        Step::Wait { requeue } => {
            if requeue.is_some() {
                ctx.timelines
                    .with(&key, std::time::Instant::now(), |t| t.asked_requeue());
            }
            return Ok(Action::requeue(requeue.unwrap_or(SAFETY_NET)));
        }
        Step::Annotate {
            status,
            note,
            outcome,
        } if decide::current_status(&pvc).as_ref() != Some(&status) => {
            // The population ends here: its timeline goes with the last status.
            let ended = matches!(
                status.phase,
                PopulatePhase::Succeeded | PopulatePhase::Failed
            );
            let timeline = ended.then(|| ctx.timelines.finish(&key)).flatten();
            let patch = serde_json::json!({"metadata": {"annotations": {
                PHASE_ANNOTATION: status.phase.as_str(),
                MESSAGE_ANNOTATION: status.message,
                PROGRESS_ANNOTATION: status.progress,
                TIMELINE_ANNOTATION: timeline.as_ref().map(|t| t.render()),
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
            if let Some(timeline) = timeline {
                for (stage, took) in timeline.steps().into_iter().skip(1) {
                    ctx.metrics.observe_step(stage.as_str(), took.as_secs_f64());
                }
                tracing::info!(phase = status.phase.as_str(), timeline = %timeline.render(), "population ended");
            }
        }
        // Already shown (a decision never asks for that, but a write must not wake the next
        // reconcile for nothing).
        Step::Annotate { .. } => return Ok(Action::requeue(SAFETY_NET)),
        Step::AddFinalizer => {
            claims
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Strategic(finalizers_patch(true)),
                )
                .await
                .map_err(api_error("adding the finalizer"))?;
        }
        Step::CreatePrime(prime) => {
            create(&primes, &prime)
                .await
                .map_err(api_error("creating the prime PVC"))?;
            mark(Stage::PrimeCreated);
        }
        Step::CreatePod { pod, attempt } => {
            // Its credentials first: the kubelet mounts them before the container starts.
            if let Some(secret) = super::objects::credentials_secret_of(&pod) {
                // `decide` makes a pod only with both at hand.
                let owner = prime.as_deref().and_then(|p| p.owner_ref(&()));
                let written = match (image.as_deref(), owner) {
                    (Some(image), Some(owner)) => {
                        ctx.copier
                            .write_pod_copy(image, &ctx.settings.namespace, &secret, owner)
                            .await
                    }
                    _ => Err("the image or the prime PVC is not known".to_string()),
                };
                if let Err(message) = written {
                    let note = Note {
                        reason: vmdisk_crds::reasons::PULL_SECRET_ERROR,
                        action: "CreatePod",
                        warning: true,
                        message: format!("the populator pod's pull credentials: {message}"),
                    };
                    ctx.note(&pvc, &note).await;
                    return Err(PopulatorError::Credentials {
                        namespace,
                        name,
                        message,
                    });
                }
            }
            create(&pods, &pod)
                .await
                .map_err(api_error("creating the populator pod"))?;
            mark(Stage::PodCreated);
            if attempt > 1 {
                ctx.timelines
                    .with(&key, std::time::Instant::now(), |t| t.extra_attempts += 1);
            }
            let node = super::objects::required_node(&pod);
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
            // A mark of the failed pod's must not make the next pod's work look done.
            let patch = serde_json::json!({"metadata": {"annotations": {
                FAILED_ATTEMPTS_ANNOTATION: attempt.to_string(),
                POPULATED_ANNOTATION: null}}});
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
            mark(Stage::Rebound);
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
            match claims
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Strategic(finalizers_patch(false)),
                )
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

pub(crate) fn step_name(step: &Step) -> &'static str {
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

/// A strategic merge patch adding or removing the populator's finalizer and no other:
/// `metadata.finalizers` merges as a set, so neither needs the current list (a store that
/// lags behind the server cannot make it fail or clobber another controller's finalizer).
pub(super) fn finalizers_patch(add: bool) -> serde_json::Value {
    if add {
        serde_json::json!({"metadata": {"finalizers": [POPULATOR_FINALIZER]}})
    } else {
        serde_json::json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [POPULATOR_FINALIZER]}})
    }
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

pub(super) async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// A failed step is retried after the claim's own backoff: one claim the API server keeps
/// refusing is neither retried in a hot loop nor logged more than once per backoff step.
pub fn error_policy(
    pvc: Arc<PersistentVolumeClaim>,
    error: &PopulatorError,
    ctx: Arc<Context>,
) -> Action {
    let key = ObjectRef::from_obj(&*pvc);
    let (failures, delay) = ctx.failures.failed(key.clone());
    let message = crate::error_chain(error);
    ctx.timelines.with(&key, std::time::Instant::now(), |t| {
        t.errors += 1;
        t.last_error = Some(message.clone());
    });
    tracing::warn!(
        namespace = pvc.namespace().unwrap_or_default(),
        name = pvc.name_any(),
        error = %message,
        failures,
        retry_in = ?delay,
        "populator step failed"
    );
    Action::requeue(delay)
}
