//! Controllers that settle on a real API server: with a piece of the installation missing, a
//! claim waiting for it carries one stable message and is written a handful of times at most,
//! counted by the resourceVersions a watch sees; once the piece is back, the claim moves on.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use vmdisk_crds::{
    VMDiskImage, CLAIM_UID_LABEL, INSTALL_NAMESPACE, MESSAGE_ANNOTATION, PHASE_ANNOTATION,
};
use vmdisk_tests::disks::make_ext4_raw;
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;

use crate::local::LocalInstall;
use crate::support::{create_image, wait_for};
use crate::Case;

const WAIT: Duration = Duration::from_secs(120);
/// How long writes are counted while nothing changes.
const QUIET: Duration = Duration::from_secs(60);
/// Writes allowed in [`QUIET`]: one status, and one per backoff step at most.
const HANDFUL: usize = 3;

const AGENT_DAEMONSET: &str = "vmdisk-cache-agent";

/// The distinct resourceVersions `namespace/name` takes during `span` (its writes).
async fn count_writes(admin: &Client, namespace: &str, name: &str, span: Duration) -> usize {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut versions = BTreeSet::new();
    let mut first = None;
    let stream = watcher(api, config);
    futures::pin_mut!(stream);
    let _ = tokio::time::timeout(span, async {
        while let Some(event) = stream.next().await {
            if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event {
                let version = o.resource_version().unwrap_or_default();
                // The version at the start is no write.
                if first.get_or_insert_with(|| version.clone()) != &version {
                    versions.insert(version);
                }
            }
        }
    })
    .await;
    versions.len()
}

/// The agent DaemonSet deleted, its pods left (the local agents' tokens are bound to them);
/// the returned object recreates it.
async fn remove_agent_daemonset(admin: &Client) -> DaemonSet {
    let api: Api<DaemonSet> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let mut ds = api.get(AGENT_DAEMONSET).await.unwrap();
    api.delete(
        AGENT_DAEMONSET,
        &DeleteParams {
            propagation_policy: Some(PropagationPolicy::Orphan),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    wait_for("the agent DaemonSet to be gone", WAIT, || {
        let api = api.clone();
        async move {
            match api.get_opt(AGENT_DAEMONSET).await {
                Ok(None) => Ok(()),
                other => Err(format!("{:?}", other.map(|d| d.map(|d| d.name_any())))),
            }
        }
    })
    .await;
    ds.metadata = kube::api::ObjectMeta {
        name: ds.metadata.name.clone(),
        namespace: ds.metadata.namespace.clone(),
        labels: ds.metadata.labels.clone(),
        annotations: ds.metadata.annotations.clone(),
        ..Default::default()
    };
    ds.status = None;
    ds
}

async fn restore_agent_daemonset(admin: &Client, ds: &DaemonSet) {
    let api: Api<DaemonSet> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    match api.create(&PostParams::default(), ds).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("restoring the agent DaemonSet: {e}"),
    }
}

/// Deletes the claim and lets it go: its populator pod (which a fake node never confirms
/// ended) removed at once once the populator has deleted it.
async fn release(admin: &Client, claims: &Api<PersistentVolumeClaim>, uid: &str) {
    let _ = claims.delete("root", &DeleteParams::default()).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let selector = format!("{CLAIM_UID_LABEL}={uid}");
    for _ in 0..150 {
        let Ok(list) = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
        else {
            break;
        };
        for pod in list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
        {
            let _ = pods
                .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                .await;
        }
        if matches!(claims.get_opt("root").await, Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The case: the controller running, the agent DaemonSet not installed, a resolved
/// image and a WaitForFirstConsumer claim the scheduler placed. The claim says `Pending` with
/// the reason once, is not written again for a minute, and goes on to `Populating` as soon as
/// the DaemonSet is back.
pub async fn a_claim_waiting_for_the_missing_agent_daemonset_is_written_a_handful_of_times(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-settle").await;
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "settle", 16, 4, 3003);
    push_container_disk(&registry, "disks/settle", "v1", &raw).await;
    create_image(
        &admin,
        &ns,
        "t",
        json!({"source": {"registry": {"url": format!("{}/disks/settle:v1", registry.addr), "insecure": true}},
               "cache": {"nodeSelector": {"kubernetes.io/hostname": "no-such-node"}}}),
    )
    .await;
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &ns);
    wait_for("the image to resolve", WAIT, || {
        let images = images.clone();
        async move {
            let image = images.get("t").await.map_err(|e| e.to_string())?;
            image
                .digest()
                .map(|_| ())
                .ok_or(format!("{:?}", image.status))
        }
    })
    .await;

    let ds = remove_agent_daemonset(&admin).await;
    {
        let admin = admin.clone();
        let ds = ds.clone();
        case.defer(async move { restore_agent_daemonset(&admin, &ds).await });
    }

    let class_name = format!("{ns}-wffc");
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class_name},
        "provisioner": "kubernetes.io/host-path",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .unwrap();
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    {
        let admin = admin.clone();
        let doomed = class_name.clone();
        case.defer(async move {
            let _ = Api::<StorageClass>::all(admin)
                .delete(&doomed, &DeleteParams::default())
                .await;
        });
    }
    // The real node confirms the populator pod's end when the claim goes; a fake one never.
    let node = fx
        .nodes
        .iter()
        .find(|n| *n == "node-real")
        .cloned()
        .unwrap_or_else(|| fx.fake_nodes()[0].clone());
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "root",
                     "annotations": {"volume.kubernetes.io/selected-node": node}},
        "spec": {"storageClassName": class_name, "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "64Mi"}},
                 "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "t"}}
    }))
    .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    let uid = claims
        .create(&PostParams::default(), &claim)
        .await
        .unwrap()
        .uid()
        .unwrap();
    {
        let claims = claims.clone();
        let admin = admin.clone();
        case.defer(async move { release(&admin, &claims, &uid).await });
    }
    let shown = |claims: Api<PersistentVolumeClaim>, phase: &'static str| async move {
        let c = claims.get("root").await.map_err(|e| e.to_string())?;
        let a = c.annotations();
        (a.get(PHASE_ANNOTATION).map(String::as_str) == Some(phase))
            .then(|| a.get(MESSAGE_ANNOTATION).cloned().unwrap_or_default())
            .ok_or(format!("{:?}", c.metadata.annotations))
    };
    let message = wait_for("the claim to say Pending", WAIT, || {
        shown(claims.clone(), "Pending")
    })
    .await;
    assert!(
        message.contains("cache agent DaemonSet"),
        "{message}\ncontroller log:\n{}",
        fx.controller_log()
    );

    let writes = count_writes(&admin, &ns, "root", QUIET).await;
    println!("settle: the claim waiting for the agent DaemonSet was written {writes} time(s) in {QUIET:?}");
    assert!(
        writes <= HANDFUL,
        "{writes} writes in {QUIET:?} while nothing changed\ncontroller log:\n{}",
        fx.controller_log()
    );
    let still = claims.get("root").await.unwrap();
    assert_eq!(
        still.annotations().get(MESSAGE_ANNOTATION),
        Some(&message),
        "one stable message"
    );

    // The DaemonSet is installed: the populator pod is made at once.
    restore_agent_daemonset(&admin, &ds).await;
    wait_for("the claim to say Populating", WAIT, || {
        shown(claims.clone(), "Populating")
    })
    .await;
}

/// Images per run of the unreachable-registry case (`VMDISK_E2E_UNREACHABLE_IMAGES`).
fn unreachable_images() -> usize {
    std::env::var("VMDISK_E2E_UNREACHABLE_IMAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok());
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(14).unwrap_or(0.0) + ticks(15).unwrap_or(0.0)) / per_second
}

fn resolve_warnings(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("cannot resolve the image reference"))
        .count()
}

/// Many images whose registry refuses connections: each is tried once per backoff step
/// (30 s, doubling), its status written once and its Event recorded once, however often the
/// controller is woken; the figures (log lines, writes, CPU) are printed.
pub async fn many_images_behind_an_unreachable_registry_back_off(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-unreachable").await;
    let n = unreachable_images();
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &ns);
    let (pid, log) = {
        let c = fx.controller.lock().unwrap();
        (c.child.id(), c.log.clone())
    };
    let warnings_before = resolve_warnings(&log);
    let cpu_before = cpu_seconds(pid);

    // Every write to the namespace's images, from before the first is made.
    let writes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        BTreeSet<String>,
    >::new()));
    let watching = {
        let writes = Arc::clone(&writes);
        let stream = watcher(images.clone(), watcher::Config::default());
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event {
                    writes
                        .lock()
                        .unwrap()
                        .entry(o.name_any())
                        .or_default()
                        .insert(o.resource_version().unwrap_or_default());
                }
            }
        })
    };
    let started = std::time::Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let admin = admin.clone();
            let ns = ns.clone();
            async move {
                create_image(
                    &admin,
                    &ns,
                    &format!("down-{i}"),
                    json!({"source": {"registry": {"url": format!("127.0.0.1:1/disks/down-{i}:v1"), "insecure": true}}}),
                )
                .await;
            }
        })
        .await;
    let created = started.elapsed();
    // Every image tried (listed every 5 s: 10,000 images are a heavy list), and at least two
    // minutes from the last create, so the 30 s and 90 s retries fall in.
    let count_failed = || async {
        images
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|i| {
                        i.status.as_ref().and_then(|s| s.phase)
                            == Some(vmdisk_crds::ImagePhase::Failed)
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let mut failed = 0;
    let give_up = std::time::Instant::now() + Duration::from_secs(600);
    while failed < n && std::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_secs(5)).await;
        failed = count_failed().await;
    }
    let all_failed = started.elapsed();
    let rest = (created + Duration::from_secs(120)).saturating_sub(started.elapsed());
    tokio::time::sleep(rest).await;
    let elapsed = started.elapsed();
    watching.abort();
    let warnings = resolve_warnings(&log) - warnings_before;
    let cpu = cpu_seconds(pid) - cpu_before;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), &ns);
    let events = events.list(&Default::default()).await.unwrap().items;
    let resolve_failed_events = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ResolveFailed"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count.max(1)) as usize)
        .sum::<usize>();
    let writes = writes.lock().unwrap().clone();
    // The create is one version; every further one is the controller's write.
    let status_writes: usize = writes.values().map(|v| v.len().saturating_sub(1)).sum();
    let most = writes
        .values()
        .map(|v| v.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let minutes = elapsed.as_secs_f64() / 60.0;
    println!(
        "unreachable: {n} images created in {created:.0?}, all Failed after {all_failed:.0?}; \
         after {elapsed:.0?}: {failed} Failed, \
         {warnings} resolve warnings ({:.0}/min), {status_writes} status writes ({:.0}/min, at most \
         {most} per image), {resolve_failed_events} ResolveFailed Events, controller CPU {cpu:.1} s \
         ({:.0}% of one core)",
        warnings as f64 / minutes,
        status_writes as f64 / minutes,
        100.0 * cpu / elapsed.as_secs_f64(),
    );
    // 10,000 images would outlast the namespace's deletion: they go here, in one request.
    let _ = images
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    assert_eq!(failed, n, "every image shows the failure");
    assert!(most <= 1, "an image's status written {most} times");
    assert!(
        resolve_failed_events <= n,
        "{resolve_failed_events} ResolveFailed Events for {n} images"
    );
    // Attempts at 0, 30, 90, 210 s… of each image's own clock: those that fit in the run.
    let steps = 1
        + (1..20)
            .take_while(|j| 30 * ((1u64 << j) - 1) <= elapsed.as_secs())
            .count();
    assert!(
        warnings <= steps * n,
        "{warnings} resolve warnings for {n} images in {elapsed:?}"
    );
}

/// The other missing pieces, each behind one claim, counted together for a minute once every
/// claim shows a phase: an image that does not exist, an image whose registry cannot be
/// reached (never resolved), a StorageClass that does not exist, a StorageClass without a
/// provisioner (its prime claim never binds), and a selected node that was deleted. Each claim
/// is written a handful of times at most, with one message.
pub async fn claims_waiting_for_other_missing_pieces_are_written_a_handful_of_times(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-missing").await;
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "missing", 16, 4, 3004);
    push_container_disk(&registry, "disks/missing", "v1", &raw).await;
    let unplaced = json!({"nodeSelector": {"kubernetes.io/hostname": "no-such-node"}});
    create_image(
        &admin,
        &ns,
        "resolved",
        json!({"source": {"registry": {"url": format!("{}/disks/missing:v1", registry.addr), "insecure": true}},
               "cache": unplaced}),
    )
    .await;
    // Nothing listens on port 1.
    create_image(
        &admin,
        &ns,
        "unreachable",
        json!({"source": {"registry": {"url": "127.0.0.1:1/disks/missing:v1", "insecure": true}},
               "cache": unplaced}),
    )
    .await;
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &ns);
    wait_for("the image to resolve", WAIT, || {
        let images = images.clone();
        async move {
            let image = images.get("resolved").await.map_err(|e| e.to_string())?;
            image
                .digest()
                .map(|_| ())
                .ok_or(format!("{:?}", image.status))
        }
    })
    .await;
    let class_name = format!("{ns}-no-provisioner");
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class_name},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
    }))
    .unwrap();
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    {
        let admin = admin.clone();
        let doomed = class_name.clone();
        case.defer(async move {
            let _ = Api::<StorageClass>::all(admin)
                .delete(&doomed, &DeleteParams::default())
                .await;
        });
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    let cases = [
        ("image-missing", "absent", "standard", None),
        ("registry-down", "unreachable", "standard", None),
        ("class-missing", "resolved", "no-such-class", None),
        ("no-provisioner", "resolved", class_name.as_str(), None),
        ("node-deleted", "resolved", "standard", Some("deleted-node")),
    ];
    for (name, image, class, node) in cases {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name,
                         "annotations": node.map(|n| json!({"volume.kubernetes.io/selected-node": n}))},
            "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "64Mi"}},
                     "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": image}}
        }))
        .unwrap();
        claims.create(&PostParams::default(), &claim).await.unwrap();
    }
    for (name, ..) in cases {
        wait_for(&format!("{name} to show a phase"), WAIT, || {
            let claims = claims.clone();
            async move {
                let c = claims.get(name).await.map_err(|e| e.to_string())?;
                c.annotations()
                    .get(PHASE_ANNOTATION)
                    .map(|_| ())
                    .ok_or(format!("{:?}", c.metadata.annotations))
            }
        })
        .await;
    }
    let before: Vec<Option<String>> = futures::future::join_all(cases.iter().map(|(name, ..)| {
        let claims = claims.clone();
        async move {
            claims
                .get(name)
                .await
                .ok()
                .and_then(|c| c.annotations().get(MESSAGE_ANNOTATION).cloned())
        }
    }))
    .await;
    let writes = futures::future::join_all(
        cases
            .iter()
            .map(|(name, ..)| count_writes(&admin, &ns, name, QUIET)),
    )
    .await;
    let mut report = Vec::new();
    for (((name, ..), writes), message) in cases.iter().zip(&writes).zip(&before) {
        let now = claims
            .get(name)
            .await
            .ok()
            .and_then(|c| c.annotations().get(MESSAGE_ANNOTATION).cloned());
        println!("settle: {name}: {writes} write(s) in {QUIET:?}: {message:?}");
        report.push((name, *writes, message.clone(), now));
    }
    for (name, writes, message, now) in report {
        assert!(
            writes <= HANDFUL,
            "{name}: {writes} writes in {QUIET:?} while nothing changed ({message:?})\ncontroller log:\n{}",
            fx.controller_log()
        );
        assert_eq!(message, now, "{name}: one stable message");
    }
}
