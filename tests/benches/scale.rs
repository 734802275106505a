//! `cargo bench --bench scale` (root): vmdisk on 300 nodes (the cluster's own with real
//! agents, the rest played by simulated agents with node-bound tokens) with 100 and then 10,000
//! VMDiskImages and as many labelled PVCs, on a real control plane this benchmark starts itself
//! (`.ci/with-cluster`) and stops again. It builds the binaries in release mode and runs the
//! e2e suite's `scale` phase, which prints the `RESULT scale ...` lines (see
//! `tests/e2e/scale.rs`; sizes from `VMDISK_BENCH_SCALE_SMALL`, `VMDISK_BENCH_SCALE_IMAGES`
//! and `VMDISK_BENCH_SCALE_NODES`).

fn main() {
    vmdisk_tests::bench::run_cluster_phase("scale");
}
