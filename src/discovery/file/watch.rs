//! The file source's run loop: watch the paths (or poll without a watcher),
//! debounce bursts of events, reload, send a [`Batch`] when the good objects
//! changed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use super::reload::Reloaded;
use super::FileSource;
use crate::discovery::{Batch, Update};

/// How long the watcher waits for a burst of file events to end before reloading.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Upper bound on the debounce wait while events keep arriving.
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);
/// Reload period when no file watcher could be set up.
const POLL_FALLBACK: Duration = Duration::from_secs(5);

impl FileSource {
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
    /// then watches the paths
    /// (debounced ~100 ms; also reloads when `reload_now` is notified, e.g. on
    /// SIGHUP) and sends a new `Reset` whenever the set of good objects changed.
    /// Errors are logged with `tracing::warn!`, one line each, and the last good
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
        let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
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
        loop {
            // Watch first, then read: a change made while reading raises an event
            // and another reload. A fresh watcher each time carries no stale
            // watches (a directory deleted and re-created may even reuse its inode).
            // Without a new watcher the old one (or polling) stays in use.
            if let Some(mut w) = make_watcher(&ev_tx) {
                for (p, mode) in source.watch_targets() {
                    if let Err(e) = w.watch(&p, mode) {
                        if watch_warned.insert(p.clone()) {
                            warn!(path = %p.display(), error = %e, "cannot watch; changes there need a reload (SIGHUP)");
                        }
                    }
                }
                watcher = Some(w);
            }
            let job = tokio::task::spawn_blocking(move || {
                let r = source.reload_changes();
                (source, r)
            });
            let (
                s,
                Reloaded {
                    updates,
                    errors,
                    parsed,
                },
            ) = match job.await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "manifest reload failed; file source stopped");
                    return;
                }
            };
            source = s;

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
                info!(
                    objects = source.len(),
                    changed = updates.len(),
                    files_parsed = parsed,
                    errors = last_errors.len(),
                    "manifests loaded"
                );
                let updates = if started {
                    updates
                } else {
                    vec![Update::Reset(source.objects())]
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
                Some(()) = ev_rx.recv(), if watcher.is_some() => {
                    let at = SystemTime::now();
                    debounce(&mut ev_rx).await;
                    (false, at)
                }
                _ = poll.tick(), if watcher.is_none() => (false, SystemTime::now()),
            };
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

/// Waits until no event arrived for [`DEBOUNCE`] (at most [`DEBOUNCE_MAX`]
/// in all): an editor's or a tool's burst of events (write to a temporary
/// file, rename) is one reload, [`DEBOUNCE`] after its last event.
async fn debounce(rx: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(deadline);
        match tokio::time::timeout_at(quiet, rx.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => {}
            _ => return,
        }
    }
}

/// A watcher forwarding every event that can change a file into `ev_tx`;
/// `None` (with a warning) when the platform refuses one.
fn make_watcher(ev_tx: &mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let ev_tx = ev_tx.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let wanted = match &res {
            Ok(ev) => is_change(&ev.kind),
            Err(e) => {
                warn!(error = %e, "manifest watcher error; reloading");
                true
            }
        };
        if wanted {
            // A full channel already holds a pending reload.
            let _ = ev_tx.try_send(());
        }
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
            let _ = tx.send(()).await;
            // Kept open: a closed channel would end the wait.
            std::future::pending::<()>().await;
        });
        debounce(&mut rx).await;
        assert_eq!(start.elapsed(), Duration::from_millis(105));
    }

    /// Events that never stop still give a reload after [`DEBOUNCE_MAX`].
    #[tokio::test(start_paused = true)]
    async fn a_stream_of_events_is_cut_at_the_longest_wait() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(()).await;
            }
        });
        debounce(&mut rx).await;
        assert_eq!(start.elapsed(), DEBOUNCE_MAX);
    }
}
