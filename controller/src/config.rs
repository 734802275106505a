//! Command-line flags (each with an environment variable) of `vmdisk-controller`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::Toleration;

use crate::populator::PopulatorSettings;
use crate::supervisor::ControllerConfig;

/// vmdisk controllers: the image controller (tag → digest, VMDiskImage status, the agents'
/// pull-credentials copies) and the volume populator, run by one replica at a time under
/// leader election on the Lease `vmdisk-controller`.
///
/// Serves GET /metrics, /healthz and /readyz over plain HTTP on --metrics-listen, and the
/// cache agents' credentials over HTTPS on --agent-api-listen.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmdisk-controller", version, about, long_about = None)]
pub struct ControllerArgs {
    /// Address for GET /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, env = "VMDISK_METRICS_LISTEN", default_value = "0.0.0.0:9103")]
    pub metrics_listen: SocketAddr,

    /// vmdisk's namespace: the Lease, prime PVCs and populator pods live here.
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

    /// Share of a Filesystem-mode volume taken by the filesystem: the populator's disk.img is
    /// volume / (1 + overhead). Must match the webhook's --filesystem-overhead, which sizes
    /// the PVCs.
    #[arg(long, env = "VMDISK_FILESYSTEM_OVERHEAD", default_value_t = vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD, value_parser = vmdisk_crds::parse_filesystem_overhead)]
    pub filesystem_overhead: f64,

    /// Populator pods per PVC before giving up (failures that retrying cannot fix stop at once).
    #[arg(long, env = "VMDISK_POPULATOR_MAX_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub populator_max_attempts: u32,

    /// Populator pods that copy out of one node's cache at once; the others wait for a slot,
    /// so a burst of claims copies at the disk's pace (0: no bound).
    #[arg(long, env = "VMDISK_POPULATOR_PARALLEL_COPIES", default_value_t = vmdisk_crds::DEFAULT_PARALLEL_COPIES)]
    pub populator_parallel_copies: usize,

    /// Who pulls the images that name no `pullMethod`: `pod` (vmdisk, through the node
    /// cache), `node` (the node's container runtime as an image volume where it can, else
    /// `pod`) or `nodeOnly`.
    #[arg(long, env = "VMDISK_DEFAULT_PULL_METHOD", default_value = "pod")]
    pub default_pull_method: vmdisk_crds::PullMethod,

    /// Seconds before the first retry of a failed populator pod (doubling, at most 300).
    #[arg(long, env = "VMDISK_POPULATOR_RETRY_SECONDS", default_value_t = 10)]
    pub populator_retry_seconds: u64,

    /// Seconds a populator pod may take to start while it waits for an image that cannot be
    /// pulled or a configuration error; then it counts as a failed attempt (retried, then given up).
    #[arg(long, env = "VMDISK_POPULATOR_START_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..))]
    pub populator_start_seconds: u64,

    /// Taints populator pods tolerate, as a JSON list of Kubernetes tolerations (for nodes
    /// tainted for VMs: `[{"key":"dedicated","operator":"Equal","value":"vms","effect":"NoSchedule"}]`).
    /// A user's claim chooses the node (`volume.kubernetes.io/selected-node`), so every taint
    /// listed here is one a user can send populator pods past.
    #[arg(long, env = "VMDISK_POPULATOR_TOLERATIONS", default_value = "[]", value_parser = parse_tolerations)]
    pub populator_tolerations: Tolerations,

    /// Address of the agent API (HTTPS): cache agents fetch here the pull credentials of the
    /// images their node prefetches, proving their node with their pod's token. Off when not
    /// set; the shipped Deployment serves it on 0.0.0.0:8443.
    #[arg(long, env = "VMDISK_AGENT_API_LISTEN")]
    pub agent_api_listen: Option<SocketAddr>,

    /// Directory of the agent API's serving certificate (`tls.crt`, `tls.key`, as a mounted
    /// `kubernetes.io/tls` Secret), reloaded when it changes.
    #[arg(
        long,
        env = "VMDISK_AGENT_API_CERT_DIR",
        default_value = "/etc/vmdisk/agent-api-tls"
    )]
    pub agent_api_cert_dir: PathBuf,

    /// This replica's name in leader election (default: `vmdisk-controller-<pid>`).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Log format.
    #[arg(long, env = "VMDISK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// `--populator-tolerations`, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tolerations(pub Vec<Toleration>);

fn parse_tolerations(text: &str) -> Result<Tolerations, String> {
    serde_json::from_str(text)
        .map(Tolerations)
        .map_err(|e| format!("not a JSON list of tolerations ({e}); e.g. [{{\"key\":\"dedicated\",\"operator\":\"Equal\",\"value\":\"vms\",\"effect\":\"NoSchedule\"}}]"))
}

impl ControllerArgs {
    pub fn controller_config(&self) -> ControllerConfig {
        let defaults = ControllerConfig::default();
        ControllerConfig {
            install_namespace: self.namespace.clone(),
            credentials_namespace: self.credentials_namespace.clone(),
            identity: self.pod_name.clone().unwrap_or(defaults.identity),
            populator: PopulatorSettings {
                namespace: self.namespace.clone(),
                agent_daemonset: self.agent_daemonset.clone(),
                image: self.populator_image.clone(),
                node_cache_dir: self.node_cache_dir.clone(),
                filesystem_overhead: self.filesystem_overhead,
                max_attempts: self.populator_max_attempts,
                parallel_copies: self.populator_parallel_copies,
                default_pull_method: self.default_pull_method,
                retry_base: Duration::from_secs(self.populator_retry_seconds.max(1)),
                start_timeout: Duration::from_secs(self.populator_start_seconds),
                tolerations: self.populator_tolerations.0.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let a = ControllerArgs::try_parse_from(["vmdisk-controller"]).unwrap();
        assert_eq!(a.metrics_listen.port(), 9103);
        assert_eq!(a.filesystem_overhead, 0.06);
        let config = a.controller_config();
        assert_eq!(config.install_namespace, "vmdisk-system");
        assert!(config.identity.starts_with("vmdisk-controller-"));
        assert_eq!(config.populator.image, None, "the agent DaemonSet's");
        assert_eq!(config.populator.max_attempts, 4);
        assert_eq!(a.agent_api_listen, None, "the agent API is asked for");
        let named = ControllerArgs::try_parse_from([
            "x",
            "--pod-name=replica-1",
            "--populator-retry-seconds=0",
        ])
        .unwrap()
        .controller_config();
        assert_eq!(named.identity, "replica-1");
        assert_eq!(named.populator.retry_base, Duration::from_secs(1));
        assert!(ControllerArgs::try_parse_from(["x", "--filesystem-overhead", "0.9"]).is_err());
        assert!(ControllerArgs::try_parse_from(["x", "--populator-max-attempts", "0"]).is_err());
        assert!(ControllerArgs::try_parse_from(["x", "--metrics-listen", "nope"]).is_err());
        assert!(ControllerArgs::try_parse_from(["x", "--controllers=true"]).is_err());
    }

    #[test]
    fn populator_tolerations_are_a_json_list_of_tolerations() {
        let a = ControllerArgs::try_parse_from(["x"]).unwrap();
        assert!(a.controller_config().populator.tolerations.is_empty());
        let a = ControllerArgs::try_parse_from([
            "x",
            "--populator-tolerations",
            r#"[{"key":"dedicated","operator":"Equal","value":"vms","effect":"NoSchedule"}]"#,
        ])
        .unwrap();
        let t = &a.controller_config().populator.tolerations;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].key.as_deref(), Some("dedicated"));
        assert_eq!(t[0].effect.as_deref(), Some("NoSchedule"));
        let wrong =
            ControllerArgs::try_parse_from(["x", "--populator-tolerations", "dedicated=vms"])
                .unwrap_err()
                .to_string();
        assert!(wrong.contains("not a JSON list of tolerations"), "{wrong}");
    }
}
