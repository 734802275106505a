//! What the API server itself enforces for vmdisk: the CRDs' validation rules, the RBAC, and the
//! policy that holds each agent to its own node.

use std::sync::Arc;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use vmdisk_crds::{
    AccessScope, NodeDiskCache, Permission, CREDENTIALS_NAMESPACE, INSTALL_NAMESPACE,
};

use crate::local::LocalInstall;
use crate::support::{api_error, client_from, wait_for};
use crate::Case;

fn image_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("vmdisk.io", "v1alpha1", "VMDiskImage"),
        "vmdiskimages",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

fn image(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// Every CEL rule and schema bound fits the API server's cost budget (the CRD installed at all)
/// and refuses what it should, with the message a user sees.
pub async fn crds_refuse_invalid_images_with_their_messages(_fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("e2e-crd").await;
    let api = image_api(&case.admin(), &ns);
    let url = |u: &str| json!({"registry": {"url": u}});
    let long_url = format!("quay.io/{}/disk:1", "a".repeat(600));
    let invalid = [
        (
            "bad-url",
            json!({"source": url("not a url")}),
            "url must be an image reference",
        ),
        (
            "no-registry",
            json!({"source": url("fedora:40")}),
            "url must be an image reference",
        ),
        ("long-url", json!({"source": url(&long_url)}), "Too long"),
        (
            "zero-size",
            json!({"source": url("quay.io/a/b:1"), "size": "0"}),
            "size must be a positive quantity",
        ),
        (
            "zero-gi",
            json!({"source": url("quay.io/a/b:1"), "size": "0Gi"}),
            "size must be a positive quantity",
        ),
        (
            "negative-size",
            json!({"source": url("quay.io/a/b:1"), "size": "-1Gi"}),
            "size must be a positive quantity",
        ),
        (
            "word-size",
            json!({"source": url("quay.io/a/b:1"), "size": "big"}),
            "size must be a positive quantity",
        ),
        (
            "insecure-and-ca",
            json!({"source": {"registry": {"url": "quay.io/a/b:1", "insecure": true, "caBundle": "x"}}}),
            "insecure and caBundle are mutually exclusive",
        ),
        (
            "bad-poll",
            json!({"source": url("quay.io/a/b:1"), "pollInterval": "5x"}),
            "pollInterval must look like 30s, 10m or 1h30m",
        ),
        (
            "empty-poll",
            json!({"source": url("quay.io/a/b:1"), "pollInterval": ""}),
            "pollInterval must look like",
        ),
        (
            "vhd",
            json!({"source": url("quay.io/a/b:1"), "format": "vhd"}),
            "Unsupported value: \"vhd\"",
        ),
        (
            "many-modes",
            json!({"source": url("quay.io/a/b:1"), "accessModes": ["a", "b", "c", "d", "e"]}),
            "Too many",
        ),
        (
            "no-source",
            json!({"format": "raw"}),
            "spec.source: Required value",
        ),
    ];
    for (name, spec, message) in invalid {
        let e = api_error(api.create(&PostParams::default(), &image(name, spec)).await);
        assert_eq!(e.code, 422, "{name}: {e:?}");
        assert!(
            e.message.contains(message),
            "{name}: expected {message:?} in {:?}",
            e.message
        );
    }
    let valid = [
        (
            "minimal",
            json!({"source": url("quay.io/containerdisks/fedora:40")}),
        ),
        (
            "full",
            json!({"source": {"registry": {"url": "docker://registry.example.com:5000/disks/win-2025:v1.2_3",
                    "pullSecretRef": {"name": "creds"}, "caBundle": "-----BEGIN CERTIFICATE-----"}},
                   "format": "qcow2", "size": "10.5Gi", "storageClassName": "fast",
                   "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                   "cache": {"nodeSelector": {"zone": "a"}, "prefetch": false, "pinned": true},
                   "pollInterval": "1h30m"}),
        ),
        (
            "by-digest",
            json!({"source": url(&format!("quay.io/a/b@sha256:{}", "0a".repeat(32))), "size": "2G"}),
        ),
        (
            "insecure",
            json!({"source": {"registry": {"url": "10.0.0.1:5000/a/b:1", "insecure": true}}}),
        ),
    ];
    for (name, spec) in valid {
        api.create(&PostParams::default(), &image(name, spec))
            .await
            .unwrap_or_else(|e| panic!("{name} refused: {e}"));
    }
}

/// Resources of vmdisk's permissions that are cluster-scoped (asked without a namespace).
const CLUSTER_SCOPED: &[&str] = &["nodes", "nodediskcaches", "nodediskcaches/status"];

async fn allowed(
    admin: &Client,
    account: &str,
    (group, resource, verb, namespace): (&str, &str, &str, Option<&str>),
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{INSTALL_NAMESPACE}:{account}"
            )),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{INSTALL_NAMESPACE}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                verb: Some(verb.into()),
                namespace: namespace.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.is_some_and(|s| s.allowed)
}

fn namespace_of(permission: &Permission, any_namespace: &str) -> Option<String> {
    let (_, resource, _, scope) = permission;
    match scope {
        AccessScope::Cluster if CLUSTER_SCOPED.contains(&resource.as_str()) => None,
        AccessScope::Cluster => Some(any_namespace.to_string()),
        other => other.namespace().map(str::to_string),
    }
}

/// The real authorizer grants each component every permission its code declares, and refuses
/// what vmdisk must not be able to do.
pub async fn rbac_grants_exactly_what_the_components_use(_fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("e2e-rbac").await;
    for (account, used) in [
        ("vmdisk-webhook", vmdisk_webhook::api_access()),
        ("vmdisk-controller", vmdisk_controller::api_access()),
        ("vmdisk-cache-agent", vmdisk_cache_agent::api_access()),
        (
            "vmdisk-populator",
            vmdisk_cache_agent::populator_api_access(),
        ),
    ] {
        for p in &used {
            let namespace = namespace_of(p, &ns);
            let (group, resource, verb, _) = p;
            assert!(
                allowed(&case.admin(), account, (group, resource, verb, namespace.as_deref())).await,
                "{account} is not allowed {verb} {group}/{resource} in {namespace:?}, which its code uses"
            );
        }
    }
    let refused = [
        (
            "vmdisk-cache-agent",
            ("", "secrets", "get", Some(ns.as_str())),
        ),
        (
            "vmdisk-cache-agent",
            ("", "secrets", "get", Some(INSTALL_NAMESPACE)),
        ),
        (
            "vmdisk-cache-agent",
            ("", "secrets", "get", Some("default")),
        ),
        (
            "vmdisk-cache-agent",
            ("", "secrets", "list", Some(CREDENTIALS_NAMESPACE)),
        ),
        ("vmdisk-cache-agent", ("", "nodes", "delete", None)),
        (
            "vmdisk-cache-agent",
            (
                "vmdisk.io",
                "vmdiskimages/status",
                "patch",
                Some(ns.as_str()),
            ),
        ),
        (
            "vmdisk-cache-agent",
            ("", "persistentvolumeclaims", "list", None),
        ),
        ("vmdisk-webhook", ("", "secrets", "list", Some(ns.as_str()))),
        (
            "vmdisk-webhook",
            ("", "secrets", "create", Some(ns.as_str())),
        ),
        ("vmdisk-webhook", ("", "nodes", "patch", None)),
        (
            "vmdisk-webhook",
            ("vmdisk.io", "nodediskcaches/status", "patch", None),
        ),
        (
            "vmdisk-webhook",
            ("vmdisk.io", "vmdiskimages", "delete", Some(ns.as_str())),
        ),
        (
            "vmdisk-controller",
            ("", "secrets", "list", Some(ns.as_str())),
        ),
        ("vmdisk-controller", ("", "nodes", "patch", None)),
        (
            "vmdisk-controller",
            ("vmdisk.io", "nodediskcaches/status", "patch", None),
        ),
        (
            "vmdisk-controller",
            ("vmdisk.io", "vmdiskimages", "delete", Some(ns.as_str())),
        ),
    ];
    for (account, attributes) in refused {
        assert!(
            !allowed(&case.admin(), account, attributes).await,
            "{account} may {attributes:?}, which vmdisk must not be able to do"
        );
    }
}

/// `kubectl auth can-i <verb> <resource> <where…> --as=<vmdisk-system/account>`, as an
/// operator would ask it.
fn can_i(fx: &LocalInstall, account: &str, verb: &str, resource: &str, at: &[&str]) -> bool {
    let who = format!("--as=system:serviceaccount:{INSTALL_NAMESPACE}:{account}");
    let mut args = vec!["auth", "can-i", verb, resource, who.as_str()];
    args.extend_from_slice(at);
    // "yes" exits 0, "no" exits 1; anything else is a failed question.
    let answer = match fx.env.kubectl_status(&args) {
        Ok(out) | Err(out) => out,
    };
    match answer.lines().next().map(str::trim) {
        Some("yes") => true,
        Some("no") => false,
        _ => panic!("kubectl {}: {answer}", args.join(" ")),
    }
}

/// The admission server, which the API server calls over the network, holds none of the
/// controllers' power: it cannot read a Secret anywhere (the credentials copies included), nor
/// patch a PersistentVolume or a claim; the controller can each of what it needs.
pub async fn the_webhook_cannot_touch_secrets_volumes_or_claims(fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("e2e-can-i").await;
    let anywhere = [
        vec!["-n", ns.as_str()],
        vec!["-n", CREDENTIALS_NAMESPACE],
        vec!["-n", INSTALL_NAMESPACE],
        vec!["-n", "default"],
        vec!["-n", "kube-system"],
        vec!["--all-namespaces"],
    ];
    let mut webhook_may = Vec::new();
    for at in &anywhere {
        for (verb, resource) in [
            ("get", "secrets"),
            ("list", "secrets"),
            ("patch", "persistentvolumeclaims"),
            ("create", "persistentvolumeclaims"),
            ("create", "pods"),
        ] {
            if can_i(&fx, "vmdisk-webhook", verb, resource, at) {
                webhook_may.push(format!("{verb} {resource} {at:?}"));
            }
        }
    }
    for (verb, resource) in [
        ("patch", "persistentvolumes"),
        ("get", "persistentvolumes"),
        ("update", "leases.coordination.k8s.io"),
    ] {
        if can_i(
            &fx,
            "vmdisk-webhook",
            verb,
            resource,
            &["-n", INSTALL_NAMESPACE],
        ) {
            webhook_may.push(format!("{verb} {resource}"));
        }
    }
    assert!(
        webhook_may.is_empty(),
        "the webhook's ServiceAccount may {webhook_may:?}"
    );
    // What the webhook may do, so the refusals above are the authorizer's and not a question
    // it could not answer.
    for (verb, resource, at) in [
        ("list", "vmdiskimages.vmdisk.io", vec!["--all-namespaces"]),
        ("watch", "persistentvolumeclaims", vec!["--all-namespaces"]),
        ("get", "persistentvolumeclaims", vec!["-n", ns.as_str()]),
    ] {
        assert!(
            can_i(&fx, "vmdisk-webhook", verb, resource, &at),
            "the webhook may not {verb} {resource} {at:?}"
        );
    }

    // The controller may what its controllers do, and no more than that on Secrets.
    let needed = [
        ("get", "secrets", vec!["-n", ns.as_str()]),
        ("create", "secrets", vec!["-n", CREDENTIALS_NAMESPACE]),
        ("patch", "secrets", vec!["-n", CREDENTIALS_NAMESPACE]),
        ("delete", "secrets", vec!["-n", CREDENTIALS_NAMESPACE]),
        ("patch", "persistentvolumes", vec![]),
        ("patch", "persistentvolumeclaims", vec!["-n", ns.as_str()]),
        (
            "create",
            "persistentvolumeclaims",
            vec!["-n", INSTALL_NAMESPACE],
        ),
        ("create", "pods", vec!["-n", INSTALL_NAMESPACE]),
        (
            "update",
            "leases.coordination.k8s.io",
            vec!["-n", INSTALL_NAMESPACE],
        ),
        (
            "patch",
            "vmdiskimages.vmdisk.io",
            vec!["-n", ns.as_str(), "--subresource=status"],
        ),
    ];
    for (verb, resource, at) in needed {
        assert!(
            can_i(&fx, "vmdisk-controller", verb, resource, &at),
            "the controller may not {verb} {resource} {at:?}"
        );
    }
    for (verb, resource, at) in [
        ("list", "secrets", vec!["-n", ns.as_str()]),
        ("create", "secrets", vec!["-n", ns.as_str()]),
        ("create", "pods", vec!["-n", ns.as_str()]),
        ("delete", "persistentvolumes", vec![]),
    ] {
        assert!(
            !can_i(&fx, "vmdisk-controller", verb, resource, &at),
            "the controller may {verb} {resource} {at:?}"
        );
    }
}

/// A client with the token of the cache agent's DaemonSet pod on `node`.
pub(crate) async fn agent_client(fx: &LocalInstall, node: &str, name: &str) -> Client {
    let token = fx.agent_token(node, None).await;
    client_from(&fx.env.kubeconfig_with_token(fx.work.path(), name, &token)).await
}

/// RBAC lets agents patch NodeDiskCaches and Nodes; the ValidatingAdmissionPolicy holds each
/// to its own node, with a message that says so.
pub async fn an_agent_cannot_write_another_nodes_objects(fx: Arc<LocalInstall>, case: Case) {
    let (own, other) = (fx.nodes[0].clone(), fx.nodes[1].clone());
    let agent = agent_client(&fx, &own, "policy-probe").await;
    let caches: Api<NodeDiskCache> = Api::all(agent.clone());
    // The other node's agent creates its NodeDiskCache when it starts.
    let admin_caches: Api<NodeDiskCache> = Api::all(case.admin().clone());
    wait_for(
        "the other node's NodeDiskCache",
        std::time::Duration::from_secs(60),
        || {
            let admin_caches = admin_caches.clone();
            let other = other.clone();
            async move {
                admin_caches
                    .get(&other)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    let message = "a vmdisk cache agent may only write its own node's NodeDiskCache and labels";
    let status = Patch::Merge(json!({"status": {"entryCount": 0}}));
    let e = api_error(
        caches
            .patch_status(&other, &PatchParams::default(), &status)
            .await,
    );
    assert!(e.message.contains(message), "{e:?}");
    let nodes: Api<Node> = Api::all(agent.clone());
    let label = |v: serde_json::Value| {
        Patch::Merge(json!({"metadata": {"labels": {"cache.vmdisk.io/sha256-e2e": v}}}))
    };
    let e = api_error(
        nodes
            .patch(&other, &PatchParams::default(), &label(json!("ready")))
            .await,
    );
    assert!(e.message.contains(message), "{e:?}");
    // On its own node: only vmdisk's labels. Another label, a taint, `unschedulable`, an
    // annotation are refused, each naming why.
    let labels_only = "a vmdisk cache agent may only change cache.vmdisk.io/ labels on its node";
    let spec_unchanged = "a vmdisk cache agent may not change its node's spec";
    for (what, patch, expected) in [
        (
            "another label",
            json!({"metadata": {"labels": {"team": "mine"}}}),
            labels_only,
        ),
        (
            "removing a label",
            json!({"metadata": {"labels": {"kubernetes.io/hostname": null}}}),
            labels_only,
        ),
        (
            "a taint",
            json!({"spec": {"taints": [{"key": "x", "value": "y", "effect": "NoSchedule"}]}}),
            spec_unchanged,
        ),
        (
            "unschedulable",
            json!({"spec": {"unschedulable": true}}),
            spec_unchanged,
        ),
        (
            "an annotation",
            json!({"metadata": {"annotations": {"x": "y"}}}),
            spec_unchanged,
        ),
    ] {
        let e = api_error(
            nodes
                .patch(&own, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        );
        assert!(e.message.contains(expected), "{what}: {e:?}");
    }
    let node = Api::<Node>::all(case.admin().clone())
        .get(&own)
        .await
        .unwrap();
    let spec = node.spec.unwrap_or_default();
    assert!(
        spec.taints.unwrap_or_default().iter().all(|t| t.key != "x")
            && spec.unschedulable != Some(true),
        "the refused changes left the node as it was"
    );
    // Its own node's objects it may write.
    nodes
        .patch(&own, &PatchParams::default(), &label(json!("ready")))
        .await
        .expect("own node's labels");
    nodes
        .patch(
            &own,
            &PatchParams::default(),
            &label(serde_json::Value::Null),
        )
        .await
        .expect("own node's labels");
    caches
        .patch_status(
            &own,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {}})),
        )
        .await
        .expect("own NodeDiskCache");
    // The list of images its node should hold is the controller's to write: adding an image
    // of its choosing, or emptying the list, is refused.
    let not_the_list = "a vmdisk cache agent may not write the list of images its node should hold";
    let someone_elses = json!({"namespace": "team-b", "name": "secret-disk",
        "digest": format!("sha256:{}", "c".repeat(64)), "format": "raw",
        "url": "registry.example.com/team-b/disk:1"});
    for (what, patch) in [
        (
            "an image added",
            json!({"spec": {"images": [someone_elses]}}),
        ),
        (
            "a count of omitted images",
            json!({"spec": {"omittedImages": 3}}),
        ),
    ] {
        let e = api_error(
            caches
                .patch(&own, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        );
        assert!(e.message.contains(not_the_list), "{what}: {e:?}");
    }
    // What an agent reads of the images is its own node's list: it cannot list VMDiskImages.
    let e = api_error(
        Api::<vmdisk_crds::VMDiskImage>::all(agent.clone())
            .list(&kube::api::ListParams::default().limit(1))
            .await,
    );
    assert_eq!(e.code, 403, "{e:?}");
}

/// A claim's `vmdisk.io/digest` is fixed at creation: changing, removing or adding it later is
/// refused by the API server, for anyone; other annotations stay free.
pub async fn a_claims_digest_cannot_change_after_creation(_fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("e2e-digest").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(case.admin().clone(), &ns);
    let claim = |name: &str, digest: Option<&str>| -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": digest.map(|d| json!({"vmdisk.io/digest": d}))},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-none",
                     "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap()
    };
    let theirs = format!("sha256:{}", "b".repeat(64));
    claims
        .create(
            &PostParams::default(),
            &claim("pinned", Some(&format!("sha256:{}", "a".repeat(64)))),
        )
        .await
        .unwrap();
    claims
        .create(&PostParams::default(), &claim("plain", None))
        .await
        .unwrap();
    let annotate = |value: serde_json::Value| {
        Patch::Merge(json!({"metadata": {"annotations": {"vmdisk.io/digest": value}}}))
    };
    let message =
        "vmdisk.io/digest is set when the claim is created and cannot be added, changed or removed";
    for (what, name, patch) in [
        ("changed", "pinned", annotate(json!(theirs))),
        ("removed", "pinned", annotate(serde_json::Value::Null)),
        ("added", "plain", annotate(json!(theirs))),
    ] {
        let e = api_error(claims.patch(name, &PatchParams::default(), &patch).await);
        assert!(e.message.contains(message), "{what}: {e:?}");
    }
    claims
        .patch(
            "pinned",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"team": "a"}}})),
        )
        .await
        .expect("other annotations may change");
}

/// A user's `selected-node` annotation naming a tainted node does not put the populator pod
/// (root, with the node cache's hostPath) there: the pod is placed by the scheduler through a
/// required node affinity, and the scheduler refuses the taint. (Exclusive: the taint would
/// steer other cases' pods.)
pub async fn a_selected_node_with_a_taint_gets_no_populator_pod(fx: Arc<LocalInstall>, case: Case) {
    use vmdisk_tests::disks::make_ext4_raw;
    use vmdisk_tests::push::push_container_disk;
    use vmdisk_tests::registry::TestRegistry;

    let admin = case.admin();
    let ns = case.namespace("e2e-taint").await;
    let node = fx.fake_nodes()[0].clone();
    let nodes: Api<Node> = Api::all(admin.clone());
    let taint = |value: serde_json::Value| Patch::Merge(json!({"spec": {"taints": value}}));
    let before = nodes
        .get(&node)
        .await
        .unwrap()
        .spec
        .unwrap_or_default()
        .taints;
    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &taint(json!([{"key": "e2e.vmdisk.io/dedicated", "value": "other-team", "effect": "NoSchedule"}])),
        )
        .await
        .unwrap();
    {
        let nodes = nodes.clone();
        let node = node.clone();
        case.defer(async move {
            let _ = nodes
                .patch(&node, &PatchParams::default(), &taint(json!(before)))
                .await;
        });
    }
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "taint", 16, 2, 3005);
    push_container_disk(&registry, "disks/taint", "v1", &raw).await;
    crate::support::create_image(
        &admin,
        &ns,
        "t",
        json!({"source": {"registry": {"url": format!("{}/disks/taint:v1", registry.addr), "insecure": true}},
               "cache": {"nodeSelector": {"kubernetes.io/hostname": "no-such-node"}}}),
    )
    .await;
    let images: Api<vmdisk_crds::VMDiskImage> = Api::namespaced(admin.clone(), &ns);
    wait_for(
        "the image to resolve",
        std::time::Duration::from_secs(120),
        || {
            let images = images.clone();
            async move {
                let image = images.get("t").await.map_err(|e| e.to_string())?;
                image
                    .digest()
                    .map(|_| ())
                    .ok_or(format!("{:?}", image.status))
            }
        },
    )
    .await;
    // WaitForFirstConsumer: the populator follows the claim's selected node.
    let class_name = format!("{ns}-wffc");
    let class: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class_name},
        "provisioner": "kubernetes.io/host-path",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .unwrap();
    let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(admin.clone());
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    {
        let doomed = class_name.clone();
        case.defer(async move {
            let _ = classes.delete(&doomed, &Default::default()).await;
        });
    }
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "root", "annotations": {"volume.kubernetes.io/selected-node": node}},
        "spec": {"storageClassName": class_name, "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "64Mi"}},
                 "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "t"}}
    }))
    .unwrap();
    let uid = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &claim)
        .await
        .unwrap()
        .uid()
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let selector = format!("{}={uid}", vmdisk_crds::CLAIM_UID_LABEL);
    let refused = wait_for(
        "the scheduler to refuse the populator pod",
        std::time::Duration::from_secs(120),
        || {
            let pods = pods.clone();
            let selector = selector.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| e.to_string())?;
                let pod = list.items.first().ok_or("no populator pod yet")?;
                let unschedulable = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
                    .filter(|c| c.status == "False")
                    .and_then(|c| c.message.clone());
                unschedulable
                    .map(|m| (pod.clone(), m))
                    .ok_or(format!("{:?}", pod.status))
            }
        },
    )
    .await;
    let (pod, message) = refused;
    println!("taint: the populator pod for a claim selecting {node} stays unscheduled: {message}");
    assert_eq!(pod.spec.as_ref().unwrap().node_name, None, "{message}");
    assert!(message.contains("taint"), "{message}");
}
