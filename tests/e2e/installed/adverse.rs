//! When filling goes wrong: a claim deleted mid-way, a failing populator, a refused image, the
//! controller killed mid-way.

use super::claims::*;
use super::*;

/// Deleting the claim while its populator pod pulls: pod, prime, PV, finalizer and the pod's
/// staging on the node all go.
pub(super) async fn a_pvc_deleted_mid_way_leaves_nothing_behind(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-abort").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, _) = disk_image(&fx, work.path(), "abort", 96, 48, 305, false).await;
    // Slowed down so the claim can be deleted while the pull runs.
    let host = fx.registry.rsplit_once(':').unwrap().0.to_string();
    let proxy = ThrottledProxy::start(&host, &fx.registry, 2 << 20).await;
    let slow = url.replace(&fx.registry, &proxy.addr);
    create_image(&admin, &ns, "abort", json!({"source": {"registry": {"url": slow, "insecure": true}}, "size": "96Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "abort").await;
    let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": "doomed", "annotations": {"vmdisk.io/image": "abort"}}, "spec": {}})).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let pod_name = vmdisk_crds::populator_pod_name(&pvc.uid().unwrap());
    wait_for("the populator pod to run", WAIT, || {
        let (pods, pod_name) = (pods.clone(), pod_name.clone());
        async move {
            let p = pods.get_opt(&pod_name).await.map_err(|e| e.to_string())?;
            let running = p
                .as_ref()
                .and_then(|p| p.status.as_ref()?.phase.clone())
                .as_deref()
                == Some("Running");
            running
                .then_some(())
                .ok_or(format!("{:?}", p.and_then(|p| p.status)))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    claims
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the claim to go", WAIT, || {
        let claims = claims.clone();
        async move {
            claims
                .get_opt("doomed")
                .await
                .map_err(|e| e.to_string())?
                .map_or(Ok(()), |c| Err(format!("{:?}", c.finalizers())))
        }
    })
    .await;
    assert_cleaned_up(&admin, &pvc).await;
    proxy.set_rate(1 << 30);
    // The node keeps no half-written staging.
    let staging = fx.cache_dir.join("staging");
    wait_for("the node's staging to empty", WAIT, || {
        let staging = staging.clone();
        async move {
            let left: Vec<_> = std::fs::read_dir(&staging)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            left.is_empty().then_some(()).ok_or(format!("{left:?}"))
        }
    })
    .await;
}

/// A registry that goes away after the image resolved: the pod fails, is retried once (the
/// overlay allows two attempts), then the claim is marked Failed with Events saying why.
pub(super) async fn a_failing_populator_is_retried_then_given_up(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-retry").await;
    let host = fx.registry.rsplit_once(':').unwrap().0.to_string();
    let mut flaky = TestRegistry::start_plain_on(&host);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let raw = make_ext4_raw(work.path(), "flaky", 16, 1, 306);
    let (url, _) = push_container_disk(&flaky, "e2e/flaky", "v1", &raw).await;
    create_image(&admin, &ns, "flaky", json!({"source": {"registry": {"url": url, "insecure": true}}, "size": "16Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "flaky").await;
    flaky.stop();
    let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": "flaky", "annotations": {"vmdisk.io/image": "flaky"}}, "spec": {}})).await;
    let message = wait_given_up(&admin, &ns, "flaky").await;
    assert!(
        message.contains("failed after 2 attempt(s), no attempts left"),
        "{message}"
    );
    // The Event follows the annotation.
    let events = wait_for("the Events of the failures", WAIT, || {
        let admin = admin.clone();
        let ns = ns.clone();
        async move {
            let events = events_of(&admin, &ns, "flaky").await;
            let failures: Vec<&String> = events
                .iter()
                .filter(|(r, _, _)| r == "PopulatorFailed")
                .map(|(_, n, _)| n)
                .collect();
            let retried = failures
                .iter()
                .any(|n| n.contains("attempt 1 of 2 failed, retrying"));
            let given_up = failures.iter().any(|n| n.contains("no attempts left"));
            (retried && given_up)
                .then_some(events.clone())
                .ok_or(format!("{events:?}"))
        }
    })
    .await;
    let created: i32 = events
        .iter()
        .filter(|(r, _, _)| r == "PopulatorCreated")
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(created, 2, "two pods: {events:?}");
    assert_cleaned_up(&admin, &pvc).await;
}

/// An image vmdisk refuses (a qcow2 naming a backing file): no retry, the claim says why.
pub(super) async fn a_refused_image_fails_at_once(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-refused").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let overlay = work.path().join("evil.qcow2");
    vmdisk_tests::disks::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow"])
            .arg(&overlay)
            .arg("16M"),
    );
    let (url, _) = push_container_disk(&fx.registry(), "e2e/evil", "v1", &overlay).await;
    create_image(&admin, &ns, "evil", json!({"source": {"registry": {"url": url, "insecure": true}}, "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "evil").await;
    let pvc = create_pvc(
        &admin,
        &ns,
        json!({"metadata": {"name": "evil", "annotations": {"vmdisk.io/image": "evil"}},
        "spec": {"resources": {"requests": {"storage": "32Mi"}}}}),
    )
    .await;
    let message = wait_given_up(&admin, &ns, "evil").await;
    assert!(
        message.contains("after 1 attempt(s), retrying cannot help")
            && message.contains("backing file"),
        "{message}"
    );
    assert_cleaned_up(&admin, &pvc).await;
}

/// The leading controller replica dies while a populator pod works: the other replica takes
/// the Lease over and finishes from what the cluster shows.
pub(super) async fn the_controller_killed_mid_way_still_finishes(fx: Arc<Installed>, case: Case) {
    let admin = case.admin();
    let ns = case.namespace("e2e-failover").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "failover", 64, 24, 308, false).await;
    let host = fx.registry.rsplit_once(':').unwrap().0.to_string();
    let proxy = ThrottledProxy::start(&host, &fx.registry, 4 << 20).await;
    create_image(&admin, &ns, "failover", json!({"source": {"registry": {"url": url.replace(&fx.registry, &proxy.addr), "insecure": true}}, "size": "64Mi", "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "failover").await;
    let started = Instant::now();
    let pvc = create_pvc(&admin, &ns, json!({"metadata": {"name": "survivor", "annotations": {"vmdisk.io/image": "failover"}}, "spec": {}})).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let pod_name = vmdisk_crds::populator_pod_name(&pvc.uid().unwrap());
    wait_for("the populator pod", WAIT, || {
        let (pods, pod_name) = (pods.clone(), pod_name.clone());
        async move {
            pods.get_opt(&pod_name)
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .ok_or_else(|| "not yet".into())
        }
    })
    .await;
    let lease = Api::<Lease>::namespaced(admin.clone(), INSTALL_NAMESPACE)
        .get("vmdisk-controller")
        .await
        .unwrap();
    let leader = lease.spec.and_then(|s| s.holder_identity).unwrap();
    pods.delete(&leader, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let killed = Instant::now();
    proxy.set_rate(1 << 30);
    let (_, bound) = wait_bound(&admin, &ns, "survivor", started).await;
    println!(
        "failover: PVC Bound {:.1}s after create, {:.1}s after the leader was killed",
        bound.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    assert_cleaned_up(&admin, &pvc).await;
    std::fs::copy(&raw, work.path().join("source.raw")).unwrap();
    let log = check_pod(
        &fx,
        &ns,
        "survivor",
        false,
        work.path(),
        "qemu-img compare -f raw -F raw /vm/disk.img /src/source.raw",
    )
    .await;
    assert!(log.contains("Images are identical"), "{log}");
    let checked = started.elapsed();
    fx.env
        .rollout(INSTALL_NAMESPACE, "deployment/vmdisk-controller");
    println!(
        "failover: disk checked {:.1}s after create, controller rolled out again at {:.1}s",
        checked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
