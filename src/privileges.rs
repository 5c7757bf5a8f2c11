//! Least privilege after setup: once the TUN device is open and configured,
//! ringvip keeps only `CAP_NET_ADMIN` and `CAP_NET_BIND_SERVICE` in every
//! capability set and sets `no_new_privs`, so a bug reachable from input
//! cannot use root's other powers (read any file, load modules, ptrace, …).
//!
//! Why those two stay: listeners are opened whenever a snapshot asks for them
//! (a LoadBalancer IP or externalIP on port 80 may appear at any time), which
//! needs `CAP_NET_BIND_SERVICE` for ports below 1024 (and a `--dns-addr` on
//! port 53); `CAP_NET_ADMIN` is what the TUN device and its routes were set up
//! with and stays for the process's whole life, as in the systemd unit shipped
//! in `config/ringvip.service`, so the two agree.
//!
//! Capabilities belong to threads: the drop runs on the main thread before
//! any data-plane thread is started, and every thread started later inherits
//! the reduced sets.

use std::io;

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities ringvip keeps after setup.
pub const KEPT: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_BIND_SERVICE];

/// Why dropping privileges failed. Start-up stops: running with more
/// privileges than announced would be worse than not running.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Reading or changing a capability set failed.
    #[error("{step}: {message}")]
    Caps {
        /// What was being done (`reducing the permitted set`, …).
        step: &'static str,
        /// The error from the capability syscalls.
        message: String,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] io::Error),
}

/// What the calling thread holds after [`drop_after_setup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// Effective set, sorted names.
    pub effective: Vec<String>,
    /// Permitted set, sorted names.
    pub permitted: Vec<String>,
    /// Bounding set, sorted names.
    pub bounding: Vec<String>,
    /// False when the bounding set could not be reduced (no `CAP_SETPCAP`,
    /// e.g. an unprivileged user or a systemd unit that already bounded it).
    pub bounding_reduced: bool,
}

/// The part of `current` ringvip keeps: `current ∩ KEPT`.
pub fn keep(current: &CapsHashSet) -> CapsHashSet {
    current
        .iter()
        .copied()
        .filter(|c| KEPT.contains(c))
        .collect()
}

fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v
}

fn caps_err(step: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivilegeError {
    move |e| PrivilegeError::Caps {
        step,
        message: e.to_string(),
    }
}

/// Reduces the calling thread's bounding, ambient, effective, permitted and
/// inheritable sets to [`KEPT`] (never adding anything it did not hold) and
/// sets `no_new_privs`. Threads started afterwards inherit the result.
pub fn drop_after_setup() -> Result<Retained, PrivilegeError> {
    let effective =
        caps::read(None, CapSet::Effective).map_err(caps_err("reading the effective set"))?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    let can_bound = effective.contains(&Capability::CAP_SETPCAP);
    if can_bound {
        let bounding =
            caps::read(None, CapSet::Bounding).map_err(caps_err("reading the bounding set"))?;
        for c in bounding.iter().filter(|c| !KEPT.contains(c)) {
            caps::drop(None, CapSet::Bounding, *c)
                .map_err(caps_err("reducing the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing the ambient set"))?;
    // Effective before permitted: effective must stay a subset of permitted.
    caps::set(None, CapSet::Effective, &keep(&effective))
        .map_err(caps_err("reducing the effective set"))?;
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(caps_err("reading the permitted set"))?;
    caps::set(None, CapSet::Permitted, &keep(&permitted))
        .map_err(caps_err("reducing the permitted set"))?;
    let inheritable =
        caps::read(None, CapSet::Inheritable).map_err(caps_err("reading the inheritable set"))?;
    caps::set(None, CapSet::Inheritable, &keep(&inheritable))
        .map_err(caps_err("reducing the inheritable set"))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(PrivilegeError::NoNewPrivs(io::Error::last_os_error()));
    }
    let read = |set, step| caps::read(None, set).map_err(caps_err(step));
    Ok(Retained {
        effective: names(&read(CapSet::Effective, "reading the effective set")?),
        permitted: names(&read(CapSet::Permitted, "reading the permitted set")?),
        bounding: names(&read(CapSet::Bounding, "reading the bounding set")?),
        bounding_reduced: can_bound,
    })
}

/// [`drop_after_setup`] with one log line saying what was kept.
pub fn drop_and_log() -> Result<Retained, PrivilegeError> {
    let r = drop_after_setup()?;
    if r.bounding_reduced {
        tracing::info!(
            effective = %r.effective.join(","),
            permitted = %r.permitted.join(","),
            bounding = %r.bounding.join(","),
            "capabilities dropped after setup; kept only CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, no_new_privs set"
        );
    } else {
        tracing::info!(
            effective = %r.effective.join(","),
            permitted = %r.permitted.join(","),
            "capabilities dropped after setup; bounding set left as given (no CAP_SETPCAP), no_new_privs set"
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_is_the_intersection_with_kept() {
        let all = caps::all();
        let k = keep(&all);
        assert_eq!(k.len(), 2);
        assert!(k.contains(&Capability::CAP_NET_ADMIN));
        assert!(k.contains(&Capability::CAP_NET_BIND_SERVICE));
        // Never adds what was not held.
        let only_admin: CapsHashSet = [Capability::CAP_NET_ADMIN, Capability::CAP_SYS_ADMIN]
            .into_iter()
            .collect();
        assert_eq!(
            keep(&only_admin),
            [Capability::CAP_NET_ADMIN]
                .into_iter()
                .collect::<CapsHashSet>()
        );
        assert!(keep(&CapsHashSet::new()).is_empty());
    }

    fn status_field(status: &str, name: &str) -> u64 {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} missing in status"));
        u64::from_str_radix(v.trim(), 16)
            .or_else(|_| v.trim().parse())
            .unwrap_or_else(|e| panic!("{name} {v}: {e}"))
    }

    /// Capabilities are per thread: the drop runs on a thread of its own, so
    /// the test process keeps its own. As root every set ends up exactly
    /// NET_ADMIN + NET_BIND_SERVICE; unprivileged, nothing is gained.
    #[test]
    fn drop_leaves_only_kept_capabilities_on_the_thread() {
        let (before, after) = std::thread::spawn(|| {
            let before = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let r = drop_after_setup().unwrap();
            let after = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            (before, (after, r))
        })
        .join()
        .unwrap();
        let (after, r) = after;
        let kept_mask: u64 = (1 << 12) | (1 << 10);
        for field in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            let was = status_field(&before, field);
            let now = status_field(&after, field);
            assert_eq!(now, was & kept_mask, "{field} was {was:x}, now {now:x}");
        }
        assert_eq!(status_field(&after, "NoNewPrivs:"), 1);
        let bnd = status_field(&after, "CapBnd:");
        if r.bounding_reduced {
            assert_eq!(bnd, kept_mask, "CapBnd {bnd:x}");
            assert_eq!(r.bounding, ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]);
        } else {
            assert_eq!(bnd, status_field(&before, "CapBnd:"));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 && status_field(&before, "CapEff:") != 0 {
            assert!(r.bounding_reduced);
            assert_eq!(r.effective, ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]);
            assert_eq!(r.permitted, ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]);
        } else {
            eprintln!("not root: only checked that nothing was gained");
        }
    }

    /// Part 7: the metrics/admin API and the health address listen on
    /// localhost unless told otherwise.
    #[test]
    fn admin_and_metrics_default_to_localhost() {
        let s = crate::config::AdminOptions::default();
        assert!(s.metrics_addr.ip().is_loopback(), "{}", s.metrics_addr);
        assert!(s.health_addr.ip().is_loopback(), "{}", s.health_addr);
    }
}
