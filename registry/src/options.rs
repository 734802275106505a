//! [`RegistryOptions`]: how to talk to the registry of one image. Built here and only here,
//! whether the image comes from a VMDiskImage (controller, agents, populator pods) or from the
//! command line.

use oci_client::secrets::RegistryAuth;
use vmdisk_crds::{ImageReference, RegistrySource};

use crate::auth::{registry_auth_for, DockerConfig};
use crate::pull::PlatformSpec;

/// How to talk to one registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Plain HTTP. Only when asked for.
    pub insecure: bool,
    /// Extra CAs (PEM) to trust.
    pub ca_bundle_pem: Option<Vec<u8>>,
    pub auth: RegistryAuth,
    pub platform: PlatformSpec,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            insecure: false,
            ca_bundle_pem: None,
            auth: RegistryAuth::Anonymous,
            platform: PlatformSpec::default(),
        }
    }
}

impl RegistryOptions {
    /// Options for `reference`'s registry: plain HTTP only when `insecure`, extra CAs, and the
    /// credentials `credentials` holds for that registry host (anonymous when none).
    pub fn new(
        reference: &ImageReference,
        insecure: bool,
        ca_bundle_pem: Option<Vec<u8>>,
        credentials: Option<&DockerConfig>,
    ) -> Self {
        Self {
            insecure,
            ca_bundle_pem,
            auth: credentials.map_or(RegistryAuth::Anonymous, |c| {
                registry_auth_for(c, &reference.registry)
            }),
            platform: PlatformSpec::default(),
        }
    }

    /// Options for a VMDiskImage's `spec.source.registry`, with the credentials of its pull
    /// secret (already read by the caller, which knows where it lives).
    pub fn for_source(
        reference: &ImageReference,
        source: &RegistrySource,
        credentials: Option<&DockerConfig>,
    ) -> Self {
        Self::new(
            reference,
            source.insecure.unwrap_or(false),
            source.ca_bundle.as_ref().map(|pem| pem.as_bytes().to_vec()),
            credentials,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_options_carry_tls_settings_and_the_hosts_credentials() {
        let reference = ImageReference::parse("registry.example.com:5000/disks/a:1").unwrap();
        let config = DockerConfig::from_json(
            br#"{"auths": {"registry.example.com:5000": {"username": "u", "password": "p"},
                            "other.io": {"username": "x", "password": "y"}}}"#,
        )
        .unwrap();
        let source = RegistrySource {
            url: reference.to_string(),
            pull_secret_ref: None,
            ca_bundle: Some("-----BEGIN CERTIFICATE-----".into()),
            insecure: None,
            pull_method: None,
        };
        let o = RegistryOptions::for_source(&reference, &source, Some(&config));
        assert!(!o.insecure);
        assert!(o.ca_bundle_pem.is_some());
        assert!(matches!(o.auth, RegistryAuth::Basic(ref u, _) if u == "u"));
        let anonymous = RegistryOptions::for_source(&reference, &source, None);
        assert!(matches!(anonymous.auth, RegistryAuth::Anonymous));
    }
}
