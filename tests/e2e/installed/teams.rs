//! Two teams on one node: a disk one team warmed never reaches the other, through any of the
//! ways a tenant can name it.

use k8s_openapi::api::core::v1::Secret;

use super::claims::*;
use super::*;
use crate::support::pull_secret;

/// Team A's private image (a TLS + htpasswd registry, a pull secret) is warmed on the real node
/// and fills A's claims. Team B, without A's credentials, names A's digest under A's repository
/// and under a repository of its own, and forges `vmdisk.io/digest` (A's) on a claim of its own
/// image: none of B's claims gets A's disk (the one that binds holds B's disk, compared on the
/// volume), each attempt says why; A's second claim binds warm.
pub(super) async fn two_teams_on_one_node_never_get_each_others_disk(
    fx: Arc<Installed>,
    case: Case,
) {
    let admin = case.admin();
    let team_a = case.namespace("e2e-team-a").await;
    let team_b = case.namespace("e2e-team-b").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();

    // A's registry, on the address pods reach the test registry at.
    let host = fx
        .registry
        .rsplit_once(':')
        .map_or(fx.registry.as_str(), |(h, _)| h);
    let private = TestRegistry::start_tls_htpasswd_on(host, "team-a", "s3cret");
    let ca = private.ca_pem().unwrap();
    let raw_a = make_ext4_raw(work.path(), "a", 48, 4, 501);
    let qcow2_a = to_format(&raw_a, "qcow2", false);
    let (url_a, digest_a) = push_container_disk(&private, "team-a/secret", "v1", &qcow2_a).await;
    pull_secret(&admin, &team_a, &private.addr, "team-a", "s3cret").await;
    create_image(
        &admin,
        &team_a,
        "secret",
        json!({"source": {"registry": {"url": url_a,
        "pullSecretRef": {"name": "registry-credentials"}, "caBundle": ca}}}),
    )
    .await;
    wait_warm(&admin, &team_a, "secret", WAIT).await;
    // The agent pod had A's credentials from the controller's agent API (it reads no Secret),
    // reached through the Service's EndpointSlices: this cluster has no DNS or kube-proxy.
    let logs = fx.env.kubectl(&[
        "logs",
        "-n",
        INSTALL_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=vmdisk-controller",
        "--tail=-1",
    ]);
    assert!(
        logs.lines().any(|l| l.contains("credentials requested")
            && l.contains(&format!("{team_a}/secret"))
            && l.contains(&fx.real_node)
            && l.contains("granted")),
        "no granted credentials request of {team_a}/secret from {} in the controllers' logs",
        fx.real_node
    );
    let claim = |name: &str, image: &str| json!({"metadata": {"name": name, "annotations": {"vmdisk.io/image": image}}, "spec": {}});
    let first = create_pvc(&admin, &team_a, claim("first", "secret")).await;
    wait_bound(&admin, &team_a, "first", Instant::now()).await;
    succeeded_with_a_clean_timeline(&admin, &team_a, "first").await;
    // The populator pod's own copy of A's credentials went with the population.
    let copies: Api<Secret> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let copy = vmdisk_crds::populator_pod_name(&first.uid().unwrap());
    wait_for("the populator pod's credentials to go", WAIT, || {
        let (copies, copy) = (copies.clone(), copy.clone());
        async move {
            match copies.get_opt(&copy).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err(format!("Secret {INSTALL_NAMESPACE}/{copy} is still there")),
            }
        }
    })
    .await;

    // Team B: an image of its own, and a claim of it created first (the webhook has no digest
    // to write yet, so the forged one stays on the claim).
    let raw_b = make_ext4_raw(work.path(), "b", 48, 4, 502);
    assert!(!same_content(&raw_a, &raw_b));
    let layer_b = to_format(&raw_b, "qcow2", false);
    let (url_b, digest_b) =
        push_container_disk(&fx.registry(), "e2e/team-b-own", "v1", &layer_b).await;
    let mut forged = claim("forged", "own");
    forged["metadata"]["annotations"]["vmdisk.io/digest"] = json!(digest_a);
    forged["spec"] = json!({"resources": {"requests": {"storage": "64Mi"}}});
    let forged = create_pvc(&admin, &team_b, forged).await;
    assert_eq!(
        forged.annotations().get("vmdisk.io/digest"),
        Some(&digest_a)
    );
    // A's digest under A's repository, and under one B made up, without credentials.
    for (name, url) in [
        (
            "borrowed",
            format!("{}/team-a/secret@{digest_a}", private.addr),
        ),
        (
            "elsewhere",
            format!("{}/team-b/nothing@{digest_a}", private.addr),
        ),
    ] {
        create_image(
            &admin,
            &team_b,
            name,
            json!({"source": {"registry": {"url": url, "caBundle": ca}}}),
        )
        .await;
        // Sized by hand: nothing knows the size of an image that is not resolved.
        let mut disk = claim(&format!("{name}-disk"), name);
        disk["spec"] = json!({"resources": {"requests": {"storage": "64Mi"}}});
        create_pvc(&admin, &team_b, disk).await;
    }
    create_image(
        &admin,
        &team_b,
        "own",
        json!({"source": {"registry": {"url": url_b, "insecure": true}}}),
    )
    .await;

    // The forged claim is filled from B's own image: B's bytes, not A's.
    wait_bound(&admin, &team_b, "forged", Instant::now()).await;
    succeeded_with_a_clean_timeline(&admin, &team_b, "forged").await;
    // The check pods see `work` at /src.
    assert_eq!(raw_a, work.path().join("a.raw"));
    assert_eq!(raw_b, work.path().join("b.raw"));
    let log = check_pod(
        &fx,
        &team_b,
        "forged",
        false,
        work.path(),
        "qemu-img compare -f raw -F raw /vm/disk.img /src/b.raw && \
         if qemu-img compare -q -f raw -F raw /vm/disk.img /src/a.raw; then echo HOLDS-A; exit 1; fi",
    )
    .await;
    assert!(log.contains("Images are identical"), "{log}");
    let own = Api::<VMDiskImage>::namespaced(admin.clone(), &team_b)
        .get("own")
        .await
        .unwrap();
    assert_eq!(own.digest(), Some(digest_b.as_str()));

    // A's digest named without A's credentials: never resolved, so never a disk; the image and
    // the claim say why, and no populator pod was made.
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &team_b);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &team_b);
    for name in ["borrowed", "elsewhere"] {
        let message = wait_for(&format!("{team_b}/{name} refused"), WAIT, || {
            let images = images.clone();
            async move {
                let status = images
                    .get(name)
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Resolved" && c.status == "False")
                    .map(|c| c.message.clone())
                    .ok_or(format!("{status:?}"))
            }
        })
        .await;
        assert!(
            message.contains("refused the credentials"),
            "{name}: {message}"
        );
        let image = images.get(name).await.unwrap();
        assert_eq!(image.digest(), None, "{name}");
        assert_ne!(
            image.status.as_ref().and_then(|s| s.phase),
            Some(ImagePhase::Ready)
        );
        let disk = format!("{name}-disk");
        let pending = wait_for(&format!("{disk} to say why it waits"), WAIT, || {
            let (claims, disk) = (claims.clone(), disk.clone());
            async move {
                let c = claims.get(&disk).await.map_err(|e| e.to_string())?;
                let message = c.annotations().get("vmdisk.io/message").cloned();
                message
                    .filter(|m| m.contains("not resolved"))
                    .map(|_| c.clone())
                    .ok_or(format!("{:?}", c.annotations()))
            }
        })
        .await;
        assert_ne!(
            pending.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Bound"),
            "{disk}"
        );
        let pods = Api::<Pod>::namespaced(admin.clone(), INSTALL_NAMESPACE)
            .get_opt(&vmdisk_crds::populator_pod_name(&pending.uid().unwrap()))
            .await
            .unwrap();
        assert!(pods.is_none(), "{disk}: a populator pod");
        println!(
            "team B's {name}: {message}; claim: {}",
            pending.annotations()["vmdisk.io/message"]
        );
    }

    // A's second claim: warm, as before.
    create_pvc(&admin, &team_a, claim("second", "secret")).await;
    wait_bound(&admin, &team_a, "second", Instant::now()).await;
    succeeded_with_a_clean_timeline(&admin, &team_a, "second").await;
    let events = events_of(&admin, &team_a, "second").await;
    assert!(
        events
            .iter()
            .any(|(r, n, _)| r == "PopulatorFinished" && n.contains("warm: cache hit")),
        "{events:?}"
    );
    for name in ["first", "second"] {
        let log = check_pod(
            &fx,
            &team_a,
            name,
            false,
            work.path(),
            "qemu-img compare -f raw -F raw /vm/disk.img /src/a.raw",
        )
        .await;
        assert!(log.contains("Images are identical"), "{name}: {log}");
    }
}
