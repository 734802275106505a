//! Events, recorded through kube's `Recorder` with its memory bounded.
//!
//! kube's `Recorder` keeps every Event it published (to count a repeat into the Event's
//! series instead of creating another) for 6 minutes, in a table that never shrinks. With
//! 10,000 images resolved in a few minutes that table held 10,000 Events of about 1.5 KB each,
//! and its 24 MiB stayed in the controller for the rest of its life. client-go's recorder
//! bounds its cache for the same reason (an LRU of 4,096 entries). [`Recorder`] hands out a
//! fresh kube `Recorder` (and drops the old one with its table) after [`RENEW_AFTER`]
//! Events: a repeat that straddles the renewal starts a new Event instead of counting into
//! the old one's series, which is rare and costs one Event object.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Reporter};
use kube::Client;

/// Events published through one kube `Recorder` before it is replaced.
pub const RENEW_AFTER: u32 = 1024;

/// kube's `Recorder`, renewed every [`RENEW_AFTER`] Events. Cloning shares it.
#[derive(Clone)]
pub struct Recorder(Arc<Renewing<kube::runtime::events::Recorder>>);

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self(Arc::new(Renewing::new(RENEW_AFTER, move || {
            kube::runtime::events::Recorder::new(client.clone(), reporter.clone())
        })))
    }

    /// Publishes `event` about `reference` (kube's `Recorder::publish`).
    pub async fn publish(
        &self,
        event: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        self.0.get().publish(event, reference).await
    }
}

/// A value made anew by `make` after every `every` uses.
struct Renewing<T> {
    make: Box<dyn Fn() -> T + Send + Sync>,
    every: u32,
    current: Mutex<(T, u32)>,
}

impl<T: Clone> Renewing<T> {
    fn new(every: u32, make: impl Fn() -> T + Send + Sync + 'static) -> Self {
        Self {
            current: Mutex::new((make(), 0)),
            make: Box::new(make),
            every: every.max(1),
        }
    }

    /// The current value, counted as one use.
    fn get(&self) -> T {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.1 >= self.every {
            *current = ((self.make)(), 0);
        }
        current.1 += 1;
        current.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_value_is_made_anew_after_every_so_many_uses() {
        let made = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&made);
        let r = Renewing::new(3, move || counter.fetch_add(1, Ordering::SeqCst));
        let seen: Vec<u32> = (0..7).map(|_| r.get()).collect();
        assert_eq!(seen, [0, 0, 0, 1, 1, 1, 2]);
        assert_eq!(made.load(Ordering::SeqCst), 3);
    }
}
