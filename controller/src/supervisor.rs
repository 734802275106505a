//! Runs the controllers on one replica at a time. Every round asks the [`LeaderElector`]
//! whether this replica leads; the image controller and the populator start when it becomes
//! leader, stop when it loses the Lease, and start again if they stop by themselves while it
//! leads. What the last round found is kept in [`Leadership`], for `/readyz` and the
//! `vmdisk_controller_leader` gauge.
//!
//! On the stop (SIGTERM) the controllers stop taking work and finish their reconciles in
//! flight (those not done within [`CONTROLLERS_STOP_WITHIN`] are dropped and redone by the
//! next leader), then the Lease is released so a standby replica leads within a round instead
//! of waiting for the Lease to expire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use vmdisk_crds::{CREDENTIALS_NAMESPACE, INSTALL_NAMESPACE};
use vmdisk_support::process::Stop;

use crate::leader::LeaderElector;
use crate::metrics::ControllerMetrics;
use crate::populator::PopulatorSettings;

/// The Lease the replicas compete for, in vmdisk's namespace.
pub const LEASE_NAME: &str = "vmdisk-controller";

/// How long a Lease lasts without renewal; it is renewed every third of that.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// How long the controllers may take to finish their reconciles in flight after the stop.
pub const CONTROLLERS_STOP_WITHIN: Duration = Duration::from_secs(2);

/// How long releasing the Lease may take after the controllers stopped.
pub const RELEASE_WITHIN: Duration = Duration::from_secs(1);

/// The whole stop's bound, after which the process exits anyway (the next leader redoes
/// what was in flight).
pub const FINISH_WITHIN: Duration = Duration::from_secs(4);

/// Where the controllers run and keep their objects.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Namespace of the Lease (vmdisk's own).
    pub install_namespace: String,
    /// Namespace of the agents' pull credentials.
    pub credentials_namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    pub populator: PopulatorSettings,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            install_namespace: INSTALL_NAMESPACE.into(),
            credentials_namespace: CREDENTIALS_NAMESPACE.into(),
            identity: format!("vmdisk-controller-{}", std::process::id()),
            populator: PopulatorSettings::default(),
        }
    }
}

/// What the last election round found: no round yet, leading, standing by, or the Lease could
/// not be read or written (the message says why).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Round {
    #[default]
    NotYet,
    Leading,
    Standby,
    Failed(String),
}

/// The last [`Round`], shared with the HTTP probes.
#[derive(Debug, Default)]
pub struct Leadership(Mutex<Round>);

impl Leadership {
    pub fn set(&self, round: Round) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = round;
    }

    pub fn get(&self) -> Round {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ready once the Lease answered: a leader and a standby replica are both ready (the
    /// standby takes over when the leader stops). `Err` says what is missing.
    pub fn readiness(&self) -> Result<&'static str, String> {
        match self.get() {
            Round::Leading => Ok("leading"),
            Round::Standby => Ok("standby"),
            Round::NotYet => Err(format!("the Lease {LEASE_NAME} was not read yet")),
            Round::Failed(e) => Err(format!("cannot read or renew the Lease {LEASE_NAME}: {e}")),
        }
    }
}

/// Spawns leader election; the controllers run only while this replica leads. The task ends
/// on `stop`, once the controllers stopped and the Lease is released.
pub fn spawn(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<ControllerMetrics>,
    leadership: Arc<Leadership>,
    stop: Stop,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let elector = LeaderElector::new(
            client.clone(),
            &config.install_namespace,
            LEASE_NAME,
            &config.identity,
            LEASE_DURATION,
        );
        let identity = config.identity.clone();
        let mut running: Option<tokio::task::JoinHandle<()>> = None;
        let mut leading = false;
        loop {
            let round = tokio::select! {
                round = elector.try_lead() => round,
                () = stop.cancelled() => break,
            };
            leading = match round {
                Ok(l) => {
                    leadership.set(if l { Round::Leading } else { Round::Standby });
                    l
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election failed");
                    leadership.set(Round::Failed(crate::error_chain(&e)));
                    false
                }
            };
            // Controllers that stopped by themselves are started again while leading.
            if running.as_ref().is_some_and(|t| t.is_finished()) {
                tracing::warn!(%identity, "the controllers stopped; starting them again");
                running = None;
            }
            match (leading, running.is_some()) {
                (true, false) => {
                    tracing::info!(%identity, "became leader; starting the controllers");
                    let (client, config) = (client.clone(), config.clone());
                    let populator_metrics = metrics.populator.clone();
                    let placement_metrics = metrics.placement.clone();
                    let image_metrics = metrics.images.clone();
                    let stop = stop.clone();
                    running = Some(tokio::spawn(async move {
                        // Both controllers read the Nodes' runtimes (`pullMethod: node`).
                        let runtimes = crate::node_pull::NodeRuntimes::watch(&client).await;
                        // One watch and one store of the VMDiskImages for both: the image
                        // controller is driven by it, the populator and placement read it.
                        let images = crate::tasks::Reflected::spawn_shared(
                            kube::Api::<vmdisk_crds::VMDiskImage>::all(client.clone()),
                            kube::runtime::watcher::Config::default(),
                            vmdisk_crds::VMDiskImage::strip_for_controller,
                        );
                        tokio::join!(
                            crate::image::run(
                                client.clone(),
                                &images,
                                &config.credentials_namespace,
                                &config.identity,
                                crate::image::ImageSettings {
                                    runtimes: runtimes.clone(),
                                    default_pull_method: config.populator.default_pull_method,
                                    placement: placement_metrics,
                                    metrics: image_metrics,
                                },
                                stop.clone(),
                            ),
                            crate::populator::run(
                                client,
                                &images,
                                config.populator,
                                runtimes,
                                populator_metrics,
                                stop
                            ),
                        );
                    }));
                }
                (false, true) => {
                    tracing::warn!(%identity, "lost leadership; stopping the controllers");
                    if let Some(task) = running.take() {
                        task.abort();
                    }
                }
                _ => {}
            }
            metrics.set_leading(running.is_some());
            tokio::select! {
                () = tokio::time::sleep(LEASE_DURATION / 3) => {}
                () = stop.cancelled() => break,
            }
        }
        if let Some(task) = running.take() {
            stop_controllers(task).await;
        }
        metrics.set_leading(false);
        if leading {
            match tokio::time::timeout(RELEASE_WITHIN, elector.release()).await {
                Ok(Ok(())) => tracing::info!(%identity, "released the Lease"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot release the Lease; a standby leads once it expires")
                }
                Err(_) => {
                    tracing::warn!("releasing the Lease timed out; a standby leads once it expires")
                }
            }
        }
    })
}

/// Waits for the controllers, which saw the stop, to finish their reconciles in flight; those
/// still running after [`CONTROLLERS_STOP_WITHIN`] are dropped (the next leader redoes them).
async fn stop_controllers(mut task: tokio::task::JoinHandle<()>) {
    let started = std::time::Instant::now();
    if tokio::time::timeout(CONTROLLERS_STOP_WITHIN, &mut task)
        .await
        .is_err()
    {
        tracing::warn!(
            "the controllers did not finish their reconciles within {CONTROLLERS_STOP_WITHIN:?}; dropping them"
        );
        task.abort();
        // Ends once the task is dropped; its reconciles are not polled again.
        let _ = task.await;
    }
    tracing::info!(elapsed = ?started.elapsed(), "the controllers stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_a_leader_and_a_standby_are_ready_but_not_before_the_lease_answered() {
        let l = Leadership::default();
        assert!(l.readiness().unwrap_err().contains("not read yet"));
        l.set(Round::Standby);
        assert_eq!(l.readiness(), Ok("standby"));
        l.set(Round::Leading);
        assert_eq!(l.readiness(), Ok("leading"));
        l.set(Round::Failed("leases is forbidden".into()));
        let e = l.readiness().unwrap_err();
        assert!(
            e.contains("vmdisk-controller") && e.contains("forbidden"),
            "{e}"
        );
    }
}
