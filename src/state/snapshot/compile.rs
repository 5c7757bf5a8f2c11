//! The compile from store to [`Snapshot`], full or patched: Service ports
//! joined with their slices' endpoints, filtered by traffic policy and
//! topology, into frontends, kernel listeners and health checks.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;

use super::{
    EmptyAction, Frontend, FrontendKey, FrontendKind, Frontends, HealthCheck, ListenerMode,
    ListenerSpec, NodeContext, PortCandidates, Snapshot,
};
use crate::balance::affinity::PortId;
use crate::balance::{Balancer, Joined, Maglev, Warmup};
use crate::model::{
    AddressFamily, Affinity, Balance, EndpointSlice, ObjectKey, Protocol, Service, ServicePort,
    ServiceType, SkippedPort, TrafficPolicy,
};
use crate::state::store::{CheckedState, Dirty, Store};
use crate::state::topology::{categorize, Candidate, Place, Usable};
use crate::telemetry::{EndpointMetrics, EndpointsLease, Metrics, PortLabels, PortMetrics};

/// Stable id of a Service port, for affinity across snapshots.
pub fn port_id(service: &ObjectKey, port_name: &str, proto: Protocol) -> PortId {
    let mut h = DefaultHasher::new();
    (service, port_name, proto).hash(&mut h);
    h.finish()
}

struct PortEndpoints {
    v4: Usable<SocketAddr>,
    v6: Usable<SocketAddr>,
    /// Before filtering, for `explain`.
    all_v4: Arc<PortCandidates>,
    all_v6: Arc<PortCandidates>,
    /// Slow start of the [cluster, local] sets, [v4, v6] each.
    warmup: [[Option<Arc<Warmup>>; 2]; 2],
}

/// Metric handles of one Service port: its own and its endpoints'.
struct PortHandles {
    port: Arc<PortMetrics>,
    /// Every endpoint listed for the port, sorted (v4 before v6).
    addrs: Vec<SocketAddr>,
    /// The lease on their series; its handles are at the index of `addrs`.
    lease: EndpointsLease,
}

impl PortHandles {
    /// The handles of `ep`, one of the port's endpoints.
    fn endpoint(&self, ep: &SocketAddr) -> Option<&Arc<EndpointMetrics>> {
        let i = self.addrs.binary_search(ep).ok()?;
        self.lease.metrics().get(i)
    }
}

impl PortEndpoints {
    /// The slow-start state of the set a frontend of `ip`'s family under
    /// `policy` uses.
    fn warmup(&self, ip: &IpAddr, policy: TrafficPolicy) -> Option<Arc<Warmup>> {
        let p = match policy {
            TrafficPolicy::Cluster => 0,
            TrafficPolicy::Local => 1,
        };
        let f = usize::from(ip.is_ipv6());
        self.warmup.get(p).and_then(|w| w.get(f)).cloned().flatten()
    }

    fn family(&self, ip: &IpAddr) -> (&Usable<SocketAddr>, &Arc<PortCandidates>) {
        match ip {
            IpAddr::V4(_) => (&self.v4, &self.all_v4),
            IpAddr::V6(_) => (&self.v6, &self.all_v6),
        }
    }
}

/// Merges the slices of one Service port into candidates of one family
/// (kube-proxy endpointslicecache): first address only, duplicates by ip:port keep
/// the non-terminating copy, slices of the other family ignored. An endpoint
/// the Service's health check found `down` is neither ready nor serving, so it
/// leaves the usable set as a not-ready one does.
fn merge(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    family: AddressFamily,
    node_name: &str,
    down: &dyn Fn(SocketAddr) -> bool,
) -> Vec<Candidate<SocketAddr>> {
    let mut out: Vec<Candidate<SocketAddr>> = Vec::new();
    let mut index: HashMap<SocketAddr, usize> = HashMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(port) = slice.port_for(sp) else {
            continue;
        };
        for ep in &slice.endpoints {
            if AddressFamily::of(&ep.ip) != family {
                continue;
            }
            let addr = SocketAddr::new(ep.ip, port);
            let up = !down(addr);
            let c = Candidate {
                addr,
                ready: ep.ready && up,
                serving: ep.serving && up,
                terminating: ep.terminating,
                local: ep.node_name.as_deref() == Some(node_name),
                zone_hints: ep.zone_hints().cloned(),
                node_hints: ep.node_hints().cloned(),
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
    /// Generation of the snapshot being built.
    generation: u64,
    /// When the compile runs: endpoints joining now start their slow start.
    now: Instant,
    /// Maglev tables built for the Service port being compiled, by endpoint
    /// list: the port's frontends with the same set share one.
    maglev: HashMap<Box<[SocketAddr]>, Arc<Maglev>>,
    local: BTreeSet<IpAddr>,
    /// The zone and node name the candidates of this compile share.
    names: Option<(Option<Arc<str>>, Arc<str>)>,
    /// The candidates of a family without endpoints, shared.
    empty: Option<Arc<PortCandidates>>,
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
    /// Boxed: few Services have one, and this is kept per Service.
    health_check: Option<Box<HealthCheck>>,
    no_local_internal: usize,
    no_local_external: usize,
    skipped_ports: usize,
    /// Keep the per-endpoint series of the Service's ports exported for as
    /// long as this compiled Service is the current one.
    leases: Vec<EndpointsLease>,
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
    /// The last snapshot's parts, patched when few Services change.
    last: Option<Last>,
    /// When each endpoint of a slow-start Service joined its usable set:
    /// kept across compiles, even full ones.
    joined: Joined,
    /// The SCTP ports each Service was last warned about: a recompile that
    /// does not change them (a full compile after a Node or Pod change)
    /// does not warn again.
    warned: HashMap<ObjectKey, Vec<SkippedPort>>,
}

#[cfg(test)]
impl CompileCache {
    /// Number of compiled Services kept.
    pub(super) fn services_kept(&self) -> usize {
        self.services.len()
    }

    /// Whether the next compile may patch the last snapshot.
    pub(super) fn can_patch(&self) -> bool {
        self.last.is_some()
    }
}

/// What a snapshot holds, kept to build the next one by patching: shared
/// with it (a fixed cost, whatever the number of Services).
#[derive(Debug)]
struct Last {
    frontends: Frontends,
    listeners: Arc<Vec<ListenerSpec>>,
    health_checks: Vec<HealthCheck>,
    conflicts: usize,
    no_local_internal: usize,
    no_local_external: usize,
    skipped_ports: usize,
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
            skipped_ports: snap.skipped_ports,
        }
    }
}

/// Above this many changed Services a full assembly is cheaper than patching.
const PATCH_MAX: usize = 64;

impl<'a> Compiler<'a> {
    fn new(ctx: &'a NodeContext, metrics: &'a Metrics, generation: u64, now: Instant) -> Self {
        Compiler {
            ctx,
            metrics,
            generation,
            now,
            maglev: HashMap::new(),
            local: ctx.local_addresses.iter().copied().collect(),
            names: None,
            empty: None,
            out: ServiceOut::default(),
        }
    }

    /// What the Service just compiled contributes, its lists cut to their
    /// length: they are kept in the cache until the Service changes, and a
    /// first push reserves four places (one frontend and one port are the
    /// common case).
    fn take_out(&mut self) -> ServiceOut {
        let mut out = std::mem::take(&mut self.out);
        out.frontends.shrink_to_fit();
        out.leases.shrink_to_fit();
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        svc: &Service,
        sp: &ServicePort,
        handles: &PortHandles,
        eps: &PortEndpoints,
        addr: SocketAddr,
        kind: FrontendKind,
        policy: TrafficPolicy,
    ) {
        let (usable, candidates) = eps.family(&addr.ip());
        let endpoints: Box<[SocketAddr]> = usable.for_policy(policy).into();
        let balancer = self.balancer(svc.options.balance, &endpoints);
        let warmup = eps.warmup(&addr.ip(), policy);
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
        // Every endpoint leased usable here (one family, no policy or
        // condition left one out: the common case): the same sorted list,
        // so the lease's handles are shared, not copied.
        let leased = handles.lease.shared();
        let endpoint_metrics = if leased.len() == endpoints.len() {
            leased.clone()
        } else {
            endpoints
                .iter()
                .map(|a| {
                    handles
                        .endpoint(a)
                        .cloned()
                        .unwrap_or_else(|| EndpointMetrics::detached(*a))
                })
                .collect()
        };
        let fh = self.metrics.frontend(addr, sp.protocol.as_str());
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
            metrics: handles.port.clone(),
            admitted: fh.admitted,
            policy,
            candidates: candidates.clone(),
            traffic: fh.traffic,
            endpoint_metrics,
            balancer,
            warmup,
            proxy_protocol: if sp.protocol == Protocol::Tcp {
                svc.options.proxy_protocol
            } else {
                None
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
                allow: if fe.source_ranges.is_empty() {
                    Arc::new([])
                } else {
                    let upstream = self.ctx.proxy_protocol_from.iter();
                    fe.source_ranges.iter().chain(upstream).copied().collect()
                },
            });
        }
        self.out.frontends.push((key, Arc::new(fe), listener));
    }

    /// The candidates of one family of a Service port, with their handles
    /// (see [`PortCandidates`]); the node's name and zone are shared by every
    /// port, and so is the empty set (one family of most ports).
    fn candidates(
        &mut self,
        c: Vec<Candidate<SocketAddr>>,
        metrics: &[Arc<EndpointMetrics>],
        zone: Option<&str>,
    ) -> Arc<PortCandidates> {
        if self.names.as_ref().map(|n| n.0.as_deref()) != Some(zone) {
            self.names = Some((zone.map(Arc::from), Arc::from(self.ctx.node_name.as_str())));
            self.empty = None;
        }
        let (zone, node) = match &self.names {
            Some((z, n)) => (z.clone(), n.clone()),
            None => (None, Arc::from(self.ctx.node_name.as_str())),
        };
        if c.is_empty() {
            return self
                .empty
                .get_or_insert_with(|| Arc::new(PortCandidates::new(c, metrics, zone, node)))
                .clone();
        }
        Arc::new(PortCandidates::new(c, metrics, zone, node))
    }

    /// The balancer of a frontend over `endpoints`.
    fn balancer(&mut self, balance: Balance, endpoints: &[SocketAddr]) -> Balancer {
        match balance {
            Balance::Random => Balancer::Random,
            Balance::RoundRobin => Balancer::RoundRobin(Arc::default()),
            Balance::LeastConnections => Balancer::LeastConnections,
            Balance::Maglev { table_size } => Balancer::Maglev(
                self.maglev
                    .entry(endpoints.into())
                    .or_insert_with(|| Arc::new(Maglev::build(endpoints, table_size)))
                    .clone(),
            ),
        }
    }

    fn service(
        &mut self,
        svc: &Service,
        slices: &[&EndpointSlice],
        zone: Option<&str>,
        joined: &mut Joined,
        warned: &mut HashMap<ObjectKey, Vec<SkippedPort>>,
        checked: &CheckedState,
    ) {
        let checks = svc.options.health_check.is_some();
        let down = |a: SocketAddr| checks && checked.is_down(&svc.key, a);
        let place = Place {
            node: &self.ctx.node_name,
            zone,
        };
        let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
        let mut warm_sets = Vec::new();
        self.out.skipped_ports = svc.skipped_ports.len();
        let seen = warned.get(&svc.key) == Some(&svc.skipped_ports);
        if svc.skipped_ports.is_empty() {
            warned.remove(&svc.key);
        } else if !seen {
            warned.insert(svc.key.clone(), svc.skipped_ports.clone());
            let ports: Vec<String> = svc
                .skipped_ports
                .iter()
                .map(|p| format!("{}/SCTP", p.port))
                .collect();
            tracing::warn!(
                service = %svc.key,
                "not serving port(s) {}: SCTP is not supported; the other ports are served",
                ports.join(", ")
            );
        }
        for sp in &svc.ports {
            self.maglev.clear();
            let v4 = merge(slices, sp, AddressFamily::V4, &self.ctx.node_name, &down);
            let v6 = merge(slices, sp, AddressFamily::V6, &self.ctx.node_name, &down);
            for c in v4.iter().chain(&v6).filter(|c| c.local && c.ready) {
                local_ready.insert(c.addr.ip());
            }
            let labels = PortLabels {
                namespace: svc.key.namespace.clone(),
                service: svc.key.name.clone(),
                port: if sp.name.is_empty() {
                    sp.port.to_string()
                } else {
                    sp.name.clone()
                },
                protocol: sp.protocol.as_str().to_string(),
            };
            // Every endpoint listed for the port has series, usable or not.
            // Both lists are sorted and every v4 address sorts first.
            let addrs: Vec<SocketAddr> = v4.iter().chain(&v6).map(|c| c.addr).collect();
            let (port_metrics, lease) = self.metrics.port_endpoints(&labels, &addrs);
            let now = std::time::SystemTime::now();
            for (a, m) in addrs.iter().zip(lease.metrics()) {
                m.set_check(checks.then(|| !down(*a)), now);
            }
            let (m4, m6) = lease
                .metrics()
                .split_at(v4.len().min(lease.metrics().len()));
            let (u4, u6) = (categorize(&v4, place), categorize(&v6, place));
            let mut eps = PortEndpoints {
                v4: u4,
                v6: u6,
                all_v4: self.candidates(v4, m4, zone),
                all_v6: self.candidates(v6, m6, zone),
                warmup: Default::default(),
            };
            if let Some(window) = svc.options.slow_start {
                let id = port_id(&svc.key, &sp.name, sp.protocol);
                for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
                    let set = (id, policy);
                    warm_sets.push(set);
                    // Both families in one set: an endpoint is one address.
                    let usable: Vec<SocketAddr> = [&eps.v4, &eps.v6]
                        .iter()
                        .flat_map(|u| u.for_policy(policy).iter().copied())
                        .collect();
                    let since = joined.update(&svc.key, set, &usable, window, self.now);
                    let (v4, v6) = since.split_at(eps.v4.for_policy(policy).len());
                    let slot = match policy {
                        TrafficPolicy::Cluster => 0,
                        TrafficPolicy::Local => 1,
                    };
                    if let Some(w) = eps.warmup.get_mut(slot) {
                        *w = [
                            Warmup::new(window, v4.into()).map(Arc::new),
                            Warmup::new(window, v6.into()).map(Arc::new),
                        ];
                    }
                }
            }
            let pm = PortHandles {
                port: port_metrics,
                addrs,
                lease,
            };
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
            self.out.leases.push(pm.lease);
        }
        joined.retain(&svc.key, &warm_sets);
        if let (Some(port), TrafficPolicy::Local) =
            (svc.health_check_node_port, svc.external_policy)
        {
            self.out.health_check = Some(Box::new(HealthCheck {
                port,
                service: svc.key.clone(),
                local_endpoints: local_ready.len(),
            }));
        }
    }
}

impl Store {
    /// Compiles the current objects into a snapshot for this node, with a
    /// compile cache of its own that goes when it returns: the endpoint
    /// leases it took go with it, so the snapshot's endpoint handles count
    /// but are not exported (the running proxy keeps its cache and uses
    /// [`Store::compile_with`]).
    pub fn compile(&self, ctx: &NodeContext, metrics: &Metrics, generation: u64) -> Snapshot {
        let all = Dirty {
            all: true,
            ..Dirty::default()
        };
        let c = Compiler::new(ctx, metrics, generation, Instant::now());
        self.compile_dirty(c, &mut CompileCache::default(), &all)
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
        self.compile_at(ctx, metrics, generation, cache, Instant::now())
    }

    /// [`Store::compile_with`], handing back also what changed since the
    /// last compile (what the DNS zone must update too).
    pub fn compile_changes(
        &mut self,
        ctx: &NodeContext,
        metrics: &Metrics,
        generation: u64,
        cache: &mut CompileCache,
    ) -> (Snapshot, Dirty) {
        let dirty = self.take_dirty();
        let c = Compiler::new(ctx, metrics, generation, Instant::now());
        (self.compile_dirty(c, cache, &dirty), dirty)
    }

    /// [`Store::compile_with`] at `now`: endpoints that joined a usable set
    /// since the last compile start their slow start at `now`.
    pub fn compile_at(
        &mut self,
        ctx: &NodeContext,
        metrics: &Metrics,
        generation: u64,
        cache: &mut CompileCache,
        now: Instant,
    ) -> Snapshot {
        let dirty = self.take_dirty();
        self.compile_dirty(Compiler::new(ctx, metrics, generation, now), cache, &dirty)
    }

    fn compile_dirty(
        &self,
        mut c: Compiler<'_>,
        cache: &mut CompileCache,
        dirty: &Dirty,
    ) -> Snapshot {
        let ctx = c.ctx;
        let node = self.node(&ctx.node_name);
        let zone = ctx
            .zone
            .as_deref()
            .or_else(|| node.and_then(|n| n.zone.as_deref()));
        // Compiled Services replaced or gone: dropped only once the new
        // snapshot is built, so an endpoint that stays keeps its series
        // (and counts) and one that left loses them before it is published.
        let mut retired: Vec<Arc<ServiceOut>> = Vec::new();
        if dirty.all || cache.ctx.as_ref() != Some(ctx) || cache.zone.as_deref() != zone {
            retired.extend(cache.services.drain().map(|(_, out)| out));
            cache.ctx = Some(ctx.clone());
            cache.zone = zone.map(str::to_string);
            cache.last = None;
        }
        if let Some(snap) = self.patch(&mut c, cache, dirty, zone, &mut retired) {
            return snap;
        }
        // A changed Service is compiled again; one that is gone (or no
        // longer ours) simply leaves the cache.
        for k in &dirty.services {
            retired.extend(cache.services.remove(k));
        }
        let mut snap = Snapshot {
            generation: c.generation,
            ..Snapshot::default()
        };
        let mut listeners = Vec::new();
        for svc in self.services.values() {
            if !svc.is_proxied(&ctx.proxy_name) {
                continue;
            }
            let out = match cache.services.get(&svc.key) {
                Some(out) => out.clone(),
                None => {
                    let slices: Vec<&EndpointSlice> = self.all_slices_of(&svc.key).collect();
                    c.out = ServiceOut::default();
                    c.service(
                        svc,
                        &slices,
                        zone,
                        &mut cache.joined,
                        &mut cache.warned,
                        &self.checked,
                    );
                    let out = Arc::new(c.take_out());
                    cache.services.insert(svc.key.clone(), out.clone());
                    out
                }
            };
            assemble(&mut snap, &mut listeners, &svc.key, &out);
        }
        let services = &self.services;
        cache.joined.retain_services(|k| services.contains_key(k));
        cache.warned.retain(|k, _| services.contains_key(k));
        listeners.sort();
        listeners.dedup();
        snap.listeners = Arc::new(listeners);
        snap.health_checks.sort_by_key(|h| h.port);
        cache.last = Some(Last::of(&snap));
        drop(retired);
        snap
    }

    /// The next snapshot as the last one with the changed Services' parts
    /// taken out and their new parts put in: O(changed), not O(all). `None`
    /// (do a full assembly) when the order of Services could matter (a
    /// frontend or healthCheckNodePort claimed twice, before or now) or when
    /// many Services changed.
    fn patch(
        &self,
        c: &mut Compiler<'_>,
        cache: &mut CompileCache,
        dirty: &Dirty,
        zone: Option<&str>,
        retired: &mut Vec<Arc<ServiceOut>>,
    ) -> Option<Snapshot> {
        let last = cache.last.as_ref()?;
        if last.conflicts > 0 || dirty.services.len() > PATCH_MAX {
            return None;
        }
        let mut frontends = last.frontends.clone();
        let mut health_checks = last.health_checks.clone();
        let mut no_local_internal = last.no_local_internal;
        let mut no_local_external = last.no_local_external;
        let mut skipped_ports = last.skipped_ports;
        // Listeners the changed Services held and hold now: the list is
        // copied only when they differ.
        let mut gone: Vec<ListenerSpec> = Vec::new();
        let mut new: Vec<ListenerSpec> = Vec::new();
        for k in &dirty.services {
            let Some(old) = cache.services.remove(k) else {
                continue;
            };
            for (key, fe, listener) in &old.frontends {
                if frontends.get(key).is_some_and(|f| Arc::ptr_eq(f, fe)) {
                    frontends.remove(key);
                    gone.extend(listener.iter().cloned());
                }
            }
            if let Some(h) = &old.health_check {
                health_checks.retain(|x| x != &**h);
            }
            no_local_internal = no_local_internal.saturating_sub(old.no_local_internal);
            no_local_external = no_local_external.saturating_sub(old.no_local_external);
            skipped_ports = skipped_ports.saturating_sub(old.skipped_ports);
            // Dropped (with its leases) only after the next compile took
            // its own, even if this patch gives up.
            retired.push(old);
        }
        for k in &dirty.services {
            let Some(svc) = self.services.get(k) else {
                continue;
            };
            if !svc.is_proxied(&c.ctx.proxy_name) {
                continue;
            }
            let slices: Vec<&EndpointSlice> = self.all_slices_of(k).collect();
            c.out = ServiceOut::default();
            c.service(
                svc,
                &slices,
                zone,
                &mut cache.joined,
                &mut cache.warned,
                &self.checked,
            );
            let out = Arc::new(c.take_out());
            cache.services.insert(k.clone(), out.clone());
            for (key, fe, listener) in &out.frontends {
                if frontends.insert(*key, fe.clone()).is_some() {
                    return None;
                }
                new.extend(listener.iter().cloned());
            }
            if let Some(h) = &out.health_check {
                if health_checks.iter().any(|x| x.port == h.port) {
                    return None;
                }
                health_checks.push((**h).clone());
            }
            no_local_internal += out.no_local_internal;
            no_local_external += out.no_local_external;
            skipped_ports += out.skipped_ports;
        }
        let mut listeners = last.listeners.clone();
        gone.sort();
        new.sort();
        if gone != new {
            let list = Arc::make_mut(&mut listeners);
            for l in &gone {
                if let Ok(i) = list.binary_search(l) {
                    list.remove(i);
                }
            }
            for l in new {
                match list.binary_search(&l) {
                    Ok(_) => return None,
                    Err(i) => list.insert(i, l),
                }
            }
        }
        for k in &dirty.services {
            if !self.services.contains_key(k) {
                cache.joined.retain(k, &[]);
                cache.warned.remove(k);
            }
        }
        health_checks.sort_by_key(|h| h.port);
        let snap = Snapshot {
            generation: c.generation,
            frontends,
            listeners,
            no_local_internal,
            no_local_external,
            conflicts: Vec::new(),
            health_checks,
            skipped_ports,
        };
        cache.last = Some(Last::of(&snap));
        Some(snap)
    }
}

/// Adds one Service's frontends to the snapshot; a frontend already claimed
/// by an earlier Service stays with it (first one wins) and is reported.
fn assemble(
    snap: &mut Snapshot,
    listeners: &mut Vec<ListenerSpec>,
    service: &ObjectKey,
    out: &ServiceOut,
) {
    for (key, fe, listener) in &out.frontends {
        if let Err(prev) = snap.frontends.insert_new(*key, fe.clone()) {
            let prev = &prev.service;
            snap.conflicts.push(format!(
                "{} {}: claimed by {prev} and {service}; {prev} wins",
                key.proto, key.addr
            ));
            continue;
        }
        if let Some(l) = listener {
            listeners.push(l.clone());
        }
    }
    snap.health_checks
        .extend(out.health_check.as_deref().cloned());
    snap.no_local_internal += out.no_local_internal;
    snap.no_local_external += out.no_local_external;
    snap.skipped_ports += out.skipped_ports;
}
