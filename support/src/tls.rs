//! Serving certificate: loaded from a mounted Secret directory (`tls.crt`, `tls.key`) and
//! hot-reloaded when kubelet swaps the Secret's `..data` symlink.
//!
//! New handshakes pick up the new pair through [`ReloadingCertResolver`]; established
//! connections keep the session they negotiated, so a renewal breaks nothing. A new pair that
//! does not load (bad PEM, key not matching the certificate) is refused with a log line and
//! the old pair keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use crate::dir_watch::DirWatch;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM certificate chain: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error("{path} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("the private key in {key} does not match the certificate in {cert}: {message}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot watch certificate directory {path}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Where the serving pair lives.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    /// The layout of a `kubernetes.io/tls` Secret mounted as a directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

/// Reads and checks a certificate chain and its private key.
pub fn load_certified_key(paths: &CertPaths) -> Result<CertifiedKey, TlsError> {
    let cert_pem = std::fs::read(&paths.cert).map_err(|source| TlsError::Read {
        path: paths.cert.clone(),
        source,
    })?;
    let key_pem = std::fs::read(&paths.key).map_err(|source| TlsError::Read {
        path: paths.key.clone(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: paths.cert.clone(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: paths.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: paths.key.clone(),
        message: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadKey {
                path: paths.key.clone(),
                message: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| TlsError::KeyMismatch {
        cert: paths.cert.clone(),
        key: paths.key.clone(),
        message: e.to_string(),
    })?;
    Ok(certified)
}

/// Hands every new handshake the current pair.
#[derive(Debug)]
pub struct ReloadingCertResolver {
    paths: CertPaths,
    current: ArcSwap<CertifiedKey>,
    generation: AtomicU64,
}

impl ReloadingCertResolver {
    pub fn load(paths: CertPaths) -> Result<Arc<Self>, TlsError> {
        let key = load_certified_key(&paths)?;
        Ok(Arc::new(Self {
            paths,
            current: ArcSwap::from_pointee(key),
            generation: AtomicU64::new(1),
        }))
    }

    /// Reloads the pair; on error the current pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.paths)?;
        if key.cert == self.current.load().cert {
            return Ok(());
        }
        self.current.store(Arc::new(key));
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(cert = %self.paths.cert.display(), "serving certificate reloaded");
        Ok(())
    }

    /// How many distinct pairs have been served (1 after the first load).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Watches the certificate directory (non-recursive: kubelet replaces files by renaming
    /// the `..data` symlink, and a watch on the file itself dies with the first rotation) and
    /// reloads on change until the guard is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<CertWatch, TlsError> {
        let dir = self
            .paths
            .cert
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let me = Arc::clone(self);
        DirWatch::start(&dir, move || {
            if let Err(e) = me.reload() {
                tracing::error!(error = %crate::error_chain(&e), "new serving certificate refused; the previous one keeps serving");
            }
        })
        .map_err(|source| TlsError::Watch { path: dir, source })
    }
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Keeps a certificate directory watch alive.
pub type CertWatch = DirWatch;

/// A server config for TLS 1.2 and 1.3 only, HTTP/1.1 and HTTP/2, using `resolver`.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let pair = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join("tls.crt"), pair.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), pair.signing_key.serialize_pem()).unwrap();
        pair
    }

    #[test]
    fn loads_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "localhost");
        load_certified_key(&CertPaths::in_dir(dir.path())).unwrap();
    }

    #[test]
    fn refuses_mismatched_garbage_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::in_dir(dir.path());
        assert!(matches!(
            load_certified_key(&paths),
            Err(TlsError::Read { .. })
        ));
        write_pair(dir.path(), "a");
        let other = rcgen::generate_simple_self_signed(vec!["b".to_string()]).unwrap();
        std::fs::write(&paths.key, other.signing_key.serialize_pem()).unwrap();
        assert!(matches!(
            load_certified_key(&paths),
            Err(TlsError::KeyMismatch { .. })
        ));
        std::fs::write(
            &paths.key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(matches!(
            load_certified_key(&paths),
            Err(TlsError::BadKey { .. })
        ));
        std::fs::write(&paths.cert, "hello").unwrap();
        assert!(matches!(
            load_certified_key(&paths),
            Err(TlsError::NoCertificate { .. })
        ));
    }

    #[test]
    fn bad_reload_keeps_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a");
        let resolver = ReloadingCertResolver::load(CertPaths::in_dir(dir.path())).unwrap();
        let before = resolver.current.load_full();
        std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
        assert!(resolver.reload().is_err());
        assert_eq!(resolver.current.load().cert, before.cert);
        assert_eq!(resolver.generation(), 1);
        write_pair(dir.path(), "b");
        resolver.reload().unwrap();
        assert_ne!(resolver.current.load().cert, before.cert);
        assert_eq!(resolver.generation(), 2);
    }
}
