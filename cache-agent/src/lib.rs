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

/// An error and its causes on one line, for log fields and Events.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
