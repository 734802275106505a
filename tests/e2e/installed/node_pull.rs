//! `pullMethod: node`: where the real node's runtime mounts images as volumes (containerd >=
//! 2.1, `cluster up --containerd2`), the populator pod mounts the containerDisk as an image
//! volume and converts its disk onto the claim; where it cannot (containerd 1.6), the image
//! says so in its `NodePull` condition, `node` claims are filled through the node cache with an
//! Event saying why, and `nodeOnly` claims fail at once, without a pod.

use k8s_openapi::api::core::v1::Node;

use super::claims::*;
use super::*;
use crate::support::pull_secret;

/// Events of a claim: the populator's finish note, and whether it fell back.
async fn finished_note(admin: &Client, ns: &str, claim: &str) -> (String, bool) {
    let events = events_of(admin, ns, claim).await;
    let finished = events
        .iter()
        .find(|(r, _, _)| r == "PopulatorFinished")
        .map(|(_, n, _)| n.clone())
        .unwrap_or_else(|| panic!("{claim}: no PopulatorFinished Event: {events:?}"));
    let fell_back = events.iter().any(|(r, _, _)| r == "NodePullUnavailable");
    (finished, fell_back)
}

/// The image's `NodePull` condition: (status, reason, message).
async fn node_pull_condition(admin: &Client, ns: &str, name: &str) -> (String, String, String) {
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), ns);
    wait_for(&format!("{name}'s NodePull condition"), WAIT, || {
        let images = images.clone();
        async move {
            let image = images.get(name).await.map_err(|e| e.to_string())?;
            image
                .status
                .iter()
                .flat_map(|s| s.conditions.iter())
                .find(|c| c.type_ == "NodePull")
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
                .ok_or(format!("{:?}", image.status))
        }
    })
    .await
}

/// Declares `addr` (plain HTTP) to the real node's runtime, as `.ci/with-cluster` does for the
/// shared registry; `Err` when the cluster script is not known.
fn declare_to_nodes(addr: &str) -> Result<(), String> {
    let script = std::env::var("VMDISK_E2E_CLUSTER_SCRIPT")
        .map_err(|_| "VMDISK_E2E_CLUSTER_SCRIPT is not set")?;
    let dir =
        std::env::var("VMDISK_E2E_CLUSTER_DIR").map_err(|_| "VMDISK_E2E_CLUSTER_DIR is not set")?;
    let status = std::process::Command::new("bash")
        .args([script.as_str(), "registry", dir.as_str(), addr])
        .status()
        .map_err(|e| e.to_string())?;
    status
        .success()
        .then_some(())
        .ok_or(format!("cluster registry {addr}: {status}"))
}

pub(super) async fn pull_method_node_fills_from_the_runtime_or_falls_back(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-node-pull").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let node = Api::<Node>::all(admin.clone())
        .get(&fx.real_node)
        .await
        .unwrap();
    let runtime = node
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.container_runtime_version.clone())
        .unwrap_or_default();
    let able = vmdisk_controller::node_pull::node_supports(&node).is_ok();
    println!(
        "node pull: {} runs {runtime}: image volumes {}",
        fx.real_node,
        if able { "supported" } else { "unsupported" }
    );

    let (url_q, raw_q) = disk_image(&fx, work.path(), "np-qcow2", 48, 4, 601, true).await;
    let (url_r, raw_r) = disk_image(&fx, work.path(), "np-raw", 48, 4, 602, false).await;
    let pulled = |url: &str, method: &str| json!({"source": {"registry": {"url": url, "insecure": true, "pullMethod": method}}});
    create_image(&admin, &ns, "q", pulled(&url_q, "node")).await;
    create_image(&admin, &ns, "r", pulled(&url_r, "node")).await;
    create_image(&admin, &ns, "only", pulled(&url_r, "nodeOnly")).await;
    for image in ["q", "r", "only"] {
        wait_resolved(&admin, &ns, image).await;
    }
    let claim = |name: &str, image: &str| json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": image}}, "spec": {}});
    let started = Instant::now();
    create_pvc(&admin, &ns, claim("q-fs", "q")).await;
    let class = local_block_class(&admin, &case, &ns).await;
    let mut block = claim("r-block", "r");
    block["spec"] = json!({"volumeMode": "Block", "storageClassName": class});
    let block = create_pvc(&admin, &ns, block).await;
    let (device, _) = loop_pv_for_prime(&fx, &case, &ns, work.path(), &block, 64).await;
    create_pvc(&admin, &ns, claim("only-fs", "only")).await;

    let (_, node_took) = wait_bound(&admin, &ns, "q-fs", started).await;
    wait_bound(&admin, &ns, "r-block", started).await;
    for name in ["q-fs", "r-block"] {
        succeeded_with_a_clean_timeline(&admin, &ns, name).await;
    }
    let (status, reason, message) = node_pull_condition(&admin, &ns, "q").await;
    println!("node pull: image q: NodePull {status} {reason}: {message}");
    for name in ["q-fs", "r-block"] {
        let (finished, fell_back) = finished_note(&admin, &ns, name).await;
        println!("node pull: {name}: {finished}");
        assert_eq!(
            finished.contains("node: image volume"),
            able,
            "{name}: {finished}"
        );
        assert_eq!(fell_back, !able, "{name}");
    }
    let log = check_pod(
        &fx,
        &ns,
        "q-fs",
        false,
        work.path(),
        "qemu-img compare -f raw -F raw /vm/disk.img /src/np-qcow2.raw && stat -c '%u:%g' /vm/disk.img",
    )
    .await;
    assert!(
        log.contains("Images are identical") && log.contains("107:107"),
        "{log}"
    );
    let head = work.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&device).unwrap()[..48 << 20]).unwrap();
    assert!(
        same_content(&raw_r, &head),
        "the device holds the raw disk, zeros written"
    );
    assert!(raw_q.exists());

    if !able {
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "ImageVolumesUnsupported")
        );
        assert!(
            message.contains("filled through the node cache"),
            "{message}"
        );
        let (_, _, only) = node_pull_condition(&admin, &ns, "only").await;
        assert!(only.contains("PVCs of this image fail"), "{only}");
        let failed = wait_given_up(&admin, &ns, "only-fs").await;
        assert!(failed.contains("pullMethod nodeOnly"), "{failed}");
        let only_fs = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns)
            .get("only-fs")
            .await
            .unwrap();
        let pod = Api::<Pod>::namespaced(admin.clone(), INSTALL_NAMESPACE)
            .get_opt(&vmdisk_crds::populator_pod_name(&only_fs.uid().unwrap()))
            .await
            .unwrap();
        assert!(
            pod.is_none(),
            "nodeOnly made a pod where no node can mount the image"
        );
        println!("node pull: nodeOnly on {runtime}: {failed}");
        return;
    }

    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "ImageVolumesSupported")
    );
    wait_bound(&admin, &ns, "only-fs", started).await;

    // A private image: the kubelet pulls it with the pod's copy of the tenant's pull secret.
    let host = fx
        .registry
        .rsplit_once(':')
        .map_or(fx.registry.as_str(), |(h, _)| h);
    let private = TestRegistry::start_plain_htpasswd_on(host, "team-n", "n0de");
    match declare_to_nodes(&private.addr) {
        Err(why) => println!("node pull: the private image is skipped: {why}"),
        Ok(()) => {
            let (url_p, _) = push_container_disk(
                &private,
                "team-n/private",
                "v1",
                &to_format(&raw_q, "qcow2", false),
            )
            .await;
            pull_secret(&admin, &ns, &private.addr, "team-n", "n0de").await;
            create_image(
                &admin,
                &ns,
                "p",
                json!({"source": {"registry": {"url": url_p, "insecure": true, "pullMethod": "node",
                    "pullSecretRef": {"name": "registry-credentials"}}}}),
            )
            .await;
            wait_resolved(&admin, &ns, "p").await;
            create_pvc(&admin, &ns, claim("p-fs", "p")).await;
            wait_bound(&admin, &ns, "p-fs", Instant::now()).await;
            succeeded_with_a_clean_timeline(&admin, &ns, "p-fs").await;
            let (finished, _) = finished_note(&admin, &ns, "p-fs").await;
            assert!(finished.contains("node: image volume"), "{finished}");
            let log = check_pod(
                &fx,
                &ns,
                "p-fs",
                false,
                work.path(),
                "qemu-img compare -f raw -F raw /vm/disk.img /src/np-qcow2.raw",
            )
            .await;
            assert!(log.contains("Images are identical"), "{log}");
        }
    }

    // Time to Bound, the same node and image, each method cold then warm (the runtime's image
    // store, vmdisk's node cache).
    // Not prefetched: its first claim pulls, as the node's first did.
    let mut by_pod = pulled(&url_q, "pod");
    by_pod["cache"] = json!({"prefetch": false});
    create_image(&admin, &ns, "q-pod", by_pod).await;
    wait_resolved(&admin, &ns, "q-pod").await;
    let mut took = vec![node_took];
    for (name, image) in [("q-fs-2", "q"), ("q-pod-1", "q-pod"), ("q-pod-2", "q-pod")] {
        let at = Instant::now();
        create_pvc(&admin, &ns, claim(name, image)).await;
        took.push(wait_bound(&admin, &ns, name, at).await.1);
        succeeded_with_a_clean_timeline(&admin, &ns, name).await;
    }
    println!(
        "node pull: time to Bound on {}, same image: node {:.2}s cold, {:.2}s warm; pod {:.2}s cold, {:.2}s warm",
        fx.real_node,
        took[0].as_secs_f64(),
        took[1].as_secs_f64(),
        took[2].as_secs_f64(),
        took[3].as_secs_f64()
    );
}
