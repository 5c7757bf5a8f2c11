//! Harness for end-to-end tests: the real `ringvip` binary, real sockets on
//! loopback addresses each test takes for itself ([`addrs`]), network
//! namespaces the tests create ([`netns`]), test backends, clients, manifest
//! builders and bounded waits. Every test binary includes this module
//! (`mod support;`) and uses part of it.

#![allow(dead_code)]

pub mod addrs;
pub mod backend;
pub mod client;
pub mod kubeapi;
pub mod launcher;
pub mod manifest;
pub mod metrics;
pub mod netns;
pub mod sockets;
pub mod web;

// The helpers at the top level: each test binary uses part of them.
#[allow(unused_imports)]
pub use self::{
    addrs::{exclusive, np, Loopback},
    backend::*,
    client::*,
    launcher::*,
    manifest::*,
    metrics::*,
    sockets::*,
    web::*,
};

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// A free TCP+UDP port on 127.0.0.1, below the kernel's ephemeral range.
///
/// Tests close and reopen listeners on these ports; a port in the ephemeral
/// range may meanwhile become some client socket's (any test's, or ringvip's
/// own backend connects), and the reopen then fails with "address in use".
/// Below the range only an explicit bind takes a port, and the ports are
/// handed out in turn through a counter file shared by every test process,
/// so two tests never get the same one (bound then released: best effort
/// against programs outside the suite).
pub fn free_port() -> u16 {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let base = low.saturating_sub(12_000).max(1024);
    let span = u32::from(low - base);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(std::env::temp_dir().join("ringvip-test-ports"))
        .unwrap();
    // SAFETY: flock on a descriptor we own; released when `f` closes.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    let mut next: u32 = text.trim().parse().unwrap_or(0);
    for _ in 0..span {
        let p = base + (next % span) as u16;
        next = (next + 1) % span;
        let free = TcpListener::bind(("127.0.0.1", p)).is_ok()
            && UdpSocket::bind(("127.0.0.1", p)).is_ok();
        if free {
            f.rewind().unwrap();
            f.set_len(0).unwrap();
            write!(f, "{next}").unwrap();
            return p;
        }
    }
    panic!("no free port in {base}..{low}");
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// True when running under CI, where every peer must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// [`need_program`] for several programs at once: all of them, or `None`
/// (each missing one explained).
pub fn need_programs<const N: usize>(wanted: [(&str, &str); N]) -> Option<[PathBuf; N]> {
    let found: Vec<Option<PathBuf>> = wanted
        .iter()
        .map(|(name, why)| need_program(name, why))
        .collect();
    found
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .try_into()
        .ok()
}

/// Finds a program, or explains the skip (and fails under CI, where `.ci/run`
/// installs it).
pub fn need_program(name: &str, why: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    assert!(
        !in_ci(),
        "{name} is missing under CI: .ci/run must install it ({why})"
    );
    eprintln!("SKIP: {name} not installed; {why}. `apt-get install {name}` to run this test.");
    None
}
