//! Kernel sockets as `ss` lists them.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// One kernel socket as `ss` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sock {
    /// `tcp` or `udp`.
    pub proto: String,
    /// `LISTEN`, `UNCONN`, `ESTAB`, `CLOSE-WAIT`, ...
    pub state: String,
    /// Local address:port.
    pub local: String,
    /// Peer address:port (`*` parts when unconnected).
    pub peer: String,
}

/// TCP and UDP sockets of this network namespace that `ss` selects with
/// `filter` (ss's filter syntax, e.g. `sport = :30085`).
pub fn sockets(filter: &str) -> Vec<Sock> {
    ss(&["-t", "-u", "-a"], filter)
}

/// Like [`sockets`], only LISTEN (TCP) and UNCONN (UDP) ones, asked so that
/// the kernel skips TIME-WAIT sockets, which a load leaves by the ten
/// thousand and which make a full listing take 100 ms.
pub fn listening(filter: &str) -> Vec<Sock> {
    // With one `state`, ss drops its state column: put it back.
    let tcp = ss_lines(&["-t", "state", "listening"], filter)
        .into_iter()
        .filter_map(|f| match f.as_slice() {
            [.., local, peer] => Some(Sock {
                proto: "tcp".into(),
                state: "LISTEN".into(),
                local: local.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        });
    // With one protocol, ss drops its netid column.
    let udp = ss_lines(&["-u", "-l"], filter)
        .into_iter()
        .filter_map(|f| match f.as_slice() {
            [state, _, _, local, peer, ..] => Some(Sock {
                proto: "udp".into(),
                state: state.clone(),
                local: local.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        });
    tcp.chain(udp).collect()
}

fn ss(which: &[&str], filter: &str) -> Vec<Sock> {
    ss_lines(which, filter)
        .into_iter()
        .filter_map(|f| match f.as_slice() {
            [proto, state, _, _, local, peer, ..] => Some(Sock {
                proto: proto.clone(),
                state: state.clone(),
                local: local.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// `ss -H -n WHICH FILTER`, each line split into fields.
fn ss_lines(which: &[&str], filter: &str) -> Vec<Vec<String>> {
    let out = Command::new("ss")
        .args(["-H", "-n"])
        .args(which)
        .args(filter.split_whitespace())
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "ss {filter}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Sockets whose local port is `port`.
pub fn sockets_on(port: u16) -> Vec<Sock> {
    sockets(&format!("sport = :{port}"))
}

/// Waits at most `limit` for the sockets on `port` to satisfy `ok` (the
/// contract: a listener change reaches the kernel within that time); the
/// sockets last seen, and whether they did.
pub fn sockets_within(
    limit: Duration,
    port: u16,
    ok: impl Fn(&[Sock]) -> bool,
) -> (bool, Vec<Sock>) {
    let end = Instant::now() + limit;
    loop {
        // A listing shows the sockets as they were when it started (it may
        // take 100 ms among many TIME-WAIT sockets): judge it by that time.
        let started = Instant::now();
        let s = sockets_on(port);
        if ok(&s) || started >= end {
            return (ok(&s), s);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// How many of `socks` are in `state`.
pub fn count(socks: &[Sock], state: &str) -> usize {
    socks.iter().filter(|s| s.state == state).count()
}
