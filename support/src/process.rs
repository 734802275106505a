//! A binary's life around its work: logging set up the same way everywhere, the async runtime,
//! the termination signal (the kubelet's SIGTERM or Ctrl-C), a clean stop, and binding a
//! listener with the address in the error.
//!
//! The stop: [`run_main`] hands the work a [`Stop`], triggered once by the termination
//! signal. Every long-running task ends on it; the process exits when the work returns, or
//! after `finish_within` anyway (status 0, with a warning). The signal and that deadline are
//! watched on a thread of their own, so a runtime whose workers are all busy still stops in
//! time, and the process then exits without tearing down tasks that still run (tearing the
//! runtime down under kube's controller runner makes it panic).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// The process-wide stop signal: cloned into every long-running task, which ends on
/// `stop.cancelled()`. [`run_main`] triggers it on SIGTERM or Ctrl-C.
pub type Stop = tokio_util::sync::CancellationToken;

/// How long a binary's work has, by default, to end after the stop before the process exits
/// anyway; well within the kubelet's grace period and the few seconds a rollout should wait.
pub const FINISH_WITHIN: Duration = Duration::from_secs(2);

/// How long tasks left over after the work returned (helpers being aborted, blocking
/// lookups) may hold the exit up.
const LEFTOVERS: Duration = Duration::from_millis(200);

/// Where and how log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

impl LogFormat {
    /// `"json"` is JSON; anything else is text (flags restrict the values).
    pub fn named(name: &str) -> Self {
        if name == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// Logs to stderr at `info` unless `RUST_LOG` says otherwise. Stdout stays free for a
/// command's output.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A multi-threaded runtime, or the reason there is none, for `main` to print.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Runs `work` on a new runtime, with a [`Stop`] triggered by the termination signal. After
/// the stop the work has `finish_within` to return; past that the process exits with status
/// 0 (see [`watchdog`]). `Err` is a runtime that cannot start.
pub fn run_until_stopped<T, F>(
    name: &str,
    finish_within: Duration,
    work: impl FnOnce(Stop) -> F,
) -> Result<T, String>
where
    F: Future<Output = T>,
{
    let runtime = runtime()?;
    let stop = Stop::new();
    let exit = {
        let name = name.to_string();
        move || {
            tracing::warn!(
                "{name} did not finish within {finish_within:?} of the termination signal; exiting anyway"
            );
            std::process::exit(0)
        }
    };
    watchdog(stop.clone(), finish_within, exit)
        .map_err(|e| format!("cannot watch for the termination signal: {e}"))?;
    let out = runtime.block_on(work(stop.clone()));
    runtime.shutdown_timeout(LEFTOVERS);
    if stop.is_cancelled() {
        tracing::info!("{name} stopped");
    }
    Ok(out)
}

/// On a thread of its own (independent of the runtime's workers): waits for the termination
/// signal (or for `stop` triggered otherwise), triggers `stop`, and calls `give_up` if the
/// process still runs `finish_within` later.
pub fn watchdog(
    stop: Stop,
    finish_within: Duration,
    give_up: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("termination".into())
        .spawn(move || {
            signals.block_on(async {
                tokio::select! {
                    () = termination_signal() => stop.cancel(),
                    () = stop.cancelled() => {}
                }
            });
            std::thread::sleep(finish_within);
            give_up();
        })
}

/// A long-running binary's `main`: runs `work` with [`run_until_stopped`]. The stop ends the
/// process with status 0 (also when the work had to be abandoned); an error is logged,
/// printed with its causes (`{:#}`) and the process exits 1.
pub fn run_main<E, F>(
    name: &str,
    finish_within: Duration,
    work: impl FnOnce(Stop) -> F,
) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: Future<Output = Result<(), E>>,
{
    match run_until_stopped(name, finish_within, work) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "{name} stopped");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds a listener, saying which address could not be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Completes on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("termination signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_that_ends_on_the_stop_returns_its_value() {
        let out = run_until_stopped("test", Duration::from_secs(60), |stop| async move {
            stop.cancel();
            stop.cancelled().await;
            7
        });
        assert_eq!(out, Ok(7));
    }

    #[test]
    fn the_watchdog_gives_up_after_the_grace_even_with_every_worker_busy() {
        let stop = Stop::new();
        let (gave_up, given_up) = std::sync::mpsc::channel();
        watchdog(stop.clone(), Duration::from_millis(10), move || {
            gave_up.send(()).unwrap();
        })
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        // The only worker never yields: nothing on the runtime can notice the stop.
        runtime.spawn(async {
            loop {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        stop.cancel();
        given_up
            .recv_timeout(Duration::from_secs(60))
            .expect("the watchdog gave up");
        runtime.shutdown_background();
    }
}
