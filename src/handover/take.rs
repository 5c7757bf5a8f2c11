//! The new process's side: connect to the handover path, receive the
//! inventory, and later tell the running process it may stop.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::wire::{self, AffinityEntry, Message, Pin, SocketEntry, WireError, VERSION};

/// How long the running process has to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to stop accepting once told (cancel its accepts).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// How this process starts.
#[derive(Debug)]
pub enum Start {
    /// Nobody to take over from: bind everything afresh (why, for the log).
    Fresh(String),
    /// Taking over from a running process.
    Taking(Taking),
}

/// A handover under way: the inventory received, the running process still
/// serving until [`Taking::ready`].
#[derive(Debug)]
pub struct Taking {
    conn: UnixStream,
    /// The running process.
    pub from: u32,
    /// Its sockets with their descriptors.
    pub sockets: Vec<(SocketEntry, OwnedFd)>,
    /// Its ClientIP affinity table.
    pub affinity: Vec<AffinityEntry>,
    /// Its UDP flow pins.
    pub pins: Vec<Pin>,
    /// Its TUN device's name and its TUN threads' inboxes (sending ends).
    pub tun: Option<(String, Vec<OwnedFd>)>,
    /// When the inventory arrived (affinity ages count from here).
    pub received: Instant,
}

/// The handover cannot go on; this process must not start.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Another new process is taking over already.
    #[error(
        "ringvip {pid} is already being taken over by process {taker}: this process gives way"
    )]
    Busy {
        /// The running process.
        pid: u32,
        /// The one taking over from it.
        taker: u32,
    },
    /// The running process refused (e.g. another protocol version).
    #[error("the running ringvip refused the handover: {0}")]
    Refused(String),
    /// The conversation broke.
    #[error("handover from the running ringvip failed: {0}")]
    Wire(#[from] WireError),
}

/// Connects to the running process at `path`, if any, and receives what it
/// serves. No file, or a file nobody listens on (left by a crash), is a
/// fresh start; anything else going wrong is an error: a process that might
/// be serving is not raced.
pub fn take_over(path: &Path) -> Result<Start, TakeoverError> {
    let mut conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Start::Fresh(format!(
                "no handover socket at {}: starting fresh",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Ok(Start::Fresh(format!(
                "stale handover socket at {} (nobody listening): starting fresh",
                path.display()
            )))
        }
        Err(e) => return Err(WireError::Io(e).into()),
    };
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(WireError::from)?;
    conn.set_write_timeout(Some(ANSWER_TIMEOUT))
        .map_err(WireError::from)?;
    wire::send(
        &mut conn,
        &Message::Hello {
            version: VERSION,
            pid: std::process::id(),
        },
    )?;
    match wire::recv(&mut conn)? {
        Message::Inventory {
            pid,
            sockets,
            affinity,
            pins,
            tun,
        } => {
            let n_inboxes = tun.as_ref().map_or(0, |t| t.inboxes);
            let mut fds = wire::recv_fds(&conn, sockets.len() + n_inboxes)?;
            let inboxes = fds.split_off(sockets.len());
            Ok(Start::Taking(Taking {
                conn,
                from: pid,
                sockets: sockets.into_iter().zip(fds).collect(),
                affinity,
                pins,
                tun: tun.map(|t| (t.name, inboxes)),
                received: Instant::now(),
            }))
        }
        Message::Busy { pid, taker } => Err(TakeoverError::Busy { pid, taker }),
        Message::Refused { reason } => Err(TakeoverError::Refused(reason)),
        other => Err(WireError::Malformed(format!("expected the inventory, got {other:?}")).into()),
    }
}

impl Taking {
    /// Tells the running process this one serves (handing it `inboxes`,
    /// the sending ends of this process's TUN threads' inboxes), and waits
    /// until it has stopped accepting; returns how long that took.
    pub fn ready(mut self, inboxes: &[OwnedFd]) -> Result<Duration, TakeoverError> {
        let t0 = Instant::now();
        self.conn
            .set_read_timeout(Some(RELEASE_TIMEOUT))
            .map_err(WireError::from)?;
        wire::send(
            &mut self.conn,
            &Message::Ready {
                inboxes: inboxes.len(),
            },
        )?;
        if !inboxes.is_empty() {
            let raw: Vec<_> = inboxes
                .iter()
                .map(std::os::fd::AsRawFd::as_raw_fd)
                .collect();
            wire::send_fds(&self.conn, &raw)?;
        }
        match wire::recv(&mut self.conn)? {
            Message::Released => Ok(t0.elapsed()),
            other => Err(WireError::Malformed(format!("expected released, got {other:?}")).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process of the previous protocol version (one that could not
    /// carry a TUN device) is refused with the reason, and nothing is asked
    /// of the running process's control loop.
    #[test]
    fn another_protocol_version_is_refused_and_nothing_changes_hands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let _server = super::super::Server::listen(&path, tx).unwrap();
        let mut conn = UnixStream::connect(&path).unwrap();
        let hello = Message::Hello {
            version: VERSION - 1,
            pid: 1,
        };
        wire::send(&mut conn, &hello).unwrap();
        match wire::recv(&mut conn).unwrap() {
            Message::Refused { reason } => assert!(
                reason.contains(&format!("speaks handover version {VERSION}, not 1")),
                "{reason}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "no event for a refusal");
    }

    #[test]
    fn no_file_and_a_stale_file_are_fresh_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let Start::Fresh(why) = take_over(&path).unwrap() else {
            panic!("no file: fresh")
        };
        assert!(why.contains("no handover socket"), "{why}");
        // A socket file whose listener is gone, as a crash leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let Start::Fresh(why) = take_over(&path).unwrap() else {
            panic!("stale file: fresh")
        };
        assert!(why.contains("stale"), "{why}");
    }
}
