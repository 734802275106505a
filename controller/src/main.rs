//! `vmdisk-controller`: wires flags → API client → probes and metrics → leader election,
//! which runs the controllers while this replica leads.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use vmdisk_controller::config::ControllerArgs;
use vmdisk_controller::metrics::ControllerMetrics;
use vmdisk_controller::server::router;
use vmdisk_controller::supervisor::{self, Leadership};
use vmdisk_support::metrics::serve;
use vmdisk_support::process::{self, termination_signal};

fn main() -> std::process::ExitCode {
    process::run_main("vmdisk-controller", run(ControllerArgs::parse()))
}

async fn run(args: ControllerArgs) -> anyhow::Result<()> {
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
        termination_signal(),
    ));
    let mut controllers = supervisor::spawn(client, args.controller_config(), metrics, leadership);
    let result = tokio::select! {
        served = &mut server => match served {
            // A termination signal ended the server: the controllers stop with the process.
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
            Err(e) => Err(anyhow::Error::new(e).context("the metrics server stopped")),
        },
        ended = &mut controllers => Err(match ended {
            Err(e) => anyhow::Error::new(e).context("leader election stopped"),
            Ok(()) => anyhow::anyhow!("leader election stopped"),
        }),
    };
    controllers.abort();
    server.abort();
    result
}
