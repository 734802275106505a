//! The populator's next step once its pod exists: wait while it runs (mirroring its
//! progress), hand the filled volume to the user's claim when it succeeded (or said on the
//! prime that the volume is filled), retry with a backoff or give up when it failed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use vmdisk_crds::{
    reasons, PopulatePhase, ATTEMPT_ANNOTATION, POPULATED_ANNOTATION, PROGRESS_ANNOTATION,
};
use vmdisk_support::Backoff;

use super::{
    annotation, failed_attempts, give_up, status, terminating, with_status, Note, Observed, Step,
    PERMANENT_EXIT_CODE,
};
use crate::populator::PopulatorConfig;

/// Waits before the next pod after `failures` failed ones: doubling from the configured base,
/// capped at five minutes.
pub fn retry_backoff(base: Duration) -> Backoff {
    Backoff::new(base, Duration::from_secs(300))
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
            finished: t.finished_at.map(|t| crate::time::from_timestamp(&t.0)),
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

/// A pod that has not started by `config.start_timeout` after it was made and waits for a
/// reason that does not pass by itself (an image that cannot be pulled, a configuration error)
/// ends as a failed attempt, so the claim retries and then gives up instead of waiting for ever.
/// `Err` is when to look again: the pod waits that way but its time is not up yet.
fn stuck(
    pod: &Pod,
    config: &PopulatorConfig,
    now: DateTime<Utc>,
) -> Option<Result<PodEnd, Duration>> {
    let reason = pod
        .status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())?;
    let why = match reason.as_str() {
        "ErrImagePull" | "ImagePullBackOff" => "an image could not be pulled",
        "InvalidImageName" => "an image name is invalid",
        "CreateContainerConfigError" | "CreateContainerError" => "its container could not be made",
        _ => return None,
    };
    let created = crate::time::from_timestamp(&pod.metadata.creation_timestamp.as_ref()?.0);
    let deadline = created + chrono::Duration::from_std(config.start_timeout).ok()?;
    if now < deadline {
        return Some(Err((deadline - now).to_std().unwrap_or_default()));
    }
    Some(Ok(PodEnd {
        permanent: false,
        message: format!(
            "the populator pod did not start within {} s: {why} ({reason})",
            config.start_timeout.as_secs()
        ),
        finished: Some(deadline),
    }))
}

fn pod_attempt(pod: &Pod) -> u32 {
    annotation(pod, ATTEMPT_ANNOTATION)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
}

pub(super) fn decide_pod(
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
    // `populate` says on the prime when the volume holds the disk, synced: that is the end of
    // the work, whenever the kubelet gets to report the pod's (a failure is still a failure;
    // a retry's pod starts only after `RecordFailure` cleared the mark).
    let populated = o.prime.and_then(|p| annotation(p, POPULATED_ANNOTATION));
    let reported = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    let stuck = (reported == "Pending")
        .then(|| stuck(pod, config, now))
        .flatten();
    let phase = match reported {
        "Failed" => "Failed",
        _ if populated.is_some() => "Succeeded",
        _ if matches!(stuck, Some(Ok(_))) => "Failed",
        phase => phase,
    };
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
                        patch: crate::populator::objects::pv_rebind_patch(pvc, image_name),
                        note: Note {
                            reason: reasons::POPULATOR_FINISHED,
                            action: "Populate",
                            warning: false,
                            message: populated
                                .map(str::to_string)
                                .unwrap_or_else(|| pod_end(pod).message),
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
            let end = match &stuck {
                Some(Ok(end)) => end.clone(),
                _ => pod_end(pod),
            };
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
                return give_up(message);
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
                            retry_backoff(config.retry_base).delay(attempt),
                            end.message
                        ),
                    },
                };
            }
            let retry_at = end.finished.unwrap_or(now)
                + chrono::Duration::from_std(retry_backoff(config.retry_base).delay(attempt))
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
            let plan = o
                .image
                .map(|image| super::pull::pull_plan(image, o.node_pull, config))
                .unwrap_or(super::PullPlan::Cache);
            let message = pod_waiting(pod).unwrap_or_else(|| {
                super::pull::populating_message(image_name, attempt, &plan, Some(pod))
            });
            // A pod that waits for what may not pass is looked at again at its deadline.
            let requeue = match stuck {
                Some(Err(until)) => Some(until),
                _ => None,
            };
            with_status(
                pvc,
                status(PopulatePhase::Populating, message, Some(progress)),
                None,
                Step::Wait { requeue },
            )
        }
    }
}
