//! A cached disk goes only to requesters the registry lets pull it. An entry is keyed by
//! digest, and a digest is no secret (it shows in statuses, Events, manifests), so a reference
//! pinned to a cached digest proves nothing by itself: before such a hit is served, the
//! requester's own credentials (anonymous when it has none) must get a manifest HEAD of
//! `<repository>@<digest>` answered by the registry the reference names. A record of that
//! answer spares the same requester the round trip for `ttl`, which is also how long a warm
//! populate keeps working while the registry is unreachable.
//!
//! `NeverVerify` serves every cached digest to anyone who names it: only for clusters whose
//! users all may read every image.

use std::str::FromStr;
use std::time::Duration;

use vmdisk_crds::ImageReference;
use vmdisk_registry::credential_identity;
use vmdisk_registry::pull::RegistryOptions;

use super::{WarmError, WarmRequest, Warmer};
use crate::store::Requester;

/// How long a verified pull holds by default: a day, like a pull secret rotated in the
/// morning is honoured by the evening.
pub const DEFAULT_VERIFIED_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether cache hits are checked against the registry (the kubelet's
/// `imagePullCredentialsVerificationPolicy`, for disks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyPolicy {
    /// Every requester's credentials are verified for the digest, then trusted for `ttl`.
    AlwaysVerify { ttl: Duration },
    /// Cached digests are served without asking the registry.
    NeverVerify,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        VerifyPolicy::AlwaysVerify {
            ttl: DEFAULT_VERIFIED_TTL,
        }
    }
}

impl FromStr for VerifyPolicy {
    type Err = String;

    /// `AlwaysVerify` or `NeverVerify` (the TTL is set apart).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "AlwaysVerify" => Ok(VerifyPolicy::default()),
            "NeverVerify" => Ok(VerifyPolicy::NeverVerify),
            other => Err(format!("{other:?}: expected AlwaysVerify or NeverVerify")),
        }
    }
}

/// The requester behind `reference` with `options`' credentials.
pub fn requester(reference: &str, options: &RegistryOptions) -> Option<Requester> {
    let parsed = ImageReference::parse(reference).ok()?;
    Some(Requester {
        registry: parsed.registry,
        repository: parsed.repository,
        identity: credential_identity(&options.auth),
    })
}

impl Warmer {
    /// Proves that `request`'s requester may pull `digest` before a cache hit is served.
    pub(super) async fn authorize(
        &self,
        request: &WarmRequest,
        digest: &str,
    ) -> Result<(), WarmError> {
        let VerifyPolicy::AlwaysVerify { ttl } = self.verify else {
            return Ok(());
        };
        let refused = |source| WarmError::NotVerified {
            reference: request.reference.clone(),
            source,
        };
        let requester = requester(&request.reference, &request.registry).ok_or_else(|| {
            refused(vmdisk_registry::PullError::BadReference {
                reference: request.reference.clone(),
                message: "cannot tell its registry and repository".into(),
            })
        })?;
        if self.store.verified_within(digest, &requester, ttl) {
            return Ok(());
        }
        let pinned = format!("{}/{}@{digest}", requester.registry, requester.repository);
        self.puller
            .resolve_digest(&pinned, &request.registry)
            .await
            .map_err(refused)?;
        tracing::debug!(reference = %request.reference, registry = %requester.registry, repository = %requester.repository, "registry confirmed the requester may pull the digest");
        self.store.record_verified(digest, &requester);
        Ok(())
    }

    /// Remembers that the registry just served `digest` to `request`'s requester (a resolve or
    /// a pull with its credentials), so that its pinned requests need no round trip.
    pub(super) fn record_served(&self, request: &WarmRequest, digest: &str) {
        if let Some(requester) = requester(&request.reference, &request.registry) {
            self.store.record_verified(digest, &requester);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_default_to_always_verify() {
        assert_eq!(
            "AlwaysVerify".parse::<VerifyPolicy>(),
            Ok(VerifyPolicy::default())
        );
        assert_eq!(
            "NeverVerify".parse::<VerifyPolicy>(),
            Ok(VerifyPolicy::NeverVerify)
        );
        let e = "sometimes".parse::<VerifyPolicy>().unwrap_err();
        assert!(e.contains("AlwaysVerify or NeverVerify"), "{e}");
    }

    #[test]
    fn requesters_differ_by_repository_and_credentials() {
        let anonymous = RegistryOptions::default();
        let pinned = format!("registry.example.com/team-a/disk@sha256:{}", "0".repeat(64));
        let a = requester(&pinned, &anonymous).unwrap();
        assert_eq!(a.registry, "registry.example.com");
        assert_eq!(a.repository, "team-a/disk");
        assert_eq!(a.identity, "anonymous");
        let with_password = RegistryOptions {
            auth: oci_client::secrets::RegistryAuth::Basic("a".into(), "b".into()),
            ..RegistryOptions::default()
        };
        let b = requester("registry.example.com/team-a/disk:1", &with_password).unwrap();
        assert_ne!(a.identity, b.identity);
        assert!(requester("", &anonymous).is_none());
    }
}
