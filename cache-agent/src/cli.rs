//! The command line (`run`, `warm`, `populate`, `ls`): the binary's edge, where flags become
//! components and errors become messages for a person.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::clone::clone_disk;
use crate::extract::ExtractLimits;
use crate::store::{Budget, CacheStore, EntryKey};
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
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Docker config.json with registry credentials (default: ~/.docker/config.json if present).
    #[arg(long, env = "DOCKER_CONFIG_FILE")]
    docker_config: Option<PathBuf>,
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
    /// Fill a PVC: copy a cache entry (pulling it first when the cache is cold) to a target
    /// file or block device, and grow it to the requested size.
    Populate {
        /// Image reference, pinned to a digest.
        image: String,
        #[command(flatten)]
        cache: CacheArgs,
        #[arg(long, default_value = "raw")]
        format: DiskFormat,
        /// Target: a file path (Filesystem mode) or a block device (Block mode).
        #[arg(long)]
        target: PathBuf,
        /// Size of the volume (raw targets are grown to it).
        #[arg(long)]
        size: Option<String>,
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

fn open_store(args: &CacheArgs) -> anyhow::Result<Arc<CacheStore>> {
    let budget: Budget = args
        .budget
        .parse()
        .map_err(|e| anyhow::anyhow!("--budget {:?}: {e}", args.budget))?;
    std::fs::create_dir_all(&args.cache_dir)
        .with_context(|| format!("creating cache directory {}", args.cache_dir.display()))?;
    let (store, report) = CacheStore::open(&args.cache_dir, budget)
        .with_context(|| format!("opening cache {}", args.cache_dir.display()))?;
    if report.removed_staging > 0 || !report.removed_corrupt.is_empty() {
        tracing::warn!(
            staging = report.removed_staging,
            corrupt = ?report.removed_corrupt,
            "cleaned up after an interrupted run"
        );
    }
    Ok(Arc::new(store))
}

fn warmer(args: &CacheArgs, store: Arc<CacheStore>) -> anyhow::Result<Warmer> {
    let max_disk_bytes =
        parse_quantity(&args.max_disk_size).map_err(|e| anyhow::anyhow!("--max-disk-size: {e}"))?;
    let puller = Puller::new(PullerConfig {
        max_parallel_pulls: args.max_parallel_pulls.max(1),
        ..PullerConfig::default()
    });
    Ok(Warmer::new(store, puller, ExtractLimits { max_disk_bytes }))
}

fn registry_options(image: &str, args: &RegistryArgs) -> anyhow::Result<RegistryOptions> {
    let reference = ImageReference::parse(image)?;
    let ca_bundle = match &args.ca_bundle {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let config_path = args.docker_config.clone().or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json");
        p.exists().then_some(p)
    });
    let credentials = match config_path {
        Some(path) => Some(
            DockerConfig::from_file(&path)
                .with_context(|| format!("reading docker config {}", path.display()))?,
        ),
        None => None,
    };
    Ok(RegistryOptions::new(
        &reference,
        args.insecure,
        ca_bundle,
        credentials.as_ref(),
    ))
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
            WarmProgress::Extracting => bar.set_message("extracting"),
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
            let options = registry_options(&image, &registry)?;
            let store = open_store(&cache)?;
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
            let store = open_store(&cache)?;
            let mut entries = store.entries();
            entries.sort_by_key(|e| std::cmp::Reverse(e.meta.last_used));
            if json {
                let rows: Vec<_> = entries.iter().map(|e| &e.meta).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<73} {:<6} {:>14} {:>14} {:<20} PINNED",
                    "DIGEST", "FORMAT", "VIRTUAL", "ALLOCATED", "LAST USED"
                );
                for e in &entries {
                    println!(
                        "{:<73} {:<6} {:>14} {:>14} {:<20} {}",
                        e.key.digest,
                        e.key.format,
                        e.meta.virtual_size,
                        e.meta.allocated_size,
                        e.meta.last_used.format("%Y-%m-%d %H:%M:%S"),
                        store.is_pinned(&e.key)
                    );
                }
                println!(
                    "{} entries, {} bytes used of {} budget",
                    entries.len(),
                    store.used_bytes(),
                    store.budget_bytes()
                );
            }
            Ok(())
        }
        Mode::Populate {
            image,
            cache,
            format,
            target,
            size,
            registry,
        } => {
            let size = size
                .map(|s| parse_quantity(&s).map_err(|e| anyhow::anyhow!("--size: {e}")))
                .transpose()?;
            let options = registry_options(&image, &registry)?;
            let store = open_store(&cache)?;
            let warmer = warmer(&cache, Arc::clone(&store))?;
            let outcome = warmer
                .warm(
                    WarmRequest {
                        reference: image.clone(),
                        format,
                        registry: options,
                    },
                    Arc::new(|_| {}),
                )
                .await
                .map_err(|e| anyhow::anyhow!(crate::error_chain(e.as_ref())))?;
            let key: EntryKey = outcome.entry.key.clone();
            let lease = store
                .lease(&key)
                .context("the cache entry was evicted before it could be leased")?;
            let source = outcome.entry.disk_path.clone();
            let dest = target.clone();
            // A raw disk grows by length; a qcow2 file's length is not its virtual size, so it
            // is grown by `qemu-img resize` below instead.
            let grow_to = if format == DiskFormat::Raw {
                size
            } else {
                None
            };
            let report =
                tokio::task::spawn_blocking(move || clone_disk(&source, &dest, grow_to)).await??;
            drop(lease);
            store.touch(&key);
            if format == DiskFormat::Qcow2 {
                if let Some(bytes) = size.filter(|s| *s > outcome.entry.meta.virtual_size) {
                    crate::convert::resize(&target, bytes).await?;
                }
            }
            println!(
                "populated {} from {} ({:?}, {} bytes written, {})",
                target.display(),
                key.digest,
                report.method,
                report.bytes_written,
                if outcome.pulled {
                    "cold: pulled"
                } else {
                    "warm: cache hit"
                }
            );
            Ok(())
        }
        Mode::Run {
            cache,
            node_name,
            metrics_listen,
            resync_seconds,
            credentials_namespace,
        } => {
            let store = open_store(&cache)?;
            let warmer = warmer(&cache, store)?;
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let metrics = Arc::new(crate::report::AgentMetrics::new());
            let reporter = crate::report::NodeReporter::new(client.clone(), node_name.clone());
            let listener = tokio::net::TcpListener::bind(metrics_listen)
                .await
                .with_context(|| format!("listening on {metrics_listen}"))?;
            tokio::spawn(crate::serve_metrics(listener, Arc::clone(&metrics)));
            tracing::info!(node = %node_name, cache = %cache.cache_dir.display(), "cache agent running");
            crate::agent::Agent {
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
