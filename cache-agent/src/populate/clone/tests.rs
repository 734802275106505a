//! Clones on real files (sparse, zero-filled, odd lengths, longer targets), both copy paths,
//! holes on a stand-in device, a loop device when one can be attached, and bad paths.

use super::extents::ZERO_BLOCK;
use super::*;
use crate::populate::loop_device::LoopDevice;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const CHUNK: usize = 256 << 10;

/// A sparse file of `size` bytes with `CHUNK` bytes of data at each offset.
fn sparse_file(path: &Path, size: u64, data_at: &[u64]) -> PathBuf {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, off) in data_at.iter().enumerate() {
        let len = CHUNK.min((size - off) as usize);
        f.write_all_at(&vec![i as u8 + 1; len], *off).unwrap();
    }
    path.to_path_buf()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn sparse_copy_is_identical_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_file(
        &dir.path().join("src"),
        64 << 20,
        &[0, 10 << 20, 40 << 20, 63 << 20],
    );
    let dst = dir.path().join("dst");
    let r = clone_disk(&src, &dst, None).unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!((r.source_size, r.target_size), (64 << 20, 64 << 20));
    let (a_src, a_dst) = (allocated(&src), allocated(&dst));
    assert!(
        a_dst <= a_src + (1 << 20),
        "target not sparse: {a_dst} allocated, source {a_src}"
    );
    if r.method == CloneMethod::SparseCopy {
        assert_eq!(r.bytes_written, 4 * CHUNK as u64);
    }
}

/// Copies the first `size` bytes of `src` to a new file `dst` with a [`Copier`], the kernel's
/// copy first when `in_kernel`; returns whether the kernel's copy was still in use at the end,
/// and the bytes written.
fn copy_by(src: &Path, dst: &Path, in_kernel: bool, size: u64) -> (bool, u64) {
    let source = File::open(src).unwrap();
    let target = File::create(dst).unwrap();
    let mut copier = Copier::new(&source, &target, in_kernel, false);
    assert!(copier.copy(size).is_ok());
    target.set_len(size).unwrap();
    (copier.use_copy_file_range, copier.written)
}

#[test]
fn both_copy_paths_are_identical_and_only_memory_skips_zero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // Fully allocated, but mostly zeros: a disk written without holes.
    let src = dir.path().join("src");
    let mut content = vec![0u8; 8 << 20];
    content[3 << 20..(3 << 20) + 100].fill(7);
    content[(8 << 20) - 1] = 9;
    std::fs::write(&src, &content).unwrap();
    for use_copy_file_range in [true, false] {
        let dst = dir.path().join(format!("dst-{use_copy_file_range}"));
        let (in_kernel, written) = copy_by(&src, &dst, use_copy_file_range, 8 << 20);
        assert_eq!(std::fs::read(&dst).unwrap(), content);
        if in_kernel {
            // The kernel copied the whole extent: as allocated as the source.
            assert_eq!(written, 8 << 20);
        } else {
            assert_eq!(
                written,
                2 * ZERO_BLOCK as u64,
                "only the two non-zero blocks"
            );
            assert!(
                allocated(&dst) <= 2 * ZERO_BLOCK as u64,
                "zero blocks became holes: {}",
                allocated(&dst)
            );
        }
    }
}

#[test]
fn a_copy_of_many_writeback_steps_is_identical_by_both_paths() {
    // 40 MiB of data in one extent: writeback is started and waited for step by step (16 MiB
    // each), ending with a part step; every byte must arrive whichever way it is copied.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content: Vec<u8> = (0..40u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    std::fs::write(&src, &content).unwrap();
    for use_copy_file_range in [true, false] {
        let dst = dir.path().join(format!("dst-{use_copy_file_range}"));
        let (_, written) = copy_by(&src, &dst, use_copy_file_range, 40 << 20);
        assert_eq!(written, 40 << 20);
        assert!(
            std::fs::read(&dst).unwrap() == content,
            "{use_copy_file_range}"
        );
    }
}

#[test]
fn target_grows_to_the_requested_size_with_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_file(&dir.path().join("src"), 8 << 20, &[1 << 20]);
    let dst = dir.path().join("dst");
    let r = clone_disk(&src, &dst, Some(32 << 20)).unwrap();
    assert_eq!(r.target_size, 32 << 20);
    let out = std::fs::read(&dst).unwrap();
    assert_eq!(out.len(), 32 << 20);
    assert_eq!(&out[..8 << 20], &std::fs::read(&src).unwrap()[..]);
    assert!(out[8 << 20..].iter().all(|&b| b == 0));
    assert!(allocated(&dst) < 2 << 20, "the growth is a hole");
    // A smaller requested size never truncates the disk.
    let r = clone_disk(&src, &dst, Some(1 << 20)).unwrap();
    assert_eq!(r.target_size, 8 << 20);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 8 << 20);
}

#[test]
fn data_up_to_eof_and_a_trailing_hole_both_survive() {
    let dir = tempfile::tempdir().unwrap();
    let ends_in_data = sparse_file(&dir.path().join("a"), 4 << 20, &[(4 << 20) - CHUNK as u64]);
    let ends_in_hole = sparse_file(&dir.path().join("b"), 4 << 20, &[0]);
    // Odd length: the last data block is partial.
    let odd = sparse_file(&dir.path().join("c"), (4 << 20) + 1000, &[4 << 20]);
    for src in [ends_in_data, ends_in_hole, odd] {
        let dst = dir.path().join("dst");
        clone_disk(&src, &dst, None).unwrap();
        assert_eq!(
            std::fs::read(&dst).unwrap(),
            std::fs::read(&src).unwrap(),
            "{}",
            src.display()
        );
    }
}

#[test]
fn an_existing_longer_target_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_file(&dir.path().join("src"), 4 << 20, &[0]);
    let dst = dir.path().join("dst");
    std::fs::write(&dst, vec![0xAA; 6 << 20]).unwrap();
    clone_disk(&src, &dst, None).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn zeroing_holes_overwrites_stale_bytes_and_skipping_keeps_them() {
    // The block-device path on a file that stands in for a used device.
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_file(&dir.path().join("src"), 4 << 20, &[1 << 20]);
    let expected = std::fs::read(&src).unwrap();
    for zero_holes in [true, false] {
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0xAA; 6 << 20]).unwrap();
        let source = File::open(&src).unwrap();
        let target = OpenOptions::new().write(true).open(&dev).unwrap();
        assert!(Copier::new(&source, &target, false, zero_holes)
            .copy(4 << 20)
            .is_ok());
        let out = std::fs::read(&dev).unwrap();
        assert_eq!(out.len(), 6 << 20, "never truncated");
        assert!(
            out[4 << 20..].iter().all(|&b| b == 0xAA),
            "beyond the disk stays untouched"
        );
        assert_eq!(
            &out[1 << 20..(1 << 20) + CHUNK],
            &expected[1 << 20..(1 << 20) + CHUNK]
        );
        assert_eq!(
            out[..4 << 20] == expected[..],
            zero_holes,
            "zero_holes={zero_holes}"
        );
    }
}

#[test]
fn block_device_gets_data_in_place_and_is_never_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::write(&backing, vec![0xAA; 8 << 20]).unwrap();
    let device = match LoopDevice::attach(&backing) {
        Ok(d) => d,
        Err(reason) => {
            eprintln!("skipping the block-device test: {reason}");
            return;
        }
    };
    let dev = device.path();
    let src = sparse_file(
        &dir.path().join("src"),
        4 << 20,
        &[1 << 20, (4 << 20) - CHUNK as u64],
    );
    let expected = std::fs::read(&src).unwrap();

    let r = clone_disk_with(
        &src,
        dev,
        Some(64 << 20),
        CloneOptions {
            zero_holes_on_block: false,
        },
    )
    .unwrap();
    assert_eq!(
        (r.method, r.target_size, r.bytes_written),
        (CloneMethod::SparseCopy, 8 << 20, 2 * CHUNK as u64)
    );
    let out = std::fs::read(dev).unwrap();
    assert_eq!(out.len(), 8 << 20);
    assert_eq!(
        &out[1 << 20..(1 << 20) + CHUNK],
        &expected[1 << 20..(1 << 20) + CHUNK]
    );
    assert!(
        out[..1 << 20].iter().all(|&b| b == 0xAA),
        "holes left alone on a known-zeroed device"
    );

    let r = clone_disk(&src, dev, None).unwrap();
    assert_eq!(r.bytes_written, 4 << 20);
    let out = std::fs::read(dev).unwrap();
    assert_eq!(&out[..4 << 20], &expected[..]);
    assert!(
        out[4 << 20..].iter().all(|&b| b == 0xAA),
        "beyond the disk is untouched"
    );
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8 << 20);

    let big = sparse_file(&dir.path().join("big"), 16 << 20, &[0]);
    let err = clone_disk(&big, dev, None).unwrap_err();
    assert!(
        matches!(&err, CloneError::TargetTooSmall { target_size, disk_size, .. } if *target_size == 8 << 20 && *disk_size == 16 << 20),
        "{err}"
    );
}

#[test]
fn bad_paths_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = clone_disk(&dir.path().join("nope"), &dir.path().join("d"), None).unwrap_err();
    assert!(
        matches!(&err, CloneError::Io { context, .. } if context.contains("opening") && context.contains("nope")),
        "{err}"
    );

    let src = sparse_file(&dir.path().join("src"), 1 << 20, &[0]);
    let err = clone_disk(&src, &dir.path().join("missing-dir/d"), None).unwrap_err();
    assert!(err.to_string().contains("missing-dir"), "{err}");

    let err = clone_disk(&src, dir.path(), None).unwrap_err();
    assert!(
        matches!(err, CloneError::Io { .. }),
        "a directory target: {err}"
    );

    let before = std::fs::read(&src).unwrap();
    let err = clone_disk(&src, &src, None).unwrap_err();
    assert!(matches!(err, CloneError::SameFile { .. }), "{err}");
    assert_eq!(
        std::fs::read(&src).unwrap(),
        before,
        "the source is untouched"
    );
}
