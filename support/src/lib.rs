//! What every vmdisk binary does the same way, written once: the retry backoff, error chains
//! for logs and Events, the Prometheus endpoint, logging setup and the termination signal, and
//! the HTTPS side of the servers: the hot-reloaded serving certificate ([`tls`], watching its
//! directory with [`dir_watch`]) and the accept loop ([`https`]).
//!
//! Nothing here knows about Kubernetes objects or disks; the API types and names live in
//! `vmdisk-crds`.

pub mod allocator;
pub mod backoff;
pub mod dir_watch;
pub mod errors;
pub mod https;
pub mod metrics;
pub mod process;
pub mod tls;

pub use backoff::{Backoff, Failures};
pub use errors::error_chain;
