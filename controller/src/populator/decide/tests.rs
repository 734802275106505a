//! Table tests of [`super::decide`]: each state of a population, restarts between any two
//! steps, retries, give-ups and aborts, with plain values; [`convergence`] checks that every
//! decision, carried out, leads to rest.

mod convergence;
mod pull;
mod start;

use super::*;
use k8s_openapi::api::core::v1::PersistentVolume;
use serde_json::json;
use vmdisk_crds::{ATTEMPT_ANNOTATION, CLAIM_ANNOTATION, POPULATED_ANNOTATION};

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
    serde_json::from_value(
        json!({"metadata": {"name": "standard"}, "provisioner": "x", "volumeBindingMode": mode}),
    )
    .unwrap()
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
    let mut p = prime_pvc(&claim(json!({})), &image(true), &config(), None);
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

#[derive(Debug, Clone)]
struct World {
    pvc: PersistentVolumeClaim,
    image: Option<VMDiskImage>,
    class: Option<StorageClass>,
    prime: Option<PersistentVolumeClaim>,
    pod: Option<Pod>,
    pv: Option<PersistentVolume>,
    /// Why no populator pod can be made (the agent DaemonSet is missing).
    agent_missing: Option<String>,
    /// Where the node's runtime could mount the image.
    node_pull: Option<NodePull>,
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
            agent_missing: None,
            node_pull: None,
        }
    }
    fn step(&self) -> Step {
        self.step_with(&config())
    }
    fn step_with(&self, config: &PopulatorConfig) -> Step {
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
                agent_missing: self.agent_missing.as_deref(),
                node_pull: self.node_pull.as_ref(),
            },
            config,
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

/// A prime the provisioner has bound to its PV.
fn provisioned(mut p: PersistentVolumeClaim) -> PersistentVolumeClaim {
    p.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
    p.status = Some(serde_json::from_value(json!({"phase": "Bound"})).unwrap());
    p
}

impl World {
    /// Carries out the status writes `decide` asks for until it makes the populator pod, and
    /// returns that pod and its attempt.
    fn pod_step_with(&mut self, config: &PopulatorConfig) -> (Pod, u32) {
        for _ in 0..3 {
            match self.step_with(config) {
                Step::Annotate { status, .. } => {
                    self.pvc = with_status(
                        self.pvc.clone(),
                        status.phase,
                        &status.message,
                        status.progress.as_deref(),
                    )
                }
                Step::CreatePod { pod, attempt } => return (*pod, attempt),
                other => panic!("expected the pod, got {other:?}"),
            }
        }
        panic!("no pod after three status writes")
    }

    fn pod_step(&mut self) -> (Pod, u32) {
        self.pod_step_with(&config())
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

/// Populator pods tolerate exactly the taints the platform team listed, none by default.
#[test]
fn populator_pods_tolerate_only_the_listed_taints() {
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    let (pod, _) = w.pod_step();
    assert!(pod.spec.unwrap().tolerations.is_none());
    let tolerating = PopulatorConfig {
        tolerations: vec![serde_json::from_value(
            json!({"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"}),
        )
        .unwrap()],
        ..config()
    };
    let (pod, _) = w.pod_step_with(&tolerating);
    let tolerations = pod.spec.unwrap().tolerations.unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].value.as_deref(), Some("vms"));
}

/// A claim admitted before its image's size was known asks for less than the disk: the prime
/// asks for what the disk needs (the PV is then larger than the claim), and the pod's disk
/// fits the prime.
#[test]
fn a_claim_smaller_than_its_disk_gets_a_prime_and_a_disk_the_disks_size() {
    let mut w = World::new(with_finalizer(claim(
        json!({"resources": {"requests": {"storage": "1Mi"}}}),
    )));
    let mut sized = image(true);
    sized.status.as_mut().unwrap().virtual_size = Some(2 << 30);
    w.image = Some(sized);
    let Step::CreatePrime(prime) = w.step() else {
        panic!()
    };
    let asked = &prime
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["storage"]
        .0;
    // 2 GiB × 1.06, rounded up to whole MiB.
    assert_eq!(asked, &format!("{}Mi", (2048.0f64 * 1.06).ceil() as u64));
    w.prime = Some(provisioned(*prime));
    let (pod, _) = w.pod_step();
    let args = pod.spec.unwrap().containers[0].args.clone().unwrap();
    let size: u64 = args[args.iter().position(|a| a == "--size").unwrap() + 1]
        .parse()
        .unwrap();
    assert!(size >= 2 << 30, "the disk fits: {size}");

    // A claim that asks for more than the disk keeps its size.
    let mut w = World::new(with_finalizer(claim(json!({}))));
    let mut small = image(true);
    small.status.as_mut().unwrap().virtual_size = Some(1 << 20);
    w.image = Some(small);
    let Step::CreatePrime(prime) = w.step() else {
        panic!()
    };
    assert_eq!(
        prime.spec.unwrap().resources.unwrap().requests.unwrap()["storage"].0,
        "1060Mi"
    );
}

/// A claim's `vmdisk.io/digest` that is not the image's resolved digest (written by hand
/// while the image was unresolved, say another team's digest) is not what the pod fills.
#[test]
fn a_claims_digest_other_than_the_images_is_not_used() {
    let forged = format!("sha256:{}", "f".repeat(64));
    let mut pvc = with_finalizer(claim(json!({})));
    pvc.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("vmdisk.io/digest".into(), forged.clone());
    let mut w = World::new(pvc);
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    let (pod, _) = w.pod_step();
    let args = pod.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(args.contains(&format!("@{DIGEST} ")), "{args}");
    assert!(!args.contains(&forged), "{args}");
}

/// With a class that provisions at once, the pod waits for the prime's volume: made earlier
/// it would be unschedulable and sit out the scheduler's backoff. The wait writes nothing new.
#[test]
fn with_an_immediate_class_the_pod_follows_the_provisioned_prime() {
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.prime = Some(prime(false, 0, "Pending"));
    let populating = status_of(&w.step()).clone();
    assert_eq!(populating.phase, PopulatePhase::Populating);
    w.pvc = with_status(
        w.pvc.clone(),
        populating.phase,
        &populating.message,
        populating.progress.as_deref(),
    );
    assert_eq!(w.step(), Step::Wait { requeue: None });
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    assert!(matches!(w.step(), Step::CreatePod { attempt: 1, .. }));
}

#[test]
fn the_pod_runs_populate_sized_for_kubevirt_on_the_selected_node() {
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    let step = w.step();
    assert_eq!(status_of(&step).phase, PopulatePhase::Populating);
    let (pod, attempt) = w.pod_step();
    assert_eq!(attempt, 1);
    let spec = pod.spec.clone().unwrap();
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
    // Its own copy of the pull credentials, mounted (the node's kubelet reads it; the pod's
    // ServiceAccount reads no Secret).
    assert!(
        args.contains("--docker-config /var/run/vmdisk/credentials/.dockerconfigjson"),
        "{args}"
    );
    let pod_name = pod.metadata.name.clone().unwrap();
    assert_eq!(
        crate::populator::objects::credentials_secret_of(&pod).as_deref(),
        Some(pod_name.as_str())
    );
    assert!(c
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == "credentials"
            && m.mount_path == "/var/run/vmdisk/credentials"
            && m.read_only == Some(true)));
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
    let (pod, _) = w.pod_step();
    assert_eq!(
        crate::populator::objects::required_node(&pod).as_deref(),
        Some("node-real")
    );
    let spec = pod.spec.unwrap();
    assert_eq!(
        spec.node_name, None,
        "placed by the scheduler, which honours taints, never by nodeName"
    );
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
    let mut no_size = provisioned(prime(false, 0, "Pending"));
    no_size.spec.as_mut().unwrap().resources = None;
    w.prime = Some(no_size);
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

/// `populate` marks the prime once the volume holds the disk: the volume is handed over then,
/// while the kubelet has not reported the pod's end yet; the pod is deleted with the clean-up.
/// A failed pod's mark counts for nothing: the failure is handled as one.
#[test]
fn a_prime_marked_populated_is_handed_over_while_the_pod_still_runs() {
    let mut w = World::new(with_finalizer(with_status(
        claim(json!({})),
        PopulatePhase::Populating,
        "populating from VMDiskImage fedora (attempt 1)",
        Some("42%"),
    )));
    let mut marked = prime(true, 0, "Bound");
    marked.metadata.annotations.as_mut().unwrap().insert(
        POPULATED_ANNOTATION.into(),
        "populated /target/disk.img (warm: cache hit)".into(),
    );
    w.prime = Some(marked.clone());
    w.pod = Some(pod("Running", 1, None));
    w.pv = Some(pv("vmdisk-system", "prime-u-1", "p-1"));
    let Step::Annotate { status, .. } = w.step() else {
        panic!("{:?}", w.step())
    };
    assert_eq!(status.phase, PopulatePhase::Rebinding);
    w.pvc = with_status(w.pvc.clone(), status.phase, &status.message, Some("100%"));
    let Step::BindPv { note, .. } = w.step() else {
        panic!("{:?}", w.step())
    };
    assert!(note.message.contains("warm: cache hit"), "{}", note.message);
    // Handed over; once the prime is Lost the still running pod goes.
    w.pv = Some(pv("vms", "root", "u-1"));
    let mut lost = marked.clone();
    lost.status = Some(serde_json::from_value(json!({"phase": "Lost"})).unwrap());
    w.prime = Some(lost);
    assert_eq!(w.step(), Step::DeletePod { retry: false });

    // The same mark on a pod that failed: a failure, counted for a retry.
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.prime = Some(marked);
    w.pod = Some(pod("Failed", 1, Some((1, "boom", "2026-11-24T09:00:00Z"))));
    assert!(
        matches!(w.step(), Step::RecordFailure { attempt: 1, .. }),
        "{:?}",
        w.step()
    );
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
    w.pvc.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        crate::time::to_timestamp(now()),
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
            let annotations = w.prime.as_mut().unwrap().metadata.annotations.as_mut();
            annotations.unwrap().remove(POPULATED_ANNOTATION);
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
        trace.push(crate::populator::reconcile::step_name(&step));
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
