//! Command-line flags (each with an environment variable) of `vmdisk-webhook`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::mutate::MutationConfig;
use crate::routes::DEFAULT_MAX_BODY_BYTES;

/// vmdisk mutating admission webhook for PVCs and Pods.
///
/// Serves POST /mutate-pvc and /mutate-pod (AdmissionReview admission.k8s.io/v1) over TLS,
/// GET /healthz, /readyz and /metrics. The serving certificate is read from --cert-dir
/// (tls.crt, tls.key: a mounted kubernetes.io/tls Secret) and reloaded when it changes.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmdisk-webhook", version, about, long_about = None)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "VMDISK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Directory holding tls.crt and tls.key; watched for renewals.
    #[arg(long, env = "VMDISK_CERT_DIR", default_value = "/etc/vmdisk/tls")]
    pub cert_dir: PathBuf,

    /// Read VMDiskImages and PVCs from this directory of YAML files instead of the API server
    /// (runs without a cluster; the directory is watched for changes).
    #[arg(long, env = "VMDISK_CATALOG_DIR")]
    pub catalog_dir: Option<PathBuf>,

    /// Share of a Filesystem-mode volume taken by the filesystem: PVCs for a disk of virtual
    /// size V get V × (1 + overhead). Must match the controller's --filesystem-overhead, which
    /// sizes the populator's disk.img as volume / (1 + overhead).
    #[arg(long, env = "VMDISK_FILESYSTEM_OVERHEAD", default_value_t = vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD, value_parser = vmdisk_crds::parse_filesystem_overhead)]
    pub filesystem_overhead: f64,

    /// Weight (1-100) of the preferred node affinity toward nodes whose cache is warm.
    #[arg(long, env = "VMDISK_AFFINITY_WEIGHT", default_value_t = 80, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub affinity_weight: i32,

    /// Largest AdmissionReview body accepted, in bytes (larger: HTTP 413).
    #[arg(long, env = "VMDISK_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Connections served at once; more wait in the kernel's backlog.
    #[arg(long, env = "VMDISK_MAX_CONNECTIONS", default_value_t = vmdisk_support::https::DEFAULT_MAX_CONNECTIONS, value_parser = parse_max_connections)]
    pub max_connections: usize,

    /// Seconds to let in-flight requests finish after SIGTERM (a review takes milliseconds;
    /// the process exits at most a second after this).
    #[arg(long, env = "VMDISK_DRAIN_SECONDS", default_value_t = 3)]
    pub drain_seconds: u64,

    /// Log format.
    #[arg(long, env = "VMDISK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_max_connections(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{text:?}: expected a whole number of connections, at least 1"
        )),
    }
}

impl WebhookArgs {
    pub fn mutation_config(&self) -> MutationConfig {
        MutationConfig {
            filesystem_overhead: self.filesystem_overhead,
            affinity_weight: self.affinity_weight,
            ..MutationConfig::default()
        }
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let a = WebhookArgs::try_parse_from(["vmdisk-webhook"]).unwrap();
        assert_eq!(a.listen.port(), 8443);
        assert_eq!(a.filesystem_overhead, 0.06);
        assert!(WebhookArgs::try_parse_from(["x", "--filesystem-overhead", "0.9"]).is_err());
        assert!(WebhookArgs::try_parse_from(["x", "--affinity-weight", "0"]).is_err());
        assert!(WebhookArgs::try_parse_from(["x", "--listen", "nope"]).is_err());
        assert_eq!(
            a.max_connections,
            vmdisk_support::https::DEFAULT_MAX_CONNECTIONS
        );
        assert!(WebhookArgs::try_parse_from(["x", "--max-connections", "0"]).is_err());
        // The controllers run in vmdisk-controller.
        assert!(WebhookArgs::try_parse_from(["x", "--controllers=false"]).is_err());
    }
}
