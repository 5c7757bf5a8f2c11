//! The data plane: front ends reduce a new flow to a [`flow::FlowKey`], call
//! [`flow::resolve`] and a picker, then share the upstream connect and relay code.

pub mod connect;
pub mod flow;
pub mod limits;
pub(crate) mod listener;
pub mod relay;
pub mod socket;
pub mod tun;
pub mod udp;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::{AffinityTable, PassiveHealth};
use crate::config::DataPlaneOptions;
use crate::state::{Frontend, Snapshot};
use crate::telemetry::Gauge;

/// State shared by all data-plane threads.
#[derive(Debug)]
pub struct Shared {
    /// The published snapshot; new flows `load()` it.
    pub snapshot: ArcSwap<Snapshot>,
    /// ClientIP affinity, across threads.
    pub affinity: AffinityTable,
    /// Endpoints backed off after failed connects, across threads.
    pub health: PassiveHealth,
    /// Connect tries, timeouts, limits: the `dataplane` part of the settings.
    pub settings: DataPlaneOptions,
    /// TCP connections being relayed, over every front end and thread (what
    /// a drain waits for).
    pub active: AtomicUsize,
    /// Connection limits and the TCP idle timeout.
    pub limits: limits::ConnLimits,
}

/// One relayed TCP connection, from either front end: counted in the
/// Service port's metrics (total, active) and in [`Shared::active`] (what a
/// drain waits for) for as long as the guard lives, however the relay ends.
pub struct ActiveConnection<'a> {
    shared: &'a AtomicUsize,
    gauge: Gauge,
}

impl<'a> ActiveConnection<'a> {
    /// Counts a connection through `fe` until the guard drops.
    pub fn new(shared: &'a Shared, fe: &Frontend) -> Self {
        fe.metrics.connections_total.inc();
        fe.metrics.connections_active.inc();
        shared.active.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: &shared.active,
            gauge: fe.metrics.connections_active.clone(),
        }
    }
}

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
        self.shared.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Shared state starting from an empty snapshot.
    pub fn new(settings: DataPlaneOptions) -> Arc<Self> {
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            affinity: AffinityTable::new(),
            health: PassiveHealth::default(),
            settings,
            active: AtomicUsize::new(0),
            limits: limits::ConnLimits::new(
                settings.max_connections,
                settings.max_connections_per_frontend,
                settings.tcp_idle_timeout,
            ),
        })
    }
}
