//! How big a volume must be for a disk, and how big a disk fits a volume: one rule, shared by
//! the webhook (which sizes PVCs) and the populator (which sizes `disk.img`), so the two always
//! agree.
//!
//! A Filesystem-mode volume loses part of its space to the filesystem. Like CDI since its
//! PR #3812, the volume is the disk plus `overhead` (volume = disk × (1 + overhead)) and the
//! disk a volume holds is volume / (1 + overhead); the default overhead is CDI's, 6%.

/// CDI's default filesystem overhead (6%).
pub const DEFAULT_FILESYSTEM_OVERHEAD: f64 = 0.06;

/// Populates that copy out of one node's cache at once, by default (the others wait for a
/// slot): a burst of claims then copies at the disk's pace instead of thrashing it.
pub const DEFAULT_PARALLEL_COPIES: usize = 4;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Bytes a volume needs to hold a disk of `disk_bytes`, rounded up to whole MiB. Filesystem
/// volumes also need room for the filesystem (`overhead`, 0.0–0.5).
pub fn volume_bytes_for_disk(disk_bytes: u64, filesystem_mode: bool, overhead: f64) -> u64 {
    let needed = if filesystem_mode && overhead > 0.0 {
        (disk_bytes as f64 * (1.0 + overhead.clamp(0.0, 0.5))).ceil() as u64
    } else {
        disk_bytes
    };
    needed.div_ceil(MIB).saturating_mul(MIB)
}

/// The largest disk (whole 512-byte sectors) a Filesystem volume of `volume_bytes` holds.
/// `usable_disk_bytes(volume_bytes_for_disk(d, true, o), o) >= d` for every sector-aligned d.
pub fn usable_disk_bytes(volume_bytes: u64, overhead: f64) -> u64 {
    let usable = (volume_bytes as f64 / (1.0 + overhead.clamp(0.0, 0.5))).floor() as u64;
    usable / SECTOR * SECTOR
}

/// Reads a filesystem overhead as given on a command line: a fraction in 0.0–0.5. The webhook
/// and the populator take the same flag and must agree on it.
pub fn parse_filesystem_overhead(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=0.5).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0.0..=0.5"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_flags_are_fractions_up_to_a_half() {
        assert_eq!(parse_filesystem_overhead("0.1"), Ok(0.1));
        assert_eq!(parse_filesystem_overhead("0"), Ok(0.0));
        assert!(parse_filesystem_overhead("0.6")
            .unwrap_err()
            .contains("outside"));
        assert!(parse_filesystem_overhead("six")
            .unwrap_err()
            .contains("not a number"));
    }

    #[test]
    fn volume_adds_overhead_and_rounds_to_mib() {
        assert_eq!(volume_bytes_for_disk(10 << 30, false, 0.06), 10 << 30);
        let fs = volume_bytes_for_disk(10 << 30, true, 0.06);
        assert_eq!(fs % MIB, 0);
        assert!(fs as f64 >= (10u64 << 30) as f64 * 1.06);
        assert_eq!(volume_bytes_for_disk(1, false, 0.0), MIB);
    }

    #[test]
    fn the_disk_always_fits_the_volume_sized_for_it() {
        for disk in [
            512u64,
            1 << 20,
            (32 << 20) + 512,
            10 << 30,
            (2 << 40) - 512,
            3_000_000_000 / 512 * 512,
        ] {
            for overhead in [0.0, 0.055, 0.06, 0.1, 0.5] {
                let volume = volume_bytes_for_disk(disk, true, overhead);
                let usable = usable_disk_bytes(volume, overhead);
                assert!(
                    usable >= disk,
                    "disk {disk} overhead {overhead}: volume {volume} holds {usable}"
                );
                assert!(usable <= volume);
                assert_eq!(usable % 512, 0);
            }
        }
    }
}
