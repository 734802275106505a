//! The agent's Prometheus metrics ([`AgentMetrics`]: pulls, hits and misses, evictions,
//! failures, durations, cache size), served by `vmdisk_support::metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use vmdisk_support::metrics::Exposition;

/// The agent's Prometheus metrics.
pub struct AgentMetrics {
    registry: Registry,
    bytes_pulled: Counter,
    bytes_from_peers: Counter,
    peer_bytes_served: Counter,
    peer_requests: Family<Vec<(&'static str, &'static str)>, Counter>,
    hits: Counter,
    misses: Counter,
    evictions: Counter,
    failures: Counter,
    pull_seconds: Histogram,
    convert_seconds: Histogram,
    used: Gauge,
    budget: Gauge,
    entries: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmdisk_cache");
        let m = Self {
            bytes_pulled: Counter::default(),
            bytes_from_peers: Counter::default(),
            peer_bytes_served: Counter::default(),
            peer_requests: Family::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            evictions: Counter::default(),
            failures: Counter::default(),
            pull_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            convert_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            used: Gauge::default(),
            budget: Gauge::default(),
            entries: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "bytes_pulled",
            "Bytes of layers downloaded, from registries and peers",
            m.bytes_pulled.clone(),
        );
        registry.register(
            "bytes_from_peers",
            "Of the bytes pulled, those other nodes' agents sent",
            m.bytes_from_peers.clone(),
        );
        registry.register(
            "peer_bytes_served",
            "Bytes of layers this node sent other nodes' agents",
            m.peer_bytes_served.clone(),
        );
        registry.register(
            "peer_requests",
            "Requests of other nodes' agents, by outcome (served, unauthenticated, not_held, not_asked, bad_range, busy, unavailable)",
            m.peer_requests.clone(),
        );
        registry.register(
            "hits",
            "Warms and populates served from the cache",
            m.hits.clone(),
        );
        registry.register("misses", "Warms that had to pull", m.misses.clone());
        registry.register(
            "evictions",
            "Entries evicted by the LRU budget",
            m.evictions.clone(),
        );
        registry.register("warm_failures", "Warms that failed", m.failures.clone());
        registry.register(
            "pull_duration_seconds",
            "Time to download an image's layers",
            m.pull_seconds.clone(),
        );
        registry.register(
            "convert_duration_seconds",
            "Time to extract, check and convert a disk",
            m.convert_seconds.clone(),
        );
        registry.register(
            "used_bytes",
            "Bytes the cache entries occupy",
            m.used.clone(),
        );
        registry.register("budget_bytes", "Bytes the cache may use", m.budget.clone());
        registry.register("entries", "Cache entries", m.entries.clone());
        Self { registry, ..m }
    }

    /// Of a warm's pulled bytes, those peers sent.
    pub fn observe_from_peers(&self, bytes: u64) {
        self.bytes_from_peers.inc_by(bytes);
    }

    pub fn peer_bytes_served(&self, bytes: u64) {
        self.peer_bytes_served.inc_by(bytes);
    }

    pub fn peer_request(&self, outcome: &'static str) {
        self.peer_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn cache_hit(&self) {
        self.hits.inc();
    }
    pub fn cache_miss(&self) {
        self.misses.inc();
    }
    pub fn warm_failed(&self) {
        self.failures.inc();
    }
    /// Brings the evictions counter up to the store's running total.
    pub fn set_evictions(&self, total: u64) {
        let now = self.evictions.get();
        if total > now {
            self.evictions.inc_by(total - now);
        }
    }
    pub fn observe_pull(&self, bytes: u64, seconds: f64) {
        self.bytes_pulled.inc_by(bytes);
        self.pull_seconds.observe(seconds);
    }
    pub fn observe_convert(&self, seconds: f64) {
        self.convert_seconds.observe(seconds);
    }
    pub fn set_cache(&self, used: u64, budget: u64, entries: u64) {
        self.used.set(used as i64);
        self.budget.set(budget as i64);
        self.entries.set(entries as i64);
    }
}

impl Exposition for AgentMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_exposition() {
        let m = AgentMetrics::new();
        m.observe_pull(1000, 1.5);
        m.cache_hit();
        m.set_cache(10, 20, 1);
        let text = m.encode();
        assert!(
            text.contains("vmdisk_cache_bytes_pulled_total 1000"),
            "{text}"
        );
        assert!(text.contains("vmdisk_cache_hits_total 1"), "{text}");
        assert!(text.contains("vmdisk_cache_used_bytes 10"), "{text}");
    }
}
