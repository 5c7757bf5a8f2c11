//! Addresses and names no other test holds, whether that test runs in this
//! process or in another one: nextest runs every test in a process of its
//! own, several at once, and another checkout's suite may run beside this one.
//!
//! **Loopback blocks.** All of 127.0.0.0/8 is local on Linux, so a test binds
//! its backends, client source addresses and load-balancer IPs on a /24 of its
//! own, a [`Loopback`]. Block `n` (0 to 4095) is `127.(16 + n / 256).(n %
//! 256).0/24`, inside 127.16.0.0/12: clear of 127.0.0.1 (where the tests'
//! NodePorts and admin servers listen) and of the ranges older checkouts
//! number by hand (127.0.x.y, 127.7.x.y).
//!
//! Why two tests can never hold the same block: block `n` belongs to whoever
//! holds the exclusive `flock(2)` of `/tmp/ringvip-itests/loopback-<n>`.
//! [`Loopback::take`] walks `n` upwards and keeps the first block whose file
//! it locks without waiting. The kernel grants one exclusive flock per file at
//! a time, to one open file description: across processes, and within one
//! process too, since every `take` opens the file anew (so two threads, or two
//! calls of one test, get different blocks). The descriptor stays open until
//! the process exits, on purpose: the block then outlives every socket,
//! thread and child process the test made with it, and the kernel releases
//! the lock however the process ends (even SIGKILL), so no block is lost to
//! a crashed run. Under nextest a process is one test; under `cargo test` a
//! binary holds one block per test it ran, a few dozen of the 4096.
//!
//! **Names.** Network namespaces and devices are named by [`unique_name`]:
//! this process's id and a counter of this process, so two live processes
//! (or two tests of one) never pick the same name.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Where the lock files of the loopback blocks live (shared by every user
/// and checkout on the machine, so their tests cannot collide either).
const LOCK_DIR: &str = "/tmp/ringvip-itests";
/// Blocks in 127.16.0.0/12.
const BLOCKS: u16 = 4096;

/// The lock files of the blocks this process holds: kept open until it exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// A /24 of loopback addresses that this test alone uses (see the module
/// documentation for why). Copy it freely: the block stays held until the
/// process exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loopback {
    a: u8,
    b: u8,
}

impl Loopback {
    /// Takes a block no other test holds.
    pub fn take() -> Loopback {
        let dir = Path::new(LOCK_DIR);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{LOCK_DIR}: {e}"));
        // Sticky and open to all, like /tmp: another user's run locks here too
        // (best effort: only the directory's owner may change it).
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
        for n in 0..BLOCKS {
            let file = lock_file(&block_path(n));
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
                let [hi, lo] = n.to_be_bytes();
                return Loopback { a: 16 + hi, b: lo };
            }
        }
        panic!("all {BLOCKS} loopback blocks are held: are that many tests running?");
    }

    /// Host `host` of the block: `127.a.b.<host>`.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.a, self.b, host)
    }

    /// Hosts `hosts` of the block.
    pub fn ips(&self, hosts: impl IntoIterator<Item = u8>) -> Vec<Ipv4Addr> {
        hosts.into_iter().map(|h| self.ip(h)).collect()
    }

    /// `host`'s address with `port`.
    pub fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip(host), port))
    }

    /// The file whose flock holds the block.
    pub fn lock_path(&self) -> PathBuf {
        block_path(u16::from_be_bytes([self.a - 16, self.b]))
    }

    /// The whole block, `127.a.b.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}/24", self.ip(0))
    }
}

fn block_path(n: u16) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("loopback-{n}"))
}

/// Opens (creating it when missing) the lock file of one block. Read access
/// is all flock needs, so a file another user created serves as well.
/// Holds `/tmp/ringvip-itests/<name>.lock` exclusively (waiting for it)
/// until the returned file is dropped: for tests, in any test binary, that
/// cannot run beside each other.
pub fn exclusive(name: &str) -> File {
    std::fs::create_dir_all(LOCK_DIR).unwrap_or_else(|e| panic!("{LOCK_DIR}: {e}"));
    let file = lock_file(&Path::new(LOCK_DIR).join(format!("{name}.lock")));
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {name}: {}", std::io::Error::last_os_error());
    file
}

fn lock_file(path: &Path) -> File {
    File::open(path)
        .or_else(|_| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        })
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The NodePort `port` on 127.0.0.1, where `Ringvip::spawn` has ringvip open
/// NodePorts.
pub fn np(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

static NEXT_NAME: AtomicU32 = AtomicU32::new(0);

/// `<prefix><pid>-<k>`, k counting the names this process made: unique among
/// live processes (so among parallel runs), and within this one.
pub fn unique_name(prefix: &str) -> String {
    let k = NEXT_NAME.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}-{k}", std::process::id())
}
