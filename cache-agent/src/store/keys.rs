//! Entry names and paths: what an entry is ([`EntryKey`]: an image digest and the format it is
//! stored in), the one directory name it maps to and back, and where each part of the cache
//! lives under its root. A digest that is not `<algorithm>:<hex>` maps to no name at all, so a
//! hostile digest can never name a path.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmdisk_crds::DiskFormat;

use super::CacheStore;

/// What an entry is: the image digest and the format it is stored in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryKey {
    pub digest: String,
    pub format: DiskFormat,
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.digest, self.format)
    }
}

impl EntryKey {
    /// The entry's directory name; `None` for digests that are not `<alg>:<hex>`, so a hostile
    /// digest can never name a path.
    pub fn dir_name(&self) -> Option<String> {
        let (alg, hex) = self.digest.split_once(':')?;
        let ok = !alg.is_empty()
            && alg.chars().all(|c| c.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.chars().all(|c| c.is_ascii_hexdigit());
        ok.then(|| format!("{alg}-{hex}-{}", self.format))
    }

    /// The key an entry directory name stands for; `None` for anything `dir_name` would not
    /// produce.
    pub fn from_dir_name(name: &str) -> Option<Self> {
        let (rest, format) = name.rsplit_once('-')?;
        let (alg, hex) = rest.split_once('-')?;
        let key = EntryKey {
            digest: format!("{alg}:{hex}"),
            format: format.parse().ok()?,
        };
        (key.dir_name()? == name).then_some(key)
    }

    pub(super) fn disk_file_name(&self) -> String {
        format!("disk.{}", self.format)
    }
}

impl CacheStore {
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.root.join("entries")
    }

    pub(super) fn staging_root(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// The entry's directory; `None` for a digest that is not `<algorithm>:<hex>`.
    pub fn entry_dir(&self, key: &EntryKey) -> Option<PathBuf> {
        key.dir_name().map(|n| self.entries_dir().join(n))
    }

    pub(super) fn disk_path(&self, key: &EntryKey) -> Option<PathBuf> {
        self.entry_dir(key).map(|d| d.join(key.disk_file_name()))
    }

    pub(super) fn lease_path(&self, key: &EntryKey) -> Option<PathBuf> {
        key.dir_name()
            .map(|n| self.root.join("leases").join(format!("{n}.lock")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::key;

    #[test]
    fn keys_round_trip_dir_names_and_refuse_hostile_digests() {
        let k = key(7, DiskFormat::Qcow2);
        assert_eq!(k.to_string(), format!("sha256:{}/qcow2", "07".repeat(32)));
        assert_eq!(EntryKey::from_dir_name(&k.dir_name().unwrap()), Some(k));
        for digest in [
            "sha256:../../etc",
            "sha256:",
            ":abcd",
            "nocolon",
            "sha-256:ab",
        ] {
            let hostile = EntryKey {
                digest: digest.into(),
                format: DiskFormat::Raw,
            };
            assert_eq!(hostile.dir_name(), None, "{digest}");
        }
        for name in ["sha256-zz-raw", "sha256-ab-vmdk", "sha256-ab", "x"] {
            assert_eq!(EntryKey::from_dir_name(name), None, "{name}");
        }
    }
}
