//! vmdisk node cache agent: pulls VM disk images from OCI registries, decodes them to raw
//! while the layers stream (qemu-img for the formats it does not decode itself) into a
//! node-local content-addressed cache, evicts by LRU within a byte budget,
//! reports the node's cache state, and fills PVCs from the cache (`populate`).

pub mod cli;
pub mod node;
pub mod populate;
pub mod store;
pub mod warm;

pub use vmdisk_support::error_chain;

/// Settles glibc's malloc for a process that streams hundreds of MiB through buffers that one
/// thread allocates (the download's) and another frees (the extraction's): with the default
/// dynamic thresholds, freed buffers stayed in per-thread arenas and the peak resident size of
/// identical warms ranged from 40 to 72 MiB; with these it stays near 36 MiB. The agent binary
/// calls it first thing; the benchmarks' children too, to measure what the agent does.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        // Blocks of 1 MiB and more (batches, read buffers) are mapped and unmapped whole.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        // Free memory at the top of a heap goes back to the system beyond 256 KiB.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 10);
    }
}

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
