//! `vmdisk-cache-agent warm`: one image into a cache directory, for a person at a terminal,
//! with a progress bar (or plain lines when stderr is not a terminal).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use vmdisk_crds::DiskFormat;

use super::setup::{open_store, registry_options, warmer, OpenAs};
use super::{CacheArgs, RegistryArgs};
use crate::warm::{WarmProgress, WarmRequest};

pub(super) async fn execute(
    image: String,
    cache: CacheArgs,
    format: DiskFormat,
    registry: RegistryArgs,
) -> anyhow::Result<()> {
    let options = registry_options(&image, &registry, true).await?;
    let store = open_store(&cache, OpenAs::OwnerIfFree)?;
    let warmer = warmer(&cache, store)?;
    let outcome = warmer
        .warm(
            WarmRequest {
                reference: image.clone(),
                format,
                registry: options,
            },
            progress_reporter(),
        )
        .await
        .map_err(|e| anyhow::anyhow!(crate::error_chain(e.as_ref())))?;
    let e = &outcome.entry;
    println!(
        "{} {} {} virtual={} allocated={} {}",
        if outcome.pulled { "warmed" } else { "cached" },
        e.key.digest,
        e.key.format,
        e.meta.virtual_size,
        e.meta.allocated_size,
        e.disk_path.display()
    );
    Ok(())
}

/// Progress for a person: a bar on a terminal, plain lines otherwise.
fn progress_reporter() -> Arc<dyn Fn(WarmProgress) + Send + Sync> {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Arc::new(move |p| match p {
            WarmProgress::Resolving => bar.set_message("resolving"),
            WarmProgress::Pulling { done, total } => {
                bar.set_message("pulling");
                bar.set_length(total);
                bar.set_position(done);
            }
            WarmProgress::Converting => bar.set_message("converting"),
            WarmProgress::Committing => {
                bar.set_message("committing");
                bar.finish();
            }
        })
    } else {
        let last = std::sync::Mutex::new((std::time::Instant::now(), 0u64));
        Arc::new(move |p| match p {
            WarmProgress::Pulling { done, total } => {
                let mut last = last.lock().expect("progress lock");
                let now = std::time::Instant::now();
                if now.duration_since(last.0) >= Duration::from_secs(2) || done == total {
                    let rate = (done - last.1.min(done)) as f64
                        / now.duration_since(last.0).as_secs_f64().max(0.001);
                    let eta = if rate > 0.0 {
                        (total - done) as f64 / rate
                    } else {
                        0.0
                    };
                    eprintln!(
                        "pulling {done}/{total} bytes ({:.1} MiB/s, eta {eta:.0}s)",
                        rate / (1 << 20) as f64
                    );
                    *last = (now, done);
                }
            }
            other => eprintln!("{}", format!("{other:?}").to_lowercase()),
        })
    }
}
