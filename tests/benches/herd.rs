//! `cargo bench --bench herd` (root): 8 cache agents (the cluster's real node and 7 fake ones,
//! each agent a process on this machine with its node-bound tokens, as in the e2e suite's
//! `local` phase) warm a new image at once, with peers off and then on, on a real control
//! plane this benchmark starts itself (`.ci/with-cluster`) and stops again. It builds the
//! binaries in release mode and runs the e2e suite's `herd` phase, which prints the
//! `RESULT herd ...` line (see `tests/e2e/herd.rs` for the sizes and their variables;
//! `VMDISK_BENCH_HERD_AGENTS` for another number of agents).

fn main() {
    let agents = vmdisk_tests::bench::env_or("VMDISK_BENCH_HERD_AGENTS", 8);
    vmdisk_tests::bench::run_cluster_phase_with(
        "herd",
        &[("VMDISK_FAKE_NODES", (agents.max(2) - 1).to_string())],
    );
}
