//! SIGTERM to the shipped controller on the real API server: two replicas compete for a Lease
//! of their own (in the case's namespace, so the installed controller keeps leading vmdisk's),
//! the leader stops with exit status 0 and hands the Lease back, and the standby leads next.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use crate::local::LocalInstall;
use crate::support::{http_get, wait_for, Process};
use crate::Case;

/// What a rollout may wait for a replica to stop.
const STOP_BOUND: Duration = Duration::from_secs(5);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn controller(fx: &LocalInstall, namespace: &str, name: &str) -> (Process, SocketAddr) {
    let probes = free_addr();
    let mut command = Command::new(fx.env.binary("vmdisk-controller"));
    command
        .args([
            "--metrics-listen",
            &probes.to_string(),
            "--namespace",
            namespace,
        ])
        .env("KUBECONFIG", &fx.env.kubeconfig)
        .env("POD_NAME", name)
        .env("RUST_LOG", "info");
    let log = fx.work.path().join(format!("{name}.log"));
    (Process::spawn(command, log), probes)
}

async fn wait_ready_as(probes: SocketAddr, state: &'static str) {
    wait_for(
        &format!("the controller {state}"),
        Duration::from_secs(60),
        || async move {
            match http_get(probes, "/readyz").await? {
                (200, body) if body == state => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        },
    )
    .await;
}

/// Sends SIGTERM; asserts exit status 0 within [`STOP_BOUND`] and no panic in the log.
fn terminate(mut process: Process) -> Duration {
    let started = Instant::now();
    let pid = libc::pid_t::try_from(process.child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() <= STOP_BOUND,
            "still running {STOP_BOUND:?} after SIGTERM\n{}",
            process.tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = std::fs::read_to_string(&process.log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "exit status\n{log}");
    assert!(!log.contains("panicked"), "panicked on the way out\n{log}");
    started.elapsed()
}

pub async fn a_stopped_controller_hands_its_lease_to_the_standby(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let ns = case.namespace("e2e-stop").await;
    let (first, first_probes) = controller(&fx, &ns, "e2e-stop-first");
    wait_ready_as(first_probes, "leading").await;
    let (second, second_probes) = controller(&fx, &ns, "e2e-stop-second");
    wait_ready_as(second_probes, "standby").await;
    let took = tokio::task::spawn_blocking(move || terminate(first))
        .await
        .unwrap();
    let stopped = Instant::now();
    let lease = Api::<Lease>::namespaced(case.admin(), &ns)
        .get("vmdisk-controller")
        .await
        .unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity);
    assert_ne!(
        holder.as_deref(),
        Some("e2e-stop-first"),
        "the Lease was not handed back"
    );
    wait_ready_as(second_probes, "leading").await;
    println!(
        "controller stop: exited {took:?} after SIGTERM; the standby led {:?} later (the Lease lasts 15 s)",
        stopped.elapsed()
    );
    let took = tokio::task::spawn_blocking(move || terminate(second))
        .await
        .unwrap();
    println!("controller stop: the second exited {took:?} after SIGTERM");
}
