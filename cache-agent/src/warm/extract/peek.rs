//! A containerDisk's format and virtual size from the first bytes of its layer, without
//! pulling it: the layer is inflated as far as those bytes go, its tar entries are walked to
//! `disk/<name>`, and the disk's header says the rest (raw: the entry's size). The image
//! controller sizes volumes this way before any node has warmed the image. Bounded whatever the
//! bytes claim: they are at most what the caller fetched, and at most
//! [`MAX_PEEK_INFLATED_BYTES`] are inflated from them.

use std::io::Read;

use thiserror::Error;

use super::paths::{normalise, place, Place};
use super::LayerCompression;
use crate::warm::decode::{self, qcow2, vmdk, DecodeError, Layout, MAX_HEADER_BYTES};

/// How much of a layer is inflated at most while looking for the disk: entries before it are
/// skipped by reading through them.
pub const MAX_PEEK_INFLATED_BYTES: u64 = 64 << 20;

/// What the start of a layer says about its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskPeek {
    /// `raw`, `qcow2` or `vmdk`, as qemu-img names them.
    pub source_format: &'static str,
    pub virtual_size: u64,
}

#[derive(Debug, Error)]
pub enum PeekError {
    #[error("the layer's first bytes end before the disk's header (fetch more, or warm it)")]
    Truncated,
    #[error("no disk/ file in the layer's first bytes")]
    NoDisk,
    #[error("the disk is {0}: its size is known once a node has converted it")]
    Unsupported(&'static str),
    #[error("the layer's first bytes do not reach the disk: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Header(#[from] DecodeError),
}

/// Looks for the disk in `start`, the first bytes of a layer compressed as `compression`.
pub fn peek_disk(start: &[u8], compression: LayerCompression) -> Result<DiskPeek, PeekError> {
    let inflated: Box<dyn Read + '_> = match compression {
        LayerCompression::None => Box::new(start),
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(start)),
        LayerCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(start)
                .map_err(|e| PeekError::Unreadable(e.to_string()))?,
        ),
    };
    let mut archive = tar::Archive::new(inflated.take(MAX_PEEK_INFLATED_BYTES));
    let entries = archive.entries().map_err(read_error)?;
    for entry in entries {
        let mut entry = entry.map_err(read_error)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_contiguous()) {
            continue;
        }
        let parts =
            normalise(0, &entry.path_bytes()).map_err(|e| PeekError::Unreadable(e.to_string()))?;
        if !matches!(place(&parts), Place::Disk(_)) {
            continue;
        }
        let size = entry.size();
        // Only as much as the header needs: the disk's data after it may not be in the
        // fetched bytes.
        let mut head = Vec::new();
        read_up_to(&mut entry, &mut head, 512)?;
        let needed = decode::header_bytes_needed(&head).unwrap_or(512);
        read_up_to(&mut entry, &mut head, needed.min(MAX_HEADER_BYTES))?;
        return disk_from_header(&head, size);
    }
    Err(PeekError::NoDisk)
}

/// The disk whose file is `size` bytes and starts with `head` (at least its header, or the
/// whole file when smaller).
fn disk_from_header(head: &[u8], size: u64) -> Result<DiskPeek, PeekError> {
    let complete = |needed: usize| head.len() >= needed.min(size as usize);
    if let Some(needed) = qcow2::header_bytes_needed(head) {
        if !complete(needed) {
            return Err(PeekError::Truncated);
        }
        let header = qcow2::parse_header(head, size)?;
        return Ok(DiskPeek {
            source_format: "qcow2",
            virtual_size: header.virtual_size,
        });
    }
    if let Some(needed) = vmdk::header_bytes_needed(head) {
        if !complete(needed) {
            return Err(PeekError::Truncated);
        }
        let layout = vmdk::VmdkLayout::parse(head, size)?;
        return Ok(DiskPeek {
            source_format: "vmdk",
            virtual_size: layout.virtual_size(),
        });
    }
    if head.len() < 512.min(size as usize) {
        return Err(PeekError::Truncated);
    }
    for (magic, format) in [
        (&b"vhdxfile"[..], "vhdx"),
        (b"conectix", "vpc"),
        (b"# Disk DescriptorFile", "vmdk"),
    ] {
        if head.starts_with(magic) {
            return Err(PeekError::Unsupported(format));
        }
    }
    Ok(DiskPeek {
        source_format: "raw",
        virtual_size: size,
    })
}

/// Reads from `entry` until `head` holds `n` bytes or the entry ends.
fn read_up_to(entry: &mut impl Read, head: &mut Vec<u8>, n: usize) -> Result<(), PeekError> {
    let missing = n.saturating_sub(head.len()) as u64;
    entry
        .take(missing)
        .read_to_end(head)
        .map(|_| ())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => PeekError::Truncated,
            _ => read_error(e),
        })
}

/// A prefix cut anywhere ends the inflater and the tar reader in many ways; the warm path,
/// which reads the whole layer, says which were real damage.
fn read_error(e: std::io::Error) -> PeekError {
    PeekError::Unreadable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warm::decode::tests::qemu_img;
    use std::io::Write;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data).unwrap();
        }
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&b.into_inner().unwrap()).unwrap();
        e.finish().unwrap()
    }

    /// A `size` disk in `format`, converted by qemu-img from a raw one holding some data.
    fn image(format: &str, options: &[&str], size: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let path = dir.path().join("disk");
        qemu_img(&["create", "-f", "raw", raw.to_str().unwrap(), size]);
        // Data that does not compress: a prefix holds little more of the disk than its header.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all(&data).unwrap();
        let mut args = vec!["convert", "-O", format];
        args.extend_from_slice(options);
        args.extend([raw.to_str().unwrap(), path.to_str().unwrap()]);
        qemu_img(&args);
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn raw_qcow2_and_vmdk_disks_are_sized_from_a_64_kib_prefix() {
        let raw = vec![7u8; 3 << 20];
        let qcow2 = image("qcow2", &[], "20G");
        let vmdk = image("vmdk", &["-o", "subformat=streamOptimized"], "3G");
        for (bytes, format, size) in [
            (&raw, "raw", 3u64 << 20),
            (&qcow2, "qcow2", 20 << 30),
            (&vmdk, "vmdk", 3 << 30),
        ] {
            let blob = layer(&[("disk/", b""), ("./disk/disk.img", bytes)]);
            let start = &blob[..blob.len().min(64 << 10)];
            let peek = peek_disk(start, LayerCompression::Gzip).unwrap();
            assert_eq!(peek.source_format, format);
            assert_eq!(peek.virtual_size, size, "{format}");
        }
    }

    #[test]
    fn a_prefix_short_of_the_header_or_of_the_disk_says_so() {
        let qcow2 = image("qcow2", &[], "1G");
        let blob = layer(&[("disk/disk.qcow2", &qcow2)]);
        assert!(matches!(
            peek_disk(&blob[..100], LayerCompression::Gzip),
            Err(PeekError::Unreadable(_) | PeekError::Truncated)
        ));
        let blob = layer(&[("etc/motd", b"hello"), ("README", b"no disk here")]);
        assert!(matches!(
            peek_disk(&blob, LayerCompression::Gzip),
            Err(PeekError::NoDisk)
        ));
    }

    #[test]
    fn formats_only_qemu_img_reads_are_unknown_until_converted() {
        let vhdx = image("vhdx", &[], "1G");
        let blob = layer(&[("disk/disk.vhdx", &vhdx)]);
        assert!(matches!(
            peek_disk(&blob, LayerCompression::Gzip),
            Err(PeekError::Unsupported("vhdx"))
        ));
    }

    #[test]
    fn a_hostile_header_is_refused_and_a_zero_bomb_before_the_disk_stops_early() {
        let mut qcow2 = image("qcow2", &[], "1G");
        qcow2[20..24].copy_from_slice(&40u32.to_be_bytes()); // cluster_bits 40
        let blob = layer(&[("disk/disk.qcow2", &qcow2)]);
        assert!(matches!(
            peek_disk(&blob, LayerCompression::Gzip),
            Err(PeekError::Header(_))
        ));
        // 256 MiB of zeros (256 KiB gzipped) ahead of the disk: inflating stops at the cap.
        let zeros = vec![0u8; 256 << 20];
        let blob = layer(&[("junk", &zeros), ("disk/disk.img", b"tiny")]);
        assert!(blob.len() < 2 << 20);
        assert!(peek_disk(&blob, LayerCompression::Gzip).is_err());
    }
}
