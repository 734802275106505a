//! The controllers' helper tasks (reflectors, sweepers), tied to the controller that started
//! them: a helper must not outlive its controller, which stops when this replica loses the
//! leadership.

use futures::StreamExt;
use kube::runtime::reflector::Store;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;

/// A spawned helper, stopped when dropped.
pub struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    pub fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(task))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns a reflector that runs (with kube's default backoff) until the guard is dropped.
pub fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, TaskGuard)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let task = TaskGuard::spawn(
        reflector::reflector(writer, watcher(api, config))
            .default_backoff()
            .touched_objects()
            .for_each(|event| {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watch error; retrying");
                }
                futures::future::ready(())
            }),
    );
    (store, task)
}
