//! Shared harness of vmdisk's cross-component tests, benchmarks and demo: real TLS, real
//! registries, real disks.

pub mod bench;
pub mod certs;
pub mod disks;
pub mod fake_api;
pub mod https;
pub mod images;
pub mod loopfs;
pub mod push;
pub mod registry;
pub mod throttle;
pub mod webhook;
