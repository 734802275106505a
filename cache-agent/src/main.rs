//! `vmdisk-cache-agent`: logging and runtime around [`vmdisk_cache_agent::cli`].

use clap::Parser;
use vmdisk_cache_agent::cli::{run, Cli};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    vmdisk_cache_agent::tune_allocator();
    let cli = Cli::parse();
    init_logging();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", vmdisk_cache_agent::error_chain(e.as_ref()));
            // 2: running again cannot help (the populator stops retrying).
            let permanent = e
                .downcast_ref::<vmdisk_cache_agent::populate::PopulateError>()
                .is_some_and(|p| p.is_permanent());
            std::process::ExitCode::from(if permanent { 2 } else { 1 })
        }
    }
}
