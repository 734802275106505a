//! vmdisk webhook: the mutating admission server for PVCs and Pods. It reads VMDiskImages and
//! PVC metadata and writes nothing; the controllers run in `vmdisk-controller`.
//!
//! Module map: [`admission`] decodes AdmissionReviews with serde, holds the policy (what is
//! mutated) and the object views, and encodes answers; [`mutate`] holds the pure decisions
//! (what patch a PVC or Pod gets); [`catalog`] keeps VMDiskImages and labelled PVCs in memory
//! (from the API server, or from a directory of YAML); [`routes`] is the HTTP side
//! (limits, status codes, metrics, probes). The serving certificate and the HTTPS accept loop
//! are shared with the controller: `vmdisk_support::{tls, https}`.

pub mod admission;
pub mod catalog;
pub mod config;
pub mod metrics;
pub mod mutate;
pub mod routes;

pub use vmdisk_support::error_chain;

/// Everything `vmdisk-webhook` asks of the API server (as the `vmdisk-webhook`
/// ServiceAccount): the catalog's watches and claim lookups, nothing else. `deploy/rbac.yaml`
/// grants exactly this; a test checks it both ways.
pub fn api_access() -> std::collections::BTreeSet<vmdisk_crds::Permission> {
    vmdisk_crds::permissions(&[catalog::kube::API_ACCESS])
}
