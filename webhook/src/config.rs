//! Command-line flags (each with an environment variable) of `vmdisk-webhook`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::mutate::MutationConfig;
use crate::routes::DEFAULT_MAX_BODY_BYTES;

/// vmdisk mutating admission webhook for PVCs and Pods, plus the leader-elected image
/// controller.
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

    /// Run the image controller (tag → digest resolution, VMDiskImage status) under leader
    /// election. Ignored with --catalog-dir.
    #[arg(long, env = "VMDISK_CONTROLLERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub controllers: bool,

    /// Share of a Filesystem-mode volume taken by the filesystem: PVCs for a disk of virtual
    /// size V get V × (1 + overhead), and the populator's disk.img is volume / (1 + overhead).
    #[arg(long, env = "VMDISK_FILESYSTEM_OVERHEAD", default_value_t = vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD, value_parser = parse_overhead)]
    pub filesystem_overhead: f64,

    /// Weight (1-100) of the preferred node affinity toward nodes whose cache is warm.
    #[arg(long, env = "VMDISK_AFFINITY_WEIGHT", default_value_t = 80, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub affinity_weight: i32,

    /// Largest AdmissionReview body accepted, in bytes (larger: HTTP 413).
    #[arg(long, env = "VMDISK_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Seconds to let in-flight requests finish after SIGTERM.
    #[arg(long, env = "VMDISK_DRAIN_SECONDS", default_value_t = 20)]
    pub drain_seconds: u64,

    /// vmdisk's namespace (the controllers' Lease lives here).
    #[arg(long, env = "POD_NAMESPACE", default_value = vmdisk_crds::INSTALL_NAMESPACE)]
    pub namespace: String,

    /// Namespace where the image controller keeps the agents' copies of pull credentials.
    #[arg(long, env = "VMDISK_CREDENTIALS_NAMESPACE", default_value = vmdisk_crds::CREDENTIALS_NAMESPACE)]
    pub credentials_namespace: String,

    /// The cache agent DaemonSet (in --namespace): populator pods run its image on its cache
    /// directory, read when each pod is made, so they always match the agents.
    #[arg(
        long,
        env = "VMDISK_AGENT_DAEMONSET",
        default_value = "vmdisk-cache-agent"
    )]
    pub agent_daemonset: String,

    /// Image of populator pods, instead of the agent DaemonSet's.
    #[arg(long, env = "VMDISK_POPULATOR_IMAGE")]
    pub populator_image: Option<String>,

    /// The node cache's hostPath, instead of the agent DaemonSet's `cache` volume.
    #[arg(long, env = "VMDISK_NODE_CACHE_DIR")]
    pub node_cache_dir: Option<String>,

    /// Populator pods per PVC before giving up (failures that retrying cannot fix stop at once).
    #[arg(long, env = "VMDISK_POPULATOR_MAX_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub populator_max_attempts: u32,

    /// Seconds before the first retry of a failed populator pod (doubling, at most 300).
    #[arg(long, env = "VMDISK_POPULATOR_RETRY_SECONDS", default_value_t = 10)]
    pub populator_retry_seconds: u64,

    /// This replica's name in leader election.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Log format.
    #[arg(long, env = "VMDISK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_overhead(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=0.5).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0.0..=0.5"))
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

    pub fn controller_config(
        &self,
        metrics: &crate::metrics::WebhookMetrics,
    ) -> crate::controller::ControllerConfig {
        let defaults = crate::controller::ControllerConfig::default();
        crate::controller::ControllerConfig {
            install_namespace: self.namespace.clone(),
            credentials_namespace: self.credentials_namespace.clone(),
            identity: self.pod_name.clone().unwrap_or(defaults.identity),
            populator: crate::controller::populator::PopulatorSettings {
                namespace: self.namespace.clone(),
                credentials_namespace: self.credentials_namespace.clone(),
                agent_daemonset: self.agent_daemonset.clone(),
                image: self.populator_image.clone(),
                node_cache_dir: self.node_cache_dir.clone(),
                filesystem_overhead: self.filesystem_overhead,
                max_attempts: self.populator_max_attempts,
                retry_base: Duration::from_secs(self.populator_retry_seconds.max(1)),
            },
            populator_metrics: metrics.populator.clone(),
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
    }
}
