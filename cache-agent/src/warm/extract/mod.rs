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
//!
//! This file walks the layers and their tar entries; `paths` decides where an entry sits and
//! whether its path or link stays inside the image, and `disk` writes the one disk entry
//! (through a decoder when one takes it).

mod disk;
mod paths;
pub mod peek;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use thiserror::Error;

use self::disk::{write_disk, WriteFailure};
use self::paths::{link_stays_inside, normalise, place, Place};

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
    #[error("layer {layer} inflates to more than {limit} bytes (the disk limit plus {slack} bytes for everything else); refused")]
    LayerTooLarge {
        layer: usize,
        limit: u64,
        slack: u64,
    },
    #[error("layer {layer} has tar extension headers (GNU long names, PAX records) over {limit} bytes before one entry; refused")]
    HeadersTooLarge { layer: usize, limit: u64 },
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
    /// What a layer may inflate to besides the disk ([`LAYER_SLACK_BYTES`]).
    pub layer_slack_bytes: u64,
}

/// What a layer may inflate to besides its disk: tar headers, directories, and files a
/// containerDisk does not use (which are read through, not kept). A multi-GiB entry nobody
/// uses is refused rather than inflated for nothing.
pub const LAYER_SLACK_BYTES: u64 = 1 << 30;

impl Default for ExtractLimits {
    fn default() -> Self {
        Self {
            max_disk_bytes: 2 << 40,
            max_pending_reads: crate::warm::decode::DEFAULT_MAX_PENDING_READS,
            layer_slack_bytes: LAYER_SLACK_BYTES,
        }
    }
}

impl ExtractLimits {
    /// The most one layer may inflate to.
    pub fn max_layer_inflated_bytes(&self) -> u64 {
        self.max_disk_bytes.saturating_add(self.layer_slack_bytes)
    }

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

/// The inflated side of a layer, refusing to yield more than `limit` bytes; `exceeded` tells
/// the caller why the tar reader failed.
struct Capped<R> {
    inner: R,
    left: u64,
    exceeded: Rc<Cell<bool>>,
    /// While the tar crate looks for the next entry: what it may still read. It buffers GNU
    /// long names and PAX records whole, so these bytes are memory.
    between_entries: Rc<Cell<Option<u64>>>,
    headers_exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(std::io::Error::other("layer inflates past its limit"));
        }
        self.left -= n as u64;
        if let Some(left) = self.between_entries.get() {
            if n as u64 > left {
                self.headers_exceeded.set(true);
                return Err(std::io::Error::other(
                    "tar extension headers past their limit",
                ));
            }
            self.between_entries.set(Some(left - n as u64));
        }
        Ok(n)
    }
}

/// What the headers between two entries may take: the 512-byte headers, padding, and the GNU
/// long names and PAX records the tar crate reads into memory before it yields the entry
/// (libarchive refuses such headers over 1 MiB too).
pub const MAX_ENTRY_HEADER_BYTES: u64 = 1 << 20;

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
        let exceeded = Rc::new(Cell::new(false));
        let between_entries = Rc::new(Cell::new(None));
        let headers_exceeded = Rc::new(Cell::new(false));
        let corrupt = |source| {
            if headers_exceeded.get() {
                ExtractError::HeadersTooLarge {
                    layer,
                    limit: MAX_ENTRY_HEADER_BYTES,
                }
            } else if exceeded.get() {
                ExtractError::LayerTooLarge {
                    layer,
                    limit: limits.max_layer_inflated_bytes(),
                    slack: limits.layer_slack_bytes,
                }
            } else {
                ExtractError::Corrupt {
                    layer,
                    compression: compression.name(),
                    source,
                }
            }
        };
        let inflated: Box<dyn Read> = match compression {
            LayerCompression::None => Box::new(counted),
            LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
            LayerCompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(counted).map_err(corrupt)?)
            }
        };
        let reader = Capped {
            inner: inflated,
            left: limits.max_layer_inflated_bytes(),
            exceeded: Rc::clone(&exceeded),
            between_entries: Rc::clone(&between_entries),
            headers_exceeded: Rc::clone(&headers_exceeded),
        };
        let mut archive = tar::Archive::new(reader);
        let mut entries = archive.entries().map_err(corrupt)?;
        loop {
            between_entries.set(Some(MAX_ENTRY_HEADER_BYTES));
            let next = entries.next();
            between_entries.set(None);
            let Some(entry) = next else { break };
            let mut entry = entry.map_err(corrupt)?;
            'entry: {
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
                    break 'entry;
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
                        || (kind.is_hard_link()
                            && !matches!(place(&target_parts), Place::Elsewhere));
                    if touches_disk {
                        return Err(ExtractError::LinkInDisk {
                            layer,
                            entry: entry_name,
                        });
                    }
                    break 'entry;
                }
                if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                    return Err(ExtractError::DeviceNode {
                        layer,
                        entry: entry_name,
                    });
                }
                let regular = kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse();
                if !regular {
                    break 'entry; // directories, pax/GNU metadata entries
                }
                match place(&parts) {
                    Place::Elsewhere | Place::DiskDir => break 'entry,
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
                        let decoded =
                            write_disk(&mut entry, size, &out_path, target, limits, &mut buf)
                                .map_err(|failure| match failure {
                                    WriteFailure::Read(e)
                                        if exceeded.get()
                                            || e.kind() == std::io::ErrorKind::InvalidData
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
                                    WriteFailure::Disk(source) => {
                                        ExtractError::Disk { layer, source }
                                    }
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
            // What the entry's handling left unread is read here, outside the headers' budget:
            // the tar crate's own skip to the next header is then only padding.
            std::io::copy(&mut entry, &mut std::io::sink()).map_err(corrupt)?;
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
