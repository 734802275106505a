//! Peers: nodes fill their caches from each other, so that an image costs one registry pull
//! per cluster rather than one per node.
//!
//! - [`blobs`]: the copies of layers this node keeps (also while downloading) to serve.
//! - [`server`]: serves them over HTTPS to other nodes' agents, each proved by its node-bound
//!   token and allowed only the layers of images its node was asked to hold.
//! - [`sourcing`]: for a warm here, which nodes hold or are pulling an image's layers (their
//!   NodeDiskCache status), and which one node pulls from the registry when none does yet.
//!
//! The download itself (peers first, the registry after, one digest check over every byte)
//! is `vmdisk_registry::pull`'s.

pub mod blobs;
pub mod server;
pub mod sourcing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use thiserror::Error;
use vmdisk_registry::pull::{PeerClient, PeerConnect};

use crate::node::AgentMetrics;

/// The digests of the images every node is asked to hold (the controller's every-node list,
/// which the NodeDiskCaches do not repeat).
pub(crate) async fn every_node_digests(
    client: &Client,
) -> Result<std::collections::BTreeSet<String>, kube::Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use vmdisk_crds::{EVERY_NODE_LIST, INSTALL_NAMESPACE};
    let lists = kube::Api::<ConfigMap>::namespaced(client.clone(), INSTALL_NAMESPACE)
        .list(&kube::api::ListParams::default().fields(&format!("metadata.name={EVERY_NODE_LIST}")))
        .await?;
    Ok(lists
        .items
        .iter()
        .filter_map(|map| crate::node::every_node_images(map).ok())
        .flatten()
        .map(|image| image.digest)
        .collect())
}

/// How long a peer may send nothing before it is dropped (longer than a server waits for a
/// layer's download to begin).
pub const STALL: Duration = Duration::from_secs(15);
/// How often copies nobody reads any more are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Peers as the `run` flags configure them.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub listen: SocketAddr,
    /// `https://<address>:<port>`, written to this node's NodeDiskCache status.
    pub advertise: String,
    pub tls_dir: PathBuf,
    pub server_name: String,
    pub token_file: PathBuf,
    pub limits: server::UploadLimits,
    pub seed_wait: Duration,
    pub keep: Duration,
    /// `<cache>/peers`.
    pub blobs_dir: PathBuf,
}

#[derive(Debug, Error)]
pub enum PeersError {
    #[error("the peers' CA in {0}")]
    Ca(PathBuf, #[source] Box<crate::node::CredentialsError>),
    #[error("preparing {0} for the layers kept for peers")]
    Blobs(PathBuf, #[source] std::io::Error),
}

/// Starts serving peers (until `stop`; a server that cannot start or stops is logged, and
/// the node's warms still work) and returns where this node's warms find layers.
pub fn start(
    config: &PeerConfig,
    client: Client,
    node: String,
    install_namespace: &str,
    metrics: Arc<AgentMetrics>,
    stop: vmdisk_support::process::Stop,
) -> Result<Arc<sourcing::PeerSourcing>, PeersError> {
    let ca = config.tls_dir.join("ca.crt");
    let tls =
        crate::node::credentials::tls_config(&ca).map_err(|e| PeersError::Ca(ca, Box::new(e)))?;
    let blobs = blobs::Blobs::open(&config.blobs_dir)
        .map_err(|e| PeersError::Blobs(config.blobs_dir.clone(), e))?;
    let token_file = config.token_file.clone();
    let peer_client = PeerClient {
        connect: PeerConnect::Named {
            name: config.server_name.clone(),
            tls: Arc::new(tls),
        },
        token: Arc::new(move || {
            std::fs::read_to_string(&token_file)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("{}: {e}", token_file.display()))
        }),
        stall: STALL,
    };
    let sourcing = Arc::new(sourcing::PeerSourcing::new(
        client.clone(),
        node,
        Arc::clone(&blobs),
        peer_client,
        config.seed_wait,
    ));
    let sweeping = Arc::clone(&blobs);
    let keep = config.keep;
    let sweep_stop = stop.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => sweeping.sweep(keep),
                _ = sweep_stop.cancelled() => return,
            }
        }
    });
    let peer_server = Arc::new(server::PeerServer::new(
        client,
        install_namespace,
        blobs,
        config.limits,
        metrics,
    ));
    let (listen, tls_dir) = (config.listen, config.tls_dir.clone());
    tokio::spawn(async move {
        if let Err(e) = server::serve(listen, &tls_dir, peer_server, stop.cancelled_owned()).await {
            tracing::error!(error = %crate::error_chain(&e), "cannot serve peers; other nodes fetch from the registry or other peers");
        }
    });
    Ok(sourcing)
}
