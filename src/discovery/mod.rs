//! Sources of Kubernetes objects. Every source speaks the same typed protocol
//! into the control loop, [`Batch`]es of [`Update`]s, so the file source, the
//! API source and test fakes are interchangeable. A batch is a source's only
//! output: it carries what the control loop needs to keep health and metrics
//! (when it was queued, when its changes happened), and only the control loop
//! touches those.

pub(crate) mod convert;
pub mod file;
pub(crate) mod kube;
pub(crate) mod selector;

#[cfg(test)]
mod proptests;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::SystemTime;

use crate::model::{Kind, Object, ObjectKey};

/// A 128-bit fingerprint (two SipHash passes with different prefixes): two
/// values with the same print are taken as equal. The sources compare what
/// they hand out, and the file source a document's text, by it.
pub(crate) type Print = (u64, u64);

/// The [`Print`] of `v`.
pub(crate) fn print<T: Hash + ?Sized>(v: &T) -> Print {
    let pass = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        v.hash(&mut h);
        h.finish()
    };
    (pass(0), pass(1))
}

/// What a source sends: changes for the store, in order, with their times.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The changes, applied in order.
    pub updates: Vec<Update>,
    /// When the source queued them: the start of "pending" for health
    /// (`/healthz` fails once a batch waited the health timeout unapplied).
    pub queued: SystemTime,
    /// When the changes happened at their origin (an EndpointSlice's
    /// `last-change-trigger-time`, the moment a manifest change was noticed):
    /// the start of each one's network programming latency. Empty when the
    /// origin is unknown or older than the source.
    pub triggers: Vec<SystemTime>,
}

impl Batch {
    /// Changes queued now, with no trigger times.
    pub fn now(updates: Vec<Update>) -> Self {
        Batch {
            updates,
            queued: SystemTime::now(),
            triggers: Vec::new(),
        }
    }
}

/// One change from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The source's complete current set: everything it sent before is replaced.
    Reset(Vec<Object>),
    /// An object was added or changed.
    Upsert(Box<Object>),
    /// An object is gone.
    Delete(Kind, ObjectKey),
    /// A result of ringvip's own checking (readiness probes, health
    /// checks): not an object, but what the store lays over them.
    Checked(Checked),
}

/// A change of state found by ringvip's prober or health checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Container `container`'s readinessProbe of Pod `pod` now says `ready`.
    PodReady {
        /// The Pod.
        pod: ObjectKey,
        /// Index of the container in `spec.containers`' probes.
        container: usize,
        /// The kubelet's result after its thresholds.
        ready: bool,
    },
    /// `endpoint` of `service` is now up or down (after rise/fall).
    Endpoint {
        /// The Service whose annotation asks for the check.
        service: ObjectKey,
        /// The endpoint checked.
        endpoint: std::net::SocketAddr,
        /// Up (usable) or down.
        up: bool,
    },
}
