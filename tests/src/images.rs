//! vmdisk's container images for tests: built once per test process with
//! `deploy/images/build.sh` (buildah, debootstrap), pushed where a test needs them, and run
//! with buildah (chroot isolation), no Docker engine.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// The three images, by the names buildah's local storage knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImages {
    pub webhook: String,
    pub controller: String,
    pub cache_agent: String,
}

impl BuiltImages {
    /// Each image with its binary (what its entrypoint runs).
    pub fn with_binaries(&self) -> [(&str, &'static str); 3] {
        [
            (&self.webhook, "vmdisk-webhook"),
            (&self.controller, "vmdisk-controller"),
            (&self.cache_agent, "vmdisk-cache-agent"),
        ]
    }
}

const BUILDAH: [&str; 3] = ["buildah", "--storage-driver", "vfs"];

fn found(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why images cannot be built on this machine, if they cannot.
pub fn cannot_build() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("building images needs root (debootstrap, buildah chroot isolation)".into());
    }
    ["buildah", "debootstrap"]
        .into_iter()
        .find(|t| !found(t))
        .map(|t| format!("{t} is not installed (apt-get install buildah debootstrap)"))
}

static BUILT: Mutex<Option<BuiltImages>> = Mutex::new(None);

/// Builds the images with `deploy/images/build.sh` from the binaries in `bin_dir`, pushing
/// them to `registry` (plain HTTP); later calls push the images already built.
pub fn build_and_push(
    root: &Path,
    bin_dir: &Path,
    registry: &str,
    tag: &str,
) -> Result<BuiltImages, String> {
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let names = |host: &str| BuiltImages {
        webhook: format!("{host}/vmdisk/webhook:{tag}"),
        controller: format!("{host}/vmdisk/controller:{tag}"),
        cache_agent: format!("{host}/vmdisk/cache-agent:{tag}"),
    };
    if let Some(local) = built.as_ref() {
        let pushed = names(registry);
        for ((from, _), (to, _)) in local
            .with_binaries()
            .into_iter()
            .zip(pushed.with_binaries())
        {
            run(Command::new(BUILDAH[0])
                .args(&BUILDAH[1..])
                .args(["push", "--quiet", "--tls-verify=false", from])
                .arg(format!("docker://{to}")))?;
        }
        return Ok(pushed);
    }
    run(Command::new("bash")
        .arg(root.join("deploy/images/build.sh"))
        .args([
            "--registry",
            registry,
            "--tag",
            tag,
            "--insecure",
            "--binaries",
        ])
        .arg(bin_dir))?;
    let images = names(registry);
    *built = Some(images.clone());
    Ok(images)
}

/// Deletes the images [`build_and_push`] left in buildah's storage (hundreds of MiB each with
/// the vfs driver): every run tags its own, so nothing else would ever delete them.
pub fn remove_built() -> Result<(), String> {
    let Some(local) = BUILT.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Ok(());
    };
    run(Command::new(BUILDAH[0]).args(&BUILDAH[1..]).args([
        "rmi",
        "--force",
        &local.webhook,
        &local.controller,
        &local.cache_agent,
    ]))
    .map(|_| ())
}

/// Size of an image in buildah's storage, as buildah prints it.
pub fn size_of(image: &str) -> Result<String, String> {
    run(Command::new(BUILDAH[0]).args(&BUILDAH[1..]).args([
        "images",
        "--format",
        "{{.Size}}",
        image,
    ]))
    .map(|s| s.trim().to_string())
}

/// Pulls `image` from its registry (not the local copy) and runs `command` in it.
pub fn run_in_image(image: &str, command: &[&str]) -> Result<String, String> {
    let container = run(Command::new(BUILDAH[0])
        .args(&BUILDAH[1..])
        .args(["from", "--quiet", "--pull-always", "--tls-verify=false"])
        .arg(format!("docker://{image}")))?;
    let container = container.trim().to_string();
    let out = run(Command::new(BUILDAH[0])
        .args(&BUILDAH[1..])
        .args(["run", "--isolation", "chroot", &container, "--"])
        .args(command));
    let _ = run(Command::new(BUILDAH[0])
        .args(&BUILDAH[1..])
        .args(["rm", &container]));
    out
}

fn run(command: &mut Command) -> Result<String, String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
