//! The controllers' helper tasks (reflectors, sweepers), tied to the controller that started
//! them: a helper must not outlive its controller, which stops when this replica loses the
//! leadership. [`Reflected`] is how a controller watches anything besides its own objects: one
//! watch, one store, and triggers that follow the store.

use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;

/// A controller of `api`'s objects as kube's `Controller::new` makes it, but whose store keeps
/// them without their `managedFields` (nothing reads them; they are often half an object).
/// `strip` drops what nobody reads besides (see `vmdisk_crds::lean`); `on_event` sees each
/// watch event once the store holds it.
pub fn lean_controller<K>(
    api: Api<K>,
    config: watcher::Config,
    mut strip: impl FnMut(&mut K) + Send + 'static,
    mut on_event: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> kube::runtime::Controller<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + std::fmt::Debug + Unpin,
{
    let (reader, writer) = reflector::store();
    let objects = reflector::reflector(
        writer,
        watcher(api, config).modify(move |o: &mut K| {
            vmdisk_crds::strip_managed_fields(o.meta_mut());
            strip(o);
        }),
    )
    .default_backoff()
    .inspect(move |event| {
        if let Ok(event) = event {
            on_event(event);
        }
    })
    .applied_objects();
    kube::runtime::Controller::for_stream(objects, reader)
}

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

/// Changes a shared store holds for its controller before the watch waits for it.
const SHARED_BUFFER: usize = 1024;

/// How often a [`ready`] wait looks at its store again.
const READY_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits until `store` holds its first list; fails if its watch stopped before. kube's
/// `Store::wait_until_ready` wakes only the last of several tasks waiting on one store at once
/// (its oneshot keeps one waker) and the others wait for ever: placement once did, behind the
/// populator, and no node list was written. This wait looks again every [`READY_RECHECK`], so
/// any number of tasks may wait on one store. Every wait of the controllers goes through it.
pub async fn ready<K>(store: &Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        tokio::select! {
            ready = store.wait_until_ready() => return ready,
            () = tokio::time::sleep(READY_RECHECK) => {}
        }
    }
}

/// Reconcile requests derived from a reflector's changes.
type Subscriber<K> = Box<dyn Fn(&K) + Send + Sync>;

/// One watch of a resource: a store the reconciles read, and triggers for controllers.
///
/// A trigger fires only after the change it reports is in the store, so a reconcile it starts
/// sees that change. kube's `Controller::watches` runs a second, independent watch: its
/// trigger can arrive before this store has the change, the reconcile then decides on the old
/// object, and nothing wakes it again until its next requeue (minutes). One watch also halves
/// what the API server sends.
pub struct Reflected<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    subscribers: Arc<Mutex<Vec<Subscriber<K>>>>,
    /// The stream a controller of these objects is built on ([`Self::spawn_shared`]).
    primary: Mutex<Option<reflector::ReflectHandle<K>>>,
    _task: TaskGuard,
}

impl<K> Reflected<K>
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
    /// Spawns the reflector; it runs (with kube's default backoff) until dropped. The store
    /// keeps objects without their `managedFields`, which nothing reads.
    pub fn spawn(api: Api<K>, config: watcher::Config) -> Self {
        Self::spawn_lean(api, config, |o| {
            vmdisk_crds::strip_managed_fields(o.meta_mut())
        })
    }

    /// [`Self::spawn`], with `strip` dropping what nobody reads from each object before it is
    /// stored (and handed to the triggers).
    pub fn spawn_lean(
        api: Api<K>,
        config: watcher::Config,
        strip: impl FnMut(&mut K) + Send + 'static,
    ) -> Self {
        Self::spawn_with(reflector::store::<K>(), api, config, strip)
    }

    /// [`Self::spawn_lean`], whose objects are also the primary stream of one controller
    /// ([`Self::controller`]): the controller, the triggers and every other reader share one
    /// watch and one store (at 10,000 VMDiskImages, a second store was tens of MiB).
    pub fn spawn_shared(
        api: Api<K>,
        config: watcher::Config,
        strip: impl FnMut(&mut K) + Send + 'static,
    ) -> Self {
        Self::spawn_with(
            reflector::store_shared::<K>(SHARED_BUFFER),
            api,
            config,
            strip,
        )
    }

    /// A controller of these objects (kube's, on the shared store): each change reconciles
    /// its object, and the first list reconciles them all. `None` after the first call, or
    /// when not [`Self::spawn_shared`].
    pub fn controller(&self) -> Option<kube::runtime::Controller<K>> {
        let handle = self.primary.lock().expect("primary lock").take()?;
        Some(kube::runtime::Controller::for_shared_stream(
            handle,
            self.store.clone(),
        ))
    }

    fn spawn_with(
        (store, writer): (Store<K>, reflector::store::Writer<K>),
        api: Api<K>,
        config: watcher::Config,
        strip: impl FnMut(&mut K) + Send + 'static,
    ) -> Self {
        let primary = Mutex::new(writer.subscribe());
        let subscribers: Arc<Mutex<Vec<Subscriber<K>>>> = Arc::default();
        let notify = Arc::clone(&subscribers);
        let reader = store.clone();
        // The first list needs no triggers: a controller reconciles every object it starts with.
        let mut listed = false;
        let task = TaskGuard::spawn(
            reflector::reflector(writer, watcher(api, config).modify(strip))
                .default_backoff()
                .for_each(move |event| {
                    let subscribers = notify.lock().expect("subscribers lock");
                    match event {
                        Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                            subscribers.iter().for_each(|s| s(&o));
                        }
                        // A relist (after a lost watch) lands in the store all at once, here.
                        Ok(watcher::Event::InitDone) if listed => {
                            for o in reader.state() {
                                subscribers.iter().for_each(|s| s(&o));
                            }
                        }
                        Ok(watcher::Event::InitDone) => listed = true,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "watch error; retrying"),
                    }
                    futures::future::ready(())
                }),
        );
        Self {
            store,
            subscribers,
            primary,
            _task: task,
        }
    }

    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Calls `f` with each changed (or deleted) object, once the store holds the change.
    pub fn on_change(&self, f: impl Fn(&K) + Send + Sync + 'static) {
        self.subscribers
            .lock()
            .expect("subscribers lock")
            .push(Box::new(f));
    }

    /// Reconcile requests for the objects `mapper` names for each changed object, for
    /// `Controller::reconcile_on`.
    pub fn trigger<P, I>(
        &self,
        mapper: impl Fn(&K) -> I + Send + Sync + 'static,
    ) -> impl Stream<Item = ObjectRef<P>> + Send + 'static
    where
        P: kube::Resource + 'static,
        P::DynamicType: Send,
        I: IntoIterator<Item = ObjectRef<P>>,
    {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.on_change(move |object| {
            for request in mapper(object) {
                let _ = tx.send(request);
            }
        });
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|request| (request, rx))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::client::Body;
    use kube::ResourceExt;
    use serde_json::json;

    fn config_map(version: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "a", "namespace": "ns", "resourceVersion": version},
               "data": {"v": version}})
    }

    /// An API server that lists version 1 and then sends one change (version 2) on the first
    /// watch; later watches are held open.
    fn api() -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut watched = false;
            while let Some((request, send)) = handle.next_request().await {
                let watch = request
                    .uri()
                    .query()
                    .unwrap_or_default()
                    .contains("watch=true");
                let body = match (watch, watched) {
                    (false, _) => json!({"apiVersion": "v1", "kind": "ConfigMapList",
                        "metadata": {"resourceVersion": "1"}, "items": [config_map("1")]})
                    .to_string(),
                    (true, false) => {
                        watched = true;
                        json!({"type": "MODIFIED", "object": config_map("2")}).to_string() + "\n"
                    }
                    (true, true) => {
                        held.push(send);
                        continue;
                    }
                };
                send.send_response(http::Response::new(Body::from(body.into_bytes())));
            }
        });
        kube::Client::new(service, "default")
    }

    #[tokio::test]
    async fn every_task_waiting_for_a_store_sees_it_ready() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { ready(&store).await.is_ok() })
            })
            .collect();
        // All three are waiting before the first list lands.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        for waiter in waiters {
            let seen = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("a waiter left waiting")
                .unwrap();
            assert!(seen);
        }
    }

    #[tokio::test]
    async fn a_trigger_fires_for_changes_after_the_first_list_once_the_store_holds_them() {
        let reflected = Reflected::spawn(
            Api::<ConfigMap>::namespaced(api(), "ns"),
            watcher::Config::default(),
        );
        let mapped = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&mapped);
        let mut trigger = Box::pin(reflected.trigger(move |cm: &ConfigMap| {
            seen.lock().unwrap().push(cm.resource_version());
            Some(ObjectRef::<ConfigMap>::from_obj(cm))
        }));
        let request = tokio::time::timeout(std::time::Duration::from_secs(10), trigger.next())
            .await
            .expect("a trigger for the change")
            .unwrap();
        let stored = reflected.store().get(&request).expect("in the store");
        assert_eq!(stored.resource_version().as_deref(), Some("2"));
        assert_eq!(
            *mapped.lock().unwrap(),
            [Some("2".to_string())],
            "the first list triggers nothing"
        );
    }
}
