//! `cargo bench --bench time_to_disk` (root): time from a PVC's creation to a Bound claim
//! holding the disk, on a real cluster this benchmark starts itself (`.ci/with-cluster`: the
//! shared cluster script beside the checkout, with its real kubelet + containerd node, and a
//! registry on the pod bridge) and stops again. It builds the binaries in release mode and runs
//! the e2e suite's `time_to_disk` phase against that cluster, which installs vmdisk as the
//! `installed` phase does and prints the `RESULT time-to-disk ...` line (see
//! `tests/e2e/time_to_disk.rs` for what is measured and the variables that size the disk).

fn main() {
    vmdisk_tests::bench::run_cluster_phase("time_to_disk");
}
