//! The kernel-socket UDP path (NodePort, LoadBalancer IPs, externalIPs) on
//! one thread's ring: a multishot `recvmsg` per listener takes each datagram
//! with its source address into a buffer of the provided ring; the client's
//! flow (in the listener's [`FlowTable`]) names a connected backend socket,
//! opened on the first datagram and receiving on a multishot `recv` of its
//! own; a datagram goes out as a send straight from the buffer it came in,
//! and the buffer goes back to the ring when the send completes. Replies
//! leave from the listener's socket (`sendmsg` to the client), so the client
//! sees the address it sent to. Every send a completion round leads to is
//! submitted with one `io_uring_enter` (the engine's poll).
//!
//! Both sockets of a flow take runs of datagrams whole (`UDP_GRO`), and a
//! run leaves as one `sendmsg` with `UDP_SEGMENT` ([`super::gso`]): a client
//! or a pod sending with segmentation offload costs one receive and one
//! send per run here too. A path that refuses the run whole (its MTU below
//! the segment size) gets its datagrams one by one.
//!
//! Semantics are those of the tokio-uring path this replaced: the first
//! datagram picks the endpoint, the flow stays pinned to it until idle for
//! `--udp-idle-timeout-secs` or until the endpoint stops being usable (then
//! the next datagram picks again), at most [`MAX_FLOWS_PER_LISTENER`] flows
//! per listener and thread, an ICMP error or failed send ends the flow as a
//! reset. Closing a listener cancels its receive and its flows' receives;
//! the sockets close once the ring has let go of them.
//!
//! A flow's or listener's entry lives until its last operation completed, so
//! no completion ever finds its index reused.

use std::cell::RefCell;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use io_uring::cqueue;
use io_uring::types::RecvMsgOut;
use rand::rngs::SmallRng;
use socket2::SockAddr;

use super::bufring::BufRing;
use super::gso::{self, Cmsg, CMSG_ROOM};
use super::ops;
use super::ring::{Op, Ring, Token};
use super::slots::Slots;
use crate::access_log::End;
use crate::dataplane::flow::{resolve, FlowKey, Verdict};
use crate::dataplane::session::Session;
use crate::dataplane::udp::{
    connect_backend, connect_to, FlowEntry, FlowTable, OpenError, MAX_FLOWS_PER_LISTENER,
};
use crate::dataplane::Shared;
use crate::model::Protocol;
use crate::state::FrontendKey;

/// Room for the source address of a datagram (the larger of the two).
const NAME_LEN: u32 = std::mem::size_of::<libc::sockaddr_in6>() as u32;

/// A UDP listener: its receive and the flows of its clients.
struct Listener {
    /// The ring's own descriptor of the socket; closed with the entry.
    fd: OwnedFd,
    local: SocketAddr,
    /// What the multishot receive is given (only the name length matters);
    /// boxed so its address stays put while the operation lives.
    msg: Box<libc::msghdr>,
    /// Client address → flow index.
    flows: FlowTable<SocketAddr, u32>,
    /// The multishot receive is in flight.
    armed: bool,
    /// Flows (entries of [`Udp::flows`]) still referring to this listener.
    live: u32,
    stopping: bool,
    /// Handed to the next process: nothing more is received, the flows
    /// relay replies until they idle out.
    released: bool,
    warned_full: bool,
    serial: u32,
}

/// A client's flow to its backend.
struct Flow {
    listener: u32,
    client: SocketAddr,
    /// Connected to the endpoint; closed with the entry.
    fd: OwnedFd,
    /// What the multishot receive is given (no name; room for the `UDP_GRO`
    /// segment size); boxed so its address stays put while it lives.
    msg: Box<libc::msghdr>,
    /// Counts the flow in the metrics, logs it when dropped.
    session: Session,
    /// The backend socket's multishot receive is in flight.
    armed: bool,
    /// Sends of this flow in flight (either way).
    inflight: u32,
    closed: bool,
    serial: u32,
}

/// A `sendmsg` in flight for flow `flow`: a reply to its client from the
/// listener's socket, or a run of datagrams to its backend. The message the
/// kernel reads, its address, its one iovec and its control message are
/// boxed: their addresses stay put while the send is in flight (the boxes
/// are reused).
struct Out {
    msg: libc::msghdr,
    iov: libc::iovec,
    /// The client a reply goes to (`None`: the socket's connected peer).
    to: Option<SockAddr>,
    cmsg: Cmsg,
    /// The socket it leaves on (kept open by the flow's count in flight).
    sock: RawFd,
    flow: u32,
    bid: u16,
    /// The payload: `len` bytes of buffer `bid` from `start`.
    start: u32,
    len: u32,
    /// Datagram size of a run sent with `UDP_SEGMENT` (0: one datagram).
    seg: u16,
    /// The path refused the run whole: its datagrams go one by one, from
    /// `start + done` on.
    split: bool,
    done: u32,
}

impl Out {
    /// The bytes the next send takes: the whole payload, or (split) the
    /// next datagram of the run.
    fn next(&self) -> (u32, u32) {
        if self.split {
            let n = (self.len - self.done).min(u32::from(self.seg));
            (self.start + self.done, n)
        } else {
            (self.start, self.len)
        }
    }

    /// Fills in the message for the next send.
    fn prepare(&mut self, bufs: &BufRing) {
        let (off, n) = self.next();
        self.iov = libc::iovec {
            // SAFETY: off + n <= start + len <= buf_size: inside buffer
            // `bid`, lent to this send until it completes.
            iov_base: unsafe { bufs.ptr(self.bid).add(off as usize) }.cast(),
            iov_len: n as usize,
        };
        self.msg = empty_msghdr();
        if let Some(to) = &self.to {
            self.msg.msg_name = to.as_ptr() as *mut libc::c_void;
            self.msg.msg_namelen = to.len();
        }
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        if self.seg > 0 && !self.split {
            self.msg.msg_controllen = self.cmsg.segment(self.seg);
            self.msg.msg_control = self.cmsg.as_mut_ptr();
        }
    }
}

/// A send of a whole run failed in a way that sending its datagrams one by
/// one avoids: the path's MTU is below the segment size (`EINVAL`), or the
/// route cannot segment (`EIO`, `EMSGSIZE`).
fn refused_whole(res: i32) -> bool {
    matches!(-res, libc::EINVAL | libc::EIO | libc::EMSGSIZE)
}

/// A multishot receive ended for want of a buffer: armed again as buffers
/// come back.
#[derive(Clone, Copy)]
enum Starved {
    Listener(u32, u32),
    Flow(u32, u32),
}

/// One thread's UDP path; see the module documentation. Its operations go
/// on the ring and take buffers of the buffer ring the caller passes in.
pub struct Udp {
    // Field order is drop order: flows (sessions logged as drains) before
    // the listeners.
    flows: Slots<Flow>,
    listeners: Slots<Listener>,
    outs: Slots<Box<Out>>,
    /// Boxes of finished sends, reused; boxed (not a `Vec<Out>`) because a
    /// send's message points into its own box.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Out>>,
    starved: Vec<Starved>,
    shared: Arc<Shared>,
    rng: Rc<RefCell<SmallRng>>,
    serial: u32,
    /// The snapshot generation the last sweep checked endpoints against.
    checked: u64,
}

/// The source address in a received datagram's name bytes (a
/// `sockaddr_in` or `sockaddr_in6`); `None` for anything else.
fn source_of(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]);
    let port = u16::from_be_bytes([*name.get(2)?, *name.get(3)?]);
    match i32::from(family) {
        libc::AF_INET => {
            let a: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddrV4::new(Ipv4Addr::from(a), port).into())
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
            let a: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddrV6::new(Ipv6Addr::from(a), port, flow, scope).into())
        }
        _ => None,
    }
}

/// The buffer a multishot receive's completion carries (now lent out of
/// the ring), and whether the receive stays armed.
fn received(bufs: &mut BufRing, flags: u32) -> (Option<u16>, bool) {
    let bid = cqueue::buffer_select(flags);
    if bid.is_some() {
        bufs.taken();
    }
    (bid, cqueue::more(flags))
}

/// The datagram size of a received run (a `UDP_GRO` message in `control`
/// for a payload of `len` bytes longer than one datagram), or 0 for a
/// single datagram.
fn run_of(control: &[u8], len: usize) -> u16 {
    gso::segment_size(control)
        .filter(|&s| usize::from(s) < len)
        .unwrap_or(0)
}

/// Returns a buffer nobody will send from.
fn give_back(bufs: &mut BufRing, bid: Option<u16>) {
    if let Some(b) = bid {
        bufs.recycle(b);
    }
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data; all zeroes is an empty message.
    unsafe { std::mem::zeroed() }
}

impl Udp {
    /// No listeners yet.
    pub fn new(shared: Arc<Shared>, rng: Rc<RefCell<SmallRng>>) -> Self {
        Self {
            flows: Slots::default(),
            listeners: Slots::default(),
            outs: Slots::default(),
            spare: Vec::new(),
            starved: Vec::new(),
            shared,
            rng,
            serial: 0,
            checked: 0,
        }
    }

    /// Flows open on this thread.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Starts receiving on `fd` (a bound UDP socket, its own descriptor),
    /// datagrams arriving for `local`. Returns the listener's index and
    /// serial (what [`Udp::closed`] asks about).
    pub fn listen(
        &mut self,
        ring: &mut Ring,
        bufs: &BufRing,
        fd: OwnedFd,
        local: SocketAddr,
    ) -> (u32, u32) {
        let mut msg = Box::new(empty_msghdr());
        msg.msg_namelen = NAME_LEN;
        msg.msg_controllen = CMSG_ROOM;
        if let Err(e) = gso::enable_gro(fd.as_raw_fd()) {
            // Runs then arrive as single datagrams: slower, not wrong.
            tracing::debug!(%local, error = %e, "udp: no UDP_GRO on the listener");
        }
        self.serial = self.serial.wrapping_add(1);
        let serial = self.serial;
        let id = self.listeners.insert(Listener {
            fd,
            local,
            msg,
            flows: FlowTable::new(
                self.shared.settings.udp_idle_timeout,
                MAX_FLOWS_PER_LISTENER,
            ),
            armed: false,
            live: 0,
            stopping: false,
            released: false,
            warned_full: false,
            serial,
        });
        self.arm_listener(ring, bufs, id);
        (id, serial)
    }

    /// Stops listener `id`: its receive and its flows' receives are
    /// cancelled (submitted here), the flows end as drains, and the entries
    /// with their sockets go once the ring has given them back.
    pub fn stop(&mut self, ring: &mut Ring, id: u32) {
        let Some(l) = self.listeners.get_mut(id) else {
            return;
        };
        if l.stopping {
            return;
        }
        l.stopping = true;
        if l.armed {
            ring.push(
                ops::cancel_all(l.fd.as_raw_fd()),
                Token::new(Op::Ignore, id),
            );
        }
        let dead = l.flows.drain();
        for f in dead {
            self.close_flow(ring, f.io, None);
        }
        self.free_listener_if_done(id);
        let _ = ring.submit();
    }

    /// Stops receiving on listener `id` and leaves its socket as it is (the
    /// next process has it): the multishot receive is cancelled, a datagram
    /// it completed meanwhile is still relayed, and the flows stay, relaying
    /// replies (from the listener's socket) until they idle out.
    pub fn release(&mut self, ring: &mut Ring, id: u32) {
        let Some(l) = self.listeners.get_mut(id) else {
            return;
        };
        l.released = true;
        if l.armed {
            ring.push(
                ops::cancel_all(l.fd.as_raw_fd()),
                Token::new(Op::Ignore, id),
            );
        }
        let _ = ring.submit();
    }

    /// Flows of listener `id`.
    pub fn listener_flows(&self, id: u32) -> usize {
        self.listeners.get(id).map_or(0, |l| l.flows.len())
    }

    /// Each flow of listener `id`: its client and endpoint.
    pub fn pins(&self, id: u32, mut each: impl FnMut(SocketAddr, SocketAddr)) {
        if let Some(l) = self.listeners.get(id) {
            for (client, endpoint) in l.flows.endpoints() {
                each(client, endpoint);
            }
        }
    }

    /// True once listener `id` of `serial` and its flows are gone, their
    /// sockets closed.
    pub fn closed(&self, id: u32, serial: u32) -> bool {
        self.listeners.get(id).is_none_or(|l| l.serial != serial)
    }

    /// Handles a completion of one of this path's operations.
    pub fn complete(
        &mut self,
        ring: &mut Ring,
        bufs: &mut BufRing,
        t: Token,
        cqe: &cqueue::Entry,
        now: Instant,
    ) {
        let res = cqe.result();
        let flags = cqe.flags();
        match t.op {
            Op::UdpRecv => self.on_datagram(ring, bufs, t.index, res, flags, now),
            Op::UdpRecvBackend => self.on_reply(ring, bufs, t.index, res, flags, now),
            Op::UdpSendBackend => {
                bufs.recycle(t.aux);
                self.sent(ring, t.index, res);
            }
            Op::UdpSendMsg => self.out_done(ring, bufs, t.index, res),
            _ => {}
        }
    }

    /// Once a second: expires idle flows, and after a snapshot change ends
    /// the flows whose endpoint is no longer usable.
    pub fn sweep(&mut self, ring: &mut Ring, now: Instant) {
        let snap = self.shared.snapshot.load();
        let changed = snap.generation != self.checked;
        self.checked = snap.generation;
        let mut ids = Vec::new();
        self.listeners.indices(&mut ids);
        for id in ids {
            let Some(l) = self.listeners.get_mut(id) else {
                continue;
            };
            if l.stopping {
                continue;
            }
            let idle = l.flows.expire(now);
            let gone = if changed {
                let fk = FrontendKey {
                    addr: l.local,
                    proto: Protocol::Udp,
                };
                let usable: &[SocketAddr] = match snap.frontend(&fk) {
                    Some(fe) => &fe.endpoints,
                    None => &[],
                };
                l.flows.retain_usable(|e| usable.contains(e))
            } else {
                Vec::new()
            };
            for f in idle {
                self.close_flow(ring, f.io, Some(End::IdleTimeout));
            }
            for f in gone {
                self.close_flow(ring, f.io, Some(End::EndpointGone));
            }
        }
        let _ = ring.submit();
    }

    /// Multishot receives that ended for want of a buffer are armed again
    /// while buffers are free.
    pub fn rearm_starved(&mut self, ring: &mut Ring, bufs: &BufRing) {
        while bufs.free() > 0 {
            let Some(s) = self.starved.pop() else {
                return;
            };
            match s {
                Starved::Listener(id, serial) => {
                    if self.listeners.get(id).is_some_and(|l| l.serial == serial) {
                        self.arm_listener(ring, bufs, id);
                    }
                }
                Starved::Flow(i, serial) => {
                    if self.flows.get(i).is_some_and(|f| f.serial == serial) {
                        self.arm_flow(ring, bufs, i);
                    }
                }
            }
        }
    }

    fn arm_listener(&mut self, ring: &mut Ring, bufs: &BufRing, id: u32) {
        let Some(l) = self.listeners.get_mut(id) else {
            return;
        };
        if l.armed || l.stopping || l.released {
            return;
        }
        l.armed = true;
        let msg: *const libc::msghdr = &*l.msg;
        ring.push(
            ops::recv_msg_multi(l.fd.as_raw_fd(), msg, bufs.group()),
            Token::new(Op::UdpRecv, id),
        );
    }

    fn arm_flow(&mut self, ring: &mut Ring, bufs: &BufRing, i: u32) {
        let Some(f) = self.flows.get_mut(i) else {
            return;
        };
        if f.armed || f.closed {
            return;
        }
        f.armed = true;
        let msg: *const libc::msghdr = &*f.msg;
        ring.push(
            ops::recv_msg_multi(f.fd.as_raw_fd(), msg, bufs.group()),
            Token::new(Op::UdpRecvBackend, i),
        );
    }

    /// A datagram from a client (or the end of the listener's receive).
    fn on_datagram(
        &mut self,
        ring: &mut Ring,
        bufs: &mut BufRing,
        id: u32,
        res: i32,
        flags: u32,
        now: Instant,
    ) {
        let (bid, more) = received(bufs, flags);
        let Some(l) = self.listeners.get_mut(id) else {
            give_back(bufs, bid);
            return;
        };
        if !more {
            l.armed = false;
        }
        if l.stopping {
            give_back(bufs, bid);
            self.free_listener_if_done(id);
            return;
        }
        let (serial, local) = (l.serial, l.local);
        match bid {
            Some(b) if res >= 0 => self.forward(ring, bufs, id, b, res as usize, now),
            Some(b) => bufs.recycle(b),
            None if -res == libc::ENOBUFS => {
                self.starved.push(Starved::Listener(id, serial));
                return;
            }
            None => {
                if res < 0 && -res != libc::ECANCELED {
                    tracing::debug!(%local, error = %std::io::Error::from_raw_os_error(-res), "udp receive failed");
                }
            }
        }
        if !more {
            self.arm_listener(ring, bufs, id);
        }
    }

    /// Sends the datagram in buffer `bid` (`len` bytes with the header) to
    /// its flow's backend, opening the flow first if need be; the buffer is
    /// recycled when the send completes, or at once if it is dropped.
    fn forward(
        &mut self,
        ring: &mut Ring,
        bufs: &mut BufRing,
        id: u32,
        bid: u16,
        len: usize,
        now: Instant,
    ) {
        let Some(l) = self.listeners.get_mut(id) else {
            bufs.recycle(bid);
            return;
        };
        let base = bufs.ptr(bid) as usize;
        let parsed = RecvMsgOut::parse(bufs.bytes(bid, len), &l.msg)
            .ok()
            .and_then(|m| {
                // A run whose segment size did not fit would go out as one
                // datagram: dropped like a datagram larger than a buffer.
                if m.is_payload_truncated() || m.is_control_data_truncated() {
                    return None;
                }
                let client = source_of(m.name_data())?;
                let p = m.payload_data();
                let seg = run_of(m.control_data(), p.len());
                Some((client, p.as_ptr() as usize - base, p.len(), seg))
            });
        let Some((client, off, n, seg)) = parsed else {
            // Larger than a buffer, or not from an IP address: dropped.
            bufs.recycle(bid);
            return;
        };
        let Some(flow) = self.flow_for(ring, bufs, id, client, now) else {
            bufs.recycle(bid);
            return;
        };
        let Some(f) = self.flows.get_mut(flow) else {
            bufs.recycle(bid);
            return;
        };
        f.inflight += 1;
        f.session.to_backend(n);
        let sock = f.fd.as_raw_fd();
        if seg > 0 {
            self.send_out(ring, bufs, sock, None, flow, bid, (off, n), seg);
            return;
        }
        // SAFETY: off + n <= len <= buf_size: inside buffer `bid`, which
        // stays lent to this send until it completes.
        let ptr = unsafe { bufs.ptr(bid).add(off) };
        ring.push(
            ops::send(sock, ptr, n as u32),
            Token::with_aux(Op::UdpSendBackend, flow, bid),
        );
    }

    /// Sends bytes `part` (offset, length) of buffer `bid` on `sock` for
    /// flow `flow` (which counted it in flight): to `to`, or to the
    /// socket's connected peer; as a run of `seg`-byte datagrams when `seg`
    /// is set. The buffer is recycled when the send completes.
    #[allow(clippy::too_many_arguments)]
    fn send_out(
        &mut self,
        ring: &mut Ring,
        bufs: &BufRing,
        sock: RawFd,
        to: Option<SocketAddr>,
        flow: u32,
        bid: u16,
        part: (usize, usize),
        seg: u16,
    ) {
        let mut r = self.spare.pop().unwrap_or_else(|| {
            Box::new(Out {
                msg: empty_msghdr(),
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                to: None,
                cmsg: Cmsg::default(),
                sock,
                flow,
                bid,
                start: 0,
                len: 0,
                seg: 0,
                split: false,
                done: 0,
            })
        });
        r.to = to.map(SockAddr::from);
        r.sock = sock;
        r.flow = flow;
        r.bid = bid;
        // Both fit in u32: they lie inside one buffer.
        r.start = part.0 as u32;
        r.len = part.1 as u32;
        r.seg = seg;
        r.split = false;
        r.done = 0;
        r.prepare(bufs);
        let msg: *const libc::msghdr = &r.msg;
        let ri = self.outs.insert(r);
        ring.push(ops::send_msg(sock, msg), Token::new(Op::UdpSendMsg, ri));
    }

    /// A send of box `ri` completed with `res`: a run the path refused whole
    /// goes again one datagram at a time; the box is done once its payload
    /// is out or a send failed.
    fn out_done(&mut self, ring: &mut Ring, bufs: &mut BufRing, ri: u32, res: i32) {
        let Some(r) = self.outs.get_mut(ri) else {
            return;
        };
        let again = if r.seg > 0 && !r.split && refused_whole(res) {
            r.split = true;
            true
        } else if r.split && res >= 0 {
            r.done += r.next().1;
            r.done < r.len
        } else {
            false
        };
        if again {
            r.prepare(bufs);
            let msg: *const libc::msghdr = &r.msg;
            ring.push(ops::send_msg(r.sock, msg), Token::new(Op::UdpSendMsg, ri));
            return;
        }
        let Some(r) = self.outs.remove(ri) else {
            return;
        };
        bufs.recycle(r.bid);
        let flow = r.flow;
        self.spare.push(r);
        self.sent(ring, flow, res);
    }

    /// The flow of `client` on listener `id`: the pinned one if its endpoint
    /// is still usable (checked once per snapshot generation), else a new
    /// one to the endpoint picked now. `None` drops the datagram.
    fn flow_for(
        &mut self,
        ring: &mut Ring,
        bufs: &BufRing,
        id: u32,
        client: SocketAddr,
        now: Instant,
    ) -> Option<u32> {
        let snap = self.shared.snapshot.load();
        let l = self.listeners.get_mut(id)?;
        let key = FlowKey {
            src: client,
            dst: l.local,
            proto: Protocol::Udp,
        };
        if let Some(f) = l.flows.get_mut(&client) {
            let usable = |ep: &SocketAddr| matches!(resolve(&snap, &key), Verdict::Forward(fe) if fe.endpoints.contains(ep));
            if f.revalidate(snap.generation, usable) {
                f.last_seen = now;
                return Some(f.io);
            }
            let gone = l.flows.remove(&client)?;
            self.close_flow(ring, gone.io, Some(End::EndpointGone));
        }
        let l = self.listeners.get_mut(id)?;
        let Verdict::Forward(fe) = resolve(&snap, &key) else {
            return None;
        };
        if l.flows.len() >= MAX_FLOWS_PER_LISTENER {
            if !l.warned_full {
                tracing::warn!(local = %l.local, max = MAX_FLOWS_PER_LISTENER, "udp flow table full: dropping datagrams of new clients");
                l.warned_full = true;
            }
            return None;
        }
        // A flow the previous process relayed (an upgrade) keeps its endpoint.
        let pinned = self
            .shared
            .pins
            .get(client, l.local, now)
            .filter(|ep| fe.endpoints.contains(ep));
        let opened = match pinned {
            Some(ep) => connect_to(ep).map(|sock| (ep, sock)),
            None => connect_backend(&fe, client.ip(), &self.shared, &self.rng, now),
        };
        let (ep, fd) = match opened {
            Ok((ep, sock)) => (ep, OwnedFd::from(sock)),
            Err(OpenError::NoEndpoint) => return None,
            Err(e) => {
                tracing::debug!(local = %l.local, error = %e, "udp backend socket failed");
                return None;
            }
        };
        if let Err(e) = gso::enable_gro(fd.as_raw_fd()) {
            tracing::debug!(local = %l.local, error = %e, "udp: no UDP_GRO on a backend socket");
        }
        let mut msg = Box::new(empty_msghdr());
        msg.msg_controllen = CMSG_ROOM;
        let session = Session::open(&self.shared, fe, client, l.local, ep);
        self.serial = self.serial.wrapping_add(1);
        let i = self.flows.insert(Flow {
            listener: id,
            client,
            fd,
            msg,
            session,
            armed: false,
            inflight: 0,
            closed: false,
            serial: self.serial,
        });
        l.live += 1;
        let entry = FlowEntry {
            endpoint: ep,
            last_seen: now,
            generation: snap.generation,
            io: i,
        };
        if l.flows.insert(client, entry).is_err() {
            // Checked above; kept as a guard against a table of another size.
            self.close_flow(ring, i, Some(End::Limit));
            return None;
        }
        self.arm_flow(ring, bufs, i);
        Some(i)
    }

    /// A reply from a flow's backend (or the end of its receive).
    fn on_reply(
        &mut self,
        ring: &mut Ring,
        bufs: &mut BufRing,
        i: u32,
        res: i32,
        flags: u32,
        now: Instant,
    ) {
        let (bid, more) = received(bufs, flags);
        let Some(f) = self.flows.get_mut(i) else {
            give_back(bufs, bid);
            return;
        };
        if !more {
            f.armed = false;
        }
        if f.closed {
            give_back(bufs, bid);
            self.free_flow_if_done(i);
            return;
        }
        match bid {
            Some(b) if res >= 0 => {
                let base = bufs.ptr(b) as usize;
                let parsed = RecvMsgOut::parse(bufs.bytes(b, res as usize), &f.msg)
                    .ok()
                    .filter(|m| !m.is_payload_truncated() && !m.is_control_data_truncated())
                    .map(|m| {
                        let p = m.payload_data();
                        let seg = run_of(m.control_data(), p.len());
                        (p.as_ptr() as usize - base, p.len(), seg)
                    });
                let (client, listener) = (f.client, f.listener);
                let sock = self.listeners.get_mut(listener).map(|l| {
                    l.flows.touch(&client, now);
                    l.fd.as_raw_fd()
                });
                match (parsed, sock) {
                    (Some((start, n, seg)), Some(sock)) => {
                        f.inflight += 1;
                        f.session.to_client(n);
                        self.send_out(ring, bufs, sock, Some(client), i, b, (start, n), seg);
                    }
                    // Larger than a buffer, or the listener is gone: dropped.
                    _ => bufs.recycle(b),
                }
                if !more {
                    self.arm_flow(ring, bufs, i);
                }
            }
            Some(b) => bufs.recycle(b),
            None if -res == libc::ENOBUFS => {
                let serial = f.serial;
                self.starved.push(Starved::Flow(i, serial));
            }
            None => {
                // An ICMP error from the backend (port unreachable), or a
                // failed receive: the flow ends, the next datagram picks again.
                if !more {
                    self.end_flow(ring, i, End::Reset);
                }
            }
        }
    }

    /// A send of flow `i` completed with `res`: a failure ends the flow as
    /// a reset. (Its bytes were counted when it was queued: the client may
    /// see a reply before this completion is reaped, and the metrics must
    /// not be behind what it saw.)
    fn sent(&mut self, ring: &mut Ring, i: u32, res: i32) {
        let Some(f) = self.flows.get_mut(i) else {
            return;
        };
        f.inflight -= 1;
        if f.closed {
            self.free_flow_if_done(i);
        } else if res < 0 {
            self.end_flow(ring, i, End::Reset);
        }
    }

    /// Takes flow `i` out of its listener's table and closes it as `how`.
    fn end_flow(&mut self, ring: &mut Ring, i: u32, how: End) {
        let Some(f) = self.flows.get(i) else {
            return;
        };
        let (listener, client) = (f.listener, f.client);
        if let Some(l) = self.listeners.get_mut(listener) {
            if l.flows.get_mut(&client).is_some_and(|e| e.io == i) {
                l.flows.remove(&client);
            }
        }
        self.close_flow(ring, i, Some(how));
    }

    /// Closes flow `i` (already out of its listener's table) as `how`
    /// (`None`: a drain): its receive is cancelled, and the entry goes once
    /// nothing of it is in flight.
    fn close_flow(&mut self, ring: &mut Ring, i: u32, how: Option<End>) {
        let Some(f) = self.flows.get_mut(i) else {
            return;
        };
        if f.closed {
            return;
        }
        f.closed = true;
        if let Some(how) = how {
            f.session.end(how);
        }
        if f.armed {
            ring.push(ops::cancel_all(f.fd.as_raw_fd()), Token::new(Op::Ignore, i));
        }
        self.free_flow_if_done(i);
    }

    fn free_flow_if_done(&mut self, i: u32) {
        let done = self
            .flows
            .get(i)
            .is_some_and(|f| f.closed && !f.armed && f.inflight == 0);
        if !done {
            return;
        }
        let Some(f) = self.flows.remove(i) else {
            return;
        };
        if let Some(l) = self.listeners.get_mut(f.listener) {
            l.live = l.live.saturating_sub(1);
        }
        self.free_listener_if_done(f.listener);
    }

    fn free_listener_if_done(&mut self, id: u32) {
        if self
            .listeners
            .get(id)
            .is_some_and(|l| l.stopping && !l.armed && l.live == 0)
        {
            self.listeners.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::engine::tcp::tests::SIZES;
    use crate::dataplane::engine::{drive, Engine, Tcp};
    use crate::testing::engine::{loopback_udp, shared_for_proto};
    use rand::SeedableRng;
    use tokio_uring::net::UdpSocket;

    /// An engine on this thread's runtime relaying a loopback UDP listener
    /// to `backend`; its driver runs as a task.
    fn engine(backend: SocketAddr) -> (Engine, SocketAddr, (u32, u32)) {
        let (fd, front) = loopback_udp();
        let rng = Rc::new(RefCell::new(SmallRng::seed_from_u64(7)));
        let shared = shared_for_proto(Protocol::Udp, front, backend);
        let e = Rc::new(RefCell::new(Tcp::new(shared, rng, SIZES).unwrap()));
        let id = e.borrow_mut().listen_udp(fd, front);
        tokio_uring::spawn(drive(e.clone()));
        (e, front, id)
    }

    async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let (r, b) = s.recv_from(vec![0u8; 2048]).await;
        let (n, from) = r.unwrap();
        (b[..n].to_vec(), from)
    }

    #[test]
    fn datagrams_keep_their_flow_replies_come_from_the_listener_and_idle_flows_hold_no_buffer() {
        tokio_uring::start(async {
            let backend = UdpSocket::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let (e, front, _) = engine(backend.local_addr().unwrap());
            let client = UdpSocket::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let other = UdpSocket::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let mut flow = None;
            for m in [&b"a"[..], b"bb", b"ccc"] {
                let (r, _) = client.send_to(m.to_vec(), front).await;
                r.unwrap();
                let (got, from) = recv(&backend).await;
                assert_eq!(got, m);
                // One flow: every datagram of the client comes from one socket.
                assert_eq!(*flow.get_or_insert(from), from);
            }
            let flow = flow.unwrap();
            let (r, _) = other.send_to(b"o".to_vec(), front).await;
            r.unwrap();
            let (got, other_flow) = recv(&backend).await;
            assert_eq!(got, b"o");
            assert_ne!(other_flow, flow);
            let (r, _) = backend.send_to(b"reply".to_vec(), flow).await;
            r.unwrap();
            let (got, from) = recv(&client).await;
            assert_eq!((got.as_slice(), from), (&b"reply"[..], front));
            let (r, _) = backend.send_to(b"o-reply".to_vec(), other_flow).await;
            r.unwrap();
            assert_eq!(recv(&other).await, (b"o-reply".to_vec(), front));
            // Nothing in flight: every buffer is back in the ring, though
            // three multishot receives are armed.
            assert_eq!(e.borrow().free_buffers(), SIZES.buffers);
            assert_eq!(e.borrow().udp_flows(), 2);
        });
    }

    #[test]
    fn stopping_a_listener_closes_it_and_its_flows_at_once() {
        tokio_uring::start(async {
            let backend = UdpSocket::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let (e, front, (id, serial)) = engine(backend.local_addr().unwrap());
            let client = UdpSocket::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let (r, _) = client.send_to(b"q".to_vec(), front).await;
            r.unwrap();
            let (_, flow) = recv(&backend).await;
            assert_eq!(e.borrow().udp_flows(), 1);
            e.borrow_mut().stop_udp(id);
            // The cancels complete as they are submitted: one poll reaps them.
            e.borrow_mut().poll();
            assert!(e.borrow().udp_closed(id, serial));
            assert_eq!(e.borrow().udp_flows(), 0);
            // Both sockets are closed: their ports can be bound again.
            std::net::UdpSocket::bind(front).expect("listener port still bound");
            std::net::UdpSocket::bind(flow).expect("flow port still bound");
        });
    }

    /// A blocking socket on loopback with `UDP_GRO` on (runs arrive whole)
    /// and, when `seg` is set, `UDP_SEGMENT` (a send of more than `seg`
    /// bytes leaves as a run of `seg`-byte datagrams).
    fn gso_socket(seg: Option<u16>) -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        gso::enable_gro(s.as_raw_fd()).unwrap();
        if let Some(seg) = seg {
            let v = libc::c_int::from(seg);
            // SAFETY: a live socket; the value is a c_int.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        }
        s
    }

    /// One receive: the bytes, the run's datagram size if it came whole,
    /// and the sender.
    fn recv_run(s: &std::net::UdpSocket) -> (Vec<u8>, Option<u16>, SocketAddr) {
        let mut buf = vec![0u8; 65536];
        let mut name = SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = Cmsg::default();
        let mut msg = empty_msghdr();
        msg.msg_name = name.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = name.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr();
        msg.msg_controllen = CMSG_ROOM;
        // SAFETY: every pointer in msg refers to a live local of this call.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel wrote msg_namelen bytes of address.
        unsafe { name.set_length(msg.msg_namelen) };
        buf.truncate(n as usize);
        // SAFETY: the kernel wrote msg_controllen bytes of control.
        let c = unsafe {
            std::slice::from_raw_parts(control.as_mut_ptr().cast::<u8>(), msg.msg_controllen)
        };
        (buf, gso::segment_size(c), name.as_socket().unwrap())
    }

    /// The descriptor of this process bound to `addr` (a flow's socket).
    fn fd_bound_to(addr: SocketAddr) -> RawFd {
        for e in std::fs::read_dir("/proc/self/fd").unwrap() {
            let Ok(fd) = e.unwrap().file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            // SAFETY: borrowed for this one call; a descriptor closed in
            // between only makes getsockname fail.
            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let local = socket2::SockRef::from(&b).local_addr();
            if local.ok().and_then(|a| a.as_socket()) == Some(addr) {
                return fd;
            }
        }
        panic!("no descriptor bound to {addr}");
    }

    fn pattern(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    #[test]
    fn runs_of_datagrams_cross_whole_both_ways_and_one_by_one_where_refused() {
        let backend = gso_socket(Some(200));
        let proxy =
            crate::testing::engine::Proxy::start_of(Protocol::Udp, backend.local_addr().unwrap());
        let client = gso_socket(Some(100));
        // One datagram first: once it is through, the engine has set up the
        // listener (a run arriving before that is cut up on arrival).
        client.send_to(b"hello", proxy.front).unwrap();
        let (got, seg, flow) = recv_run(&backend);
        assert_eq!((got.as_slice(), seg), (&b"hello"[..], None));
        // Four datagrams of 100 bytes in one send: the backend gets them in
        // one receive, still marked as 100-byte datagrams, on the same flow.
        let up = pattern(400, 1);
        client.send_to(&up, proxy.front).unwrap();
        let (got, seg, from) = recv_run(&backend);
        assert_eq!(
            (got.len(), seg, from),
            (400, Some(100), flow),
            "not relayed as one run"
        );
        assert_eq!(got, up);
        // A run of three 200-byte replies reaches the client whole, from
        // the address it sent to.
        let down = pattern(600, 2);
        backend.send_to(&down, flow).unwrap();
        let (got, seg, from) = recv_run(&client);
        assert_eq!((got.len(), seg, from), (600, Some(200), proxy.front));
        assert_eq!(got, down);
        // A path that refuses runs (here: no UDP checksums, which
        // segmentation needs) gets the datagrams one by one, on the same flow.
        let on: libc::c_int = 1;
        // SAFETY: the flow's live socket; the value is a c_int.
        let r = unsafe {
            libc::setsockopt(
                fd_bound_to(flow),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let up = pattern(300, 3);
        client.send_to(&up, proxy.front).unwrap();
        for k in 0..3 {
            let (got, seg, from) = recv_run(&backend);
            assert_eq!((got.len(), seg, from), (100, None, flow), "datagram {k}");
            assert_eq!(got, up[k * 100..(k + 1) * 100]);
        }
    }

    #[test]
    fn source_addresses_parse_from_sockaddr_bytes() {
        let v4 = SockAddr::from(SocketAddr::from(([192, 0, 2, 7], 5353)));
        // SAFETY: the storage holds len initialised bytes.
        let b = unsafe { std::slice::from_raw_parts(v4.as_ptr().cast::<u8>(), v4.len() as usize) };
        assert_eq!(source_of(b), Some("192.0.2.7:5353".parse().unwrap()));
        let a6: SocketAddr = "[2001:db8::9]:53".parse().unwrap();
        let v6 = SockAddr::from(a6);
        // SAFETY: as above.
        let b = unsafe { std::slice::from_raw_parts(v6.as_ptr().cast::<u8>(), v6.len() as usize) };
        assert_eq!(source_of(b), Some(a6));
        assert_eq!(source_of(&b[..3]), None);
        assert_eq!(source_of(&[0u8; 16]), None);
    }
}
