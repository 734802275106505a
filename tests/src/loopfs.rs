//! Loop devices and loop-mounted filesystems for the tests that need a real block device or
//! a filesystem with reflinks (XFS). Both need root; `Err` carries the reason to print when a
//! test skips.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A loop device over a file (the Block volume mode), detached on drop.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    pub fn attach(backing: &Path) -> Result<Self, String> {
        if !is_root() {
            return Err("loop devices need root".into());
        }
        let device = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing))?;
        Ok(Self {
            device: PathBuf::from(device),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A filesystem in a sparse file under `dir`, loop-mounted at `dir/<kind>`; unmounted on drop.
pub struct LoopMount {
    pub path: PathBuf,
}

impl LoopMount {
    /// XFS with reflinks (what makes a cache copy a clone).
    pub fn xfs(dir: &Path, size_mib: u64) -> Result<Self, String> {
        Self::new(
            dir,
            size_mib,
            "xfs",
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        )
    }

    /// A small ext4 (XFS needs at least 300 MiB): for running out of space.
    pub fn ext4(dir: &Path, size_mib: u64) -> Result<Self, String> {
        Self::new(dir, size_mib, "ext4", &["mkfs.ext4", "-q", "-F"])
    }

    fn new(dir: &Path, size_mib: u64, kind: &str, mkfs: &[&str]) -> Result<Self, String> {
        if !is_root() {
            return Err("mounting a filesystem needs root".into());
        }
        let image = dir.join(format!("{kind}.img"));
        let file = std::fs::File::create(&image).map_err(|e| format!("creating {image:?}: {e}"))?;
        file.set_len(size_mib << 20)
            .map_err(|e| format!("sizing {image:?}: {e}"))?;
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image))
            .map_err(|e| format!("{e} (is {} installed? .ci/setup installs it)", mkfs[0]))?;
        let path = dir.join(kind);
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {path:?}: {e}"))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&path))?;
        Ok(Self { path })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
