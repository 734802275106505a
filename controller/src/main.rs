//! `vmdisk-controller`: wires flags → API client → probes and metrics → leader election,
//! which runs the controllers while this replica leads.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use vmdisk_controller::config::ControllerArgs;
use vmdisk_controller::metrics::ControllerMetrics;
use vmdisk_controller::server::{router, serve, termination_signal};
use vmdisk_controller::supervisor::{self, Leadership};

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let args = ControllerArgs::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "vmdisk-controller stopped");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(ControllerMetrics::new());
    let leadership = Arc::new(Leadership::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("listening on {}", args.metrics_listen))?;
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
