//! The file source's run loop: watch the paths (or poll without a watcher),
//! debounce bursts of events, reload, send a [`Batch`] when the good objects
//! changed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RemoveKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use super::reload::Reloaded;
use super::FileSource;
use crate::discovery::{Batch, Update};

/// How long the watcher waits for a burst of file events to end before reloading,
/// while a file may still be half written (created or modified, not yet closed).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Upper bound on the debounce wait while events keep arriving.
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);
/// Reload period when no file watcher could be set up.
const POLL_FALLBACK: Duration = Duration::from_secs(5);

impl FileSource {
    /// A watcher on [`FileSource::watch_targets`] (see [`make_watcher`]);
    /// a path it cannot watch is reported once (`warned`).
    fn watch(
        &self,
        ev_tx: &mpsc::Sender<Settle>,
        touched: &Arc<Mutex<Touched>>,
        warned: &mut HashSet<PathBuf>,
    ) -> Option<notify::RecommendedWatcher> {
        let mut w = make_watcher(ev_tx, touched)?;
        for (p, mode) in self.watch_targets() {
            if let Err(e) = w.watch(&p, mode) {
                if warned.insert(p.clone()) {
                    warn!(path = %p.display(), error = %e, "cannot watch; changes there need a reload (SIGHUP)");
                }
            }
        }
        Some(w)
    }

    /// Directories to watch: a directory path recursively; for a file, its parent
    /// (editors replace files by rename, which a watch on the file itself misses),
    /// and the parent of its real path when it is a symlink.
    fn watch_targets(&self) -> BTreeMap<PathBuf, RecursiveMode> {
        let mut t = BTreeMap::new();
        for p in &self.paths {
            if p.is_dir() {
                t.insert(p.clone(), RecursiveMode::Recursive);
                continue;
            }
            let mut parents = vec![parent_dir(p)];
            if let Ok(real) = std::fs::canonicalize(p) {
                parents.push(parent_dir(&real));
            }
            for parent in parents {
                if parent.is_dir() {
                    t.entry(parent).or_insert(RecursiveMode::NonRecursive);
                }
            }
        }
        t
    }

    /// Loads, sends a [`Batch`] of one [`Update::Reset`] with all good objects,
    /// then watches the paths and sends the objects that changed (upserts and
    /// deletes) whenever a reload changes any. A reload follows a finished
    /// write at once ([`Settle::Done`]) and a write left open after [`DEBOUNCE`]
    /// of quiet, and looks only at the files the events named when that is
    /// enough ([`FileSource::reload_touched`]); `reload_now` (SIGHUP) and
    /// polling reload everything. Errors are logged with `tracing::warn!`, one line each, and the last good
    /// objects of that file keep serving. Runs until `tx` is closed. A batch
    /// after a change carries, as its trigger time, when the change was
    /// noticed (the first file event, the reload request or the poll), so
    /// manifest edits feed the network programming latency like the API's
    /// EndpointSlice changes do.
    ///
    /// Reading and parsing happen on tokio's blocking pool, so a slow disk never
    /// stalls the control runtime. Without a working file watcher (e.g. inotify
    /// limits reached) the paths are polled every few seconds instead.
    pub async fn run(self, tx: mpsc::Sender<Batch>, reload_now: Arc<Notify>) {
        // Wake-ups, each saying whether its event ended a write; a full
        // channel drops one, which only makes that burst wait longer.
        let (ev_tx, mut ev_rx) = mpsc::channel::<Settle>(64);
        let touched = Arc::new(Mutex::new(Touched::default()));
        let mut watcher: Option<notify::RecommendedWatcher> = None;
        let mut poll = tokio::time::interval(POLL_FALLBACK);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        let mut watch_warned: HashSet<PathBuf> = HashSet::new();

        let mut source = self;
        // Nothing sent yet: the first load goes as the whole set (a Reset),
        // every later one as the objects it changed.
        let mut started = false;
        let mut last_errors: Vec<String> = Vec::new();
        let mut forced = true;
        // When the change that led to this reload was noticed; none at start.
        let mut noticed: Option<SystemTime> = None;
        // The paths the watcher named since the last reload, when they are
        // all it takes to find the change; `None` for a full reload.
        let mut scope: Option<HashSet<PathBuf>> = None;
        loop {
            let (ev, t) = (ev_tx.clone(), Arc::clone(&touched));
            let began = SystemTime::now();
            let job = tokio::task::spawn_blocking(move || {
                let scope = scope.filter(|paths| source.scoped(paths));
                // Watch first, then read: a change made while reading raises an
                // event and another reload. A fresh watcher at each full reload
                // carries no stale watches (a directory deleted and re-created
                // may even reuse its inode). Without a new watcher the old one
                // (or polling) stays in use.
                let w = scope
                    .is_none()
                    .then(|| source.watch(&ev, &t, &mut watch_warned))
                    .flatten();
                let r = match &scope {
                    Some(paths) => source.reload_touched(paths),
                    None => source.reload_changes(),
                };
                (source, w, watch_warned, r)
            });
            let (
                s,
                w,
                warned,
                Reloaded {
                    updates,
                    errors,
                    parsed,
                    full,
                },
            ) = match job.await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "manifest reload failed; file source stopped");
                    return;
                }
            };
            source = s;
            watch_warned = warned;
            if w.is_some() {
                watcher = w;
            }

            let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
            if forced || rendered != last_errors {
                for e in &rendered {
                    warn!("{e}");
                }
                if rendered.is_empty() && !last_errors.is_empty() {
                    info!("manifest errors resolved");
                }
            }
            last_errors = rendered;

            if !started || !updates.is_empty() {
                let ms = |d: Option<Duration>| d.unwrap_or_default().as_secs_f64() * 1e3;
                info!(
                    objects = source.len(),
                    changed = updates.len(),
                    files_parsed = parsed,
                    full,
                    errors = last_errors.len(),
                    waited_ms = ms(noticed.and_then(|n| began.duration_since(n).ok())),
                    reload_ms = ms(began.elapsed().ok()),
                    "manifests loaded"
                );
                // The first load's Upserts hand out every object: they are
                // the Reset (consumed here, not kept alive across the wait for
                // the next event and freed then, at the first change's cost).
                let updates = if started {
                    updates
                } else {
                    let all = updates.into_iter().filter_map(|u| match u {
                        Update::Upsert(o) => Some(*o),
                        _ => None,
                    });
                    vec![Update::Reset(all.collect())]
                };
                let batch = Batch {
                    updates,
                    queued: SystemTime::now(),
                    triggers: noticed.into_iter().collect(),
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
                started = true;
            }

            let (f, at) = tokio::select! {
                _ = tx.closed() => return,
                _ = reload_now.notified() => (true, SystemTime::now()),
                Some(first) = ev_rx.recv(), if watcher.is_some() => {
                    let at = SystemTime::now();
                    debounce(&mut ev_rx, first).await;
                    (false, at)
                }
                _ = poll.tick(), if watcher.is_none() => (false, SystemTime::now()),
            };
            // Taken after the wait, before the reload: events from here on
            // are for the next one.
            let named =
                std::mem::take(&mut *touched.lock().unwrap_or_else(PoisonError::into_inner));
            scope = (!f && watcher.is_some() && !named.full).then_some(named.paths);
            forced = f;
            noticed = Some(at);
        }
    }
}

/// Whether a file event can change what the files contain. Opens and reads (ours
/// included) cannot; a close after writing can.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Whether an event ends a write: a close after writing, a rename into
/// place, a file's removal, a change of metadata. A file created or
/// modified may still be half written; a directory removed or moved away
/// is often about to be re-created (`rm -r d && mkdir d && cp ... d/`),
/// and a watch set up before that would miss it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// The write is over: reload at once, with the events already queued
    /// beside it (the other half of a rename), as kubelet and Prometheus
    /// load a finished write. No timer: tokio's are of whole milliseconds,
    /// and a 1 ms wait was 2–2.7 ms, most of a change's 3.3 ms.
    Done,
    /// More may come: reload after [`DEBOUNCE`] of quiet.
    Pending,
}

impl Settle {
    fn of(kind: &EventKind) -> Settle {
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(
                ModifyKind::Name(RenameMode::To | RenameMode::Both) | ModifyKind::Metadata(_),
            )
            | EventKind::Remove(RemoveKind::File) => Settle::Done,
            _ => Settle::Pending,
        }
    }
}

/// The paths named by the events since the last reload.
#[derive(Debug, Default)]
struct Touched {
    paths: HashSet<PathBuf>,
    /// An event named no path or asked for a rescan (the kernel's queue
    /// overflowed): only a full reload finds what changed.
    full: bool,
}

/// Waits until the burst of events is over (at most [`DEBOUNCE_MAX`] in
/// all): when its last event ended a write, as soon as no other event is
/// queued (one yield lets the watcher's thread queue the rest of what the
/// kernel reported together); else after [`DEBOUNCE`] without an event. An
/// editor's or a tool's burst (write to a temporary file, rename) is one
/// reload right after the rename; a write left open waits for quiet.
async fn debounce(rx: &mut mpsc::Receiver<Settle>, first: Settle) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    let mut last = first;
    loop {
        while let Ok(s) = rx.try_recv() {
            last = s;
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        if last == Settle::Done {
            tokio::task::yield_now().await;
            match rx.try_recv() {
                Ok(s) => last = s,
                Err(_) => return,
            }
            continue;
        }
        match tokio::time::timeout_at(tokio::time::Instant::now() + DEBOUNCE, rx.recv()).await {
            Ok(Some(s)) => last = s,
            _ => return,
        }
    }
}

/// A watcher noting the paths of every event that can change a file in
/// `touched` and waking `ev_tx`; `None` (with a warning) when the platform
/// refuses one.
fn make_watcher(
    ev_tx: &mpsc::Sender<Settle>,
    touched: &Arc<Mutex<Touched>>,
) -> Option<notify::RecommendedWatcher> {
    let ev_tx = ev_tx.clone();
    let touched = Arc::clone(touched);
    let handler = move |res: notify::Result<notify::Event>| {
        let settle = {
            let mut t = touched.lock().unwrap_or_else(PoisonError::into_inner);
            match res {
                Ok(ev) if !is_change(&ev.kind) => return,
                Ok(ev) => {
                    t.full |= ev.paths.is_empty() || ev.need_rescan();
                    let settle = Settle::of(&ev.kind);
                    t.paths.extend(ev.paths);
                    settle
                }
                Err(e) => {
                    warn!(error = %e, "manifest watcher error; reloading");
                    t.full = true;
                    Settle::Pending
                }
            }
        };
        let _ = ev_tx.try_send(settle);
    };
    match notify::recommended_watcher(handler) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch manifests; polling every {}s instead", POLL_FALLBACK.as_secs());
            None
        }
    }
}

/// The directory holding `p` (`.` for a bare file name).
fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload follows the last event of a burst by [`DEBOUNCE`], not by
    /// whole rounds of it: an event 5 ms into the wait ends it at 105 ms.
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_debounced_from_its_last_event() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(Settle::Pending).await;
            // Kept open: a closed channel would end the wait.
            std::future::pending::<()>().await;
        });
        debounce(&mut rx, Settle::Pending).await;
        assert_eq!(start.elapsed(), Duration::from_millis(105));
    }

    /// A burst that ends a write (the close of a temporary file, then its
    /// rename into place) is reloaded as soon as its last event is in, not
    /// after [`DEBOUNCE`]; a write left open still waits for quiet, and so
    /// does a write begun right after a finished one.
    #[tokio::test(start_paused = true)]
    async fn a_finished_write_is_reloaded_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let _ = tx.send(Settle::Done).await; // the close after writing
            let _ = tx.send(Settle::Done).await; // the rename
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Settle::Pending).await; // the next write begins
            std::future::pending::<()>().await;
        });
        debounce(&mut rx, Settle::Pending).await;
        assert_eq!(start.elapsed(), Duration::from_millis(3));
        assert!(rx.try_recv().is_err(), "both events taken in");
        debounce(&mut rx, Settle::Pending).await;
        assert_eq!(start.elapsed(), Duration::from_millis(53) + DEBOUNCE);
        // A finished write with a new one queued behind it waits for that.
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(Settle::Pending).await.unwrap();
        let start = tokio::time::Instant::now();
        debounce(&mut rx, Settle::Done).await;
        assert_eq!(start.elapsed(), DEBOUNCE);
        drop(tx);
    }

    #[test]
    fn events_that_end_a_write() {
        use notify::event::{CreateKind, DataChange, MetadataKind};
        let done = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Remove(RemoveKind::File),
        ];
        let pending = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::Folder),
            EventKind::Any,
            EventKind::Other,
        ];
        for k in done {
            assert_eq!(Settle::of(&k), Settle::Done, "{k:?}");
        }
        for k in pending {
            assert_eq!(Settle::of(&k), Settle::Pending, "{k:?}");
        }
    }

    /// Events that never stop still give a reload after [`DEBOUNCE_MAX`].
    #[tokio::test(start_paused = true)]
    async fn a_stream_of_events_is_cut_at_the_longest_wait() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Settle::Pending).await;
            }
        });
        debounce(&mut rx, Settle::Pending).await;
        assert_eq!(start.elapsed(), DEBOUNCE_MAX);
    }
}
