//! Convergence of [`decide`] as a property: from any state (generated, and the adverse ones
//! named here), carrying out the decided step and deciding again comes to rest (a `Wait` or
//! `Ignore`) within a few steps while nothing else changes, never writes the same status
//! twice, and stays at rest. A decision that two of its parts disagree on (the claim flipping
//! between two statuses, each write waking the next reconcile) fails it.

use proptest::prelude::*;

use super::*;

/// More steps than the longest honest chain (give up, then pod, prime and finalizer go).
const MAX_STEPS: usize = 16;

const AGENT_MISSING: &str = "the cache agent DaemonSet vmdisk-system/vmdisk-cache-agent was not found (or has no image and no `cache` hostPath volume)";

/// What a merge patch of the status annotations leaves on the claim (a `null` progress
/// removes it).
fn show(pvc: &mut PersistentVolumeClaim, s: &PvcStatus) {
    let a = pvc
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    a.insert(PHASE_ANNOTATION.into(), s.phase.as_str().into());
    a.insert(MESSAGE_ANNOTATION.into(), s.message.clone());
    match &s.progress {
        Some(p) => a.insert(PROGRESS_ANNOTATION.into(), p.clone()),
        None => a.remove(PROGRESS_ANNOTATION),
    };
}

/// Carries out the controller's own step and nothing else: no kubelet, provisioner or PV
/// controller moves, so whatever follows is the controller's doing alone. False at rest.
fn carry_out(w: &mut World, step: &Step) -> bool {
    match step.clone() {
        Step::Ignore | Step::Wait { .. } => return false,
        Step::Annotate { status, .. } => show(&mut w.pvc, &status),
        Step::AddFinalizer => w
            .pvc
            .metadata
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(POPULATOR_FINALIZER.into()),
        Step::CreatePrime(p) => w.prime = Some(*p),
        Step::CreatePod { pod, .. } => w.pod = Some(*pod),
        Step::RecordFailure { attempt, .. } => {
            let prime = w.prime.as_mut().expect("a failure is counted on the prime");
            prime
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(FAILED_ATTEMPTS_ANNOTATION.into(), attempt.to_string());
        }
        Step::DeletePod { .. } => w.pod = None,
        Step::BindPv { .. } => w.pv = Some(pv("vms", "root", "u-1")),
        Step::DeletePrime { .. } => w.prime = None,
        Step::RemoveFinalizer => {
            if let Some(f) = w.pvc.metadata.finalizers.as_mut() {
                f.retain(|f| f != POPULATOR_FINALIZER);
            }
        }
    }
    true
}

/// Decides and carries out until rest; panics (with the trace) on anything but convergence.
fn settle(w: &mut World) -> Vec<Step> {
    let mut trace: Vec<Step> = Vec::new();
    let mut written: Vec<PvcStatus> = Vec::new();
    for _ in 0..MAX_STEPS {
        let step = w.step();
        assert_eq!(step, w.step(), "the same state, the same decision");
        if w.agent_missing.is_some() {
            assert!(
                !matches!(step, Step::CreatePod { .. }),
                "a pod without the agent: {trace:?}"
            );
        }
        if let Step::Annotate { status, .. } = &step {
            assert_ne!(
                current_status(&w.pvc).as_ref(),
                Some(status),
                "writes what the claim already shows: {trace:?}"
            );
            assert!(
                !written.contains(status),
                "writes {status:?} again after {trace:?}"
            );
            written.push(status.clone());
        }
        let moved = carry_out(w, &step);
        trace.push(step);
        if !moved {
            let annotations = w.pvc.metadata.annotations.clone();
            let rest = w.step();
            assert_eq!(&rest, trace.last().unwrap(), "rest is a fixed point");
            assert_eq!(w.pvc.metadata.annotations, annotations);
            return trace;
        }
    }
    panic!("no rest after {MAX_STEPS} steps: {trace:?}");
}

fn names(trace: &[Step]) -> Vec<&'static str> {
    trace
        .iter()
        .map(crate::populator::reconcile::step_name)
        .collect()
}

fn wffc_claim_on_a_node() -> World {
    let mut w = World::new(claim(json!({})));
    w.class = Some(class("WaitForFirstConsumer"));
    w.pvc
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(SELECTED_NODE_ANNOTATION.into(), "node-real".into());
    w
}

#[test]
fn without_the_agent_daemonset_the_claim_shows_one_stable_pending_message() {
    // Where the claim stood when two parts of the decision disagreed: already Populating,
    // finalizer and prime in place, no DaemonSet.
    let mut w = wffc_claim_on_a_node();
    w.pvc = with_status(
        with_finalizer(w.pvc),
        PopulatePhase::Populating,
        "populating from VMDiskImage fedora (attempt 1)",
        Some("0%"),
    );
    w.prime = Some(prime(false, 0, "Pending"));
    w.agent_missing = Some(AGENT_MISSING.into());
    let Step::Annotate {
        status,
        note: Some(note),
        outcome: None,
    } = w.step()
    else {
        panic!("{:?}", w.step())
    };
    assert_eq!(
        (status.phase, status.message.as_str(), status.progress),
        (PopulatePhase::Pending, AGENT_MISSING, None)
    );
    assert_eq!(note.reason, "AgentNotFound");
    assert_eq!(names(&settle(&mut w)), ["annotate", "wait"]);
    let pending = w.pvc.metadata.annotations.clone();
    // Woken again and again (the DaemonSet watch, the safety net): nothing more is written.
    for _ in 0..3 {
        assert_eq!(w.step(), Step::Wait { requeue: None });
    }
    assert_eq!(w.pvc.metadata.annotations, pending);

    // A fresh claim: nothing is started while the agent is missing.
    let mut fresh = wffc_claim_on_a_node();
    fresh.agent_missing = Some(AGENT_MISSING.into());
    assert_eq!(names(&settle(&mut fresh)), ["annotate", "wait"]);
    assert!(fresh.prime.is_none() && fresh.pvc.finalizers().is_empty());

    // The DaemonSet is installed: the claim fills.
    for mut w in [w, fresh] {
        w.agent_missing = None;
        let trace = names(&settle(&mut w));
        assert!(trace.contains(&"create-pod"), "{trace:?}");
        assert_eq!(
            current_status(&w.pvc).unwrap().phase,
            PopulatePhase::Populating
        );
    }
}

#[test]
fn every_adverse_state_is_one_stable_pending_message() {
    type Make = fn(&mut World);
    let adverse: [(&str, Make); 5] = [
        ("VMDiskImage fedora not found", |w| w.image = None),
        ("not resolved to a digest", |w| {
            // The registry is down: the image never resolves.
            w.image = Some(image(false));
            w.pvc.metadata.annotations = None;
        }),
        ("StorageClass standard not found", |w| w.class = None),
        ("WaitForFirstConsumer", |w| {
            w.pvc
                .metadata
                .annotations
                .as_mut()
                .unwrap()
                .remove(SELECTED_NODE_ANNOTATION);
        }),
        ("DaemonSet", |w| {
            w.agent_missing = Some(AGENT_MISSING.into())
        }),
    ];
    for (message, make) in adverse {
        let mut w = wffc_claim_on_a_node();
        make(&mut w);
        let trace = settle(&mut w);
        assert_eq!(names(&trace), ["annotate", "wait"], "{message}");
        let shown = current_status(&w.pvc).unwrap();
        assert_eq!(shown.phase, PopulatePhase::Pending, "{message}");
        assert!(shown.message.contains(message), "{message}: {shown:?}");
        let before = w.pvc.clone();
        settle(&mut w);
        assert_eq!(w.pvc, before, "{message}: written twice");
    }
    // A selected node that is gone, or a class nobody provisions: the pod is made and waits
    // (Populating, 0%) without another write.
    let mut w = wffc_claim_on_a_node();
    w.class.as_mut().unwrap().provisioner = "nobody".into();
    let trace = names(&settle(&mut w));
    assert_eq!(
        trace,
        [
            "add-finalizer",
            "create-prime",
            "annotate",
            "create-pod",
            "wait"
        ]
    );
}

/// The statuses a claim may carry when the controller starts (some written by an older one).
fn shown(index: u8) -> Option<PvcStatus> {
    let s = |phase, message: &str, progress: Option<&str>| Some(status(phase, message, progress));
    match index {
        1 => s(PopulatePhase::Pending, AGENT_MISSING, None),
        2 => s(
            PopulatePhase::Populating,
            "populating from VMDiskImage fedora (attempt 1)",
            Some("0%"),
        ),
        3 => s(PopulatePhase::Retrying, "attempt 1 failed: boom", None),
        4 => s(PopulatePhase::Failed, "given up", None),
        5 => s(PopulatePhase::Succeeded, "bound to pv-1", Some("100%")),
        6 => s(
            PopulatePhase::Rebinding,
            "filled from VMDiskImage fedora; handing the volume to the claim",
            Some("100%"),
        ),
        _ => None,
    }
}

fn populator_pod_in(phase: u8, attempt: u32, recent: bool) -> Option<Pod> {
    let finished = if recent {
        "2026-11-24T09:59:55Z"
    } else {
        "2026-11-24T09:00:00Z"
    };
    let mut p = match phase {
        1 => pod("Pending", attempt, None),
        2 => pod("Running", attempt, None),
        3 => pod("Succeeded", attempt, Some((0, "populated", finished))),
        4 => pod("Failed", attempt, Some((1, "boom", finished))),
        5 => pod(
            "Failed",
            attempt,
            Some((PERMANENT_EXIT_CODE, "too small", finished)),
        ),
        6 => pod("Running", attempt, None),
        _ => return None,
    };
    if phase == 6 {
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            crate::time::to_timestamp(now()),
        ));
    }
    Some(p)
}

prop_compose! {
    fn world()(
        (image_state, digest_on_claim, class_state, selected_node, finalizer, block)
            in (0..3u8, any::<bool>(), 0..4u8, any::<bool>(), any::<bool>(), any::<bool>()),
        (prime_state, failed, pod_state, attempt, recent, pv_state)
            in (0..4u8, 0..4u32, 0..7u8, 1..5u32, any::<bool>(), 0..3u8),
        (agent_missing, status_index, deleting, bound, provisioner, pull_state)
            in (any::<bool>(), 0..7u8, any::<bool>(), any::<bool>(), any::<bool>(), 0..4u8),
    ) -> World {
        let mut w = World::new(claim(if block { json!({"volumeMode": "Block"}) } else { json!({}) }));
        w.image = [None, Some(image(false)), Some(image(true))][image_state as usize].clone();
        if !digest_on_claim {
            w.pvc.metadata.annotations = None;
        }
        match class_state {
            0 => w.pvc.spec.as_mut().unwrap().storage_class_name = None,
            1 => w.class = None,
            2 => w.class = Some(class("Immediate")),
            _ => w.class = Some(class("WaitForFirstConsumer")),
        }
        if let (Some(c), false) = (w.class.as_mut(), provisioner) {
            c.provisioner = "kubernetes.io/no-provisioner".into();
        }
        if selected_node {
            w.pvc.metadata.annotations.get_or_insert_with(Default::default)
                .insert(SELECTED_NODE_ANNOTATION.into(), "node-real".into());
        }
        if finalizer {
            w.pvc = with_finalizer(w.pvc);
        }
        if let Some(s) = shown(status_index) {
            show(&mut w.pvc, &s);
        }
        w.prime = match prime_state {
            1 => Some(prime(false, failed, "Pending")),
            2 => Some(prime(true, failed, "Bound")),
            3 => Some(prime(true, failed, "Lost")),
            _ => None,
        };
        w.pod = populator_pod_in(pod_state, attempt, recent);
        w.pv = match pv_state {
            1 => Some(pv("vmdisk-system", "prime-u-1", "p-1")),
            2 => Some(pv("vms", "root", "u-1")),
            _ => None,
        };
        w.agent_missing = agent_missing.then(|| AGENT_MISSING.to_string());
        let unable = || NodePull::Unavailable("node node-real runs \"containerd://1.6.20\"".into());
        let (method, node_pull) = match pull_state {
            1 => (Some(vmdisk_crds::PullMethod::Node), Some(NodePull::Nodes(vec!["node-real".into()]))),
            2 => (Some(vmdisk_crds::PullMethod::Node), Some(unable())),
            3 => (Some(vmdisk_crds::PullMethod::NodeOnly), Some(unable())),
            _ => (None, None),
        };
        if let Some(image) = w.image.as_mut() {
            image.spec.source.registry.pull_method = method;
        }
        w.node_pull = node_pull;
        if deleting {
            w.pvc.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(crate::time::to_timestamp(now())),
            );
        }
        if bound {
            w.pvc.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
        }
        w
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_state_comes_to_rest_and_writes_each_status_once(mut w in world()) {
        settle(&mut w);
    }
}
