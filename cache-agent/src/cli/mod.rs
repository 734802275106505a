//! The command line (`run`, `warm`, `populate`, `ls`): the binary's edge, where flags become
//! components and errors become messages for a person.
//!
//! This file holds the clap definitions and hands each subcommand to its own file; `setup`
//! turns the flags every subcommand shares into a store, a warmer and registry options.

mod ls;
mod populate;
mod run;
mod setup;
mod warm;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vmdisk_crds::{DiskFormat, DEFAULT_PARALLEL_COPIES};

use crate::populate::parse_owner;

pub(crate) use self::populate::POPULATOR_API_ACCESS;

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
    /// Whether a cached disk is served only after the registry confirmed that the requester's
    /// own credentials may pull it: AlwaysVerify, or NeverVerify (anyone naming a cached
    /// digest gets the disk: only for clusters whose users may all read every image).
    #[arg(long, env = "VMDISK_PULL_VERIFICATION", default_value = "AlwaysVerify")]
    pull_verification: crate::warm::authorize::VerifyPolicy,
    /// Seconds a requester verified for a digest is trusted without asking the registry again
    /// (and so how long a warm populate works while the registry is unreachable).
    #[arg(long, env = "VMDISK_VERIFIED_PULL_TTL_SECONDS", default_value_t = crate::warm::authorize::DEFAULT_VERIFIED_TTL.as_secs())]
    verified_pull_ttl_seconds: u64,
}

impl CacheArgs {
    fn verification(&self) -> crate::warm::authorize::VerifyPolicy {
        use crate::warm::authorize::VerifyPolicy;
        match self.pull_verification {
            VerifyPolicy::AlwaysVerify { .. } => VerifyPolicy::AlwaysVerify {
                ttl: std::time::Duration::from_secs(self.verified_pull_ttl_seconds),
            },
            VerifyPolicy::NeverVerify => VerifyPolicy::NeverVerify,
        }
    }
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
    /// Docker config.json with registry credentials (default: ~/.docker/config.json if present;
    /// populator pods mount their own copy of the image's pull secret).
    #[arg(long, env = "DOCKER_CONFIG_FILE")]
    docker_config: Option<PathBuf>,
}

/// Peers: this node's agent serves the layers it holds or is pulling to other nodes' agents,
/// and fetches from them before the registry.
#[derive(Debug, Args, Clone)]
pub struct PeerArgs {
    /// Where to serve peers (e.g. 0.0.0.0:9443). Without it, peers are off: this node
    /// neither serves nor asks them, and pulls from registries only.
    #[arg(long, env = "VMDISK_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The URL other agents reach this one at, written to the NodeDiskCache status
    /// (default: https://$POD_IP:<the listen port>).
    #[arg(long, env = "VMDISK_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Directory of the peers' serving certificate (`tls.crt`, `tls.key`, reloaded when they
    /// change) and of the CA (`ca.crt`) that issued every agent's.
    #[arg(
        long,
        env = "VMDISK_PEER_TLS_DIR",
        default_value = "/var/run/vmdisk/peer-tls"
    )]
    pub peer_tls_dir: PathBuf,
    /// The name every agent's peer certificate carries, checked when asking a peer.
    #[arg(
        long,
        env = "VMDISK_PEER_SERVER_NAME",
        default_value = "vmdisk-peer.vmdisk-system.svc"
    )]
    pub peer_server_name: String,
    /// This pod's ServiceAccount token for audience vmdisk-peer (a projected volume), shown
    /// to peers.
    #[arg(
        long,
        env = "VMDISK_PEER_TOKEN",
        default_value = "/var/run/vmdisk/peer/token"
    )]
    pub peer_token: PathBuf,
    /// Peers this node serves at once; more get 503 and ask elsewhere.
    #[arg(long, env = "VMDISK_PEER_MAX_UPLOADS", default_value_t = 16)]
    pub peer_max_uploads: usize,
    /// Bytes per second this node sends its peers, over all uploads (a quantity: `100Mi`);
    /// unlimited without it.
    #[arg(long, env = "VMDISK_PEER_UPLOAD_RATE")]
    pub peer_upload_rate: Option<String>,
    /// How long a node waits for the node elected to pull a new image from the registry to
    /// start, before it pulls from the registry itself.
    #[arg(long, env = "VMDISK_PEER_SEED_WAIT_SECONDS", default_value_t = 20)]
    pub peer_seed_wait_seconds: u64,
    /// How long a layer's copy is kept for peers after it was last read.
    #[arg(long, env = "VMDISK_PEER_KEEP_SECONDS", default_value_t = 600)]
    pub peer_keep_seconds: u64,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// DaemonSet mode: warm the images the controller lists for this node (its NodeDiskCache
    /// and the every-node list), evict, and report the node's cache (NodeDiskCache, node
    /// labels, metrics).
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
        /// The controller's agent API, where the agent fetches the pull credentials of the
        /// images its node prefetches (e.g. https://vmdisk-controller.vmdisk-system.svc:8443).
        /// Without it, images that name a pull secret are not prefetched.
        #[arg(long, env = "VMDISK_CREDENTIALS_URL", value_parser = crate::node::parse_credentials_url)]
        credentials_url: Option<String>,
        /// The CA (PEM) that issued the agent API's certificate.
        #[arg(
            long,
            env = "VMDISK_CREDENTIALS_CA",
            default_value = "/var/run/vmdisk/agent-api/ca.crt"
        )]
        credentials_ca: PathBuf,
        /// This pod's ServiceAccount token for audience vmdisk-controller (a projected volume),
        /// shown to the agent API.
        #[arg(
            long,
            env = "VMDISK_CREDENTIALS_TOKEN",
            default_value = "/var/run/vmdisk/agent-api/token"
        )]
        credentials_token: PathBuf,
        #[command(flatten)]
        peers: PeerArgs,
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
    /// file or block device, or with --source-dir convert the disk of an image the node's
    /// runtime mounted. Shares the cache with a running agent. Exit status 2 means retrying
    /// cannot help (image missing or refused, disk larger than the volume).
    Populate {
        /// Image reference, pinned to a digest.
        image: String,
        /// Where the node's runtime mounted the image (an image volume, `pullMethod: node`):
        /// its `disk/` file is converted onto the target; no cache, no registry.
        #[arg(long)]
        source_dir: Option<PathBuf>,
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
        /// At most this many populates copy out of the node's cache at once (the others wait
        /// for a slot); 0 for no bound.
        #[arg(long, env = "VMDISK_PARALLEL_COPIES", default_value_t = DEFAULT_PARALLEL_COPIES)]
        parallel_copies: usize,
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
        /// Forget the unfinished warms of an image refused for having killed them
        /// (DIGEST, as `ls` lists it), so it is warmed again.
        #[arg(long, value_name = "DIGEST")]
        forget: Option<String>,
    },
}

impl Mode {
    /// `run`: the long-running DaemonSet mode, which ends on the stop (SIGTERM).
    pub fn is_daemon(&self) -> bool {
        matches!(self, Mode::Run { .. })
    }
}

/// Runs one parsed command line to its end (`run` never ends: see [`run_until_stopped`]).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until_stopped(cli, vmdisk_support::process::Stop::new()).await
}

/// Runs one parsed command line; `run` ends on `stop`, the other commands ignore it.
pub async fn run_until_stopped(
    cli: Cli,
    stop: vmdisk_support::process::Stop,
) -> anyhow::Result<()> {
    match cli.mode {
        Mode::Run {
            cache,
            node_name,
            metrics_listen,
            resync_seconds,
            credentials_url,
            credentials_ca,
            credentials_token,
            peers,
        } => {
            let credentials = crate::node::CredentialsSource {
                url: credentials_url,
                ca_file: credentials_ca,
                token_file: credentials_token,
            };
            run::execute(
                cache,
                node_name,
                metrics_listen,
                resync_seconds,
                credentials,
                peers,
                stop,
            )
            .await
        }
        Mode::Warm {
            image,
            cache,
            format,
            registry,
        } => warm::execute(image, cache, format, registry).await,
        Mode::Populate {
            image,
            source_dir,
            cache,
            format,
            target,
            size,
            owner,
            progress_pvc,
            parallel_copies,
            termination_log,
            registry,
        } => {
            let args = populate::PopulateArgs {
                image,
                source_dir,
                cache,
                format,
                target,
                size,
                owner,
                progress_pvc,
                parallel_copies: (parallel_copies > 0).then_some(parallel_copies),
                registry,
            };
            populate::execute(args, termination_log).await
        }
        Mode::Ls {
            cache,
            json,
            forget,
        } => ls::execute(&cache, json, forget.as_deref()),
    }
}
