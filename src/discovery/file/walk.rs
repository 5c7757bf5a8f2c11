//! Which files the configured paths name: files as given, directories
//! recursively (sorted, hidden entries skipped, symlink loops cut).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use super::ManifestError;

/// Whether a directory entry is a manifest by its name.
pub(super) fn is_manifest_name(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        e.eq_ignore_ascii_case("yaml")
            || e.eq_ignore_ascii_case("yml")
            || e.eq_ignore_ascii_case("json")
    })
}

/// Whether a directory entry is skipped by its name (`.git`, `..data`).
pub(super) fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The files the configured paths name right now.
#[derive(Default)]
pub(super) struct Listing {
    /// Files in load order.
    pub(super) files: Vec<PathBuf>,
    /// Errors listing paths.
    pub(super) errors: Vec<ManifestError>,
    /// Paths that could not be listed for a reason other than not existing: the
    /// files below them keep their last good objects.
    pub(super) unreadable: Vec<PathBuf>,
    /// Whether a path given or an entry met is a symlink.
    pub(super) linked: bool,
}

pub(super) fn list_files(paths: &[PathBuf]) -> Listing {
    let mut l = Listing::default();
    let mut seen = HashSet::new();
    let mut visited_dirs = HashSet::new();
    for p in paths {
        l.linked |= std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
        match std::fs::metadata(p) {
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    l.unreadable.push(p.clone());
                }
                l.errors.push(ManifestError::Io {
                    path: p.clone(),
                    source: e,
                });
            }
            Ok(m) if m.is_dir() => walk(p, &mut l, &mut seen, &mut visited_dirs),
            Ok(_) => {
                if seen.insert(p.clone()) {
                    l.files.push(p.clone());
                }
            }
        }
    }
    l
}

fn walk(dir: &Path, l: &mut Listing, seen: &mut HashSet<PathBuf>, visited: &mut HashSet<PathBuf>) {
    // Symlinked directories may form loops: visit each real directory once.
    let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !visited.insert(real) {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            l.unreadable.push(dir.to_path_buf());
            l.errors.push(ManifestError::Io {
                path: dir.to_path_buf(),
                source: e,
            });
            return;
        }
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !is_hidden(&e.file_name()))
        .inspect(|e| l.linked |= e.file_type().is_ok_and(|t| t.is_symlink()))
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names {
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, l, seen, visited),
            Ok(_) => {
                if is_manifest_name(&path) && seen.insert(path.clone()) {
                    l.files.push(path);
                }
            }
            // Vanished meanwhile: gone. A dangling symlink with a manifest name is
            // worth a word.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if is_manifest_name(&path) && std::fs::symlink_metadata(&path).is_ok() {
                    l.errors.push(ManifestError::Io { path, source: e });
                }
            }
            Err(e) => {
                if is_manifest_name(&path) {
                    l.unreadable.push(path.clone());
                    l.errors.push(ManifestError::Io { path, source: e });
                }
            }
        }
    }
}
