//! vmdisk webhook: the mutating admission server for PVCs and Pods, and (in the same
//! Deployment) the leader-elected image controller.
//!
//! Module map: [`admission`] decodes AdmissionReviews and encodes answers; [`mutate`] holds the
//! pure decisions (what patch a PVC or Pod gets); [`catalog`] keeps VMDiskImages and labelled
//! PVCs in memory (from the API server, or from a directory of YAML); [`tls`] loads and
//! hot-reloads the serving certificate; [`server`] is the HTTPS accept loop; [`routes`] wires
//! handlers, metrics and probes together.

pub mod admission;
pub mod catalog;
pub mod config;
pub mod controller;
pub mod dir_watch;
pub mod metrics;
pub mod mutate;
pub mod routes;
pub mod server;
pub mod tls;

/// An error and its causes on one line, for log fields.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
