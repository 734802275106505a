//! Filling a volume from a containerDisk the node's runtime mounted (`pullMethod: node`): the
//! kubelet pulled the image with the pod's pull secrets (and the node's credential providers
//! and mirrors) and mounted it read-only as an image volume; `populate --source-dir` finds the
//! image's one `disk/` file, checks it as a warm checks a pulled disk (no backing or data file,
//! no foreign extent, not encrypted, an accepted format) and converts it straight onto the
//! volume with qemu-img, sparse, under the same time and memory limits.
//!
//! vmdisk's cache takes no part: the runtime already keeps an unpacked copy of the image on the
//! node, and a cache entry warmed this way would carry no registry confirmation that the
//! cache's authorization rule could check for the next requester.

use std::path::{Path, PathBuf};

use thiserror::Error;
use vmdisk_crds::DiskFormat;

use super::is_block_device;
use crate::warm::convert::{self, ConvertError};

/// The directory of a containerDisk that holds the disk file.
pub const DISK_DIR: &str = "disk";

#[derive(Debug, Error)]
pub enum MountedError {
    #[error("{dir} has no {DISK_DIR}/ directory: not a containerDisk (KubeVirt's layout is disk/<file>)")]
    NoDiskDir { dir: String },
    #[error("{dir} holds {count} entries; a containerDisk holds exactly one disk file")]
    NotOneDisk { dir: String, count: usize },
    #[error("{path} is not a regular file (a symbolic link, a directory or a device); refused: the disk must be a file of the image itself")]
    NotAFile { path: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the mounted disk {path}: {source}")]
    Convert {
        path: String,
        #[source]
        source: ConvertError,
    },
    #[error("the disk needs {disk} bytes but the volume offers {room} bytes for {target}")]
    DiskTooLarge {
        disk: u64,
        room: u64,
        target: String,
    },
    #[error("writing {target}: {source}")]
    Target {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

impl MountedError {
    /// True when running again cannot help: the image is not a usable containerDisk or the
    /// volume is too small.
    pub fn is_permanent(&self) -> bool {
        match self {
            MountedError::NoDiskDir { .. }
            | MountedError::NotOneDisk { .. }
            | MountedError::NotAFile { .. }
            | MountedError::DiskTooLarge { .. } => true,
            MountedError::Convert { source, .. } => source.refuses_disk(),
            MountedError::Io { .. } | MountedError::Target { .. } => false,
        }
    }
}

/// One volume to fill from a mounted image.
#[derive(Debug, Clone)]
pub struct MountedRequest {
    /// Where the image volume is mounted (the image's root).
    pub source_dir: PathBuf,
    /// What lands on the volume.
    pub format: DiskFormat,
    /// A file (Filesystem volume) or a block device (Block volume).
    pub target: PathBuf,
    /// Bytes a file target ends up with (raw: its length; qcow2: its virtual size).
    pub size: Option<u64>,
    /// Owner of a file target.
    pub owner: Option<(u32, u32)>,
}

/// How a fill from a mounted image went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedReport {
    pub disk: PathBuf,
    pub source_format: String,
    pub virtual_size: u64,
    /// The target's size afterwards.
    pub target_size: u64,
}

/// The image's disk file: the one entry of `disk/`, a regular file (never followed through a
/// link, which could point at the pod's own files, such as its token).
pub fn find_disk(source_dir: &Path) -> Result<PathBuf, MountedError> {
    let dir = source_dir.join(DISK_DIR);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| MountedError::Io { path, source }
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountedError::NoDiskDir {
                dir: source_dir.display().to_string(),
            })
        }
        Err(e) => return Err(io(&dir)(e)),
    };
    let entries: Vec<_> = entries
        .take(2)
        .collect::<Result<_, _>>()
        .map_err(io(&dir))?;
    let [entry] = entries.as_slice() else {
        return Err(MountedError::NotOneDisk {
            dir: dir.display().to_string(),
            count: entries.len(),
        });
    };
    let path = entry.path();
    let kind = std::fs::symlink_metadata(&path).map_err(io(&path))?;
    if !kind.file_type().is_file() {
        return Err(MountedError::NotAFile {
            path: path.display().to_string(),
        });
    }
    Ok(path)
}

fn device_size(path: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(path)?.seek(SeekFrom::End(0))
}

/// Fills `request.target` from the mounted image.
pub async fn populate_from_mounted(
    request: &MountedRequest,
) -> Result<MountedReport, MountedError> {
    let disk = find_disk(&request.source_dir)?;
    let converting = |source| MountedError::Convert {
        path: disk.display().to_string(),
        source,
    };
    let info = convert::inspect(&disk).await.map_err(converting)?;
    convert::check_safe(&info).map_err(converting)?;
    let target_name = request.target.display().to_string();
    let writing = |source| MountedError::Target {
        target: target_name.clone(),
        source,
    };
    let block = is_block_device(&request.target);
    let room = if block {
        Some(device_size(&request.target).map_err(writing)?)
    } else {
        request.size
    };
    if let Some(room) = room.filter(|room| *room < info.virtual_size) {
        return Err(MountedError::DiskTooLarge {
            disk: info.virtual_size,
            room,
            target: target_name,
        });
    }
    // A block device keeps its size and is written whole (zeros included: its old content
    // must not show through); a file is made by qemu-img, sparse.
    let format = if block {
        DiskFormat::Raw
    } else {
        request.format
    };
    convert::convert_to(&disk, &info.format, &request.target, format, block)
        .await
        .map_err(converting)?;
    let mut target_size = room.unwrap_or(info.virtual_size);
    if !block {
        match format {
            DiskFormat::Raw => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&request.target)
                    .map_err(writing)?;
                target_size = target_size.max(file.metadata().map_err(writing)?.len());
                file.set_len(target_size).map_err(writing)?;
                file.sync_all().map_err(writing)?;
            }
            DiskFormat::Qcow2 => {
                if target_size > info.virtual_size {
                    convert::resize(&request.target, target_size)
                        .await
                        .map_err(converting)?;
                }
            }
        }
        if let Some((uid, gid)) = request.owner {
            std::os::unix::fs::chown(&request.target, Some(uid), Some(gid)).map_err(writing)?;
        }
    }
    Ok(MountedReport {
        disk,
        source_format: info.format,
        virtual_size: info.virtual_size,
        target_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// A containerDisk's root with `disk/<name>` made by `qemu-img create` and one block of data.
    fn image_root(format: &str, name: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(DISK_DIR)).unwrap();
        let raw = root.path().join("seed.raw");
        let mut data = vec![0u8; 8 << 20];
        data[(1 << 20)..(1 << 20) + 4096].fill(0x5a);
        std::fs::write(&raw, &data).unwrap();
        let disk = root.path().join(DISK_DIR).join(name);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            raw.to_str().unwrap(),
            disk.to_str().unwrap(),
        ]);
        root
    }

    #[tokio::test]
    async fn a_qcow2_or_raw_disk_lands_on_a_file_sized_sparse_and_equal() {
        for (format, name, into) in [
            ("qcow2", "disk.qcow2", DiskFormat::Raw),
            ("raw", "disk.img", DiskFormat::Raw),
            ("qcow2", "disk.qcow2", DiskFormat::Qcow2),
        ] {
            let root = image_root(format, name);
            let out = tempfile::tempdir().unwrap();
            let target = out.path().join("disk.img");
            let report = populate_from_mounted(&MountedRequest {
                source_dir: root.path().to_path_buf(),
                format: into,
                target: target.clone(),
                size: Some(16 << 20),
                owner: None,
            })
            .await
            .unwrap();
            assert_eq!(report.source_format, format);
            assert_eq!(report.virtual_size, 8 << 20);
            assert_eq!(report.target_size, 16 << 20);
            let info = convert::inspect(&target).await.unwrap();
            assert_eq!(
                (info.format.as_str(), info.virtual_size),
                (into.as_str(), 16 << 20)
            );
            // The first 8 MiB equal the source; the growth reads as zeros.
            let seed = root.path().join("seed.raw");
            let head = out.path().join("head.raw");
            qemu_img(&[
                "convert",
                "-f",
                into.as_str(),
                "-O",
                "raw",
                target.to_str().unwrap(),
                head.to_str().unwrap(),
            ]);
            let bytes = std::fs::read(&head).unwrap();
            assert_eq!(&bytes[..8 << 20], std::fs::read(&seed).unwrap().as_slice());
            assert!(bytes[8 << 20..].iter().all(|b| *b == 0));
            if into == DiskFormat::Raw {
                use std::os::unix::fs::MetadataExt;
                let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
                assert!(allocated < 1 << 20, "sparse: {allocated} bytes allocated");
            }
        }
    }

    /// A block device is written in place: the disk's zeros too (the device held 0x5a), its
    /// size kept; a device smaller than the disk is refused untouched.
    #[tokio::test]
    async fn a_qcow2_disk_lands_on_a_block_device_zeros_included() {
        let root = image_root("qcow2", "disk.qcow2");
        let backing = root.path().join("device");
        std::fs::write(&backing, vec![0x5au8; 12 << 20]).unwrap();
        let device = match crate::populate::loop_device::LoopDevice::attach(&backing) {
            Ok(d) => d,
            Err(reason) => {
                eprintln!("skipping the block-device test: {reason}");
                return;
            }
        };
        let report = populate_from_mounted(&MountedRequest {
            source_dir: root.path().to_path_buf(),
            format: DiskFormat::Qcow2,
            target: device.path().to_path_buf(),
            size: None,
            owner: Some((107, 107)),
        })
        .await
        .unwrap();
        assert_eq!(report.target_size, 12 << 20, "the device's size");
        let written = std::fs::read(device.path()).unwrap();
        let seed = std::fs::read(root.path().join("seed.raw")).unwrap();
        assert_eq!(
            &written[..8 << 20],
            seed.as_slice(),
            "raw on a device, zeros written"
        );
        assert!(
            written[8 << 20..].iter().all(|b| *b == 0x5a),
            "beyond the disk: untouched"
        );

        let small_backing = root.path().join("small");
        std::fs::write(&small_backing, vec![0x5au8; 4 << 20]).unwrap();
        let small = crate::populate::loop_device::LoopDevice::attach(&small_backing).unwrap();
        let e = populate_from_mounted(&MountedRequest {
            source_dir: root.path().to_path_buf(),
            format: DiskFormat::Raw,
            target: small.path().to_path_buf(),
            size: None,
            owner: None,
        })
        .await
        .unwrap_err();
        assert!(
            matches!(e, MountedError::DiskTooLarge { room, .. } if room == 4 << 20),
            "{e}"
        );
        assert!(std::fs::read(small.path())
            .unwrap()
            .iter()
            .all(|b| *b == 0x5a));
    }

    #[tokio::test]
    async fn what_is_not_one_plain_disk_file_is_refused_for_good() {
        let request = |root: &Path, target: &Path| MountedRequest {
            source_dir: root.to_path_buf(),
            format: DiskFormat::Raw,
            target: target.to_path_buf(),
            size: Some(64 << 20),
            owner: None,
        };
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("disk.img");

        let empty = tempfile::tempdir().unwrap();
        let e = populate_from_mounted(&request(empty.path(), &target))
            .await
            .unwrap_err();
        assert!(
            matches!(e, MountedError::NoDiskDir { .. }) && e.is_permanent(),
            "{e}"
        );

        let two = image_root("raw", "a.img");
        std::fs::write(two.path().join(DISK_DIR).join("b.img"), b"x").unwrap();
        let e = populate_from_mounted(&request(two.path(), &target))
            .await
            .unwrap_err();
        assert!(
            matches!(e, MountedError::NotOneDisk { count: 2, .. }) && e.is_permanent(),
            "{e}"
        );

        // A link to a file of the pod (its token, say) is never read.
        let linked = tempfile::tempdir().unwrap();
        std::fs::create_dir(linked.path().join(DISK_DIR)).unwrap();
        let secret = linked.path().join("token");
        std::fs::write(&secret, b"secret").unwrap();
        std::os::unix::fs::symlink(&secret, linked.path().join(DISK_DIR).join("disk.img")).unwrap();
        let e = populate_from_mounted(&request(linked.path(), &target))
            .await
            .unwrap_err();
        assert!(
            matches!(e, MountedError::NotAFile { .. }) && e.is_permanent(),
            "{e}"
        );
        assert!(!target.exists());

        // A qcow2 whose backing file is a host path.
        let backed = tempfile::tempdir().unwrap();
        std::fs::create_dir(backed.path().join(DISK_DIR)).unwrap();
        let disk = backed.path().join(DISK_DIR).join("disk.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
            disk.to_str().unwrap(),
            "1M",
        ]);
        let e = populate_from_mounted(&request(backed.path(), &target))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                MountedError::Convert {
                    source: ConvertError::BackingFile { .. },
                    ..
                }
            ) && e.is_permanent(),
            "{e}"
        );

        // A disk larger than the volume.
        let big = image_root("raw", "disk.img");
        let mut small = request(big.path(), &target);
        small.size = Some(4 << 20);
        let e = populate_from_mounted(&small).await.unwrap_err();
        assert!(
            matches!(e, MountedError::DiskTooLarge { disk, room, .. } if disk == 8 << 20 && room == 4 << 20),
            "{e}"
        );
        assert!(!target.exists());
    }
}
