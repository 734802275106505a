//! The webhook running in-process over real TLS, with a file-backed catalog.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::oneshot;
use vmdisk_support::https::serve_tls;
use vmdisk_support::tls::{server_config, CertPaths, CertWatch, ReloadingCertResolver};
use vmdisk_webhook::catalog::file::{CatalogWatch, FileCatalog};
use vmdisk_webhook::mutate::MutationConfig;
use vmdisk_webhook::routes::{router, Webhook};

use crate::certs::{write_secret_dir, TestCa};
use crate::https::{client_config, Connection};

/// A digest the sample catalog resolves `fedora-40` to.
pub const SAMPLE_DIGEST: &str =
    "sha256:6f1a0c3ad3b0e7c1f0f5a6f0a0d1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3";

/// The catalog the fixtures are tested against: the image they all name, resolved, and the
/// PVCs the pod fixtures mount.
pub fn sample_catalog_yaml() -> String {
    format!(
        r#"apiVersion: vmdisk.io/v1alpha1
kind: VMDiskImage
metadata: {{name: fedora-40, namespace: vms}}
spec:
  source: {{registry: {{url: "quay.io/containerdisks/fedora:40"}}}}
  format: raw
  storageClassName: local-path
  accessModes: [ReadWriteOnce]
status:
  phase: Ready
  digest: {SAMPLE_DIGEST}
  sourceFormat: qcow2
  virtualSize: 5368709120
  warmNodes: 2
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: by-annotation, namespace: vms, labels: {{vmdisk.io/image: fedora-40}}}}
spec: {{}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: fedora-root, namespace: vms, labels: {{vmdisk.io/image: fedora-40}}}}
spec: {{}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: root-vmset-0, namespace: vms, labels: {{vmdisk.io/image: fedora-40}}}}
spec: {{}}
"#
    )
}

pub struct TestWebhook {
    pub addr: SocketAddr,
    pub ca: TestCa,
    pub dir: TempDir,
    pub resolver: Arc<ReloadingCertResolver>,
    pub webhook: Arc<Webhook>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _cert_watch: CertWatch,
    _catalog_watch: CatalogWatch,
    cert_version: u32,
}

impl TestWebhook {
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    pub fn catalog_dir(&self) -> PathBuf {
        self.dir.path().join("catalog")
    }

    /// Starts on 127.0.0.1 with a fresh CA, the given catalog YAML and `max_body_bytes`.
    pub async fn start(catalog_yaml: &str, max_body_bytes: Option<usize>) -> Self {
        Self::start_configured(catalog_yaml, |webhook| {
            if let Some(limit) = max_body_bytes {
                webhook.max_body_bytes = limit;
            }
        })
        .await
    }

    /// `start`, with `configure` applied to the webhook's settings first.
    pub async fn start_configured(
        catalog_yaml: &str,
        configure: impl FnOnce(&mut Webhook),
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let cert_dir = dir.path().join("tls");
        let catalog_dir = dir.path().join("catalog");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::create_dir_all(&catalog_dir).unwrap();
        std::fs::write(catalog_dir.join("catalog.yaml"), catalog_yaml).unwrap();
        let ca = TestCa::new("vmdisk test CA");
        write_secret_dir(&cert_dir, &ca.issue(&["localhost", "127.0.0.1"]), 1);

        let resolver = ReloadingCertResolver::load(CertPaths::in_dir(&cert_dir)).unwrap();
        let cert_watch = resolver.watch().unwrap();
        let catalog = FileCatalog::open(&catalog_dir).unwrap();
        let catalog_watch = catalog.watch().unwrap();
        let mut webhook = Webhook::new(catalog, MutationConfig::default());
        configure(&mut webhook);
        webhook.tls_ready.store(true, Ordering::Release);
        let webhook = Arc::new(webhook);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(serve_tls(
            listener,
            server_config(resolver.clone()),
            router(Arc::clone(&webhook)),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(5),
            vmdisk_support::https::DEFAULT_MAX_CONNECTIONS,
        ));
        Self {
            addr,
            ca,
            dir,
            resolver,
            webhook,
            shutdown: Some(tx),
            server: Some(server),
            _cert_watch: cert_watch,
            _catalog_watch: catalog_watch,
            cert_version: 1,
        }
    }

    pub async fn connect(&self) -> Connection {
        Connection::open(self.addr, "localhost", client_config(&self.ca.cert_pem()))
            .await
            .expect("connect to the test webhook")
    }

    /// Renews the serving certificate the way kubelet updates a mounted Secret.
    pub fn renew_certificate(&mut self) {
        self.cert_version += 1;
        let pair = self.ca.issue(&["localhost", "127.0.0.1"]);
        write_secret_dir(&self.cert_dir(), &pair, self.cert_version);
    }

    /// Writes an arbitrary pair (e.g. a broken one) as a kubelet update.
    pub fn write_pair(&mut self, cert_pem: &str, key_pem: &str) {
        self.cert_version += 1;
        write_secret_dir(
            &self.cert_dir(),
            &crate::certs::ServingPair {
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
            },
            self.cert_version,
        );
    }

    /// Stops accepting and drains; returns once the server task ended.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

/// The admission fixtures shipped with the tests (AdmissionReviews from a real apiserver).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/admission")
}

/// `(file name, body)` of every fixture, sorted.
pub fn fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A fixture as the apiserver puts it on the wire: the same tokens without whitespace between
/// them. The fixtures are stored indented for reading; kube-apiserver sends compact JSON (a
/// capture of `pvc-create-annotation-form` was this function's output byte for byte, apart from
/// the request uid and the managedFields time).
pub fn as_sent(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    out
}

/// The endpoint a fixture goes to, from its file name.
pub fn endpoint_for(fixture: &str) -> &'static str {
    if fixture.starts_with("pod-") {
        "/mutate-pod?timeout=10s"
    } else {
        "/mutate-pvc?timeout=10s"
    }
}
