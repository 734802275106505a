//! Extraction on real tar layers: compressions, whiteouts, holes, hostile entries (nothing
//! escapes staging), size limits, corrupt streams and progress.

use super::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

/// A raw header with any path bytes (the tar builder refuses `..` and absolute paths).
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    builder.append(&h, data).unwrap();
}

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        raw_entry(&mut b, path, tar::EntryType::Regular, None, data);
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn layer(&self, n: usize, bytes: &[u8], compression: LayerCompression) -> LayerFile {
        let path = self.dir.path().join(format!("layer{n}"));
        std::fs::write(&path, bytes).unwrap();
        LayerFile { path, compression }
    }
    fn staging(&self) -> PathBuf {
        self.dir.path().join("staging")
    }
    fn run(&self, layers: &[LayerFile]) -> Result<ExtractedDisk, ExtractError> {
        extract_disk(
            layers,
            &self.staging(),
            &ExtractLimits {
                max_disk_bytes: 64 << 20,
                ..ExtractLimits::default()
            },
            &mut |_| {},
        )
    }
    /// Everything in the temp dir outside staging (layers only, if nothing escaped).
    fn outside_staging(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "staging" && !n.starts_with("layer"))
            .collect();
        names.sort();
        names
    }
}

fn disk_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(256 << 10).enumerate() {
        if i % 3 == 0 {
            for (j, b) in chunk.iter_mut().enumerate().take(100_000) {
                *b = (i * 31 + j) as u8 | 1;
            }
        }
    }
    v
}

#[test]
fn media_types() {
    use LayerCompression::*;
    assert_eq!(
        LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip").unwrap(),
        Gzip
    );
    assert_eq!(
        LayerCompression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
            .unwrap(),
        Gzip
    );
    assert_eq!(
        LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
        Zstd
    );
    assert_eq!(
        LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar").unwrap(),
        None
    );
    assert!(LayerCompression::from_media_type("application/json").is_err());
}

#[test]
fn gzip_zstd_and_plain_layers_yield_the_same_disk() {
    let data = disk_bytes(4 << 20);
    let tar = tar_of(&[
        ("disk/", b""),
        ("disk/disk.img", &data),
        ("other/readme", b"hi"),
    ]);
    let zst = zstd::encode_all(&tar[..], 1).unwrap();
    for (bytes, c) in [
        (gzip(&tar), LayerCompression::Gzip),
        (zst, LayerCompression::Zstd),
        (tar.clone(), LayerCompression::None),
    ] {
        let s = Setup::new();
        let d = s.run(&[s.layer(0, &bytes, c)]).unwrap();
        assert_eq!(d.name, "disk.img");
        assert_eq!(std::fs::read(&d.path).unwrap(), data, "{c:?}");
        assert!(
            !s.staging().join("other").exists(),
            "non-disk entries are not written"
        );
    }
}

#[test]
fn dot_slash_prefix_is_accepted() {
    let s = Setup::new();
    let d = s
        .run(&[s.layer(
            0,
            &tar_of(&[("./disk/x.qcow2", b"abc")]),
            LayerCompression::None,
        )])
        .unwrap();
    assert_eq!(d.name, "x.qcow2");
    assert_eq!(std::fs::read(d.path).unwrap(), b"abc");
}

#[test]
fn zero_runs_become_holes() {
    let mut data = vec![0u8; 32 << 20];
    data[..1 << 20].fill(7);
    data[20 << 20..(21 << 20)].fill(9);
    let s = Setup::new();
    let d = s
        .run(&[s.layer(
            0,
            &gzip(&tar_of(&[("disk/d.raw", &data)])),
            LayerCompression::Gzip,
        )])
        .unwrap();
    assert_eq!(d.apparent_size, 32 << 20);
    assert!(
        d.allocated_bytes <= 3 << 20,
        "allocated {} of 32 MiB",
        d.allocated_bytes
    );
    assert_eq!(std::fs::read(&d.path).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&d.path).unwrap().blocks() * 512,
        d.allocated_bytes
    );
}

#[test]
fn later_layers_white_out_and_replace_disks() {
    let s = Setup::new();
    let l1 = s.layer(
        0,
        &tar_of(&[("disk/old.img", b"old")]),
        LayerCompression::None,
    );
    let l2 = s.layer(
        1,
        &tar_of(&[("disk/.wh.old.img", b""), ("disk/new.img", b"new")]),
        LayerCompression::None,
    );
    let d = s.run(&[l1.clone(), l2]).unwrap();
    assert_eq!(
        (d.name.as_str(), std::fs::read(&d.path).unwrap()),
        ("new.img", b"new".to_vec())
    );
    assert!(!s.staging().join("disk/old.img").exists());

    let s = Setup::new();
    let l1 = s.layer(
        0,
        &tar_of(&[("disk/a.img", b"a"), ("disk/b.img", b"b")]),
        LayerCompression::None,
    );
    let l2 = s.layer(
        1,
        &tar_of(&[("disk/.wh..wh..opq", b""), ("disk/c.img", b"c")]),
        LayerCompression::None,
    );
    assert_eq!(s.run(&[l1, l2]).unwrap().name, "c.img");
}

#[test]
fn no_disk_and_several_disks_are_refused() {
    let s = Setup::new();
    assert!(matches!(
        s.run(&[s.layer(0, &tar_of(&[("etc/x", b"1")]), LayerCompression::None)]),
        Err(ExtractError::NoDisk)
    ));
    let s = Setup::new();
    match s.run(&[s.layer(
        0,
        &tar_of(&[("disk/a", b"1"), ("disk/b", b"2")]),
        LayerCompression::None,
    )]) {
        Err(ExtractError::MultipleDisks { names }) => assert_eq!(names, ["a", "b"]),
        other => panic!("{other:?}"),
    }
}

fn hostile(
    entries: &[(&str, tar::EntryType, Option<&str>)],
) -> (Setup, Result<ExtractedDisk, ExtractError>) {
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(
        &mut b,
        "disk/ok.img",
        tar::EntryType::Regular,
        None,
        b"fine",
    );
    for (path, kind, link) in entries {
        raw_entry(
            &mut b,
            path,
            *kind,
            *link,
            if kind.is_file() { b"evil" } else { b"" },
        );
    }
    let s = Setup::new();
    let l = s.layer(0, &b.into_inner().unwrap(), LayerCompression::None);
    let r = s.run(&[l]);
    (s, r)
}

#[test]
fn hostile_entries_are_refused_and_nothing_escapes() {
    use tar::EntryType as T;
    type Case<'a> = (
        Vec<(&'a str, T, Option<&'a str>)>,
        fn(&ExtractError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (vec![("/etc/passwd", T::Regular, None)], |e| {
            matches!(e, ExtractError::AbsolutePath { .. })
        }),
        (vec![("../escape", T::Regular, None)], |e| {
            matches!(e, ExtractError::PathTraversal { .. })
        }),
        (vec![("disk/../../escape", T::Regular, None)], |e| {
            matches!(e, ExtractError::PathTraversal { .. })
        }),
        (vec![("link", T::Symlink, Some("/etc/shadow"))], |e| {
            matches!(e, ExtractError::EscapingLink { .. })
        }),
        (vec![("a/link", T::Symlink, Some("../../etc"))], |e| {
            matches!(e, ExtractError::EscapingLink { .. })
        }),
        (vec![("hard", T::Link, Some("../outside"))], |e| {
            matches!(e, ExtractError::EscapingLink { .. })
        }),
        (vec![("disk/link.img", T::Symlink, Some("ok.img"))], |e| {
            matches!(e, ExtractError::LinkInDisk { .. })
        }),
        (vec![("x", T::Link, Some("disk/ok.img"))], |e| {
            matches!(e, ExtractError::LinkInDisk { .. })
        }),
        (vec![("dev/sda", T::Block, None)], |e| {
            matches!(e, ExtractError::DeviceNode { .. })
        }),
        (vec![("dev/tty", T::Char, None)], |e| {
            matches!(e, ExtractError::DeviceNode { .. })
        }),
        (vec![("pipe", T::Fifo, None)], |e| {
            matches!(e, ExtractError::DeviceNode { .. })
        }),
        (vec![("disk/sub/x.img", T::Regular, None)], |e| {
            matches!(e, ExtractError::NestedDiskFile { .. })
        }),
        (vec![("disk/second.img", T::Regular, None)], |e| {
            matches!(e, ExtractError::MultipleDisks { .. })
        }),
    ];
    for (entries, expected) in cases {
        let (s, r) = hostile(&entries);
        let err = r.expect_err(&format!("{entries:?} must be refused"));
        assert!(expected(&err), "{entries:?}: wrong error {err}");
        assert!(!err.to_string().is_empty());
        assert_eq!(
            s.outside_staging(),
            Vec::<String>::new(),
            "{entries:?} wrote outside staging"
        );
    }
    // Links elsewhere that stay inside are fine.
    let (_, r) = hostile(&[("etc/alias", tar::EntryType::Symlink, Some("../etc/x"))]);
    r.unwrap();
}

#[test]
fn oversized_disk_is_refused_before_writing() {
    let s = Setup::new();
    let data = vec![1u8; 2 << 20];
    let l = s.layer(
        0,
        &tar_of(&[("disk/big.img", &data)]),
        LayerCompression::None,
    );
    let r = extract_disk(
        &[l],
        &s.staging(),
        &ExtractLimits {
            max_disk_bytes: 1 << 20,
            ..ExtractLimits::default()
        },
        &mut |_| {},
    );
    match r {
        Err(ExtractError::DiskTooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (2 << 20, 1 << 20))
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.staging().join("disk/big.img").exists());
}

#[test]
fn a_layer_inflating_far_past_its_disk_is_refused() {
    // 24 MiB of zeros in a file nobody uses: 24 KiB of gzip, inflated and skipped only up to
    // the layer's limit (here 1 MiB of disk plus 8 MiB of slack).
    let s = Setup::new();
    let junk = vec![0u8; 24 << 20];
    let gz = gzip(&tar_of(&[
        ("junk/filler", &junk),
        ("disk/d", &disk_bytes(1 << 20)),
    ]));
    assert!(gz.len() < 1 << 20);
    let limits = ExtractLimits {
        max_disk_bytes: 1 << 20,
        layer_slack_bytes: 8 << 20,
        ..ExtractLimits::default()
    };
    let r = extract_disk(
        &[s.layer(0, &gz, LayerCompression::Gzip)],
        &s.staging(),
        &limits,
        &mut |_| {},
    );
    match r {
        Err(e @ ExtractError::LayerTooLarge { layer: 0, .. }) => {
            assert!(
                e.to_string()
                    .contains("inflates to more than 9437184 bytes"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The same layer under the default slack is fine.
    extract_disk(
        &[s.layer(1, &gz, LayerCompression::Gzip)],
        &s.dir.path().join("staging2"),
        &ExtractLimits {
            max_disk_bytes: 1 << 20,
            ..ExtractLimits::default()
        },
        &mut |_| {},
    )
    .unwrap();
}

/// A PAX extension record of `len` bytes (`path` of a junk file), ahead of entry `path`.
fn with_pax_path(builder: &mut tar::Builder<Vec<u8>>, len: usize) {
    let value = "j".repeat(len);
    builder
        .append_pax_extensions([("path", value.as_bytes())])
        .unwrap();
    raw_entry(builder, "junk/x", tar::EntryType::Regular, None, b"junk");
}

#[test]
fn extension_headers_are_bounded_and_skipped_entries_are_not_counted_as_headers() {
    let s = Setup::new();
    let disk = disk_bytes(1 << 20);
    // A long name within the bound, and a 6 MiB file nobody uses: the file is read outside
    // the headers' budget.
    let mut b = tar::Builder::new(Vec::new());
    with_pax_path(&mut b, 512 << 10);
    raw_entry(
        &mut b,
        "junk/big",
        tar::EntryType::Regular,
        None,
        &vec![7u8; 6 << 20],
    );
    raw_entry(&mut b, "disk/d", tar::EntryType::Regular, None, &disk);
    let ok = gzip(&b.into_inner().unwrap());
    let extracted = s.run(&[s.layer(0, &ok, LayerCompression::Gzip)]).unwrap();
    assert_eq!(std::fs::read(&extracted.path).unwrap(), disk);

    // A 2 MiB PAX record (a hostile layer may claim gigabytes: the tar crate would hold them
    // all): refused at the bound, with the layer named.
    let s = Setup::new();
    let mut b = tar::Builder::new(Vec::new());
    with_pax_path(&mut b, 2 << 20);
    raw_entry(&mut b, "disk/d", tar::EntryType::Regular, None, &disk);
    let hostile = gzip(&b.into_inner().unwrap());
    match s.run(&[s.layer(0, &hostile, LayerCompression::Gzip)]) {
        Err(e @ ExtractError::HeadersTooLarge { layer: 0, limit }) => {
            assert_eq!(limit, MAX_ENTRY_HEADER_BYTES);
            assert!(
                e.to_string()
                    .contains("over 1048576 bytes before one entry"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupt_streams_are_reported_per_layer() {
    let s = Setup::new();
    let mut gz = gzip(&tar_of(&[("disk/d", &disk_bytes(1 << 20))]));
    gz.truncate(gz.len() / 2);
    match s.run(&[s.layer(0, &gz, LayerCompression::Gzip)]) {
        Err(ExtractError::Corrupt {
            layer: 0,
            compression: "gzip",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn progress_reaches_the_compressed_total() {
    let s = Setup::new();
    let gz = gzip(&tar_of(&[("disk/d", &disk_bytes(2 << 20))]));
    let total = gz.len() as u64;
    let l = s.layer(0, &gz, LayerCompression::Gzip);
    let mut last = 0;
    extract_disk(&[l], &s.staging(), &ExtractLimits::default(), &mut |n| {
        last = n
    })
    .unwrap();
    assert_eq!(last, total);
}
