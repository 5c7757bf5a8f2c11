//! The immutable snapshot the data plane reads: frontends by address, the
//! kernel listeners to hold and the health checks to serve. [`compile`]
//! builds it from the store; all policy filtering happens there, once per
//! change, never per connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::balance::affinity::PortId;
use crate::balance::{Balancer, Warmup};
use crate::model::{ObjectKey, Protocol, TrafficPolicy};
use crate::state::topology::Candidate;
use crate::telemetry::{ConnectFailure, EndpointMetrics, PortMetrics, Traffic};

mod compile;
mod frontends;
#[cfg(test)]
mod tests;

pub use compile::CompileCache;
use frontends::Frontends;

/// What this node is, as compile needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeContext {
    /// This node's name (endpoints with this `nodeName` are local).
    pub node_name: String,
    /// Zone from the settings; else the Node object's label is used.
    pub zone: Option<String>,
    /// Value of `service.kubernetes.io/service-proxy-name` served here.
    pub proxy_name: String,
    /// Addresses NodePorts listen on.
    pub nodeport_addresses: Vec<IpAddr>,
    /// Every address assigned to this host (LB IPs and externalIPs are served
    /// only when local).
    pub local_addresses: Vec<IpAddr>,
    /// `--proxy-protocol-from`: upstream balancers always pass the kernel
    /// source filter of LB IPs; the client their header names is checked
    /// against `loadBalancerSourceRanges` instead.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// A frontend's identity: where the client sent the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Destination address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Protocol,
}

/// Which kind of Service address a frontend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    /// A ClusterIP (internal traffic policy).
    ClusterIp,
    /// A NodePort on a node address (external policy).
    NodePort,
    /// A LoadBalancer ingress IP (external policy, source ranges).
    LoadBalancer,
    /// An externalIP (external policy).
    ExternalIp,
}

/// What to do with a new flow when the frontend has no usable endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmptyAction {
    /// Refuse at once (TCP RST, ICMP port unreachable).
    Refuse,
    /// Drop silently: Local policy with endpoints only on other nodes, as kube-proxy.
    Drop,
}

/// One frontend, with everything a new flow needs, precomputed.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// The Service.
    pub service: ObjectKey,
    /// Service port name (may be empty).
    pub port_name: String,
    /// Protocol.
    pub proto: Protocol,
    /// Kind of address.
    pub kind: FrontendKind,
    /// Stable id of the Service port (affinity key).
    pub port_id: PortId,
    /// Usable endpoints after policy filtering, sorted by address (the
    /// index a pick hands back, and [`Frontend::endpoint_index`], rely on it).
    pub endpoints: Box<[SocketAddr]>,
    /// ClientIP affinity timeout, if enabled.
    pub affinity: Option<Duration>,
    /// Allowed client ranges (LoadBalancer only); empty allows all.
    pub source_ranges: Box<[IpNet]>,
    /// What happens when `endpoints` is empty.
    pub when_empty: EmptyAction,
    /// Metric handles of the Service port (one set per port, shared by its
    /// frontends and kept across compiles).
    pub metrics: Arc<PortMetrics>,
    /// TCP connections admitted through this frontend; the same atomic in
    /// every snapshot, so `--max-connections-per-frontend` holds across reloads.
    pub admitted: crate::telemetry::Gauge,
    /// The traffic policy `endpoints` was filtered by (the Service's internal
    /// one for ClusterIPs, its external one otherwise).
    pub policy: TrafficPolicy,
    /// Every endpoint of the Service port in this frontend's family before
    /// filtering, shared by the port's frontends: what `ringvip explain`
    /// reads. Never read by the data path.
    pub candidates: Arc<PortCandidates>,
    /// What this frontend alone has carried (the same atomics in every
    /// snapshot): the counters of its `ringvip status` row.
    pub traffic: Arc<Traffic>,
    /// Metric handles of each of `endpoints`, at the same index.
    pub endpoint_metrics: Arc<[Arc<EndpointMetrics>]>,
    /// How a new flow chooses among `endpoints` (`ringvip.io/balance`).
    pub balancer: Balancer,
    /// Slow start (`ringvip.io/slow-start-seconds`): when each of
    /// `endpoints` joined, while one of them is in its window at compile.
    pub warmup: Option<Arc<Warmup>>,
    /// PROXY protocol header written to backends before the client's bytes
    /// (`ringvip.io/proxy-protocol`; TCP frontends only).
    pub proxy_protocol: Option<crate::model::ProxyProtocol>,
}

/// A Service port's merged endpoints of one address family before policy
/// filtering, and the zone the compile filtered for. Kept compact (read only
/// by `explain` and `status`, never by the data path): each endpoint is its
/// series handles (which hold its address), its conditions in one byte and
/// its hints only when it has some; [`PortCandidates::endpoints`] gives them
/// back as [`Candidate`]s. A copy of each candidate was 88 bytes, a third of
/// what the compile kept per endpoint.
#[derive(Debug, Clone)]
pub struct PortCandidates {
    /// The endpoints, sorted by address.
    entries: Box<[CandidateEntry]>,
    /// This node's zone at compile (topology hints are matched against it).
    zone: Option<Arc<str>>,
    /// This node's name at compile (node hints are matched against it).
    node: Arc<str>,
}

/// One endpoint of [`PortCandidates`].
#[derive(Debug, Clone)]
struct CandidateEntry {
    /// Its series handles: their address is the endpoint's.
    metrics: Arc<EndpointMetrics>,
    /// [`READY`], [`SERVING`], [`TERMINATING`], [`LOCAL`].
    flags: u8,
    /// Zone and node hints, when it has either.
    hints: Option<Box<Hints>>,
}

#[derive(Debug, Clone)]
struct Hints {
    zone: Option<Vec<String>>,
    node: Option<Vec<String>>,
}

const READY: u8 = 1;
const SERVING: u8 = 2;
const TERMINATING: u8 = 4;
const LOCAL: u8 = 8;

impl PortCandidates {
    /// `candidates` (sorted by address) with the series handles of each, at
    /// the same index, for a node of `node` in `zone`.
    pub(crate) fn new(
        candidates: Vec<Candidate<SocketAddr>>,
        metrics: &[Arc<EndpointMetrics>],
        zone: Option<Arc<str>>,
        node: Arc<str>,
    ) -> PortCandidates {
        let entries = candidates
            .into_iter()
            .zip(metrics)
            .map(|(c, m)| {
                let flag = |on: bool, f: u8| if on { f } else { 0 };
                let hints = (c.zone_hints.is_some() || c.node_hints.is_some()).then(|| {
                    Box::new(Hints {
                        zone: c.zone_hints,
                        node: c.node_hints,
                    })
                });
                CandidateEntry {
                    metrics: m.clone(),
                    flags: flag(c.ready, READY)
                        | flag(c.serving, SERVING)
                        | flag(c.terminating, TERMINATING)
                        | flag(c.local, LOCAL),
                    hints,
                }
            })
            .collect();
        PortCandidates {
            entries,
            zone,
            node,
        }
    }

    /// The endpoints, sorted by address (built on each call: for `explain`
    /// and `status`, not the data path).
    pub fn endpoints(&self) -> Vec<Candidate<SocketAddr>> {
        self.entries
            .iter()
            .map(|e| {
                let hints = e.hints.as_deref();
                Candidate {
                    addr: e.metrics.addr(),
                    ready: e.flags & READY != 0,
                    serving: e.flags & SERVING != 0,
                    terminating: e.flags & TERMINATING != 0,
                    local: e.flags & LOCAL != 0,
                    zone_hints: hints.and_then(|h| h.zone.clone()),
                    node_hints: hints.and_then(|h| h.node.clone()),
                }
            })
            .collect()
    }

    /// The endpoints' addresses, sorted.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.entries.iter().map(|e| e.metrics.addr())
    }

    /// This node's zone at compile.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// Where the compile placed this node, for [`crate::state::explain_endpoint`].
    pub fn place(&self) -> crate::state::topology::Place<'_> {
        crate::state::topology::Place {
            node: &self.node,
            zone: self.zone.as_deref(),
        }
    }
}

impl Frontend {
    /// The metric handles of `ep`, one of [`Frontend::endpoints`]: a binary
    /// search (the endpoints are sorted by address). The pick hands back the
    /// index itself; use [`Frontend::endpoint_metrics_at`] where it is known.
    #[inline]
    pub fn endpoint_metrics(&self, ep: &SocketAddr) -> Option<&Arc<EndpointMetrics>> {
        let i = self.endpoint_index(ep)?;
        self.endpoint_metrics.get(i)
    }

    /// The metric handles of the endpoint at `index` of
    /// [`Frontend::endpoints`]: O(1).
    #[inline]
    pub fn endpoint_metrics_at(&self, index: usize) -> Option<&Arc<EndpointMetrics>> {
        self.endpoint_metrics.get(index)
    }

    /// The index of `ep` in [`Frontend::endpoints`] (sorted by address).
    #[inline]
    pub fn endpoint_index(&self, ep: &SocketAddr) -> Option<usize> {
        self.endpoints.binary_search(ep).ok()
    }

    /// Counts a flow that could not be connected for `reason`, in the Service
    /// port's, this frontend's and (when one was tried) the endpoint's
    /// metrics; a failed connect also marks the endpoint unhealthy.
    pub fn connect_failure(&self, reason: ConnectFailure, ep: Option<&SocketAddr>) {
        self.metrics.connect_failure(reason);
        self.traffic.connect_failure(reason);
        if let Some(m) = ep.and_then(|e| self.endpoint_metrics(e)) {
            m.connect_failed(reason, std::time::SystemTime::now());
        }
    }

    /// Whether a client address may use this frontend.
    #[inline]
    pub fn allows(&self, client: IpAddr) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|n| n.contains(&client))
    }
}

/// How a kernel listener for a frontend behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerMode {
    /// Accept and proxy.
    Accept,
    /// Bound with a filter that drops every packet: clients time out.
    Drop,
}

/// A kernel socket the data plane must hold open. Frontends with no usable
/// endpoint and [`EmptyAction::Refuse`] have no listener, so the kernel itself
/// refuses (RST / ICMP port unreachable) at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerSpec {
    /// Local address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Protocol,
    /// Behaviour.
    pub mode: ListenerMode,
    /// Client ranges allowed (loadBalancerSourceRanges); empty allows all.
    /// Enforced in the kernel with a socket filter, so others are dropped
    /// before any handshake, as kube-proxy drops them.
    pub allow: Arc<[IpNet]>,
}

/// Everything the data plane needs, immutable once published.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every compile.
    pub generation: u64,
    /// Shared with the snapshots before and after, but for the shards a
    /// change touched.
    frontends: Frontends,
    /// Shared with the previous snapshot when no listener changed.
    listeners: Arc<Vec<ListenerSpec>>,
    /// Service ports with Local internal policy and no local endpoint.
    pub no_local_internal: usize,
    /// Service ports with Local external policy and no local endpoint.
    pub no_local_external: usize,
    /// Frontends claimed by more than one Service port (first one wins).
    pub conflicts: Vec<String>,
    /// healthCheckNodePort servers to run (eTP=Local Services), sorted by port.
    pub health_checks: Vec<HealthCheck>,
    /// Service ports not served (SCTP) over the Services programmed.
    pub skipped_ports: usize,
}

/// A `healthCheckNodePort` and what it reports: load balancers send traffic
/// for an `externalTrafficPolicy: Local` Service only to nodes answering 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The port.
    pub port: u16,
    /// The Service.
    pub service: ObjectKey,
    /// Distinct ready endpoint addresses on this node, over all its ports
    /// (kube-proxy's LocalReadyEndpoints).
    pub local_endpoints: usize,
}

impl Snapshot {
    /// A snapshot with nothing in it: no frontend, no listener.
    pub fn empty(generation: u64) -> Self {
        Snapshot {
            generation,
            ..Snapshot::default()
        }
    }

    /// The frontend a flow was addressed to.
    #[inline]
    pub fn frontend(&self, key: &FrontendKey) -> Option<&Arc<Frontend>> {
        self.frontends.get(key)
    }

    /// Kernel listeners to hold open, sorted.
    pub fn listeners(&self) -> &[ListenerSpec] {
        &self.listeners
    }

    /// Number of frontends.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// All frontends (for status and tests).
    pub fn frontends(&self) -> impl Iterator<Item = (&FrontendKey, &Arc<Frontend>)> {
        self.frontends.iter()
    }
}
