//! `cargo bench --bench time_to_disk` (root): time from a PVC's creation to a Bound claim
//! holding the disk, on a real cluster this benchmark starts itself (`.ci/with-cluster`: the
//! shared cluster script beside the checkout, with its real kubelet + containerd node, and a
//! registry on the pod bridge) and stops again. It builds the binaries in release mode and runs
//! the e2e suite's `time_to_disk` phase against that cluster, which installs vmdisk as the
//! `installed` phase does and prints the `RESULT time-to-disk ...` line (see
//! `tests/e2e/time_to_disk.rs` for what is measured and the variables that size the disk).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    if !root.join("../shared/k8s/cluster").exists() {
        println!(
            "time-to-disk: skipped: no cluster script at ../shared/k8s/cluster beside the checkout"
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("time-to-disk: skipped: the cluster's real node and the image builds need root");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--workspace", "--bins"])
        .status()
        .unwrap();
    assert!(built.success(), "cargo build --release failed");
    let ran = Command::new("bash")
        .current_dir(&root)
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
            "time_to_disk::",
        ])
        .status()
        .unwrap();
    assert!(ran.success(), "the time_to_disk phase failed");
}
