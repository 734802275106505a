//! What every subcommand needs from its flags: the cache opened in the right role, a warmer
//! over it with the size limit, and registry options with the credentials they name (a docker
//! config file, or a Secret read with the pod's in-cluster credentials).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use vmdisk_crds::{parse_quantity, ImageReference};
use vmdisk_registry::auth::DockerConfig;
use vmdisk_registry::pull::{Puller, PullerConfig, RegistryOptions};

use super::{CacheArgs, RegistryArgs};
use crate::store::{Budget, CacheStore, StoreRole};
use crate::warm::extract::ExtractLimits;
use crate::warm::Warmer;

pub(super) fn open_store(args: &CacheArgs, role: OpenAs) -> anyhow::Result<Arc<CacheStore>> {
    let budget: Budget = args
        .budget
        .parse()
        .map_err(|e| anyhow::anyhow!("--budget {:?}: {e}", args.budget))?;
    std::fs::create_dir_all(&args.cache_dir)
        .with_context(|| format!("creating cache directory {}", args.cache_dir.display()))?;
    let opened = match role {
        OpenAs::Owner => CacheStore::open(&args.cache_dir, budget),
        OpenAs::OwnerIfFree => CacheStore::open_shared(&args.cache_dir, budget),
        OpenAs::Guest => CacheStore::open_guest(&args.cache_dir).map(|s| (s, Default::default())),
    };
    let (store, report) =
        opened.with_context(|| format!("opening cache {}", args.cache_dir.display()))?;
    if report.removed_staging > 0 || !report.removed_corrupt.is_empty() {
        tracing::warn!(
            staging = report.removed_staging,
            corrupt = ?report.removed_corrupt,
            "cleaned up after an interrupted run"
        );
    }
    if store.role() == StoreRole::Guest && role == OpenAs::OwnerIfFree {
        tracing::info!("an agent owns this cache: sharing it (no cleanup, no eviction here)");
    }
    Ok(Arc::new(store))
}

/// How a mode opens the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpenAs {
    /// `run`: the agent owns the node's cache.
    Owner,
    /// `warm`, `ls`: own it when no agent does, share it otherwise.
    OwnerIfFree,
    /// `populate`: always share.
    Guest,
}

pub(super) fn warmer(args: &CacheArgs, store: Arc<CacheStore>) -> anyhow::Result<Warmer> {
    let max_disk_bytes =
        parse_quantity(&args.max_disk_size).map_err(|e| anyhow::anyhow!("--max-disk-size: {e}"))?;
    let puller = Puller::new(PullerConfig {
        max_parallel_pulls: args.max_parallel_pulls.max(1),
        ..PullerConfig::default()
    });
    Ok(Warmer::new(
        store,
        puller,
        ExtractLimits {
            max_disk_bytes,
            ..ExtractLimits::default()
        },
    )
    .with_verification(args.verification()))
}

/// Registry options from the flags; credentials are read only when `with_credentials`.
pub(super) async fn registry_options(
    image: &str,
    args: &RegistryArgs,
    with_credentials: bool,
) -> anyhow::Result<RegistryOptions> {
    let reference = ImageReference::parse(image)?;
    let ca_bundle = match (&args.ca_bundle, &args.ca_bundle_pem) {
        (Some(path), _) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        (None, Some(pem)) => Some(pem.clone().into_bytes()),
        (None, None) => None,
    };
    let credentials = if !with_credentials {
        None
    } else {
        let config_path = args.docker_config.clone().or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json");
            p.exists().then_some(p)
        });
        match config_path {
            Some(path) => Some(
                DockerConfig::from_file(&path)
                    .with_context(|| format!("reading docker config {}", path.display()))?,
            ),
            None => None,
        }
    };
    Ok(RegistryOptions::new(
        &reference,
        args.insecure,
        ca_bundle,
        credentials.as_ref(),
    ))
}

pub(super) fn namespaced(text: &str, flag: &str) -> anyhow::Result<(String, String)> {
    text.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .ok_or_else(|| anyhow::anyhow!("{flag} {text:?}: expected NAMESPACE/NAME"))
}
