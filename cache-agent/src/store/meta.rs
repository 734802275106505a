//! `meta.json`: what the cache records beside each disk ([`EntryMeta`], plus the disk file's
//! length at commit), how it is read back and checked against the entry it sits in, and the
//! check a raw disk's length must pass against it. Commit writes it; `touch` replaces it by
//! rename when it records a use.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmdisk_crds::DiskFormat;

use super::integrity::MetaState;
use super::EntryKey;

/// Metadata stored beside each disk (`meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryMeta {
    pub digest: String,
    pub format: DiskFormat,
    pub source_format: String,
    pub virtual_size: u64,
    pub allocated_size: u64,
    pub created: DateTime<Utc>,
    pub last_used: DateTime<Utc>,
    #[serde(default)]
    pub reference: Option<String>,
    /// How the warm that made the entry pulled it (absent in entries committed before this
    /// was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullRecord>,
}

/// When a warm began and where the layers' bytes came from; the entry's `created` is when it
/// ended. Reported in the node's NodeDiskCache status, summed per image by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullRecord {
    pub started: DateTime<Utc>,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
}

/// `meta.json` as written: the metadata plus the disk file's length at commit, which is what
/// open checks a qcow2 disk against (its virtual size says nothing about its file length).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MetaFile {
    #[serde(flatten)]
    pub(super) meta: EntryMeta,
    pub(super) disk_length: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub key: EntryKey,
    pub meta: EntryMeta,
    pub disk_path: PathBuf,
}

pub(super) const META_FILE: &str = "meta.json";
pub(super) const META_TMP_PREFIX: &str = ".meta.json.";

/// Reads and checks `meta.json` of the entry `key` in `dir`.
pub(super) fn read_meta(dir: &Path, key: &EntryKey) -> Result<MetaFile, MetaState> {
    let bytes = match std::fs::read(dir.join(META_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MetaState::Missing),
        Err(e) => return Err(MetaState::Unreadable(e.to_string())),
    };
    let file: MetaFile =
        serde_json::from_slice(&bytes).map_err(|e| MetaState::Unreadable(e.to_string()))?;
    if file.meta.digest != key.digest || file.meta.format != key.format {
        return Err(MetaState::Unreadable(format!(
            "it describes {}/{}, not {key}",
            file.meta.digest, file.meta.format
        )));
    }
    Ok(file)
}

/// The problem that makes a raw disk of `len` bytes disagree with `meta`, if any.
pub(super) fn raw_length_problem(meta: &EntryMeta, len: u64) -> Option<String> {
    (meta.format == DiskFormat::Raw && len != meta.virtual_size).then(|| {
        format!(
            "raw disk is {len} bytes but its virtual size is {} bytes",
            meta.virtual_size
        )
    })
}
