//! The populator's next step, as a pure function of what the cluster holds: the user's PVC,
//! its VMDiskImage, StorageClass, prime PVC, populator pod and the prime's PV.
//!
//! Nothing is remembered between calls, so a controller restarted between any two steps
//! picks up where the cluster is. Steps follow kubernetes-csi/lib-volume-populator: wait for
//! the image (and for WaitForFirstConsumer, the scheduler's node) → finalizer → prime PVC →
//! (for other classes, the prime Bound) → populator pod → on success, the PV's claimRef moves
//! to the user's PVC → when the prime is Lost (the PV controller saw the move) or the PVC is
//! Bound: pod, prime and finalizer go.
//! Failed pods are retried after a backoff up to a limit; permanent failures stop at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use vmdisk_crds::{
    reasons, PopulatePhase, VMDiskImage, FAILED_ATTEMPTS_ANNOTATION, GROUP, IMAGE_KIND,
    MESSAGE_ANNOTATION, PHASE_ANNOTATION, POPULATOR_FINALIZER, PROGRESS_ANNOTATION,
    SELECTED_NODE_ANNOTATION,
};

mod pod;
pub mod pull;

use super::objects::{populator_pod, prime_pvc, PodSource};
use super::PopulatorConfig;
use crate::node_pull::NodePull;
use pod::decide_pod;
pub use pod::retry_backoff;
pub use pull::PullPlan;

/// Exit status of `vmdisk-cache-agent populate` when retrying cannot help.
pub const PERMANENT_EXIT_CODE: i32 = 2;

/// The StorageClass of the user's claim, as found.
#[derive(Debug, Clone, Copy)]
pub enum ClassLookup<'a> {
    /// The claim names no class (and no default class applied).
    Unnamed,
    Missing(&'a str),
    Found(&'a StorageClass),
}

/// What the controller sees for one user PVC.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub pvc: &'a PersistentVolumeClaim,
    /// The VMDiskImage its dataSourceRef names, in the claim's namespace.
    pub image: Option<&'a VMDiskImage>,
    pub class: ClassLookup<'a>,
    pub prime: Option<&'a PersistentVolumeClaim>,
    pub pod: Option<&'a Pod>,
    /// The prime's PV, once the prime is bound.
    pub pv: Option<&'a PersistentVolume>,
    /// Why no populator pod can be made now, if that is so: the cache agent DaemonSet (whose
    /// image and cache directory the pods use) is missing. Pods already made carry on.
    pub agent_missing: Option<&'a str>,
    /// Where the pod's node could mount the image as a volume, for images pulled by the node
    /// (`None` for the others).
    pub node_pull: Option<&'a NodePull>,
}

/// The user PVC's `vmdisk.io/phase`, `vmdisk.io/message` and `vmdisk.io/progress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvcStatus {
    pub phase: PopulatePhase,
    pub message: String,
    pub progress: Option<String>,
}

/// An Event to record on the user's PVC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub reason: &'static str,
    /// The Event's action: with the reason, what tells repeated Events (a series) apart.
    pub action: &'static str,
    pub warning: bool,
    pub message: String,
}

/// How a population ended, for the duration metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// The user's PVC was deleted (or bound elsewhere) mid-way.
    Aborted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }
}

/// One step; `reconcile` performs exactly one per call.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Not a claim for vmdisk, or nothing left to do.
    Ignore,
    /// Bring the claim's status annotations up to date (with an Event when there is news).
    /// `outcome` is set when this ends the population (giving up).
    Annotate {
        status: PvcStatus,
        note: Option<Note>,
        outcome: Option<Outcome>,
    },
    /// Nothing to do until something changes (or the time passes).
    Wait {
        requeue: Option<Duration>,
    },
    AddFinalizer,
    CreatePrime(Box<PersistentVolumeClaim>),
    CreatePod {
        pod: Box<Pod>,
        attempt: u32,
    },
    /// Count a failed pod on the prime before it is deleted, so retries survive restarts.
    RecordFailure {
        attempt: u32,
        note: Note,
    },
    DeletePod {
        retry: bool,
    },
    /// Hand the prime's PV to the user's claim; the population itself is finished.
    BindPv {
        pv: String,
        patch: serde_json::Value,
        note: Note,
    },
    DeletePrime {
        outcome: Option<Outcome>,
    },
    RemoveFinalizer,
}

fn annotation<'a>(o: &'a impl ResourceExt, key: &str) -> Option<&'a str> {
    o.annotations().get(key).map(String::as_str)
}

fn has_finalizer(pvc: &PersistentVolumeClaim) -> bool {
    pvc.finalizers().iter().any(|f| f == POPULATOR_FINALIZER)
}

/// The image a claim's dataSourceRef names: `Ok(None)` for other claims, `Err` for a
/// cross-namespace reference.
pub fn referenced_image(pvc: &PersistentVolumeClaim) -> Result<Option<String>, String> {
    let Some(r) = pvc.spec.as_ref().and_then(|s| s.data_source_ref.as_ref()) else {
        return Ok(None);
    };
    if r.api_group.as_deref() != Some(GROUP) || r.kind != IMAGE_KIND {
        return Ok(None);
    }
    let namespace = pvc.namespace().unwrap_or_default();
    match r.namespace.as_deref() {
        Some(other) if other != namespace => Err(format!(
            "dataSourceRef names VMDiskImage {other}/{} in another namespace; vmdisk fills PVCs only from images in their own namespace",
            r.name
        )),
        _ => Ok(Some(r.name.clone())),
    }
}

/// The status annotations the claim carries now.
pub fn current_status(pvc: &PersistentVolumeClaim) -> Option<PvcStatus> {
    Some(PvcStatus {
        phase: PopulatePhase::parse(annotation(pvc, PHASE_ANNOTATION)?)?,
        message: annotation(pvc, MESSAGE_ANNOTATION)
            .unwrap_or_default()
            .to_string(),
        progress: annotation(pvc, PROGRESS_ANNOTATION).map(str::to_string),
    })
}

fn status(phase: PopulatePhase, message: impl Into<String>, progress: Option<&str>) -> PvcStatus {
    PvcStatus {
        phase,
        message: message.into(),
        progress: progress.map(str::to_string),
    }
}

/// The step that brings `status` about, or `then` when the claim already shows it.
fn with_status(
    pvc: &PersistentVolumeClaim,
    wanted: PvcStatus,
    note: Option<Note>,
    then: Step,
) -> Step {
    if current_status(pvc).as_ref() == Some(&wanted) {
        then
    } else {
        Step::Annotate {
            status: wanted,
            note,
            outcome: None,
        }
    }
}

fn failed_attempts(prime: &PersistentVolumeClaim) -> u32 {
    annotation(prime, FAILED_ATTEMPTS_ANNOTATION)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0)
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Cleanup once the claim is bound, deleted, or given up: pod, then prime, then finalizer. A
/// pod already terminating counts as gone: the prime's own protection keeps it until the pod
/// has let go, and a node that never confirms the pod's end must not pin the user's claim.
fn clean_up(o: &Observed, prime_outcome: Option<Outcome>) -> Step {
    if o.pod.is_some_and(|p| !terminating(p)) {
        Step::DeletePod { retry: false }
    } else if o.prime.is_some() {
        Step::DeletePrime {
            outcome: prime_outcome,
        }
    } else if has_finalizer(o.pvc) {
        Step::RemoveFinalizer
    } else {
        Step::Ignore
    }
}

/// The next step for the claim `o.pvc`.
pub fn decide(o: &Observed, config: &PopulatorConfig, now: DateTime<Utc>) -> Step {
    let pvc = o.pvc;
    if pvc.namespace().as_deref() == Some(config.namespace.as_str()) {
        return Step::Ignore; // primes live here
    }
    let image_name = match referenced_image(pvc) {
        Ok(Some(name)) => name,
        Ok(None) => return Step::Ignore,
        Err(message) => {
            let note = Note {
                reason: reasons::CROSS_NAMESPACE_REFUSED,
                action: "Validate",
                warning: true,
                message: message.clone(),
            };
            return with_status(
                pvc,
                status(PopulatePhase::Failed, message, None),
                Some(note),
                Step::Ignore,
            );
        }
    };

    // The claim is going away: undo everything, nothing else.
    if pvc.metadata.deletion_timestamp.is_some() {
        return clean_up(o, Some(Outcome::Aborted));
    }

    // Bound: ours (the PV we filled) or not, only cleanup is left.
    let bound_to = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if let Some(volume) = bound_to.filter(|v| !v.is_empty()) {
        let involved = has_finalizer(pvc) || o.prime.is_some() || current_status(pvc).is_some();
        if !involved {
            return Step::Ignore;
        }
        let ours = o
            .prime
            .and_then(|p| p.spec.as_ref()?.volume_name.as_deref())
            .is_some_and(|v| v == volume);
        let prime_lost = o.prime.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Lost");
        if ours && !prime_lost && o.pod.is_none_or(terminating) {
            // The PV controller has not marked the prime Lost yet: deleting it now could make
            // it reclaim the volume.
            return Step::Wait { requeue: None };
        }
        let outcome = if ours {
            Outcome::Succeeded
        } else {
            Outcome::Aborted
        };
        return match clean_up(o, Some(outcome)) {
            Step::Ignore => with_status(
                pvc,
                status(
                    PopulatePhase::Succeeded,
                    format!("bound to {volume}"),
                    Some("100%"),
                ),
                None,
                Step::Ignore,
            ),
            step => step,
        };
    }

    // Given up: clean up and stay put until someone removes the phase annotation.
    if current_status(pvc).is_some_and(|s| s.phase == PopulatePhase::Failed) {
        return clean_up(o, None);
    }

    // A pod that already runs needs nothing else to finish.
    if let Some(pod) = o.pod {
        return decide_pod(o, pod, &image_name, config, now);
    }

    let Some(image) = o.image else {
        return with_status(
            pvc,
            status(
                PopulatePhase::Pending,
                format!("VMDiskImage {image_name} not found in this namespace"),
                None,
            ),
            Some(Note {
                reason: reasons::IMAGE_NOT_FOUND,
                action: "WaitForImage",
                warning: true,
                message: format!(
                    "VMDiskImage {image_name} not found: the PVC is filled once it exists"
                ),
            }),
            Step::Wait { requeue: None },
        );
    };
    // The image's resolved digest, which the image controller verified with the image's own
    // credentials. A claim's `vmdisk.io/digest` (the webhook's, fixed at creation) names the
    // same digest; one that differs (set by hand while the image was unresolved, or left
    // behind by a tag that moved) was never verified for this image and is not used.
    let Some(digest) = image.digest() else {
        return with_status(
            pvc,
            status(
                PopulatePhase::Pending,
                format!("VMDiskImage {image_name} is not resolved to a digest yet"),
                None,
            ),
            None,
            Step::Wait { requeue: None },
        );
    };
    let node = match o.class {
        ClassLookup::Missing(name) => {
            return with_status(
                pvc,
                status(
                    PopulatePhase::Pending,
                    format!("StorageClass {name} not found"),
                    None,
                ),
                None,
                Step::Wait {
                    requeue: Some(Duration::from_secs(30)),
                },
            )
        }
        ClassLookup::Found(class)
            if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") =>
        {
            match annotation(pvc, SELECTED_NODE_ANNOTATION) {
                Some(node) => Some(node),
                None => {
                    return with_status(
                        pvc,
                        status(
                            PopulatePhase::Pending,
                            "waiting for a pod to use the claim (WaitForFirstConsumer)",
                            None,
                        ),
                        None,
                        Step::Wait { requeue: None },
                    )
                }
            }
        }
        _ => None,
    };
    // Without the agents' image and cache directory no pod can be made: nothing is started,
    // and the claim says so once. The DaemonSet's watch wakes the claim when it appears.
    if let Some(why) = o.agent_missing {
        return with_status(
            pvc,
            status(PopulatePhase::Pending, why, None),
            Some(Note {
                reason: reasons::AGENT_NOT_FOUND,
                action: "WaitForAgent",
                warning: true,
                message: format!("{why}: the PVC is filled once it is installed"),
            }),
            Step::Wait { requeue: None },
        );
    }
    let plan = pull::pull_plan(image, o.node_pull, config);
    if let PullPlan::Refused(why) = &plan {
        return give_up(pull::refusal(&image_name, why));
    }
    if !has_finalizer(pvc) {
        return Step::AddFinalizer;
    }
    let Some(prime) = o.prime else {
        return Step::CreatePrime(Box::new(prime_pvc(pvc, image, config, node)));
    };
    // The pod is gone after a failure was counted (or never made): the next attempt.
    let attempt = failed_attempts(prime) + 1;
    let populating = status(
        PopulatePhase::Populating,
        pull::populating_message(&image_name, attempt, &plan, None),
        Some("0%"),
    );
    let note = pull::fallback_note(&image_name, &plan);
    // Where the volume is provisioned without a consumer, the pod follows it: made before
    // the prime is Bound it would be unschedulable ("unbound immediate PersistentVolumeClaims")
    // and wait out the scheduler's growing backoff; made after, it is placed at its first try.
    // The prime's watch wakes the claim when it binds.
    let provisioned = prime
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty());
    if node.is_none() && !provisioned {
        return with_status(pvc, populating, note, Step::Wait { requeue: None });
    }
    let source = match &plan {
        PullPlan::Runtime(nodes) => PodSource::Runtime { nodes },
        _ => PodSource::Cache { node },
    };
    match populator_pod(pvc, prime, image, digest, config, attempt, source) {
        Ok(pod) => with_status(
            pvc,
            populating,
            note,
            Step::CreatePod {
                pod: Box::new(pod),
                attempt,
            },
        ),
        Err(message) => give_up(message),
    }
}

/// The population failed for good: the claim says why, a warning Event too, and nothing retries.
fn give_up(message: String) -> Step {
    Step::Annotate {
        status: status(PopulatePhase::Failed, message.clone(), None),
        note: Some(Note {
            reason: reasons::POPULATOR_FAILED,
            action: "GiveUp",
            warning: true,
            message,
        }),
        outcome: Some(Outcome::Failed),
    }
}

#[cfg(test)]
mod tests;
