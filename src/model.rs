//! Pure domain types: what ringvip knows about Services, EndpointSlices and the
//! Node, already validated and with Kubernetes defaults applied. Sources convert
//! Kubernetes objects into these; the store and the snapshot compile read only these.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

/// Transport protocol of a frontend or endpoint port. SCTP is rejected by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Kubernetes spelling (`TCP`, `UDP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key from namespace and name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `spec.type` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceType {
    /// `ClusterIP` (the default).
    ClusterIp,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
    /// `ExternalName`: DNS only, no data plane.
    ExternalName,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    /// Any usable endpoint in the cluster (default).
    #[default]
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// `sessionAffinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Affinity {
    /// No affinity: every new flow picks afresh.
    #[default]
    None,
    /// Same client IP → same endpoint while used within `timeout`.
    ClientIp {
        /// `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800 s).
        timeout: Duration,
    },
}

/// Default ClientIP affinity timeout (3 hours), as in Kubernetes.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// `targetPort` of a Service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port, resolved against Pods (or already resolved in slices).
    Name(String),
}

/// One entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// Port name; empty for a single unnamed port.
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// The Service port (on ClusterIPs, LB IPs, externalIPs).
    pub port: u16,
    /// `nodePort`, when allocated.
    pub node_port: Option<u16>,
    /// `targetPort` (defaults to `port`).
    pub target_port: TargetPort,
}

/// `ringvip.io/balance`: how a new flow chooses among usable endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Uniform random (kube-proxy's; the default).
    #[default]
    Random,
    /// In turn, per frontend.
    RoundRobin,
    /// Power of two random choices over active connections.
    LeastConnections,
    /// Maglev consistent hashing of the client IP.
    Maglev {
        /// Lookup table size, a prime (`ringvip.io/maglev-table-size`).
        table_size: u32,
    },
}

/// A SCTP port of a Service, left unserved (ringvip has no SCTP); the
/// Service's other ports are served.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SkippedPort {
    /// Port name (may be empty).
    pub name: String,
    /// The Service port number.
    pub port: u16,
}

/// A validated Service.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct Service {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `spec.type`.
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless and ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose `ipMode` is empty or `VIP`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`; empty means allow all.
    pub source_ranges: Vec<IpNet>,
    /// `spec.allocateLoadBalancerNodePorts` (default true).
    pub allocate_lb_node_ports: bool,
    /// `spec.externalTrafficPolicy`.
    pub external_policy: TrafficPolicy,
    /// `spec.internalTrafficPolicy`.
    pub internal_policy: TrafficPolicy,
    /// `spec.sessionAffinity` with its timeout.
    pub affinity: Affinity,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<u16>,
    /// `spec.externalName`.
    pub external_name: Option<String>,
    /// `spec.selector`; `None` for selector-less Services.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready: bool,
    /// Label `service.kubernetes.io/service-proxy-name`, if set.
    pub proxy_name: Option<String>,
    /// Label `service.kubernetes.io/headless` present.
    pub headless_label: bool,
    /// `spec.trafficDistribution` (`PreferSameNode`, `PreferSameZone`,
    /// `PreferClose`); only what the selector path needs to set hints.
    pub traffic_distribution: Option<TrafficDistribution>,
    /// ringvip's own annotations (`ringvip.io/...`).
    pub options: ServiceOptions,
    /// SCTP ports of `spec.ports`, not served (not in `ports`).
    pub skipped_ports: Vec<SkippedPort>,
}

/// `spec.trafficDistribution` values that change which hints the
/// EndpointSlice controller sets (Kubernetes 1.34). Unknown values are
/// ignored, as by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficDistribution {
    /// `PreferSameNode`: node hints (and zone hints).
    PreferSameNode,
    /// `PreferSameZone` or its older name `PreferClose`: zone hints.
    PreferSameZone,
}

/// What ringvip's annotations on a Service ask for; the default asks for
/// nothing (kube-proxy's behaviour).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct ServiceOptions {
    /// `ringvip.io/balance` (and `ringvip.io/maglev-table-size`).
    pub balance: Balance,
    /// `ringvip.io/slow-start-seconds`: newly usable endpoints take a share of
    /// new connections growing linearly over this window.
    pub slow_start: Option<Duration>,
    /// `ringvip.io/health-check` and its interval/timeout/rise/fall.
    pub health_check: Option<HealthCheckSpec>,
    /// `ringvip.io/proxy-protocol`.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// Version of the PROXY protocol header sent to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// Text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// Binary header.
    V2,
}

/// What an active health check sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// The connect completes.
    Tcp,
    /// `GET <path>` answers 2xx or 3xx (HAProxy `option httpchk`).
    Http {
        /// Absolute path, starting with `/`.
        path: String,
    },
}

/// An active health check of a Service's endpoints, with HAProxy's meaning
/// of `inter`, `timeout check`, `rise` and `fall`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheckSpec {
    /// What is checked.
    pub kind: CheckKind,
    /// Time between two checks of one endpoint (`inter`, default 2 s).
    pub interval: Duration,
    /// How long one check may take (default: the interval, as HAProxy
    /// without `timeout check`).
    pub timeout: Duration,
    /// Consecutive successes that bring a down endpoint up (default 2).
    pub rise: u32,
    /// Consecutive failures that take an up endpoint down (default 3).
    pub fall: u32,
}

/// A Pod's `readinessProbe`, validated (ringvip runs it in file mode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    /// What the probe does.
    pub action: ProbeAction,
    /// `initialDelaySeconds` (default 0).
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
}

/// The handler of a [`Probe`], its port resolved against the Pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProbeAction {
    /// `tcpSocket`: the connect completes.
    Tcp {
        /// `host`, default the Pod IP.
        host: Option<String>,
        /// Port number.
        port: u16,
    },
    /// `httpGet` (scheme HTTP): 200..=399.
    Http {
        /// `host`, default the Pod IP.
        host: Option<String>,
        /// Port number.
        port: u16,
        /// `path` (default `/`).
        path: String,
        /// `httpHeaders`, in order.
        headers: Vec<(String, String)>,
    },
    /// `grpc`: grpc.health.v1.Health/Check answers SERVING.
    Grpc {
        /// Port number.
        port: u16,
        /// `service` (default empty: the server as a whole).
        service: String,
    },
}

impl Service {
    /// A Service with Kubernetes' defaults: type ClusterIP, no addresses, no
    /// ports, Cluster traffic policies, no affinity.
    pub fn new(key: ObjectKey) -> Self {
        Service {
            key,
            service_type: ServiceType::ClusterIp,
            cluster_ips: Vec::new(),
            headless: false,
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            allocate_lb_node_ports: true,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            affinity: Affinity::None,
            health_check_node_port: None,
            external_name: None,
            selector: None,
            publish_not_ready: false,
            proxy_name: None,
            headless_label: false,
            traffic_distribution: None,
            options: ServiceOptions::default(),
            skipped_ports: Vec::new(),
        }
    }

    /// Whether ringvip (configured with `proxy_name`) programs a data plane for it,
    /// per SEMANTICS.md "Skipped entirely".
    pub fn is_proxied(&self, proxy_name: &str) -> bool {
        if self.service_type == ServiceType::ExternalName || self.headless || self.headless_label {
            return false;
        }
        match &self.proxy_name {
            Some(n) => n == proxy_name,
            None => true,
        }
    }
}

/// Address family of an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    /// `IPv4`.
    V4,
    /// `IPv6`.
    V6,
}

impl AddressFamily {
    /// Family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => AddressFamily::V4,
            IpAddr::V6(_) => AddressFamily::V6,
        }
    }
}

/// One entry of an EndpointSlice's `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlicePort {
    /// Port name; empty when unnamed.
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number; `None` means "all ports" in Kubernetes, which a Service never uses.
    pub port: Option<u16>,
}

/// Interned names: node names and zones, which a cluster's endpoints
/// repeat (at 1,000,000 endpoints, two separately allocated `String`s each
/// were ~100 bytes per endpoint). Names no longer held anywhere else are
/// swept when the table has doubled since the last sweep, so it stays
/// bounded by the names in use.
static NAMES: Mutex<Names> = Mutex::new(Names {
    set: None,
    sweep_at: 1024,
});

struct Names {
    /// foldhash, not SipHash: two lookups per endpoint, and SipHash was ~5 %
    /// of a 100,000-Service start's CPU. Seeded per process all the same.
    set: Option<HashSet<Arc<str>, foldhash::fast::RandomState>>,
    sweep_at: usize,
}

/// The shared copy of `name`.
pub fn intern(name: &str) -> Arc<str> {
    // A poisoned lock only means another thread panicked mid-insert; the
    // set itself is still a valid set.
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let Names { set, sweep_at } = &mut *names;
    let set = set.get_or_insert_with(HashSet::default);
    if let Some(n) = set.get(name) {
        return n.clone();
    }
    if set.len() >= *sweep_at {
        set.retain(|n| Arc::strong_count(n) > 1);
        *sweep_at = (set.len() * 2).max(1024);
    }
    let n: Arc<str> = Arc::from(name);
    set.insert(n.clone());
    n
}

/// One endpoint of an EndpointSlice (only its first address is used). A
/// store holds one per endpoint of the cluster: 64 bytes, its rarely set
/// parts (hints, hostname) boxed apart (they were 72 bytes inline).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// First entry of `addresses`.
    pub ip: IpAddr,
    /// `conditions.ready` (missing means true).
    pub ready: bool,
    /// `conditions.serving` (missing means true).
    pub serving: bool,
    /// `conditions.terminating` (missing means false).
    pub terminating: bool,
    /// `nodeName`, interned (see [`intern`]): a million endpoints on a few
    /// thousand nodes share a few thousand strings.
    pub node_name: Option<Arc<str>>,
    /// `zone`, interned.
    pub zone: Option<Arc<str>>,
    /// Hints and hostname; `None` when it has none of them (build it with
    /// [`EndpointExtra::boxed`], which keeps that so).
    pub extra: Option<Box<EndpointExtra>>,
}

/// The parts of an [`Endpoint`] most endpoints lack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct EndpointExtra {
    /// `hints.forZones[].name`; `None` when the endpoint has no hints.
    pub zone_hints: Option<Vec<String>>,
    /// `hints.forNodes[].name`; `None` when the endpoint has none.
    pub node_hints: Option<Vec<String>>,
    /// `hostname` (used by DNS).
    pub hostname: Option<String>,
}

impl EndpointExtra {
    /// The parts given, boxed, or `None` when none is set (so two equal
    /// endpoints compare equal however they were built).
    pub fn boxed(
        zone_hints: Option<Vec<String>>,
        node_hints: Option<Vec<String>>,
        hostname: Option<String>,
    ) -> Option<Box<EndpointExtra>> {
        let e = EndpointExtra {
            zone_hints,
            node_hints,
            hostname,
        };
        (e != EndpointExtra::default()).then(|| Box::new(e))
    }
}

impl Endpoint {
    /// A ready, serving, non-terminating endpoint with nothing else set.
    pub fn ready(ip: IpAddr) -> Self {
        Endpoint {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            extra: None,
        }
    }

    /// `hints.forZones[].name`; `None` when the endpoint has no hints.
    pub fn zone_hints(&self) -> Option<&Vec<String>> {
        self.extra.as_ref().and_then(|e| e.zone_hints.as_ref())
    }

    /// `hints.forNodes[].name`; `None` when the endpoint has none.
    pub fn node_hints(&self) -> Option<&Vec<String>> {
        self.extra.as_ref().and_then(|e| e.node_hints.as_ref())
    }

    /// `hostname` (used by DNS).
    pub fn hostname(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.hostname.as_deref())
    }

    /// The same endpoint with `hostname`.
    pub fn with_hostname(self, hostname: Option<String>) -> Self {
        let (z, n) = match self.extra {
            Some(e) => (e.zone_hints, e.node_hints),
            None => (None, None),
        };
        Endpoint {
            extra: EndpointExtra::boxed(z, n, hostname),
            ..self
        }
    }
}

/// A validated EndpointSlice.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct EndpointSlice {
    /// Namespace and name of the slice itself.
    pub key: ObjectKey,
    /// Label `kubernetes.io/service-name`: the Service it belongs to (same namespace).
    pub service_name: String,
    /// `addressType`.
    pub family: AddressFamily,
    /// `ports`.
    pub ports: Vec<SlicePort>,
    /// `endpoints`.
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// The port number this slice gives for Service port `sp`: the slice port
    /// of the same name and protocol (kube-proxy's join), if it has a number.
    pub fn port_for(&self, sp: &ServicePort) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
            .and_then(|p| p.port)
    }
}

/// What ringvip needs of a Node object.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct Node {
    /// `metadata.name`.
    pub name: String,
    /// Label `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// `status.addresses` of type InternalIP / ExternalIP, in order.
    pub addresses: Vec<IpAddr>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

/// A Pod as file mode needs it to resolve a Service selector.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct Pod {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// Ready condition is True.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// Named container ports: (name, protocol, number).
    pub container_ports: Vec<(String, Protocol, u16)>,
    /// `spec.hostname`.
    pub hostname: Option<String>,
    /// `spec.subdomain`: the endpoint gets `hostname` only in the Service of this name.
    pub subdomain: Option<String>,
    /// `status.phase` is `Succeeded` or `Failed`: never an endpoint.
    pub terminal: bool,
    /// The containers' `readinessProbe`s, which ringvip runs: with any,
    /// `ready` is what they say (all succeeding; not ready before that),
    /// not the Ready condition of the file.
    pub readiness_probes: Vec<Probe>,
}

/// A legacy `v1 Endpoints` object (file mode), already mirrored into the
/// EndpointSlices the EndpointSliceMirroring controller would write; they
/// are used only while its same-name Service exists without a selector.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct LegacyEndpoints {
    /// Namespace and name (the Service's).
    pub key: ObjectKey,
    /// False when labelled `endpointslice.kubernetes.io/skip-mirror: "true"`
    /// or annotated as a leader-election lock: never mirrored.
    pub mirror: bool,
    /// One slice per subset and address family.
    pub slices: Vec<EndpointSlice>,
}

/// Any object a source can deliver.
#[derive(Debug, Clone, PartialEq, Hash)]
pub enum Object {
    /// A Service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A Node.
    Node(Node),
    /// A Pod (file mode).
    Pod(Pod),
    /// A legacy `v1 Endpoints` (file mode).
    Endpoints(LegacyEndpoints),
}

/// Kind of an object, for deletes and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
    /// `v1 Node`.
    Node,
    /// `v1 Pod`.
    Pod,
    /// `v1 Endpoints`.
    Endpoints,
}

impl Object {
    /// Kind and key identifying the object.
    pub fn id(&self) -> (Kind, ObjectKey) {
        match self {
            Object::Service(s) => (Kind::Service, s.key.clone()),
            Object::EndpointSlice(s) => (Kind::EndpointSlice, s.key.clone()),
            Object::Node(n) => (Kind::Node, ObjectKey::new("", n.name.clone())),
            Object::Pod(p) => (Kind::Pod, p.key.clone()),
            Object::Endpoints(e) => (Kind::Endpoints, e.key.clone()),
        }
    }

    /// Whether the object is the one `kind` and `key` identify (what
    /// [`Object::id`] says, without building it).
    pub fn has_id(&self, kind: Kind, key: &ObjectKey) -> bool {
        match self {
            Object::Service(s) => kind == Kind::Service && s.key == *key,
            Object::EndpointSlice(s) => kind == Kind::EndpointSlice && s.key == *key,
            Object::Node(n) => kind == Kind::Node && key.namespace.is_empty() && n.name == key.name,
            Object::Pod(p) => kind == Kind::Pod && p.key == *key,
            Object::Endpoints(e) => kind == Kind::Endpoints && e.key == *key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store holds one `Endpoint` per endpoint of the cluster (a million
    /// at 100,000 Services): its rarely set parts stay out of line.
    #[test]
    fn an_endpoint_record_is_64_bytes() {
        assert!(std::mem::size_of::<Endpoint>() <= 64);
        let e = Endpoint::ready("10.0.0.1".parse().unwrap());
        let named = e.clone().with_hostname(Some("a".into()));
        assert_eq!(named.hostname(), Some("a"));
        // Built with nothing set, it equals one that never had anything.
        assert_eq!(named.with_hostname(None), e);
        assert_eq!(EndpointExtra::boxed(None, None, None), None);
    }

    /// Equal names share one allocation; a name no longer held anywhere
    /// leaves the table at a later sweep, so the table follows the names in
    /// use.
    #[test]
    fn interned_names_are_shared_and_unused_ones_are_swept() {
        let a = intern("intern-test-node-1");
        let b = intern(&String::from("intern-test-node-1"));
        assert!(Arc::ptr_eq(&a, &b));
        let gone = Arc::downgrade(&intern("intern-test-gone"));
        // Enough other names to pass the sweep threshold.
        let kept: Vec<Arc<str>> = (0..2100)
            .map(|i| intern(&format!("intern-test-{i}")))
            .collect();
        assert!(
            gone.upgrade().is_none(),
            "an unused name stays in the table"
        );
        assert!(Arc::ptr_eq(&kept[7], &intern("intern-test-7")));
        assert!(Arc::ptr_eq(&a, &intern("intern-test-node-1")));
    }
}
