//! `vmdisk-cache-agent`: logging and runtime around [`vmdisk_cache_agent::cli`].

use clap::Parser;
use vmdisk_cache_agent::cli::{run_until_stopped, Cli};
use vmdisk_support::process::{self, Stop};

fn main() -> std::process::ExitCode {
    vmdisk_support::allocator::tune_allocator();
    let cli = Cli::parse();
    process::init_logging(process::LogFormat::Text);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Only `run` (the DaemonSet) stops on SIGTERM by itself; the one-shot commands keep the
    // default signal handling (killed at once; what they staged is cleaned at the next start).
    let outcome = if cli.mode.is_daemon() {
        process::run_until_stopped("vmdisk-cache-agent", process::FINISH_WITHIN, |stop| {
            run_until_stopped(cli, stop)
        })
    } else {
        process::runtime().map(|runtime| runtime.block_on(run_until_stopped(cli, Stop::new())))
    };
    match outcome {
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", vmdisk_support::error_chain(e.as_ref()));
            // 2: running again cannot help (the populator stops retrying).
            let permanent = e
                .downcast_ref::<vmdisk_cache_agent::populate::PopulateError>()
                .is_some_and(|p| p.is_permanent());
            std::process::ExitCode::from(if permanent { 2 } else { 1 })
        }
    }
}
