//! `vmdisk-webhook`: wires flags → catalog → TLS → HTTPS server.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use vmdisk_support::https::serve_tls;
use vmdisk_support::process::{self, bind, Stop};
use vmdisk_support::tls::{server_config, CertPaths, ReloadingCertResolver};
use vmdisk_webhook::catalog::{file::FileCatalog, kube::KubeCatalog, ImageCatalog};
use vmdisk_webhook::config::WebhookArgs;
use vmdisk_webhook::metrics::WebhookMetrics;
use vmdisk_webhook::routes::{router, Webhook};

fn main() -> std::process::ExitCode {
    vmdisk_support::allocator::tune_allocator();
    let args = WebhookArgs::parse();
    // The drain, and a second for the rest of the stop.
    let finish_within = args.drain() + std::time::Duration::from_secs(1);
    process::run_main("vmdisk-webhook", finish_within, |stop| run(args, stop))
}

/// Serves until the stop; in-flight reviews finish (within `--drain-seconds`).
async fn run(args: WebhookArgs, stop: Stop) -> anyhow::Result<()> {
    process::init_logging(process::LogFormat::named(&args.log_format));
    let _ = rustls::crypto::ring::default_provider().install_default();

    let resolver = ReloadingCertResolver::load(CertPaths::in_dir(&args.cert_dir))
        .context("loading the serving certificate")?;
    let _cert_watch = resolver
        .watch()
        .context("watching the certificate directory")?;

    let metrics = Arc::new(WebhookMetrics::new());
    let mut background = Vec::new();
    let mut _catalog_watch = None;
    let catalog: Arc<dyn ImageCatalog> = match &args.catalog_dir {
        Some(dir) => {
            let catalog = FileCatalog::open(dir).context("loading the catalog directory")?;
            _catalog_watch = Some(catalog.watch().context("watching the catalog directory")?);
            catalog
        }
        None => {
            let client = kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (use --catalog-dir to run without a cluster)",
            )?;
            let (catalog, tasks) = KubeCatalog::start(client);
            background.extend(tasks);
            catalog
        }
    };

    let mut webhook = Webhook::new(catalog, args.mutation_config());
    webhook.metrics = metrics;
    webhook.max_body_bytes = args.max_body_bytes;
    webhook.tls_ready.store(true, Ordering::Release);
    let webhook = Arc::new(webhook);

    let listener = bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving admission webhook");
    serve_tls(
        listener,
        server_config(resolver),
        router(webhook),
        stop.cancelled_owned(),
        args.drain(),
        args.max_connections,
    )
    .await;
    for task in background {
        task.abort();
    }
    Ok(())
}
