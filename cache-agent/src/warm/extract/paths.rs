//! Where a tar entry sits and whether it stays inside the image: paths are normalised (`./`
//! dropped; absolute paths and `..` refused) and placed relative to `disk/`, and a link's
//! target is followed far enough to know whether it climbs out of the image root.

use std::path::{Component, Path};

use super::ExtractError;

/// Where an entry sits, after normalising `./` away.
pub(super) enum Place {
    /// `disk/<name>`
    Disk(String),
    /// `disk/<name>/...`
    NestedInDisk,
    /// The `disk` directory itself.
    DiskDir,
    Elsewhere,
}

pub(super) fn normalise(layer: usize, raw: &[u8]) -> Result<Vec<String>, ExtractError> {
    let text = String::from_utf8_lossy(raw).into_owned();
    if text.starts_with('/') {
        return Err(ExtractError::AbsolutePath { layer, entry: text });
    }
    let mut parts = Vec::new();
    for c in Path::new(&text).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ExtractError::PathTraversal { layer, entry: text });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ExtractError::AbsolutePath { layer, entry: text });
            }
        }
    }
    Ok(parts)
}

pub(super) fn place(parts: &[String]) -> Place {
    match parts {
        [d] if d == "disk" => Place::DiskDir,
        [d, name] if d == "disk" => Place::Disk(name.clone()),
        [d, _, ..] if d == "disk" => Place::NestedInDisk,
        _ => Place::Elsewhere,
    }
}

/// True when a link at `parts` pointing to `target` stays inside the image root.
pub(super) fn link_stays_inside(parts: &[String], target: &[u8], hard: bool) -> bool {
    let target = String::from_utf8_lossy(target);
    if target.starts_with('/') {
        return false;
    }
    // Symlinks resolve from the link's directory, hardlinks from the root.
    let mut depth: i64 = if hard { 0 } else { parts.len() as i64 - 1 };
    for c in Path::new(target.as_ref()).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    true
}
