//! The running process's side: listens on the handover path and, for the
//! one process that takes over, sends the inventory and waits for its
//! `Ready` before giving anything up. The conversation runs on threads of its
//! own (blocking I/O with timeouts); what it needs from the process (the
//! sockets, the tables, the release) it asks the control loop for through
//! [`Event`]s.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::wire::{self, AffinityEntry, Message, Pin, SocketEntry, TunShare, WireError, VERSION};

/// How long a new process has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new process may take from the inventory to `Ready` (its first
/// snapshot: manifests, or a full list from the API).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What the running process hands over.
#[derive(Debug, Default)]
pub struct Dump {
    /// Its sockets, each with a descriptor of its own (closed once sent).
    pub sockets: Vec<(SocketEntry, OwnedFd)>,
    /// Its ClientIP affinity table.
    pub affinity: Vec<AffinityEntry>,
    /// Its UDP flows' endpoints.
    pub pins: Vec<Pin>,
    /// Its TUN device's name and its TUN threads' inboxes (sending ends).
    pub tun: Option<(String, Vec<OwnedFd>)>,
}

/// What the conversation asks of the control loop.
#[derive(Debug)]
pub enum Event {
    /// Gather the sockets and tables (nothing changes yet).
    Dump(oneshot::Sender<Dump>),
    /// The new process serves: stop accepting, answer once stopped, then
    /// drain and exit.
    Release {
        /// The process taking over.
        taker: u32,
        /// Answered once nothing new is accepted any more.
        done: oneshot::Sender<()>,
        /// Its TUN threads' inboxes (sending ends): where the new flows'
        /// packets go from now on.
        inboxes: Vec<OwnedFd>,
        /// Resolves (or fails) once the new process was told it is
        /// released: a process that exits before would close the
        /// conversation first, and the new one would hear no answer.
        told: oneshot::Receiver<()>,
    },
}

/// The listening handover socket of this process. Removed from its path
/// when dropped, unless the path is someone else's by then (the process
/// that took over put its own socket there).
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file this process created.
    id: (u64, u64),
}

impl Server {
    /// Listens on `path` (a stale file there is replaced; its directory is
    /// created), serving handovers through `events`.
    /// The socket is bound at a temporary name and renamed into place, so a
    /// process connecting to `path` always reaches a listening socket.
    pub fn listen(path: &Path, events: mpsc::Sender<Event>) -> std::io::Result<Server> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let meta = std::fs::symlink_metadata(&tmp)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let taker = Arc::new(AtomicU32::new(0));
        std::thread::Builder::new()
            .name("ringvip-handover".into())
            .spawn(move || accept_loop(listener, events, taker))?;
        Ok(Server {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// The path it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(listener: UnixListener, events: mpsc::Sender<Event>, taker: Arc<AtomicU32>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (events, taker) = (events.clone(), taker.clone());
        let spawned = std::thread::Builder::new()
            .name("ringvip-handover-conn".into())
            .spawn(move || {
                if let Err(e) = converse(conn, &events, &taker) {
                    tracing::warn!(error = %e, "handover: not handed over; still serving");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "handover: cannot start a conversation");
        }
    }
}

/// Why a conversation ended without a handover.
#[derive(Debug, thiserror::Error)]
enum ConverseError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("process {0} speaks handover version {1}, this one {VERSION}")]
    Version(u32, u32),
    #[error("process {0} arrived while process {1} is taking over")]
    Busy(u32, u32),
    #[error("the control loop is gone (stopping)")]
    Stopping,
    #[error("process {pid} went away before it was ready: {source}")]
    Gone {
        pid: u32,
        #[source]
        source: WireError,
    },
}

fn converse(
    mut conn: UnixStream,
    events: &mpsc::Sender<Event>,
    taker: &AtomicU32,
) -> Result<(), ConverseError> {
    let me = std::process::id();
    conn.set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(WireError::from)?;
    conn.set_write_timeout(Some(HELLO_TIMEOUT))
        .map_err(WireError::from)?;
    let Message::Hello { version, pid } = wire::recv(&mut conn)? else {
        return Err(WireError::Malformed("expected hello".into()).into());
    };
    if version != VERSION {
        let reason = format!("this process speaks handover version {VERSION}, not {version}");
        wire::send(&mut conn, &Message::Refused { reason })?;
        return Err(ConverseError::Version(pid, version));
    }
    if let Err(current) = taker.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire) {
        wire::send(
            &mut conn,
            &Message::Busy {
                pid: me,
                taker: current,
            },
        )?;
        return Err(ConverseError::Busy(pid, current));
    }
    let res = hand_over(&mut conn, events, pid);
    if res.is_err() {
        // Nothing was given up: the next process may try again.
        taker.store(0, Ordering::Release);
    }
    res
}

fn hand_over(
    conn: &mut UnixStream,
    events: &mpsc::Sender<Event>,
    pid: u32,
) -> Result<(), ConverseError> {
    tracing::info!(taker = pid, "handover: a new process is taking over");
    let (tx, rx) = oneshot::channel();
    events
        .blocking_send(Event::Dump(tx))
        .map_err(|_| ConverseError::Stopping)?;
    let dump = rx.blocking_recv().map_err(|_| ConverseError::Stopping)?;
    let (entries, mut fds): (Vec<SocketEntry>, Vec<OwnedFd>) = dump.sockets.into_iter().unzip();
    let tun = dump.tun.map(|(name, inboxes)| {
        let share = TunShare {
            name,
            inboxes: inboxes.len(),
        };
        fds.extend(inboxes);
        share
    });
    let (n_sockets, n_affinity, n_pins) = (entries.len(), dump.affinity.len(), dump.pins.len());
    let inventory = Message::Inventory {
        pid: std::process::id(),
        sockets: entries,
        affinity: dump.affinity,
        pins: dump.pins,
        tun,
    };
    let gone = |source| ConverseError::Gone { pid, source };
    wire::send(conn, &inventory).map_err(gone)?;
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    wire::send_fds(conn, &raw).map_err(gone)?;
    // The descriptors are the new process's now (and still ours: `fds` were
    // duplicates, closed here).
    drop(fds);
    tracing::info!(
        taker = pid,
        sockets = n_sockets,
        affinity = n_affinity,
        pins = n_pins,
        "handover: inventory sent; serving until the new process is ready"
    );
    conn.set_read_timeout(Some(READY_TIMEOUT))
        .map_err(|e| gone(e.into()))?;
    let inboxes = match wire::recv(conn).map_err(gone)? {
        Message::Ready { inboxes: 0 } => Vec::new(),
        Message::Ready { inboxes } => wire::recv_fds(conn, inboxes).map_err(gone)?,
        other => {
            return Err(gone(WireError::Malformed(format!(
                "expected ready, got {other:?}"
            ))))
        }
    };
    let (done, released) = oneshot::channel();
    // Dropped after the answer is written (or failed): the control loop
    // waits for it before the process may exit.
    let (told, told_rx) = oneshot::channel::<()>();
    events
        .blocking_send(Event::Release {
            taker: pid,
            done,
            inboxes,
            told: told_rx,
        })
        .map_err(|_| ConverseError::Stopping)?;
    released
        .blocking_recv()
        .map_err(|_| ConverseError::Stopping)?;
    let sent = wire::send(conn, &Message::Released);
    drop(told);
    sent?;
    tracing::info!(taker = pid, "handover: released; draining");
    Ok(())
}
