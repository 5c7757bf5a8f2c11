//! The handover conversation's messages and how they travel: each message is
//! a 4-byte big-endian length and that many bytes of JSON (the control path,
//! a few messages per upgrade: readable beats compact); the descriptors of an
//! [`Message::Inventory`] follow it as SCM_RIGHTS batches, each with one byte
//! of payload, in the order of its `sockets`.
//!
//! Versioned: a [`Message::Hello`] names [`VERSION`]; the running process
//! answers a version it does not speak with [`Message::Refused`], and nothing
//! changes hands. Version 2 carries the TUN device ([`TunShare`]) and the
//! inboxes of both processes' TUN threads (version 1 could not: a process
//! with a TUN refused).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// Largest message accepted (an affinity table of a million clients fits).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// Descriptors per SCM_RIGHTS batch (the kernel takes at most 253).
pub const FDS_PER_BATCH: usize = 200;

/// What a socket handed over is for in the process that held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A data-plane listener (NodePort, LoadBalancer IP, externalIP).
    Listener,
    /// The `/healthz` server.
    Health,
    /// The `/metrics` and admin API server.
    Metrics,
    /// The cluster DNS responder (UDP and TCP).
    Dns,
    /// A `healthCheckNodePort` server.
    HealthCheck,
}

/// Transport of a socket handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A listening TCP socket.
    Tcp,
    /// A bound UDP socket.
    Udp,
}

impl From<crate::model::Protocol> for Transport {
    fn from(p: crate::model::Protocol) -> Self {
        match p {
            crate::model::Protocol::Tcp => Transport::Tcp,
            crate::model::Protocol::Udp => Transport::Udp,
        }
    }
}

/// One socket of an inventory; its descriptor travels separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketEntry {
    /// What it served.
    pub role: Role,
    /// Its local address.
    pub addr: SocketAddr,
    /// TCP or UDP.
    pub transport: Transport,
}

/// One ClientIP affinity entry, its age relative to the moment it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityEntry {
    /// The Service port (a hash of its identity; the same in every build of
    /// one toolchain).
    pub port: u64,
    /// The client.
    pub client: IpAddr,
    /// Its endpoint.
    pub endpoint: SocketAddr,
    /// Milliseconds since the entry was last used.
    pub idle_ms: u64,
    /// Its timeout in milliseconds.
    pub timeout_ms: u64,
}

/// One UDP flow's endpoint: the next process keeps the client there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The frontend it sends to.
    pub frontend: SocketAddr,
    /// The endpoint its flow is pinned to.
    pub endpoint: SocketAddr,
}

/// The TUN device the running process captures ClusterIPs on: the new
/// process attaches queues of its own to it (no link or route setup: they
/// are there), and the sending ends of the running process's TUN threads'
/// inboxes follow the inventory's socket descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunShare {
    /// The device's name.
    pub name: String,
    /// Inbox descriptors after the sockets' (one per TUN thread).
    pub inboxes: usize,
}

/// A message of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// New → running: "I take over" (the first message).
    Hello {
        /// The protocol version the new process speaks.
        version: u32,
        /// Its process id.
        pid: u32,
    },
    /// Running → new: another process is already taking over.
    Busy {
        /// The running process.
        pid: u32,
        /// The process taking over from it.
        taker: u32,
    },
    /// Running → new: no handover (e.g. an unknown version).
    Refused {
        /// Why.
        reason: String,
    },
    /// Running → new: what it serves; `sockets.len()` descriptors follow.
    Inventory {
        /// The running process.
        pid: u32,
        /// Its sockets, in the order their descriptors follow.
        sockets: Vec<SocketEntry>,
        /// Its ClientIP affinity table.
        affinity: Vec<AffinityEntry>,
        /// Its UDP flows' endpoints (kernel sockets and TUN).
        pins: Vec<Pin>,
        /// Its TUN device, when it has one.
        tun: Option<TunShare>,
    },
    /// New → running: serving on the sockets; stop accepting. `inboxes`
    /// descriptors follow: the sending ends of its TUN threads' inboxes,
    /// where the running process sends the new flows' packets from then on.
    Ready {
        /// Inbox descriptors that follow.
        inboxes: usize,
    },
    /// Running → new: it no longer accepts anything new.
    Released,
}

/// The conversation could not go on.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed (or timed out).
    #[error("handover socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the conversation.
    #[error("the other process closed the handover connection")]
    Closed,
    /// A message that is no JSON of this protocol.
    #[error("malformed handover message: {0}")]
    Malformed(String),
    /// A length beyond [`MAX_MESSAGE`].
    #[error("handover message of {0} bytes is too large")]
    TooLarge(usize),
    /// Fewer descriptors than the inventory announced.
    #[error("expected {expected} descriptors, received {got}")]
    MissingFds {
        /// Announced.
        expected: usize,
        /// Received before the batches ended.
        got: usize,
    },
}

/// Writes one message.
pub fn send(s: &mut UnixStream, m: &Message) -> Result<(), WireError> {
    let body = serde_json::to_vec(m).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame)?;
    Ok(())
}

/// Reads one message.
pub fn recv(s: &mut UnixStream) -> Result<Message, WireError> {
    let mut len = [0u8; 4];
    if let Err(e) = s.read_exact(&mut len) {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => e.into(),
        });
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => e.into(),
    })?;
    serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Sends `fds` (duplicated into the peer by the kernel) in batches.
pub fn send_fds(s: &UnixStream, fds: &[RawFd]) -> Result<(), WireError> {
    for batch in fds.chunks(FDS_PER_BATCH) {
        let payload = [b'F'];
        let iov = [IoSlice::new(&payload)];
        let cmsg = [ControlMessage::ScmRights(batch)];
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Receives `n` descriptors sent by [`send_fds`].
pub fn recv_fds(s: &UnixStream, n: usize) -> Result<Vec<OwnedFd>, WireError> {
    let mut out: Vec<OwnedFd> = Vec::with_capacity(n);
    while out.len() < n {
        let mut payload = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut payload)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_BATCH]);
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut got = 0;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                got += fds.len();
                // SAFETY: the kernel just installed these descriptors in this
                // process for us; nothing else owns them.
                out.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.bytes == 0 || got == 0 {
            return Err(WireError::MissingFds {
                expected: n,
                got: out.len(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let inv = Message::Inventory {
            pid: 7,
            sockets: vec![SocketEntry {
                role: Role::Listener,
                addr: "127.0.0.1:30080".parse().unwrap(),
                transport: Transport::Tcp,
            }],
            affinity: vec![AffinityEntry {
                port: u64::MAX,
                client: "10.0.0.1".parse().unwrap(),
                endpoint: "10.1.0.1:80".parse().unwrap(),
                idle_ms: 5,
                timeout_ms: 10_800_000,
            }],
            pins: vec![Pin {
                client: "10.0.0.1:5353".parse().unwrap(),
                frontend: "127.0.0.1:30053".parse().unwrap(),
                endpoint: "10.1.0.2:53".parse().unwrap(),
            }],
            tun: Some(TunShare {
                name: "rv0".into(),
                inboxes: 2,
            }),
        };
        for m in [
            Message::Hello {
                version: VERSION,
                pid: 1,
            },
            inv,
            Message::Ready { inboxes: 2 },
        ] {
            send(&mut a, &m).unwrap();
            assert_eq!(recv(&mut b).unwrap(), m);
        }
        a.write_all(&3u32.to_be_bytes()).unwrap();
        a.write_all(b"{x}").unwrap();
        assert!(matches!(recv(&mut b), Err(WireError::Malformed(_))));
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(recv(&mut b), Err(WireError::TooLarge(_))));
        drop(a);
        assert!(matches!(recv(&mut b), Err(WireError::Closed)));
    }

    /// More descriptors than one batch carries arrive, in order, as the same
    /// sockets (a datagram sent to one is read from its received copy).
    #[test]
    fn descriptors_arrive_in_order_across_batches() {
        let (a, b) = UnixStream::pair().unwrap();
        let socks: Vec<std::net::UdpSocket> = (0..FDS_PER_BATCH + 5)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let raw: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        send_fds(&a, &raw).unwrap();
        let got = recv_fds(&b, raw.len()).unwrap();
        assert_eq!(got.len(), raw.len());
        for (i, (orig, fd)) in socks.iter().zip(got).enumerate() {
            let copy = std::net::UdpSocket::from(fd);
            assert_eq!(
                copy.local_addr().unwrap(),
                orig.local_addr().unwrap(),
                "#{i}"
            );
        }
        drop(a);
        assert!(matches!(
            recv_fds(&b, 1),
            Err(WireError::MissingFds {
                expected: 1,
                got: 0
            })
        ));
    }
}
