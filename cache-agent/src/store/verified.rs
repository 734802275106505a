//! Records of verified pulls: which requesters a registry confirmed may pull
//! `<repository>@<digest>`, and when, so that a cached disk is handed to a requester only
//! after its own credentials were checked, and the same requester needs no registry round trip
//! again for a while (as the kubelet does for images with its records of verified pull
//! credentials).
//!
//! ```text
//! <root>/verified/<algorithm>-<hex>/<record>.json   one per (registry, repository, identity)
//! ```
//!
//! A record names the requester only by `credential_identity` (a hash of its credentials,
//! or `anonymous`), never the credentials themselves. Records are per digest, not per entry:
//! they say what the registry allowed, whatever format the disk is cached in, and they stay
//! valid if the entry is evicted and warmed again. Writes are best effort (a lost record costs
//! one more round trip, never a wrong answer) and atomic (write, then rename).

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::commit::random_name;
use super::CacheStore;

/// Who asked for a disk: where it says the disk comes from and with which credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Requester {
    /// Registry host[:port].
    pub registry: String,
    /// Repository within the registry.
    pub repository: String,
    /// `vmdisk_registry::credential_identity` of the credentials it presents.
    pub identity: String,
}

/// One record: the registry confirmed `requester` may pull the digest at `verified_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    #[serde(flatten)]
    requester: Requester,
    verified_at: DateTime<Utc>,
}

impl Requester {
    /// The record's file name: a hash of the three fields, so that no field (a repository
    /// path, say) ever becomes a path component.
    fn file_name(&self) -> String {
        let mut hash = Sha256::new();
        for part in [&self.registry, &self.repository, &self.identity] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        format!("{}.json", hex::encode(&hash.finalize()[..16]))
    }
}

impl CacheStore {
    fn verified_dir(&self, digest: &str) -> Option<PathBuf> {
        let (alg, hex) = digest.split_once(':')?;
        let valid = !alg.is_empty()
            && alg.bytes().all(|b| b.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| self.root.join("verified").join(format!("{alg}-{hex}")))
    }

    /// Whether the registry confirmed `requester` may pull `digest` less than `ttl` ago.
    pub fn verified_within(&self, digest: &str, requester: &Requester, ttl: Duration) -> bool {
        let Some(path) = self
            .verified_dir(digest)
            .map(|d| d.join(requester.file_name()))
        else {
            return false;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
            return false;
        };
        let age = Utc::now().signed_duration_since(record.verified_at);
        // A record from the future (a clock that jumped back) is not trusted either.
        record.requester == *requester
            && age >= chrono::Duration::zero()
            && age.to_std().is_ok_and(|age| age < ttl)
    }

    /// Records that the registry confirmed `requester` may pull `digest` now.
    pub fn record_verified(&self, digest: &str, requester: &Requester) {
        let Some(dir) = self.verified_dir(digest) else {
            return;
        };
        let record = Record {
            requester: requester.clone(),
            verified_at: Utc::now(),
        };
        let tmp = dir.join(format!(".{}", random_name()));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::fs::write(
                    &tmp,
                    serde_json::to_vec(&record).expect("a record serializes"),
                )
            })
            .and_then(|()| std::fs::rename(&tmp, dir.join(requester.file_name())));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, digest, "could not record a verified pull");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Budget;

    const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn requester(identity: &str) -> Requester {
        Requester {
            registry: "registry.example.com".into(),
            repository: "team-a/disk".into(),
            identity: identity.into(),
        }
    }

    #[test]
    fn a_record_holds_for_its_requester_and_ttl_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let alice = requester("sha256:alice");
        let hour = Duration::from_secs(3600);
        assert!(
            !store.verified_within(DIGEST, &alice, hour),
            "nothing recorded yet"
        );
        store.record_verified(DIGEST, &alice);
        assert!(store.verified_within(DIGEST, &alice, hour));
        assert!(
            !store.verified_within(DIGEST, &alice, Duration::ZERO),
            "expired"
        );
        assert!(!store.verified_within(DIGEST, &requester("anonymous"), hour));
        let elsewhere = Requester {
            repository: "team-b/disk".into(),
            ..alice.clone()
        };
        assert!(!store.verified_within(DIGEST, &elsewhere, hour));
        let other_digest = DIGEST.replace('a', "b");
        assert!(!store.verified_within(&other_digest, &alice, hour));
        // A digest that is no path component is never recorded nor found.
        store.record_verified("sha256:../../etc", &alice);
        assert!(!store.verified_within("sha256:../../etc", &alice, hour));
        assert!(!dir.path().join("etc").exists());
    }

    #[test]
    fn a_tampered_or_future_record_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let alice = requester("sha256:alice");
        store.record_verified(DIGEST, &alice);
        let path = store.verified_dir(DIGEST).unwrap().join(alice.file_name());
        let mut record: Record = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        record.verified_at = Utc::now() + chrono::Duration::hours(1);
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        assert!(!store.verified_within(DIGEST, &alice, Duration::from_secs(86400)));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(!store.verified_within(DIGEST, &alice, Duration::from_secs(86400)));
    }
}
