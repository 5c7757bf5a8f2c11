//! What the tasks of one TUN queue's thread share: its stack, its UDP flows,
//! the driver's wake-up, and the data plane's shared state.

use std::cell::RefCell;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::Notify;

use super::flows::{Flows, Taken};
use super::packet::ConnKey;
use super::stack::{Stack, TunSettings};
use crate::dataplane::Shared;

/// Everything the TUN thread's tasks share.
pub struct Ctx {
    /// The stack and its TCP connections.
    pub stack: RefCell<Stack>,
    /// UDP flows.
    pub flows: RefCell<Flows>,
    /// Datagrams of open flows taken in this round, sent when its intake ends.
    pub taken: RefCell<Taken<ConnKey>>,
    /// Wakes the driver to poll and flush.
    pub poke: Notify,
    /// Snapshot, affinity, settings.
    pub shared: Arc<Shared>,
    /// Endpoint picks.
    pub rng: RefCell<SmallRng>,
    /// This thread's number among the process's TUN threads (its place in
    /// the chain of `peer::route`).
    pub thread: usize,
}

impl Ctx {
    /// A queue's state with nothing in it yet.
    pub fn new(settings: TunSettings, shared: Arc<Shared>, rng: SmallRng) -> Self {
        Self {
            stack: RefCell::new(Stack::new(settings)),
            flows: RefCell::new(Flows::new(
                shared.settings.udp_idle_timeout,
                settings.max_udp_flows,
            )),
            taken: RefCell::default(),
            poke: Notify::new(),
            shared,
            rng: RefCell::new(rng),
            thread: 0,
        }
    }

    /// [`Ctx::new`] with a random generator seeded from the OS.
    pub fn seeded(settings: TunSettings, shared: Arc<Shared>) -> Self {
        Self::new(settings, shared, SmallRng::from_os_rng())
    }
}
