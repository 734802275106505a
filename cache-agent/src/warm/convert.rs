//! qemu-img: inspect, refuse unsafe images, convert, check, resize, compare.
//!
//! The format always comes from the content, never from the file name: `probe_format` reads
//! the magic of the formats vmdisk accepts, and every qemu-img run names its format with `-f`,
//! so qemu-img never guesses. Images that make qemu read other files are refused before any
//! conversion: backing files, qcow2 external data files, and VMDK extents other than the image
//! itself. Any of these would let an image author copy host files into a VM disk.
//!
//! qemu-img runs with limits: at most `QEMU_IMG_MEMORY` of address space, and a CPU and wall
//! time limit (`time_limit`: 5 minutes, plus a minute per GiB for a conversion), after which
//! it is killed and the warm fails with a clear error.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use vmdisk_crds::DiskFormat;

/// Formats accepted inside an image. Everything qemu knows beyond these (dmg, vvfat, luks, …)
/// is unusual in a containerDisk and widens the attack surface for nothing.
pub const ALLOWED_SOURCE_FORMATS: &[&str] = &["raw", "qcow2", "vmdk", "vhdx", "vpc"];

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("cannot run qemu-img (install qemu-utils): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img {args} failed ({status}): {stderr}")]
    QemuImg {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("qemu-img info printed JSON this agent does not understand: {0}")]
    BadJson(String),
    #[error("the disk names a backing file {path:?}; refused (it could read host files)")]
    BackingFile { path: String },
    #[error("the disk names an external data file {path:?}; refused (it could read host files)")]
    DataFile { path: String },
    #[error("the disk's VMDK extent {path:?} is another file; refused (it could read host files)")]
    ForeignExtent { path: String },
    #[error("the disk is encrypted; refused")]
    Encrypted,
    #[error("disk format {format:?} is not accepted (accepted: {allowed})")]
    UnsupportedFormat { format: String, allowed: String },
    #[error("qemu-img {args} did not finish within {seconds} s; killed")]
    TimedOut { args: String, seconds: u64 },
    #[error("cannot read the disk {path}: {source}")]
    Probe {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConvertError {
    /// True for a disk refused for what it is (a backing or data file, a foreign extent,
    /// encryption, a format not accepted): trying again cannot help.
    pub fn refuses_disk(&self) -> bool {
        matches!(
            self,
            ConvertError::BackingFile { .. }
                | ConvertError::DataFile { .. }
                | ConvertError::ForeignExtent { .. }
                | ConvertError::Encrypted
                | ConvertError::UnsupportedFormat { .. }
        )
    }
}

/// Address space a qemu-img run may use. Its conversions use a few hundred MiB at most; a
/// hostile image asking for more fails instead of taking the node's memory.
pub const QEMU_IMG_MEMORY: u64 = 1 << 30;
/// Time a qemu-img run may take besides its per-GiB share.
pub const QEMU_IMG_BASE_TIME: Duration = Duration::from_secs(300);
/// Time a conversion may take per GiB of disk.
pub const QEMU_IMG_TIME_PER_GIB: Duration = Duration::from_secs(60);

/// The wall and CPU time a qemu-img run over `bytes` of disk may take.
pub fn time_limit(bytes: u64) -> Duration {
    QEMU_IMG_BASE_TIME
        + QEMU_IMG_TIME_PER_GIB * u32::try_from(bytes.div_ceil(1 << 30)).unwrap_or(u32::MAX)
}

/// The format of the disk at `path`, from its magic, among [`ALLOWED_SOURCE_FORMATS`]
/// (`raw` when none matches: qemu-img then reads it byte for byte, whatever it holds).
pub fn probe_format(path: &Path) -> Result<&'static str, ConvertError> {
    use std::os::unix::fs::FileExt;
    let probe = |source| ConvertError::Probe {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(probe)?;
    let len = file.metadata().map_err(probe)?.len();
    let mut head = [0u8; 512];
    let n = file.read_at(&mut head, 0).map_err(probe)?;
    let head = &head[..n];
    let mut tail = [0u8; 8];
    let fixed_vhd =
        len >= 512 && file.read_exact_at(&mut tail, len - 512).is_ok() && &tail == b"conectix";
    Ok(if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        "vmdk"
    } else if head.starts_with(b"vhdxfile") {
        "vhdx"
    } else if head.starts_with(b"conectix") || fixed_vhd {
        "vpc"
    } else {
        "raw"
    })
}

/// What qemu-img says about a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub backing_file: Option<String>,
    pub data_file: Option<String>,
    /// File names of VMDK extents.
    pub extents: Vec<String>,
    pub encrypted: bool,
    /// The file that was inspected, as qemu-img names it.
    pub filename: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct InfoJson {
    format: String,
    virtual_size: u64,
    #[serde(default)]
    actual_size: Option<u64>,
    #[serde(default)]
    backing_filename: Option<String>,
    #[serde(default)]
    full_backing_filename: Option<String>,
    #[serde(default)]
    encrypted: Option<bool>,
    #[serde(default)]
    filename: String,
    #[serde(default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: serde_json::Value,
}

/// Runs qemu-img with `args` under the memory limit and `limit` of CPU and wall time.
async fn qemu_img(
    args: &[&str],
    limit: Duration,
) -> Result<(std::process::ExitStatus, Vec<u8>, String), ConvertError> {
    let mut command = tokio::process::Command::new("qemu-img");
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    // The limit is on address space: glibc reserves up to 64 MiB of it per malloc arena, one
    // per thread of qemu's I/O pool, which could exhaust it (qemu then aborts on
    // `qemu_thread_create: Resource temporarily unavailable`) long before memory runs short.
    command.env("MALLOC_ARENA_MAX", "2");
    let cpu_seconds = limit.as_secs();
    // SAFETY: between fork and exec only setrlimit runs: async-signal-safe, no allocation.
    unsafe {
        command.pre_exec(move || {
            set_limit(libc::RLIMIT_AS, QEMU_IMG_MEMORY)?;
            set_limit(libc::RLIMIT_CPU, cpu_seconds)
        });
    }
    let out = match tokio::time::timeout(limit, command.output()).await {
        Ok(out) => out.map_err(ConvertError::Spawn)?,
        // Dropping the future kills qemu-img (kill_on_drop).
        Err(_) => {
            return Err(ConvertError::TimedOut {
                args: args.join(" "),
                seconds: limit.as_secs(),
            })
        }
    };
    Ok((
        out.status,
        out.stdout,
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn failed(args: &[&str], status: std::process::ExitStatus, stderr: String) -> ConvertError {
    ConvertError::QemuImg {
        args: args.join(" "),
        status: status.to_string(),
        stderr,
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `qemu-img info --output=json`.
pub async fn inspect(path: &Path) -> Result<ImageInfo, ConvertError> {
    let format = probe_format(path)?;
    let args = ["info", "-f", format, "--output=json", path_str(path)];
    let (status, stdout, stderr) = qemu_img(&args, QEMU_IMG_BASE_TIME).await?;
    if !status.success() {
        return Err(failed(&args, status, stderr));
    }
    parse_info(&stdout)
}

/// Parses `qemu-img info --output=json` output.
pub fn parse_info(json: &[u8]) -> Result<ImageInfo, ConvertError> {
    let info: InfoJson =
        serde_json::from_slice(json).map_err(|e| ConvertError::BadJson(e.to_string()))?;
    let data = info.format_specific.map(|f| f.data).unwrap_or_default();
    let data_file = data
        .get("data-file")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let extents = data
        .get("extents")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    e.get("filename")
                        .and_then(|f| f.as_str())
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        backing_file: info.backing_filename.or(info.full_backing_filename),
        data_file,
        extents,
        encrypted: info.encrypted.unwrap_or(false),
        filename: info.filename,
    })
}

/// Refuses images that would make qemu read anything but themselves.
pub fn check_safe(info: &ImageInfo) -> Result<(), ConvertError> {
    if !ALLOWED_SOURCE_FORMATS.contains(&info.format.as_str()) {
        return Err(ConvertError::UnsupportedFormat {
            format: info.format.clone(),
            allowed: ALLOWED_SOURCE_FORMATS.join(", "),
        });
    }
    if let Some(path) = &info.backing_file {
        return Err(ConvertError::BackingFile { path: path.clone() });
    }
    if let Some(path) = &info.data_file {
        return Err(ConvertError::DataFile { path: path.clone() });
    }
    if let Some(path) = info.extents.iter().find(|e| **e != info.filename) {
        return Err(ConvertError::ForeignExtent { path: path.clone() });
    }
    if info.encrypted {
        return Err(ConvertError::Encrypted);
    }
    Ok(())
}

/// False when the disk can be stored as it is.
pub fn needs_conversion(source_format: &str, target: DiskFormat) -> bool {
    source_format != target.as_str()
}

/// Converts to `target` with sparse output (zeros are not written).
pub async fn convert(
    src: &Path,
    src_format: &str,
    dst: &Path,
    target: DiskFormat,
) -> Result<(), ConvertError> {
    convert_to(src, src_format, dst, target, false).await
}

/// [`convert`]; with `existing`, onto `dst` as it is (a block device: not created, its size
/// kept, and zeros written where the disk has them, since its old content would show through).
pub async fn convert_to(
    src: &Path,
    src_format: &str,
    dst: &Path,
    target: DiskFormat,
    existing: bool,
) -> Result<(), ConvertError> {
    // -W: out-of-order writes; -m 8: parallel coroutines; -S 4k: detect zeros, write holes;
    // -n: the target exists.
    let mut args = vec!["convert", "-W", "-m", "8", "-S", "4k", "-t", "writeback"];
    if existing {
        args.push("-n");
    }
    args.extend([
        "-f",
        src_format,
        "-O",
        target.as_str(),
        path_str(src),
        path_str(dst),
    ]);
    let bytes = std::fs::metadata(src).map(|m| m.len()).unwrap_or(0);
    let (status, _, stderr) = qemu_img(&args, time_limit(bytes)).await?;
    if !status.success() {
        return Err(failed(&args, status, stderr));
    }
    Ok(())
}

/// `qemu-img check` for qcow2 (leaked clusters are harmless and accepted); raw has nothing
/// to check.
pub async fn check(path: &Path, format: DiskFormat) -> Result<(), ConvertError> {
    if format == DiskFormat::Raw {
        return Ok(());
    }
    let args = ["check", "-f", format.as_str(), path_str(path)];
    let (status, stdout, stderr) = qemu_img(&args, QEMU_IMG_BASE_TIME).await?;
    match status.code() {
        Some(0) | Some(3) => Ok(()),
        _ => Err(failed(
            &args,
            status,
            format!("{} {}", String::from_utf8_lossy(&stdout).trim(), stderr),
        )),
    }
}

/// Grows a qcow2 disk's virtual size (raw targets are grown by length instead).
pub async fn resize(path: &Path, bytes: u64) -> Result<(), ConvertError> {
    let size = bytes.to_string();
    let args = ["resize", "-f", "qcow2", path_str(path), size.as_str()];
    let (status, _, stderr) = qemu_img(&args, QEMU_IMG_BASE_TIME).await?;
    if !status.success() {
        return Err(failed(&args, status, stderr));
    }
    Ok(())
}

/// `qemu-img compare`: true when the two disks have the same content.
pub async fn compare(a: &Path, b: &Path) -> Result<bool, ConvertError> {
    let (fa, fb) = (probe_format(a)?, probe_format(b)?);
    let args = ["compare", "-f", fa, "-F", fb, path_str(a), path_str(b)];
    let bytes = std::fs::metadata(a).map(|m| m.len()).unwrap_or(0);
    let (status, _, stderr) = qemu_img(&args, time_limit(bytes)).await?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(&args, status, stderr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn formats_are_probed_from_content_for_every_accepted_format() {
        let dir = tempfile::tempdir().unwrap();
        for (format, options) in [
            ("qcow2", ""),
            ("vmdk", ""),
            ("vmdk", "subformat=streamOptimized"),
            ("vhdx", ""),
            ("vpc", ""),
            ("vpc", "subformat=fixed"),
            ("raw", ""),
        ] {
            let path = dir.path().join(format!("d-{format}-{}", options.len()));
            let mut args = vec!["create", "-q", "-f", format];
            if !options.is_empty() {
                args.extend(["-o", options]);
            }
            let p = path.display().to_string();
            args.extend([p.as_str(), "8M"]);
            let out = std::process::Command::new("qemu-img")
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}");
            assert_eq!(probe_format(&path).unwrap(), format, "{options}");
        }
        // A raw disk is raw whatever its name says.
        let named = dir.path().join("disk.qcow2");
        std::fs::write(&named, vec![7u8; 4096]).unwrap();
        assert_eq!(probe_format(&named).unwrap(), "raw");
        assert!(matches!(
            probe_format(&dir.path().join("missing")),
            Err(ConvertError::Probe { .. })
        ));
    }

    #[test]
    fn qemu_img_time_grows_with_the_disk() {
        assert_eq!(time_limit(0), QEMU_IMG_BASE_TIME);
        assert_eq!(time_limit(1), QEMU_IMG_BASE_TIME + QEMU_IMG_TIME_PER_GIB);
        assert_eq!(
            time_limit(10 << 30),
            QEMU_IMG_BASE_TIME + QEMU_IMG_TIME_PER_GIB * 10
        );
        assert!(time_limit(u64::MAX) > QEMU_IMG_BASE_TIME);
    }

    #[tokio::test]
    async fn qemu_img_runs_under_the_memory_limit() {
        // `qemu-img bench` reading with a 1.5 GiB buffer (which it allocates whole) fails under
        // the 1 GiB limit; with a 64 MiB buffer the same run succeeds.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        let p = path.display().to_string();
        let bench = |size: &'static str| {
            let p = p.clone();
            async move {
                let args = ["bench", "-f", "raw", "-c", "1", "-d", "1", "-s", size, &p];
                qemu_img(&args, QEMU_IMG_BASE_TIME).await.unwrap()
            }
        };
        let (status, _, stderr) = bench("1536M").await;
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains("Cannot allocate memory"), "{stderr}");
        let (status, _, stderr) = bench("64M").await;
        assert!(status.success(), "{stderr}");
    }

    fn run(args: &[&str]) {
        let s = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(
            s.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&s.stderr)
        );
    }

    /// A 32 MiB sparse raw disk with data at a few offsets.
    fn raw_disk(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("src.raw");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(32 << 20).unwrap();
        for (i, off) in [0u64, 5 << 20, 17 << 20, (32 << 20) - 4096]
            .iter()
            .enumerate()
        {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(&vec![(i as u8) * 40 + 1; 4096]).unwrap();
        }
        p
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    #[tokio::test]
    async fn formats_are_detected_from_content_and_converted_faithfully() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw_disk(dir.path());
        // A qcow2 file named like a raw one: detection must not trust the name.
        let qcow2 = dir.path().join("disk.raw.img");
        run(&["convert", "-O", "qcow2", p(&src), p(&qcow2)]);
        let compressed = dir.path().join("c.qcow2");
        run(&["convert", "-c", "-O", "qcow2", p(&src), p(&compressed)]);
        let vmdk = dir.path().join("d.vmdk");
        run(&["convert", "-O", "vmdk", p(&src), p(&vmdk)]);

        for (file, format) in [
            (&src, "raw"),
            (&qcow2, "qcow2"),
            (&compressed, "qcow2"),
            (&vmdk, "vmdk"),
        ] {
            let info = inspect(file).await.unwrap();
            assert_eq!(info.format, format, "{}", file.display());
            assert_eq!(info.virtual_size, 32 << 20);
            check_safe(&info).unwrap();
            for target in [DiskFormat::Raw, DiskFormat::Qcow2] {
                let out = dir.path().join(format!("out-{}-{}", format, target));
                convert(file, &info.format, &out, target).await.unwrap();
                check(&out, target).await.unwrap();
                assert!(
                    compare(&src, &out).await.unwrap(),
                    "{} -> {target} differs",
                    file.display()
                );
                let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
                assert!(
                    allocated < 8 << 20,
                    "{} -> {target} not sparse: {allocated}",
                    file.display()
                );
            }
        }
        assert!(!needs_conversion("raw", DiskFormat::Raw));
        assert!(needs_conversion("vmdk", DiskFormat::Qcow2));
    }

    #[tokio::test]
    async fn backing_files_and_external_data_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_disk(dir.path());
        let child = dir.path().join("child.qcow2");
        run(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "raw",
            p(&child),
        ]);
        let err = check_safe(&inspect(&child).await.unwrap()).unwrap_err();
        assert!(matches!(err, ConvertError::BackingFile { .. }), "{err}");
        // Still refused when the backing file does not exist on this host.
        let orphan = dir.path().join("orphan.qcow2");
        run(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/shadow",
            "-F",
            "raw",
            p(&orphan),
            "1M",
        ]);
        assert!(matches!(
            check_safe(&inspect(&orphan).await.unwrap()),
            Err(ConvertError::BackingFile { .. })
        ));

        let with_data = dir.path().join("data.qcow2");
        let data_file = dir.path().join("ext.raw");
        run(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&data_file)),
            p(&with_data),
            "1M",
        ]);
        let err = check_safe(&inspect(&with_data).await.unwrap()).unwrap_err();
        assert!(matches!(err, ConvertError::DataFile { .. }), "{err}");
        assert!(err.to_string().contains("ext.raw"));
    }

    #[tokio::test]
    async fn vmdk_descriptors_pointing_at_host_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let desc = dir.path().join("evil.vmdk");
        std::fs::write(
            &desc,
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"/etc/hostname\" 0\n\nddb.virtualHWVersion = \"4\"\n",
        )
        .unwrap();
        match inspect(&desc).await {
            Ok(info) => {
                let err = check_safe(&info).unwrap_err();
                assert!(matches!(err, ConvertError::ForeignExtent { .. }), "{err}");
            }
            // qemu-img refusing to open it at all is also a refusal.
            Err(e) => assert!(matches!(e, ConvertError::QemuImg { .. }), "{e}"),
        }
    }

    #[tokio::test]
    async fn qemu_img_failures_carry_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw_disk(dir.path());
        let qcow2 = dir.path().join("t.qcow2");
        run(&["convert", "-O", "qcow2", p(&src), p(&qcow2)]);
        // A qcow2 header claiming a version no qemu knows.
        let mut bytes = std::fs::read(&qcow2).unwrap();
        bytes[4..8].copy_from_slice(&99u32.to_be_bytes());
        std::fs::write(&qcow2, &bytes).unwrap();
        let out = dir.path().join("o.raw");
        let err = convert(&qcow2, "qcow2", &out, DiskFormat::Raw)
            .await
            .unwrap_err();
        match &err {
            ConvertError::QemuImg { stderr, args, .. } => {
                assert!(!stderr.is_empty(), "stderr missing");
                assert!(args.contains("convert"));
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("qemu-img convert"));
        let info_err = inspect(&dir.path().join("missing")).await.unwrap_err();
        assert!(info_err.to_string().contains("missing"), "{info_err}");
    }

    #[test]
    fn unusual_formats_and_encryption_are_refused() {
        let base = ImageInfo {
            format: "raw".into(),
            virtual_size: 1,
            actual_size: None,
            backing_file: None,
            data_file: None,
            extents: vec![],
            encrypted: false,
            filename: "d".into(),
        };
        check_safe(&base).unwrap();
        let dmg = ImageInfo {
            format: "dmg".into(),
            ..base.clone()
        };
        assert!(matches!(
            check_safe(&dmg),
            Err(ConvertError::UnsupportedFormat { .. })
        ));
        let enc = ImageInfo {
            encrypted: true,
            format: "qcow2".into(),
            ..base
        };
        assert!(matches!(check_safe(&enc), Err(ConvertError::Encrypted)));
    }
}
