//! `pullMethod`: the pod the populator makes for each method, where the node's runtime can
//! mount the image and where it cannot.

use super::*;
use crate::populator::objects::{credentials_secret_of, pulls_on_node, required_node};
use vmdisk_crds::PullMethod;

fn pulled_by(method: PullMethod, node_pull: Option<NodePull>) -> World {
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.image.as_mut().unwrap().spec.source.registry.pull_method = Some(method);
    w.node_pull = node_pull;
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    w
}

fn args(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ")
}

fn volume_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect()
}

/// With its pod running, the claim keeps the message it was given: only the progress the
/// pod reports on the prime is news.
fn keeps_its_message(w: &World, given: &PvcStatus) {
    match w.step() {
        Step::Annotate {
            status, note: None, ..
        } => assert_eq!(status.message, given.message),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pod_pulls_through_the_cache_whatever_the_nodes_can() {
    let mut w = pulled_by(
        PullMethod::Pod,
        Some(NodePull::Nodes(vec!["node-real".into()])),
    );
    let (pod, _) = w.pod_step();
    assert!(!pulls_on_node(&pod));
    assert!(args(&pod).contains("--cache-dir"), "{}", args(&pod));
    assert!(volume_names(&pod).contains(&"cache".to_string()));
    assert_eq!(
        credentials_secret_of(&pod).as_deref(),
        Some("populate-u-1"),
        "mounted for populate"
    );
}

#[test]
fn node_mounts_the_pinned_image_with_the_pods_pull_secret_on_a_node_that_can() {
    let nodes = vec!["node-a".to_string(), "node-real".to_string()];
    let mut w = pulled_by(PullMethod::Node, Some(NodePull::Nodes(nodes.clone())));
    let status = status_of(&w.step()).clone();
    assert!(
        status
            .message
            .ends_with("pulled by the node's container runtime"),
        "{status:?}"
    );
    let (pod, _) = w.pod_step();
    assert!(pulls_on_node(&pod));
    let spec = pod.spec.clone().unwrap();
    let image_volume = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.image.clone())
        .unwrap();
    assert_eq!(
        image_volume.reference.as_deref(),
        Some(format!("quay.io/containerdisks/fedora:40@{DIGEST}").as_str())
    );
    // No node cache, no registry flags: the kubelet pulls, with the pod's copy of the secret.
    assert!(!volume_names(&pod).contains(&"cache".to_string()));
    let a = args(&pod);
    assert!(a.contains("--source-dir /var/run/vmdisk/image"), "{a}");
    assert!(
        !a.contains("--cache-dir") && !a.contains("--docker-config"),
        "{a}"
    );
    assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "populate-u-1");
    assert_eq!(credentials_secret_of(&pod).as_deref(), Some("populate-u-1"));
    let terms = &spec
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms;
    assert_eq!(
        terms[0].match_fields.as_ref().unwrap()[0].values,
        Some(nodes)
    );

    w.pod = Some(pod);
    keeps_its_message(&w, &status);
}

#[test]
fn node_falls_back_to_the_cache_where_no_node_can_and_says_so_once() {
    let why = "node node-real runs \"containerd://1.6.20\"; image volumes need containerd >= 2.1 or cri-o >= 1.31";
    let mut w = pulled_by(PullMethod::Node, Some(NodePull::Unavailable(why.into())));
    let Step::Annotate {
        status,
        note: Some(note),
        outcome: None,
    } = w.step()
    else {
        panic!("{:?}", w.step())
    };
    assert_eq!(status.phase, PopulatePhase::Populating);
    assert!(status.message.contains(why), "{status:?}");
    assert_eq!(
        (note.reason, note.warning),
        (vmdisk_crds::reasons::NODE_PULL_UNAVAILABLE, true)
    );
    let (pod, _) = w.pod_step();
    assert!(!pulls_on_node(&pod));
    assert!(args(&pod).contains("--cache-dir"));
    w.pod = Some(pod);
    keeps_its_message(&w, &status);
}

#[test]
fn node_only_fails_where_no_node_can_before_anything_is_made() {
    let mut w = pulled_by(
        PullMethod::NodeOnly,
        Some(NodePull::Unavailable("no".into())),
    );
    w.pvc = claim(json!({}));
    w.prime = None;
    let Step::Annotate {
        status,
        outcome: Some(Outcome::Failed),
        ..
    } = w.step()
    else {
        panic!("{:?}", w.step())
    };
    assert!(status.message.contains("pullMethod nodeOnly"), "{status:?}");
    // Where a node can, it runs there.
    let mut w = pulled_by(
        PullMethod::NodeOnly,
        Some(NodePull::Nodes(vec!["node-real".into()])),
    );
    let (pod, _) = w.pod_step();
    assert!(pulls_on_node(&pod));
    assert_eq!(required_node(&pod).as_deref(), Some("node-real"));
}

#[test]
fn the_clusters_default_applies_to_images_that_name_no_method() {
    let mut w = pulled_by(
        PullMethod::Pod,
        Some(NodePull::Nodes(vec!["node-real".into()])),
    );
    w.image.as_mut().unwrap().spec.source.registry.pull_method = None;
    let node_default = PopulatorConfig {
        default_pull_method: PullMethod::Node,
        ..config()
    };
    let (pod, _) = w.clone().pod_step_with(&node_default);
    assert!(pulls_on_node(&pod));
    let (pod, _) = w.pod_step();
    assert!(!pulls_on_node(&pod));
}
