//! The installation itself: as a user installs it, the walkthrough's files, and what a webhook
//! outage does.

use super::claims::*;
use super::*;

/// The API server calls the webhook pod through its Service, with the caBundle
/// `certs/no-cert-manager.sh` patched in; the agent pod warms an image on the real node.
pub(super) async fn installed_as_a_user_does_and_running_on_the_real_node(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let deployment = Api::<Deployment>::namespaced(admin.clone(), INSTALL_NAMESPACE)
        .get("vmdisk-webhook")
        .await
        .unwrap();
    assert_eq!(deployment.status.and_then(|s| s.ready_replicas), Some(2));
    // Both controller replicas are ready: one leads, the other stands by.
    let controller = Api::<Deployment>::namespaced(admin.clone(), INSTALL_NAMESPACE)
        .get("vmdisk-controller")
        .await
        .unwrap();
    assert_eq!(controller.status.and_then(|s| s.ready_replicas), Some(2));
    let hooks = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get("vmdisk")
        .await
        .unwrap();
    for hook in hooks.webhooks.unwrap() {
        assert!(
            hook.client_config
                .ca_bundle
                .is_some_and(|b| !b.0.is_empty()),
            "{}: no caBundle",
            hook.name
        );
        assert!(
            hook.client_config.service.is_some(),
            "{}: called through the Service",
            hook.name
        );
    }
    let ns = case.namespace("e2e-installed").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, _) = disk_image(&fx, work.path(), "warmed", 24, 2, 301, true).await;
    create_image(
        &admin,
        &ns,
        "warmed",
        json!({"source": {"registry": {"url": url, "insecure": true}}}),
    )
    .await;
    let image = wait_resolved(&admin, &ns, "warmed").await;
    let digest = image.digest().unwrap().to_string();
    // The agent pod on the real node warms it and says so.
    let caches: Api<NodeDiskCache> = Api::all(admin.clone());
    let node = fx.real_node.clone();
    wait_for("the agent pod to warm the image", WAIT, || {
        let (caches, node, digest) = (caches.clone(), node.clone(), digest.clone());
        async move {
            let c = caches.get(&node).await.map_err(|e| e.to_string())?;
            let ready = c.status.as_ref().is_some_and(|s| {
                s.entries
                    .iter()
                    .any(|e| e.digest == digest && e.state == CacheEntryState::Ready)
            });
            ready.then_some(()).ok_or(format!("{:?}", c.status))
        }
    })
    .await;
    let labels = Api::<Node>::all(admin.clone())
        .get(&fx.real_node)
        .await
        .unwrap()
        .labels()
        .clone();
    assert_eq!(
        labels
            .get(&node_cache_label_key(&digest).unwrap())
            .map(String::as_str),
        Some("ready")
    );
    // The image controller reports the warm node and the disk's size; the webhook sizes PVCs
    // from that once its own watch has it (a user waits for `kubectl get vmdi` to say Ready).
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &ns);
    let image = wait_for("the image Ready with its size", WAIT, || {
        let images = images.clone();
        async move {
            let i = images.get("warmed").await.map_err(|e| e.to_string())?;
            let status = i.status.clone().unwrap_or_default();
            (status.phase == Some(ImagePhase::Ready) && status.virtual_size.is_some())
                .then_some(status)
                .ok_or(format!("{:?}", i.status))
        }
    })
    .await;
    assert_eq!(image.warm_nodes, 1);
    let template = json!({"metadata": {"name": "mutated", "annotations": {"vmdisk.io/image": "warmed"}}, "spec": {}});
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    wait_for("the webhook to size PVCs from the image", WAIT, || {
        let claims = claims.clone();
        let pvc: PersistentVolumeClaim = serde_json::from_value(template.clone()).unwrap();
        async move {
            claims
                .create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &pvc,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    // Admission through the Service.
    let pvc = create_pvc(&admin, &ns, template).await;
    assert_eq!(pvc.annotations().get("vmdisk.io/digest"), Some(&digest));
    assert!(pvc.spec.unwrap().data_source_ref.is_some());
}

/// The README's walkthrough: `deploy/examples/` applied as they are, through the installed
/// webhook. The image names a public registry the cluster may not reach, so the pod is only
/// dry-run (its image would be pulled) and nothing waits for a fill.
pub(super) async fn the_walkthrough_examples_apply_as_they_are(fx: Arc<Installed>, case: Case) {
    const NAMESPACE: &str = "vms";
    let admin = case.admin();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
    wait_for("an earlier vms namespace to go", WAIT, || {
        let namespaces = namespaces.clone();
        async move {
            match namespaces.get_opt(NAMESPACE).await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still there".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    fx.env
        .kubectl(&["apply", "-f", "deploy/examples/1-image.yaml"]);
    let out = fx
        .env
        .kubectl(&["apply", "-f", "deploy/examples/2-pvcs.yaml"]);
    assert!(out.contains("fedora-root created"), "{out}");
    let dry = fx.env.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        "deploy/examples/3-pod.yaml",
    ]);
    assert!(dry.contains("disk-check created (server dry run)"), "{dry}");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NAMESPACE);
    let root = claims.get("fedora-root").await.unwrap();
    let source = root
        .spec
        .as_ref()
        .and_then(|s| s.data_source_ref.as_ref())
        .unwrap();
    assert_eq!(
        (source.kind.as_str(), source.name.as_str()),
        ("VMDiskImage", "fedora")
    );
    assert_eq!(
        root.labels().get("vmdisk.io/image").map(String::as_str),
        Some("fedora")
    );
    let size = &root
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["storage"];
    // spec.size 8Gi plus the filesystem overhead: the image is not resolved here.
    assert!(
        vmdisk_crds::parse_quantity(&size.0).unwrap() > 8 << 30,
        "{size:?}"
    );
    let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
}

/// With the webhook stopped: PVCs and pods that do not concern vmdisk are created at once;
/// a PVC naming a VMDiskImage is refused, naming what to fix.
pub(super) async fn an_outage_refuses_only_vmdisk_pvcs_and_says_what_to_do(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-outage").await;
    let scale = |replicas: i32| {
        let admin = admin.clone();
        async move {
            Api::<Deployment>::namespaced(admin, INSTALL_NAMESPACE)
                .patch(
                    "vmdisk-webhook",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": replicas}})),
                )
                .await
                .unwrap();
        }
    };
    scale(0).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    wait_for("the webhook pods to go", WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=vmdisk-webhook"))
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .is_empty()
                .then_some(())
                .ok_or(format!("{} left", list.items.len()))
        }
    })
    .await;
    // Gone from the Service too: until the EndpointSlice drops a stopped pod's address, the
    // API server still dials it and waits out the webhook's timeout (what a user sees while
    // a rollout is under way, not once the webhook is down).
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    wait_for("the webhook Service to have no endpoints", WAIT, || {
        let slices = slices.clone();
        async move {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=vmdisk-webhook"))
                .await
                .map_err(|e| e.to_string())?;
            let left: usize = list
                .items
                .iter()
                .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
                .sum();
            (left == 0)
                .then_some(())
                .ok_or(format!("{left} endpoint(s) left"))
        }
    })
    .await;
    let timed = |what: &'static str, started: Instant| {
        let took = started.elapsed();
        println!(
            "outage: {what} created in {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        assert!(
            took < Duration::from_secs(2),
            "{what} waited {took:?} for a webhook that is down"
        );
    };
    let started = Instant::now();
    create_pvc(&admin, &ns, json!({"metadata": {"name": "plain"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}})).await;
    timed("a plain PVC", started);
    let started = Instant::now();
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "uses-plain"}, "spec": {
        "containers": [{"name": "c", "image": fx.images.cache_agent, "command": ["true"]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "plain"}}]}}))
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    timed("a pod using a PVC", started);
    let refused = api_error(
        Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "vm", "annotations": {"vmdisk.io/image": "fedora"}}, "spec": {}})).unwrap())
            .await,
    );
    println!("outage: a vmdisk PVC is refused: {}", refused.message);
    assert!(
        refused.message.contains("pvc.vmdisk.io") && refused.message.contains("vmdisk-webhook"),
        "{}",
        refused.message
    );
    scale(2).await;
    fx.env
        .rollout(INSTALL_NAMESPACE, "deployment/vmdisk-webhook");
    // Back: the same PVC is admitted.
    let again = create_pvc(&admin, &ns, json!({"metadata": {"name": "vm", "annotations": {"vmdisk.io/image": "fedora"}}, "spec": {"resources": {"requests": {"storage": "1Mi"}}}})).await;
    assert!(again.spec.unwrap().data_source_ref.is_some());
}
