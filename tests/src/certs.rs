//! Test PKI made at test time: a CA and serving certificates it signs.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A throwaway certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A serving certificate and its key, PEM.
pub struct ServingPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> ServingPair {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        ServingPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Writes a pair the way kubelet mounts a Secret: the files live in a timestamped directory,
/// `..data` is a symlink to it, and `tls.crt`/`tls.key` are symlinks through `..data`.
/// Calling it again performs a kubelet-style atomic update (new directory, `..data` swapped by
/// rename).
pub fn write_secret_dir(dir: &std::path::Path, pair: &ServingPair, version: u32) {
    let data_dir_name = format!("..2026_11_24_00_00_{version:02}.000000001");
    let data_dir = dir.join(&data_dir_name);
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("tls.crt"), &pair.cert_pem).unwrap();
    std::fs::write(data_dir.join("tls.key"), &pair.key_pem).unwrap();
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&data_dir_name, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, dir.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{file}"), &link).unwrap();
        }
    }
}
