//! Pushing containerDisk images to a [`TestRegistry`] with oci-client.

use std::io::Write;
use std::path::Path;

use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, Config, ImageLayer,
};
use oci_client::manifest::{OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use vmdisk_registry::pull::RegistryOptions;

use crate::registry::TestRegistry;

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A layer's content before compression.
pub struct LayerSpec {
    pub entries: Vec<(String, Vec<u8>)>,
    pub media_type: &'static str,
}

impl LayerSpec {
    /// A layer holding `disk/<name>` with the bytes of `disk`.
    pub fn disk(disk: &Path, name: &str, media_type: &'static str) -> Self {
        Self {
            entries: vec![(format!("disk/{name}"), std::fs::read(disk).unwrap())],
            media_type,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o555);
        dir.set_size(0);
        builder
            .append_data(&mut dir, "disk/", std::io::empty())
            .unwrap();
        for (path, data) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o444);
            h.set_uid(107);
            h.set_gid(107);
            builder.append_data(&mut h, path, &data[..]).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        match self.media_type {
            TAR_GZIP => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).unwrap();
                e.finish().unwrap()
            }
            TAR_ZSTD => zstd::encode_all(&tar[..], 3).unwrap(),
            _ => tar,
        }
    }
}

/// Client options that reach `registry` (plain HTTP or its CA, its credentials).
pub fn options_for(registry: &TestRegistry) -> RegistryOptions {
    RegistryOptions {
        insecure: !registry.is_tls(),
        ca_bundle_pem: registry.ca_pem().map(String::into_bytes),
        auth: match &registry.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        },
        ..RegistryOptions::default()
    }
}

fn client_for(registry: &TestRegistry) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ClientConfig {
        protocol: if registry.is_tls() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(vec![registry.addr.clone()])
        },
        extra_root_certificates: registry
            .ca_pem()
            .map(|pem| Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem.into_bytes(),
            })
            .into_iter()
            .collect(),
        ..ClientConfig::default()
    };
    Client::try_from(config).unwrap()
}

fn auth_for(registry: &TestRegistry) -> RegistryAuth {
    options_for(registry).auth
}

/// Pushes an image made of `layers` as `<addr>/<repo>:<tag>`; returns (reference, manifest
/// digest).
pub async fn push_layers(
    registry: &TestRegistry,
    repo: &str,
    tag: &str,
    layers: &[LayerSpec],
) -> (String, String) {
    push_blobs(
        registry,
        repo,
        tag,
        layers.iter().map(|l| (l.encode(), l.media_type)).collect(),
    )
    .await
}

/// `sha256:<hex>` of a layer's uncompressed content, streamed (of the blob itself when it does
/// not decompress or inflates past 4 GiB: the hostile layers some tests push).
fn diff_id(blob: &[u8], media_type: &str) -> String {
    use sha2::Digest;
    use std::io::Read;
    const MAX: u64 = 4 << 30;
    let reader: Option<Box<dyn Read + '_>> = match media_type {
        TAR_GZIP => Some(Box::new(flate2::read::GzDecoder::new(blob))),
        TAR_ZSTD => zstd::stream::read::Decoder::new(blob)
            .ok()
            .map(|d| Box::new(d) as Box<dyn Read>),
        _ => None,
    };
    let mut hasher = sha2::Sha256::new();
    let inflated = reader.and_then(|r| std::io::copy(&mut r.take(MAX + 1), &mut hasher).ok());
    let digest = match inflated {
        Some(n) if n <= MAX => hasher.finalize(),
        _ => sha2::Sha256::digest(blob),
    };
    format!("sha256:{}", hex::encode(digest))
}

/// Pushes already encoded layer blobs.
pub async fn push_blobs(
    registry: &TestRegistry,
    repo: &str,
    tag: &str,
    blobs: Vec<(Vec<u8>, &'static str)>,
) -> (String, String) {
    let client = client_for(registry);
    let reference_text = format!("{}/{repo}:{tag}", registry.addr);
    let reference: Reference = reference_text.parse().unwrap();
    // A runtime (containerd) checks one diff_id per layer: the digest of its uncompressed tar.
    let diff_ids: Vec<String> = blobs.iter().map(|(data, mt)| diff_id(data, mt)).collect();
    let layers: Vec<ImageLayer> = blobs
        .into_iter()
        .map(|(data, mt)| ImageLayer::new(data, mt.to_string(), None))
        .collect();
    let config = Config::new(
        serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
        .unwrap(),
        "application/vnd.oci.image.config.v1+json".to_string(),
        None,
    );
    let manifest = OciImageManifest::build(&layers, &config, None);
    client
        .push(
            &reference,
            &layers,
            config,
            &auth_for(registry),
            Some(manifest),
        )
        .await
        .unwrap_or_else(|e| panic!("push {reference_text}: {e}"));
    let digest = client
        .fetch_manifest_digest(&reference, &auth_for(registry))
        .await
        .unwrap();
    (reference_text, digest)
}

/// A containerDisk: one gzip layer holding `disk/<file name>`.
pub async fn push_container_disk(
    registry: &TestRegistry,
    repo: &str,
    tag: &str,
    disk: &Path,
) -> (String, String) {
    let name = disk.file_name().unwrap().to_string_lossy().into_owned();
    push_layers(
        registry,
        repo,
        tag,
        &[LayerSpec::disk(disk, &name, TAR_GZIP)],
    )
    .await
}

/// An OCI image index `<repo>:<tag>` over already pushed manifests, one per (os, arch).
pub async fn push_index(
    registry: &TestRegistry,
    repo: &str,
    tag: &str,
    platforms: &[(&str, &str, &str)],
) -> (String, String) {
    let client = client_for(registry);
    let auth = auth_for(registry);
    let mut manifests = Vec::new();
    for (os, arch, digest) in platforms {
        let by_digest: Reference = format!("{}/{repo}@{digest}", registry.addr)
            .parse()
            .unwrap();
        let (raw, _) = client
            .pull_manifest_raw(
                &by_digest,
                &auth,
                &["application/vnd.oci.image.manifest.v1+json"],
            )
            .await
            .unwrap();
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": raw.len(),
            "platform": {"os": os, "architecture": arch},
        }));
    }
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let reference_text = format!("{}/{repo}:{tag}", registry.addr);
    let reference: Reference = reference_text.parse().unwrap();
    client
        .push_manifest_list(&reference, &auth, index)
        .await
        .unwrap();
    let digest = client
        .fetch_manifest_digest(&reference, &auth)
        .await
        .unwrap();
    (reference_text, digest)
}
