//! `NodeDiskCache`: one per node (name = node name). Its spec's image list is what the
//! controller asks the node to hold (written only by the controller); its status is what the
//! node's agent holds (written only by that agent).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::vm_disk_image::{DiskFormat, VMDiskImage};

/// What a node's cache holds and how full it is.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vmdisk.io",
    version = "v1alpha1",
    kind = "NodeDiskCache",
    shortname = "ndc",
    category = "vmdisk",
    status = "NodeDiskCacheStatus",
    printcolumn = r#"{"name":"Entries","type":"integer","jsonPath":".status.entryCount"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.usedQuantity"}"#,
    printcolumn = r#"{"name":"Budget","type":"string","jsonPath":".status.budgetQuantity"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeDiskCacheSpec {
    /// The node this cache lives on (equal to metadata.name).
    pub node_name: String,
    /// The images this node should hold, decided by the controller from every VMDiskImage's
    /// cache policy and this node's labels: the agent reads this list, not the images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<DesiredImage>,
    /// Images that select this node but did not fit in `images` (the list's size is bounded
    /// so that the object stays far below the API server's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted_images: Option<u32>,
}

/// One image a node should hold: what the agent needs to warm it, nothing more.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredImage {
    /// The VMDiskImage's namespace.
    pub namespace: String,
    /// The VMDiskImage's name.
    pub name: String,
    /// The resolved digest every node caches.
    pub digest: String,
    pub format: DiskFormat,
    /// Never evicted by the cache's budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// The image's reference as its VMDiskImage names it (pulled by `digest`).
    pub url: String,
    /// The image names a pull secret: the agent asks the controller's agent API for its
    /// credentials (the secret's name is not the agent's business).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pull_secret: bool,
    /// PEM bundle of CAs to trust for the registry (the image's `caBundle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Plain HTTP to the registry (the image's `insecure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
}

impl DesiredImage {
    /// The list entry of a resolved image; `None` before it has a digest.
    pub fn of(image: &VMDiskImage) -> Option<Self> {
        let source = &image.spec.source.registry;
        Some(Self {
            namespace: image.metadata.namespace.clone()?,
            name: image.metadata.name.clone()?,
            digest: image.digest()?.to_string(),
            format: image.spec.format,
            pinned: image.spec.cache.pinned,
            url: source.url.clone(),
            pull_secret: source.pull_secret_ref.is_some(),
            ca_bundle: source.ca_bundle.clone(),
            insecure: source.insecure,
        })
    }
}

/// State of one cache entry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CacheEntryState {
    /// Wanted, not started.
    #[default]
    Pending,
    /// Being pulled from the registry.
    Pulling,
    /// Being converted into the target format.
    Converting,
    /// Complete, verified and visible: PVCs can be filled from it.
    Ready,
    /// The last attempt failed; retried with backoff.
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntryStatus {
    pub digest: String,
    pub format: DiskFormat,
    pub state: CacheEntryState,
    /// Fraction done while pulling or converting (0.0–1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Format of the disk inside the image before conversion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// Bytes the entry occupies on disk (holes not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_size: Option<u64>,
    /// RFC 3339 time of the last warm or clone that used the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    #[serde(default)]
    pub pinned: bool,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How this node pulled the entry it holds: when, and from where its bytes came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<EntryPull>,
}

/// How a node pulled a cache entry: the time the warm began and the entry was committed (RFC
/// 3339), and how many of the layers' bytes came from the registry and how many from other
/// nodes' agents. The image controller sums these per image (`status.pull` of the image).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntryPull {
    pub started: String,
    pub finished: String,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDiskCacheStatus {
    /// Size of the filesystem holding the cache, in bytes.
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Bytes the cache may use.
    #[serde(default)]
    pub budget_bytes: u64,
    /// Bytes the cache's entries occupy.
    #[serde(default)]
    pub used_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_quantity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_quantity: Option<String>,
    #[serde(default)]
    pub entry_count: u32,
    /// `https://<address>:<port>` where this node's agent serves its peers the layers of the
    /// entries it holds or is warming; absent when peers are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<CacheEntryStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node holding 1,000 images, each listed (with a pull secret and a registry of 40
    /// characters) and reported Ready with every optional field (how each was pulled too): how
    /// large the object gets, against the API server's limit of 1.5 MiB; it must stay below
    /// half of it.
    #[test]
    fn a_thousand_entries_stay_far_below_the_object_size_limit() {
        let digest = |i: usize| format!("sha256:{i:064x}");
        let mut cache = NodeDiskCache::new(
            "node-with-a-long-name-0123456789.example.internal",
            NodeDiskCacheSpec {
                node_name: "node-with-a-long-name-0123456789.example.internal".into(),
                images: (0..1000)
                    .map(|i| DesiredImage {
                        namespace: format!("team-{:02}", i % 50),
                        name: format!("fedora-cloud-base-{i}"),
                        digest: digest(i),
                        format: DiskFormat::Qcow2,
                        pinned: i % 10 == 0,
                        url: format!("registry.example.internal:5000/containerdisks/fedora:{i}"),
                        pull_secret: true,
                        ca_bundle: None,
                        insecure: None,
                    })
                    .collect(),
                omitted_images: None,
            },
        );
        cache.status = Some(NodeDiskCacheStatus {
            entry_count: 1000,
            entries: (0..1000)
                .map(|i| CacheEntryStatus {
                    digest: digest(i),
                    format: DiskFormat::Qcow2,
                    state: CacheEntryState::Ready,
                    progress: None,
                    source_format: Some("qcow2".into()),
                    virtual_size: Some(10 << 30),
                    allocated_size: Some(2 << 30),
                    last_used: Some("2026-12-03T10:00:00Z".into()),
                    pinned: i % 10 == 0,
                    message: None,
                    pull: Some(EntryPull {
                        started: "2026-12-03T09:58:00Z".into(),
                        finished: "2026-12-03T10:00:00Z".into(),
                        bytes_from_registry: 230 << 20,
                        bytes_from_peers: 2 << 30,
                    }),
                })
                .collect(),
            ..Default::default()
        });
        let bytes = serde_json::to_vec(&cache).unwrap().len();
        println!("a NodeDiskCache with 1,000 listed and reported entries: {bytes} bytes");
        assert!(bytes < 1536 * 1024 / 2, "{bytes} bytes");
    }
}
