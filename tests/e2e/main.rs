//! End-to-end tests on a real cluster (`VMDISK_E2E_KUBECONFIG`; skipped, each case listed as
//! ignored, with the reason printed, when it is not set).
//!
//! The suite installs vmdisk the way a user does, from the files in `deploy/`, and runs each
//! component with the credentials it has in production; admin credentials only set the stage
//! and check the results. Phases run one after the other, each with its own installation; the
//! cases of a phase run in parallel, each in namespaces of its own, and leave nothing behind.
//!
//! - `images` (no cluster needed): the three container images built with
//!   `deploy/images/build.sh`, pushed to a local registry, each binary run inside its image.
//! - `local`: the shipped binaries run on this machine as the cluster's components: the
//!   webhook with a token of the `vmdisk-webhook` ServiceAccount (the API server calls it
//!   through `clientConfig.url`), the controller with one of `vmdisk-controller`, one cache
//!   agent per node with a token of `vmdisk-cache-agent` bound to that node's DaemonSet pod.
//! - `installed`: `kubectl apply -k` of an overlay pinning the images (pushed to
//!   `VMDISK_E2E_REGISTRY`, which the cluster's nodes pull from), the certificate from
//!   `certs/no-cert-manager.sh`; the webhook and controller Deployments and the agent
//!   DaemonSet run as pods on the real node, populator pods fill PVCs there. Its last case
//!   stops the webhook.
//! - `local`'s last case stops a controller with SIGTERM (`stop`).

mod api;
mod credentials;
mod fleet;
mod flow;
mod herd;
mod images;
mod installed;
mod latency;
mod local;
mod peers;
mod placement;
mod scale;
mod settle;
mod stop;
mod support;
mod time_to_disk;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use kube::Client;
use libtest_mimic::{Arguments, Conclusion, Trial};

type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One case's view of the suite: its namespaces and cleanups, run whatever the outcome.
#[derive(Clone)]
pub struct Case {
    admin: Option<Client>,
    cleanups: Arc<Mutex<Vec<Cleanup>>>,
}

impl Case {
    /// The suite's admin client (cluster phases only).
    pub fn admin(&self) -> Client {
        self.admin
            .clone()
            .expect("cases that use the cluster run with VMDISK_E2E_KUBECONFIG")
    }

    /// A fresh namespace, deleted when the case ends.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = support::create_namespace(&self.admin(), prefix).await;
        let admin = self.admin();
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

/// A phase: its cases (run in parallel), cases run one at a time after those (they disturb
/// the installation), and how to set up and tear down its fixture.
pub struct Phase<F> {
    pub name: &'static str,
    pub cases: Vec<CaseDef<F>>,
    pub exclusive: Vec<CaseDef<F>>,
    /// A benchmark, not a test: listed as ignored, run only when asked for (`--ignored`).
    pub benchmark: bool,
}

type Setup<F> = Pin<Box<dyn Future<Output = Result<F, String>>>>;
type Teardown = Pin<Box<dyn Future<Output = ()>>>;

/// Runs one phase: sets the fixture up only if a case of it is selected (an `Err` from setup
/// is a reason to skip, printed), runs the cases, tears the fixture down.
fn run_phase<F: Send + Sync + 'static>(
    runtime: &tokio::runtime::Runtime,
    args: &Arguments,
    phase: Phase<F>,
    setup: impl FnOnce() -> Setup<F>,
    teardown: impl FnOnce(Arc<F>) -> Teardown,
) -> Conclusion {
    let name = phase.name;
    let full = |c: &CaseDef<F>| format!("{name}::{}", c.name.rsplit("::").next().unwrap());
    let all: Vec<&CaseDef<F>> = phase.cases.iter().chain(&phase.exclusive).collect();
    let ignored = |reason: String| {
        println!("e2e phase {name}: skipped: {reason}");
        let trials = all
            .iter()
            .map(|c| Trial::test(full(c), || Ok(())).with_ignored_flag(true))
            .collect();
        libtest_mimic::run(args, trials)
    };
    let asked = args.ignored || args.include_ignored;
    if phase.benchmark && (args.list || !asked) {
        let trials = all
            .iter()
            .map(|c| Trial::test(full(c), || Ok(())).with_ignored_flag(true))
            .collect();
        return libtest_mimic::run(args, trials);
    }
    if args.list || !all.iter().any(|c| selected(args, &full(c))) {
        let trials = all
            .iter()
            .map(|c| Trial::test(full(c), || Ok(())))
            .collect();
        return libtest_mimic::run(args, trials);
    }
    println!("e2e phase {name}: setting up");
    let fixture = match runtime.block_on(setup()) {
        Ok(f) => Arc::new(f),
        Err(reason) => return ignored(reason),
    };
    let admin = runtime.block_on(async {
        match support::Env::from_env() {
            Ok(env) => Some(env.admin().await),
            Err(_) => None,
        }
    });
    let benchmark = phase.benchmark;
    let trials = |cases: Vec<CaseDef<F>>| -> Vec<Trial> {
        cases
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
                .with_ignored_flag(benchmark)
            })
            .collect()
    };
    let mut conclusion = libtest_mimic::run(args, trials(phase.cases));
    if !phase.exclusive.is_empty() {
        let mut one_at_a_time = args.clone();
        one_at_a_time.test_threads = Some(1);
        let later = libtest_mimic::run(&one_at_a_time, trials(phase.exclusive));
        conclusion.num_passed += later.num_passed;
        conclusion.num_failed += later.num_failed;
        conclusion.num_ignored += later.num_ignored;
        conclusion.num_filtered_out += later.num_filtered_out;
    }
    if std::env::var_os("VMDISK_E2E_KEEP").is_some() {
        println!("e2e phase {name}: VMDISK_E2E_KEEP is set: left installed for a look");
    } else {
        println!("e2e phase {name}: tearing down");
        runtime.block_on(teardown(fixture));
    }
    conclusion
}

/// Removes the images the phases built when the suite ends, also when a setup panics.
struct RemoveBuiltImages;

impl Drop for RemoveBuiltImages {
    fn drop(&mut self) {
        if let Err(e) = vmdisk_tests::images::remove_built() {
            eprintln!("e2e: the built images stay in buildah's storage: {e}");
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let _remove_built = RemoveBuiltImages;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let conclusions = [
        run_phase(
            &runtime,
            &args,
            images::phase(),
            || Box::pin(images::ImagesFixture::setup()),
            |_| Box::pin(async {}),
        ),
        run_phase(
            &runtime,
            &args,
            local::phase(),
            || Box::pin(async { local::LocalInstall::setup(support::Env::from_env()?).await }),
            |fixture| Box::pin(async move { fixture.teardown().await }),
        ),
        run_phase(
            &runtime,
            &args,
            installed::phase(),
            || Box::pin(async { installed::Installed::setup(support::Env::from_env()?).await }),
            |fixture| Box::pin(async move { fixture.teardown().await }),
        ),
        run_phase(
            &runtime,
            &args,
            scale::phase(),
            || Box::pin(async { local::LocalInstall::setup(support::Env::from_env()?).await }),
            |fixture| Box::pin(async move { fixture.teardown().await }),
        ),
        run_phase(
            &runtime,
            &args,
            herd::phase(),
            || Box::pin(async { local::LocalInstall::setup(support::Env::from_env()?).await }),
            |fixture| Box::pin(async move { fixture.teardown().await }),
        ),
        run_phase(
            &runtime,
            &args,
            time_to_disk::phase(),
            || Box::pin(async { installed::Installed::setup(support::Env::from_env()?).await }),
            |fixture| Box::pin(async move { fixture.teardown().await }),
        ),
    ];
    let failed: u64 = conclusions.iter().map(|c| c.num_failed).sum();
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
