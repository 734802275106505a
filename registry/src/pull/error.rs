//! How a registry failure is told to the user: [`PullError`], and the mapping of oci-client's
//! errors onto it (which failures are worth a retry, which are the user's to fix).

use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum PullError {
    #[error("invalid image reference {reference:?}: {message}")]
    BadReference { reference: String, message: String },
    #[error("registry {registry} refused the credentials (check the pull secret / docker config): {message}")]
    Unauthorized { registry: String, message: String },
    #[error("{reference} not found in the registry: {message}")]
    NotFound { reference: String, message: String },
    #[error("no manifest for platform {wanted} in {reference} (available: {available})")]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("blob {digest} does not match its digest (got {actual}); the download was discarded")]
    DigestMismatch { digest: String, actual: String },
    #[error("blob {digest} does not match its digest after peers {peers:?} sent part of it; the download was discarded")]
    PeerCorrupt { digest: String, peers: Vec<String> },
    #[error("registry {registry} failed after {attempts} attempts: {message}")]
    Transient {
        registry: String,
        attempts: u32,
        message: String,
    },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("invalid CA bundle: {0}")]
    BadCaBundle(String),
    #[error("{context}: {message}")]
    Io { context: String, message: String },
}

fn has_code(envelope: &OciEnvelope, codes: &[OciErrorCode]) -> bool {
    envelope.errors.iter().any(|e| codes.contains(&e.code))
}

pub(super) fn classify(registry: &str, reference: &str, e: OciDistributionError) -> PullError {
    use OciDistributionError as E;
    use OciErrorCode as C;
    let message = e.to_string();
    match e {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => PullError::Unauthorized {
            registry: registry.to_string(),
            message,
        },
        E::ImageManifestNotFoundError(_) => PullError::NotFound {
            reference: reference.to_string(),
            message,
        },
        E::ServerError { code, .. } if code == 401 || code == 403 => PullError::Unauthorized {
            registry: registry.to_string(),
            message,
        },
        E::ServerError { code: 404, .. } => PullError::NotFound {
            reference: reference.to_string(),
            message,
        },
        E::ServerError { code, .. } if code >= 500 => PullError::Transient {
            registry: registry.to_string(),
            attempts: 1,
            message,
        },
        E::RegistryError { ref envelope, .. }
            if has_code(
                envelope,
                &[
                    C::ManifestUnknown,
                    C::BlobUnknown,
                    C::NameUnknown,
                    C::NotFound,
                    C::ManifestBlobUnknown,
                ],
            ) =>
        {
            PullError::NotFound {
                reference: reference.to_string(),
                message,
            }
        }
        E::RegistryError { ref envelope, .. }
            if has_code(envelope, &[C::Unauthorized, C::Denied]) =>
        {
            PullError::Unauthorized {
                registry: registry.to_string(),
                message,
            }
        }
        E::RequestError(_) | E::IoError(_) => PullError::Transient {
            registry: registry.to_string(),
            attempts: 1,
            message: vmdisk_support::error_chain(&e),
        },
        _ => PullError::Registry {
            registry: registry.to_string(),
            message,
        },
    }
}

pub(super) fn is_transient(e: &PullError) -> bool {
    matches!(e, PullError::Transient { .. })
}
