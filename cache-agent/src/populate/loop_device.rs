//! Test support: a loop device over a file, for the block-device targets (needs root; tests
//! skip, saying why, where it cannot be made).

use std::path::Path;

/// A loop device over a file, detached on drop.
pub(crate) struct LoopDevice(String);

impl LoopDevice {
    pub(crate) fn attach(backing: &Path) -> Result<Self, String> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl LoopDevice {
    pub(crate) fn path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}
