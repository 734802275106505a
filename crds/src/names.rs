//! Label, annotation and group names shared by the webhook, the controllers and the agents.

/// API group of every vmdisk resource.
pub const GROUP: &str = "vmdisk.io";
/// API version of every vmdisk resource.
pub const VERSION: &str = "v1alpha1";
/// Kind a PVC's `dataSourceRef` names to be filled from a VM disk image.
pub const IMAGE_KIND: &str = "VMDiskImage";

/// Annotation a plain PVC carries to ask for the transparent form (`vmdisk.io/image: <name>`).
/// The webhook also sets a label of the same name on every PVC it mutates, so the PVC
/// reflector can select exactly the claims that matter.
pub const IMAGE_ANNOTATION: &str = "vmdisk.io/image";
/// Label the webhook adds to every VMDiskImage-backed PVC (value: the image name).
pub const IMAGE_LABEL: &str = "vmdisk.io/image";
/// Annotation recording the digest the image resolved to when the PVC was admitted.
pub const DIGEST_ANNOTATION: &str = "vmdisk.io/digest";
/// Prefix of the per-image node labels agents set on nodes whose cache holds the image ready.
pub const NODE_CACHE_LABEL_PREFIX: &str = "cache.vmdisk.io/";
/// Value of a node cache label.
pub const NODE_CACHE_LABEL_VALUE: &str = "ready";
/// Finalizer the populator puts on PVCs it is filling.
pub const POPULATOR_FINALIZER: &str = "vmdisk.io/populate-target-protection";

/// Annotation on a PVC being populated: how far the populator got (`42%`).
pub const PROGRESS_ANNOTATION: &str = "vmdisk.io/progress";
/// Annotation on a VMDiskImage-backed PVC: where its population stands ([`PopulatePhase`]).
pub const PHASE_ANNOTATION: &str = "vmdisk.io/phase";
/// Annotation on a VMDiskImage-backed PVC: why it is in its phase, for a person.
pub const MESSAGE_ANNOTATION: &str = "vmdisk.io/message";
/// Annotation on a VMDiskImage-backed PVC once filled (or given up): when the populator saw
/// each step, from its first look (`seen +0.00s, prime +0.01s, …, bound +1.84s; errors 0, …`).
pub const TIMELINE_ANNOTATION: &str = "vmdisk.io/timeline";
/// Annotation the populator puts on the PV it filled: `<namespace>/<image>`.
pub const POPULATED_FROM_ANNOTATION: &str = "vmdisk.io/populated-from";
/// Annotation on a prime PVC and a populator pod: the user's PVC, `<namespace>/<name>`.
pub const CLAIM_ANNOTATION: &str = "vmdisk.io/claim";
/// Label on a prime PVC and a populator pod: the user PVC's UID.
pub const CLAIM_UID_LABEL: &str = "vmdisk.io/claim-uid";
/// Annotation on a populator pod: which attempt it is (1, 2, ...).
pub const ATTEMPT_ANNOTATION: &str = "vmdisk.io/attempt";
/// Annotation on a prime PVC, written by `populate` once the volume holds the disk and is
/// synced: its one-line summary. The populator hands the volume over on it, without waiting
/// for the kubelet to report the pod's end.
pub const POPULATED_ANNOTATION: &str = "vmdisk.io/populated";
/// Annotation on a prime PVC: how many populator pods failed so far.
pub const FAILED_ATTEMPTS_ANNOTATION: &str = "vmdisk.io/failed-attempts";
/// `app.kubernetes.io/component` of prime PVCs and populator pods.
pub const POPULATOR_COMPONENT: &str = "populator";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Where the scheduler records the node of a WaitForFirstConsumer claim.
pub const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";
/// ServiceAccount of populator pods (reads credentials copies, reports progress).
pub const POPULATOR_SERVICE_ACCOUNT: &str = "vmdisk-populator";
/// KubeVirt's qemu user and group: `disk.img` belongs to them.
pub const QEMU_UID: u32 = 107;

/// Name of the prime PVC (in vmdisk's namespace) that the populator fills for a user PVC.
pub fn prime_pvc_name(claim_uid: &str) -> String {
    format!("prime-{claim_uid}")
}

/// Name of the populator pod for a user PVC.
pub fn populator_pod_name(claim_uid: &str) -> String {
    format!("populate-{claim_uid}")
}

/// Where a VMDiskImage-backed PVC's population stands (`vmdisk.io/phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopulatePhase {
    /// Waiting for something outside vmdisk: the image, its resolution, a node, a class.
    Pending,
    /// A populator pod is filling the volume.
    Populating,
    /// The last pod failed; another runs after a backoff.
    Retrying,
    /// Filled; the volume is being handed to the PVC.
    Rebinding,
    Succeeded,
    /// Given up (see `vmdisk.io/message` and the PVC's Events). Remove the annotation to try
    /// again.
    Failed,
}

impl PopulatePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PopulatePhase::Pending => "Pending",
            PopulatePhase::Populating => "Populating",
            PopulatePhase::Retrying => "Retrying",
            PopulatePhase::Rebinding => "Rebinding",
            PopulatePhase::Succeeded => "Succeeded",
            PopulatePhase::Failed => "Failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            PopulatePhase::Pending,
            PopulatePhase::Populating,
            PopulatePhase::Retrying,
            PopulatePhase::Rebinding,
            PopulatePhase::Succeeded,
            PopulatePhase::Failed,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// vmdisk's own namespace: the webhook Deployment, the agents, the controllers' Lease.
pub const INSTALL_NAMESPACE: &str = "vmdisk-system";
/// ConfigMap in vmdisk's namespace listing the images every node holds (those without a
/// `cache.nodeSelector`), written by the controller and watched by every agent: one write
/// reaches all nodes, where per-node lists would take one write per node.
pub const EVERY_NODE_LIST: &str = "vmdisk-every-node-images";
/// The ConfigMap key holding that list (JSON, `DesiredImage`s).
pub const EVERY_NODE_LIST_KEY: &str = "images.json";
/// Namespace of the per-image pull credentials the image controller copies for the agents.
/// It holds nothing but those copies; only the controller reads it, and it hands each agent
/// only the copies of what the agent's node prefetches (the controller's agent API).
pub const CREDENTIALS_NAMESPACE: &str = "vmdisk-credentials";
/// ServiceAccount of the cache agent DaemonSet.
pub const CACHE_AGENT_SERVICE_ACCOUNT: &str = "vmdisk-cache-agent";
/// Audience of the token an agent shows the controller's agent API (a projected
/// ServiceAccount token bound to the agent's pod, so the API server records its node). A
/// token for this audience is worthless against the API server, and the API server's tokens
/// are refused by the agent API.
pub const AGENT_API_AUDIENCE: &str = "vmdisk-controller";
/// The audience of the token an agent shows another node's agent to fetch a blob (peers).
pub const PEER_AUDIENCE: &str = "vmdisk-peer";
/// Path of the agent API that answers an image's pull credentials:
/// `GET /v1/credentials/<namespace>/<image>`.
pub const AGENT_API_CREDENTIALS_PATH: &str = "/v1/credentials";
/// `app.kubernetes.io/managed-by` value on every object vmdisk creates.
pub const MANAGED_BY: &str = "vmdisk";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label on a credentials copy: the UID of the VMDiskImage it serves.
pub const IMAGE_UID_LABEL: &str = "vmdisk.io/image-uid";
/// Annotation on a credentials copy: `<namespace>/<image>` and the Secret it was copied from.
pub const CREDENTIALS_SOURCE_ANNOTATION: &str = "vmdisk.io/copied-from";
/// Annotation on a credentials copy: when it was last refreshed from its source (RFC 3339).
pub const CREDENTIALS_SYNCED_ANNOTATION: &str = "vmdisk.io/synced-at";

/// Name of the Secret in [`CREDENTIALS_NAMESPACE`] holding the pull credentials of the
/// VMDiskImage with this UID (only the entry for the image's registry host).
pub fn credentials_secret_name(image_uid: &str) -> String {
    format!("pull-{image_uid}")
}

/// Event reasons, one place for all components (as kubernetes-csi's lib-volume-populator does).
pub mod reasons {
    /// Image controller, on a VMDiskImage: the reference resolved to a (new) digest.
    pub const RESOLVED: &str = "Resolved";
    /// Image controller, on a VMDiskImage: the reference could not be resolved.
    pub const RESOLVE_FAILED: &str = "ResolveFailed";
    /// Image controller, on a VMDiskImage: its pull secret is missing or malformed.
    pub const PULL_SECRET_ERROR: &str = "PullSecretError";
    /// Controller, on a NodeDiskCache: more images select the node than its list holds.
    pub const NODE_LIST_FULL: &str = "NodeListFull";
    /// Agent, on its NodeDiskCache: a warm failed (retried with backoff).
    pub const WARM_FAILED: &str = "WarmFailed";
    /// Agent, on its NodeDiskCache: an entry was deleted or altered behind its back.
    pub const CACHE_ENTRY_LOST: &str = "CacheEntryLost";
    /// Populator, on a user PVC: a populator pod was created.
    pub const POPULATOR_CREATED: &str = "PopulatorCreated";
    /// Populator, on a user PVC: a populator pod failed (retried, or given up).
    pub const POPULATOR_FAILED: &str = "PopulatorFailed";
    /// Populator, on a user PVC: the volume is filled and bound to the PVC.
    pub const POPULATOR_FINISHED: &str = "PopulatorFinished";
    /// Populator, on a user PVC: the VMDiskImage it names does not exist (yet).
    pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
    /// Populator, on a user PVC: its dataSourceRef names an image in another namespace.
    pub const CROSS_NAMESPACE_REFUSED: &str = "CrossNamespaceRefused";
    /// Populator, on a user PVC: populator pods cannot be made yet (the cache agent DaemonSet,
    /// whose image and cache directory they use, is missing).
    pub const AGENT_NOT_FOUND: &str = "AgentNotFound";
    /// Populator, on a user PVC: its image asks for `pullMethod: node` and no node it may run
    /// on mounts image volumes; vmdisk pulls it instead.
    pub const NODE_PULL_UNAVAILABLE: &str = "NodePullUnavailable";
}

/// Node label key saying "this node's cache holds the image with this digest, ready".
///
/// Label names are limited to 63 characters, so the key keeps the algorithm and the first 56
/// hex digits of the digest (224 bits: collisions are not a practical concern). Returns `None`
/// for strings that are not `<algorithm>:<hex>`.
pub fn node_cache_label_key(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    if algorithm.is_empty()
        || !algorithm
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        || hex.len() < 32
        || !hex.chars().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    let mut name = format!("{algorithm}-{}", hex.to_ascii_lowercase());
    name.truncate(63);
    Some(format!("{NODE_CACHE_LABEL_PREFIX}{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_label_key_is_a_valid_label_name() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let key = node_cache_label_key(&digest).unwrap();
        let (prefix, name) = key.split_once('/').unwrap();
        assert_eq!(prefix, "cache.vmdisk.io");
        assert_eq!(name.len(), 63);
        assert!(name.starts_with("sha256-abab"));
        assert!(name.chars().last().unwrap().is_ascii_alphanumeric());
    }

    #[test]
    fn node_label_key_rejects_non_digests() {
        assert_eq!(node_cache_label_key("latest"), None);
        assert_eq!(node_cache_label_key("sha256:xyz"), None);
        assert_eq!(node_cache_label_key(":abcd"), None);
        assert_eq!(node_cache_label_key("sha256:abcd"), None);
    }
}
