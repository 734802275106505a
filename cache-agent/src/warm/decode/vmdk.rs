//! VMDK's layouts for the streaming [`Decoder`](super::Decoder), the two a single file holds:
//!
//! - monolithicSparse: a grain directory (GD) naming grain tables (GT) naming grains, like
//!   qcow2's L1 and L2 (the redundant copies are not read);
//! - streamOptimized: zlib-compressed grains, each behind a marker with its guest sector, in
//!   guest order, then tables and a footer that the markers make unnecessary (VMware writes
//!   the directory at the end, which is why this format is read by its markers).
//!
//! The embedded descriptor is checked the way `convert::check_safe` checks `qemu-img info`:
//! a parent (`parentFileNameHint`) is refused; anything but one SPARSE extent in a
//! monolithicSparse or streamOptimized file goes to `qemu-img convert`.

use super::{DecodeError, Io, Layout, MAX_HEADER_BYTES};

/// "KDMV" little-endian.
pub const MAGIC: &[u8; 4] = b"KDMV";
const SECTOR: u64 = 512;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
/// A GT entry meaning "zeros" when the zero-grain flag is set.
const GTE_ZEROED: u32 = 1;
/// The biggest grain decoded here (VMware and qemu use 64 KiB).
const MAX_GRAIN_BYTES: u64 = 2 << 20;
/// The biggest grain table read (512 entries is the standard).
const MAX_GT_ENTRIES: u64 = 1 << 16;
/// End-of-stream metadata marker type.
const MARKER_EOS: u32 = 0;

fn corrupt(message: impl Into<String>) -> DecodeError {
    DecodeError::corrupt("vmdk", message)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Bytes needed to see the header and the descriptor it points to.
pub fn header_bytes_needed(first: &[u8]) -> Option<usize> {
    if first.len() < 4 || &first[..4] != MAGIC {
        return None;
    }
    if first.len() < SECTOR as usize {
        return Some(SECTOR as usize);
    }
    let end = le64(first, 28)
        .saturating_add(le64(first, 36))
        .saturating_mul(SECTOR);
    Some(end.clamp(SECTOR, MAX_HEADER_BYTES as u64) as usize)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The grain directory (monolithicSparse).
    Directory,
    Table {
        guest_base: u64,
    },
    Grain {
        guest: u64,
    },
    /// The sector at a marker (streamOptimized): its guest sector, size and first bytes.
    Marker,
    /// The rest of a compressed grain whose marker was read; `data` bytes of it count.
    GrainRest {
        guest: u64,
        data: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// monolithicSparse: through the directory, `tables_left` once it has been read.
    Directory { tables_left: Option<usize> },
    /// streamOptimized: marker after marker from `overHead` on.
    Markers { ended: bool },
}

/// A VMDK sparse extent, as the header and descriptor describe it.
pub struct VmdkLayout {
    capacity: u64,
    grain: u64,
    gt_entries: u64,
    gd_offset: u64,
    data_offset: u64,
    zero_grain: bool,
    reading: Reading,
    inflate: flate2::Decompress,
    scratch: Vec<u8>,
}

impl VmdkLayout {
    /// Parses and checks the header and the embedded descriptor in `first` (at least
    /// [`header_bytes_needed`] bytes, or the whole file).
    pub fn parse(first: &[u8], file_len: u64) -> Result<Self, DecodeError> {
        if first.len() < SECTOR as usize || &first[..4] != MAGIC {
            return Err(corrupt("not a VMDK sparse extent header"));
        }
        let version = le32(first, 4);
        if !(1..=3).contains(&version) {
            return Err(DecodeError::Unsupported(format!("vmdk version {version}")));
        }
        let flags = le32(first, 8);
        let capacity = le64(first, 12).checked_mul(SECTOR);
        let grain = le64(first, 20).checked_mul(SECTOR);
        let (desc_offset, desc_size) = (le64(first, 28), le64(first, 36));
        let gt_entries = u64::from(le32(first, 44));
        let gd_offset = le64(first, 56);
        let data_offset = le64(first, 64).saturating_mul(SECTOR);
        let compression = u16::from_le_bytes([first[77], first[78]]);
        let (Some(capacity), Some(grain)) = (capacity, grain) else {
            return Err(corrupt("capacity or grain size overflows"));
        };
        if grain == 0 || !grain.is_power_of_two() {
            return Err(corrupt(format!("grain of {grain} bytes")));
        }
        if grain > MAX_GRAIN_BYTES {
            return Err(DecodeError::Unsupported(format!(
                "vmdk grains of {grain} bytes"
            )));
        }
        if desc_offset == 0 || desc_size == 0 {
            return Err(DecodeError::Unsupported(
                "vmdk without an embedded descriptor".into(),
            ));
        }
        let descriptor = desc_offset
            .checked_add(desc_size)
            .and_then(|end| first.get((desc_offset * SECTOR) as usize..(end * SECTOR) as usize))
            .ok_or_else(|| {
                DecodeError::Unsupported("vmdk with its descriptor past the first 2 MiB".into())
            })?;
        check_descriptor(descriptor)?;
        let reading = if flags & FLAG_MARKERS != 0 {
            if compression != 1 {
                return Err(DecodeError::Unsupported(format!(
                    "vmdk markers with compression {compression}"
                )));
            }
            if data_offset >= file_len {
                return Err(corrupt(format!("grains at {data_offset} outside the file")));
            }
            Reading::Markers { ended: false }
        } else {
            if flags & FLAG_COMPRESSED != 0 {
                return Err(DecodeError::Unsupported(
                    "vmdk compressed grains without markers".into(),
                ));
            }
            if gt_entries == 0 || gt_entries > MAX_GT_ENTRIES {
                return Err(corrupt(format!("grain tables of {gt_entries} entries")));
            }
            Reading::Directory { tables_left: None }
        };
        Ok(Self {
            capacity,
            grain,
            gt_entries,
            gd_offset,
            data_offset,
            zero_grain: flags & FLAG_ZERO_GRAIN != 0,
            reading,
            inflate: flate2::Decompress::new(true),
            scratch: Vec::new(),
        })
    }

    /// Guest bytes a grain at `guest` holds (the last one may be short).
    fn grain_len(&self, guest: u64) -> u64 {
        self.grain.min(self.capacity - guest)
    }

    /// Inflates `bytes` into the scratch grain, continuing the grain begun by the marker.
    fn inflate(&mut self, bytes: &[u8], last: bool) -> Result<(), String> {
        let flush = if last {
            flate2::FlushDecompress::Finish
        } else {
            flate2::FlushDecompress::None
        };
        let start = self.inflate.total_out() as usize;
        let status = self
            .inflate
            .decompress(bytes, &mut self.scratch[start..], flush)
            .map_err(|e| e.to_string())?;
        if last && status != flate2::Status::StreamEnd {
            return Err("the compressed grain does not end".into());
        }
        Ok(())
    }

    fn write_grain(&mut self, guest: u64, io: &mut Io<Kind>) -> Result<(), DecodeError> {
        let len = self.grain_len(guest);
        let produced = self.inflate.total_out();
        if produced < len {
            return Err(io.corrupt(format!(
                "the grain at {guest} holds {produced} bytes, not {len}"
            )));
        }
        io.write(guest, &self.scratch[..len as usize])
    }

    fn next_marker(&mut self, at: u64, io: &mut Io<Kind>) -> Result<(), DecodeError> {
        if at >= io.file_len() {
            // qemu ends the file after the last grain, without an end-of-stream marker.
            self.reading = Reading::Markers { ended: true };
            return Ok(());
        }
        io.want(Kind::Marker, at, SECTOR.min(io.file_len() - at))
    }

    fn marker(&mut self, at: u64, bytes: &[u8], io: &mut Io<Kind>) -> Result<(), DecodeError> {
        if bytes.len() < 16 {
            return Err(io.corrupt(format!("a marker at {at} cut short")));
        }
        let (lba, size) = (le64(bytes, 0), u64::from(le32(bytes, 8)));
        if size == 0 {
            // Metadata (tables, footer) of `lba` sectors after the marker, or the end.
            if le32(bytes, 12) == MARKER_EOS {
                self.reading = Reading::Markers { ended: true };
                return Ok(());
            }
            let next = lba
                .checked_mul(SECTOR)
                .and_then(|n| n.checked_add(at + SECTOR))
                .ok_or_else(|| io.corrupt(format!("metadata at {at} of {lba} sectors")))?;
            return self.next_marker(next, io);
        }
        let guest = lba
            .checked_mul(SECTOR)
            .filter(|g| *g < self.capacity && g % self.grain == 0)
            .ok_or_else(|| io.corrupt(format!("a grain at {at} for sector {lba}")))?;
        let total = (12 + size).div_ceil(SECTOR) * SECTOR;
        if self.scratch.is_empty() {
            self.scratch = vec![0; self.grain as usize];
        }
        self.inflate.reset(true);
        let head = &bytes[12..(12 + size as usize).min(bytes.len())];
        let broken = |e: String| io.corrupt(format!("the grain at {at}: {e}"));
        if total <= bytes.len() as u64 {
            self.inflate(head, true).map_err(broken)?;
            self.write_grain(guest, io)?;
            return self.next_marker(at + total, io);
        }
        self.inflate(head, false).map_err(broken)?;
        let data = 12 + size - bytes.len() as u64;
        io.want(
            Kind::GrainRest { guest, data },
            at + bytes.len() as u64,
            total - bytes.len() as u64,
        )
    }
}

/// Refuses a parent, and sends what is not one sparse extent in one file to qemu-img.
fn check_descriptor(descriptor: &[u8]) -> Result<(), DecodeError> {
    let end = descriptor
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(descriptor.len());
    let text = String::from_utf8_lossy(&descriptor[..end]);
    let mut create_type = None;
    let mut extents = 0;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().trim_matches('"');
            match key.trim() {
                "parentFileNameHint" => return Err(DecodeError::BackingFile(value.into())),
                "createType" => create_type = Some(value.to_string()),
                _ => {}
            }
        } else if ["RW ", "RDONLY ", "NOACCESS "]
            .iter()
            .any(|a| line.starts_with(a))
        {
            extents += 1;
            if line.split_whitespace().nth(2) != Some("SPARSE") {
                return Err(DecodeError::Unsupported(format!("vmdk extent {line:?}")));
            }
        }
    }
    match create_type.as_deref() {
        Some("monolithicSparse" | "streamOptimized") if extents == 1 => Ok(()),
        Some(other) => Err(DecodeError::Unsupported(format!(
            "vmdk {other} with {extents} extents"
        ))),
        None => Err(corrupt("the descriptor has no createType")),
    }
}

impl Layout for VmdkLayout {
    type Kind = Kind;
    const FORMAT: &'static str = "vmdk";

    fn start(&mut self, io: &mut Io<Kind>) -> Result<(), DecodeError> {
        match self.reading {
            Reading::Markers { .. } => self.next_marker(self.data_offset, io),
            Reading::Directory { .. } => {
                let span = self.gt_entries * self.grain;
                let len = self.capacity.div_ceil(span) * 4;
                let at = self
                    .gd_offset
                    .checked_mul(SECTOR)
                    .ok_or_else(|| io.corrupt("grain directory offset overflows"))?;
                io.want(Kind::Directory, at, len)
            }
        }
    }

    fn process(
        &mut self,
        kind: Kind,
        at: u64,
        bytes: &[u8],
        io: &mut Io<Kind>,
    ) -> Result<(), DecodeError> {
        match kind {
            Kind::Directory => {
                let span = self.gt_entries * self.grain;
                let mut tables = 0;
                for (i, entry) in bytes.chunks_exact(4).enumerate() {
                    let sector = u64::from(le32(entry, 0));
                    if sector == 0 {
                        continue;
                    }
                    tables += 1;
                    let guest_base = i as u64 * span;
                    io.want(
                        Kind::Table { guest_base },
                        sector * SECTOR,
                        self.gt_entries * 4,
                    )?;
                }
                self.reading = Reading::Directory {
                    tables_left: Some(tables),
                };
            }
            Kind::Table { guest_base } => {
                for (j, entry) in bytes.chunks_exact(4).enumerate() {
                    let guest = guest_base + j as u64 * self.grain;
                    if guest >= self.capacity {
                        break;
                    }
                    let sector = le32(entry, 0);
                    if sector == 0 || (self.zero_grain && sector == GTE_ZEROED) {
                        continue; // unallocated without a parent, or zeros: a hole
                    }
                    let len = self.grain_len(guest);
                    io.want(Kind::Grain { guest }, u64::from(sector) * SECTOR, len)?;
                }
                if let Reading::Directory {
                    tables_left: Some(left),
                } = &mut self.reading
                {
                    *left = left.saturating_sub(1);
                }
            }
            Kind::Grain { guest } => io.write(guest, bytes)?,
            Kind::Marker => self.marker(at, bytes, io)?,
            Kind::GrainRest { guest, data } => {
                let data = &bytes[..data as usize];
                self.inflate(data, true)
                    .map_err(|e| io.corrupt(format!("the grain at {at}: {e}")))?;
                self.write_grain(guest, io)?;
                self.next_marker(at + bytes.len() as u64, io)?;
            }
        }
        Ok(())
    }

    fn mapping_complete(&self) -> bool {
        match self.reading {
            // Markers never point back: nothing that went by is wanted later.
            Reading::Markers { .. } => true,
            Reading::Directory { tables_left } => tables_left == Some(0),
        }
    }

    fn virtual_size(&self) -> u64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warm::decode::tests::{decode, qemu_img, roundtrip, source};

    #[test]
    fn monolithic_sparse_and_stream_optimized_match_qemu_img() {
        for create in [
            &[][..],
            &["-o", "subformat=streamOptimized"],
            &["-o", "zeroed_grain=on"],
            &["-o", "subformat=monolithicSparse,hwversion=6"],
        ] {
            roundtrip("vmdk", create, |_| {});
        }
    }

    #[test]
    fn metadata_markers_as_vmware_writes_them_are_skipped() {
        // VMware puts grain tables behind markers between the grains and the directory and
        // a footer at the end; qemu writes none. Splice some into qemu's stream: same disk.
        let dir = tempfile::tempdir().unwrap();
        let raw = source(dir.path(), 2);
        let stream = dir.path().join("so.vmdk");
        let s = stream.display().to_string();
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &raw.display().to_string(),
            &s,
        ]);
        let expected = std::fs::read(&raw).unwrap();
        let so = std::fs::read(&stream).unwrap();
        let first = le64(&so, 64) as usize * 512;
        let second = first + (12 + le32(&so, first + 8) as usize).div_ceil(512) * 512;
        let marker = |sectors: u64, kind: u32| {
            let mut m = vec![0u8; 512];
            m[..8].copy_from_slice(&sectors.to_le_bytes());
            m[12..16].copy_from_slice(&kind.to_le_bytes());
            m
        };
        let mut spliced = so[..second].to_vec();
        spliced.extend(marker(4, 1)); // a grain table
        spliced.extend(vec![0xee; 4 * 512]);
        spliced.extend_from_slice(&so[second..]);
        let eos = spliced.len() - so.len()
            + so.chunks(512)
                .rposition(|c| c.iter().any(|b| *b != 0))
                .unwrap()
                * 512
            + 512;
        spliced.truncate(eos);
        spliced.extend(marker(1, 3)); // the footer
        spliced.extend_from_slice(&so[..512]);
        spliced.extend(marker(0, MARKER_EOS));
        std::fs::write(&stream, &spliced).unwrap();
        let got = decode(&stream, dir.path()).unwrap().unwrap();
        assert!(
            got == expected,
            "the spliced stream decodes to another disk"
        );
    }

    #[test]
    fn unsafe_and_unsupported_descriptors_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent.vmdk");
        let child = dir.path().join("child.vmdk");
        let (p, c) = (parent.display().to_string(), child.display().to_string());
        qemu_img(&["create", "-f", "vmdk", &p, "16M"]);
        qemu_img(&["create", "-f", "vmdk", "-F", "vmdk", "-b", &p, &c]);
        assert!(matches!(decode(&child, dir.path()), Err(DecodeError::BackingFile(x)) if x == p));
        // Split and flat subformats are a descriptor file naming other files: not decoded
        // here (qemu-img info refuses what they name).
        let split = dir.path().join("split.vmdk");
        let s = split.display().to_string();
        qemu_img(&[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            &s,
            "16M",
        ]);
        assert!(matches!(decode(&split, dir.path()), Ok(None)));
    }

    #[test]
    fn hostile_headers_and_markers_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let raw = source(dir.path(), 2);
        let raw_s = raw.display().to_string();
        let sparse = dir.path().join("ms.vmdk");
        let stream = dir.path().join("so.vmdk");
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            &raw_s,
            &sparse.display().to_string(),
        ]);
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &raw_s,
            &stream.display().to_string(),
        ]);
        let ms = std::fs::read(&sparse).unwrap();
        let so = std::fs::read(&stream).unwrap();
        let gd = le64(&ms, 56) as usize * 512;
        let gt = le32(&ms, gd) as usize * 512;
        let first_marker = le64(&so, 64) as usize * 512;
        let set32 = |at: usize, v: u32| {
            move |b: &mut Vec<u8>| b[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        let set64 = |at: usize, v: u64| {
            move |b: &mut Vec<u8>| b[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        type Breaker = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, &Vec<u8>, Breaker)> = vec![
            ("grain size zero", &ms, Box::new(set64(20, 0))),
            ("grain size not a power of two", &ms, Box::new(set64(20, 3))),
            (
                "directory beyond the file",
                &ms,
                Box::new(set64(56, 1 << 40)),
            ),
            ("table beyond the file", &ms, Box::new(set32(gd, u32::MAX))),
            ("grain beyond the file", &ms, Box::new(set32(gt, u32::MAX))),
            (
                "no createType",
                &ms,
                Box::new(|b: &mut Vec<u8>| {
                    let at = b.windows(10).position(|w| w == b"createType").unwrap();
                    b[at..at + 10].copy_from_slice(b"xreateType");
                }),
            ),
            (
                "marker beyond the disk",
                &so,
                Box::new(set64(first_marker, 1 << 40)),
            ),
            ("marker off a grain", &so, Box::new(set64(first_marker, 3))),
            (
                "garbage grain",
                &so,
                Box::new(move |b: &mut Vec<u8>| b[first_marker + 12..first_marker + 40].fill(0xa5)),
            ),
            (
                "truncated stream",
                &so,
                Box::new(move |b: &mut Vec<u8>| b.truncate(first_marker + 1000)),
            ),
            (
                "truncated sparse",
                &ms,
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
            ),
        ];
        let path = dir.path().join("h.vmdk");
        for (name, good, break_it) in cases {
            let mut bytes = good.clone();
            break_it(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let result = decode(&path, dir.path());
            assert!(
                matches!(result, Err(DecodeError::Corrupt { format: "vmdk", .. })),
                "{name}: {:?}",
                result.map(|raw| raw.map(|r| r.len()))
            );
        }
    }
}
