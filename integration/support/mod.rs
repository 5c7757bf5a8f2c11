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
    addrs::{np, Loopback},
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

/// A free TCP+UDP port on 127.0.0.1 (best effort: bound then released).
pub fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
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
