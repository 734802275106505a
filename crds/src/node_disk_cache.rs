//! `NodeDiskCache`: one per node (name = node name), written only by that node's agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::vm_disk_image::DiskFormat;

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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<CacheEntryStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
