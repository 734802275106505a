//! Disk formats decoded to raw in one pass over the bytes as they stream out of the layer:
//! a qcow2 or VMDK containerDisk cached as raw is never written out in its own format first
//! (and converted from disk afterwards); the raw disk is written while the layer downloads.
//!
//! A sparse disk format is a header, tables mapping guest blocks to places in the file, and
//! the data. [`Decoder`] keeps the byte ranges a format wants (its tables, then the data they
//! map) and serves each as the stream passes it; a [`Layout`] says what to do with each. Image
//! tools write a table before the data it maps, so in practice every range is wanted before it
//! arrives; bytes nobody wants yet, while some table is still to come, are kept in a sparse
//! spool file in staging, so any order decodes correctly, at the cost of writing them twice.
//!
//! Headers are checked like `convert::check_safe` checks `qemu-img info`: backing files,
//! external data files and encryption are refused; what a layout does not handle makes the
//! caller fall back to `qemu-img convert` ([`DecodeError::Unsupported`]).

pub mod qcow2;
pub mod vmdk;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::warm::sparse::SparseFile;

/// Outstanding ranges before the decoder gives up and lets qemu-img do it (a memory bound:
/// about 512 GiB of 64 KiB clusters stored after the tables that name them).
pub const DEFAULT_MAX_PENDING_READS: usize = 8 << 20;
/// The most a header (with what it points to: qcow2's first cluster, VMDK's descriptor) may
/// need before deciding.
pub const MAX_HEADER_BYTES: usize = 2 << 20;
/// The longest single range (a table, a cluster, a compressed grain) a layout may ask for:
/// qemu's own limit on the largest table (a qcow2 L1 table of at most 32 MiB), which no
/// format's cluster or grain comes near. A header claiming more is refused before anything
/// is allocated for it.
pub const MAX_RANGE_BYTES: u64 = 32 << 20;
/// The most the decoder holds in memory at once for ranges that arrive in pieces. Honest
/// images hold one table or cluster at a time; only ranges asked for many times over (one
/// table named by every entry of another) come near this.
pub const MAX_HELD_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum DecodeError {
    /// Valid image that is not streamed: the caller falls back to qemu-img.
    #[error("{0}: converted by qemu-img instead")]
    Unsupported(String),
    /// Refused, as `qemu-img info` would make vmdisk refuse it.
    #[error("the disk names a backing file {0:?}; refused (it could read host files)")]
    BackingFile(String),
    #[error("the disk names an external data file; refused (it could read host files)")]
    DataFile,
    #[error("the disk is encrypted; refused")]
    Encrypted,
    #[error("corrupt {format}: {message}")]
    Corrupt {
        format: &'static str,
        message: String,
    },
    /// Checked from the header, before anything is written.
    #[error("the disk is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl DecodeError {
    pub fn corrupt(format: &'static str, message: impl Into<String>) -> Self {
        Self::Corrupt {
            format,
            message: message.into(),
        }
    }
}

fn held_too_much(format: &'static str, held: u64) -> DecodeError {
    DecodeError::corrupt(
        format,
        format!(
            "ranges asked for many times over: {held} bytes held at once, over {} MiB",
            MAX_HELD_BYTES >> 20
        ),
    )
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> DecodeError {
    move |source| DecodeError::Io { context, source }
}

/// What a disk format does with the ranges it asked for.
pub trait Layout: Send {
    type Kind: Copy + std::fmt::Debug + Send;
    const FORMAT: &'static str;
    /// Asks for the first ranges (the tables the header points to).
    fn start(&mut self, io: &mut Io<Self::Kind>) -> Result<(), DecodeError>;
    /// A wanted range, whole.
    fn process(
        &mut self,
        kind: Self::Kind,
        at: u64,
        bytes: &[u8],
        io: &mut Io<Self::Kind>,
    ) -> Result<(), DecodeError>;
    /// Bytes at the end of a range of this kind that may also be the start of another range
    /// (compressed data padded to a whole sector): they are spooled all the same.
    fn shared_tail(_kind: Self::Kind) -> u64 {
        0
    }
    /// True once no table still to come can map bytes that already went by.
    fn mapping_complete(&self) -> bool;
    fn virtual_size(&self) -> u64;
}

#[derive(Debug)]
struct Want<K> {
    kind: K,
    len: u64,
    buf: Vec<u8>,
}

/// The decoder's side the layouts use: ask for ranges, write the raw disk.
pub struct Io<K> {
    format: &'static str,
    file_len: u64,
    out: SparseFile,
    spool: File,
    /// Byte ranges written to the spool, as (start, end), in order.
    spooled: Vec<(u64, u64)>,
    spooling: bool,
    pos: u64,
    /// Outstanding ranges by (file offset, sequence): ranges may share bytes.
    wants: BTreeMap<(u64, u64), Want<K>>,
    seq: u64,
    /// Ranges that went by before they were wanted, as (kind, offset, length): read back
    /// from the spool one at a time when processed, so their number costs no memory.
    ready: Vec<(K, u64, u64)>,
    max_wants: usize,
    /// Bytes reserved by ranges that arrive in pieces (bounded by [`MAX_HELD_BYTES`]).
    held: u64,
}

impl<K: Copy + std::fmt::Debug> Io<K> {
    pub fn corrupt(&self, message: impl Into<String>) -> DecodeError {
        DecodeError::corrupt(self.format, message)
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Writes guest bytes at `guest` in the raw disk.
    pub fn write(&mut self, guest: u64, bytes: &[u8]) -> Result<(), DecodeError> {
        self.out
            .write_at(guest, bytes)
            .map_err(io("writing the raw disk"))
    }

    /// Asks for `len` bytes at file offset `at`; a range the stream already passed comes back
    /// from the spool.
    pub fn want(&mut self, kind: K, at: u64, len: u64) -> Result<(), DecodeError> {
        if at.checked_add(len).is_none_or(|e| e > self.file_len) {
            return Err(self.corrupt(format!("a range at {at} ({len} bytes) outside the file")));
        }
        if len > MAX_RANGE_BYTES {
            return Err(self.corrupt(format!(
                "{kind:?} at {at} of {len} bytes, over the {} MiB any image needs",
                MAX_RANGE_BYTES >> 20
            )));
        }
        if at >= self.pos {
            if self.wants.len() >= self.max_wants {
                return Err(DecodeError::Unsupported(format!(
                    "{} this large with its tables first",
                    self.format
                )));
            }
            self.wants.insert(
                (at, self.seq),
                Want {
                    kind,
                    len,
                    buf: Vec::new(),
                },
            );
            self.seq += 1;
            return Ok(());
        }
        let passed = (self.pos - at).min(len);
        let i = self.spooled.partition_point(|r| r.1 <= at);
        let kept = self
            .spooled
            .get(i)
            .is_some_and(|r| r.0 <= at && r.1 >= at + passed);
        if !kept {
            return Err(self.corrupt(format!(
                "bytes at {at} are mapped only after they were known to be free"
            )));
        }
        if passed == len {
            self.ready.push((kind, at, len));
        } else {
            self.hold(len)?;
            let mut buf = vec![0u8; passed as usize];
            self.spool
                .read_exact_at(&mut buf, at)
                .map_err(io("reading the spool"))?;
            self.wants.insert((at, self.seq), Want { kind, len, buf });
            self.seq += 1;
        }
        Ok(())
    }

    /// Counts `len` more bytes held for a range arriving in pieces.
    fn hold(&mut self, len: u64) -> Result<(), DecodeError> {
        self.held += len;
        if self.held > MAX_HELD_BYTES {
            return Err(held_too_much(self.format, self.held));
        }
        Ok(())
    }

    /// Keeps the bytes of `data` (at `start`) that no range wanted.
    fn spool_gaps(
        &mut self,
        start: u64,
        data: &[u8],
        covered: &mut [(u64, u64)],
    ) -> Result<(), DecodeError> {
        covered.sort_unstable();
        let mut at = start;
        let end = start + data.len() as u64;
        let mut gaps = Vec::new();
        for &(s, e) in covered.iter() {
            if s > at {
                gaps.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            gaps.push((at, end));
        }
        for (from, to) in gaps {
            self.spool
                .write_all_at(&data[(from - start) as usize..(to - start) as usize], from)
                .map_err(io("spooling"))?;
            match self.spooled.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => self.spooled.push((from, to)),
            }
        }
        Ok(())
    }
}

/// Decodes a disk byte stream into a raw disk, with layout `L`.
pub struct Decoder<L: Layout> {
    layout: L,
    io: Io<L::Kind>,
}

impl<L: Layout> Decoder<L> {
    pub fn new(
        mut layout: L,
        file_len: u64,
        out: SparseFile,
        spool: File,
        max_pending_reads: usize,
    ) -> Result<Self, DecodeError> {
        let mut io = Io {
            format: L::FORMAT,
            file_len,
            out,
            spool,
            spooled: Vec::new(),
            spooling: true,
            pos: 0,
            wants: BTreeMap::new(),
            seq: 0,
            ready: Vec::new(),
            max_wants: max_pending_reads,
            held: 0,
        };
        layout.start(&mut io)?;
        io.spooling = !layout.mapping_complete();
        Ok(Self { layout, io })
    }

    fn process(&mut self, kind: L::Kind, at: u64, bytes: &[u8]) -> Result<(), DecodeError> {
        self.layout.process(kind, at, bytes, &mut self.io)?;
        while let Some((kind, at, len)) = self.io.ready.pop() {
            let mut bytes = vec![0u8; len as usize];
            self.io
                .spool
                .read_exact_at(&mut bytes, at)
                .map_err(io("reading the spool"))?;
            self.layout.process(kind, at, &bytes, &mut self.io)?;
        }
        if self.io.spooling && self.layout.mapping_complete() {
            self.io.spooling = false;
            self.io.spooled = Vec::new();
        }
        Ok(())
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        let chunk_start = self.io.pos;
        let chunk_end = chunk_start + data.len() as u64;
        if chunk_end > self.io.file_len {
            return Err(self.io.corrupt("more bytes than the tar entry announced"));
        }
        // Segment by segment, each ending where a wanted range completes: processing it may
        // want ranges further on in this same chunk (a table and the data it maps).
        while self.io.pos < chunk_end {
            let start = self.io.pos;
            let touched: Vec<(u64, u64)> = self
                .io
                .wants
                .range(..(chunk_end, 0))
                .filter(|((s, _), w)| s + w.len > start)
                .map(|(k, _)| *k)
                .collect();
            let end = touched
                .iter()
                .map(|k| k.0 + self.io.wants[k].len)
                .filter(|e| *e <= chunk_end)
                .min()
                .unwrap_or(chunk_end);
            let segment = &data[(start - chunk_start) as usize..(end - chunk_start) as usize];
            let mut covered: Vec<(u64, u64)> = Vec::with_capacity(touched.len());
            let mut done = Vec::new();
            for key in touched {
                let want = self.io.wants.get_mut(&key).expect("touched");
                let (s, e) = (key.0, key.0 + want.len);
                if s >= end {
                    continue;
                }
                let (from, to) = (s.max(start), e.min(end));
                let keep = e.saturating_sub(L::shared_tail(want.kind)).max(s);
                covered.push((from, to.min(keep).max(from)));
                if want.buf.is_empty() && s >= start && e <= end {
                    done.push((key, false)); // whole range in this segment: no copy
                    continue;
                }
                if want.buf.is_empty() {
                    let len = want.len;
                    want.buf.reserve_exact(len as usize);
                    self.io.held += len;
                    if self.io.held > MAX_HELD_BYTES {
                        return Err(held_too_much(L::FORMAT, self.io.held));
                    }
                }
                want.buf
                    .extend_from_slice(&segment[(from - start) as usize..(to - start) as usize]);
                if to == e {
                    done.push((key, true));
                }
            }
            if self.io.spooling {
                self.io.spool_gaps(start, segment, &mut covered)?;
            }
            self.io.pos = end;
            for (key, copied) in done {
                let want = self.io.wants.remove(&key).expect("done");
                if copied {
                    self.io.held -= want.len;
                    self.process(want.kind, key.0, &want.buf)?;
                } else {
                    let from = (key.0 - start) as usize;
                    self.process(want.kind, key.0, &segment[from..from + want.len as usize])?;
                }
            }
        }
        Ok(())
    }

    /// After the last byte: everything wanted must have arrived.
    pub fn finish(self) -> Result<(SparseFile, u64), DecodeError> {
        if self.io.pos != self.io.file_len {
            return Err(self.io.corrupt(format!(
                "the stream ended after {} of {} bytes",
                self.io.pos, self.io.file_len
            )));
        }
        if let Some(((at, _), want)) = self.io.wants.iter().next() {
            return Err(self
                .io
                .corrupt(format!("{:?} at {at} never arrived", want.kind)));
        }
        let size = self.layout.virtual_size();
        Ok((self.io.out, size))
    }
}

/// A decoder of some format, as the extraction drives it.
pub trait StreamingDisk: Send {
    fn feed(&mut self, data: &[u8]) -> Result<(), DecodeError>;
    /// The raw disk and its size.
    fn finish(self: Box<Self>) -> Result<(SparseFile, u64), DecodeError>;
    fn source_format(&self) -> &'static str;
}

impl<L: Layout + 'static> StreamingDisk for Decoder<L> {
    fn feed(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        Decoder::feed(self, data)
    }
    fn finish(self: Box<Self>) -> Result<(SparseFile, u64), DecodeError> {
        Decoder::finish(*self)
    }
    fn source_format(&self) -> &'static str {
        L::FORMAT
    }
}

/// Bytes of the file's start needed to decide how to decode it; `None` when it is no format
/// decoded here (raw, or something for qemu-img).
pub fn header_bytes_needed(first: &[u8]) -> Option<usize> {
    qcow2::header_bytes_needed(first).or_else(|| vmdk::header_bytes_needed(first))
}

/// A decoder for the disk whose first bytes are `prefix` (at least `header_bytes_needed`),
/// with its header checked; `Ok(None)` when it is no format decoded here.
pub fn open(
    prefix: &[u8],
    file_len: u64,
    limits: &DecodeLimits,
    out: SparseFile,
    spool: File,
) -> Result<Option<Box<dyn StreamingDisk>>, DecodeError> {
    let pending = limits.max_pending_reads;
    if qcow2::header_bytes_needed(prefix).is_some() {
        let header = qcow2::parse_header(prefix, file_len)?;
        check_size(header.virtual_size, limits.max_disk_bytes)?;
        let layout = qcow2::Qcow2Layout::new(header);
        return Ok(Some(Box::new(Decoder::new(
            layout, file_len, out, spool, pending,
        )?)));
    }
    if vmdk::header_bytes_needed(prefix).is_some() {
        let layout = vmdk::VmdkLayout::parse(prefix, file_len)?;
        check_size(layout.virtual_size(), limits.max_disk_bytes)?;
        return Ok(Some(Box::new(Decoder::new(
            layout, file_len, out, spool, pending,
        )?)));
    }
    Ok(None)
}

/// Bounds on one decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest virtual size accepted.
    pub max_disk_bytes: u64,
    /// Ranges the stream has not reached yet that may be outstanding at once; past it the
    /// decode stops with [`DecodeError::Unsupported`].
    pub max_pending_reads: usize,
}

fn check_size(size: u64, limit: u64) -> Result<(), DecodeError> {
    if size > limit {
        return Err(DecodeError::TooLarge { size, limit });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    pub fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A raw disk with data, zeros and holes (deterministic).
    pub fn source(dir: &Path, mib: usize) -> std::path::PathBuf {
        let path = dir.join("source.raw");
        let mut data = vec![0u8; mib << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, chunk) in data.chunks_mut(4096).enumerate() {
            match i % 7 {
                0 | 3 => {
                    for b in chunk.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                }
                5 => chunk.fill(b'v'),
                _ => {}
            }
        }
        std::fs::write(&path, data).unwrap();
        path
    }

    /// Streams `image` through the decoder in chunks of varying size; returns the raw output,
    /// or `Ok(None)` when it is no format decoded here.
    pub fn decode(image: &Path, dir: &Path) -> Result<Option<Vec<u8>>, DecodeError> {
        let bytes = std::fs::read(image).unwrap();
        let Some(need) = header_bytes_needed(&bytes) else {
            return Ok(None);
        };
        let prefix = &bytes[..need.min(bytes.len())];
        let out = SparseFile::create(&dir.join("out.raw")).unwrap();
        let spool = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("spool"))
            .unwrap();
        let limits = DecodeLimits {
            max_disk_bytes: 1 << 40,
            max_pending_reads: DEFAULT_MAX_PENDING_READS,
        };
        let Some(mut d) = open(prefix, bytes.len() as u64, &limits, out, spool)? else {
            return Ok(None);
        };
        let sizes = [1usize, 7, 4096, 65536, 100_000, 17, 1 << 20];
        let (mut at, mut i) = (0, 0);
        while at < bytes.len() {
            let n = sizes[i % sizes.len()].min(bytes.len() - at);
            d.feed(&bytes[at..at + n])?;
            at += n;
            i += 1;
        }
        let (out, size) = d.finish()?;
        out.finish(size).unwrap();
        Ok(Some(std::fs::read(dir.join("out.raw")).unwrap()))
    }

    /// Makes an image with `qemu-img convert -O format <create>` from a fresh source, lets
    /// `prepare` change it, and checks the streamed raw against qemu-img's own conversion.
    pub fn roundtrip(format: &str, create: &[&str], prepare: impl Fn(&Path)) {
        let dir = tempfile::tempdir().unwrap();
        let raw = source(dir.path(), 6);
        let image = dir.path().join(format!("disk.{format}"));
        let mut args = vec!["convert", "-f", "raw", "-O", format];
        args.extend_from_slice(create);
        let (raw_s, image_s) = (raw.display().to_string(), image.display().to_string());
        args.extend([raw_s.as_str(), image_s.as_str()]);
        qemu_img(&args);
        prepare(&image);
        let expected = dir.path().join("expected.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            &image_s,
            &expected.display().to_string(),
        ]);
        let got = decode(&image, dir.path())
            .unwrap_or_else(|e| panic!("{format} {create:?}: {e}"))
            .unwrap_or_else(|| panic!("{format} {create:?}: not decoded"));
        assert!(
            got == std::fs::read(&expected).unwrap(),
            "{format} {create:?}: the streamed raw differs from qemu-img's"
        );
    }

    #[test]
    fn raw_and_unknown_bytes_are_not_decoded() {
        assert_eq!(header_bytes_needed(&[0u8; 512]), None);
        assert_eq!(header_bytes_needed(b"# Disk DescriptorFile\n"), None);
    }
}
