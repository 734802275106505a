//! Small helpers the benchmarks share: settings from the environment, medians, the setup of
//! the child processes that run vmdisk's side (so each reports its own peak RSS), and the
//! run of an e2e benchmark phase on a cluster started for it.

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
    vmdisk_support::allocator::tune_allocator();
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

/// Runs the e2e suite's benchmark phase `phase` (release build) on a cluster started for it
/// by `.ci/with-cluster` (the shared cluster script beside the checkout) and stopped again: what
/// `cargo bench --bench <phase>` does for the benchmarks that need a cluster. Skips, saying
/// why, without the cluster script or root.
pub fn run_cluster_phase(phase: &str) {
    run_cluster_phase_with(phase, &[]);
}

/// [`run_cluster_phase`], with `env` set for `.ci/with-cluster` and the suite (e.g.
/// `VMDISK_FAKE_NODES`).
pub fn run_cluster_phase_with(phase: &str, env: &[(&str, String)]) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    if !root.join("../shared/k8s/cluster").exists() {
        println!(
            "{phase}: skipped: no cluster script at ../shared/k8s/cluster beside the checkout"
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("{phase}: skipped: the cluster's real node and the image builds need root");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--workspace", "--bins"])
        .status()
        .unwrap();
    assert!(built.success(), "cargo build --release failed");
    let ran = std::process::Command::new("bash")
        .current_dir(&root)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg(".ci/with-cluster")
        .arg(&cargo)
        .args([
            "test",
            "--release",
            "-p",
            "vmdisk-tests",
            "--test",
            "e2e",
            "--",
            "--ignored",
            "--nocapture",
            &format!("{phase}::"),
        ])
        .status()
        .unwrap();
    assert!(ran.success(), "the {phase} phase failed");
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_unsorted_rounds() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::env_or("VMDISK_BENCH_SURELY_UNSET", 7), 7);
    }
}
