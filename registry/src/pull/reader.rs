//! The consumer's side of a layer download: a blocking `std::io::Read` over the chunks the
//! download sends, which ends only once the digest checked out.

use bytes::Bytes;

/// Chunks in flight between a download and its consumer. hyper hands out chunks of up to
/// ~400 KiB from a fast connection, so this keeps a few MiB in flight at most.
pub(super) const STREAM_CHUNKS: usize = 8;

/// A layer's bytes for a consumer on a blocking thread (`std::io::Read`). Ends only once the
/// digest checked out; a failed download is an error where the data stops.
pub struct LayerReader {
    pub(super) rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    pub(super) current: Bytes,
    pub(super) failed: Option<String>,
}

impl std::io::Read for LayerReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(message) = &self.failed {
                return Err(std::io::Error::other(message.clone()));
            }
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current[..n]);
                self.current = self.current.slice(n..);
                return Ok(n);
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(message)) => self.failed = Some(message),
                None => return Ok(0),
            }
        }
    }
}

impl LayerReader {
    /// Reads what is left (a consumer may stop before the compressed stream's trailer), so the
    /// download can finish and its digest be checked.
    pub fn drain(&mut self) -> std::io::Result<u64> {
        std::io::copy(self, &mut std::io::sink())
    }
}
