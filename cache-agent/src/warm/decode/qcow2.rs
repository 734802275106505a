//! qcow2's layout for the streaming [`Decoder`](super::Decoder): the header, the L1 table it
//! points to, the L2 tables the L1 names, and the plain or compressed (zlib, zstd) clusters
//! those map. Only the active L1 is read: snapshots' tables and refcounts are skipped.
//!
//! The header is checked like `convert::check_safe` checks `qemu-img info`; extended L2
//! entries and unknown incompatible features go to `qemu-img convert`.

use std::io::Read;

use super::{DecodeError, Io, Layout};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Bits 9..55 of a table entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn corrupt(message: impl Into<String>) -> DecodeError {
    DecodeError::corrupt("qcow2", message)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// What the decoder needs from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub compression: Compression,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// Bytes needed to see the whole header and its extensions: the first cluster.
pub fn header_bytes_needed(first_bytes: &[u8]) -> Option<usize> {
    (first_bytes.len() >= 24 && &first_bytes[..4] == MAGIC).then(|| {
        let bits = be32(first_bytes, 20).clamp(9, 21);
        1usize << bits
    })
}

/// Parses and checks the header from the file's first cluster (or the whole file, if
/// smaller). `file_len` bounds every offset.
pub fn parse_header(first: &[u8], file_len: u64) -> Result<Header, DecodeError> {
    if first.len() < 72 || &first[..4] != MAGIC {
        return Err(corrupt("not a qcow2 header"));
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return Err(DecodeError::Unsupported(format!("qcow2 version {version}")));
    }
    let backing_offset = be64(first, 8);
    if backing_offset != 0 {
        let len = be32(first, 16) as usize;
        let name = first
            .get(backing_offset as usize..backing_offset as usize + len)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "(outside the first cluster)".into());
        return Err(DecodeError::BackingFile(name));
    }
    let cluster_bits = be32(first, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(format!("cluster_bits {cluster_bits}")));
    }
    let virtual_size = be64(first, 24);
    if be32(first, 32) != 0 {
        return Err(DecodeError::Encrypted);
    }
    let l1_size = be32(first, 36);
    let l1_offset = be64(first, 40);
    let cluster = 1u64 << cluster_bits;
    let mut compression = Compression::Zlib;
    let mut extensions_at = 72usize;
    if version == 3 {
        if first.len() < 104 {
            return Err(corrupt("short version 3 header"));
        }
        let incompatible = be64(first, 72);
        if incompatible & 0b10 != 0 {
            return Err(corrupt("the image is marked corrupt"));
        }
        if incompatible & 0b100 != 0 {
            return Err(DecodeError::DataFile);
        }
        if incompatible & 0b1_0000 != 0 {
            return Err(DecodeError::Unsupported(
                "qcow2 with extended L2 entries".into(),
            ));
        }
        if incompatible & !0b1_1111 != 0 {
            return Err(DecodeError::Unsupported(format!(
                "qcow2 with incompatible features {incompatible:#x}"
            )));
        }
        let header_length = be32(first, 100) as usize;
        if header_length < 104 || header_length > first.len() {
            return Err(corrupt(format!("header length {header_length}")));
        }
        if incompatible & 0b1000 != 0 {
            if header_length <= 104 {
                return Err(corrupt("compression type bit without a compression type"));
            }
            compression = match first[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(DecodeError::Unsupported(format!(
                        "qcow2 compression type {other}"
                    )))
                }
            };
        }
        extensions_at = header_length.div_ceil(8) * 8;
    }
    // Header extensions: an external data file or encryption is refused whatever the bits say.
    let mut at = extensions_at;
    while at + 8 <= first.len() {
        let kind = be32(first, at);
        let len = be32(first, at + 4) as usize;
        match kind {
            0 => break,
            0x4441_5441 => return Err(DecodeError::DataFile),
            0x0537_be77 => return Err(DecodeError::Encrypted),
            _ => {}
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let l2_entries = cluster / 8;
    let needed_l1 = virtual_size.div_ceil(cluster * l2_entries);
    if u64::from(l1_size) < needed_l1 {
        return Err(corrupt(format!(
            "L1 table of {l1_size} entries for a disk that needs {needed_l1}"
        )));
    }
    // qemu refuses an active L1 table over 32 MiB ("Active L1 table too large"); so does
    // vmdisk, before reserving anything for it.
    if u64::from(l1_size) * 8 > super::MAX_RANGE_BYTES {
        return Err(corrupt(format!(
            "L1 table of {l1_size} entries, over qemu's limit of {} MiB",
            super::MAX_RANGE_BYTES >> 20
        )));
    }
    if !l1_offset.is_multiple_of(cluster) || l1_offset + u64::from(l1_size) * 8 > file_len {
        return Err(corrupt(format!("L1 table at {l1_offset} outside the file")));
    }
    Ok(Header {
        version,
        cluster_bits,
        virtual_size,
        l1_size,
        l1_offset,
        compression,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    L1,
    L2 { guest_base: u64 },
    Data { guest: u64 },
    Compressed { guest: u64 },
}

/// qcow2's tables and clusters, as the [`Decoder`](super::Decoder) serves them.
pub struct Qcow2Layout {
    header: Header,
    /// L2 tables still to arrive; `None` until the L1 table has been read.
    l2_left: Option<usize>,
    scratch: Vec<u8>,
}

impl Qcow2Layout {
    pub fn new(header: Header) -> Self {
        Self {
            scratch: vec![0; header.cluster_size() as usize],
            header,
            l2_left: None,
        }
    }

    fn inflate(&mut self, at: u64, bytes: &[u8], io: &Io<Kind>) -> Result<usize, DecodeError> {
        let out = &mut self.scratch[..];
        let broken =
            |e: &dyn std::fmt::Display| io.corrupt(format!("compressed cluster at {at}: {e}"));
        match self.header.compression {
            Compression::Zlib => {
                let mut inflate = flate2::Decompress::new(false);
                inflate
                    .decompress(bytes, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| broken(&e))?;
                Ok(inflate.total_out() as usize)
            }
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::with_buffer(bytes)
                    .map_err(|e| broken(&e))?
                    .single_frame();
                let mut n = 0;
                while n < out.len() {
                    match decoder.read(&mut out[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => return Err(broken(&e)),
                    }
                }
                Ok(n)
            }
        }
    }
}

impl Layout for Qcow2Layout {
    type Kind = Kind;
    const FORMAT: &'static str = "qcow2";

    fn start(&mut self, io: &mut Io<Kind>) -> Result<(), DecodeError> {
        // Only the entries the disk's size can use: the rest are never read.
        let cluster = self.header.cluster_size();
        let used = self.header.virtual_size.div_ceil(cluster * (cluster / 8));
        let l1_len = u64::from(self.header.l1_size).min(used) * 8;
        io.want(Kind::L1, self.header.l1_offset, l1_len)
    }

    fn process(
        &mut self,
        kind: Kind,
        at: u64,
        bytes: &[u8],
        io: &mut Io<Kind>,
    ) -> Result<(), DecodeError> {
        let cluster = self.header.cluster_size();
        let size = self.header.virtual_size;
        match kind {
            Kind::L1 => {
                let mut tables = 0;
                let l2_span = cluster * (cluster / 8);
                for (i, entry) in bytes.chunks_exact(8).enumerate() {
                    let offset = be64(entry, 0) & OFFSET_MASK;
                    let guest_base = i as u64 * l2_span;
                    if offset == 0 || guest_base >= size {
                        continue; // unallocated, or beyond the disk: never read
                    }
                    if !offset.is_multiple_of(cluster) {
                        return Err(io.corrupt(format!("L2 table at unaligned offset {offset}")));
                    }
                    tables += 1;
                    io.want(Kind::L2 { guest_base }, offset, cluster)?;
                }
                self.l2_left = Some(tables + self.l2_left.unwrap_or(0));
            }
            Kind::L2 { guest_base } => {
                for (j, entry) in bytes.chunks_exact(8).enumerate() {
                    let entry = be64(entry, 0);
                    let guest = guest_base + j as u64 * cluster;
                    if guest >= size {
                        break;
                    }
                    if entry & (1 << 62) != 0 {
                        let x = 62 - (self.header.cluster_bits - 8);
                        let offset = entry & ((1u64 << x) - 1);
                        let sectors = (entry & ((1u64 << 62) - 1)) >> x;
                        // The stored length is rounded to sectors and may run past the end.
                        let len = ((sectors + 1) * 512 - (offset % 512))
                            .min(io.file_len().saturating_sub(offset));
                        io.want(Kind::Compressed { guest }, offset, len)?;
                    } else {
                        let offset = entry & OFFSET_MASK;
                        if entry & 1 != 0 || offset == 0 {
                            continue; // zeros, or unallocated without a backing file: a hole
                        }
                        if !offset.is_multiple_of(cluster) {
                            return Err(
                                io.corrupt(format!("data cluster at unaligned offset {offset}"))
                            );
                        }
                        io.want(Kind::Data { guest }, offset, cluster.min(size - guest))?;
                    }
                }
                if let Some(left) = self.l2_left.as_mut() {
                    *left = left.saturating_sub(1);
                }
            }
            Kind::Data { guest } => io.write(guest, bytes)?,
            Kind::Compressed { guest } => {
                let len = cluster.min(size - guest) as usize;
                let produced = self.inflate(at, bytes, io)?;
                if produced < len {
                    return Err(io.corrupt(format!(
                        "compressed cluster at {at} holds {produced} bytes, not {len}"
                    )));
                }
                io.write(guest, &self.scratch[..len])?;
            }
        }
        Ok(())
    }

    /// A compressed range is rounded up to a whole sector, and the next compressed cluster
    /// (maybe mapped by an L2 table still to come) may start in that last sector.
    fn shared_tail(kind: Kind) -> u64 {
        match kind {
            Kind::Compressed { .. } => 512,
            _ => 0,
        }
    }

    fn mapping_complete(&self) -> bool {
        self.l2_left == Some(0)
    }

    fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warm::decode::tests::{decode, qemu_img, roundtrip, source};

    #[test]
    fn plain_and_compressed_images_of_every_cluster_size_match_qemu_img() {
        for create in [
            &[][..],
            &["-c"],
            &["-o", "cluster_size=4096"],
            &["-c", "-o", "cluster_size=512"],
            &["-o", "cluster_size=2M"],
            &["-o", "compat=0.10"],
            &["-c", "-o", "compat=0.10"],
            &["-c", "-o", "compression_type=zstd"],
        ] {
            roundtrip("qcow2", create, |_| {});
        }
    }

    #[test]
    fn metadata_after_the_data_it_maps_is_decoded_through_the_spool() {
        // Growing the disk moves the L1 table to the end of the file, after every L2 table's
        // data; a snapshot adds tables and shared clusters.
        roundtrip("qcow2", &[], |q| {
            qemu_img(&["resize", &q.display().to_string(), "+512M"])
        });
        roundtrip("qcow2", &["-c"], |q| {
            qemu_img(&["snapshot", "-c", "snap", &q.display().to_string()]);
            qemu_img(&["resize", &q.display().to_string(), "+64M"]);
        });
    }

    /// Header fields patched in place: big-endian `u32` or `u64` at `offset`.
    fn patch(path: &std::path::Path, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    #[test]
    fn tables_larger_than_qemu_allows_are_refused_before_anything_is_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("h.qcow2");
        qemu_img(&["create", "-f", "qcow2", &q.display().to_string(), "64M"]);
        let l1_offset = {
            let first = std::fs::read(&q).unwrap();
            be64(&first, 40)
        };
        // The header asks for an L1 table of 1 GiB (the file is long enough to hold it: a
        // gzip layer of zeros is ~1000:1). qemu refuses tables over 32 MiB; so does vmdisk.
        let entries: u32 = (1 << 30) / 8;
        patch(&q, 36, &entries.to_be_bytes());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&q)
            .unwrap()
            .set_len(l1_offset + (1 << 30))
            .unwrap();
        let first = std::fs::read(&q).unwrap();
        match parse_header(&first[..65536], first.len() as u64) {
            Err(DecodeError::Corrupt { message, .. }) => {
                assert!(message.contains("over qemu's limit of 32 MiB"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_oversized_but_allowed_l1_table_is_read_only_as_far_as_the_disk_needs() {
        // 32 MiB of L1 entries for a 6 MiB disk: qemu accepts it, and only the first entry
        // is ever read (the decoder asks for 8 bytes, not 32 MiB).
        roundtrip("qcow2", &[], |q| {
            let l1_offset = be64(&std::fs::read(q).unwrap(), 40);
            patch(q, 36, &((32u32 << 20) / 8).to_be_bytes());
            std::fs::OpenOptions::new()
                .write(true)
                .open(q)
                .unwrap()
                .set_len(l1_offset + (32 << 20))
                .unwrap();
        });
    }

    #[test]
    fn one_table_named_by_every_entry_is_refused_not_held_many_times() {
        let dir = tempfile::tempdir().unwrap();
        let raw = source(dir.path(), 2);
        let q = dir.path().join("m.qcow2");
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            &raw.display().to_string(),
            &q.display().to_string(),
        ]);
        let first = std::fs::read(&q).unwrap();
        let l1_offset = be64(&first, 40);
        let l2 = &first[l1_offset as usize..l1_offset as usize + 8];
        // 1 TiB of disk mapped by 2,048 L1 entries, all naming the same L2 table: 2,048
        // copies of one 64 KiB cluster would be held while it streams by.
        patch(&q, 24, &(1u64 << 40).to_be_bytes());
        patch(&q, 36, &2048u32.to_be_bytes());
        // The L1 table stays where qemu put it, before the tables: each entry's want is
        // registered before the L2 table streams by. (Its cluster holds 8,192 entries.)
        let table: Vec<u8> = l2.iter().copied().cycle().take(2048 * 8).collect();
        patch(&q, l1_offset, &table);
        match decode(&q, dir.path()) {
            Err(DecodeError::Corrupt { message, .. }) => {
                assert!(message.contains("asked for many times over"), "{message}")
            }
            other => panic!("{:?}", other.map(|o| o.map(|v| v.len()))),
        }
    }

    #[test]
    fn unsafe_and_unsupported_headers_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("b.qcow2");
        let q_s = q.display().to_string();
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            &q_s,
            "16M",
        ]);
        assert!(
            matches!(decode(&q, dir.path()), Err(DecodeError::BackingFile(p)) if p == "/etc/shadow")
        );
        let data_file = dir.path().join("x.raw").display().to_string();
        let option = format!("data_file={data_file},data_file_raw=on");
        qemu_img(&["create", "-f", "qcow2", "-o", &option, &q_s, "16M"]);
        assert!(matches!(decode(&q, dir.path()), Err(DecodeError::DataFile)));
        qemu_img(&["create", "-f", "qcow2", "-o", "extended_l2=on", &q_s, "16M"]);
        assert!(matches!(
            decode(&q, dir.path()),
            Err(DecodeError::Unsupported(_))
        ));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s",
            &q_s,
            "16M",
        ]);
        assert!(matches!(
            decode(&q, dir.path()),
            Err(DecodeError::Encrypted)
        ));
    }

    #[test]
    fn hostile_tables_are_corrupt_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let raw = source(dir.path(), 2);
        let q = dir.path().join("h.qcow2");
        let (raw_s, q_s) = (raw.display().to_string(), q.display().to_string());
        qemu_img(&["convert", "-O", "qcow2", &raw_s, &q_s]);
        let good = std::fs::read(&q).unwrap();
        let l1 = be64(&good, 40) as usize;
        let l2 = (be64(&good, l1) & OFFSET_MASK) as usize;
        let set = |at: usize, value: u64| {
            move |b: &mut Vec<u8>| b[at..at + 8].copy_from_slice(&value.to_be_bytes())
        };
        type Breaker = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("L1 beyond the file", Box::new(set(40, 1 << 40))),
            (
                "L1 too small",
                Box::new(|b: &mut Vec<u8>| b[36..40].copy_from_slice(&0u32.to_be_bytes())),
            ),
            ("L2 beyond the file", Box::new(set(l1, 1 << 63 | 1 << 40))),
            ("L2 unaligned", Box::new(set(l1, 1 << 63 | 0x10200))),
            ("data beyond the file", Box::new(set(l2, 1 << 63 | 1 << 40))),
            ("data unaligned", Box::new(set(l2, 1 << 63 | 0x10200))),
            ("compressed garbage", Box::new(set(l2, 1 << 62 | 0x200))),
            (
                "truncated",
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
            ),
        ];
        for (name, break_it) in cases {
            let mut bytes = good.clone();
            break_it(&mut bytes);
            std::fs::write(&q, &bytes).unwrap();
            let result = decode(&q, dir.path());
            assert!(
                matches!(
                    result,
                    Err(DecodeError::Corrupt {
                        format: "qcow2",
                        ..
                    })
                ),
                "{name}: {:?}",
                result.map(|raw| raw.map(|r| r.len()))
            );
        }
    }
}
