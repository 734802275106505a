//! The one retry backoff: a delay doubling from a base after each consecutive failure, capped,
//! with optional full jitter. Registry requests, the agent's warms and the populator's pods
//! all retry through it, so "how long until the next try" means the same thing everywhere.
//! [`Failures`] counts consecutive failures per object, for controllers' error policies.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Exponential backoff: `initial` after the first failure, doubling, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay after `failures` consecutive failures (1-based; 0 is treated as 1).
    pub fn delay(&self, failures: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.max)
    }

    /// [`Backoff::delay`] with full jitter: a uniform share of it, `rand01` in [0, 1).
    /// Many clients failing together then do not retry together.
    pub fn jittered(&self, failures: u32, rand01: f64) -> Duration {
        self.delay(failures).mul_f64(rand01.clamp(0.0, 1.0))
    }
}

/// Consecutive failures per key (an object), each answered with the [`Backoff`] delay: a
/// controller's error policy calls [`Failures::failed`], its successful reconcile
/// [`Failures::succeeded`], so one object failing again and again is retried ever more slowly
/// while the others are not held back.
#[derive(Debug)]
pub struct Failures<K> {
    backoff: Backoff,
    /// Consecutive failures and when the next try is due.
    counts: Mutex<HashMap<K, (u32, Instant)>>,
}

impl<K: Hash + Eq> Failures<K> {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more failure of `key`: its consecutive failures and the delay before the
    /// next try.
    pub fn failed(&self, key: K) -> (u32, Duration) {
        let mut counts = self.lock();
        let (n, due) = counts.entry(key).or_insert((0, Instant::now()));
        *n = n.saturating_add(1);
        let delay = self.backoff.delay(*n);
        *due = Instant::now() + delay;
        (*n, delay)
    }

    /// How long `key` still waits before its next try, if it is backing off.
    pub fn waiting(&self, key: &K) -> Option<Duration> {
        let (_, due) = *self.lock().get(key)?;
        due.checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Forgets the keys `keep` refuses (objects that are gone).
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (u32, Instant)>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key` worked: its next failure starts from the first delay again. True when it had
    /// failed before (a recovery worth telling once).
    pub fn succeeded(&self, key: &K) -> bool {
        self.lock().remove(key).is_some()
    }

    /// Consecutive failures of `key` so far.
    pub fn count(&self, key: &K) -> u32 {
        self.lock().get(key).map_or(0, |(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_and_stops_at_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(10), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_is_a_share_of_the_delay() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.jittered(3, 1.0), Duration::from_millis(400));
        assert_eq!(b.jittered(3, 0.5), Duration::from_millis(200));
        assert_eq!(b.jittered(3, 0.0), Duration::ZERO);
        assert_eq!(b.jittered(3, 7.0), Duration::from_millis(400));
    }

    #[test]
    fn a_huge_base_saturates_instead_of_overflowing() {
        let b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(b.delay(30), Duration::MAX);
    }

    #[test]
    fn failures_back_off_per_key_and_reset_on_success() {
        let f = Failures::new(Backoff::new(Duration::from_secs(1), Duration::from_secs(8)));
        assert_eq!(f.failed("a"), (1, Duration::from_secs(1)));
        assert_eq!(f.failed("a"), (2, Duration::from_secs(2)));
        assert_eq!(f.failed("b"), (1, Duration::from_secs(1)), "per key");
        assert_eq!(f.failed("a"), (3, Duration::from_secs(4)));
        assert_eq!(f.failed("a"), (4, Duration::from_secs(8)));
        assert_eq!(f.failed("a"), (5, Duration::from_secs(8)), "capped");
        assert!(f.succeeded(&"a"));
        assert!(!f.succeeded(&"a"), "told once");
        assert_eq!(f.count(&"a"), 0);
        assert_eq!(f.failed("a"), (1, Duration::from_secs(1)));
        assert_eq!(f.count(&"b"), 1);
        let hour = Duration::from_secs(3600);
        let slow = Failures::new(Backoff::new(hour, hour));
        slow.failed("b");
        assert!(slow.waiting(&"b").is_some_and(|d| d <= hour));
        assert_eq!(f.waiting(&"c"), None, "never failed");
        slow.retain(|k| *k != "b");
        assert_eq!(slow.count(&"b"), 0);
        assert_eq!(slow.waiting(&"b"), None);
        let none = Failures::new(Backoff::new(Duration::ZERO, Duration::ZERO));
        none.failed("a");
        assert_eq!(none.waiting(&"a"), None, "nothing left to wait");
    }
}
