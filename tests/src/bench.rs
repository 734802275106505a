//! Small helpers the benchmarks share: settings from the environment and medians.

/// `name` parsed from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (sorted in place); rounds run an odd number of times.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_unsorted_rounds() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::env_or("VMDISK_BENCH_SURELY_UNSET", 7), 7);
    }
}
