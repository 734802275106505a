//! `cargo bench --bench scale` (root): the memory of the webhook, the controller and an agent,
//! and the time of a PVC create, with 100 and then 10,000 VMDiskImages and as many labelled
//! PVCs, on a real control plane this benchmark starts itself (`.ci/with-cluster`) and stops
//! again. It builds the binaries in release mode and runs the e2e suite's `scale` phase,
//! which prints the `RESULT scale-memory ...` lines (see `tests/e2e/scale.rs`; sizes from
//! `VMDISK_BENCH_SCALE_SMALL` and `VMDISK_BENCH_SCALE_IMAGES`).

fn main() {
    vmdisk_tests::bench::run_cluster_phase("scale");
}
