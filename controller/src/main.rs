//! `vmdisk-controller`: wires flags → API client → probes and metrics, the agent API → leader
//! election, which runs the controllers while this replica leads, until the stop (SIGTERM).

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use vmdisk_controller::agent_api::{self, AgentApi};
use vmdisk_controller::config::ControllerArgs;
use vmdisk_controller::metrics::ControllerMetrics;
use vmdisk_controller::server::router;
use vmdisk_controller::supervisor::{self, Leadership};
use vmdisk_support::metrics::serve;
use vmdisk_support::process::{self, Stop};

fn main() -> std::process::ExitCode {
    vmdisk_support::allocator::tune_allocator();
    let args = ControllerArgs::parse();
    process::run_main("vmdisk-controller", supervisor::FINISH_WITHIN, |stop| {
        run(args, stop)
    })
}

async fn run(args: ControllerArgs, stop: Stop) -> anyhow::Result<()> {
    process::init_logging(process::LogFormat::named(&args.log_format));
    let _ = rustls::crypto::ring::default_provider().install_default();

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(ControllerMetrics::new());
    let leadership = Arc::new(Leadership::default());
    let listener = process::bind(args.metrics_listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    let mut server = tokio::spawn(serve(
        listener,
        router(Arc::clone(&metrics), Arc::clone(&leadership)),
        stop.clone().cancelled_owned(),
    ));
    // The agent API needs no leadership: both replicas serve it.
    let mut agent_api = match args.agent_api_listen {
        Some(listen) => {
            let api = Arc::new(AgentApi::new(
                client.clone(),
                &args.namespace,
                &args.credentials_namespace,
                metrics.agent_api.clone(),
            ));
            let (dir, stop) = (args.agent_api_cert_dir.clone(), stop.clone());
            tokio::spawn(async move {
                agent_api::serve(listen, &dir, api, stop.cancelled_owned()).await
            })
        }
        None => tokio::spawn(std::future::pending()),
    };
    let mut controllers = supervisor::spawn(
        client,
        args.controller_config(),
        metrics,
        leadership,
        stop.clone(),
    );
    tokio::select! {
        served = &mut agent_api => {
            stop.cancel();
            let _ = controllers.await;
            let _ = server.await;
            match served {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("the agent API stopped")),
                Err(e) => Err(anyhow::Error::new(e).context("the agent API stopped")),
            }
        }
        served = &mut server => {
            // Only the stop ends the server; anything else is an error, and the stop ends the
            // controllers either way.
            stop.cancel();
            let _ = controllers.await;
            match served {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
                Err(e) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
            }
        }
        ended = &mut controllers => {
            let stopping = stop.is_cancelled();
            stop.cancel();
            let _ = server.await;
            match ended {
                Err(e) => Err(anyhow::Error::new(e).context("leader election stopped")),
                // The controllers stopped and the Lease is released.
                Ok(()) if stopping => Ok(()),
                Ok(()) => Err(anyhow::anyhow!("leader election stopped")),
            }
        }
    }
}
