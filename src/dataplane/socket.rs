//! Kernel-socket front end (NodePort, LoadBalancer IPs, externalIPs): one
//! tokio-uring runtime per data-plane thread, each holding its own SO_REUSEPORT
//! listeners, opened and closed as snapshots come and go; TCP connections run
//! on the thread's io_uring engine (`engine`), UDP flows on the runtime.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use socket2::{Domain, SockFilter, Socket, Type};
use tokio::sync::{mpsc, oneshot, watch};

use super::engine::{drive, Sizes, Tcp};
use super::listener::{Listeners, Programmed, LISTEN_RETRY};
use super::Shared;
use crate::handover::{Inherited, Pin, Role};
use crate::model::Protocol;
use crate::state::{ListenerMode, ListenerSpec, Snapshot};

/// Accept backlog of each listener.
const BACKLOG: i32 = 4096;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {proto} {addr}: {source}")]
pub struct ListenError {
    /// Address.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Protocol,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// Opens the kernel socket for a listener spec (not yet registered with
/// io_uring): one received from the previous process when `inherited` holds
/// one for its address, else a new one.
pub fn open_or_take(spec: &ListenerSpec, inherited: &Inherited) -> Result<Socket, ListenError> {
    match inherited.take(Role::Listener, spec.addr, spec.proto.into()) {
        Some(fd) => adopt(spec, fd),
        None => open(spec),
    }
}

/// Takes `fd`, a socket the previous process listened on for `spec`'s
/// address, as `spec`'s: checked to be that socket, its filter made `spec`'s.
/// The socket is shared with that process until it stops accepting.
pub fn adopt(spec: &ListenerSpec, fd: OwnedFd) -> Result<Socket, ListenError> {
    let err = |source| ListenError {
        addr: spec.addr,
        proto: spec.proto,
        source,
    };
    let s = Socket::from(fd);
    let ty = match spec.proto {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let local = s.local_addr().map_err(err)?.as_socket();
    if s.r#type().map_err(err)? != ty || local != Some(spec.addr) {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the socket handed over is {local:?}, not this listener"),
        )));
    }
    if filter(spec).is_none() {
        // ENOENT when it had none: nothing to undo.
        let _ = s.detach_filter();
    }
    set_filter(&s, spec).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    Ok(s)
}

/// Opens a new kernel socket for a listener spec (not yet registered with io_uring).
pub fn open(spec: &ListenerSpec) -> Result<Socket, ListenError> {
    let err = |source| ListenError {
        addr: spec.addr,
        proto: spec.proto,
        source,
    };
    let ty = match spec.proto {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let s = Socket::new(Domain::for_address(spec.addr), ty, None).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    if spec.addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    set_filter(&s, spec).map_err(err)?;
    s.bind(&spec.addr.into()).map_err(err)?;
    if spec.proto == Protocol::Tcp {
        s.listen(BACKLOG).map_err(err)?;
    }
    s.set_nonblocking(true).map_err(err)?;
    Ok(s)
}

/// The socket filter `spec` needs, if any. Socket filters run before the
/// stack answers: a dropped SYN gets no SYN-ACK and the client times out, as
/// with kube-proxy's DROP rules.
fn filter(spec: &ListenerSpec) -> Option<Vec<Insn>> {
    match spec.mode {
        ListenerMode::Drop => Some(vec![ret(0)]),
        ListenerMode::Accept => source_filter(spec.addr, &spec.allow),
    }
}

/// Attaches `spec`'s filter to `s` (replacing one it had).
fn set_filter(s: &Socket, spec: &ListenerSpec) -> std::io::Result<()> {
    if let Some(prog) = filter(spec) {
        let prog: Vec<SockFilter> = prog
            .iter()
            .map(|i| SockFilter::new(i.code, i.jt, i.jf, i.k))
            .collect();
        s.attach_filter(&prog)?;
    }
    Ok(())
}

/// One classic-BPF instruction (kept apart from socket2's type so the program
/// can be built and tested as plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant.
    pub k: u32,
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// Offset base for loads relative to the network (IP) header.
const SKF_NET_OFF: u32 = (-0x100000i32) as u32;

fn ret(k: u32) -> Insn {
    Insn {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A filter accepting only packets whose IP source is inside one of `allow`
/// (same family as the listener); `None` when everything is allowed or the
/// program would not fit classic BPF's 8-bit jumps (then the userspace check
/// in `resolve` is the only guard).
pub fn source_filter(local: SocketAddr, allow: &[ipnet::IpNet]) -> Option<Vec<Insn>> {
    if allow.is_empty() {
        return None;
    }
    let mut prog = Vec::new();
    for net in allow {
        // (offset of the source address in the IP header, address words, mask words)
        let (off, addr, mask): (u32, Vec<u32>, Vec<u32>) = match (net, local) {
            (ipnet::IpNet::V4(n), SocketAddr::V4(_)) => (
                12,
                vec![u32::from(n.network())],
                vec![u32::from(n.netmask())],
            ),
            (ipnet::IpNet::V6(n), SocketAddr::V6(_)) => {
                let words = |b: [u8; 16]| -> Vec<u32> {
                    b.as_chunks::<4>()
                        .0
                        .iter()
                        .map(|c| u32::from_be_bytes(*c))
                        .collect()
                };
                (8, words(n.network().octets()), words(n.netmask().octets()))
            }
            _ => continue,
        };
        let words: Vec<(u32, u32, u32)> = (0u32..)
            .zip(addr.iter().zip(&mask))
            .filter(|(_, (_, m))| **m != 0)
            .map(|(i, (a, m))| (off + 4 * i, *a, *m))
            .collect();
        let block = 3 * words.len() + 1;
        for (i, (o, a, m)) in words.iter().enumerate() {
            // instructions left in this block after this word's jeq
            let rest = u8::try_from(block - 3 * (i + 1)).ok()?;
            prog.push(Insn {
                code: BPF_LD_W_ABS,
                jt: 0,
                jf: 0,
                k: SKF_NET_OFF.wrapping_add(*o),
            });
            prog.push(Insn {
                code: BPF_AND_K,
                jt: 0,
                jf: 0,
                k: *m,
            });
            prog.push(Insn {
                code: BPF_JEQ_K,
                jt: 0,
                jf: rest,
                k: *a,
            });
        }
        prog.push(ret(u32::MAX));
    }
    prog.push(ret(0));
    (prog.len() <= 4096).then_some(prog)
}

/// What the control loop asks of a data-plane thread besides following
/// snapshots (the handover to a new process).
#[derive(Debug)]
pub enum WorkerCmd {
    /// Duplicates of every listener's socket, and the thread's UDP flows.
    Dump(oneshot::Sender<WorkerDump>),
    /// Stop accepting on every listener without touching the sockets (the
    /// new process shares them); keep relaying; follow no snapshot's
    /// listeners any more.
    Release(oneshot::Sender<()>),
    /// UDP flows still open on released listeners (what a drain waits for).
    Flows(oneshot::Sender<usize>),
}

/// One thread's listeners and flows, for the next process.
#[derive(Debug, Default)]
pub struct WorkerDump {
    /// Each listener's spec with a descriptor of its socket.
    pub sockets: Vec<(ListenerSpec, OwnedFd)>,
    /// Each UDP flow's endpoint.
    pub pins: Vec<Pin>,
}

/// The command channels of the kernel-socket threads.
#[derive(Debug, Clone, Default)]
pub struct Commands(Vec<mpsc::UnboundedSender<WorkerCmd>>);

impl Commands {
    /// Asks every thread and collects the answers (a thread that has
    /// stopped answers nothing).
    pub async fn ask<T>(&self, cmd: impl Fn(oneshot::Sender<T>) -> WorkerCmd) -> Vec<T> {
        let mut out = Vec::with_capacity(self.0.len());
        for c in &self.0 {
            let (tx, rx) = oneshot::channel();
            if c.send(cmd(tx)).is_ok() {
                if let Ok(v) = rx.await {
                    out.push(v);
                }
            }
        }
        out
    }
}

/// The threads spawned, how far they applied the snapshots, their commands.
pub type Spawned = (Vec<std::thread::JoinHandle<()>>, Arc<Programmed>, Commands);

/// Runs `workers` data-plane threads until the snapshot channel closes; they
/// report the snapshots they applied in the returned [`Programmed`].
pub fn spawn_workers(
    workers: usize,
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<Snapshot>>,
) -> std::io::Result<Spawned> {
    let programmed = Programmed::new(workers);
    let mut cmds = Vec::with_capacity(workers);
    let threads = (0..workers)
        .map(|id| {
            let (shared, rx, programmed) = (shared.clone(), rx.clone(), programmed.clone());
            let (tx, cmd_rx) = mpsc::unbounded_channel();
            cmds.push(tx);
            std::thread::Builder::new()
                .name(format!("ringvip-dp-{id}"))
                .spawn(move || run_worker(id, shared, rx, cmd_rx, programmed))
        })
        .collect::<std::io::Result<_>>()?;
    Ok((threads, programmed, Commands(cmds)))
}

/// Runs [`worker`] on a current-thread tokio runtime of the thread's own.
/// Not tokio-uring's: the thread's I/O is on the engine's ring, and
/// tokio-uring's runtime flushed its own (empty) ring with a system call
/// every time the thread went idle, 1.6 per request (BENCHMARKS.md,
/// "System calls per request").
fn run_worker(
    id: usize,
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<Snapshot>>,
    cmd_rx: mpsc::UnboundedReceiver<WorkerCmd>,
    programmed: Arc<Programmed>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot start the data-plane thread's runtime");
            return;
        }
    };
    tokio::task::LocalSet::new().block_on(&rt, worker(id, shared, rx, cmd_rx, programmed));
}

/// One data-plane thread: keeps its listeners equal to the snapshot's until
/// released.
async fn worker(
    id: usize,
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut cmds: mpsc::UnboundedReceiver<WorkerCmd>,
    programmed: Arc<Programmed>,
) {
    let rng = Rc::new(RefCell::new(SmallRng::from_os_rng()));
    let engine = match Tcp::new(shared.clone(), rng.clone(), Sizes::default()) {
        Ok(t) => Rc::new(RefCell::new(t)),
        Err(e) => {
            // Without its ring the thread serves nothing; the others still do.
            tracing::error!(worker = id, error = %e, "cannot set up the io_uring engine");
            return;
        }
    };
    Tcp::attach(&engine);
    let driver = tokio::task::spawn_local(drive(engine.clone()));
    let mut listeners = Listeners::new(id);
    let mut released = false;
    let mut changed = true;
    loop {
        if changed {
            let snap = rx.borrow_and_update().clone();
            if !released {
                listeners.sync(snap.listeners(), &engine).await;
            }
            programmed.applied(id, snap.generation);
        }
        let retry = !released && listeners.retrying();
        tokio::select! {
            // A port another socket held when the snapshot came is served as
            // soon as it is free, not only at the next change.
            _ = tokio::time::sleep(LISTEN_RETRY), if retry => {
                changed = true;
            }
            r = rx.changed() => {
                if r.is_err() {
                    break;
                }
                changed = true;
            }
            Some(cmd) = cmds.recv() => {
                changed = false;
                match cmd {
                    WorkerCmd::Dump(tx) => {
                        let _ = tx.send(listeners.dump());
                    }
                    WorkerCmd::Release(tx) => {
                        listeners.release();
                        released = true;
                        let _ = tx.send(());
                    }
                    WorkerCmd::Flows(tx) => {
                        let _ = tx.send(listeners.released_flows());
                    }
                }
            }
        }
    }
    driver.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a filter program over a fake IP header, as the kernel would.
    fn run(prog: &[Insn], ip_header: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let o = i.k.wrapping_sub(SKF_NET_OFF) as usize;
                    a = u32::from_be_bytes(ip_header[o..o + 4].try_into().unwrap());
                }
                BPF_AND_K => a &= i.k,
                BPF_JEQ_K => pc += if a == i.k { i.jt } else { i.jf } as usize,
                BPF_RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn v4_header(src: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[12..16].copy_from_slice(&src);
        h
    }

    fn v6_header(src: std::net::Ipv6Addr) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[8..24].copy_from_slice(&src.octets());
        h
    }

    #[test]
    fn v4_filter_accepts_only_listed_ranges() {
        let allow: Vec<ipnet::IpNet> = vec![
            "203.0.113.0/24".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
        ];
        let prog = source_filter("198.51.100.1:80".parse().unwrap(), &allow).unwrap();
        assert_ne!(run(&prog, &v4_header([203, 0, 113, 9])), 0);
        assert_ne!(run(&prog, &v4_header([192, 0, 2, 7])), 0);
        assert_eq!(run(&prog, &v4_header([192, 0, 2, 8])), 0);
        assert_eq!(run(&prog, &v4_header([10, 0, 0, 1])), 0);
    }

    #[test]
    fn v6_filter_checks_every_masked_word() {
        let allow: Vec<ipnet::IpNet> = vec!["2001:db8:1::/48".parse().unwrap()];
        let prog = source_filter("[2001:db8::1]:80".parse().unwrap(), &allow).unwrap();
        assert_ne!(run(&prog, &v6_header("2001:db8:1::99".parse().unwrap())), 0);
        assert_eq!(run(&prog, &v6_header("2001:db8:2::99".parse().unwrap())), 0);
        assert_eq!(run(&prog, &v6_header("2002:db8:1::99".parse().unwrap())), 0);
    }

    #[test]
    fn empty_allow_list_needs_no_filter_and_other_family_drops() {
        assert!(source_filter("198.51.100.1:80".parse().unwrap(), &[]).is_none());
        let allow: Vec<ipnet::IpNet> = vec!["2001:db8::/32".parse().unwrap()];
        let prog = source_filter("198.51.100.1:80".parse().unwrap(), &allow).unwrap();
        assert_eq!(run(&prog, &v4_header([203, 0, 113, 9])), 0);
    }
}
