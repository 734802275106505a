//! The DaemonSet's side of the agent: keep this node's cache holding what the VMDiskImages ask
//! for, and tell the cluster what it holds.

pub mod agent;
pub mod report;
