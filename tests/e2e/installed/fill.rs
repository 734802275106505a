//! Filling claims on the real node: Filesystem cold then warm, a claim smaller than its disk,
//! Block on a loop device, WaitForFirstConsumer through the real scheduler.

use super::claims::*;
use super::*;

/// An annotated PVC of the default class: filled cold (the populator pod pulls), then a second
/// one from the cache the first left on the node; a pod mounting each finds KubeVirt's layout.
pub(super) async fn a_filesystem_pvc_is_filled_cold_then_warm_and_kubevirt_can_use_it(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-fs").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "fedora", 64, 8, 302, true).await;
    // No prefetch: the first populate finds the cache cold.
    create_image(&admin, &ns, "fedora", json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "64Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "fedora").await;
    let mut times = Vec::new();
    for (name, expect) in [("cold", "cold: pulled"), ("warm", "warm: cache hit")] {
        let started = Instant::now();
        let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": "fedora"}}, "spec": {}})).await;
        let (bound, took) = wait_bound(&admin, &ns, name, started).await;
        times.push((name, took));
        let pv = Api::<PersistentVolume>::all(admin.clone())
            .get(bound.spec.as_ref().unwrap().volume_name.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(
            pv.annotations()
                .get("vmdisk.io/populated-from")
                .map(String::as_str),
            Some(format!("{ns}/fedora").as_str())
        );
        assert_cleaned_up(&admin, &pvc).await;
        let events = events_of(&admin, &ns, name).await;
        let finished = events
            .iter()
            .find(|(r, _, _)| r == "PopulatorFinished")
            .unwrap_or_else(|| panic!("{events:?}"));
        assert!(finished.1.contains(expect), "{name}: {finished:?}");
        assert!(
            events.iter().any(|(r, _, _)| r == "PopulatorCreated"),
            "{events:?}"
        );
        let claim = succeeded_with_a_clean_timeline(&admin, &ns, name).await;
        assert_eq!(
            claim
                .annotations()
                .get("vmdisk.io/progress")
                .map(String::as_str),
            Some("100%")
        );
        // KubeVirt's view: /disk.img, raw, qemu's, the source disk.
        std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
        let log = check_pod(&fx, &ns, name, false, work.path(),
            "stat -c '%u:%g %s' /vm/disk.img && qemu-img info --output=json /vm/disk.img | grep '\"format\"' && qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw").await;
        assert!(log.contains("107:107"), "{log}");
        assert!(log.contains("\"format\": \"raw\""), "{log}");
        assert!(log.contains("Images are identical"), "{log}");
    }
    println!(
        "time from PVC create to Bound: cold {:.1}s, warm {:.1}s",
        times[0].1.as_secs_f64(),
        times[1].1.as_secs_f64()
    );
}

/// The cold path sizes its disks: the image controller reads the qcow2 header from the first
/// bytes of the layer (no node warms the image: `prefetch: false`), so a claim asking for 1Mi
/// is raised to the disk's size at admission; one admitted before the image existed keeps 1Mi,
/// and the populator provisions its volume at the disk's size instead. Both hold the disk.
pub(super) async fn a_1mi_claim_of_an_image_no_node_has_warmed_holds_the_whole_disk(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-cold-size").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "coldsize", 96, 4, 304, true).await;
    let disk_bytes = std::fs::metadata(&raw).unwrap().len();
    let claim = |name: &str| {
        json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": "coldsize"}},
               "spec": {"resources": {"requests": {"storage": "1Mi"}}}})
    };
    // Admitted while the image does not exist yet: nothing knows the disk's size.
    let early = create_pvc(&admin, &ns, claim("early")).await;
    assert_eq!(
        early
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "1Mi"
    );
    create_image(&admin, &ns, "coldsize", json!({"source": {"registry": {"url": url, "insecure": true}}, "cache": {"prefetch": false}})).await;
    // The size is written with the digest: the first resolved status has it, before the
    // populate of "early" (a cold pull on the real node) warms anything.
    let image = wait_resolved(&admin, &ns, "coldsize").await.status.unwrap();
    let logs = || {
        fx.env
            .kubectl_status(&[
                "-n",
                INSTALL_NAMESPACE,
                "logs",
                "--prefix",
                "--tail=100",
                "-l",
                "app.kubernetes.io/name=vmdisk-controller",
            ])
            .unwrap_or_else(|e| e)
    };
    assert_eq!(
        image.virtual_size,
        Some(disk_bytes),
        "{image:?}\n{}",
        logs()
    );
    assert_eq!(image.source_format.as_deref(), Some("qcow2"));
    let after = create_pvc(&admin, &ns, claim("after")).await;
    let raised = vmdisk_crds::parse_quantity(
        &after
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
    )
    .unwrap();
    assert!(raised >= disk_bytes, "raised at admission to {raised}");
    std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
    for name in ["early", "after"] {
        let (bound, _) = wait_bound(&admin, &ns, name, Instant::now()).await;
        let capacity = vmdisk_crds::parse_quantity(
            &bound.status.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
        )
        .unwrap();
        assert!(capacity >= disk_bytes, "{name}: a {capacity}-byte volume");
        succeeded_with_a_clean_timeline(&admin, &ns, name).await;
        let log = check_pod(
            &fx,
            &ns,
            name,
            false,
            work.path(),
            "qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw",
        )
        .await;
        assert!(log.contains("Images are identical"), "{name}: {log}");
    }
}

/// A Block claim on a local PV over a loop device: the raw disk lands on the device, the
/// stale bytes of its holes zeroed.
pub(super) async fn a_block_pvc_is_filled_on_a_local_loop_device(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-block").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "block", 48, 4, 303, false).await;
    create_image(
        &admin,
        &ns,
        "block",
        json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "48Mi"}),
    )
    .await;
    wait_resolved(&admin, &ns, "block").await;
    let class = local_block_class(&admin, &case, &ns).await;
    let pvc = create_pvc(
        &admin,
        &ns,
        json!({"metadata": {"name": "disk", "annotations": {"vmdisk.io/image": "block"}},
        "spec": {"volumeMode": "Block", "storageClassName": class}}),
    )
    .await;
    let (device, pv_name) = loop_pv_for_prime(&fx, &case, &ns, work.path(), &pvc, 64).await;
    let (bound, took) = wait_bound(&admin, &ns, "disk", Instant::now()).await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(pv_name.as_str())
    );
    assert_cleaned_up(&admin, &pvc).await;
    let head = work.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&device).unwrap()[..48 << 20]).unwrap();
    assert!(
        same_content(&raw, &head),
        "the device holds the disk, holes zeroed"
    );
    println!("block: PVC Bound {:.1}s after create", took.as_secs_f64());
}

/// WaitForFirstConsumer: the real scheduler picks the node for the consumer, the populator
/// fills the volume there, and the consumer starts on it.
pub(super) async fn wait_for_first_consumer_follows_the_real_scheduler(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-wffc").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "wffc", 32, 4, 304, true).await;
    create_image(
        &admin,
        &ns,
        "wffc",
        json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "32Mi"}),
    )
    .await;
    wait_resolved(&admin, &ns, "wffc").await;
    let class = format!("{ns}-wffc");
    let sc: StorageClass = serde_json::from_value(json!({"metadata": {"name": class},
        "provisioner": "kubernetes.io/host-path", "volumeBindingMode": "WaitForFirstConsumer"}))
    .unwrap();
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    {
        let (admin, class) = (admin.clone(), class.clone());
        case.defer(async move {
            let _ = Api::<StorageClass>::all(admin)
                .delete(&class, &DeleteParams::default())
                .await;
        });
    }
    let pvc = create_pvc(
        &admin,
        &ns,
        json!({"metadata": {"name": "root", "annotations": {"vmdisk.io/image": "wffc"}},
        "spec": {"storageClassName": class}}),
    )
    .await;
    std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
    // The consumer: scheduled by the real scheduler, started once the claim is filled.
    let log = check_pod(
        &fx,
        &ns,
        "root",
        false,
        work.path(),
        "qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw",
    )
    .await;
    assert!(log.contains("Images are identical"), "{log}");
    let claim = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns)
        .get("root")
        .await
        .unwrap();
    assert_eq!(
        claim
            .annotations()
            .get("volume.kubernetes.io/selected-node"),
        Some(&fx.real_node)
    );
    assert_cleaned_up(&admin, &pvc).await;
}

/// A pool of VMs at once: 20 claims of one warm image created together are all Bound, each
/// filled by its first pod with no step refused and no change missed, and nothing is left.
pub(super) async fn a_burst_of_claims_of_one_warm_image_all_bind_without_a_retry(
    fx: Arc<Installed>,
    case: Case,
) {
    const BURST: usize = 20;
    let admin = case.admin();
    let ns = case.namespace("e2e-burst").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, _) = disk_image(&fx, work.path(), "burst", 32, 4, 305, false).await;
    create_image(
        &admin,
        &ns,
        "burst",
        json!({"source": {"registry": {"url": url, "insecure": true}}}),
    )
    .await;
    wait_warm(&admin, &ns, "burst", WAIT).await;
    let names: Vec<String> = (0..BURST).map(|i| format!("vm-{i:02}")).collect();
    let filled = create_at_once(&admin, &ns, "burst", &names).await;
    let unclean = filled.unclean();
    assert!(unclean.is_empty(), "retries nobody asked for: {unclean:#?}");
    println!(
        "burst: {BURST} claims of one warm image Bound {:.1}s after they were created; steps (median/last, s): {}",
        filled.seconds,
        filled.steps()
    );
    for pvc in &filled.created {
        assert_cleaned_up(&admin, pvc).await;
    }
}
