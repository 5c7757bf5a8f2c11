//! The immutable snapshot the data plane reads, and its compile from the store.
//! All policy filtering happens here, once per change, never per connection.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::store::{Dirty, Store};
use super::topology::{categorize, Candidate, Usable};
use crate::balance::affinity::PortId;
use crate::model::{
    AddressFamily, Affinity, EndpointSlice, ObjectKey, Protocol, Service, ServicePort, ServiceType,
    TrafficPolicy,
};
use crate::telemetry::{Metrics, PortLabels, PortMetrics};

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
    /// Usable endpoints after policy filtering, in a stable order.
    pub endpoints: Box<[SocketAddr]>,
    /// ClientIP affinity timeout, if enabled.
    pub affinity: Option<Duration>,
    /// Allowed client ranges (LoadBalancer only); empty allows all.
    pub source_ranges: Box<[IpNet]>,
    /// What happens when `endpoints` is empty.
    pub when_empty: EmptyAction,
    /// Metric handles of the Service port.
    pub metrics: PortMetrics,
    /// TCP connections admitted through this frontend; the same atomic in
    /// every snapshot, so `--max-connections-per-frontend` holds across reloads.
    pub admitted: crate::telemetry::Gauge,
}

impl Frontend {
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
    frontends: HashMap<FrontendKey, Arc<Frontend>>,
    listeners: Vec<ListenerSpec>,
    /// Service ports with Local internal policy and no local endpoint.
    pub no_local_internal: usize,
    /// Service ports with Local external policy and no local endpoint.
    pub no_local_external: usize,
    /// Frontends claimed by more than one Service port (first one wins).
    pub conflicts: Vec<String>,
    /// healthCheckNodePort servers to run (eTP=Local Services), sorted by port.
    pub health_checks: Vec<HealthCheck>,
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

/// Stable id of a Service port, for affinity across snapshots.
pub fn port_id(service: &ObjectKey, port_name: &str, proto: Protocol) -> PortId {
    let mut h = DefaultHasher::new();
    (service, port_name, proto).hash(&mut h);
    h.finish()
}

struct PortEndpoints {
    v4: Usable<SocketAddr>,
    v6: Usable<SocketAddr>,
}

impl PortEndpoints {
    fn family(&self, ip: &IpAddr) -> &Usable<SocketAddr> {
        match ip {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        }
    }
}

/// Merges the slices of one Service port into candidates of one family
/// (kube-proxy endpointslicecache): first address only, duplicates by ip:port keep
/// the non-terminating copy, slices of the other family ignored.
fn merge(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    family: AddressFamily,
    node_name: &str,
) -> Vec<Candidate<SocketAddr>> {
    let mut out: Vec<Candidate<SocketAddr>> = Vec::new();
    let mut index: HashMap<SocketAddr, usize> = HashMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if AddressFamily::of(&ep.ip) != family {
                continue;
            }
            let c = Candidate {
                addr: SocketAddr::new(ep.ip, port),
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                local: ep.node_name.as_deref() == Some(node_name),
                zone_hints: ep.zone_hints.clone(),
            };
            match index.get(&c.addr).and_then(|&i| out.get_mut(i)) {
                Some(seen) => {
                    if seen.terminating && !c.terminating {
                        *seen = c;
                    }
                }
                None => {
                    index.insert(c.addr, out.len());
                    out.push(c);
                }
            }
        }
    }
    out.sort_by_key(|c| c.addr);
    out
}

struct Compiler<'a> {
    ctx: &'a NodeContext,
    metrics: &'a Metrics,
    local: BTreeSet<IpAddr>,
    /// What the Service being compiled contributes.
    out: ServiceOut,
}

/// One Service's contribution to a snapshot, before conflicts between
/// Services are resolved: reusable as long as the Service, its slices and the
/// zone are unchanged.
#[derive(Debug, Default)]
struct ServiceOut {
    /// Frontends in creation order, each with its kernel listener if any.
    frontends: Vec<(FrontendKey, Arc<Frontend>, Option<ListenerSpec>)>,
    health_check: Option<HealthCheck>,
    no_local_internal: usize,
    no_local_external: usize,
}

/// Compiled Services kept between compiles, so a change recompiles only the
/// Services whose Service object or EndpointSlices changed (kube-proxy's
/// partial sync): at 10,000 Services, one endpoint change no longer costs a
/// full compile. Reused frontends keep their `Arc` (and metric handles).
#[derive(Debug, Default)]
pub struct CompileCache {
    ctx: Option<NodeContext>,
    zone: Option<String>,
    services: HashMap<ObjectKey, Arc<ServiceOut>>,
    /// Frontends of the last snapshot, to size the next one's map.
    frontends: usize,
    /// The last snapshot's parts, patched when few Services change.
    last: Option<Last>,
}

/// What a snapshot holds, kept to build the next one by patching.
#[derive(Debug)]
struct Last {
    frontends: HashMap<FrontendKey, Arc<Frontend>>,
    listeners: Vec<ListenerSpec>,
    health_checks: Vec<HealthCheck>,
    conflicts: usize,
    no_local_internal: usize,
    no_local_external: usize,
}

impl Last {
    fn of(snap: &Snapshot) -> Last {
        Last {
            frontends: snap.frontends.clone(),
            listeners: snap.listeners.clone(),
            health_checks: snap.health_checks.clone(),
            conflicts: snap.conflicts.len(),
            no_local_internal: snap.no_local_internal,
            no_local_external: snap.no_local_external,
        }
    }
}

/// Above this many changed Services a full assembly is cheaper than patching.
const PATCH_MAX: usize = 64;

impl Compiler<'_> {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        svc: &Service,
        sp: &ServicePort,
        pm: &PortMetrics,
        eps: &PortEndpoints,
        addr: SocketAddr,
        kind: FrontendKind,
        policy: TrafficPolicy,
    ) {
        let usable = eps.family(&addr.ip());
        let endpoints: Box<[SocketAddr]> = usable.for_policy(policy).into();
        let when_empty = if policy == TrafficPolicy::Local && !usable.cluster.is_empty() {
            EmptyAction::Drop
        } else {
            EmptyAction::Refuse
        };
        let source_ranges: Box<[IpNet]> = if kind == FrontendKind::LoadBalancer
            && !svc.source_ranges.iter().any(|n| n.prefix_len() == 0)
        {
            svc.source_ranges.clone().into()
        } else {
            Box::new([])
        };
        let key = FrontendKey {
            addr,
            proto: sp.protocol,
        };
        let fe = Frontend {
            service: svc.key.clone(),
            port_name: sp.name.clone(),
            proto: sp.protocol,
            kind,
            port_id: port_id(&svc.key, &sp.name, sp.protocol),
            endpoints,
            affinity: match svc.affinity {
                Affinity::None => None,
                Affinity::ClientIp { timeout } => Some(timeout),
            },
            source_ranges,
            when_empty,
            metrics: pm.clone(),
            admitted: if sp.protocol == Protocol::Tcp {
                self.metrics
                    .frontend_active(&crate::telemetry::FrontendLabels {
                        address: addr.to_string(),
                        protocol: sp.protocol.as_str().to_string(),
                    })
            } else {
                crate::telemetry::Gauge::default()
            },
        };
        // 127.0.0.0/8 is routed locally as a whole on Linux, not just 127.0.0.1.
        let local = addr.ip().is_loopback() || self.local.contains(&addr.ip());
        let mut listener = None;
        if kind != FrontendKind::ClusterIp && local {
            let mode = match (fe.endpoints.is_empty(), fe.when_empty) {
                (false, _) => Some(ListenerMode::Accept),
                (true, EmptyAction::Drop) => Some(ListenerMode::Drop),
                (true, EmptyAction::Refuse) => None,
            };
            listener = mode.map(|mode| ListenerSpec {
                addr,
                proto: sp.protocol,
                mode,
                allow: fe.source_ranges.iter().copied().collect(),
            });
        }
        self.out.frontends.push((key, Arc::new(fe), listener));
    }

    fn service(&mut self, svc: &Service, slices: &[&EndpointSlice], zone: Option<&str>) {
        let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
        for sp in &svc.ports {
            let v4 = merge(slices, sp, AddressFamily::V4, &self.ctx.node_name);
            let v6 = merge(slices, sp, AddressFamily::V6, &self.ctx.node_name);
            for c in v4.iter().chain(&v6).filter(|c| c.local && c.ready) {
                local_ready.insert(c.addr.ip());
            }
            let eps = PortEndpoints {
                v4: categorize(&v4, zone),
                v6: categorize(&v6, zone),
            };
            let pm = self.metrics.port(&PortLabels {
                namespace: svc.key.namespace.clone(),
                service: svc.key.name.clone(),
                port: if sp.name.is_empty() {
                    sp.port.to_string()
                } else {
                    sp.name.clone()
                },
                protocol: sp.protocol.as_str().to_string(),
            });
            let any_cluster = !eps.v4.cluster.is_empty() || !eps.v6.cluster.is_empty();
            let no_local = eps.v4.local.is_empty() && eps.v6.local.is_empty() && any_cluster;
            if no_local && svc.internal_policy == TrafficPolicy::Local {
                self.out.no_local_internal += 1;
            }
            let external =
                svc.service_type != ServiceType::ClusterIp || !svc.external_ips.is_empty();
            if no_local && external && svc.external_policy == TrafficPolicy::Local {
                self.out.no_local_external += 1;
            }

            for ip in &svc.cluster_ips {
                let a = SocketAddr::new(*ip, sp.port);
                self.add(
                    svc,
                    sp,
                    &pm,
                    &eps,
                    a,
                    FrontendKind::ClusterIp,
                    svc.internal_policy,
                );
            }
            let wants_node_port = match svc.service_type {
                ServiceType::NodePort => true,
                ServiceType::LoadBalancer => svc.allocate_lb_node_ports,
                _ => false,
            };
            if let (true, Some(np)) = (wants_node_port, sp.node_port) {
                for ip in self.ctx.nodeport_addresses.clone() {
                    let a = SocketAddr::new(ip, np);
                    self.add(
                        svc,
                        sp,
                        &pm,
                        &eps,
                        a,
                        FrontendKind::NodePort,
                        svc.external_policy,
                    );
                }
            }
            if svc.service_type == ServiceType::LoadBalancer {
                for ip in &svc.load_balancer_ips {
                    let a = SocketAddr::new(*ip, sp.port);
                    let k = FrontendKind::LoadBalancer;
                    self.add(svc, sp, &pm, &eps, a, k, svc.external_policy);
                }
            }
            for ip in &svc.external_ips {
                let a = SocketAddr::new(*ip, sp.port);
                let k = FrontendKind::ExternalIp;
                self.add(svc, sp, &pm, &eps, a, k, svc.external_policy);
            }
        }
        if let (Some(port), TrafficPolicy::Local) =
            (svc.health_check_node_port, svc.external_policy)
        {
            self.out.health_check = Some(HealthCheck {
                port,
                service: svc.key.clone(),
                local_endpoints: local_ready.len(),
            });
        }
    }
}

impl Store {
    /// Compiles the current objects into a snapshot for this node.
    pub fn compile(&self, ctx: &NodeContext, metrics: &Metrics, generation: u64) -> Snapshot {
        let all = Dirty {
            all: true,
            ..Dirty::default()
        };
        self.compile_dirty(ctx, metrics, generation, &mut CompileCache::default(), &all)
    }

    /// Like [`Store::compile`], reusing from `cache` every Service whose
    /// Service object and EndpointSlices did not change (the store tracks
    /// them, see [`Store::take_dirty`]) and whose node context and zone are
    /// the same as at the last compile. The result is the same as a full
    /// compile. Use one cache per store: this consumes the store's record of
    /// changes.
    pub fn compile_with(
        &mut self,
        ctx: &NodeContext,
        metrics: &Metrics,
        generation: u64,
        cache: &mut CompileCache,
    ) -> Snapshot {
        let dirty = self.take_dirty();
        self.compile_dirty(ctx, metrics, generation, cache, &dirty)
    }

    fn compile_dirty(
        &self,
        ctx: &NodeContext,
        metrics: &Metrics,
        generation: u64,
        cache: &mut CompileCache,
        dirty: &Dirty,
    ) -> Snapshot {
        let node = self.node(&ctx.node_name);
        let zone = ctx
            .zone
            .as_deref()
            .or_else(|| node.and_then(|n| n.zone.as_deref()));
        if dirty.all || cache.ctx.as_ref() != Some(ctx) || cache.zone.as_deref() != zone {
            cache.services.clear();
            cache.ctx = Some(ctx.clone());
            cache.zone = zone.map(str::to_string);
            cache.last = None;
        }
        if let Some(snap) = self.patch(ctx, metrics, generation, cache, dirty, zone) {
            return snap;
        }
        // A changed Service is compiled again; one that is gone (or no
        // longer ours) simply leaves the cache.
        for k in &dirty.services {
            cache.services.remove(k);
        }
        let derived = self.selector_slices();
        // Grouping every slice costs a pass over all of them: only worth it
        // when many Services need their slices; a few look theirs up.
        let by_service = (cache.services.len() < self.services.len() / 2
            || dirty.services.len() > 64)
            .then(|| self.slices_by_service(&derived));
        let mut c = Compiler {
            ctx,
            metrics,
            local: ctx.local_addresses.iter().copied().collect(),
            out: ServiceOut::default(),
        };
        let mut snap = Snapshot {
            generation,
            frontends: HashMap::with_capacity(cache.frontends),
            ..Snapshot::default()
        };
        for svc in self.services.values() {
            if !svc.is_proxied(&ctx.proxy_name) {
                continue;
            }
            let out = match cache.services.get(&svc.key) {
                Some(out) => out.clone(),
                None => {
                    let found;
                    let slices: &[&EndpointSlice] = match &by_service {
                        Some(map) => map
                            .get(&(svc.key.namespace.as_str(), svc.key.name.as_str()))
                            .map(Vec::as_slice)
                            .unwrap_or(&[]),
                        None => {
                            found = self
                                .slices
                                .values()
                                .chain(&derived)
                                .filter(|s| {
                                    s.service_name == svc.key.name
                                        && s.key.namespace == svc.key.namespace
                                })
                                .collect::<Vec<_>>();
                            &found
                        }
                    };
                    c.out = ServiceOut::default();
                    c.service(svc, slices, zone);
                    let out = Arc::new(std::mem::take(&mut c.out));
                    cache.services.insert(svc.key.clone(), out.clone());
                    out
                }
            };
            assemble(&mut snap, &svc.key, &out);
        }
        cache.frontends = snap.frontends.len();
        snap.listeners.sort();
        snap.listeners.dedup();
        snap.health_checks.sort_by_key(|h| h.port);
        cache.last = Some(Last::of(&snap));
        snap
    }

    /// The next snapshot as the last one with the changed Services' parts
    /// taken out and their new parts put in: O(changed), not O(all). `None`
    /// (do a full assembly) when the order of Services could matter (a
    /// frontend or healthCheckNodePort claimed twice, before or now), when
    /// Pods derive slices, or when many Services changed.
    fn patch(
        &self,
        ctx: &NodeContext,
        metrics: &Metrics,
        generation: u64,
        cache: &mut CompileCache,
        dirty: &Dirty,
        zone: Option<&str>,
    ) -> Option<Snapshot> {
        let last = cache.last.as_ref()?;
        if last.conflicts > 0 || dirty.services.len() > PATCH_MAX || !self.pods.is_empty() {
            return None;
        }
        let mut frontends = last.frontends.clone();
        let mut listeners = last.listeners.clone();
        let mut health_checks = last.health_checks.clone();
        let mut no_local_internal = last.no_local_internal;
        let mut no_local_external = last.no_local_external;
        for k in &dirty.services {
            let Some(old) = cache.services.remove(k) else {
                continue;
            };
            for (key, fe, listener) in &old.frontends {
                if frontends.get(key).is_some_and(|f| Arc::ptr_eq(f, fe)) {
                    frontends.remove(key);
                    if let Some(i) = listener
                        .as_ref()
                        .and_then(|l| listeners.binary_search(l).ok())
                    {
                        listeners.remove(i);
                    }
                }
            }
            if let Some(h) = &old.health_check {
                health_checks.retain(|x| x != h);
            }
            no_local_internal = no_local_internal.saturating_sub(old.no_local_internal);
            no_local_external = no_local_external.saturating_sub(old.no_local_external);
        }
        let mut c = Compiler {
            ctx,
            metrics,
            local: ctx.local_addresses.iter().copied().collect(),
            out: ServiceOut::default(),
        };
        for k in &dirty.services {
            let Some(svc) = self.services.get(k) else {
                continue;
            };
            if !svc.is_proxied(&ctx.proxy_name) {
                continue;
            }
            let slices: Vec<&EndpointSlice> = self
                .slices
                .values()
                .filter(|s| s.service_name == k.name && s.key.namespace == k.namespace)
                .collect();
            c.out = ServiceOut::default();
            c.service(svc, &slices, zone);
            let out = Arc::new(std::mem::take(&mut c.out));
            cache.services.insert(k.clone(), out.clone());
            for (key, fe, listener) in &out.frontends {
                if frontends.insert(*key, fe.clone()).is_some() {
                    return None;
                }
                if let Some(l) = listener {
                    match listeners.binary_search(l) {
                        Ok(_) => return None,
                        Err(i) => listeners.insert(i, l.clone()),
                    }
                }
            }
            if let Some(h) = &out.health_check {
                if health_checks.iter().any(|x| x.port == h.port) {
                    return None;
                }
                health_checks.push(h.clone());
            }
            no_local_internal += out.no_local_internal;
            no_local_external += out.no_local_external;
        }
        health_checks.sort_by_key(|h| h.port);
        let snap = Snapshot {
            generation,
            frontends,
            listeners,
            no_local_internal,
            no_local_external,
            conflicts: Vec::new(),
            health_checks,
        };
        cache.frontends = snap.frontends.len();
        cache.last = Some(Last::of(&snap));
        Some(snap)
    }
}

/// Adds one Service's frontends to the snapshot; a frontend already claimed
/// by an earlier Service stays with it (first one wins) and is reported.
fn assemble(snap: &mut Snapshot, service: &ObjectKey, out: &ServiceOut) {
    use std::collections::hash_map::Entry;
    for (key, fe, listener) in &out.frontends {
        match snap.frontends.entry(*key) {
            Entry::Occupied(prev) => {
                let prev = &prev.get().service;
                snap.conflicts.push(format!(
                    "{} {}: claimed by {prev} and {service}; {prev} wins",
                    key.proto, key.addr
                ));
                continue;
            }
            Entry::Vacant(v) => {
                v.insert(fe.clone());
            }
        }
        if let Some(l) = listener {
            snap.listeners.push(l.clone());
        }
    }
    snap.health_checks.extend(out.health_check.clone());
    snap.no_local_internal += out.no_local_internal;
    snap.no_local_external += out.no_local_external;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Update;
    use crate::model::*;
    use crate::testing::builders::{self, endpoint, port, slice_port};
    use std::collections::BTreeMap;

    /// node-a: NodePorts on 192.0.2.1, which is local with 198.51.100.7.
    fn ctx() -> NodeContext {
        builders::node("node-a", &["192.0.2.1"], &["192.0.2.1", "198.51.100.7"])
    }

    /// default/`name` at 10.96.0.10, port "http" 80/TCP to 8080.
    fn svc(name: &str) -> Service {
        builders::service(
            "default",
            name,
            &["10.96.0.10"],
            vec![port("http", Protocol::Tcp, 80, 8080)],
        )
    }

    fn ep(ip: &str, node: &str, ready: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ready,
            serving: ready || terminating,
            terminating,
            node_name: Some(node.into()),
            ..endpoint(ip)
        }
    }

    /// IPv4 slice default/`name` of `svc`, port "http" at `port`.
    fn slice(name: &str, svc: &str, port: u16, eps: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            family: AddressFamily::V4,
            ..builders::slice(
                "default",
                name,
                svc,
                vec![slice_port("http", Protocol::Tcp, port)],
                eps,
            )
        }
    }

    fn compile(objs: Vec<Object>) -> Snapshot {
        builders::snapshot(objs, &ctx())
    }

    fn fkey(a: &str, proto: Protocol) -> FrontendKey {
        FrontendKey {
            addr: a.parse().unwrap(),
            proto,
        }
    }

    #[test]
    fn clusterip_joins_slices_by_port_name_and_protocol() {
        let mut s2 = slice(
            "web-2",
            "web",
            8080,
            vec![ep("10.0.0.3", "node-b", true, false)],
        );
        s2.ports[0].name = "other".into();
        let snap = compile(vec![
            Object::Service(svc("web")),
            Object::EndpointSlice(slice(
                "web-1",
                "web",
                8080,
                vec![
                    ep("10.0.0.1", "node-a", true, false),
                    ep("10.0.0.2", "node-b", true, false),
                ],
            )),
            Object::EndpointSlice(s2),
        ]);
        let fe = snap
            .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
            .unwrap();
        assert_eq!(
            &fe.endpoints[..],
            &[
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse::<SocketAddr>().unwrap()
            ]
        );
        assert!(snap
            .frontend(&fkey("10.96.0.10:80", Protocol::Udp))
            .is_none());
        // ClusterIPs never become kernel listeners
        assert!(snap.listeners().is_empty());
    }

    #[test]
    fn duplicate_endpoints_keep_non_terminating_copy() {
        let snap = compile(vec![
            Object::Service(svc("web")),
            Object::EndpointSlice(slice(
                "a",
                "web",
                8080,
                vec![ep("10.0.0.1", "n", false, true)],
            )),
            Object::EndpointSlice(slice(
                "b",
                "web",
                8080,
                vec![ep("10.0.0.1", "n", true, false)],
            )),
            Object::EndpointSlice(slice(
                "c",
                "web",
                8080,
                vec![ep("10.0.0.2", "n", false, true)],
            )),
        ]);
        let fe = snap
            .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
            .unwrap();
        // 10.0.0.1 is ready via slice b, so the terminating 10.0.0.2 is not used
        assert_eq!(
            &fe.endpoints[..],
            &["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn nodeport_lb_and_external_ips_get_listeners_when_local() {
        let mut s = svc("web");
        s.service_type = ServiceType::LoadBalancer;
        s.ports[0].node_port = Some(30080);
        s.load_balancer_ips = vec![
            "198.51.100.7".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
        ];
        s.external_ips = vec!["198.51.100.7".parse().unwrap()];
        s.ports.push(ServicePort {
            node_port: Some(30053),
            ..port("dns", Protocol::Udp, 53, 53)
        });
        let mut sl = slice(
            "w",
            "web",
            8080,
            vec![ep("10.0.0.1", "node-b", true, false)],
        );
        sl.ports.push(slice_port("dns", Protocol::Udp, 5353));
        let snap = compile(vec![Object::Service(s), Object::EndpointSlice(sl)]);
        let l: Vec<_> = snap
            .listeners()
            .iter()
            .map(|l| (l.addr.to_string(), l.proto))
            .collect();
        assert_eq!(
            l,
            vec![
                ("192.0.2.1:30053".to_string(), Protocol::Udp),
                ("192.0.2.1:30080".to_string(), Protocol::Tcp),
                ("198.51.100.7:53".to_string(), Protocol::Udp),
                ("198.51.100.7:80".to_string(), Protocol::Tcp),
            ]
        );
        // the externalIP equals an LB IP: first claim wins, conflict recorded
        assert_eq!(snap.conflicts.len(), 2);
        // non-local LB IP is a frontend (for the TUN path) but not a listener
        assert!(snap
            .frontend(&fkey("203.0.113.9:80", Protocol::Tcp))
            .is_some());
        let udp = snap
            .frontend(&fkey("192.0.2.1:30053", Protocol::Udp))
            .unwrap();
        assert_eq!(
            &udp.endpoints[..],
            &["10.0.0.1:5353".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn lb_without_node_port_allocation_has_no_nodeport() {
        let mut s = svc("web");
        s.service_type = ServiceType::LoadBalancer;
        s.allocate_lb_node_ports = false;
        s.ports[0].node_port = Some(30080);
        let snap = compile(vec![
            Object::Service(s),
            Object::EndpointSlice(slice(
                "w",
                "web",
                8080,
                vec![ep("10.0.0.1", "x", true, false)],
            )),
        ]);
        assert!(snap
            .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
            .is_none());
    }

    #[test]
    fn no_endpoints_means_no_listener_so_kernel_refuses() {
        let mut s = svc("web");
        s.service_type = ServiceType::NodePort;
        s.ports[0].node_port = Some(30080);
        let snap = compile(vec![Object::Service(s)]);
        assert!(snap.listeners().is_empty());
        let fe = snap
            .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
            .unwrap();
        assert_eq!(fe.when_empty, EmptyAction::Refuse);
    }

    #[test]
    fn external_local_without_local_endpoints_drops() {
        let mut s = svc("web");
        s.service_type = ServiceType::NodePort;
        s.ports[0].node_port = Some(30080);
        s.external_policy = TrafficPolicy::Local;
        let snap = compile(vec![
            Object::Service(s),
            Object::EndpointSlice(slice(
                "w",
                "web",
                8080,
                vec![ep("10.0.0.2", "node-b", true, false)],
            )),
        ]);
        let np = snap
            .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
            .unwrap();
        assert!(np.endpoints.is_empty());
        assert_eq!(np.when_empty, EmptyAction::Drop);
        assert_eq!(snap.listeners()[0].mode, ListenerMode::Drop);
        assert_eq!(snap.no_local_external, 1);
        // ClusterIP traffic still uses the remote endpoint (internal policy Cluster)
        let cip = snap
            .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
            .unwrap();
        assert_eq!(cip.endpoints.len(), 1);
    }

    #[test]
    fn internal_local_uses_local_endpoints_for_clusterip() {
        let mut s = svc("web");
        s.internal_policy = TrafficPolicy::Local;
        let snap = compile(vec![
            Object::Service(s),
            Object::EndpointSlice(slice(
                "w",
                "web",
                8080,
                vec![
                    ep("10.0.0.1", "node-a", true, false),
                    ep("10.0.0.2", "node-b", true, false),
                ],
            )),
        ]);
        let cip = snap
            .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
            .unwrap();
        assert_eq!(
            &cip.endpoints[..],
            &["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(snap.no_local_internal, 0);
    }

    #[test]
    fn health_check_counts_distinct_local_ready_endpoints() {
        let mut s = svc("web");
        s.service_type = ServiceType::LoadBalancer;
        s.external_policy = TrafficPolicy::Local;
        s.health_check_node_port = Some(31000);
        let snap = compile(vec![
            Object::Service(s.clone()),
            Object::EndpointSlice(slice(
                "w",
                "web",
                8080,
                vec![
                    ep("10.0.0.1", "node-a", true, false),
                    ep("10.0.0.2", "node-a", false, true),
                    ep("10.0.0.3", "node-b", true, false),
                ],
            )),
        ]);
        assert_eq!(
            snap.health_checks,
            vec![HealthCheck {
                port: 31000,
                service: s.key.clone(),
                local_endpoints: 1
            }]
        );
        // Cluster policy: no health check server.
        s.external_policy = TrafficPolicy::Cluster;
        assert!(compile(vec![Object::Service(s)]).health_checks.is_empty());
    }

    #[test]
    fn skipped_services_have_no_frontends() {
        let mut headless = svc("h");
        headless.headless = true;
        headless.cluster_ips.clear();
        let mut other_proxy = svc("o");
        other_proxy.proxy_name = Some("cilium".into());
        let mut labelled = svc("l");
        labelled.headless_label = true;
        let mut mine = svc("m");
        mine.proxy_name = Some("ringvip".into());
        mine.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
        let snap = compile(vec![
            Object::Service(headless),
            Object::Service(other_proxy),
            Object::Service(labelled),
            Object::Service(mine),
        ]);
        assert_eq!(snap.frontend_count(), 1);
        assert!(snap
            .frontend(&fkey("10.96.0.11:80", Protocol::Tcp))
            .is_some());
    }

    #[test]
    fn source_ranges_only_on_lb_and_open_range_allows_all() {
        let mut s = svc("web");
        s.service_type = ServiceType::LoadBalancer;
        s.ports[0].node_port = Some(30080);
        s.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
        s.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        let objs = vec![
            Object::Service(s.clone()),
            Object::EndpointSlice(slice(
                "w",
                "web",
                8080,
                vec![ep("10.0.0.1", "x", true, false)],
            )),
        ];
        let snap = compile(objs);
        let lb = snap
            .frontend(&fkey("198.51.100.7:80", Protocol::Tcp))
            .unwrap();
        assert!(lb.allows("203.0.113.5".parse().unwrap()));
        assert!(!lb.allows("192.0.2.99".parse().unwrap()));
        let np = snap
            .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
            .unwrap();
        assert!(np.allows("192.0.2.99".parse().unwrap()));

        s.source_ranges.push("0.0.0.0/0".parse().unwrap());
        let snap = compile(vec![Object::Service(s)]);
        let lb = snap
            .frontend(&fkey("198.51.100.7:80", Protocol::Tcp))
            .unwrap();
        assert!(lb.allows("192.0.2.99".parse().unwrap()));
    }

    #[test]
    fn affinity_and_port_id_are_stable() {
        let mut s = svc("web");
        s.affinity = Affinity::ClientIp {
            timeout: Duration::from_secs(60),
        };
        let a = compile(vec![Object::Service(s.clone())]);
        let b = compile(vec![Object::Service(s)]);
        let k = fkey("10.96.0.10:80", Protocol::Tcp);
        assert_eq!(
            a.frontend(&k).unwrap().affinity,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            a.frontend(&k).unwrap().port_id,
            b.frontend(&k).unwrap().port_id
        );
    }

    #[test]
    fn reset_counts_changes() {
        let mut st = Store::new();
        let c = st.apply(Update::Reset(vec![
            Object::Service(svc("a")),
            Object::Service(svc("b")),
        ]));
        assert_eq!(c.services, 2);
        let mut b2 = svc("b");
        b2.selector = Some(BTreeMap::new());
        let c = st.apply(Update::Reset(vec![
            Object::Service(svc("a")),
            Object::Service(b2),
        ]));
        assert_eq!(c.services, 1);
        let c = st.apply(Update::Delete(
            Kind::Service,
            ObjectKey::new("default", "a"),
        ));
        assert_eq!(c.services, 1);
        assert_eq!(st.service_count(), 1);
    }

    /// What a snapshot serves, comparable across compiles.
    type Served = Vec<(FrontendKey, Vec<SocketAddr>, EmptyAction, String)>;

    fn served(s: &Snapshot) -> (Served, Vec<ListenerSpec>, Vec<String>, Vec<HealthCheck>) {
        let mut f: Served = s
            .frontends()
            .map(|(k, fe)| {
                (
                    *k,
                    fe.endpoints.to_vec(),
                    fe.when_empty,
                    fe.service.name.clone(),
                )
            })
            .collect();
        f.sort_by_key(|e| e.0);
        (
            f,
            s.listeners().to_vec(),
            s.conflicts.clone(),
            s.health_checks.clone(),
        )
    }

    #[test]
    fn compile_cache_recompiles_only_what_changed_and_matches_a_full_compile() {
        let mut a = svc("a");
        a.service_type = ServiceType::NodePort;
        a.ports[0].node_port = Some(30080);
        a.external_policy = TrafficPolicy::Local;
        a.health_check_node_port = Some(30999);
        let mut b = svc("b");
        b.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
        // c claims a's ClusterIP: a conflict, a wins.
        let c = svc("c");
        let mut st = Store::new();
        st.apply(Update::Reset(vec![
            Object::Service(a),
            Object::Service(b),
            Object::Service(c),
            Object::EndpointSlice(slice(
                "a-1",
                "a",
                8080,
                vec![ep("10.0.0.1", "node-a", true, false)],
            )),
            Object::EndpointSlice(slice(
                "b-1",
                "b",
                8080,
                vec![ep("10.0.0.2", "node-b", true, false)],
            )),
        ]));
        let (ctx, metrics) = (ctx(), Metrics::new());
        let mut cache = CompileCache::default();
        let first = st.compile_with(&ctx, &metrics, 1, &mut cache);
        assert_eq!(served(&first), served(&st.compile(&ctx, &metrics, 1)));
        assert_eq!(first.conflicts.len(), 1);
        let fe = |s: &Snapshot, a: &str| s.frontend(&fkey(a, Protocol::Tcp)).unwrap().clone();

        // b's endpoints change: only b is compiled again.
        st.apply(Update::Upsert(Box::new(Object::EndpointSlice(slice(
            "b-1",
            "b",
            8080,
            vec![ep("10.0.0.3", "node-b", true, false)],
        )))));
        let second = st.compile_with(&ctx, &metrics, 2, &mut cache);
        assert_eq!(served(&second), served(&st.compile(&ctx, &metrics, 2)));
        assert!(Arc::ptr_eq(
            &fe(&first, "10.96.0.10:80"),
            &fe(&second, "10.96.0.10:80")
        ));
        assert!(Arc::ptr_eq(
            &fe(&first, "192.0.2.1:30080"),
            &fe(&second, "192.0.2.1:30080")
        ));
        assert!(!Arc::ptr_eq(
            &fe(&first, "10.96.0.11:80"),
            &fe(&second, "10.96.0.11:80")
        ));
        assert_eq!(
            &*fe(&second, "10.96.0.11:80").endpoints,
            &["10.0.0.3:8080".parse().unwrap()]
        );

        // The Node's zone changes: everything is compiled again.
        st.apply(Update::Upsert(Box::new(Object::Node(Node {
            name: "node-a".into(),
            zone: Some("z1".into()),
            addresses: vec![],
            deleting: false,
        }))));
        let third = st.compile_with(&ctx, &metrics, 3, &mut cache);
        assert_eq!(served(&third), served(&st.compile(&ctx, &metrics, 3)));
        assert!(!Arc::ptr_eq(
            &fe(&second, "10.96.0.10:80"),
            &fe(&third, "10.96.0.10:80")
        ));

        // a deleted: c now owns the ClusterIP, a's NodePort and health check go.
        st.apply(Update::Delete(
            Kind::Service,
            ObjectKey::new("default", "a"),
        ));
        let fourth = st.compile_with(&ctx, &metrics, 4, &mut cache);
        assert_eq!(served(&fourth), served(&st.compile(&ctx, &metrics, 4)));
        assert!(fourth.conflicts.is_empty());
        assert_eq!(fe(&fourth, "10.96.0.10:80").service.name, "c");
        assert!(fourth.health_checks.is_empty() && fourth.listeners().is_empty());
        assert_eq!(cache.services.len(), 2);

        // A slice moving from b to c changes both; nothing changed, nothing
        // compiled: the same frontends again.
        st.apply(Update::Upsert(Box::new(Object::EndpointSlice(slice(
            "b-1",
            "c",
            8080,
            vec![ep("10.0.0.4", "node-b", true, false)],
        )))));
        let fifth = st.compile_with(&ctx, &metrics, 5, &mut cache);
        assert_eq!(served(&fifth), served(&st.compile(&ctx, &metrics, 5)));
        assert!(fe(&fifth, "10.96.0.11:80").endpoints.is_empty());
        assert_eq!(
            &*fe(&fifth, "10.96.0.10:80").endpoints,
            &["10.0.0.4:8080".parse().unwrap()]
        );
        let sixth = st.compile_with(&ctx, &metrics, 6, &mut cache);
        assert!(Arc::ptr_eq(
            &fe(&fifth, "10.96.0.11:80"),
            &fe(&sixth, "10.96.0.11:80")
        ));
        assert!(Arc::ptr_eq(
            &fe(&fifth, "10.96.0.10:80"),
            &fe(&sixth, "10.96.0.10:80")
        ));

        // Patched in place (no conflicts left): a NodePort Service with a
        // health check comes, changes and goes.
        let mut d = svc("d");
        d.cluster_ips = vec!["10.96.0.12".parse().unwrap()];
        d.service_type = ServiceType::NodePort;
        d.ports[0].node_port = Some(30081);
        d.external_policy = TrafficPolicy::Local;
        d.health_check_node_port = Some(30998);
        let d_slice = |ip: &str| {
            Object::EndpointSlice(slice("d-1", "d", 8080, vec![ep(ip, "node-a", true, false)]))
        };
        let steps = vec![
            vec![
                Update::Upsert(Box::new(Object::Service(d.clone()))),
                Update::Upsert(Box::new(d_slice("10.0.0.5"))),
            ],
            vec![Update::Upsert(Box::new(d_slice("10.0.0.6")))],
            vec![Update::Delete(
                Kind::EndpointSlice,
                ObjectKey::new("default", "d-1"),
            )],
            vec![Update::Delete(
                Kind::Service,
                ObjectKey::new("default", "d"),
            )],
        ];
        for (i, updates) in steps.into_iter().enumerate() {
            for u in updates {
                st.apply(u);
            }
            let g = 7 + i as u64;
            let patched = st.compile_with(&ctx, &metrics, g, &mut cache);
            let full = st.compile(&ctx, &metrics, g);
            assert_eq!(served(&patched), served(&full), "step {i}");
            assert_eq!(patched.no_local_external, full.no_local_external);
            assert!(cache.last.is_some());
            assert!(Arc::ptr_eq(
                &fe(&sixth, "10.96.0.11:80"),
                &fe(&patched, "10.96.0.11:80")
            ));
        }
        assert_eq!(cache.services.len(), 2);
    }
}
