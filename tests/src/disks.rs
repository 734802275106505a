//! Real VM disks made at test time: ext4 filesystems with data and holes (`mkfs.ext4 -d`),
//! converted with qemu-img.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fills `buf` with bytes from a xorshift generator: incompressible, deterministic.
pub fn pseudo_random(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw disk of `size_mib` holding an ext4 filesystem with about `data_mib` of files: half
/// incompressible, half text, so layers compress like real disks.
pub fn make_ext4_raw(dir: &Path, name: &str, size_mib: u64, data_mib: u64, seed: u64) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    std::fs::create_dir_all(tree.join("var/data")).unwrap();
    std::fs::write(tree.join("etc-hostname"), format!("{name}\n")).unwrap();
    let mut left = data_mib << 20;
    let mut i = 0u64;
    let mut buf = vec![0u8; 4 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if i.is_multiple_of(2) {
            pseudo_random(seed.wrapping_add(i), &mut buf[..n]);
        } else {
            let line = format!("line {i} of {name}: the quick brown fox jumps over the lazy dog\n");
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = line.as_bytes()[j % line.len()];
            }
        }
        let mut f = std::fs::File::create(tree.join(format!("var/data/file{i}"))).unwrap();
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
        i += 1;
    }
    let raw = dir.join(format!("{name}.raw"));
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            "-d",
        ])
        .arg(&tree)
        .arg(&raw)
        .arg(format!("{size_mib}M")));
    std::fs::remove_dir_all(&tree).unwrap();
    raw
}

/// Converts a raw disk to `format` (`qcow2`, `vmdk`); `compressed` makes a compressed qcow2
/// or a streamOptimized (compressed) VMDK.
pub fn to_format(raw: &Path, format: &str, compressed: bool) -> PathBuf {
    let suffix = if compressed { "c" } else { "" };
    let out = raw.with_extension(format!("{suffix}{format}"));
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    match (compressed, format) {
        (true, "vmdk") => cmd.args(["-o", "subformat=streamOptimized"]),
        (true, _) => cmd.arg("-c"),
        _ => &mut cmd,
    };
    cmd.args(["-O", format]).arg(raw).arg(&out);
    run(&mut cmd);
    out
}

/// Bytes a file occupies on disk.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `qemu-img compare`: same content?
pub fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
