//! The DaemonSet's side of the agent (`vmdisk-cache-agent run`): keep this node's cache
//! holding what the VMDiskImages ask for, and tell the cluster what it holds.
//!
//! Start with `plan` (pure: which images this node should hold, what is pinned, which warms
//! to start now, the retry backoff), then `agent` (the [`Agent`] loop: reflectors on the
//! VMDiskImages and this Node, the store's entry watcher, the warms), then `report` (the
//! NodeDiskCache status and node labels, computed by pure functions and written by
//! [`NodeReporter`], and Events) and `metrics` ([`AgentMetrics`]). `credentials` fetches the
//! pull credentials of prefetched images from the controller's agent API.

mod agent;
#[cfg(test)]
mod convergence;
pub(crate) mod credentials;
pub mod metrics;
mod plan;
mod report;

use vmdisk_crds::ApiAccess;

pub use self::agent::Agent;
pub use self::credentials::{
    parse_url as parse_credentials_url, CredentialsError, CredentialsSource,
};
pub use self::metrics::AgentMetrics;
pub(crate) use self::plan::every_node_images;
pub use self::report::NodeReporter;

/// Everything the run loop and its reports ask of the API server.
pub(crate) const API_ACCESS: &[&[ApiAccess]] = &[
    agent::API_ACCESS,
    report::API_ACCESS,
    credentials::API_ACCESS,
    crate::peer::server::API_ACCESS,
    crate::peer::sourcing::API_ACCESS,
];
