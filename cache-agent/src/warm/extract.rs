//! containerDisk extraction: image layers in, one sparse disk file out.
//!
//! Layers are readers (a download in progress, or a file) applied in order (gzip, zstd or
//! uncompressed tar, streamed: nothing is unpacked wholesale), OCI whiteouts honoured. When the
//! cache wants raw and the disk is qcow2 or VMDK, it is decoded to raw on the way
//! ([`crate::warm::decode`]), unless it uses a feature only qemu-img handles; then it is kept as it
//! is for conversion. Exactly one regular file must remain under `disk/`
//! (or `./disk/`). Only that file is ever written, and only inside the staging directory;
//! every other entry is validated and skipped. Hostile entries fail the whole extraction:
//! absolute paths, `..`, links that escape or that sit in `disk/`, device nodes and fifos,
//! more than one disk, a disk over the configured limit. Runs of zeros in the disk become
//! holes, so a 2 GiB raw disk holding 600 MiB of data writes 600 MiB.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use thiserror::Error;

use crate::warm::sparse::SparseFile;

const READ_CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ExtractError {
    #[error("layer {layer}: {source}")]
    Disk {
        layer: usize,
        #[source]
        source: crate::warm::decode::DecodeError,
    },
    #[error(
        "unsupported layer media type {0:?} (expected a tar layer: uncompressed, gzip or zstd)"
    )]
    UnsupportedMediaType(String),
    #[error("layer {layer}: entry {entry:?} has an absolute path")]
    AbsolutePath { layer: usize, entry: String },
    #[error("layer {layer}: entry {entry:?} climbs out of the image with '..'")]
    PathTraversal { layer: usize, entry: String },
    #[error("layer {layer}: link {entry:?} -> {target:?} points outside the image")]
    EscapingLink {
        layer: usize,
        entry: String,
        target: String,
    },
    #[error("layer {layer}: {entry:?} is a link; the disk must be a regular file")]
    LinkInDisk { layer: usize, entry: String },
    #[error("layer {layer}: {entry:?} is a device node or fifo; refused")]
    DeviceNode { layer: usize, entry: String },
    #[error("layer {layer}: {entry:?} is nested; a containerDisk holds its disk as disk/<file>")]
    NestedDiskFile { layer: usize, entry: String },
    #[error("the image holds more than one disk file under disk/: {names:?}")]
    MultipleDisks { names: Vec<String> },
    #[error("the image holds no disk file under disk/ (not a containerDisk?)")]
    NoDisk,
    #[error("layer {layer}: disk {entry:?} is {size} bytes, over the limit of {limit} bytes")]
    DiskTooLarge {
        layer: usize,
        entry: String,
        size: u64,
        limit: u64,
    },
    #[error("layer {layer} is not a valid {compression} tar stream: {source}")]
    Corrupt {
        layer: usize,
        compression: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub fn from_media_type(media_type: &str) -> Result<Self, ExtractError> {
        let mt = media_type.trim();
        let is_tar = mt.starts_with("application/vnd.oci.image.layer.")
            || mt.starts_with("application/vnd.docker.image.rootfs.");
        match mt {
            _ if !is_tar => Err(ExtractError::UnsupportedMediaType(media_type.to_string())),
            _ if mt.ends_with(".tar") => Ok(Self::None),
            _ if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") => Ok(Self::Gzip),
            _ if mt.ends_with("tar+zstd") => Ok(Self::Zstd),
            _ => Err(ExtractError::UnsupportedMediaType(media_type.to_string())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "uncompressed",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LayerFile {
    pub path: PathBuf,
    pub compression: LayerCompression,
}

/// A layer as a stream of its (compressed) bytes.
pub struct LayerSource {
    pub reader: Box<dyn Read + Send>,
    pub compression: LayerCompression,
}

/// What the cache will keep: decoding on the way is worth it only for raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskTarget {
    /// Decode qcow2 and VMDK to raw while extracting.
    Raw,
    /// Keep the disk as it is in the image.
    AsIs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Largest disk accepted (its apparent size).
    pub max_disk_bytes: u64,
    /// How far a streaming decode may run ahead of the tables it waits for
    /// ([`crate::warm::decode::DecodeLimits::max_pending_reads`]).
    pub max_pending_reads: usize,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        Self {
            max_disk_bytes: 2 << 40,
            max_pending_reads: crate::warm::decode::DEFAULT_MAX_PENDING_READS,
        }
    }
}

impl ExtractLimits {
    fn decode(&self) -> crate::warm::decode::DecodeLimits {
        crate::warm::decode::DecodeLimits {
            max_disk_bytes: self.max_disk_bytes,
            max_pending_reads: self.max_pending_reads,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedDisk {
    pub path: PathBuf,
    pub name: String,
    pub apparent_size: u64,
    pub allocated_bytes: u64,
    /// The disk's format in the image when `path` holds it decoded to raw.
    pub decoded_from: Option<&'static str>,
}

/// Counts compressed bytes read, for progress.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Where an entry sits, after normalising `./` away.
enum Place {
    /// `disk/<name>`
    Disk(String),
    /// `disk/<name>/...`
    NestedInDisk,
    /// The `disk` directory itself.
    DiskDir,
    Elsewhere,
}

fn normalise(layer: usize, raw: &[u8]) -> Result<Vec<String>, ExtractError> {
    let text = String::from_utf8_lossy(raw).into_owned();
    if text.starts_with('/') {
        return Err(ExtractError::AbsolutePath { layer, entry: text });
    }
    let mut parts = Vec::new();
    for c in Path::new(&text).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ExtractError::PathTraversal { layer, entry: text });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ExtractError::AbsolutePath { layer, entry: text });
            }
        }
    }
    Ok(parts)
}

fn place(parts: &[String]) -> Place {
    match parts {
        [d] if d == "disk" => Place::DiskDir,
        [d, name] if d == "disk" => Place::Disk(name.clone()),
        [d, _, ..] if d == "disk" => Place::NestedInDisk,
        _ => Place::Elsewhere,
    }
}

/// True when a link at `parts` pointing to `target` stays inside the image root.
fn link_stays_inside(parts: &[String], target: &[u8], hard: bool) -> bool {
    let target = String::from_utf8_lossy(target);
    if target.starts_with('/') {
        return false;
    }
    // Symlinks resolve from the link's directory, hardlinks from the root.
    let mut depth: i64 = if hard { 0 } else { parts.len() as i64 - 1 };
    for c in Path::new(target.as_ref()).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    true
}

/// Reads until `buf` is full or the reader ends.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes one disk entry: raw as it is (zero blocks as holes), or decoded to raw when
/// `target` asks for it and a decoder handles the image; returns the format decoded from.
fn write_disk(
    entry: &mut impl Read,
    size: u64,
    out_path: &Path,
    target: DiskTarget,
    limits: &ExtractLimits,
    buf: &mut [u8],
) -> Result<Option<&'static str>, WriteFailure> {
    let first = (size as usize).min(buf.len());
    let mut filled = fill(entry, &mut buf[..first]).map_err(WriteFailure::Read)?;
    if target == DiskTarget::Raw {
        if let Some(need) = crate::warm::decode::header_bytes_needed(&buf[..filled]) {
            let need = need.min(size as usize).min(buf.len());
            if filled < need {
                filled += fill(entry, &mut buf[filled..need]).map_err(WriteFailure::Read)?;
            }
            if let Some(format) = decode(entry, size, out_path, limits, buf, filled)? {
                return Ok(Some(format));
            }
        }
    }
    let mut out = SparseFile::create(out_path).map_err(WriteFailure::Write)?;
    let mut offset = 0u64;
    loop {
        if filled == 0 {
            filled = fill(entry, buf).map_err(WriteFailure::Read)?;
            if filled == 0 {
                break;
            }
        }
        out.write_at(offset, &buf[..filled])
            .map_err(WriteFailure::Write)?;
        offset += filled as u64;
        filled = 0;
    }
    out.finish(offset).map_err(WriteFailure::Write)?;
    Ok(None)
}

/// Decodes the disk whose first `filled` bytes are in `buf`; `Ok(None)` (nothing read past
/// them) when no decoder takes it. Only the header decides that: once bytes are consumed,
/// every failure is the extraction's.
fn decode(
    entry: &mut impl Read,
    size: u64,
    out_path: &Path,
    limits: &ExtractLimits,
    buf: &mut [u8],
    mut filled: usize,
) -> Result<Option<&'static str>, WriteFailure> {
    let out = SparseFile::create(out_path).map_err(WriteFailure::Write)?;
    let spool_path = out_path.with_extension("spool");
    let spool = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&spool_path)
        .map_err(WriteFailure::Write)?;
    let result = (|| {
        let opened = crate::warm::decode::open(&buf[..filled], size, &limits.decode(), out, spool);
        let mut decoder = match opened {
            Ok(Some(decoder)) => decoder,
            Ok(None) => return Ok(None),
            Err(crate::warm::decode::DecodeError::Unsupported(why)) => {
                tracing::info!(%why, "disk kept as it is for qemu-img");
                return Ok(None);
            }
            Err(crate::warm::decode::DecodeError::TooLarge { size, .. }) => {
                return Err(WriteFailure::TooLarge(size))
            }
            Err(e) => return Err(WriteFailure::Disk(e)),
        };
        let format = decoder.source_format();
        loop {
            if filled == 0 {
                filled = fill(entry, buf).map_err(WriteFailure::Read)?;
                if filled == 0 {
                    break;
                }
            }
            decoder.feed(&buf[..filled]).map_err(WriteFailure::Disk)?;
            filled = 0;
        }
        let (out, virtual_size) = decoder.finish().map_err(WriteFailure::Disk)?;
        out.finish(virtual_size).map_err(WriteFailure::Write)?;
        Ok(Some(format))
    })();
    let _ = std::fs::remove_file(&spool_path);
    result
}

enum WriteFailure {
    Read(std::io::Error),
    Write(std::io::Error),
    Disk(crate::warm::decode::DecodeError),
    TooLarge(u64),
}

/// Applies `layers` (files) in order and writes the single disk they hold into
/// `staging_dir`, as it is in the image. `progress` receives the compressed bytes consumed.
pub fn extract_disk(
    layers: &[LayerFile],
    staging_dir: &Path,
    limits: &ExtractLimits,
    progress: &mut dyn FnMut(u64),
) -> Result<ExtractedDisk, ExtractError> {
    let sources = layers
        .iter()
        .enumerate()
        .map(|(layer, file)| {
            let raw = File::open(&file.path).map_err(|source| ExtractError::Io {
                context: format!("opening layer {layer} ({})", file.path.display()),
                source,
            })?;
            Ok(LayerSource {
                reader: Box::new(raw),
                compression: file.compression,
            })
        })
        .collect::<Result<Vec<_>, ExtractError>>()?;
    extract_disk_from(sources, staging_dir, limits, DiskTarget::AsIs, progress)
}

/// Applies `layers` (streams) in order and writes the single disk they hold into
/// `staging_dir`, decoded to raw on the way when `target` is raw and the disk qcow2 or VMDK. Each
/// layer is read to its end, so a verifying stream has checked its digest when this returns.
/// `progress` receives the compressed bytes consumed so far.
pub fn extract_disk_from(
    layers: Vec<LayerSource>,
    staging_dir: &Path,
    limits: &ExtractLimits,
    target: DiskTarget,
    progress: &mut dyn FnMut(u64),
) -> Result<ExtractedDisk, ExtractError> {
    let disk_dir = staging_dir.join("disk");
    std::fs::create_dir_all(&disk_dir).map_err(|source| ExtractError::Io {
        context: format!("creating {}", disk_dir.display()),
        source,
    })?;
    // Disk files present after the layers applied so far.
    let mut disks: BTreeMap<String, (PathBuf, Option<&'static str>)> = BTreeMap::new();
    // Big enough for a qcow2 header cluster (2 MiB at most).
    let mut buf = vec![0u8; READ_CHUNK.max(2 << 20)];
    let mut consumed_before: u64 = 0;
    for (layer, file) in layers.into_iter().enumerate() {
        let count = Rc::new(Cell::new(0u64));
        let compression = file.compression;
        let counted = Counting {
            inner: BufReader::with_capacity(READ_CHUNK, file.reader),
            count: Rc::clone(&count),
        };
        let corrupt = |source| ExtractError::Corrupt {
            layer,
            compression: compression.name(),
            source,
        };
        let reader: Box<dyn Read> = match compression {
            LayerCompression::None => Box::new(counted),
            LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
            LayerCompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(counted).map_err(corrupt)?)
            }
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(corrupt)?;
        for entry in entries {
            let mut entry = entry.map_err(corrupt)?;
            let header_path = entry.path_bytes().into_owned();
            let parts = normalise(layer, &header_path)?;
            let entry_name = parts.join("/");
            let kind = entry.header().entry_type();
            let file_name = parts.last().cloned().unwrap_or_default();

            // Whiteouts (OCI image spec, layer changesets).
            if let Some(hidden) = file_name.strip_prefix(".wh.") {
                let dir = &parts[..parts.len() - 1];
                if dir.len() == 1 && dir[0] == "disk" {
                    if hidden == ".wh..opq" {
                        for (_, (p, _)) in std::mem::take(&mut disks) {
                            let _ = std::fs::remove_file(p);
                        }
                    } else if let Some((p, _)) = disks.remove(hidden) {
                        let _ = std::fs::remove_file(p);
                    }
                } else if dir.is_empty() && hidden == "disk" {
                    for (_, (p, _)) in std::mem::take(&mut disks) {
                        let _ = std::fs::remove_file(p);
                    }
                }
                continue;
            }

            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target_text = String::from_utf8_lossy(&target).into_owned();
                if !link_stays_inside(&parts, &target, kind.is_hard_link()) {
                    return Err(ExtractError::EscapingLink {
                        layer,
                        entry: entry_name,
                        target: target_text,
                    });
                }
                let target_parts = normalise(layer, &target).unwrap_or_default();
                let touches_disk = !matches!(place(&parts), Place::Elsewhere)
                    || (kind.is_hard_link() && !matches!(place(&target_parts), Place::Elsewhere));
                if touches_disk {
                    return Err(ExtractError::LinkInDisk {
                        layer,
                        entry: entry_name,
                    });
                }
                continue;
            }
            if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                return Err(ExtractError::DeviceNode {
                    layer,
                    entry: entry_name,
                });
            }
            let regular = kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse();
            if !regular {
                continue; // directories, pax/GNU metadata entries
            }
            match place(&parts) {
                Place::Elsewhere | Place::DiskDir => continue,
                Place::NestedInDisk => {
                    return Err(ExtractError::NestedDiskFile {
                        layer,
                        entry: entry_name,
                    })
                }
                Place::Disk(name) => {
                    let size = entry.size();
                    if size > limits.max_disk_bytes {
                        return Err(ExtractError::DiskTooLarge {
                            layer,
                            entry: entry_name,
                            size,
                            limit: limits.max_disk_bytes,
                        });
                    }
                    // Names are a single normal component (checked above), so this stays
                    // inside disk_dir.
                    let out_path = disk_dir.join(&name);
                    let decoded = write_disk(&mut entry, size, &out_path, target, limits, &mut buf)
                        .map_err(|failure| match failure {
                            WriteFailure::Read(e)
                                if e.kind() == std::io::ErrorKind::InvalidData
                                    || e.kind() == std::io::ErrorKind::UnexpectedEof =>
                            {
                                corrupt(e)
                            }
                            WriteFailure::Read(e) => ExtractError::Io {
                                context: format!("reading layer {layer}"),
                                source: e,
                            },
                            WriteFailure::Write(e) => ExtractError::Io {
                                context: format!("writing {}", out_path.display()),
                                source: e,
                            },
                            WriteFailure::Disk(source) => ExtractError::Disk { layer, source },
                            WriteFailure::TooLarge(size) => ExtractError::DiskTooLarge {
                                layer,
                                entry: entry_name.clone(),
                                size,
                                limit: limits.max_disk_bytes,
                            },
                        })?;
                    disks.insert(name, (out_path, decoded));
                    progress(consumed_before + count.get());
                }
            }
        }
        // Read the layer to its end (tar padding, the compressed stream's trailer): a
        // verifying download ends, and checks its digest, only there.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
        consumed_before += count.get();
        progress(consumed_before);
    }
    match disks.len() {
        0 => Err(ExtractError::NoDisk),
        1 => {
            let (name, (path, decoded_from)) = disks.into_iter().next().expect("one disk");
            let meta = std::fs::metadata(&path).map_err(|source| ExtractError::Io {
                context: format!("reading {}", path.display()),
                source,
            })?;
            use std::os::unix::fs::MetadataExt;
            Ok(ExtractedDisk {
                path,
                name,
                apparent_size: meta.len(),
                allocated_bytes: meta.blocks() * 512,
                decoded_from,
            })
        }
        _ => Err(ExtractError::MultipleDisks {
            names: disks.into_keys().collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// A raw header with any path bytes (the tar builder refuses `..` and absolute paths).
    fn raw_entry(
        builder: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        link: Option<&str>,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append(&h, data).unwrap();
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            raw_entry(&mut b, path, tar::EntryType::Regular, None, data);
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    struct Setup {
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn layer(&self, n: usize, bytes: &[u8], compression: LayerCompression) -> LayerFile {
            let path = self.dir.path().join(format!("layer{n}"));
            std::fs::write(&path, bytes).unwrap();
            LayerFile { path, compression }
        }
        fn staging(&self) -> PathBuf {
            self.dir.path().join("staging")
        }
        fn run(&self, layers: &[LayerFile]) -> Result<ExtractedDisk, ExtractError> {
            extract_disk(
                layers,
                &self.staging(),
                &ExtractLimits {
                    max_disk_bytes: 64 << 20,
                    ..ExtractLimits::default()
                },
                &mut |_| {},
            )
        }
        /// Everything in the temp dir outside staging (layers only, if nothing escaped).
        fn outside_staging(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != "staging" && !n.starts_with("layer"))
                .collect();
            names.sort();
            names
        }
    }

    fn disk_bytes(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for (i, chunk) in v.chunks_mut(256 << 10).enumerate() {
            if i % 3 == 0 {
                for (j, b) in chunk.iter_mut().enumerate().take(100_000) {
                    *b = (i * 31 + j) as u8 | 1;
                }
            }
        }
        v
    }

    #[test]
    fn media_types() {
        use LayerCompression::*;
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip")
                .unwrap(),
            Gzip
        );
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
                .unwrap(),
            Gzip
        );
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd")
                .unwrap(),
            Zstd
        );
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar").unwrap(),
            None
        );
        assert!(LayerCompression::from_media_type("application/json").is_err());
    }

    #[test]
    fn gzip_zstd_and_plain_layers_yield_the_same_disk() {
        let data = disk_bytes(4 << 20);
        let tar = tar_of(&[
            ("disk/", b""),
            ("disk/disk.img", &data),
            ("other/readme", b"hi"),
        ]);
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for (bytes, c) in [
            (gzip(&tar), LayerCompression::Gzip),
            (zst, LayerCompression::Zstd),
            (tar.clone(), LayerCompression::None),
        ] {
            let s = Setup::new();
            let d = s.run(&[s.layer(0, &bytes, c)]).unwrap();
            assert_eq!(d.name, "disk.img");
            assert_eq!(std::fs::read(&d.path).unwrap(), data, "{c:?}");
            assert!(
                !s.staging().join("other").exists(),
                "non-disk entries are not written"
            );
        }
    }

    #[test]
    fn dot_slash_prefix_is_accepted() {
        let s = Setup::new();
        let d = s
            .run(&[s.layer(
                0,
                &tar_of(&[("./disk/x.qcow2", b"abc")]),
                LayerCompression::None,
            )])
            .unwrap();
        assert_eq!(d.name, "x.qcow2");
        assert_eq!(std::fs::read(d.path).unwrap(), b"abc");
    }

    #[test]
    fn zero_runs_become_holes() {
        let mut data = vec![0u8; 32 << 20];
        data[..1 << 20].fill(7);
        data[20 << 20..(21 << 20)].fill(9);
        let s = Setup::new();
        let d = s
            .run(&[s.layer(
                0,
                &gzip(&tar_of(&[("disk/d.raw", &data)])),
                LayerCompression::Gzip,
            )])
            .unwrap();
        assert_eq!(d.apparent_size, 32 << 20);
        assert!(
            d.allocated_bytes <= 3 << 20,
            "allocated {} of 32 MiB",
            d.allocated_bytes
        );
        assert_eq!(std::fs::read(&d.path).unwrap(), data);
        assert_eq!(
            std::fs::metadata(&d.path).unwrap().blocks() * 512,
            d.allocated_bytes
        );
    }

    #[test]
    fn later_layers_white_out_and_replace_disks() {
        let s = Setup::new();
        let l1 = s.layer(
            0,
            &tar_of(&[("disk/old.img", b"old")]),
            LayerCompression::None,
        );
        let l2 = s.layer(
            1,
            &tar_of(&[("disk/.wh.old.img", b""), ("disk/new.img", b"new")]),
            LayerCompression::None,
        );
        let d = s.run(&[l1.clone(), l2]).unwrap();
        assert_eq!(
            (d.name.as_str(), std::fs::read(&d.path).unwrap()),
            ("new.img", b"new".to_vec())
        );
        assert!(!s.staging().join("disk/old.img").exists());

        let s = Setup::new();
        let l1 = s.layer(
            0,
            &tar_of(&[("disk/a.img", b"a"), ("disk/b.img", b"b")]),
            LayerCompression::None,
        );
        let l2 = s.layer(
            1,
            &tar_of(&[("disk/.wh..wh..opq", b""), ("disk/c.img", b"c")]),
            LayerCompression::None,
        );
        assert_eq!(s.run(&[l1, l2]).unwrap().name, "c.img");
    }

    #[test]
    fn no_disk_and_several_disks_are_refused() {
        let s = Setup::new();
        assert!(matches!(
            s.run(&[s.layer(0, &tar_of(&[("etc/x", b"1")]), LayerCompression::None)]),
            Err(ExtractError::NoDisk)
        ));
        let s = Setup::new();
        match s.run(&[s.layer(
            0,
            &tar_of(&[("disk/a", b"1"), ("disk/b", b"2")]),
            LayerCompression::None,
        )]) {
            Err(ExtractError::MultipleDisks { names }) => assert_eq!(names, ["a", "b"]),
            other => panic!("{other:?}"),
        }
    }

    fn hostile(
        entries: &[(&str, tar::EntryType, Option<&str>)],
    ) -> (Setup, Result<ExtractedDisk, ExtractError>) {
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(
            &mut b,
            "disk/ok.img",
            tar::EntryType::Regular,
            None,
            b"fine",
        );
        for (path, kind, link) in entries {
            raw_entry(
                &mut b,
                path,
                *kind,
                *link,
                if kind.is_file() { b"evil" } else { b"" },
            );
        }
        let s = Setup::new();
        let l = s.layer(0, &b.into_inner().unwrap(), LayerCompression::None);
        let r = s.run(&[l]);
        (s, r)
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_escapes() {
        use tar::EntryType as T;
        type Case<'a> = (
            Vec<(&'a str, T, Option<&'a str>)>,
            fn(&ExtractError) -> bool,
        );
        let cases: Vec<Case> = vec![
            (vec![("/etc/passwd", T::Regular, None)], |e| {
                matches!(e, ExtractError::AbsolutePath { .. })
            }),
            (vec![("../escape", T::Regular, None)], |e| {
                matches!(e, ExtractError::PathTraversal { .. })
            }),
            (vec![("disk/../../escape", T::Regular, None)], |e| {
                matches!(e, ExtractError::PathTraversal { .. })
            }),
            (vec![("link", T::Symlink, Some("/etc/shadow"))], |e| {
                matches!(e, ExtractError::EscapingLink { .. })
            }),
            (vec![("a/link", T::Symlink, Some("../../etc"))], |e| {
                matches!(e, ExtractError::EscapingLink { .. })
            }),
            (vec![("hard", T::Link, Some("../outside"))], |e| {
                matches!(e, ExtractError::EscapingLink { .. })
            }),
            (vec![("disk/link.img", T::Symlink, Some("ok.img"))], |e| {
                matches!(e, ExtractError::LinkInDisk { .. })
            }),
            (vec![("x", T::Link, Some("disk/ok.img"))], |e| {
                matches!(e, ExtractError::LinkInDisk { .. })
            }),
            (vec![("dev/sda", T::Block, None)], |e| {
                matches!(e, ExtractError::DeviceNode { .. })
            }),
            (vec![("dev/tty", T::Char, None)], |e| {
                matches!(e, ExtractError::DeviceNode { .. })
            }),
            (vec![("pipe", T::Fifo, None)], |e| {
                matches!(e, ExtractError::DeviceNode { .. })
            }),
            (vec![("disk/sub/x.img", T::Regular, None)], |e| {
                matches!(e, ExtractError::NestedDiskFile { .. })
            }),
            (vec![("disk/second.img", T::Regular, None)], |e| {
                matches!(e, ExtractError::MultipleDisks { .. })
            }),
        ];
        for (entries, expected) in cases {
            let (s, r) = hostile(&entries);
            let err = r.expect_err(&format!("{entries:?} must be refused"));
            assert!(expected(&err), "{entries:?}: wrong error {err}");
            assert!(!err.to_string().is_empty());
            assert_eq!(
                s.outside_staging(),
                Vec::<String>::new(),
                "{entries:?} wrote outside staging"
            );
        }
        // Links elsewhere that stay inside are fine.
        let (_, r) = hostile(&[("etc/alias", tar::EntryType::Symlink, Some("../etc/x"))]);
        r.unwrap();
    }

    #[test]
    fn oversized_disk_is_refused_before_writing() {
        let s = Setup::new();
        let data = vec![1u8; 2 << 20];
        let l = s.layer(
            0,
            &tar_of(&[("disk/big.img", &data)]),
            LayerCompression::None,
        );
        let r = extract_disk(
            &[l],
            &s.staging(),
            &ExtractLimits {
                max_disk_bytes: 1 << 20,
                ..ExtractLimits::default()
            },
            &mut |_| {},
        );
        match r {
            Err(ExtractError::DiskTooLarge { size, limit, .. }) => {
                assert_eq!((size, limit), (2 << 20, 1 << 20))
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.staging().join("disk/big.img").exists());
    }

    #[test]
    fn corrupt_streams_are_reported_per_layer() {
        let s = Setup::new();
        let mut gz = gzip(&tar_of(&[("disk/d", &disk_bytes(1 << 20))]));
        gz.truncate(gz.len() / 2);
        match s.run(&[s.layer(0, &gz, LayerCompression::Gzip)]) {
            Err(ExtractError::Corrupt {
                layer: 0,
                compression: "gzip",
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn progress_reaches_the_compressed_total() {
        let s = Setup::new();
        let gz = gzip(&tar_of(&[("disk/d", &disk_bytes(2 << 20))]));
        let total = gz.len() as u64;
        let l = s.layer(0, &gz, LayerCompression::Gzip);
        let mut last = 0;
        extract_disk(&[l], &s.staging(), &ExtractLimits::default(), &mut |n| {
            last = n
        })
        .unwrap();
        assert_eq!(last, total);
    }
}
