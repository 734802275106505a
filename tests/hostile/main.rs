//! Hostile images against the shipped `vmdisk-cache-agent warm`, each in a child process whose
//! peak resident memory is read with `wait4`: images whose headers or layers claim far more
//! than they hold are refused (or warmed) with the child staying under 128 MiB, whatever they
//! claim, and each refusal names its reason.

use std::io::{Read as _, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_tests::disks::{make_ext4_raw, same_content};
use vmdisk_tests::loopfs::LoopMount;
use vmdisk_tests::push::{push_blobs, push_container_disk, TAR_GZIP};
use vmdisk_tests::registry::TestRegistry;

/// What the issue asks of every hostile image: under 128 MiB of resident memory.
const PEAK_LIMIT_KIB: i64 = 128 << 10;

fn agent_binary() -> PathBuf {
    let dir = std::env::current_exe().unwrap();
    let target = dir.parent().unwrap().parent().unwrap();
    let path = target.join("vmdisk-cache-agent");
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A gzip tar layer streamed from files: `disk/<name>` and any other entries.
fn layer(entries: &[(&str, &Path)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    // Every byte in the layer, zeros included (no GNU sparse entries): the point is what the
    // layer inflates to.
    builder.sparse(false);
    for (name, path) in entries {
        let mut file = std::fs::File::open(path).unwrap();
        builder.append_file(name, &mut file).unwrap();
    }
    let mut gz = builder.into_inner().unwrap();
    gz.flush().unwrap();
    gz.finish().unwrap()
}

const LAUNCH: &str = "VMDISK_TEST_HOSTILE_LAUNCH";

/// Runs `warm` in a child; (success, stderr, peak RSS in KiB).
///
/// A child's peak RSS counts what its parent held when it forked, so the warm is started by a
/// fresh copy of this test binary (`launcher`), which holds a few MiB: the figure is the
/// warm's own.
fn warm(reference: &str, cache: &Path, extra: &[&str]) -> (bool, String, i64) {
    let stderr = cache.with_extension("stderr");
    let mut argv = vec![
        agent_binary().display().to_string(),
        "warm".into(),
        reference.into(),
        "--insecure".into(),
        "--cache-dir".into(),
        cache.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let spec = serde_json::json!({"argv": argv, "stderr": stderr}).to_string();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "launcher", "--nocapture"])
        .env(LAUNCH, spec)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LAUNCHED "))
        .unwrap_or_else(|| panic!("the launcher said nothing: {stdout}"));
    let (status, peak) = line.split_once(' ').unwrap();
    (
        status == "0",
        std::fs::read_to_string(stderr).unwrap(),
        peak.parse().unwrap(),
    )
}

/// Not a test: the launcher `warm` uses (see there).
#[test]
fn launcher() {
    let Ok(spec) = std::env::var(LAUNCH) else {
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let argv: Vec<String> = serde_json::from_value(spec["argv"].clone()).unwrap();
    // Reaped by `wait4` below, which `Child` cannot do and still report the rusage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(spec["stderr"].as_str().unwrap()).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: plain libc structs filled by the kernel; the child is ours and waited for only
    // here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    println!("LAUNCHED {code} {}", usage.ru_maxrss);
}

/// A 64 MiB qcow2 whose header claims an L1 table of `l1_bytes` (zeros, so the layer stays
/// small: the file is extended sparsely to hold it).
fn qcow2_claiming_l1(dir: &Path, l1_bytes: u64) -> PathBuf {
    let raw = make_ext4_raw(dir, &format!("l1-{l1_bytes}"), 64, 4, 7);
    let q = dir.join(format!("l1-{l1_bytes}.qcow2"));
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q)
        .output()
        .unwrap();
    assert!(out.status.success());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&q)
        .unwrap();
    let mut l1_offset = [0u8; 8];
    f.read_exact_at(&mut l1_offset, 40).unwrap();
    let l1_offset = u64::from_be_bytes(l1_offset);
    f.write_all_at(&((l1_bytes / 8) as u32).to_be_bytes(), 36)
        .unwrap();
    f.set_len(l1_offset + l1_bytes).unwrap();
    q
}

#[tokio::test]
async fn hostile_images_are_refused_or_warmed_in_bounded_memory() {
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut check = |what: &str, ok: bool, stderr: &str, peak: i64, expect: Option<&str>| {
        report.push(format!(
            "hostile: {what}: {} in {:.1} MiB peak RSS{}",
            if ok { "warmed" } else { "refused" },
            peak as f64 / 1024.0,
            if ok {
                String::new()
            } else {
                format!(" ({})", stderr.trim().lines().last().unwrap_or(""))
            }
        ));
        assert!(peak < PEAK_LIMIT_KIB, "{what}: {peak} KiB peak\n{stderr}");
        match expect {
            Some(reason) => {
                assert!(!ok, "{what} was warmed");
                assert!(stderr.contains(reason), "{what}: {stderr}");
            }
            None => assert!(ok, "{what}: {stderr}"),
        }
    };

    for (tag, l1) in [("l1-1g", 1u64 << 30), ("l1-4g", 4 << 30)] {
        let q = qcow2_claiming_l1(work.path(), l1);
        let blob = layer(&[("disk/disk.qcow2", &q)]);
        let (reference, _) =
            push_blobs(&registry, "hostile/qcow2", tag, vec![(blob, TAR_GZIP)]).await;
        let cache = work.path().join(format!("cache-{tag}"));
        let (ok, stderr, peak) = warm(&reference, &cache, &[]);
        check(
            &format!("qcow2 with a {} GiB L1 table", l1 >> 30),
            ok,
            &stderr,
            peak,
            Some("over qemu's limit of 32 MiB"),
        );
        std::fs::remove_file(&q).unwrap();
    }

    // A 3 GiB file nobody uses beside a small disk: inflated and skipped in bounded memory;
    // refused once it is over what a layer may inflate to.
    let junk = work.path().join("junk");
    std::fs::File::create(&junk)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let disk = make_ext4_raw(work.path(), "small", 16, 2, 9);
    let blob = layer(&[("junk/filler", &junk), ("disk/disk.img", &disk)]);
    println!(
        "hostile: the layer with a 3 GiB unused entry is {} bytes",
        blob.len()
    );
    let (reference, _) = push_blobs(&registry, "hostile/junk", "1", vec![(blob, TAR_GZIP)]).await;
    let (ok, stderr, peak) = warm(&reference, &work.path().join("cache-junk"), &[]);
    check("a 3 GiB unused entry", ok, &stderr, peak, None);
    let (ok, stderr, peak) = warm(
        &reference,
        &work.path().join("cache-junk-capped"),
        &["--max-disk-size", "1Gi"],
    );
    check(
        "a 3 GiB unused entry, disks capped at 1 GiB",
        ok,
        &stderr,
        peak,
        Some("inflates to more than"),
    );
    // A PAX extension header claiming 1 GiB ahead of the disk (1 MiB of gzip): the tar crate
    // would hold it whole before yielding the entry; refused at 1 MiB.
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    let mut pax = tar::Header::new_ustar();
    pax.set_path("PaxHeaders/disk.img").unwrap();
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_size(1 << 30);
    pax.set_mode(0o644);
    pax.set_cksum();
    builder
        .append(&pax, std::io::repeat(b'1').take(1 << 30))
        .unwrap();
    let mut file = std::fs::File::open(&disk).unwrap();
    builder.append_file("disk/disk.img", &mut file).unwrap();
    let blob = builder.into_inner().unwrap().finish().unwrap();
    let (reference, _) = push_blobs(&registry, "hostile/pax", "1g", vec![(blob, TAR_GZIP)]).await;
    let (ok, stderr, peak) = warm(&reference, &work.path().join("cache-pax"), &[]);
    check(
        "a 1 GiB PAX extension header",
        ok,
        &stderr,
        peak,
        Some("tar extension headers (GNU long names, PAX records) over 1048576 bytes"),
    );
    // A VMDK whose grain directory is 512 MiB (a 32 TiB disk of 512-byte grains), the file
    // extended with zeros so that the directory lies inside it.
    let v = vmdk_with_a_huge_grain_directory(work.path());
    let blob = layer(&[("disk/disk.vmdk", &v)]);
    let (reference, _) = push_blobs(&registry, "hostile/vmdk", "gd", vec![(blob, TAR_GZIP)]).await;
    let (ok, stderr, peak) = warm(
        &reference,
        &work.path().join("cache-vmdk"),
        &["--max-disk-size", "64Ti"],
    );
    check(
        "VMDK with a 512 MiB grain directory",
        ok,
        &stderr,
        peak,
        Some("over the 32 MiB any image needs"),
    );
    std::fs::remove_file(&v).unwrap();
    for line in report {
        println!("{line}");
    }
}

/// A monolithicSparse VMDK whose header claims a 32 TiB disk of 512-byte grains: a grain
/// directory of 2^27 entries (512 MiB), which the file (zeros past qemu-img's header) holds.
fn vmdk_with_a_huge_grain_directory(dir: &Path) -> PathBuf {
    let v = dir.join("huge-gd.vmdk");
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
        ])
        .arg(&v)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let f = std::fs::OpenOptions::new().write(true).open(&v).unwrap();
    f.write_all_at(&(1u64 << 36).to_le_bytes(), 12).unwrap(); // capacity, sectors
    f.write_all_at(&1u64.to_le_bytes(), 20).unwrap(); // grain size, sectors
    f.set_len(600 << 20).unwrap();
    v
}

/// A disk larger than the free space of a small filesystem: the warm fails with the
/// filesystem's own words, keeps nothing of it, and the entry already cached there stays
/// whole; the next warm on that cache works.
#[tokio::test]
async fn a_disk_larger_than_the_free_space_fails_cleanly_and_keeps_what_was_cached() {
    let work = tempfile::tempdir().unwrap();
    let fs = match LoopMount::ext4(work.path(), 48) {
        Ok(fs) => fs,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let registry = TestRegistry::start_plain();
    let cache = fs.path.join("cache");
    let small = make_ext4_raw(work.path(), "kept", 8, 2, 11);
    let (kept, _) = push_container_disk(&registry, "full/kept", "1", &small).await;
    // 64 MiB, 40 MiB of it data that does not compress: more than the filesystem has.
    let big = make_ext4_raw(work.path(), "big", 64, 40, 12);
    let (too_big, _) = push_container_disk(&registry, "full/big", "1", &big).await;
    let other = make_ext4_raw(work.path(), "after", 8, 2, 13);
    let (after, _) = push_container_disk(&registry, "full/after", "1", &other).await;
    // The budget is no limit here: the free space is.
    let budget = ["--budget", "1Ti"];
    let (ok, stderr, _) = warm(&kept, &cache, &budget);
    assert!(ok, "{stderr}");
    let (ok, stderr, peak) = warm(&too_big, &cache, &budget);
    println!(
        "full disk: refused in {:.1} MiB peak RSS ({})",
        peak as f64 / 1024.0,
        stderr.trim().lines().last().unwrap_or("")
    );
    assert!(!ok, "a disk larger than the filesystem was warmed");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let staging: Vec<_> = std::fs::read_dir(cache.join("staging"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "left in staging: {staging:?}");
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("entries"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        same_content(&small, &entries[0].join("disk.raw")),
        "the entry cached before is intact"
    );
    let (ok, stderr, _) = warm(&after, &cache, &budget);
    assert!(ok, "the cache keeps serving: {stderr}");
}
