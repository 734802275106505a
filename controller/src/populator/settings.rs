//! How the populator runs: [`PopulatorSettings`] from the flags, and the
//! [`PopulatorConfig`] its decisions use, which takes the populator pods' image and the node
//! cache's hostPath from the cache agent DaemonSet unless the flags override them.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Toleration;

/// What the populator's decisions need to know.
#[derive(Debug, Clone)]
pub struct PopulatorConfig {
    /// vmdisk's namespace: prime PVCs and populator pods live here.
    pub namespace: String,
    /// The cache agent's image (populator pods run `vmdisk-cache-agent populate`).
    pub image: String,
    /// The node cache's hostPath, the same as the agents'.
    pub node_cache_dir: String,
    pub filesystem_overhead: f64,
    /// Pods per PVC before giving up.
    pub max_attempts: u32,
    /// Populates copying out of one node's cache at once (0: no bound).
    pub parallel_copies: usize,
    /// Who pulls images that name no `pullMethod`.
    pub default_pull_method: vmdisk_crds::PullMethod,
    /// First retry delay; doubles per failure, capped at five minutes.
    pub retry_base: Duration,
    /// A pod that has not started this long after it was made, and waits for an image that
    /// cannot be pulled or a configuration error, counts as a failed attempt.
    pub start_timeout: Duration,
    /// Taints populator pods tolerate (`--populator-tolerations`).
    pub tolerations: Vec<Toleration>,
}

impl Default for PopulatorConfig {
    fn default() -> Self {
        PopulatorSettings::default()
            .resolve(None)
            .expect("the defaults name an image and a cache directory")
    }
}

/// How the populator runs (from the controller's flags).
#[derive(Debug, Clone)]
pub struct PopulatorSettings {
    pub namespace: String,
    /// The cache agent DaemonSet in `namespace`, whose image and `cache` hostPath populator
    /// pods use unless overridden.
    pub agent_daemonset: String,
    pub image: Option<String>,
    pub node_cache_dir: Option<String>,
    pub filesystem_overhead: f64,
    pub max_attempts: u32,
    pub parallel_copies: usize,
    pub default_pull_method: vmdisk_crds::PullMethod,
    pub retry_base: Duration,
    pub start_timeout: Duration,
    pub tolerations: Vec<Toleration>,
}

impl Default for PopulatorSettings {
    fn default() -> Self {
        Self {
            namespace: vmdisk_crds::INSTALL_NAMESPACE.into(),
            agent_daemonset: "vmdisk-cache-agent".into(),
            image: Some(format!(
                "ghcr.io/vmdisk/cache-agent:{}",
                env!("CARGO_PKG_VERSION")
            )),
            node_cache_dir: Some("/var/lib/vmdisk/cache".into()),
            filesystem_overhead: vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD,
            max_attempts: 4,
            parallel_copies: vmdisk_crds::DEFAULT_PARALLEL_COPIES,
            default_pull_method: vmdisk_crds::PullMethod::Pod,
            retry_base: Duration::from_secs(10),
            start_timeout: Duration::from_secs(300),
            tolerations: Vec::new(),
        }
    }
}

impl PopulatorSettings {
    /// The decisions' config: the agents' image and cache directory from their DaemonSet,
    /// unless overridden. `Err` says what is missing.
    pub fn resolve(&self, agents: Option<&DaemonSet>) -> Result<PopulatorConfig, String> {
        let spec = agents.and_then(|d| d.spec.template.spec.as_ref());
        let from_agents = || {
            format!(
                "the cache agent DaemonSet {}/{} was not found (or has no image and no `cache` hostPath volume)",
                self.namespace, self.agent_daemonset
            )
        };
        let image = match &self.image {
            Some(i) => i.clone(),
            None => spec
                .and_then(|s| {
                    s.containers
                        .iter()
                        .find(|c| c.name == "agent")
                        .or(s.containers.first())?
                        .image
                        .clone()
                })
                .ok_or_else(from_agents)?,
        };
        let node_cache_dir = match &self.node_cache_dir {
            Some(d) => d.clone(),
            None => spec
                .and_then(|s| {
                    s.volumes
                        .iter()
                        .flatten()
                        .find(|v| v.name == "cache")?
                        .host_path
                        .as_ref()
                        .map(|h| h.path.clone())
                })
                .ok_or_else(from_agents)?,
        };
        Ok(PopulatorConfig {
            namespace: self.namespace.clone(),
            image,
            node_cache_dir,
            filesystem_overhead: self.filesystem_overhead,
            max_attempts: self.max_attempts,
            parallel_copies: self.parallel_copies,
            default_pull_method: self.default_pull_method,
            retry_base: self.retry_base,
            start_timeout: self.start_timeout,
            tolerations: self.tolerations.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populator_pods_follow_the_agent_daemonset_unless_overridden() {
        let ds: DaemonSet =
            serde_yaml::from_str(include_str!("../../../deploy/cache-agent.yaml")).unwrap();
        let settings = PopulatorSettings {
            image: None,
            node_cache_dir: None,
            ..PopulatorSettings::default()
        };
        let config = settings.resolve(Some(&ds)).unwrap();
        assert_eq!(config.image, "ghcr.io/vmdisk/cache-agent:0.1.0");
        assert_eq!(config.node_cache_dir, "/var/lib/vmdisk/cache");
        let err = settings.resolve(None).unwrap_err();
        assert!(
            err.contains("vmdisk-system/vmdisk-cache-agent was not found"),
            "{err}"
        );
        let overridden = PopulatorSettings {
            image: Some("mine:1".into()),
            node_cache_dir: Some("/mnt/cache".into()),
            ..PopulatorSettings::default()
        };
        let config = overridden.resolve(None).unwrap();
        assert_eq!(
            (config.image.as_str(), config.node_cache_dir.as_str()),
            ("mine:1", "/mnt/cache")
        );
    }
}
