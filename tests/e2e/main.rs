//! End-to-end tests on a real cluster (`VMDISK_E2E_KUBECONFIG`; skipped, each case listed as
//! ignored, with the reason printed, when it is not set).
//!
//! The suite installs vmdisk the way a user does, from the files in `deploy/`, and runs each
//! component with the credentials it has in production; admin credentials only set the stage
//! and check the results. Phases run one after the other, each with its own installation; the
//! cases of a phase run in parallel, each in namespaces of its own, and leave nothing behind.
//!
//! - `local`: the shipped binaries run on this machine as the cluster's components: the
//!   webhook and controllers with a token of the `vmdisk-webhook` ServiceAccount (the API server
//!   calls the webhook through `clientConfig.url`), one cache agent per node with a token of
//!   `vmdisk-cache-agent` bound to that node's DaemonSet pod.

mod api;
mod flow;
mod local;
mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use kube::Client;
use libtest_mimic::{Arguments, Conclusion, Trial};

type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One case's view of the suite: its namespaces and cleanups, run whatever the outcome.
#[derive(Clone)]
pub struct Case {
    pub admin: Client,
    cleanups: Arc<Mutex<Vec<Cleanup>>>,
}

impl Case {
    /// A fresh namespace, deleted when the case ends.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = support::create_namespace(&self.admin, prefix).await;
        let admin = self.admin.clone();
        let doomed = name.clone();
        self.defer(async move { support::delete_namespace(&admin, &doomed).await });
        name
    }

    /// Runs `cleanup` when the case ends (last registered, first run).
    pub fn defer(&self, cleanup: impl Future<Output = ()> + Send + 'static) {
        self.cleanups.lock().unwrap().push(Box::pin(cleanup));
    }

    async fn finish(&self) {
        let cleanups: Vec<_> = std::mem::take(&mut *self.cleanups.lock().unwrap());
        for cleanup in cleanups.into_iter().rev() {
            cleanup.await;
        }
    }
}

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A named case of a phase whose fixture is `F`.
pub struct CaseDef<F> {
    pub name: &'static str,
    pub run: fn(Arc<F>, Case) -> CaseFuture,
}

/// Declares cases: `cases![fn_a, fn_b]` for `async fn fn_a(fixture: Arc<F>, case: Case)`.
#[macro_export]
macro_rules! cases {
    ($($path:path),* $(,)?) => {
        vec![$($crate::CaseDef {
            name: stringify!($path),
            run: |fixture, case| Box::pin($path(fixture, case)),
        }),*]
    };
}

fn selected(args: &Arguments, name: &str) -> bool {
    let matches = |pattern: &str| {
        if args.exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    };
    args.filter.as_deref().is_none_or(matches) && !args.skip.iter().any(|s| matches(s))
}

/// Runs one phase: sets the fixture up only if a case of it is selected, runs the cases in
/// parallel, tears the fixture down.
fn run_phase<F: Send + Sync + 'static>(
    runtime: &tokio::runtime::Runtime,
    args: &Arguments,
    env: &Result<support::Env, String>,
    phase: &str,
    cases: Vec<CaseDef<F>>,
    setup: impl FnOnce(support::Env) -> Pin<Box<dyn Future<Output = Result<F, String>>>>,
    teardown: impl FnOnce(Arc<F>) -> Pin<Box<dyn Future<Output = ()>>>,
) -> Conclusion {
    let full = |c: &CaseDef<F>| format!("{phase}::{}", c.name.rsplit("::").next().unwrap());
    let ignored = |reason: String| {
        println!("e2e phase {phase}: skipped: {reason}");
        let trials = cases
            .iter()
            .map(|c| Trial::test(full(c), || Ok(())).with_ignored_flag(true))
            .collect();
        libtest_mimic::run(args, trials)
    };
    let env = match env {
        Ok(env) => env.clone(),
        Err(reason) => return ignored(reason.clone()),
    };
    if args.list || !cases.iter().any(|c| selected(args, &full(c))) {
        let trials = cases
            .iter()
            .map(|c| Trial::test(full(c), || Ok(())))
            .collect();
        return libtest_mimic::run(args, trials);
    }
    println!("e2e phase {phase}: installing");
    let fixture = match runtime.block_on(setup(env.clone())) {
        Ok(f) => Arc::new(f),
        Err(reason) => return ignored(reason),
    };
    let admin = runtime.block_on(env.admin());
    let trials = cases
        .into_iter()
        .map(|c| {
            let name = full(&c);
            let fixture = Arc::clone(&fixture);
            let handle = runtime.handle().clone();
            let admin = admin.clone();
            Trial::test(name, move || {
                let case = Case {
                    admin,
                    cleanups: Arc::default(),
                };
                let outcome = handle.block_on(async {
                    use futures::FutureExt as _;
                    let result = std::panic::AssertUnwindSafe((c.run)(fixture, case.clone()))
                        .catch_unwind()
                        .await;
                    case.finish().await;
                    result
                });
                outcome.map_err(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "the case panicked".into())
                        .into()
                })
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(args, trials);
    println!("e2e phase {phase}: uninstalling");
    runtime.block_on(teardown(fixture));
    conclusion
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = support::Env::from_env();
    let conclusions = [run_phase(
        &runtime,
        &args,
        &env,
        "local",
        local::cases(),
        |env| Box::pin(local::LocalInstall::setup(env)),
        |fixture| Box::pin(async move { fixture.teardown().await }),
    )];
    let failed: u64 = conclusions.iter().map(|c| c.num_failed).sum();
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
