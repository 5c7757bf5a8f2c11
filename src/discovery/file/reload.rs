//! One reload of every path: each file's last good objects kept while it has
//! errors, objects of vanished files dropped, duplicates across files reported.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;

use super::parse::{dedup, parse_located, Located};
use super::walk::list_files;
use super::ManifestError;
use crate::config::Limits;
use crate::model::Object;

/// Loads every path (files and directories) once: every error, and the objects
/// that [`FileSource::run`] would serve at start-up — the objects of every file
/// without errors (a file with an error contributes nothing, since it has no last
/// good version yet). A duplicate keeps its first definition. This is `ringvip check`.
pub fn load(paths: &[PathBuf], limits: &Limits) -> (Vec<Object>, Vec<ManifestError>) {
    FileSource::new(paths.to_vec(), limits.clone()).reload()
}

/// Manifests from files and directories, reloaded on change.
///
/// Keeps, per file, the objects of its last good load: a file with any error keeps
/// serving those (none if it never loaded cleanly) until it is fixed or deleted.
#[derive(Debug)]
pub struct FileSource {
    pub(super) paths: Vec<PathBuf>,
    limits: Limits,
    /// Last good objects of each file.
    files: HashMap<PathBuf, Vec<Located>>,
    /// Files in load order (the order of `paths`, directories sorted).
    order: Vec<PathBuf>,
}

impl FileSource {
    /// A source for these files and directories; nothing is read yet.
    pub fn new(paths: Vec<PathBuf>, limits: Limits) -> Self {
        Self {
            paths,
            limits,
            files: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// Loads every path once. Per-file: a file with any error keeps its last good
    /// objects (none at first load) and the errors are returned. A file that is gone
    /// drops its objects. When two files define the same object, the first file in
    /// load order wins and the other definition is reported.
    pub fn reload(&mut self) -> (Vec<Object>, Vec<ManifestError>) {
        let listing = list_files(&self.paths);
        let mut errors = listing.errors;
        let mut previous = std::mem::take(&mut self.files);
        let mut files = HashMap::new();
        let mut order = Vec::new();
        for path in listing.files {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let origin = path.display().to_string();
                    let (objects, errs) = parse_located(&origin, &text, &self.limits);
                    if errs.is_empty() {
                        files.insert(path.clone(), objects);
                    } else {
                        errors.extend(errs);
                        if let Some(old) = previous.remove(&path) {
                            files.insert(path.clone(), old);
                        }
                    }
                    order.push(path);
                }
                // Deleted between listing and reading.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    if let Some(old) = previous.remove(&path) {
                        files.insert(path.clone(), old);
                    }
                    order.push(path.clone());
                    errors.push(ManifestError::Io { path, source: e });
                }
            }
        }
        // Files below a directory we could not list this time keep their objects.
        let mut kept: Vec<PathBuf> = previous
            .keys()
            .filter(|p| {
                !files.contains_key(*p) && listing.unreadable.iter().any(|u| p.starts_with(u))
            })
            .cloned()
            .collect();
        kept.sort();
        for p in kept {
            if let Some(old) = previous.remove(&p) {
                files.insert(p.clone(), old);
                order.push(p);
            }
        }
        self.files = files;
        self.order = order;

        let all: Vec<Located> = self
            .order
            .iter()
            .filter_map(|p| self.files.get(p))
            .flatten()
            .cloned()
            .collect();
        let objects = dedup(all, &mut errors)
            .into_iter()
            .map(|l| l.object)
            .collect();
        (objects, errors)
    }
}
