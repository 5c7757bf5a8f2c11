//! The data plane: front ends reduce a new flow to a [`flow::FlowKey`], call
//! [`flow::resolve`] and a picker, then share the upstream connect and relay code.

pub mod accept_proxy;
pub mod connect;
pub mod engine;
pub mod flow;
pub mod limits;
pub(crate) mod listener;
pub mod proxy_protocol;
pub mod relay;
pub mod session;
pub mod socket;
pub mod tun;
pub mod udp;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::balance::{AffinityTable, PassiveHealth};
use crate::config::DataPlaneOptions;
use crate::state::Snapshot;

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
    /// Where finished connections and flows are logged (`--access-log`).
    pub access_log: Option<AccessLog>,
    /// PROXY v2 headers accepted from upstream balancers (`--proxy-protocol-from`).
    pub upstream: accept_proxy::Upstream,
    /// Listening sockets received from the previous process (an upgrade),
    /// taken by the listeners instead of binding.
    pub inherited: crate::handover::Inherited,
    /// UDP flows of the previous process: their endpoints, kept for a while.
    pub pins: crate::handover::Pins,
    /// How the TUN threads pass packets of flows they do not own to the
    /// owner: each other, and the other process of an upgrade.
    pub tun_links: tun::peer::Links,
}

impl Shared {
    /// Shared state starting from an empty snapshot, without access log.
    pub fn new(settings: DataPlaneOptions) -> Arc<Self> {
        Self::with_access_log(settings, None)
    }

    /// Shared state starting from an empty snapshot, logging finished
    /// connections and flows to `access_log`.
    pub fn with_access_log(settings: DataPlaneOptions, access_log: Option<AccessLog>) -> Arc<Self> {
        Self::with_upstream(settings, access_log, accept_proxy::Upstream::default())
    }

    /// [`Shared::with_access_log`], reading PROXY headers from `upstream`.
    pub fn with_upstream(
        settings: DataPlaneOptions,
        access_log: Option<AccessLog>,
        upstream: accept_proxy::Upstream,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            access_log,
            inherited: Default::default(),
            pins: Default::default(),
            tun_links: Default::default(),
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
