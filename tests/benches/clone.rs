//! `cargo bench --bench clone`: copying a cached entry to a new target the way `populate`
//! does (reflink, else sparse extent copy, then fsync), against `cp --sparse=always` of the
//! same file followed by `sync`, alternating in one run, in the benchmark's directory (ext4
//! or whatever it is: the sparse copy). Then, as root with xfsprogs, the same entry on a
//! loop-mounted XFS: `reflink_secs`, the clone that shares the entry's blocks (otherwise
//! `reflink_secs=skipped` and the reason on stderr).
//!
//! Env: VMDISK_BENCH_DISK_MIB (default 2048), VMDISK_BENCH_DATA_MIB (default 560),
//! VMDISK_BENCH_ROUNDS (default 5; medians are reported), VMDISK_BENCH_DIR.

use std::process::Command;
use std::time::Instant;

use vmdisk_cache_agent::populate::clone::{clone_disk, CloneMethod};
use vmdisk_tests::bench::{env_or, median};
use vmdisk_tests::disks::{make_ext4_raw, same_content};
use vmdisk_tests::loopfs::LoopMount;

fn main() {
    let disk_mib = env_or("VMDISK_BENCH_DISK_MIB", 2048);
    let data_mib = env_or("VMDISK_BENCH_DATA_MIB", 560);
    let rounds = env_or("VMDISK_BENCH_ROUNDS", 5).max(1);
    let work = tempfile::tempdir_in(
        std::env::var("VMDISK_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .unwrap();
    eprintln!("building a {disk_mib} MiB ext4 disk with {data_mib} MiB of data");
    let src = make_ext4_raw(work.path(), "entry", disk_mib, data_mib, 7);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut method = None;
    for round in 0..rounds {
        let dst = work.path().join(format!("ours-{round}.raw"));
        let start = Instant::now();
        let report = clone_disk(&src, &dst, None).unwrap();
        ours.push(start.elapsed().as_secs_f64());
        method = Some(report.method);
        let base_dst = work.path().join(format!("cp-{round}.raw"));
        let start = Instant::now();
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(&src)
            .arg(&base_dst)
            .status()
            .unwrap();
        assert!(status.success());
        // Our clone fsyncs its target; make the baseline durable too.
        let f = std::fs::File::open(&base_dst).unwrap();
        f.sync_all().unwrap();
        theirs.push(start.elapsed().as_secs_f64());
        if round == 0 {
            assert!(same_content(&src, &dst), "clone differs from the entry");
        }
        eprintln!(
            "round {}: vmdisk {:.3}s, cp {:.3}s",
            round + 1,
            ours[round as usize],
            theirs[round as usize]
        );
        std::fs::remove_file(&dst).unwrap();
        std::fs::remove_file(&base_dst).unwrap();
    }
    let (secs, base) = (median(&mut ours), median(&mut theirs));
    eprintln!("clone method: {method:?}");
    let reflink = match reflink_secs(&src, disk_mib, rounds) {
        Ok(secs) => format!("{secs:.4}"),
        Err(why) => {
            eprintln!("reflink skipped: {why}");
            "skipped".into()
        }
    };
    println!(
        "RESULT clone secs={secs:.3} baseline_secs={base:.3} ratio={:.3} reflink_secs={reflink}",
        secs / base
    );
}

/// The median time to clone `src`, copied onto a loop-mounted XFS first, to a new file there.
fn reflink_secs(src: &std::path::Path, disk_mib: u64, rounds: u64) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let xfs = LoopMount::xfs(dir.path(), disk_mib * 2 + 512)?;
    let entry = xfs.path.join("entry.raw");
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(&entry)
        .status()
        .map_err(|e| e.to_string())?;
    assert!(status.success());
    // A committed cache entry is on disk (the commit fsyncs it); a reflink of dirty pages
    // would time their writeback instead.
    std::fs::File::open(&entry)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for round in 0..rounds {
        let dst = xfs.path.join(format!("clone-{round}.raw"));
        let start = Instant::now();
        let report = clone_disk(&entry, &dst, None).map_err(|e| e.to_string())?;
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(
            report.method,
            CloneMethod::Reflink,
            "XFS with reflink=1 must reflink"
        );
        if round == 0 {
            assert!(
                same_content(src, &dst),
                "reflink clone differs from the entry"
            );
        }
        eprintln!("reflink round {}: {:.4}s", round + 1, times[round as usize]);
    }
    Ok(median(&mut times))
}
