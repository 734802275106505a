//! The populator's reconcile against a scripted API server, with each write fed back into the
//! store as the watch would: a claim waiting for something missing is written once, and then
//! left alone however often it is woken.

use std::sync::Arc;

use crate::events::Recorder;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{store, store::Writer};
use kube::runtime::watcher::Event;
use kube::{Client, ResourceExt as _};
use serde_json::json;
use vmdisk_crds::{VMDiskImage, MESSAGE_ANNOTATION, PHASE_ANNOTATION};
use vmdisk_support::Failures;

use super::reconcile::{reconcile, Context, ERROR_BACKOFF};
use super::PopulatorSettings;
use crate::metrics::ControllerMetrics;
use crate::testing::{MockApi, Reply, Request};

const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

fn filled<K>(objects: Vec<K>) -> (kube::runtime::reflector::Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = store::<K>();
    for o in objects {
        writer.apply_watcher_event(&Event::Apply(o));
    }
    (reader, writer)
}

/// A WaitForFirstConsumer claim the scheduler placed, whose image is Ready: what an older
/// controller left on it (`Populating`, attempt 1, 0%), finalizer and prime in place.
fn claim() -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": "root", "namespace": "vms", "uid": "u-1",
            "finalizers": [vmdisk_crds::POPULATOR_FINALIZER],
            "annotations": {
                "volume.kubernetes.io/selected-node": "node-1",
                PHASE_ANNOTATION: "Populating",
                MESSAGE_ANNOTATION: "populating from VMDiskImage t (attempt 1)",
                "vmdisk.io/progress": "0%"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
            "resources": {"requests": {"storage": "1Gi"}},
            "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "t"}},
    }))
    .unwrap()
}

fn context(
    client: Client,
) -> (
    Arc<Context>,
    Writer<PersistentVolumeClaim>,
    Writer<DaemonSet>,
) {
    let settings = PopulatorSettings {
        image: None,
        node_cache_dir: None,
        ..PopulatorSettings::default()
    };
    let user = claim();
    let image: VMDiskImage = serde_json::from_value(json!({
        "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
        "metadata": {"name": "t", "namespace": "vms", "uid": "i-1"},
        "spec": {"source": {"registry": {"url": "registry.example/t:1"}}},
        "status": {"digest": DIGEST, "phase": "Ready", "warmNodes": 1},
    }))
    .unwrap();
    let prime = super::objects::prime_pvc(
        &user,
        &image,
        &super::PopulatorConfig::default(),
        Some("node-1"),
    );
    let class: StorageClass = serde_json::from_value(json!({"metadata": {"name": "local"},
        "provisioner": "rancher.io/local-path", "volumeBindingMode": "WaitForFirstConsumer"}))
    .unwrap();
    let (claims, claims_writer) = filled(vec![user]);
    let (primes, _) = filled(vec![prime]);
    let (agents, agents_writer) = filled::<DaemonSet>(vec![]);
    let ctx = Context {
        copier: crate::credentials::CredentialsCopier::new(client.clone(), "vmdisk-credentials"),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "test".into(),
                instance: None,
            },
        ),
        client,
        settings,
        agents,
        claims,
        primes,
        images: filled(vec![image]).0,
        classes: filled(vec![class]).0,
        pods: filled::<Pod>(vec![]).0,
        metrics: ControllerMetrics::new().populator,
        failures: Failures::new(ERROR_BACKOFF),
        timelines: Default::default(),
        runtimes: crate::node_pull::NodeRuntimes::fixed(Ok(()), Vec::new()),
    };
    (Arc::new(ctx), claims_writer, agents_writer)
}

fn claim_patches(requests: &[Request]) -> Vec<&Request> {
    requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/persistentvolumeclaims/root"))
        .collect()
}

#[tokio::test]
async fn without_the_agent_daemonset_the_claim_is_written_once_then_fills_once_it_appears() {
    let (client, api) = MockApi::start(|req| match req.method.as_str() {
        "POST" => Reply::echo(&req),
        // The answer is not read beyond its type: the store gets the patched claim below.
        "PATCH" => Reply::json(200, serde_json::to_value(claim()).unwrap()),
        _ => Reply::not_found(),
    });
    let (ctx, mut claims, mut agents) = context(client);
    let mut pvc = claim();
    // Woken ten times (its own write, the DaemonSet watch, the safety net): each write is
    // fed back as the watch would.
    let mut reconcile_once = |pvc: &mut PersistentVolumeClaim, seen: usize| {
        let requests = api.requests();
        for patch in claim_patches(&requests[seen..]) {
            let mut value = serde_json::to_value(&*pvc).unwrap();
            json_patch::merge(&mut value, &patch.body);
            *pvc = serde_json::from_value(value).unwrap();
            claims.apply_watcher_event(&Event::Apply(pvc.clone()));
        }
        requests.len()
    };
    let mut seen = 0;
    for _ in 0..10 {
        reconcile(Arc::new(pvc.clone()), Arc::clone(&ctx))
            .await
            .unwrap();
        seen = reconcile_once(&mut pvc, seen);
    }
    let requests = api.requests();
    let patches = claim_patches(&requests);
    assert_eq!(patches.len(), 1, "{requests:?}");
    let annotations = &patches[0].body["metadata"]["annotations"];
    assert_eq!(annotations[PHASE_ANNOTATION], "Pending");
    assert!(
        annotations[MESSAGE_ANNOTATION]
            .as_str()
            .unwrap()
            .contains("vmdisk-system/vmdisk-cache-agent was not found"),
        "{annotations}"
    );
    let events: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .collect();
    assert_eq!(events.len(), 1, "one AgentNotFound Event: {events:?}");
    assert!(
        !requests.iter().any(|r| r.path.ends_with("/pods")),
        "no pod without the agent"
    );

    // The DaemonSet is installed: the claim says Populating, then the pod is made.
    let ds: DaemonSet =
        serde_yaml::from_str(include_str!("../../../deploy/cache-agent.yaml")).unwrap();
    agents.apply_watcher_event(&Event::Apply(ds));
    for _ in 0..3 {
        reconcile(Arc::new(pvc.clone()), Arc::clone(&ctx))
            .await
            .unwrap();
        seen = reconcile_once(&mut pvc, seen);
    }
    let requests = api.requests();
    assert_eq!(claim_patches(&requests).len(), 2, "{requests:?}");
    assert_eq!(pvc.annotations()[PHASE_ANNOTATION], "Populating");
    let pods: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/pods"))
        .collect();
    assert!(!pods.is_empty(), "the populator pod is made: {requests:?}");
}

#[test]
fn the_finalizer_patches_name_only_the_populators_finalizer() {
    assert_eq!(
        super::reconcile::finalizers_patch(true),
        json!({"metadata": {"finalizers": [vmdisk_crds::POPULATOR_FINALIZER]}})
    );
    assert_eq!(
        super::reconcile::finalizers_patch(false),
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [vmdisk_crds::POPULATOR_FINALIZER]}})
    );
}

#[test]
fn a_claim_without_a_vmdiskimage_is_stored_as_its_name_only() {
    let mut ours = claim();
    super::strip_unrelated_claim(&mut ours);
    assert_eq!(ours, claim(), "a claim naming an image is kept whole");
    let mut other = claim();
    other.spec.as_mut().unwrap().data_source_ref = None;
    other.metadata.finalizers = None;
    super::strip_unrelated_claim(&mut other);
    assert_eq!(other.name_any(), "root");
    assert_eq!(other.metadata.uid.as_deref(), Some("u-1"));
    assert!(other.spec.is_none() && other.metadata.annotations.is_none());
    // A claim the populator still holds (its finalizer) is kept whole.
    let mut held = claim();
    held.spec.as_mut().unwrap().data_source_ref = None;
    let before = held.clone();
    super::strip_unrelated_claim(&mut held);
    assert_eq!(held, before);
}
