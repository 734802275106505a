//! The pull credentials of an image this node prefetches, from the controller's agent API.
//!
//! Agents read no Secret: a node's agent token could otherwise read the credentials of every
//! image in the cluster. Instead the agent shows the controller its pod's projected
//! ServiceAccount token (audience `vmdisk-controller`, bound to the pod, so the API server
//! vouches for the node) and gets the credentials of one image, only if its node prefetches
//! that image. The token and the CA are read from their files at every request: the kubelet
//! rotates the token and cert-manager may renew the CA.
//!
//! A URL naming a Service (`https://<service>.<namespace>.svc:<port>`) is reached through that
//! Service's ready EndpointSlice addresses, read from the API server, with the certificate
//! checked for the Service's name: the agent needs neither cluster DNS nor kube-proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use vmdisk_crds::{AccessScope, ApiAccess, AGENT_API_CREDENTIALS_PATH};
use vmdisk_registry::{AuthError, DockerConfig};

/// What finding the agent API asks of the API server: the Service's EndpointSlices, in
/// vmdisk's namespace.
pub const API_ACCESS: &[ApiAccess] = &[ApiAccess::new(
    "discovery.k8s.io",
    "endpointslices",
    &["list"],
    AccessScope::InstallNamespace,
)];

/// The largest answer read: a registry entry is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// A request that takes longer fails the warm, which is retried after its backoff.
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("no --credentials-url: this agent cannot fetch pull credentials, so images with a pull secret are not prefetched")]
    NotConfigured,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM certificate: {message}")]
    BadCa { path: PathBuf, message: String },
    #[error("{path} is empty: no token to show the controller")]
    NoToken { path: PathBuf },
    #[error("finding the endpoints of Service {namespace}/{service}")]
    Endpoints {
        namespace: String,
        service: String,
        source: kube::Error,
    },
    #[error("Service {namespace}/{service} has no ready endpoint (is the controller running?)")]
    NoEndpoint { namespace: String, service: String },
    #[error("{url} is not an https:// URL with a host")]
    BadUrl { url: String },
    #[error("asking {url}")]
    Request { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} answered more than {MAX_ANSWER_BYTES} bytes")]
    TooLarge { url: String },
    #[error("the credentials from {url} are not a Docker config")]
    NotDockerConfig { url: String, source: AuthError },
}

/// Where the controller's agent API is, and what this agent proves itself with.
#[derive(Debug, Clone)]
pub struct CredentialsSource {
    /// `https://vmdisk-controller.vmdisk-system.svc:8443`; `None`: not configured.
    pub url: Option<String>,
    /// The CA that issued the agent API's certificate (PEM).
    pub ca_file: PathBuf,
    /// The pod's projected ServiceAccount token for audience `vmdisk-controller`.
    pub token_file: PathBuf,
}

impl CredentialsSource {
    /// The credentials of VMDiskImage `namespace/name`.
    pub async fn fetch(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<DockerConfig, CredentialsError> {
        let base = self.url.as_deref().ok_or(CredentialsError::NotConfigured)?;
        let (host, port) = host_and_port(base).ok_or_else(|| CredentialsError::BadUrl {
            url: base.to_string(),
        })?;
        let url = format!(
            "{}{AGENT_API_CREDENTIALS_PATH}/{namespace}/{name}",
            base.trim_end_matches('/')
        );
        let token = read(&self.token_file)?;
        let token = String::from_utf8_lossy(&token).trim().to_string();
        if token.is_empty() {
            return Err(CredentialsError::NoToken {
                path: self.token_file.clone(),
            });
        }
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(&self.ca_file)?)
            .timeout(TIMEOUT);
        if let Some((service, service_namespace)) = service_of(&host) {
            let addrs = ready_endpoints(client, service, service_namespace).await?;
            let addrs: Vec<SocketAddr> = addrs.into_iter().map(|ip| (ip, port).into()).collect();
            builder = builder.resolve_to_addrs(&host, &addrs);
        }
        let http = builder
            .build()
            .map_err(|source| CredentialsError::Request {
                url: url.clone(),
                source,
            })?;
        let request_error = |source| CredentialsError::Request {
            url: url.clone(),
            source,
        };
        let mut response = http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CredentialsError::TooLarge { url });
            }
            body.extend_from_slice(&chunk);
        }
        if status != 200 {
            return Err(CredentialsError::Refused {
                url,
                status,
                message: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        DockerConfig::from_json(&body)
            .map_err(|source| CredentialsError::NotDockerConfig { url, source })
    }
}

/// `--credentials-url`, checked when the flags are read: an `https://host[:port]` URL.
pub fn parse_url(url: &str) -> Result<String, String> {
    host_and_port(url)
        .map(|_| url.to_string())
        .ok_or_else(|| format!("{url:?} is not an https://host[:port] URL (e.g. https://vmdisk-controller.vmdisk-system.svc:8443)"))
}

/// The host and port of an `https://host[:port]` URL (443 by default).
fn host_and_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(']') || host.ends_with(']') => {
            (host, port.parse().ok()?)
        }
        _ => (authority, 443),
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// `<service>.<namespace>.svc` (optionally `.cluster.local`): the Service and its namespace.
fn service_of(host: &str) -> Option<(&str, &str)> {
    let host = host.strip_suffix(".cluster.local").unwrap_or(host);
    let mut parts = host.strip_suffix(".svc")?.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(service), Some(namespace), None) if !service.is_empty() && !namespace.is_empty() => {
            Some((service, namespace))
        }
        _ => None,
    }
}

/// The ready addresses of a Service's EndpointSlices.
async fn ready_endpoints(
    client: &Client,
    service: &str,
    namespace: &str,
) -> Result<Vec<IpAddr>, CredentialsError> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map_err(|source| CredentialsError::Endpoints {
            namespace: namespace.to_string(),
            service: service.to_string(),
            source,
        })?;
    let addrs: Vec<IpAddr> = slices
        .items
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse().ok())
        .collect();
    if addrs.is_empty() {
        return Err(CredentialsError::NoEndpoint {
            namespace: namespace.to_string(),
            service: service.to_string(),
        });
    }
    Ok(addrs)
}

fn read(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    std::fs::read(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// TLS that trusts only the CA in `ca_file` (the agent API's, and the peers').
pub(crate) fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, CredentialsError> {
    let bad = |message: String| CredentialsError::BadCa {
        path: ca_file.to_path_buf(),
        message,
    };
    let pem = read(ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate".into()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_are_found_through_their_endpoints() {
        assert_eq!(
            host_and_port("https://vmdisk-controller.vmdisk-system.svc:8443"),
            Some(("vmdisk-controller.vmdisk-system.svc".into(), 8443))
        );
        assert_eq!(
            host_and_port("https://127.0.0.1:9/x"),
            Some(("127.0.0.1".into(), 9))
        );
        assert_eq!(
            host_and_port("https://c.example"),
            Some(("c.example".into(), 443))
        );
        assert_eq!(host_and_port("http://c.example:80"), None);
        assert_eq!(host_and_port("https://:80"), None);
        assert!(parse_url("http://c.ns.svc:8443")
            .unwrap_err()
            .contains("not an https://host[:port] URL"));
        assert!(parse_url("https://c.ns.svc:x").is_err());
        assert_eq!(
            service_of("vmdisk-controller.vmdisk-system.svc"),
            Some(("vmdisk-controller", "vmdisk-system"))
        );
        assert_eq!(service_of("c.ns.svc.cluster.local"), Some(("c", "ns")));
        assert_eq!(service_of("127.0.0.1"), None);
        assert_eq!(service_of("a.b.c.svc"), None);
        assert_eq!(service_of("controller.example.com"), None);
    }

    #[tokio::test]
    async fn every_missing_piece_is_named() {
        // Never asked: each failure comes before the first request.
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(service, "default");
        let dir = tempfile::tempdir().unwrap();
        let source = CredentialsSource {
            url: None,
            ca_file: dir.path().join("ca.crt"),
            token_file: dir.path().join("token"),
        };
        let e = source.fetch(&client, "a", "b").await.unwrap_err();
        assert!(matches!(e, CredentialsError::NotConfigured), "{e}");
        let source = CredentialsSource {
            url: Some("https://127.0.0.1:1".into()),
            ..source
        };
        let e = source.fetch(&client, "a", "b").await.unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
        std::fs::write(&source.token_file, "\n").unwrap();
        let e = source.fetch(&client, "a", "b").await.unwrap_err();
        assert!(matches!(e, CredentialsError::NoToken { .. }), "{e}");
        std::fs::write(&source.token_file, "t0ken").unwrap();
        std::fs::write(&source.ca_file, "not a certificate").unwrap();
        let e = source.fetch(&client, "a", "b").await.unwrap_err();
        assert!(matches!(e, CredentialsError::BadCa { .. }), "{e}");
    }
}
