//! The image reference a `VMDiskImage` names: `[docker://]registry[:port]/repository[:tag][@digest]`.
//!
//! The CRD's CEL rule checks the same shape at admission (see [`REFERENCE_PATTERN`]); this parser
//! is what the controller and agents use, and it splits the reference into its parts.

use std::fmt;
use thiserror::Error;

/// Regular expression (RE2 and Rust `regex` compatible) the CRD validates `url` against.
pub const REFERENCE_PATTERN: &str = r"^(docker://)?[a-zA-Z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {0:?} has no registry host (expected e.g. quay.io/containerdisks/fedora:40)")]
    NoRegistry(String),
    #[error("image reference {0:?} has an invalid repository path {1:?}")]
    BadRepository(String, String),
    #[error("image reference {0:?} has an invalid tag {1:?}")]
    BadTag(String, String),
    #[error("image reference {0:?} has an invalid digest {1:?} (expected sha256:<64 hex>)")]
    BadDigest(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageReference {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let full = input.trim();
        let s = full.strip_prefix("docker://").unwrap_or(full);
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                let valid = digest
                    .strip_prefix("sha256:")
                    .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()));
                if !valid {
                    return Err(ReferenceError::BadDigest(input.into(), digest.into()));
                }
                (rest, Some(digest.to_ascii_lowercase()))
            }
            None => (s, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| ReferenceError::NoRegistry(input.into()))?;
        let host_like = registry.contains('.') || registry.contains(':') || registry == "localhost";
        if registry.is_empty() || !host_like {
            return Err(ReferenceError::NoRegistry(input.into()));
        }
        // A ':' after the last '/' separates the tag.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                    && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && part.ends_with(|c: char| c.is_ascii_alphanumeric())
            });
        if !repo_ok {
            return Err(ReferenceError::BadRepository(
                input.into(),
                repository.into(),
            ));
        }
        if let Some(tag) = tag {
            let tag_ok = !tag.is_empty()
                && tag.len() <= 128
                && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !tag_ok {
                return Err(ReferenceError::BadTag(input.into(), tag.into()));
            }
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The same image pinned to `digest` (what agents pull).
    pub fn with_digest(&self, digest: &str) -> Self {
        Self {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// True when the reference can move (no digest): it must be resolved and may be re-polled.
    pub fn is_moving(&self) -> bool {
        self.digest.is_none()
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let r = ImageReference::parse("docker://quay.io/containerdisks/fedora:40").unwrap();
        assert_eq!(r.registry, "quay.io");
        assert_eq!(r.repository, "containerdisks/fedora");
        assert_eq!(r.tag.as_deref(), Some("40"));
        assert!(r.is_moving());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageReference::parse(&format!("127.0.0.1:5000/disks/alpine@{d}")).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/disks/alpine@{d}"));
        assert!(!r.is_moving());
    }

    #[test]
    fn rejects_bad_shapes() {
        assert_eq!(ImageReference::parse(""), Err(ReferenceError::Empty));
        assert!(matches!(
            ImageReference::parse("fedora:40"),
            Err(ReferenceError::NoRegistry(_))
        ));
        assert!(matches!(
            ImageReference::parse("library/fedora"),
            Err(ReferenceError::NoRegistry(_))
        ));
        assert!(matches!(
            ImageReference::parse("quay.io/Fedora:40"),
            Err(ReferenceError::BadRepository(..))
        ));
        assert!(matches!(
            ImageReference::parse("quay.io/fedora:4 0"),
            Err(ReferenceError::BadTag(..))
        ));
        assert!(matches!(
            ImageReference::parse("quay.io/fedora@sha256:abc"),
            Err(ReferenceError::BadDigest(..))
        ));
    }
}
