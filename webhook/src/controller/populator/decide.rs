//! The populator's next step, as a pure function of what the cluster holds: the user's PVC,
//! its VMDiskImage, StorageClass, prime PVC, populator pod and the prime's PV.
//!
//! Nothing is remembered between calls, so a controller restarted between any two steps
//! picks up where the cluster is. Steps follow kubernetes-csi/lib-volume-populator: wait for
//! the image (and for WaitForFirstConsumer, the scheduler's node) → finalizer → prime PVC →
//! populator pod → on success, the PV's claimRef moves to the user's PVC → when the prime is
//! Lost (the PV controller saw the move) or the PVC is Bound: pod, prime and finalizer go.
//! Failed pods are retried after a backoff up to a limit; permanent failures stop at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use vmdisk_crds::{
    reasons, PopulatePhase, VMDiskImage, ATTEMPT_ANNOTATION, DIGEST_ANNOTATION,
    FAILED_ATTEMPTS_ANNOTATION, GROUP, IMAGE_KIND, MESSAGE_ANNOTATION, PHASE_ANNOTATION,
    POPULATOR_FINALIZER, PROGRESS_ANNOTATION, SELECTED_NODE_ANNOTATION,
};

use super::objects::{populator_pod, prime_pvc};
use super::PopulatorConfig;

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

fn current_status(pvc: &PersistentVolumeClaim) -> Option<PvcStatus> {
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

/// Delay before retry number `failures + 1`: doubling from the base, capped at five minutes.
pub fn retry_delay(base: Duration, failures: u32) -> Duration {
    base.saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(Duration::from_secs(300))
}

/// How a finished pod ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEnd {
    permanent: bool,
    message: String,
    finished: Option<DateTime<Utc>>,
}

fn pod_end(pod: &Pod) -> PodEnd {
    let status = pod.status.clone().unwrap_or_default();
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.clone());
    match terminated {
        Some(t) => PodEnd {
            permanent: t.exit_code == PERMANENT_EXIT_CODE,
            message: t
                .message
                .filter(|m| !m.trim().is_empty())
                .map(|m| m.trim().to_string())
                .unwrap_or_else(|| format!("exit code {}", t.exit_code)),
            finished: t
                .finished_at
                .map(|t| super::super::image::from_timestamp(&t.0)),
        },
        None => PodEnd {
            permanent: false,
            message: status
                .message
                .or(status.reason)
                .unwrap_or_else(|| "the populator pod failed".into()),
            finished: None,
        },
    }
}

/// Why a pod that has not started yet waits, when it is worth telling (image pull errors,
/// bad configuration).
fn pod_waiting(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            (reason != "ContainerCreating" && reason != "PodInitializing").then(|| {
                format!(
                    "the populator pod waits: {reason}{}",
                    waiting
                        .message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )
            })
        })
}

fn pod_attempt(pod: &Pod) -> u32 {
    annotation(pod, ATTEMPT_ANNOTATION)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
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
    let Some(digest) = annotation(pvc, DIGEST_ANNOTATION).or(image.digest()) else {
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
    if !has_finalizer(pvc) {
        return Step::AddFinalizer;
    }
    let Some(prime) = o.prime else {
        return Step::CreatePrime(Box::new(prime_pvc(pvc, config, node)));
    };
    // The pod is gone after a failure was counted (or never made): the next attempt.
    let attempt = failed_attempts(prime) + 1;
    let populating = status(
        PopulatePhase::Populating,
        format!("populating from VMDiskImage {image_name} (attempt {attempt})"),
        Some("0%"),
    );
    match populator_pod(pvc, image, digest, config, attempt, node) {
        Ok(pod) => with_status(
            pvc,
            populating,
            None,
            Step::CreatePod {
                pod: Box::new(pod),
                attempt,
            },
        ),
        Err(message) => Step::Annotate {
            status: status(PopulatePhase::Failed, message.clone(), None),
            note: Some(Note {
                reason: reasons::POPULATOR_FAILED,
                action: "GiveUp",
                warning: true,
                message,
            }),
            outcome: Some(Outcome::Failed),
        },
    }
}

fn decide_pod(
    o: &Observed,
    pod: &Pod,
    image_name: &str,
    config: &PopulatorConfig,
    now: DateTime<Utc>,
) -> Step {
    let pvc = o.pvc;
    if terminating(pod) {
        // Deleted for a retry (or by someone else): the next one comes once it is gone.
        return Step::Wait {
            requeue: Some(Duration::from_secs(2)),
        };
    }
    let attempt = pod_attempt(pod);
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    match phase {
        "Succeeded" => {
            let Some(prime) = o.prime else {
                // Prime gone with a finished pod: only a restart mid-cleanup gets here.
                return Step::DeletePod { retry: false };
            };
            let rebinding = status(
                PopulatePhase::Rebinding,
                format!("filled from VMDiskImage {image_name}; handing the volume to the claim"),
                Some("100%"),
            );
            let Some(pv_name) = prime.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
                return with_status(pvc, rebinding, None, Step::Wait { requeue: None });
            };
            let Some(pv) = o.pv else {
                return with_status(
                    pvc,
                    rebinding,
                    None,
                    Step::Wait {
                        requeue: Some(Duration::from_secs(2)),
                    },
                );
            };
            let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            let points_at_user = claim_ref.is_some_and(|r| {
                r.uid.as_deref() == pvc.uid().as_deref()
                    && r.name.as_deref() == Some(pvc.name_any().as_str())
                    && r.namespace.as_deref() == pvc.namespace().as_deref()
            });
            if !points_at_user {
                return with_status(
                    pvc,
                    rebinding,
                    None,
                    Step::BindPv {
                        pv: pv_name,
                        patch: super::objects::pv_rebind_patch(pvc, image_name),
                        note: Note {
                            reason: reasons::POPULATOR_FINISHED,
                            action: "Populate",
                            warning: false,
                            message: pod_end(pod).message,
                        },
                    },
                );
            }
            // Moved; the PV controller binds the claim and marks the prime Lost. Deleting the
            // prime before it is Lost could make the PV controller reclaim the volume.
            let lost = prime.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost");
            with_status(
                pvc,
                rebinding,
                None,
                if lost {
                    Step::DeletePod { retry: false }
                } else {
                    Step::Wait { requeue: None }
                },
            )
        }
        "Failed" => {
            let end = pod_end(pod);
            let Some(prime) = o.prime else {
                return Step::DeletePod { retry: false };
            };
            if end.permanent || attempt >= config.max_attempts {
                let why = if end.permanent {
                    "retrying cannot help"
                } else {
                    "no attempts left"
                };
                let message = format!(
                    "populating from VMDiskImage {image_name} failed after {attempt} attempt(s), {why}: {}",
                    end.message
                );
                return Step::Annotate {
                    status: status(PopulatePhase::Failed, message.clone(), None),
                    note: Some(Note {
                        reason: reasons::POPULATOR_FAILED,
                        action: "GiveUp",
                        warning: true,
                        message,
                    }),
                    outcome: Some(Outcome::Failed),
                };
            }
            if failed_attempts(prime) < attempt {
                return Step::RecordFailure {
                    attempt,
                    note: Note {
                        reason: reasons::POPULATOR_FAILED,
                        action: "Retry",
                        warning: true,
                        message: format!(
                            "attempt {attempt} of {} failed, retrying in {:?}: {}",
                            config.max_attempts,
                            retry_delay(config.retry_base, attempt),
                            end.message
                        ),
                    },
                };
            }
            let retry_at = end.finished.unwrap_or(now)
                + chrono::Duration::from_std(retry_delay(config.retry_base, attempt))
                    .unwrap_or_default();
            let retrying = status(
                PopulatePhase::Retrying,
                format!("attempt {attempt} failed: {}", end.message),
                None,
            );
            if now < retry_at {
                with_status(
                    pvc,
                    retrying,
                    None,
                    Step::Wait {
                        requeue: Some((retry_at - now).to_std().unwrap_or_default()),
                    },
                )
            } else {
                Step::DeletePod { retry: true }
            }
        }
        _ => {
            let progress = o
                .prime
                .and_then(|p| annotation(p, PROGRESS_ANNOTATION))
                .unwrap_or("0%");
            let message = pod_waiting(pod).unwrap_or_else(|| {
                format!("populating from VMDiskImage {image_name} (attempt {attempt})")
            });
            with_status(
                pvc,
                status(PopulatePhase::Populating, message, Some(progress)),
                None,
                Step::Wait { requeue: None },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolume;
    use serde_json::json;
    use vmdisk_crds::CLAIM_ANNOTATION;

    const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

    fn config() -> PopulatorConfig {
        PopulatorConfig {
            image: "registry.example/vmdisk/cache-agent:1".into(),
            ..PopulatorConfig::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn claim(spec: serde_json::Value) -> PersistentVolumeClaim {
        let mut base = json!({
            "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": "1060Mi"}}, "storageClassName": "standard",
            "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"},
        });
        for (k, v) in spec.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(json!({
            "metadata": {"name": "root", "namespace": "vms", "uid": "u-1", "resourceVersion": "7",
                         "annotations": {"vmdisk.io/digest": DIGEST}},
            "spec": base,
        }))
        .unwrap()
    }

    fn image(resolved: bool) -> VMDiskImage {
        serde_json::from_value(json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": "fedora", "namespace": "vms", "uid": "img-1"},
            "spec": {"source": {"registry": {"url": "quay.io/containerdisks/fedora:40", "pullSecretRef": {"name": "creds"}}}},
            "status": if resolved { json!({"digest": DIGEST}) } else { json!({}) },
        }))
        .unwrap()
    }

    fn class(mode: &str) -> StorageClass {
        serde_json::from_value(json!({"metadata": {"name": "standard"}, "provisioner": "x", "volumeBindingMode": mode})).unwrap()
    }

    fn pod(phase: &str, attempt: u32, terminated: Option<(i32, &str, &str)>) -> Pod {
        let mut status = json!({"phase": phase});
        if let Some((code, message, finished)) = terminated {
            status["containerStatuses"] = json!([{"name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"terminated": {"exitCode": code, "message": message, "finishedAt": finished}}}]);
        }
        serde_json::from_value(json!({
            "metadata": {"name": "populate-u-1", "namespace": "vmdisk-system",
                         "annotations": {ATTEMPT_ANNOTATION: attempt.to_string()}},
            "status": status,
        }))
        .unwrap()
    }

    fn prime(bound: bool, failed: u32, phase: &str) -> PersistentVolumeClaim {
        let mut p = prime_pvc(&claim(json!({})), &config(), None);
        if bound {
            p.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
        }
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(FAILED_ATTEMPTS_ANNOTATION.into(), failed.to_string());
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(PROGRESS_ANNOTATION.into(), "42%".into());
        p.status = Some(serde_json::from_value(json!({"phase": phase})).unwrap());
        p
    }

    fn pv(claim_ns: &str, claim_name: &str, uid: &str) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": "pv-1"},
            "spec": {"claimRef": {"namespace": claim_ns, "name": claim_name, "uid": uid}}}))
        .unwrap()
    }

    fn with_finalizer(mut c: PersistentVolumeClaim) -> PersistentVolumeClaim {
        c.metadata.finalizers = Some(vec![POPULATOR_FINALIZER.into()]);
        c
    }

    fn with_status(
        mut c: PersistentVolumeClaim,
        phase: PopulatePhase,
        message: &str,
        progress: Option<&str>,
    ) -> PersistentVolumeClaim {
        let a = c.metadata.annotations.get_or_insert_with(Default::default);
        a.insert(PHASE_ANNOTATION.into(), phase.as_str().into());
        a.insert(MESSAGE_ANNOTATION.into(), message.into());
        if let Some(p) = progress {
            a.insert(PROGRESS_ANNOTATION.into(), p.into());
        }
        c
    }

    struct World {
        pvc: PersistentVolumeClaim,
        image: Option<VMDiskImage>,
        class: Option<StorageClass>,
        prime: Option<PersistentVolumeClaim>,
        pod: Option<Pod>,
        pv: Option<PersistentVolume>,
    }

    impl World {
        fn new(pvc: PersistentVolumeClaim) -> Self {
            Self {
                pvc,
                image: Some(image(true)),
                class: Some(class("Immediate")),
                prime: None,
                pod: None,
                pv: None,
            }
        }
        fn step(&self) -> Step {
            let class = match (
                &self.class,
                self.pvc
                    .spec
                    .as_ref()
                    .unwrap()
                    .storage_class_name
                    .as_deref(),
            ) {
                (_, None) => ClassLookup::Unnamed,
                (None, Some(n)) => ClassLookup::Missing(n),
                (Some(c), Some(_)) => ClassLookup::Found(c),
            };
            decide(
                &Observed {
                    pvc: &self.pvc,
                    image: self.image.as_ref(),
                    class,
                    prime: self.prime.as_ref(),
                    pod: self.pod.as_ref(),
                    pv: self.pv.as_ref(),
                },
                &config(),
                now(),
            )
        }
    }

    fn status_of(step: &Step) -> &PvcStatus {
        match step {
            Step::Annotate { status, .. } => status,
            other => panic!("expected an annotation, got {other:?}"),
        }
    }

    #[test]
    fn claims_that_are_not_vmdisks_are_ignored() {
        let mut plain = claim(json!({}));
        plain.spec.as_mut().unwrap().data_source_ref = None;
        assert_eq!(World::new(plain).step(), Step::Ignore);
        let other = claim(
            json!({"dataSourceRef": {"apiGroup": "cdi.kubevirt.io", "kind": "VolumeImportSource", "name": "x"}}),
        );
        assert_eq!(World::new(other).step(), Step::Ignore);
        let mut prime_itself = claim(json!({}));
        prime_itself.metadata.namespace = Some("vmdisk-system".into());
        assert_eq!(World::new(prime_itself).step(), Step::Ignore);
    }

    #[test]
    fn a_cross_namespace_reference_is_refused_once_with_an_event() {
        let pvc = claim(
            json!({"dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora", "namespace": "other"}}),
        );
        let step = World::new(pvc.clone()).step();
        let Step::Annotate {
            status,
            note: Some(note),
            ..
        } = &step
        else {
            panic!("{step:?}")
        };
        assert_eq!(status.phase, PopulatePhase::Failed);
        assert_eq!(note.reason, "CrossNamespaceRefused");
        let done = with_status(pvc, PopulatePhase::Failed, &status.message, None);
        assert_eq!(
            World::new(done).step(),
            Step::Ignore,
            "no action, no repeated Event"
        );
    }

    #[test]
    fn waits_for_the_image_its_digest_its_class_and_the_scheduler() {
        let mut w = World::new(claim(json!({})));
        w.image = None;
        let step = w.step();
        let Step::Annotate {
            status,
            note: Some(note),
            ..
        } = &step
        else {
            panic!("{step:?}")
        };
        assert_eq!(
            (status.phase, note.reason),
            (PopulatePhase::Pending, "ImageNotFound")
        );
        w.pvc = with_status(w.pvc.clone(), status.phase, &status.message, None);
        assert_eq!(
            w.step(),
            Step::Wait { requeue: None },
            "an image appearing wakes the claim"
        );

        let mut w = World::new(claim(json!({})));
        w.pvc.metadata.annotations = None; // no digest recorded at admission
        w.image = Some(image(false));
        assert!(status_of(&w.step()).message.contains("not resolved"));

        let mut w = World::new(claim(json!({})));
        w.class = None;
        assert!(status_of(&w.step())
            .message
            .contains("StorageClass standard not found"));

        let mut w = World::new(claim(json!({})));
        w.class = Some(class("WaitForFirstConsumer"));
        assert!(status_of(&w.step())
            .message
            .contains("WaitForFirstConsumer"));
    }

    #[test]
    fn finalizer_first_then_a_prime_copying_the_claim() {
        let w = World::new(claim(json!({"volumeMode": "Block"})));
        assert_eq!(w.step(), Step::AddFinalizer);
        let mut w = World::new(with_finalizer(claim(json!({"volumeMode": "Block"}))));
        w.class = Some(class("WaitForFirstConsumer"));
        w.pvc
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(SELECTED_NODE_ANNOTATION.into(), "node-real".into());
        let Step::CreatePrime(prime) = w.step() else {
            panic!()
        };
        assert_eq!(prime.metadata.name.as_deref(), Some("prime-u-1"));
        assert_eq!(prime.metadata.namespace.as_deref(), Some("vmdisk-system"));
        let spec = prime.spec.unwrap();
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"].0,
            "1060Mi"
        );
        assert!(spec.data_source_ref.is_none() && spec.data_source.is_none());
        let a = prime.metadata.annotations.unwrap();
        assert_eq!(a[SELECTED_NODE_ANNOTATION], "node-real");
        assert_eq!(a[CLAIM_ANNOTATION], "vms/root");
    }

    #[test]
    fn the_pod_runs_populate_sized_for_kubevirt_on_the_selected_node() {
        let mut w = World::new(with_finalizer(claim(json!({}))));
        w.prime = Some(prime(false, 0, "Pending"));
        let step = w.step();
        assert_eq!(status_of(&step).phase, PopulatePhase::Populating);
        w.pvc = with_status(
            w.pvc.clone(),
            PopulatePhase::Populating,
            &status_of(&step).message,
            Some("0%"),
        );
        let Step::CreatePod { pod, attempt: 1 } = w.step() else {
            panic!()
        };
        let spec = pod.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("registry.example/vmdisk/cache-agent:1")
        );
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.starts_with(&format!(
                "populate quay.io/containerdisks/fedora:40@{DIGEST} --format raw"
            )),
            "{args}"
        );
        // 1060 MiB / 1.06 = 1000 MiB exactly: what KubeVirt may use after the filesystem.
        assert!(
            args.contains(&format!("--size {}", 1000u64 << 20)),
            "{args}"
        );
        assert!(
            args.contains("--owner 107:107") && args.contains("--target /target/disk.img"),
            "{args}"
        );
        assert!(
            args.contains("--credentials-secret vmdisk-credentials/pull-img-1"),
            "{args}"
        );
        assert!(
            args.contains("--progress-pvc vmdisk-system/prime-u-1"),
            "{args}"
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("vmdisk-populator")
        );
        // As locked down as the agent: read-only root, no privilege escalation, only CHOWN.
        let security = c.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().unwrap().add,
            Some(vec!["CHOWN".to_string()])
        );
        assert_eq!(
            spec.security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert!(
            spec.node_name.is_none(),
            "Immediate: the scheduler picks, preferring warm nodes"
        );
        assert!(spec.affinity.is_some());
        let volumes = spec.volumes.unwrap();
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "prime-u-1"
        );
        assert_eq!(
            volumes[1].host_path.as_ref().unwrap().path,
            "/var/lib/vmdisk/cache"
        );

        // Block on a chosen node: the device, no size, no owner.
        let mut w = World::new(with_finalizer(claim(json!({"volumeMode": "Block"}))));
        w.class = Some(class("WaitForFirstConsumer"));
        w.pvc
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(SELECTED_NODE_ANNOTATION.into(), "node-real".into());
        w.pvc = with_status(
            w.pvc.clone(),
            PopulatePhase::Populating,
            "populating from VMDiskImage fedora (attempt 1)",
            Some("0%"),
        );
        w.prime = Some(prime(false, 0, "Pending"));
        let Step::CreatePod { pod, .. } = w.step() else {
            panic!("{:?}", w.step())
        };
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-real"));
        let c = &spec.containers[0];
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.contains("--target /dev/vmdisk-target")
                && !args.contains("--size")
                && !args.contains("--owner"),
            "{args}"
        );
        assert_eq!(
            c.volume_devices.as_ref().unwrap()[0].device_path,
            "/dev/vmdisk-target"
        );
    }

    #[test]
    fn a_filesystem_claim_without_a_size_fails_with_a_reason() {
        let mut w = World::new(with_finalizer(claim(json!({"resources": {}}))));
        w.prime = Some(prime(false, 0, "Pending"));
        let Step::Annotate {
            status,
            outcome: Some(Outcome::Failed),
            ..
        } = w.step()
        else {
            panic!()
        };
        assert!(status.message.contains("no storage size"));
    }

    #[test]
    fn a_running_pod_shows_its_progress_and_why_it_waits() {
        let mut w = World::new(with_finalizer(claim(json!({}))));
        w.prime = Some(prime(true, 0, "Bound"));
        w.pod = Some(pod("Running", 1, None));
        let step = w.step();
        assert_eq!(status_of(&step).progress.as_deref(), Some("42%"));
        let mut stuck = pod("Pending", 1, None);
        stuck.status = Some(serde_json::from_value(json!({"phase": "Pending", "containerStatuses": [{"name": "populate", "ready": false,
            "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]})).unwrap());
        w.pod = Some(stuck);
        assert!(status_of(&w.step())
            .message
            .contains("ImagePullBackOff: not found"));
        let s = status_of(&w.step()).clone();
        w.pvc = with_status(w.pvc.clone(), s.phase, &s.message, s.progress.as_deref());
        assert_eq!(w.step(), Step::Wait { requeue: None });
    }

    #[test]
    fn failed_pods_are_counted_then_retried_after_a_backoff_then_given_up() {
        let finished = "2026-11-24T09:59:55Z";
        let mut w = World::new(with_finalizer(claim(json!({}))));
        w.prime = Some(prime(true, 0, "Bound"));
        w.pod = Some(pod(
            "Failed",
            1,
            Some((1, "registry 10.0.0.1 failed after 6 attempts", finished)),
        ));
        let Step::RecordFailure { attempt: 1, note } = w.step() else {
            panic!("{:?}", w.step())
        };
        assert_eq!(note.reason, "PopulatorFailed");
        assert!(
            note.message
                .contains("attempt 1 of 4 failed, retrying in 10s"),
            "{}",
            note.message
        );
        // Counted: wait for the backoff (10 s after the pod finished, 5 s ago).
        w.prime = Some(prime(true, 1, "Bound"));
        let step = w.step();
        assert_eq!(status_of(&step).phase, PopulatePhase::Retrying);
        let s = status_of(&step).clone();
        w.pvc = with_status(w.pvc.clone(), s.phase, &s.message, None);
        assert_eq!(
            w.step(),
            Step::Wait {
                requeue: Some(Duration::from_secs(5))
            }
        );
        // Due: delete, then the next attempt.
        w.pod = Some(pod("Failed", 1, Some((1, "x", "2026-11-24T09:59:00Z"))));
        assert_eq!(w.step(), Step::DeletePod { retry: true });
        w.pod = None;
        w.pvc = with_status(
            w.pvc.clone(),
            PopulatePhase::Populating,
            "populating from VMDiskImage fedora (attempt 2)",
            Some("0%"),
        );
        assert!(
            matches!(w.step(), Step::CreatePod { attempt: 2, .. }),
            "{:?}",
            w.step()
        );
        // The last attempt fails: given up, with the reason.
        w.pod = Some(pod("Failed", 4, Some((1, "disk full", finished))));
        w.prime = Some(prime(true, 3, "Bound"));
        let Step::Annotate {
            status,
            note: Some(note),
            outcome: Some(Outcome::Failed),
        } = w.step()
        else {
            panic!()
        };
        assert_eq!(status.phase, PopulatePhase::Failed);
        assert!(
            note.message
                .contains("failed after 4 attempt(s), no attempts left: disk full"),
            "{}",
            note.message
        );
    }

    #[test]
    fn a_permanent_failure_stops_at_once_and_cleans_up() {
        let mut w = World::new(with_finalizer(claim(json!({}))));
        w.prime = Some(prime(true, 0, "Bound"));
        w.pod = Some(pod(
            "Failed",
            1,
            Some((
                PERMANENT_EXIT_CODE,
                "the disk needs 2 GiB but the volume offers 1 GiB",
                "2026-11-24T09:59:55Z",
            )),
        ));
        let Step::Annotate { status, .. } = w.step() else {
            panic!()
        };
        assert!(
            status
                .message
                .contains("retrying cannot help: the disk needs"),
            "{}",
            status.message
        );
        w.pvc = with_status(w.pvc.clone(), status.phase, &status.message, None);
        assert_eq!(w.step(), Step::DeletePod { retry: false });
        w.pod = None;
        assert_eq!(w.step(), Step::DeletePrime { outcome: None });
        w.prime = None;
        assert_eq!(w.step(), Step::RemoveFinalizer);
        w.pvc.metadata.finalizers = None;
        assert_eq!(
            w.step(),
            Step::Ignore,
            "stays failed until the annotation is removed"
        );
    }

    #[test]
    fn success_hands_the_pv_over_and_waits_for_lost_before_cleaning_up() {
        let mut w = World::new(with_finalizer(with_status(
            claim(json!({})),
            PopulatePhase::Rebinding,
            "filled from VMDiskImage fedora; handing the volume to the claim",
            Some("100%"),
        )));
        w.prime = Some(prime(true, 0, "Bound"));
        w.pod = Some(pod("Succeeded", 1, None));
        assert_eq!(
            w.step(),
            Step::Wait {
                requeue: Some(Duration::from_secs(2))
            },
            "PV not read yet"
        );
        w.pv = Some(pv("vmdisk-system", "prime-u-1", "p-1"));
        w.pod = Some(pod(
            "Succeeded",
            1,
            Some((
                0,
                "populated /target/disk.img (warm: cache hit)",
                "2026-11-24T09:59:55Z",
            )),
        ));
        let Step::BindPv {
            pv: name,
            patch,
            note,
        } = w.step()
        else {
            panic!()
        };
        assert_eq!(note.reason, "PopulatorFinished");
        assert!(note.message.contains("warm: cache hit"), "{}", note.message);
        assert_eq!(name, "pv-1");
        assert_eq!(patch["spec"]["claimRef"]["uid"], "u-1");
        assert_eq!(patch["spec"]["claimRef"]["name"], "root");
        assert_eq!(
            patch["metadata"]["annotations"]["vmdisk.io/populated-from"],
            "vms/fedora"
        );
        w.pv = Some(pv("vms", "root", "u-1"));
        assert_eq!(
            w.step(),
            Step::Wait { requeue: None },
            "the prime is not Lost yet"
        );
        w.prime = Some(prime(true, 0, "Lost"));
        assert_eq!(w.step(), Step::DeletePod { retry: false });
        // The PV controller bound the claim.
        w.pod = None;
        w.pvc.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
        assert_eq!(
            w.step(),
            Step::DeletePrime {
                outcome: Some(Outcome::Succeeded)
            }
        );
        w.prime = None;
        assert_eq!(w.step(), Step::RemoveFinalizer);
        w.pvc.metadata.finalizers = Some(vec![]);
        let step = w.step();
        assert_eq!(status_of(&step).phase, PopulatePhase::Succeeded);
        w.pvc = with_status(
            w.pvc.clone(),
            PopulatePhase::Succeeded,
            &status_of(&step).message,
            Some("100%"),
        );
        assert_eq!(w.step(), Step::Ignore);
    }

    #[test]
    fn a_claim_bound_without_vmdisk_is_left_alone() {
        let mut w = World::new(claim(json!({"volumeName": "static-pv"})));
        w.image = None;
        assert_eq!(w.step(), Step::Ignore);
    }

    #[test]
    fn a_claim_deleted_mid_way_undoes_everything() {
        let mut w = World::new(with_finalizer(claim(json!({}))));
        w.pvc.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                crate::controller::image::to_timestamp(now()),
            ));
        w.prime = Some(prime(true, 0, "Bound"));
        w.pod = Some(pod("Running", 1, None));
        assert_eq!(w.step(), Step::DeletePod { retry: false });
        // A node that never confirms the pod's end does not hold the claim.
        let mut stuck = pod("Running", 1, None);
        stuck.metadata.deletion_timestamp = w.pvc.metadata.deletion_timestamp.clone();
        w.pod = Some(stuck);
        assert_eq!(
            w.step(),
            Step::DeletePrime {
                outcome: Some(Outcome::Aborted)
            }
        );
        w.pod = None;
        assert_eq!(
            w.step(),
            Step::DeletePrime {
                outcome: Some(Outcome::Aborted)
            }
        );
        w.prime = None;
        assert_eq!(w.step(), Step::RemoveFinalizer);
        w.pvc.metadata.finalizers = None;
        assert_eq!(w.step(), Step::Ignore);
    }

    /// Plays the cluster: applies each step's effect (and what the PV controller, provisioner
    /// and kubelet would do), and runs decide again, as the controller does.
    fn apply(w: &mut World, step: &Step, pod_exit: &mut Vec<i32>) -> bool {
        match step.clone() {
            Step::Ignore | Step::Wait { .. } => return false,
            Step::Annotate { status, .. } => {
                w.pvc = with_status(
                    w.pvc.clone(),
                    status.phase,
                    &status.message,
                    status.progress.as_deref(),
                );
            }
            Step::AddFinalizer => w.pvc = with_finalizer(w.pvc.clone()),
            Step::CreatePrime(mut p) => {
                p.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
                p.status = Some(serde_json::from_value(json!({"phase": "Bound"})).unwrap());
                w.prime = Some(*p);
                w.pv = Some(pv("vmdisk-system", "prime-u-1", "p-1"));
            }
            Step::CreatePod { attempt, .. } => {
                let code = pod_exit.remove(0);
                w.pod = Some(if code == 0 {
                    pod(
                        "Succeeded",
                        attempt,
                        Some((0, "populated", "2026-11-24T09:00:00Z")),
                    )
                } else {
                    pod(
                        "Failed",
                        attempt,
                        Some((code, "boom", "2026-11-24T09:00:00Z")),
                    )
                });
            }
            Step::RecordFailure { attempt, .. } => {
                w.prime
                    .as_mut()
                    .unwrap()
                    .metadata
                    .annotations
                    .as_mut()
                    .unwrap()
                    .insert(FAILED_ATTEMPTS_ANNOTATION.into(), attempt.to_string());
            }
            Step::DeletePod { .. } => w.pod = None,
            Step::BindPv { .. } => {
                w.pv = Some(pv("vms", "root", "u-1"));
                w.prime.as_mut().unwrap().status =
                    Some(serde_json::from_value(json!({"phase": "Lost"})).unwrap());
                w.pvc.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
            }
            Step::DeletePrime { .. } => w.prime = None,
            Step::RemoveFinalizer => w.pvc.metadata.finalizers = Some(vec![]),
        }
        true
    }

    fn run_to_rest(w: &mut World, exits: &mut Vec<i32>) -> Vec<&'static str> {
        let mut trace = Vec::new();
        for _ in 0..50 {
            let step = w.step();
            trace.push(super::super::step_name(&step));
            if !apply(w, &step, exits) {
                return trace;
            }
        }
        panic!("no rest after 50 steps: {trace:?}");
    }

    #[test]
    fn every_state_on_the_way_leads_to_the_same_end_as_a_restart_would() {
        // A failed first pod (retried at once: its finish is long past), then success.
        let start = || World::new(claim(json!({})));
        let mut w = start();
        let mut exits = vec![1, 0];
        let trace = run_to_rest(&mut w, &mut exits);
        assert_eq!(
            trace,
            [
                "add-finalizer",
                "create-prime",
                "annotate",
                "create-pod",
                "record-failure",
                "delete-pod",
                "annotate",
                "create-pod",
                "annotate",
                "bind-pv",
                "delete-pod",
                "delete-prime",
                "remove-finalizer",
                "annotate",
                "ignore"
            ]
        );
        assert!(w.prime.is_none() && w.pod.is_none());
        assert_eq!(w.pvc.finalizers().len(), 0);
        assert_eq!(
            current_status(&w.pvc).unwrap().phase,
            PopulatePhase::Succeeded
        );
        // Stop after every step (the controller restarts: it has nothing but the cluster),
        // then carry on: the same end every time.
        for stop in 0..trace.len() {
            let mut w = start();
            let mut exits = vec![1, 0];
            for _ in 0..stop {
                let step = w.step();
                apply(&mut w, &step, &mut exits);
            }
            run_to_rest(&mut w, &mut exits);
            assert!(
                w.prime.is_none() && w.pod.is_none() && w.pvc.finalizers().is_empty(),
                "stop {stop}"
            );
            assert_eq!(
                current_status(&w.pvc).unwrap().phase,
                PopulatePhase::Succeeded,
                "stop {stop}"
            );
        }
    }
}
