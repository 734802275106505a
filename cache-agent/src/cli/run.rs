//! `vmdisk-cache-agent run`, the DaemonSet: owns the node's cache, serves `/metrics` and
//! `/healthz`, and runs the [`crate::node::Agent`] loop until the stop (SIGTERM).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::setup::{open_store, warmer, OpenAs};
use super::CacheArgs;

pub(super) async fn execute(
    cache: CacheArgs,
    node_name: String,
    metrics_listen: std::net::SocketAddr,
    resync_seconds: u64,
    credentials: crate::node::CredentialsSource,
    stop: vmdisk_support::process::Stop,
) -> anyhow::Result<()> {
    let store = open_store(&cache, OpenAs::Owner)?;
    let warmer = warmer(&cache, store)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(crate::node::AgentMetrics::new());
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
    }
    .run(stop.clone())
    .await;
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
        Err(e) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
    }
}
