//! vmdisk node cache agent: pulls VM disk images from OCI registries, converts them with
//! qemu-img into a node-local content-addressed cache, evicts by LRU within a byte budget,
//! reports the node's cache state, and fills PVCs from the cache (`populate`).

pub mod auth;
pub mod clone;
pub mod convert;
pub mod extract;
pub mod pull;
pub mod report;
pub mod store;
pub mod warm;
pub mod watch;
