//! vmdisk controllers: the image controller (tag → digest, VMDiskImage status, the agents'
//! pull-credentials copies) and the volume populator, run by one replica at a time of the
//! `vmdisk-controller` Deployment under Lease-based leader election.
//!
//! Module map: [`supervisor`] runs the controllers while [`leader`] says this replica leads;
//! [`image`] (resolve, status, reconcile) with [`credentials`]; [`populator`] (decide,
//! objects, reconcile, sweep); [`node_pull`] tells which nodes mount images as volumes;
//! [`tasks`] holds the helpers' tasks; [`events`] records Events with bounded memory; [`metrics`] and [`server`]
//! expose `/metrics`, `/healthz` and `/readyz`; [`agent_api`] hands each node's cache agent
//! the pull credentials of what its node prefetches; [`config`] holds the flags.

pub mod agent_api;
pub mod config;
pub mod credentials;
pub mod events;
pub mod image;
pub mod leader;
pub mod metrics;
pub mod node_pull;
pub mod placement;
pub mod populator;
pub mod server;
pub mod supervisor;
pub mod tasks;
pub mod time;

#[cfg(test)]
pub(crate) mod testing;

pub use vmdisk_support::error_chain;

/// Everything `vmdisk-controller` asks of the API server (as the `vmdisk-controller`
/// ServiceAccount). `deploy/rbac.yaml` grants exactly this; a test checks it both ways.
pub fn api_access() -> std::collections::BTreeSet<vmdisk_crds::Permission> {
    vmdisk_crds::permissions(&[
        image::API_ACCESS,
        placement::API_ACCESS,
        credentials::API_ACCESS,
        agent_api::API_ACCESS,
        leader::API_ACCESS,
        node_pull::API_ACCESS,
        populator::API_ACCESS,
    ])
}
