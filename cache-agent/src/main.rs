//! `vmdisk-cache-agent`: logging and runtime around [`vmdisk_cache_agent::cli`].

use clap::Parser;
use vmdisk_cache_agent::cli::{run, Cli};
use vmdisk_support::process;

fn main() -> std::process::ExitCode {
    vmdisk_cache_agent::tune_allocator();
    let cli = Cli::parse();
    process::init_logging(process::LogFormat::Text);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match process::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", vmdisk_support::error_chain(e.as_ref()));
            // 2: running again cannot help (the populator stops retrying).
            let permanent = e
                .downcast_ref::<vmdisk_cache_agent::populate::PopulateError>()
                .is_some_and(|p| p.is_permanent());
            std::process::ExitCode::from(if permanent { 2 } else { 1 })
        }
    }
}
