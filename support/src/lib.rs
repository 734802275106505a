//! What every vmdisk binary does the same way, written once: the retry backoff, error chains
//! for logs and Events, the Prometheus endpoint, logging setup and the termination signal.
//!
//! Nothing here knows about Kubernetes objects or disks; the API types and names live in
//! `vmdisk-crds`.

pub mod backoff;
pub mod errors;
pub mod metrics;
pub mod process;

pub use backoff::{Backoff, Failures};
pub use errors::error_chain;
