//! `vmdisk-cache-agent run`, the DaemonSet: owns the node's cache, serves `/metrics` and
//! `/healthz`, and runs the [`crate::node::Agent`] loop until the stop (SIGTERM).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::setup::{open_store, warmer, OpenAs};
use super::{CacheArgs, PeerArgs};
use crate::peer::PeerConfig;

/// The peers' settings from the flags; `None` when peers are off.
fn peer_config(args: &PeerArgs, cache: &CacheArgs) -> anyhow::Result<Option<PeerConfig>> {
    let Some(listen) = args.peer_listen else {
        return Ok(None);
    };
    let advertise = match (&args.peer_advertise, std::env::var("POD_IP")) {
        (Some(url), _) => url.clone(),
        (None, Ok(ip)) if !ip.is_empty() => format!("https://{ip}:{}", listen.port()),
        _ => anyhow::bail!(
            "--peer-listen needs --peer-advertise (or POD_IP from the downward API): the URL other agents reach this one at"
        ),
    };
    let valid = advertise
        .strip_prefix("https://")
        .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok());
    anyhow::ensure!(
        valid,
        "--peer-advertise {advertise:?} is not https://<address>:<port>"
    );
    let bytes_per_second = args
        .peer_upload_rate
        .as_deref()
        .map(vmdisk_crds::parse_quantity)
        .transpose()
        .context("--peer-upload-rate")?
        .filter(|rate| *rate > 0);
    Ok(Some(PeerConfig {
        listen,
        advertise,
        tls_dir: args.peer_tls_dir.clone(),
        server_name: args.peer_server_name.clone(),
        token_file: args.peer_token.clone(),
        limits: crate::peer::server::UploadLimits {
            max_uploads: args.peer_max_uploads,
            bytes_per_second,
        },
        seed_wait: Duration::from_secs(args.peer_seed_wait_seconds),
        keep: Duration::from_secs(args.peer_keep_seconds),
        blobs_dir: cache.cache_dir.join("peers"),
    }))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn execute(
    cache: CacheArgs,
    node_name: String,
    metrics_listen: std::net::SocketAddr,
    resync_seconds: u64,
    credentials: crate::node::CredentialsSource,
    peer_args: PeerArgs,
    stop: vmdisk_support::process::Stop,
) -> anyhow::Result<()> {
    let peers = peer_config(&peer_args, &cache)?;
    let store = open_store(&cache, OpenAs::Owner)?;
    let mut warmer = warmer(&cache, store)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(crate::node::AgentMetrics::new());
    let mut peer_endpoint = None;
    if let Some(config) = &peers {
        // Peers save registry traffic; a node whose peer setup fails still warms.
        match crate::peer::start(
            config,
            client.clone(),
            node_name.clone(),
            vmdisk_crds::INSTALL_NAMESPACE,
            Arc::clone(&metrics),
            stop.clone(),
        ) {
            Ok(sourcing) => {
                warmer = warmer.with_peers(sourcing);
                peer_endpoint = Some(config.advertise.clone());
                tracing::info!(listen = %config.listen, advertise = %config.advertise, "peers on");
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "peers off: this node pulls from registries only")
            }
        }
    }
    let reporter = crate::node::NodeReporter::new(client.clone(), node_name.clone());
    let listener = vmdisk_support::process::bind(metrics_listen).await?;
    let endpoint = vmdisk_support::metrics::router(Arc::clone(&metrics));
    let server = tokio::spawn(vmdisk_support::metrics::serve(
        listener,
        endpoint,
        stop.clone().cancelled_owned(),
    ));
    tracing::info!(node = %node_name, cache = %cache.cache_dir.display(), "cache agent running");
    crate::node::Agent {
        client,
        node_name,
        credentials,
        warmer,
        reporter,
        metrics,
        resync: Duration::from_secs(resync_seconds.max(5)),
        peer_endpoint,
    }
    .run(stop.clone())
    .await;

    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
        Err(e) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
    }
}
