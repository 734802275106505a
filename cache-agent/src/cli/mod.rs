//! The command line (`run`, `warm`, `populate`, `ls`): the binary's edge, where flags become
//! components and errors become messages for a person.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::populate::{parse_owner, populate, PopulateProgress, PopulateRequest};
use crate::store::{Budget, CacheStore, StoreRole};
use crate::warm::extract::ExtractLimits;
use crate::warm::{WarmProgress, WarmRequest, Warmer};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use vmdisk_crds::{parse_quantity, DiskFormat, ImageReference};
use vmdisk_registry::auth::DockerConfig;
use vmdisk_registry::pull::{Puller, PullerConfig, RegistryOptions};

/// vmdisk node cache agent: pre-pulls VM disk images from OCI registries, converts them with
/// qemu-img into a node-local content-addressed cache, evicts by LRU within a byte budget,
/// reports the node's cache state, and fills PVCs from the cache.
#[derive(Debug, Parser)]
#[command(name = "vmdisk-cache-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Debug, Args, Clone)]
pub struct CacheArgs {
    /// Root of the node cache.
    #[arg(
        long,
        env = "VMDISK_CACHE_DIR",
        default_value = "/var/lib/vmdisk/cache"
    )]
    cache_dir: PathBuf,
    /// Byte budget of the cache: a quantity (`200Gi`) or a share of its filesystem (`50%`).
    #[arg(long, env = "VMDISK_CACHE_BUDGET", default_value = "50%")]
    budget: String,
    /// Largest disk an image may unpack to; larger images are refused.
    #[arg(long, env = "VMDISK_MAX_DISK_SIZE", default_value = "2Ti")]
    max_disk_size: String,
    /// Parallel pulls on this node.
    #[arg(long, env = "VMDISK_MAX_PARALLEL_PULLS", default_value_t = 2)]
    max_parallel_pulls: usize,
}

#[derive(Debug, Args, Clone)]
pub struct RegistryArgs {
    /// Talk plain HTTP to the registry (only for registries on trusted networks).
    #[arg(long)]
    insecure: bool,
    /// PEM file of extra CAs to trust for the registry.
    #[arg(long, conflicts_with = "ca_bundle_pem")]
    ca_bundle: Option<PathBuf>,
    /// Extra CAs to trust for the registry, as PEM text (how populator pods get a
    /// VMDiskImage's caBundle).
    #[arg(long, env = "VMDISK_CA_BUNDLE", hide_env_values = true)]
    ca_bundle_pem: Option<String>,
    /// Docker config.json with registry credentials (default: ~/.docker/config.json if present).
    #[arg(
        long,
        env = "DOCKER_CONFIG_FILE",
        conflicts_with = "credentials_secret"
    )]
    docker_config: Option<PathBuf>,
    /// A kubernetes.io/dockerconfigjson Secret, NAMESPACE/NAME, read with the pod's
    /// in-cluster credentials (the image controller's copy of a VMDiskImage's pull secret).
    #[arg(long)]
    credentials_secret: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// DaemonSet mode: warm the VMDiskImages whose cache policy selects this node, evict, and
    /// report the node's cache (NodeDiskCache, node labels, metrics).
    Run {
        #[command(flatten)]
        cache: CacheArgs,
        /// This node's name (from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Address for GET /metrics and /healthz.
        #[arg(long, env = "VMDISK_METRICS_LISTEN", default_value = "0.0.0.0:9102")]
        metrics_listen: std::net::SocketAddr,
        /// Seconds between full resyncs even without changes.
        #[arg(long, default_value_t = 60)]
        resync_seconds: u64,
        /// Namespace where the image controller keeps copies of the images' pull credentials.
        #[arg(long, env = "VMDISK_CREDENTIALS_NAMESPACE", default_value = vmdisk_crds::CREDENTIALS_NAMESPACE)]
        credentials_namespace: String,
    },
    /// Warm one image into a cache directory, with progress (for a person at a terminal).
    Warm {
        /// Image reference, e.g. quay.io/containerdisks/fedora:40
        image: String,
        #[command(flatten)]
        cache: CacheArgs,
        /// Format to store.
        #[arg(long, default_value = "raw")]
        format: DiskFormat,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Fill a PVC: copy a cache entry (warming it first when the cache is cold) to a target
    /// file or block device. Shares the cache with a running agent. Exit status 2 means
    /// retrying cannot help (image missing or refused, disk larger than the volume).
    Populate {
        /// Image reference, pinned to a digest.
        image: String,
        #[command(flatten)]
        cache: CacheArgs,
        /// Format of the cache entry to copy (and of the disk the target receives).
        #[arg(long, default_value = "raw")]
        format: DiskFormat,
        /// Target: a file path (Filesystem mode) or a block device (Block mode).
        #[arg(long)]
        target: PathBuf,
        /// Size the target file ends up with (raw: its length; qcow2: its virtual size);
        /// smaller than the disk is an error. Ignored for block devices.
        #[arg(long)]
        size: Option<String>,
        /// Owner of the target file, UID:GID (KubeVirt's qemu runs as 107:107).
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
        /// A PVC, NAMESPACE/NAME, whose `vmdisk.io/progress` annotation follows the progress
        /// (the populator's prime PVC).
        #[arg(long)]
        progress_pvc: Option<String>,
        /// Where to write the outcome in one line for Kubernetes (a pod's
        /// terminationMessagePath).
        #[arg(long)]
        termination_log: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List what is cached.
    Ls {
        #[command(flatten)]
        cache: CacheArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn open_store(args: &CacheArgs, role: OpenAs) -> anyhow::Result<Arc<CacheStore>> {
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
enum OpenAs {
    /// `run`: the agent owns the node's cache.
    Owner,
    /// `warm`, `ls`: own it when no agent does, share it otherwise.
    OwnerIfFree,
    /// `populate`: always share.
    Guest,
}

fn warmer(args: &CacheArgs, store: Arc<CacheStore>) -> anyhow::Result<Warmer> {
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
    ))
}

/// Registry options from the flags; credentials are read only when `with_credentials`.
async fn registry_options(
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
    } else if let Some(secret) = &args.credentials_secret {
        Some(read_credentials_secret(secret).await?)
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

fn namespaced(text: &str, flag: &str) -> anyhow::Result<(String, String)> {
    text.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .ok_or_else(|| anyhow::anyhow!("{flag} {text:?}: expected NAMESPACE/NAME"))
}

/// What populate's `--credentials-secret` and `--progress-pvc` ask of the API server (as the
/// populator pods' `vmdisk-populator` ServiceAccount).
pub const POPULATOR_API_ACCESS: &[vmdisk_crds::ApiAccess] = &[
    vmdisk_crds::ApiAccess::new(
        "",
        "secrets",
        &["get"],
        vmdisk_crds::AccessScope::CredentialsNamespace,
    ),
    vmdisk_crds::ApiAccess::new(
        "",
        "persistentvolumeclaims",
        &["patch"],
        vmdisk_crds::AccessScope::InstallNamespace,
    ),
];

async fn read_credentials_secret(secret: &str) -> anyhow::Result<DockerConfig> {
    let (namespace, name) = namespaced(secret, "--credentials-secret")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API to read --credentials-secret")?;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, &namespace);
    let s = secrets
        .get(&name)
        .await
        .with_context(|| format!("reading Secret {secret}"))?;
    DockerConfig::from_secret_data(&s.data.unwrap_or_default())
        .with_context(|| format!("Secret {secret}"))
}

/// Keeps `vmdisk.io/progress` on a PVC in step with `percent` until aborted.
async fn report_progress(pvc: String, percent: Arc<std::sync::atomic::AtomicU8>) {
    let Ok((namespace, name)) = namespaced(&pvc, "--progress-pvc") else {
        return;
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot report progress");
            return;
        }
    };
    let api: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        kube::Api::namespaced(client, &namespace);
    let mut last = None;
    loop {
        let now = percent.load(std::sync::atomic::Ordering::Relaxed);
        if last != Some(now) {
            let patch = serde_json::json!({"metadata": {"annotations": {
                vmdisk_crds::PROGRESS_ANNOTATION: format!("{now}%")}}});
            match api
                .patch(&name, &Default::default(), &kube::api::Patch::Merge(&patch))
                .await
            {
                Ok(_) => last = Some(now),
                Err(e) => tracing::debug!(error = %e, "progress not reported"),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Progress for a person: a bar on a terminal, plain lines otherwise.
fn progress_reporter() -> Arc<dyn Fn(WarmProgress) + Send + Sync> {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Arc::new(move |p| match p {
            WarmProgress::Resolving => bar.set_message("resolving"),
            WarmProgress::Pulling { done, total } => {
                bar.set_message("pulling");
                bar.set_length(total);
                bar.set_position(done);
            }
            WarmProgress::Converting => bar.set_message("converting"),
            WarmProgress::Committing => {
                bar.set_message("committing");
                bar.finish();
            }
        })
    } else {
        let last = std::sync::Mutex::new((std::time::Instant::now(), 0u64));
        Arc::new(move |p| match p {
            WarmProgress::Pulling { done, total } => {
                let mut last = last.lock().expect("progress lock");
                let now = std::time::Instant::now();
                if now.duration_since(last.0) >= Duration::from_secs(2) || done == total {
                    let rate = (done - last.1.min(done)) as f64
                        / now.duration_since(last.0).as_secs_f64().max(0.001);
                    let eta = if rate > 0.0 {
                        (total - done) as f64 / rate
                    } else {
                        0.0
                    };
                    eprintln!(
                        "pulling {done}/{total} bytes ({:.1} MiB/s, eta {eta:.0}s)",
                        rate / (1 << 20) as f64
                    );
                    *last = (now, done);
                }
            }
            other => eprintln!("{}", format!("{other:?}").to_lowercase()),
        })
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.mode {
        Mode::Warm {
            image,
            cache,
            format,
            registry,
        } => {
            let options = registry_options(&image, &registry, true).await?;
            let store = open_store(&cache, OpenAs::OwnerIfFree)?;
            let warmer = warmer(&cache, store)?;
            let outcome = warmer
                .warm(
                    WarmRequest {
                        reference: image.clone(),
                        format,
                        registry: options,
                    },
                    progress_reporter(),
                )
                .await
                .map_err(|e| anyhow::anyhow!(crate::error_chain(e.as_ref())))?;
            let e = &outcome.entry;
            println!(
                "{} {} {} virtual={} allocated={} {}",
                if outcome.pulled { "warmed" } else { "cached" },
                e.key.digest,
                e.key.format,
                e.meta.virtual_size,
                e.meta.allocated_size,
                e.disk_path.display()
            );
            Ok(())
        }
        Mode::Ls { cache, json } => {
            let store = open_store(&cache, OpenAs::OwnerIfFree)?;
            let mut entries = store.entries();
            entries.sort_by_key(|e| std::cmp::Reverse(e.meta.last_used));
            if json {
                let rows: Vec<_> = entries.iter().map(|e| &e.meta).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ls_table(&store, &entries));
            }
            Ok(())
        }
        Mode::Populate {
            image,
            cache,
            format,
            target,
            size,
            owner,
            progress_pvc,
            termination_log,
            registry,
        } => {
            let result = run_populate(PopulateArgs {
                image,
                cache,
                format,
                target,
                size,
                owner,
                progress_pvc,
                registry,
            })
            .await;
            if let Some(path) = termination_log {
                let line = match &result {
                    Ok(summary) => summary.clone(),
                    Err(e) => format!("{e:#}"),
                };
                if let Err(e) = std::fs::write(&path, line) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the termination log");
                }
            }
            println!("{}", result?);
            Ok(())
        }
        Mode::Run {
            cache,
            node_name,
            metrics_listen,
            resync_seconds,
            credentials_namespace,
        } => {
            let store = open_store(&cache, OpenAs::Owner)?;
            let warmer = warmer(&cache, store)?;
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let metrics = Arc::new(crate::node::AgentMetrics::new());
            let reporter = crate::node::NodeReporter::new(client.clone(), node_name.clone());
            let listener = tokio::net::TcpListener::bind(metrics_listen)
                .await
                .with_context(|| format!("listening on {metrics_listen}"))?;
            tokio::spawn(crate::node::serve_metrics(listener, Arc::clone(&metrics)));
            tracing::info!(node = %node_name, cache = %cache.cache_dir.display(), "cache agent running");
            crate::node::Agent {
                client,
                node_name,
                credentials_namespace,
                warmer,
                reporter,
                metrics,
                resync: Duration::from_secs(resync_seconds.max(5)),
            }
            .run()
            .await;
            Ok(())
        }
    }
}

struct PopulateArgs {
    image: String,
    cache: CacheArgs,
    format: DiskFormat,
    target: PathBuf,
    size: Option<String>,
    owner: Option<(u32, u32)>,
    progress_pvc: Option<String>,
    registry: RegistryArgs,
}

/// `populate`; the one-line summary on success. A [`crate::populate::PopulateError`] stays
/// inside the anyhow error, so `main` can tell permanent failures by their type.
async fn run_populate(args: PopulateArgs) -> anyhow::Result<String> {
    let size = args
        .size
        .map(|s| parse_quantity(&s).map_err(|e| anyhow::anyhow!("--size: {e}")))
        .transpose()?;
    let store = open_store(&args.cache, OpenAs::Guest)?;
    // A warm entry needs no registry, so no credentials either: a warm populate works while
    // the API server (where the credentials are) is unreachable.
    let cached = crate::warm::pinned_digest(&args.image).is_some_and(|digest| {
        store
            .get_or_adopt(&crate::store::EntryKey {
                digest: digest.to_string(),
                format: args.format,
            })
            .is_some()
    });
    let options = registry_options(&args.image, &args.registry, !cached).await?;
    let warmer = warmer(&args.cache, store)?;
    let percent = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let reporter = args
        .progress_pvc
        .clone()
        .map(|pvc| tokio::spawn(report_progress(pvc, Arc::clone(&percent))));
    let progress = {
        let percent = Arc::clone(&percent);
        Arc::new(move |p: PopulateProgress| {
            percent.fetch_max(p.percent(), std::sync::atomic::Ordering::Relaxed);
        })
    };
    let result = populate(
        &warmer,
        PopulateRequest {
            reference: args.image.clone(),
            format: args.format,
            registry: options,
            target: args.target.clone(),
            size,
            owner: args.owner,
        },
        progress,
    )
    .await;
    if let Some(task) = reporter {
        // One last report, so the PVC says 100% on success.
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        if result.is_ok() {
            percent.store(100, std::sync::atomic::Ordering::Relaxed);
            let last = tokio::spawn(report_progress(
                args.progress_pvc.clone().unwrap_or_default(),
                Arc::clone(&percent),
            ));
            tokio::time::sleep(Duration::from_millis(500)).await;
            last.abort();
        }
    }
    let report = result?;
    Ok(format!(
        "populated {} from {} ({:?}, {} bytes written, {} bytes, {})",
        args.target.display(),
        report.key.digest,
        report.method,
        report.bytes_written,
        report.target_size,
        if report.cache_hit {
            "warm: cache hit"
        } else {
            "cold: pulled"
        }
    ))
}

/// `ls` for people: sizes in binary units, newest use first.
fn ls_table(store: &CacheStore, entries: &[crate::store::CacheEntry]) -> String {
    use vmdisk_crds::format_bytes_human as human;
    let mut out = format!(
        "{:<73} {:<6} {:>10} {:>10} {:<20} PINNED\n",
        "DIGEST", "FORMAT", "VIRTUAL", "ALLOCATED", "LAST USED"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<73} {:<6} {:>10} {:>10} {:<20} {}\n",
            e.key.digest,
            e.key.format,
            human(e.meta.virtual_size),
            human(e.meta.allocated_size),
            e.meta.last_used.format("%Y-%m-%d %H:%M:%S"),
            if store.is_pinned(&e.key) { "yes" } else { "no" }
        ));
    }
    out.push_str(&format!(
        "{} entries, {} used of a {} budget\n",
        entries.len(),
        human(store.used_bytes()),
        human(store.budget_bytes())
    ));
    out
}
