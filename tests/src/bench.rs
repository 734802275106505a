//! Small helpers the benchmarks share: settings from the environment, medians, and the setup of
//! the child processes that run vmdisk's side (so each reports its own peak RSS).

use std::sync::Arc;

use vmdisk_cache_agent::store::CacheStore;
use vmdisk_cache_agent::warm::extract::ExtractLimits;
use vmdisk_cache_agent::warm::Warmer;
use vmdisk_registry::pull::{Puller, PullerConfig};

/// `name` parsed from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (sorted in place); rounds run an odd number of times.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A benchmark child's runtime, set up as the agent's `main` sets up its own.
pub fn child_runtime() -> tokio::runtime::Runtime {
    vmdisk_cache_agent::tune_allocator();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A warmer on `store` with the agent's defaults.
pub fn child_warmer(store: CacheStore) -> Warmer {
    Warmer::new(
        Arc::new(store),
        Puller::new(PullerConfig::default()),
        ExtractLimits::default(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_unsorted_rounds() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::env_or("VMDISK_BENCH_SURELY_UNSET", 7), 7);
    }
}
