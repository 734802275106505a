//! What a reference resolves to on this node: the platform wanted, the manifest picked from an
//! index, and its layers.

use oci_client::manifest::{ImageIndexEntry, OciImageManifest};

/// The node's platform in OCI terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
}

impl Default for PlatformSpec {
    fn default() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
        }
    }
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// A reference resolved to this node's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub reference: String,
    /// Digest of what the reference names (an index or a manifest): the cache key.
    pub digest: String,
    /// Digest of the platform manifest whose layers are pulled.
    pub manifest_digest: String,
    pub layers: Vec<LayerDescriptor>,
    pub total_layer_bytes: u64,
}

pub(super) fn resolved(
    reference: &str,
    digest: String,
    manifest_digest: String,
    image: &OciImageManifest,
) -> ResolvedImage {
    let layers: Vec<LayerDescriptor> = image
        .layers
        .iter()
        .map(|l| LayerDescriptor {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            size: l.size.max(0) as u64,
        })
        .collect();
    ResolvedImage {
        reference: reference.to_string(),
        digest,
        manifest_digest,
        total_layer_bytes: layers.iter().map(|l| l.size).sum(),
        layers,
    }
}

/// The index entry for `platform` (os and architecture must match).
pub fn pick_platform<'a>(
    entries: &'a [ImageIndexEntry],
    platform: &PlatformSpec,
) -> Option<&'a ImageIndexEntry> {
    entries.iter().find(|e| {
        e.platform.as_ref().is_some_and(|p| {
            p.os.to_string() == platform.os && p.architecture.to_string() == platform.architecture
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_selection() {
        let entries: Vec<ImageIndexEntry> = serde_json::from_value(serde_json::json!([
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:aa", "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:bb", "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}
        ]))
        .unwrap();
        let arm = PlatformSpec {
            os: "linux".into(),
            architecture: "arm64".into(),
        };
        assert_eq!(pick_platform(&entries, &arm).unwrap().digest, "sha256:bb");
        let s390 = PlatformSpec {
            os: "linux".into(),
            architecture: "s390x".into(),
        };
        assert!(pick_platform(&entries, &s390).is_none());
        assert_eq!(PlatformSpec::default().os, "linux");
    }
}
