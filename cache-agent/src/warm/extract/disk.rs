//! Writing the one disk entry: as it is in the image (zero blocks as holes, through
//! `SparseFile`), or decoded to raw on the way when raw is wanted and a decoder takes the
//! image (only its header decides; once bytes are consumed, a failure is the extraction's).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::{DiskTarget, ExtractLimits};
use crate::warm::decode::DecodeError;
use crate::warm::sparse::SparseFile;

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
pub(super) fn write_disk(
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
            Err(DecodeError::Unsupported(why)) => {
                tracing::info!(%why, "disk kept as it is for qemu-img");
                return Ok(None);
            }
            Err(DecodeError::TooLarge { size, .. }) => return Err(WriteFailure::TooLarge(size)),
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

/// Why writing the disk stopped, before the extraction names the layer and file.
pub(super) enum WriteFailure {
    Read(std::io::Error),
    Write(std::io::Error),
    Disk(DecodeError),
    TooLarge(u64),
}
