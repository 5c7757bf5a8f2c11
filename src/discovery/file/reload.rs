//! One reload of every path: each file's last good objects kept while it has
//! errors, objects of vanished files dropped, duplicates across files reported.
//!
//! A reload costs what changed, not what the files hold: a file whose
//! metadata (device, inode, size, modification and change times) is what it
//! was at its last clean parse is not read again, and only the objects of
//! the files that changed are compared with what was handed out before, so a
//! one-line edit among 100,000 Services is one parse of one file and one
//! update (`reload_changes`). At 10,000 Services with 100,000 Pods in 100
//! files, every change re-parsed all 22 MB and replaced the store's whole
//! set: 7.4 s per change.
//!
//! When the file watcher names the paths that changed, `reload_touched`
//! goes further and looks only at those files: no listing, no `stat` of
//! the others, so a change costs the same with 10 files or 100,000. It
//! falls back to the full reload whenever the names could hide a change
//! elsewhere (a new or removed manifest, a directory, a symlink among the
//! files, errors to report again).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::chunks::{parse_yaml, Delta, Runs};
use super::parse::{is_json, parse_located, Located};
use super::walk::{is_hidden, is_manifest_name, list_files};
use super::ManifestError;
use crate::config::Limits;
use crate::discovery::{convert, print, Print, Update};
use crate::model::{Kind, Object, ObjectKey};

/// Loads every path (files and directories) once: every error, and the objects
/// that [`FileSource::run`] would serve at start-up — the objects of every file
/// without errors (a file with an error contributes nothing, since it has no last
/// good version yet). A duplicate keeps its first definition. This is `ringvip check`.
pub fn load(paths: &[PathBuf], limits: &Limits) -> (Vec<Object>, Vec<ManifestError>) {
    FileSource::new(paths.to_vec(), limits.clone()).reload()
}

/// An object's identity across files.
pub(super) type Id = (Kind, ObjectKey);

/// What a file's metadata says of its content: equal stamps, equal content
/// (a write changes the change time, which no tool can set back; a file
/// replaced by a rename is another inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the file may have been written again within the same clock
    /// tick as it was stamped at `at` (the file system's clock is coarse):
    /// such a stamp proves nothing and the file is read again next time (as
    /// git does).
    fn racy(&self, at: SystemTime) -> bool {
        let since = at
            .checked_sub(RACY)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let ctime = Duration::new(
            u64::try_from(self.ctime.0).unwrap_or(0),
            u32::try_from(self.ctime.1).unwrap_or(0),
        );
        ctime >= since
    }
}

/// How recent a change time must be for its stamp not to be trusted.
const RACY: Duration = Duration::from_secs(1);

/// One file as last loaded.
#[derive(Debug, Default)]
struct FileEntry {
    /// Its stamp at its last clean parse; `None` while it has errors or its
    /// stamp was too recent to trust: then it is read again.
    stamp: Option<Stamp>,
    /// Its last good objects (none if it never loaded cleanly).
    good: Vec<Located>,
    /// Which of `good` each run of its text gave (YAML), so that the next
    /// parse reads only the runs that changed.
    runs: Runs,
}

/// A file whose objects may differ now.
struct Changed {
    path: PathBuf,
    /// The ids it no longer defines, or may define differently.
    old_ids: Vec<Id>,
    /// The ids it defines that may be new or different; `None`: all of them.
    new_ids: Option<Vec<Id>>,
}

impl FileEntry {
    /// Takes the file's new `text` (read with `stamp`, kept when it can be
    /// trusted): parsed, reusing what its unchanged documents gave (YAML),
    /// it becomes the entry's objects, and what changed is returned. When
    /// the parse finds errors they go to `errors`, and the last good objects
    /// stay without a stamp (the file is read again next time).
    fn reread(
        &mut self,
        path: &Path,
        text: &str,
        stamp: Option<Stamp>,
        limits: &Limits,
        errors: &mut Vec<ManifestError>,
    ) -> Option<Changed> {
        let origin = path.display().to_string();
        let (objects, errs, runs, delta) = if is_json(&origin) {
            let (objects, errs) = parse_located(&origin, text, limits);
            (objects, errs, Runs::default(), None)
        } else {
            // Leaves `good` as it was unless only some documents were parsed.
            parse_yaml(&origin, text, limits, Some((&mut self.good, &self.runs)))
        };
        if !errs.is_empty() {
            self.stamp = None;
            errors.extend(errs);
            return None;
        }
        let c = changed(path, delta, self);
        (self.stamp, self.good, self.runs) = (stamp, objects, runs);
        Some(c)
    }
}

/// The ids a change of `path` touched: those of the documents parsed
/// again and of those gone when `delta` says which; else every id the
/// file had (`old`) and has.
fn changed(path: &Path, delta: Option<Delta>, old: &FileEntry) -> Changed {
    match delta {
        Some(d) => Changed {
            path: path.to_path_buf(),
            old_ids: d.dropped,
            new_ids: Some(d.added),
        },
        None => Changed {
            path: path.to_path_buf(),
            old_ids: ids_of(old),
            new_ids: None,
        },
    }
}

/// What one reload changed.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// The objects whose first definition changed or went, for the store.
    pub updates: Vec<Update>,
    /// Every error of the files as they are now (reported each reload).
    pub errors: Vec<ManifestError>,
    /// How many files were read and parsed (the others were unchanged).
    pub parsed: usize,
    /// Whether every path was listed and every file's stamp looked at
    /// (not only the paths a watcher named).
    pub full: bool,
}

/// Manifests from files and directories, reloaded on change.
///
/// Keeps, per file, the objects of its last good load: a file with any error keeps
/// serving those (none if it never loaded cleanly) until it is fixed or deleted.
#[derive(Debug)]
pub struct FileSource {
    pub(super) paths: Vec<PathBuf>,
    limits: Limits,
    /// Each file's last load.
    files: HashMap<PathBuf, FileEntry>,
    /// Files in load order (the order of `paths`, directories sorted).
    order: Vec<PathBuf>,
    /// The files whose good objects define each object.
    defs: HashMap<Id, Vec<PathBuf>>,
    /// The print of each object as handed out: its first definition.
    sent: HashMap<Id, Print>,
    /// Objects defined more than once (reported every reload).
    dups: BTreeSet<Id>,
    /// Each file's place in `order`.
    pos: HashMap<PathBuf, usize>,
    /// The directories above the files in `order`.
    dirs: HashSet<PathBuf>,
    /// Whether the last listing met a symlink: a change of its target is
    /// seen under the target's name, so only a full reload is safe.
    linked: bool,
    /// Whether the last reload found no error: errors are reported every
    /// reload, and only a full reload finds them all again.
    clean: bool,
}

/// Each file's objects by identity (positions in its good list), built
/// only for the files a reload looks into; for a few ids, a scan of the
/// file instead (a one-object change in a file of thousands builds no map).
struct Index {
    maps: HashMap<PathBuf, HashMap<Id, Vec<usize>>>,
    scan: bool,
}

/// Up to how many ids a reload looks up by scanning.
const SCAN_UP_TO: usize = 16;

impl Index {
    fn for_ids(ids: usize) -> Self {
        Index {
            maps: HashMap::new(),
            scan: ids <= SCAN_UP_TO,
        }
    }

    /// Where `id` is defined in the file at `path`.
    fn at(&mut self, files: &HashMap<PathBuf, FileEntry>, path: &PathBuf, id: &Id) -> Vec<usize> {
        let good = files
            .get(path)
            .map(|f| f.good.as_slice())
            .unwrap_or_default();
        if self.scan {
            return good
                .iter()
                .enumerate()
                .filter(|(_, l)| l.object.has_id(id.0, &id.1))
                .map(|(i, _)| i)
                .collect();
        }
        let map = self.maps.entry(path.clone()).or_insert_with(|| {
            let mut m: HashMap<Id, Vec<usize>> = HashMap::new();
            for (i, l) in good.iter().enumerate() {
                m.entry(l.object.id()).or_default().push(i);
            }
            m
        });
        map.get(id).cloned().unwrap_or_default()
    }
}

impl FileSource {
    /// A source for these files and directories; nothing is read yet.
    pub fn new(paths: Vec<PathBuf>, limits: Limits) -> Self {
        Self {
            paths,
            limits,
            files: HashMap::new(),
            order: Vec::new(),
            defs: HashMap::new(),
            sent: HashMap::new(),
            dups: BTreeSet::new(),
            pos: HashMap::new(),
            dirs: HashSet::new(),
            linked: false,
            clean: false,
        }
    }

    /// Loads every path once. Per-file: a file with any error keeps its last good
    /// objects (none at first load) and the errors are returned. A file that is gone
    /// drops its objects. When two files define the same object, the first file in
    /// load order wins and the other definition is reported.
    pub fn reload(&mut self) -> (Vec<Object>, Vec<ManifestError>) {
        let r = self.reload_changes();
        (self.objects(), r.errors)
    }

    /// Every object served, in load order: each one's first definition.
    pub fn objects(&self) -> Vec<Object> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(self.sent.len());
        for l in self
            .order
            .iter()
            .filter_map(|p| self.files.get(p))
            .flat_map(|f| &f.good)
        {
            if seen.insert(l.object.id()) {
                out.push(l.object.clone());
            }
        }
        out
    }

    /// Number of objects served.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    /// True when nothing is served.
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Loads what changed since the last reload (see [`FileSource::reload`])
    /// and says which objects it changed.
    pub fn reload_changes(&mut self) -> Reloaded {
        let listing = list_files(&self.paths);
        let mut errors = listing.errors;
        let mut previous = std::mem::take(&mut self.files);
        let mut files = HashMap::new();
        let mut order = Vec::new();
        // Files whose good objects may differ now, with the ids they had.
        let mut changed: Vec<Changed> = Vec::new();
        let mut parsed = 0;
        for path in listing.files {
            let stamped_at = SystemTime::now();
            let stamp = std::fs::metadata(&path).map(|m| Stamp::of(&m));
            if let (Ok(s), Some(old)) = (&stamp, previous.get(&path)) {
                if old.stamp == Some(*s) {
                    if let Some(old) = previous.remove(&path) {
                        files.insert(path.clone(), old);
                    }
                    order.push(path);
                    continue;
                }
            }
            let read = stamp.and_then(|s| std::fs::read_to_string(&path).map(|t| (s, t)));
            match read {
                Ok((stamp, text)) => {
                    parsed += 1;
                    let mut entry = previous.remove(&path).unwrap_or_default();
                    let stamp = (!stamp.racy(stamped_at)).then_some(stamp);
                    changed.extend(entry.reread(&path, &text, stamp, &self.limits, &mut errors));
                    files.insert(path.clone(), entry);
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
        // What is left of the previous files is gone.
        for (p, old) in previous {
            changed.push(self::changed(&p, None, &old));
        }
        self.files = files;
        self.pos = order
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i))
            .collect();
        self.dirs = order
            .iter()
            .flat_map(|p| p.ancestors().skip(1))
            .map(PathBuf::from)
            .collect();
        self.order = order;
        self.linked = listing.linked;
        let mut r = self.finish(changed, errors, parsed);
        r.full = true;
        r
    }

    /// Loads what changed among the `touched` paths (as a file watcher
    /// names them) and says which objects it changed: the same result as
    /// [`FileSource::reload_changes`], which it falls back to when the
    /// names alone cannot tell what changed.
    pub fn reload_touched(&mut self, touched: &HashSet<PathBuf>) -> Reloaded {
        if !self.scoped(touched) {
            return self.reload_changes();
        }
        let mut errors = Vec::new();
        let mut changed: Vec<Changed> = Vec::new();
        let mut parsed = 0;
        for path in touched {
            let Some(old) = self.files.get_mut(path) else {
                continue; // a name that cannot be a manifest (see `scoped`)
            };
            let stamped_at = SystemTime::now();
            let read = std::fs::metadata(path)
                .map(|m| Stamp::of(&m))
                .and_then(|s| {
                    if old.stamp == Some(s) {
                        Ok(None)
                    } else {
                        std::fs::read_to_string(path).map(|t| Some((s, t)))
                    }
                });
            match read {
                Ok(None) => {}
                Ok(Some((stamp, text))) => {
                    parsed += 1;
                    let stamp = (!stamp.racy(stamped_at)).then_some(stamp);
                    changed.extend(old.reread(path, &text, stamp, &self.limits, &mut errors));
                }
                // Removed since the event: the listing must say so.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return self.reload_changes(),
                Err(e) => {
                    old.stamp = None;
                    errors.push(ManifestError::Io {
                        path: path.clone(),
                        source: e,
                    });
                }
            }
        }
        self.finish(changed, errors, parsed)
    }

    /// Whether looking at the `touched` paths alone finds every change:
    /// each is a file loaded before, or a name that is no manifest and no
    /// directory (an editor's or a tool's temporary file), and nothing
    /// loaded is reached through a symlink.
    pub(super) fn scoped(&self, touched: &HashSet<PathBuf>) -> bool {
        if !self.clean || self.linked || touched.is_empty() {
            return false;
        }
        touched.iter().all(|p| {
            if self.files.contains_key(p) {
                return true;
            }
            let named = is_manifest_name(p) && !p.file_name().is_some_and(is_hidden);
            let plain = match std::fs::symlink_metadata(p) {
                Ok(m) => m.is_file(),
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            !named && plain && !self.dirs.contains(p)
        })
    }

    /// Hands out what the `changed` files changed, with every error of this
    /// reload (duplicates included).
    fn finish(
        &mut self,
        changed: Vec<Changed>,
        mut errors: Vec<ManifestError>,
        parsed: usize,
    ) -> Reloaded {
        let affected = self.refile(changed);
        let mut index = Index::for_ids(affected.len() + self.dups.len());
        let updates = self.hand_out(&affected, &mut index);
        errors.extend(self.duplicates(&mut index));
        self.clean = errors.is_empty();
        Reloaded {
            updates,
            errors,
            parsed,
            full: false,
        }
    }

    /// Moves the definitions of the `changed` files to what they hold now;
    /// returns every id they had or have.
    fn refile(&mut self, changed: Vec<Changed>) -> BTreeSet<Id> {
        let mut affected = BTreeSet::new();
        for Changed {
            path,
            old_ids,
            new_ids,
        } in changed
        {
            for id in old_ids {
                if let Some(d) = self.defs.get_mut(&id) {
                    d.retain(|p| *p != path);
                    if d.is_empty() {
                        self.defs.remove(&id);
                    }
                }
                affected.insert(id);
            }
            let now =
                new_ids.unwrap_or_else(|| self.files.get(&path).map(ids_of).unwrap_or_default());
            for id in now {
                let d = self.defs.entry(id.clone()).or_default();
                if !d.contains(&path) {
                    d.push(path.clone());
                }
                affected.insert(id);
            }
        }
        affected
    }

    /// For each of `affected`, the first definition in load order against
    /// what was handed out: the updates that tell the difference. Also
    /// notes which of them are defined more than once.
    fn hand_out(&mut self, affected: &BTreeSet<Id>, index: &mut Index) -> Vec<Update> {
        let mut updates = Vec::new();
        for id in affected {
            let definers = definers(&self.defs, id, &self.pos);
            let mut count = 0;
            let mut first: Option<&Object> = None;
            for p in &definers {
                let at = index.at(&self.files, p, id);
                count += at.len();
                if first.is_none() {
                    first = at
                        .first()
                        .and_then(|&i| self.files.get(*p)?.good.get(i))
                        .map(|l| &l.object);
                }
            }
            if count > 1 {
                self.dups.insert(id.clone());
            } else {
                self.dups.remove(id);
            }
            match first {
                Some(o) => {
                    let p = print(o);
                    if self.sent.insert(id.clone(), p) != Some(p) {
                        updates.push(Update::Upsert(Box::new(o.clone())));
                    }
                }
                None => {
                    if self.sent.remove(id).is_some() {
                        updates.push(Update::Delete(id.0, id.1.clone()));
                    }
                }
            }
        }
        updates
    }

    /// An error for every definition of an object after its first, in load
    /// order.
    fn duplicates(&self, index: &mut Index) -> Vec<ManifestError> {
        let mut found: Vec<(usize, usize, ManifestError)> = Vec::new();
        for id in &self.dups {
            let definers = definers(&self.defs, id, &self.pos);
            let mut first: Option<(String, usize)> = None;
            for p in definers {
                let at = index.at(&self.files, p, id);
                let Some(file) = self.files.get(p) else {
                    continue;
                };
                for i in at {
                    let Some(l) = file.good.get(i) else { continue };
                    match &first {
                        None => first = Some((l.origin.clone(), l.line)),
                        Some((first_origin, first_line)) => found.push((
                            self.pos.get(p).copied().unwrap_or(usize::MAX),
                            i,
                            ManifestError::Duplicate {
                                origin: l.origin.clone(),
                                line: l.line,
                                object: convert::describe(id.0, &id.1),
                                first_origin: first_origin.clone(),
                                first_line: *first_line,
                            },
                        )),
                    }
                }
            }
        }
        found.sort_by_key(|(p, i, _)| (*p, *i));
        found.into_iter().map(|(_, _, e)| e).collect()
    }
}

/// The files defining `id`, in load order.
fn definers<'a>(
    defs: &'a HashMap<Id, Vec<PathBuf>>,
    id: &Id,
    pos: &HashMap<PathBuf, usize>,
) -> Vec<&'a PathBuf> {
    let mut d: Vec<&PathBuf> = defs.get(id).map(|d| d.iter().collect()).unwrap_or_default();
    d.sort_by_key(|p| pos.get(*p).copied().unwrap_or(usize::MAX));
    d
}

/// The ids a file's good objects define, each once.
fn ids_of(f: &FileEntry) -> Vec<Id> {
    let mut ids: Vec<Id> = f.good.iter().map(|l| l.object.id()).collect();
    ids.sort();
    ids.dedup();
    ids
}
