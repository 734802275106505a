//! vmdisk node cache agent: pulls VM disk images from OCI registries, decodes them to raw
//! while the layers stream (qemu-img for the formats it does not decode itself) into a
//! node-local content-addressed cache, evicts by LRU within a byte budget,
//! reports the node's cache state, and fills PVCs from the cache (`populate`).

pub mod cli;
pub mod identity;
pub mod node;
pub mod peer;
pub mod populate;
pub mod store;
pub mod warm;

pub use vmdisk_support::error_chain;

/// Everything `vmdisk-cache-agent run` asks of the API server (as the `vmdisk-cache-agent`
/// ServiceAccount). `deploy/rbac.yaml` grants exactly this; a test checks it both ways.
pub fn api_access() -> std::collections::BTreeSet<vmdisk_crds::Permission> {
    vmdisk_crds::permissions(node::API_ACCESS)
}

/// Everything `vmdisk-cache-agent populate` asks of the API server in a populator pod (as the
/// `vmdisk-populator` ServiceAccount).
pub fn populator_api_access() -> std::collections::BTreeSet<vmdisk_crds::Permission> {
    vmdisk_crds::permissions(&[cli::POPULATOR_API_ACCESS])
}
