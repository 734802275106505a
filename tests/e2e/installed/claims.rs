//! What the installed cases do with claims and images: create, wait for a phase, read Events,
//! check the clean-up, look at a filled volume from a pod on the real node.

use super::*;

/// Waits until the populator marks claim `namespace/name` Failed; returns its message.
pub(crate) async fn wait_given_up(admin: &Client, namespace: &str, name: &str) -> String {
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

pub(crate) async fn wait_resolved(admin: &Client, namespace: &str, name: &str) -> VMDiskImage {
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

pub(crate) async fn create_pvc(
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
pub(crate) async fn wait_bound(
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
pub(crate) async fn events_of(
    admin: &Client,
    namespace: &str,
    name: &str,
) -> Vec<(String, String, i32)> {
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
pub(crate) async fn assert_cleaned_up(admin: &Client, pvc: &PersistentVolumeClaim) {
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
pub(crate) async fn check_pod(
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
pub(crate) async fn disk_image(
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

/// What a timeline that went as it should ends with: no step refused, no second pod, no change
/// found only by the populator's safety net.
pub(crate) const CLEAN: &str = "; errors 0, extra attempts 0, missed changes 0";

/// Waits for the claim's last status, `Succeeded`, which comes after the clean-up; returns the
/// claim and its timeline, which names every step.
pub(crate) async fn succeeded_with_a_timeline(
    admin: &Client,
    namespace: &str,
    name: &str,
) -> (PersistentVolumeClaim, String) {
    let claims = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), namespace);
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
    let timeline = claim
        .annotations()
        .get("vmdisk.io/timeline")
        .cloned()
        .unwrap_or_else(|| panic!("{name}: no timeline: {:?}", claim.annotations()));
    println!("{namespace}/{name} fill timeline: {timeline}");
    for stage in [
        "prime +",
        "provisioned +",
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
    (claim, timeline)
}

/// [`succeeded_with_a_timeline`], and the timeline is clean (however fast the fill was, a
/// refused step, a second pod or a missed change fails the case).
pub(crate) async fn succeeded_with_a_clean_timeline(
    admin: &Client,
    namespace: &str,
    name: &str,
) -> PersistentVolumeClaim {
    let (claim, timeline) = succeeded_with_a_timeline(admin, namespace, name).await;
    assert!(
        timeline.ends_with(CLEAN),
        "{name}: a retry nobody asked for: {timeline}"
    );
    claim
}

/// Waits until at least one node holds the image warm.
pub(crate) async fn wait_warm(admin: &Client, namespace: &str, name: &str, timeout: Duration) {
    let api: Api<VMDiskImage> = Api::namespaced(admin.clone(), namespace);
    wait_for(
        &format!("VMDiskImage {name} warm on a node"),
        timeout,
        || {
            let api = api.clone();
            async move {
                let s = api
                    .get(name)
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                (s.warm_nodes > 0).then_some(()).ok_or(format!("{s:?}"))
            }
        },
    )
    .await;
}

/// Claims created together and filled: what [`create_at_once`] returns.
pub(crate) struct Filled {
    pub created: Vec<PersistentVolumeClaim>,
    /// Seconds from the first create until the last claim was Bound.
    pub seconds: f64,
    /// Each claim's `vmdisk.io/timeline`, in the order of the names.
    pub timelines: Vec<(String, String)>,
}

impl Filled {
    /// The timelines that show a refused step, a second pod or a missed change.
    pub fn unclean(&self) -> Vec<String> {
        self.timelines
            .iter()
            .filter(|(_, t)| !t.ends_with(CLEAN))
            .map(|(name, t)| format!("{name}: {t}"))
            .collect()
    }

    /// Where a burst's time went: for each step of the timelines, when the median claim and
    /// the last one reached it (seconds after the populator first saw the claim), e.g.
    /// `provisioned 5.31/7.87`.
    pub fn steps(&self) -> String {
        let mut steps: Vec<(String, Vec<f64>)> = Vec::new();
        for (_, timeline) in &self.timelines {
            let entries = timeline.split(';').next().unwrap_or_default();
            for entry in entries.split(", ") {
                let Some((step, at)) = entry.trim().split_once(" +") else {
                    continue;
                };
                let Ok(at) = at.trim_end_matches('s').parse::<f64>() else {
                    continue;
                };
                match steps.iter_mut().find(|(s, _)| s == step) {
                    Some((_, times)) => times.push(at),
                    None => steps.push((step.to_string(), vec![at])),
                }
            }
        }
        steps
            .into_iter()
            .map(|(step, mut times)| {
                times.sort_by(f64::total_cmp);
                format!(
                    "{step} {:.2}/{:.2}",
                    times[(times.len() - 1) / 2],
                    times[times.len() - 1]
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Creates claims `names` of `image` at once and waits until every one is Bound and filled.
pub(crate) async fn create_at_once(
    admin: &Client,
    namespace: &str,
    image: &str,
    names: &[String],
) -> Filled {
    let started = Instant::now();
    let created = futures::future::join_all(names.iter().map(|name| {
        create_pvc(admin, namespace, json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": image}}, "spec": {}}))
    }))
    .await;
    for name in names {
        wait_bound(admin, namespace, name, started).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut timelines = Vec::new();
    for name in names {
        let (_, timeline) = succeeded_with_a_timeline(admin, namespace, name).await;
        timelines.push((name.clone(), timeline));
    }
    Filled {
        created,
        seconds,
        timelines,
    }
}

/// A StorageClass of local volumes that binds at once (`<ns>-local`), removed when the case
/// ends.
pub(crate) async fn local_block_class(admin: &Client, case: &Case, ns: &str) -> String {
    let class = format!("{ns}-local");
    let sc: StorageClass = serde_json::from_value(json!({"metadata": {"name": class},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"})).unwrap();
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    let (admin, doomed) = (admin.clone(), class.clone());
    case.defer(async move {
        let _ = Api::<StorageClass>::all(admin)
            .delete(&doomed, &DeleteParams::default())
            .await;
    });
    class
}

/// A loop device on the real node (its backing file in `dir`, filled with 0x5a so that any
/// byte vmdisk leaves unwritten shows) as a local Block PV of `pvc`'s class, reserved for its
/// prime PVC; `(device, PV name)`. Device and PV go when the case ends.
pub(crate) async fn loop_pv_for_prime(
    fx: &Installed,
    case: &Case,
    ns: &str,
    dir: &std::path::Path,
    pvc: &PersistentVolumeClaim,
    mib: usize,
) -> (String, String) {
    let backing = dir.join(format!("{}.device", pvc.name_any()));
    std::fs::write(&backing, vec![0x5au8; mib << 20]).unwrap();
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
    let class = pvc
        .spec
        .as_ref()
        .unwrap()
        .storage_class_name
        .clone()
        .unwrap();
    let pv_name = format!("{ns}-{}-loop", pvc.name_any());
    let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": format!("{mib}Mi")}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "storageClassName": class, "persistentVolumeReclaimPolicy": "Retain", "local": {"path": device},
                 "claimRef": {"namespace": INSTALL_NAMESPACE, "name": vmdisk_crds::prime_pvc_name(&pvc.uid().unwrap())},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": [fx.real_node]}]}]}}}})).unwrap();
    Api::<PersistentVolume>::all(fx.admin.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let (admin, doomed, loop_device) = (fx.admin.clone(), pv_name.clone(), device.clone());
    case.defer(async move {
        let _ = Api::<PersistentVolume>::all(admin)
            .delete(&doomed, &DeleteParams::default())
            .await;
        let _ = std::process::Command::new("losetup")
            .args(["-d", &loop_device])
            .status();
    });
    (device, pv_name)
}
