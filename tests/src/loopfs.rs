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

/// An XFS filesystem with reflinks in a sparse file under `dir`, loop-mounted at
/// `dir/xfs`; unmounted on drop.
pub struct XfsMount {
    pub path: PathBuf,
}

impl XfsMount {
    pub fn new(dir: &Path, size_mib: u64) -> Result<Self, String> {
        if !is_root() {
            return Err("mounting a filesystem needs root".into());
        }
        let image = dir.join("xfs.img");
        let file = std::fs::File::create(&image).map_err(|e| format!("creating {image:?}: {e}"))?;
        file.set_len(size_mib << 20)
            .map_err(|e| format!("sizing {image:?}: {e}"))?;
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image))
        .map_err(|e| format!("{e} (is xfsprogs installed? .ci/setup installs it)"))?;
        let path = dir.join("xfs");
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {path:?}: {e}"))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&path))?;
        Ok(Self { path })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
