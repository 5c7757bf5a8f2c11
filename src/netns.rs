//! Moving the calling thread into another network namespace and back: how
//! the demo creates its TUN device (and routes) in a namespace of its own.
//! Namespaces belong to threads; sockets and devices stay in the namespace
//! they were created in, whatever their thread does later.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

fn setns(f: &File) -> io::Result<()> {
    // SAFETY: a valid namespace descriptor; only the calling thread moves.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread is inside another network namespace until
/// [`Entered::leave`] (or drop, which returns quietly).
#[derive(Debug)]
pub struct Entered {
    home: Option<File>,
}

/// Moves the calling thread into the network namespace at `ns` (such as
/// `/run/netns/NAME`; needs `CAP_SYS_ADMIN`).
pub fn enter(ns: &Path) -> io::Result<Entered> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let target =
        File::open(ns).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", ns.display())))?;
    setns(&target)
        .map_err(|e| io::Error::new(e.kind(), format!("entering {}: {e}", ns.display())))?;
    Ok(Entered { home: Some(home) })
}

impl Entered {
    /// Returns the thread to the namespace it came from.
    pub fn leave(mut self) -> io::Result<()> {
        match self.home.take() {
            Some(home) => setns(&home),
            None => Ok(()),
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            if let Err(e) = setns(&home) {
                tracing::error!(error = %e, "could not return to the original network namespace");
            }
        }
    }
}
