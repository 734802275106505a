//! Who pulls the image for a claim (`pullMethod`): vmdisk through the node cache, or the
//! node's container runtime as an image volume of the populator pod where a node can mount one
//! (see [`crate::node_pull`]); `node` falls back to the cache where none can, `nodeOnly` fails.

use k8s_openapi::api::core::v1::Pod;
use vmdisk_crds::{reasons, PullMethod, VMDiskImage};

use super::Note;
use crate::node_pull::NodePull;
use crate::populator::objects::pulls_on_node;
use crate::populator::PopulatorConfig;

/// How the populator pod gets the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullPlan {
    /// vmdisk pulls it into the node cache and copies from there.
    Cache,
    /// The node's runtime pulls and mounts it; the pod runs on one of these nodes.
    Runtime(Vec<String>),
    /// `pullMethod: node` where no node can mount it: through the cache; why.
    Fallback(String),
    /// `pullMethod: nodeOnly` where no node can mount it; why.
    Refused(String),
}

/// The image's pull method, or the cluster's default.
pub fn pull_method(image: &VMDiskImage, default: PullMethod) -> PullMethod {
    image.spec.source.registry.pull_method.unwrap_or(default)
}

/// The plan for a claim of `image`, given where image volumes work (`None`: not looked up).
pub fn pull_plan(
    image: &VMDiskImage,
    node_pull: Option<&NodePull>,
    config: &PopulatorConfig,
) -> PullPlan {
    let method = pull_method(image, config.default_pull_method);
    let why = match node_pull {
        _ if method == PullMethod::Pod => return PullPlan::Cache,
        Some(NodePull::Nodes(nodes)) => return PullPlan::Runtime(nodes.clone()),
        Some(NodePull::Unavailable(why)) => why.clone(),
        None => "the nodes' runtimes are not known yet".to_string(),
    };
    match method {
        PullMethod::NodeOnly => PullPlan::Refused(why),
        _ => PullPlan::Fallback(why),
    }
}

/// The claim's message while its pod works: the same before the pod is made and after.
pub fn populating_message(
    image_name: &str,
    attempt: u32,
    plan: &PullPlan,
    pod: Option<&Pod>,
) -> String {
    let base = format!("populating from VMDiskImage {image_name} (attempt {attempt})");
    match (plan, pod) {
        (_, Some(pod)) if pulls_on_node(pod) => {
            format!("{base}, pulled by the node's container runtime")
        }
        (PullPlan::Runtime(_), None) => format!("{base}, pulled by the node's container runtime"),
        (PullPlan::Fallback(why), _) => {
            format!("{base} through the node cache: the node's runtime cannot mount it: {why}")
        }
        _ => base,
    }
}

/// The Event that goes with a fallback, once.
pub fn fallback_note(image_name: &str, plan: &PullPlan) -> Option<Note> {
    let PullPlan::Fallback(why) = plan else {
        return None;
    };
    Some(Note {
        reason: reasons::NODE_PULL_UNAVAILABLE,
        action: "Fallback",
        warning: true,
        message: format!(
            "VMDiskImage {image_name} asks for pullMethod node, but {why}: vmdisk pulls it through the node cache instead"
        ),
    })
}

/// Why a `nodeOnly` claim fails.
pub fn refusal(image_name: &str, why: &str) -> String {
    format!(
        "VMDiskImage {image_name} asks for pullMethod nodeOnly, but {why}; use pullMethod node to fall back to the node cache"
    )
}
