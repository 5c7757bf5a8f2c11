//! Prometheus metrics (prometheus-client), every metric name a constant here.
//!
//! Two kinds of metric live here:
//!
//! * kube-proxy's control-plane metrics, with the same meaning and the
//!   `kubeproxy_` prefix replaced by `ringvip_` (sync duration, network
//!   programming duration, service/endpoint changes, no-local-endpoints, last
//!   sync timestamps);
//! * what only a proxy in the byte path can know, per Service port:
//!   active/total connections, bytes each way, connect failures by bounded
//!   reason, active UDP flows.
//!
//! The data path never touches the registry: a snapshot compile calls
//! [`Metrics::port`] once per Service port and stores the returned
//! [`PortMetrics`], whose handles are `Arc`-backed atomics. Calling
//! [`Metrics::port`] again with the same [`PortLabels`] returns handles to the
//! *same* atomics, so counters keep accumulating across snapshot compiles.
//!
//! Names: the constants hold the name as it is queried in Prometheus. For
//! counters that is the sample name ending in `_total` (the OpenMetrics family
//! name, shown on `# TYPE` lines, is the same without `_total`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// Counter handle used in [`PortMetrics`] (an `Arc<AtomicU64>` inside).
pub type Counter = prometheus_client::metrics::counter::Counter;
/// Integer gauge handle used in [`PortMetrics`] (an `Arc<AtomicI64>` inside).
pub type Gauge = prometheus_client::metrics::gauge::Gauge;
/// Floating-point gauge (seconds since the epoch).
pub type FloatGauge = prometheus_client::metrics::gauge::Gauge<f64, AtomicU64>;

// ---- kube-proxy compatible metrics -------------------------------------------

/// Declares the name of a kube-proxy metric as ringvip exports it: the same
/// name with `ringvip_` in place of `kubeproxy_`, so the two cannot drift.
macro_rules! kube_proxy_metric {
    ($($(#[doc = $doc:literal])* $name:ident = $suffix:literal;)*) => {$(
        $(#[doc = $doc])*
        #[doc = concat!("kube-proxy: `kubeproxy_", $suffix, "`.")]
        pub const $name: &str = concat!("ringvip_", $suffix);
    )*};
}

kube_proxy_metric! {
    /// Histogram: time one store → snapshot sync (compile + publish) took.
    SYNC_PROXY_RULES_DURATION_SECONDS = "sync_proxy_rules_duration_seconds";
    /// Histogram: time from a change of a Service's endpoints (their trigger
    /// time) until the data plane uses it.
    NETWORK_PROGRAMMING_DURATION_SECONDS = "network_programming_duration_seconds";
    /// Counter: Service changes seen by the store.
    SYNC_PROXY_RULES_SERVICE_CHANGES_TOTAL = "sync_proxy_rules_service_changes_total";
    /// Counter: endpoint (EndpointSlice) changes seen by the store.
    SYNC_PROXY_RULES_ENDPOINT_CHANGES_TOTAL = "sync_proxy_rules_endpoint_changes_total";
    /// Gauge: Service changes received but not yet in a published snapshot.
    SYNC_PROXY_RULES_SERVICE_CHANGES_PENDING = "sync_proxy_rules_service_changes_pending";
    /// Gauge: endpoint changes received but not yet in a published snapshot.
    SYNC_PROXY_RULES_ENDPOINT_CHANGES_PENDING = "sync_proxy_rules_endpoint_changes_pending";
    /// Gauge (despite the name, as in kube-proxy), label `traffic_policy` =
    /// `internal` | `external`: Services with a Local traffic policy that have
    /// ready endpoints in the cluster but none on this node.
    SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL = "sync_proxy_rules_no_local_endpoints_total";
    /// Gauge: Unix time (seconds) of the last successful sync.
    SYNC_PROXY_RULES_LAST_TIMESTAMP_SECONDS = "sync_proxy_rules_last_timestamp_seconds";
    /// Gauge: Unix time (seconds) at which the last sync was queued.
    SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS =
        "sync_proxy_rules_last_queued_timestamp_seconds";
}

// ---- byte-path metrics, per Service port --------------------------------------

/// Gauge per Service port: connections currently open (client side accepted).
pub const CONNECTIONS_ACTIVE: &str = "ringvip_connections_active";
/// Counter per Service port: connections accepted.
pub const CONNECTIONS_TOTAL: &str = "ringvip_connections_total";
/// Counter per Service port and `direction` (`to_backend` | `to_client`):
/// payload bytes relayed.
pub const BYTES_TOTAL: &str = "ringvip_bytes_total";
/// Counter per Service port and `reason` (see [`ConnectFailure::as_str`]):
/// flows that could not be connected to a backend.
pub const CONNECT_FAILURES_TOTAL: &str = "ringvip_connect_failures_total";
/// Gauge per UDP Service port: UDP flows currently in the flow table.
pub const UDP_FLOWS_ACTIVE: &str = "ringvip_udp_flows_active";
/// Gauge per frontend (`address`, `protocol`): TCP connections admitted under
/// `--max-connections-per-frontend` (connecting or relaying).
pub const FRONTEND_CONNECTIONS_ACTIVE: &str = "ringvip_frontend_connections_active";
/// Counter per `limit` (`max_connections` | `max_connections_per_frontend` |
/// `tcp_idle_timeout`): connections refused by a limit, or closed for idleness.
pub const LIMIT_HITS_TOTAL: &str = "ringvip_limit_hits_total";

// ---- byte-path metrics, per endpoint of a Service port ------------------------
//
// Labels: the per-port labels plus `endpoint` = "IP:port". Series of an
// endpoint exist while it is listed for the Service port: 12 per endpoint
// and Service port (see `telemetry::endpoints`).

/// Counter per endpoint: connections (and UDP flows) relayed to it.
pub const ENDPOINT_CONNECTIONS_TOTAL: &str = "ringvip_endpoint_connections_total";
/// Gauge per endpoint: connections (and UDP flows) open to it now.
pub const ENDPOINT_CONNECTIONS_ACTIVE: &str = "ringvip_endpoint_connections_active";
/// Counter per endpoint and `reason` (as [`CONNECT_FAILURES_TOTAL`]): failed
/// connects to it.
pub const ENDPOINT_CONNECT_FAILURES_TOTAL: &str = "ringvip_endpoint_connect_failures_total";
/// Counter per endpoint and `direction` (`to_backend` | `to_client`).
pub const ENDPOINT_BYTES_TOTAL: &str = "ringvip_endpoint_bytes_total";
/// Gauge per endpoint: 1 usable, 0 backed off after a failed connect
/// (passive health) until a connect to it succeeds, or while its active
/// health check finds it down.
pub const ENDPOINT_HEALTHY: &str = "ringvip_endpoint_healthy";
/// Gauge per endpoint of a Service with `ringvip.io/health-check`: 1 when
/// the check finds it up, 0 when down.
pub const ENDPOINT_CHECK_UP: &str = "ringvip_endpoint_check_up";
/// Gauge per endpoint: Unix time (seconds) of its last health change, or of
/// its first appearance in the Service port.
pub const ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS: &str =
    "ringvip_endpoint_health_last_change_timestamp_seconds";
/// Gauge: Service ports not served, over every Service ringvip programs:
/// SCTP ports beside a Service's TCP/UDP ones (which are served).
pub const SKIPPED_SERVICE_PORTS: &str = "ringvip_skipped_service_ports";
/// Counter: connections to LoadBalancer IPs from a `--proxy-protocol-from`
/// address reset because their PROXY v2 header was missing or malformed.
pub const PROXY_PROTOCOL_REJECTED_TOTAL: &str = "ringvip_proxy_protocol_rejected_total";
/// Counter: access-log records dropped because the writer fell behind (the
/// data plane never waits for it).
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "ringvip_access_log_dropped_total";

mod admitted;
mod endpoints;
mod ports;

/// One family of a collector: its descriptor, then one sample per item of
/// `series` (each value read from its atomic at this scrape).
fn family<L: EncodeLabelSet, M: prometheus_client::encoding::EncodeMetric>(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: prometheus_client::metrics::MetricType,
    series: impl Iterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in series {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}
pub use endpoints::{EndpointMetrics, EndpointsLease};

/// The OpenMetrics family name under which a counter must be registered so
/// that its sample is exposed as `name` (prometheus-client appends `_total`).
fn counter_family(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// Labels identifying one Service port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Port name, or the port number when the port is unnamed.
    pub port: String,
    /// `TCP`, `UDP` or `SCTP`, as in the Service spec.
    pub protocol: String,
}

/// Traffic policy a no-local-endpoints count refers to: the `traffic_policy`
/// label of [`SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum TrafficPolicy {
    Internal,
    External,
}

impl EncodeLabelValue for TrafficPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            TrafficPolicy::Internal => "internal",
            TrafficPolicy::External => "external",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficPolicyLabels {
    traffic_policy: TrafficPolicy,
}

/// Why a new flow could not be connected to a backend. A bounded set, so it
/// can be a metric label: `reason` on [`CONNECT_FAILURES_TOTAL`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The backend did not answer in time (ETIMEDOUT or our connect timeout).
    Timeout,
    /// The backend refused (ECONNREFUSED / RST).
    Refused,
    /// No route to the backend (EHOSTUNREACH / ENETUNREACH).
    Unreachable,
    /// The Service port has no usable endpoint.
    NoEndpoints,
    /// The client is outside `loadBalancerSourceRanges`.
    SourceRange,
    /// Anything else.
    Other,
}

impl ConnectFailure {
    /// Number of variants (the length of [`ConnectFailure::ALL`]).
    pub const COUNT: usize = 6;

    /// Every variant, in index order.
    pub const ALL: [ConnectFailure; ConnectFailure::COUNT] = [
        ConnectFailure::Timeout,
        ConnectFailure::Refused,
        ConnectFailure::Unreachable,
        ConnectFailure::NoEndpoints,
        ConnectFailure::SourceRange,
        ConnectFailure::Other,
    ];

    /// The label value of the `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Refused => "refused",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::NoEndpoints => "no_endpoints",
            ConnectFailure::SourceRange => "source_range",
            ConnectFailure::Other => "other",
        }
    }

    /// Reduce a connect error to a reason: ECONNREFUSED → `Refused`,
    /// ETIMEDOUT (or [`std::io::ErrorKind::TimedOut`]) → `Timeout`,
    /// EHOSTUNREACH / ENETUNREACH → `Unreachable`, anything else → `Other`.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        if let Some(code) = e.raw_os_error() {
            match code {
                libc::ECONNREFUSED => return ConnectFailure::Refused,
                libc::ETIMEDOUT => return ConnectFailure::Timeout,
                libc::EHOSTUNREACH | libc::ENETUNREACH => return ConnectFailure::Unreachable,
                _ => {}
            }
        }
        match e.kind() {
            ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            ErrorKind::TimedOut => ConnectFailure::Timeout,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Other,
        }
    }

    fn index(self) -> usize {
        match self {
            ConnectFailure::Timeout => 0,
            ConnectFailure::Refused => 1,
            ConnectFailure::Unreachable => 2,
            ConnectFailure::NoEndpoints => 3,
            ConnectFailure::SourceRange => 4,
            ConnectFailure::Other => 5,
        }
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for ConnectFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Labels identifying one frontend (address and port, protocol).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontendLabels {
    /// `IP:port` of the frontend.
    pub address: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

/// Counters of [`LIMIT_HITS_TOTAL`], one per limit; created detached and
/// registered with [`Metrics::register_limit_hits`].
#[derive(Clone, Debug)]
pub struct LimitHits {
    family: Family<LimitLabels, Counter>,
    /// Refused by `--max-connections`.
    pub max_connections: Counter,
    /// Refused by `--max-connections-per-frontend`.
    pub max_connections_per_frontend: Counter,
    /// Closed by `--tcp-idle-timeout-secs`.
    pub tcp_idle_timeout: Counter,
}

impl Default for LimitHits {
    fn default() -> Self {
        let family = Family::<LimitLabels, Counter>::default();
        let get = |limit| family.get_or_create_owned(&LimitLabels { limit });
        LimitHits {
            max_connections: get("max_connections"),
            max_connections_per_frontend: get("max_connections_per_frontend"),
            tcp_idle_timeout: get("tcp_idle_timeout"),
            family,
        }
    }
}

/// Handles for one Service port, taken at snapshot compile: plain atomics
/// in one allocation, shared by `Arc` (see `telemetry::ports`); every
/// operation on the data path is one atomic op.
#[derive(Debug, Default)]
pub struct PortMetrics {
    /// Connections currently open; `inc()` on accept, `dec()` on close.
    pub connections_active: Level,
    /// Connections accepted.
    pub connections_total: Count,
    /// Payload bytes relayed client → backend.
    pub bytes_to_backend: Count,
    /// Payload bytes relayed backend → client.
    pub bytes_to_client: Count,
    /// UDP flows currently in the flow table. Exported only for UDP ports.
    pub udp_flows_active: Level,
    failures: Failures,
}

impl PortMetrics {
    /// Count one failed connect attempt for `r`.
    pub fn connect_failure(&self, r: ConnectFailure) {
        self.failures.count(r);
    }

    /// Connect failures counted so far for `r`.
    pub fn connect_failures(&self, r: ConnectFailure) -> u64 {
        self.failures.get(r)
    }

    /// Handles registered nowhere: for tests and for code paths that need a
    /// `PortMetrics` but have no [`Metrics`].
    pub fn detached() -> PortMetrics {
        PortMetrics::default()
    }
}

/// A counter held inside a larger structure (a [`Traffic`], an
/// [`EndpointMetrics`]), not in an allocation of its own as [`Counter`]:
/// a million endpoints' counters are a million allocations, not fourteen
/// million. Read at scrape; every update is one atomic operation.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// The count.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge held inside a larger structure (see [`Count`]).
#[derive(Debug, Default)]
pub struct Level(AtomicI64);

impl Level {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Takes one away.
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    /// Sets it.
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    /// The value.
    #[inline]
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Failed connects by reason, one [`Count`] per [`ConnectFailure`], made
/// at the first failure: most endpoints never fail, and a million
/// endpoints' six zeros were 48 MB (16 bytes each until then). The first
/// failure of an endpoint allocates once, on the failure path, never on a
/// connection that succeeds.
#[derive(Debug, Default)]
pub struct Failures(OnceLock<Box<[Count; ConnectFailure::COUNT]>>);

impl Failures {
    /// Counts one failure for `r`.
    #[inline]
    pub fn count(&self, r: ConnectFailure) {
        let counts = self.0.get_or_init(Box::default);
        if let Some(c) = counts.get(r.index()) {
            c.inc();
        }
    }

    /// The failures counted for `r`.
    pub fn get(&self, r: ConnectFailure) -> u64 {
        self.0
            .get()
            .and_then(|c| c.get(r.index()))
            .map_or(0, Count::get)
    }
}

/// What one frontend, or one endpoint of a Service port, has carried:
/// connections (and UDP flows) total and open, bytes each way, failed
/// connects by reason. Plain atomics in one structure: a frontend shares
/// it by `Arc`, an endpoint holds it inside its [`EndpointMetrics`].
#[derive(Debug, Default)]
pub struct Traffic {
    /// Connections (and UDP flows) open now.
    pub connections_active: Level,
    /// Connections (and UDP flows) since start.
    pub connections_total: Count,
    /// Payload bytes client → backend.
    pub bytes_to_backend: Count,
    /// Payload bytes backend → client.
    pub bytes_to_client: Count,
    failures: Failures,
}

impl Traffic {
    /// Count one failed connect attempt for `r`.
    pub fn connect_failure(&self, r: ConnectFailure) {
        self.failures.count(r);
    }

    /// Connect failures counted so far for `r`.
    pub fn connect_failures(&self, r: ConnectFailure) -> u64 {
        self.failures.get(r)
    }
}

/// The process's metric registry and the families in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,

    sync_duration: Histogram,
    network_programming: Histogram,
    service_changes: Counter,
    endpoint_changes: Counter,
    service_changes_pending: Gauge,
    endpoint_changes_pending: Gauge,
    no_local_endpoints: Family<TrafficPolicyLabels, Gauge>,
    last_timestamp: FloatGauge,
    last_queued_timestamp: FloatGauge,
    skipped_ports: Gauge,

    /// Handles of each Service port (see [`Metrics::port`]).
    ports: Arc<ports::Ports>,
    /// Each TCP frontend's admitted-connections gauge (see [`Metrics::frontend_active`]).
    frontend_active: Arc<admitted::Frontends>,
    endpoints: Arc<endpoints::Endpoints>,
    /// Handles of each frontend (see [`Metrics::frontend`]).
    frontends: Mutex<HashMap<(SocketAddr, &'static str), FrontendHandles>>,
}

/// The handles of one frontend: what it admitted (TCP), what it carried.
#[derive(Clone, Debug, Default)]
pub struct FrontendHandles {
    /// TCP connections admitted (see [`Metrics::frontend_active`]).
    pub admitted: Gauge,
    /// What it carried (the same atomics in every snapshot; not exported).
    pub traffic: Arc<Traffic>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// kube-proxy's buckets for `network_programming_duration_seconds`:
/// 0.25 s, 0.5 s, 1..=59 s, 60..=115 s by 5, 120..=300 s by 30.
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// `metric`, registered under `name`.
fn registered<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// A new metric (or family), registered under `name`.
fn fresh<M: Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str) -> M {
    registered(r, name, help, M::default())
}

/// A new counter (or family of counters) whose samples are named `name`.
fn counter<M: Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str) -> M {
    fresh(r, counter_family(name), help)
}

impl Metrics {
    /// A registry with every family registered (and no per-port series yet).
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let r = &mut registry;
        // Fields in registration order: it is the order of the exposition.
        let m = Metrics {
            // kube-proxy: ExponentialBuckets(0.001, 2, 15).
            sync_duration: registered(
                r,
                SYNC_PROXY_RULES_DURATION_SECONDS,
                "Time one sync (snapshot compile and publish) took, in seconds",
                Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            ),
            network_programming: registered(
                r,
                NETWORK_PROGRAMMING_DURATION_SECONDS,
                "Time from an endpoints change until the data plane uses it, in seconds",
                Histogram::new(network_programming_buckets()),
            ),
            service_changes: counter(
                r,
                SYNC_PROXY_RULES_SERVICE_CHANGES_TOTAL,
                "Service changes received",
            ),
            endpoint_changes: counter(
                r,
                SYNC_PROXY_RULES_ENDPOINT_CHANGES_TOTAL,
                "Endpoint changes received",
            ),
            service_changes_pending: fresh(
                r,
                SYNC_PROXY_RULES_SERVICE_CHANGES_PENDING,
                "Service changes received and not yet applied",
            ),
            endpoint_changes_pending: fresh(
                r,
                SYNC_PROXY_RULES_ENDPOINT_CHANGES_PENDING,
                "Endpoint changes received and not yet applied",
            ),
            no_local_endpoints: fresh(
                r,
                SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL,
                "Services with a Local traffic policy and no local ready endpoints",
            ),
            last_timestamp: fresh(
                r,
                SYNC_PROXY_RULES_LAST_TIMESTAMP_SECONDS,
                "Unix time of the last successful sync, in seconds",
            ),
            last_queued_timestamp: fresh(
                r,
                SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS,
                "Unix time at which the last sync was queued, in seconds",
            ),
            skipped_ports: fresh(
                r,
                SKIPPED_SERVICE_PORTS,
                "Service ports not served (SCTP), over every Service",
            ),
            ports: {
                let p = Arc::new(ports::Ports::default());
                r.register_collector(Box::new(p.clone()));
                p
            },
            frontend_active: {
                let f = Arc::new(admitted::Frontends::default());
                r.register_collector(Box::new(f.clone()));
                f
            },
            endpoints: {
                let e = Arc::new(endpoints::Endpoints::default());
                r.register_collector(Box::new(e.clone()));
                e
            },
            frontends: Mutex::new(HashMap::new()),
            registry,
        };
        // kube-proxy exports both traffic policies from the start.
        for traffic_policy in [TrafficPolicy::Internal, TrafficPolicy::External] {
            drop(
                m.no_local_endpoints
                    .get_or_create(&TrafficPolicyLabels { traffic_policy }),
            );
        }
        m
    }

    /// The admitted-connections gauge of one frontend (same labels, same
    /// atomic across snapshots), exported once a scrape finds it above
    /// zero. Call at snapshot compile.
    pub fn frontend_active(&self, labels: &FrontendLabels) -> Gauge {
        self.frontend_active.gauge(labels)
    }

    /// [`Metrics::frontend_active`] (TCP only; a detached gauge otherwise)
    /// and the counters of the frontend `addr`/`protocol` (not exported:
    /// `ringvip status` rows), kept by address: the same atomics in every
    /// snapshot, and a compile formats and hashes the labels of a frontend
    /// once in the process, not at every compile.
    pub fn frontend(&self, addr: SocketAddr, protocol: &'static str) -> FrontendHandles {
        let mut map = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(&(addr, protocol)) {
            return h.clone();
        }
        let labels = FrontendLabels {
            address: addr.to_string(),
            protocol: protocol.to_string(),
        };
        let h = FrontendHandles {
            admitted: if protocol == "TCP" {
                self.frontend_active(&labels)
            } else {
                Gauge::default()
            },
            traffic: Arc::default(),
        };
        map.insert((addr, protocol), h.clone());
        h
    }

    /// A lease on the series of each of `endpoints` of the Service port
    /// `port`: they are exported while a lease on them lives (see
    /// [`EndpointsLease`]). Call at snapshot compile, not per connection (it
    /// takes a lock).
    pub fn endpoints(&self, port: &PortLabels, endpoints: &[SocketAddr]) -> EndpointsLease {
        let port = Arc::new(port.clone());
        self.endpoints.lease(&port, endpoints, SystemTime::now())
    }

    /// [`Metrics::port`] and [`Metrics::endpoints`] at once, the lease
    /// sharing the port's labels with its series (one copy per port).
    pub fn port_endpoints(
        &self,
        port: &PortLabels,
        endpoints: &[SocketAddr],
    ) -> (Arc<PortMetrics>, EndpointsLease) {
        let (labels, handles) = self.ports.shared(port);
        let lease = self.endpoints.lease(&labels, endpoints, SystemTime::now());
        (handles, lease)
    }

    /// Exposes the access log's dropped-records counter (created with the
    /// data plane, before the registry).
    pub fn register_access_log_dropped(&mut self, dropped: &Counter) {
        self.registry.register(
            counter_family(ACCESS_LOG_DROPPED_TOTAL),
            "Access-log records dropped because the writer fell behind",
            dropped.clone(),
        );
    }

    /// Exposes the count of connections reset for a bad upstream PROXY header.
    pub fn register_proxy_protocol_rejected(&mut self, rejected: &Counter) {
        self.registry.register(
            counter_family(PROXY_PROTOCOL_REJECTED_TOTAL),
            "Connections from --proxy-protocol-from reset for a missing or malformed PROXY v2 header",
            rejected.clone(),
        );
    }

    /// Exposes the data plane's limit counters (created before the registry).
    pub fn register_limit_hits(&mut self, hits: &LimitHits) {
        self.registry.register(
            counter_family(LIMIT_HITS_TOTAL),
            "Connections refused by a limit, or closed for idleness, per limit",
            hits.family.clone(),
        );
    }

    /// Handles for one Service port. Call at snapshot compile, not per
    /// connection (it takes the families' locks). The same `labels` always
    /// yield the same underlying atomics. Every series of the port is created
    /// (at zero) here, so rates work from the first scrape.
    /// Kept per port in the process (as the families keep their series), so
    /// a compile takes one lookup per port instead of eleven label sets
    /// built and hashed.
    pub fn port(&self, labels: &PortLabels) -> Arc<PortMetrics> {
        self.ports.get(labels)
    }

    /// Record how long one sync (compile + publish) took.
    pub fn observe_sync(&self, d: Duration) {
        self.sync_duration.observe(d.as_secs_f64());
    }

    /// Record the time from an endpoints change to the data plane using it.
    pub fn observe_network_programming(&self, d: Duration) {
        self.network_programming.observe(d.as_secs_f64());
    }

    /// Count `n` Service changes received.
    pub fn add_service_changes(&self, n: u64) {
        self.service_changes.inc_by(n);
    }

    /// Count `n` endpoint changes received.
    pub fn add_endpoint_changes(&self, n: u64) {
        self.endpoint_changes.inc_by(n);
    }

    /// Set the numbers of Service and endpoint changes not yet applied.
    pub fn set_pending_changes(&self, services: i64, endpoints: i64) {
        self.service_changes_pending.set(services);
        self.endpoint_changes_pending.set(endpoints);
    }

    /// Set the numbers of Services with `internalTrafficPolicy: Local` /
    /// `externalTrafficPolicy: Local` that have endpoints, but none local.
    pub fn set_no_local_endpoints(&self, internal: i64, external: i64) {
        for (traffic_policy, v) in [
            (TrafficPolicy::Internal, internal),
            (TrafficPolicy::External, external),
        ] {
            self.no_local_endpoints
                .get_or_create(&TrafficPolicyLabels { traffic_policy })
                .set(v);
        }
    }

    /// Sets the number of Service ports not served (SCTP).
    pub fn set_skipped_ports(&self, n: i64) {
        self.skipped_ports.set(n);
    }

    /// Record the time of the last successful sync.
    pub fn set_last_sync(&self, t: SystemTime) {
        self.last_timestamp.set(unix_seconds(t));
    }

    /// Record the time at which a sync was last queued (an update arrived).
    pub fn set_last_queued(&self, t: SystemTime) {
        self.last_queued_timestamp.set(unix_seconds(t));
    }

    /// The registry in the OpenMetrics text format (ends with `# EOF`), to be
    /// served as [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a formatter error can get here; writing to a String
            // cannot fail, so this is a bug in an encoder.
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

// ---- DNS answers and drain -------------------------------------------------------

/// Counter per `rcode` (see [`DNS_RCODES`]) and `protocol` (`udp` |
/// `tcp`): DNS responses sent by the cluster DNS server, forwarded ones included.
pub const DNS_RESPONSES_TOTAL: &str = "ringvip_dns_responses_total";
/// Gauge: TCP connections a drain (after SIGTERM) still waits for; 0 when
/// not draining.
pub const DRAIN_CONNECTIONS: &str = "ringvip_drain_connections";

/// Transport a DNS response went out on: the `protocol` label of
/// [`DNS_RESPONSES_TOTAL`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DnsProtocol {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

impl DnsProtocol {
    fn as_str(self) -> &'static str {
        match self {
            DnsProtocol::Udp => "udp",
            DnsProtocol::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    rcode: &'static str,
    protocol: &'static str,
}

/// Counters of [`DNS_RESPONSES_TOTAL`]; created detached (every series at
/// zero, so rates work from the first scrape) and registered with
/// [`Metrics::register_dns`]. Counting is one atomic add, no lock.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    family: Family<DnsLabels, Counter>,
    /// Indexed by [`DnsProtocol`] (UDP, TCP), then by rcode (0..=5, then
    /// "other").
    counters: [[Counter; DNS_RCODES.len()]; 2],
}

/// `rcode` label values of [`DNS_RESPONSES_TOTAL`]: the codes 0 to 5 by their
/// RFC 1035 names, BADVERS (16, RFC 6891), then `other` for any other code
/// (what an upstream sent).
pub const DNS_RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

impl DnsMetrics {
    /// Count one response with (extended, 12-bit) response code `rcode`
    /// sent over `protocol`.
    pub fn responded(&self, protocol: DnsProtocol, rcode: u16) {
        let row = match protocol {
            DnsProtocol::Udp => &self.counters[0],
            DnsProtocol::Tcp => &self.counters[1],
        };
        let i = match rcode {
            0..=5 => usize::from(rcode),
            16 => 6,
            _ => 7,
        };
        if let Some(c) = row.get(i) {
            c.inc();
        }
    }
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let family = Family::<DnsLabels, Counter>::default();
        let row = |protocol: DnsProtocol| {
            DNS_RCODES.map(|rcode| {
                family.get_or_create_owned(&DnsLabels {
                    rcode,
                    protocol: protocol.as_str(),
                })
            })
        };
        DnsMetrics {
            counters: [row(DnsProtocol::Udp), row(DnsProtocol::Tcp)],
            family,
        }
    }
}

impl Metrics {
    /// Exposes the DNS server's response counters.
    pub fn register_dns(&mut self, dns: &DnsMetrics) {
        self.registry.register(
            counter_family(DNS_RESPONSES_TOTAL),
            "DNS responses sent, per response code and transport",
            dns.family.clone(),
        );
    }

    /// Exposes `gauge` as [`DRAIN_CONNECTIONS`].
    pub fn register_drain(&mut self, gauge: &Gauge) {
        self.registry.register(
            DRAIN_CONNECTIONS,
            "TCP connections a drain (after SIGTERM) still waits for; 0 when not draining",
            gauge.clone(),
        );
    }
}

/// Content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(port: &str, protocol: &str) -> PortLabels {
        PortLabels {
            namespace: "default".into(),
            service: "web".into(),
            port: port.into(),
            protocol: protocol.into(),
        }
    }

    /// The value of the sample line starting with `prefix` (name + labels).
    fn sample(text: &str, prefix: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.to_string())
    }

    #[test]
    fn port_twice_shares_counters() {
        let m = Metrics::new();
        let a = m.port(&labels("http", "TCP"));
        let b = m.port(&labels("http", "TCP"));
        a.connections_total.inc();
        b.connections_total.inc();
        a.bytes_to_backend.inc_by(10);
        b.bytes_to_client.inc_by(7);
        a.connections_active.inc();
        b.connections_active.dec();
        a.connect_failure(ConnectFailure::Refused);
        b.connect_failure(ConnectFailure::Refused);
        assert_eq!(a.connections_total.get(), 2);
        assert_eq!(b.connections_total.get(), 2);
        assert_eq!(b.bytes_to_backend.get(), 10);
        assert_eq!(a.bytes_to_client.get(), 7);
        assert_eq!(a.connections_active.get(), 0);
        assert_eq!(a.connect_failures(ConnectFailure::Refused), 2);
        assert_eq!(b.connect_failures(ConnectFailure::Timeout), 0);

        // A different port is a different series.
        let c = m.port(&labels("https", "TCP"));
        assert_eq!(c.connections_total.get(), 0);
    }

    #[test]
    fn detached_registers_nothing() {
        let m = Metrics::new();
        let d = PortMetrics::detached();
        d.connections_total.inc();
        d.connect_failure(ConnectFailure::Other);
        assert_eq!(d.connect_failures(ConnectFailure::Other), 1);
        assert!(!m.encode().contains("service=\"web\""));
    }

    #[test]
    fn encode_contains_names_labels_values() {
        let m = Metrics::new();
        let tcp = m.port(&labels("http", "TCP"));
        tcp.connections_total.inc_by(3);
        tcp.connections_active.set(2);
        tcp.bytes_to_backend.inc_by(100);
        tcp.bytes_to_client.inc_by(2000);
        tcp.connect_failure(ConnectFailure::Timeout);
        tcp.connect_failure(ConnectFailure::NoEndpoints);
        tcp.connect_failure(ConnectFailure::NoEndpoints);
        let udp = m.port(&labels("53", "UDP"));
        udp.udp_flows_active.set(4);

        m.observe_sync(Duration::from_millis(3));
        m.observe_network_programming(Duration::from_millis(700));
        m.add_service_changes(5);
        m.add_endpoint_changes(6);
        m.set_pending_changes(1, 2);
        m.set_no_local_endpoints(3, 4);
        m.set_last_sync(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        m.set_last_queued(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));

        let text = m.encode();
        let l = r#"namespace="default",service="web",port="http",protocol="TCP""#;
        let checks: Vec<(String, &str)> = vec![
            (format!("{CONNECTIONS_TOTAL}{{{l}}}"), "3"),
            (format!("{CONNECTIONS_ACTIVE}{{{l}}}"), "2"),
            (format!("{BYTES_TOTAL}{{{l},direction=\"to_backend\"}}"), "100"),
            (format!("{BYTES_TOTAL}{{{l},direction=\"to_client\"}}"), "2000"),
            (format!("{CONNECT_FAILURES_TOTAL}{{{l},reason=\"timeout\"}}"), "1"),
            (format!("{CONNECT_FAILURES_TOTAL}{{{l},reason=\"no_endpoints\"}}"), "2"),
            (format!("{CONNECT_FAILURES_TOTAL}{{{l},reason=\"refused\"}}"), "0"),
            (
                format!(
                    "{UDP_FLOWS_ACTIVE}{{namespace=\"default\",service=\"web\",port=\"53\",protocol=\"UDP\"}}"
                ),
                "4",
            ),
            (SYNC_PROXY_RULES_SERVICE_CHANGES_TOTAL.to_string(), "5"),
            (SYNC_PROXY_RULES_ENDPOINT_CHANGES_TOTAL.to_string(), "6"),
            (SYNC_PROXY_RULES_SERVICE_CHANGES_PENDING.to_string(), "1"),
            (SYNC_PROXY_RULES_ENDPOINT_CHANGES_PENDING.to_string(), "2"),
            (
                format!("{SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL}{{traffic_policy=\"internal\"}}"),
                "3",
            ),
            (
                format!("{SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL}{{traffic_policy=\"external\"}}"),
                "4",
            ),
            (SYNC_PROXY_RULES_LAST_TIMESTAMP_SECONDS.to_string(), "1700000000.0"),
            (
                SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS.to_string(),
                "1700000000.5",
            ),
            (format!("{SYNC_PROXY_RULES_DURATION_SECONDS}_count"), "1"),
            (format!("{SYNC_PROXY_RULES_DURATION_SECONDS}_bucket{{le=\"0.004\"}}"), "1"),
            (format!("{SYNC_PROXY_RULES_DURATION_SECONDS}_bucket{{le=\"0.002\"}}"), "0"),
            (format!("{NETWORK_PROGRAMMING_DURATION_SECONDS}_count"), "1"),
            (format!("{NETWORK_PROGRAMMING_DURATION_SECONDS}_bucket{{le=\"1.0\"}}"), "1"),
        ];
        for (prefix, want) in checks {
            assert_eq!(
                sample(&text, &prefix).as_deref(),
                Some(want),
                "{prefix} in\n{text}"
            );
        }
        // TCP ports export no UDP flow series.
        assert!(!text.contains(&format!("{UDP_FLOWS_ACTIVE}{{{l}}}")));
        // Counter families are declared without `_total`, as OpenMetrics wants.
        assert!(text.contains("# TYPE ringvip_connections counter"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn limit_hits_and_frontend_gauges_are_exposed() {
        let mut m = Metrics::new();
        let hits = LimitHits::default();
        m.register_limit_hits(&hits);
        hits.max_connections_per_frontend.inc();
        let fe = FrontendLabels {
            address: "10.96.0.10:80".into(),
            protocol: "TCP".into(),
        };
        m.frontend_active(&fe).inc();
        // The same labels give the same atomic (it outlives snapshots).
        m.frontend_active(&fe).inc();
        let text = m.encode();
        assert!(
            text.contains("ringvip_limit_hits_total{limit=\"max_connections_per_frontend\"} 1"),
            "{text}"
        );
        assert!(text.contains("ringvip_limit_hits_total{limit=\"tcp_idle_timeout\"} 0"));
        assert!(text.contains(
            "ringvip_frontend_connections_active{address=\"10.96.0.10:80\",protocol=\"TCP\"} 2"
        ));
    }

    #[test]
    fn a_frontend_gauge_is_shown_from_a_scrape_that_finds_it_above_zero() {
        let m = Metrics::new();
        let fe = FrontendLabels {
            address: "10.96.0.10:80".into(),
            protocol: "TCP".into(),
        };
        let line =
            "ringvip_frontend_connections_active{address=\"10.96.0.10:80\",protocol=\"TCP\"}";
        let g = m.frontend_active(&fe);
        assert!(!m.encode().contains(line), "never above zero: not shown");
        g.inc();
        assert!(m.encode().contains(&format!("{line} 1")));
        // Shown from then on, zero included.
        g.dec();
        assert!(m.encode().contains(&format!("{line} 0")));
    }

    #[test]
    fn dns_responses_and_drain_are_exposed() {
        let mut m = Metrics::new();
        let dns = DnsMetrics::default();
        let drain = Gauge::default();
        m.register_dns(&dns);
        m.register_drain(&drain);
        dns.responded(DnsProtocol::Udp, 0);
        dns.responded(DnsProtocol::Udp, 0);
        dns.responded(DnsProtocol::Tcp, 3);
        // A code without a name of its own here (NOTAUTH, from an upstream).
        dns.responded(DnsProtocol::Tcp, 9);
        drain.set(4);
        let text = m.encode();
        for (series, want) in [
            (r#"{rcode="NOERROR",protocol="udp"}"#, "2"),
            (r#"{rcode="NXDOMAIN",protocol="tcp"}"#, "1"),
            (r#"{rcode="other",protocol="tcp"}"#, "1"),
            (r#"{rcode="NOERROR",protocol="tcp"}"#, "0"),
            (r#"{rcode="SERVFAIL",protocol="udp"}"#, "0"),
        ] {
            let prefix = format!("{DNS_RESPONSES_TOTAL}{series}");
            assert_eq!(
                sample(&text, &prefix).as_deref(),
                Some(want),
                "{prefix}\n{text}"
            );
        }
        assert_eq!(
            sample(&text, DRAIN_CONNECTIONS).as_deref(),
            Some("4"),
            "{text}"
        );
        assert!(text.contains("# TYPE ringvip_dns_responses counter"));
    }

    #[test]
    fn counters_survive_recompile() {
        let m = Metrics::new();
        m.port(&labels("http", "TCP")).connections_total.inc();
        let again = m.port(&labels("http", "TCP"));
        again.connections_total.inc();
        let text = m.encode();
        let l = r#"namespace="default",service="web",port="http",protocol="TCP""#;
        assert_eq!(
            sample(&text, &format!("{CONNECTIONS_TOTAL}{{{l}}}")).as_deref(),
            Some("2")
        );
    }

    /// The value of the per-endpoint sample `name{labels of 10.0.0.1:8080
    /// of default/web http/TCP, extra}`.
    fn endpoint_sample(text: &str, name: &str, extra: &str) -> Option<String> {
        let l = r#"namespace="default",service="web",port="http",protocol="TCP",endpoint="10.0.0.1:8080""#;
        sample(text, &format!("{name}{{{l}{extra}}}"))
    }

    #[test]
    fn endpoint_series_live_while_a_lease_does() {
        let m = Metrics::new();
        let port = labels("http", "TCP");
        let ep: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let a = m.endpoints(&port, &[ep]);
        let b = m.endpoints(&port, &[ep]);
        assert!(
            Arc::ptr_eq(&a.metrics()[0], &b.metrics()[0]),
            "one set of atomics"
        );
        let h = a.metrics()[0].clone();
        assert_eq!(h.healthy(), 1);
        h.traffic.connections_total.inc_by(2);
        h.traffic.bytes_to_client.inc_by(9);
        h.connect_failed(
            ConnectFailure::Refused,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        let text = m.encode();
        let checks = [
            (ENDPOINT_CONNECTIONS_TOTAL, "", "2"),
            (ENDPOINT_CONNECTIONS_ACTIVE, "", "0"),
            (ENDPOINT_CONNECT_FAILURES_TOTAL, ",reason=\"refused\"", "1"),
            (ENDPOINT_CONNECT_FAILURES_TOTAL, ",reason=\"timeout\"", "0"),
            (ENDPOINT_BYTES_TOTAL, ",direction=\"to_client\"", "9"),
            (ENDPOINT_BYTES_TOTAL, ",direction=\"to_backend\"", "0"),
            (ENDPOINT_HEALTHY, "", "0"),
            (
                ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
                "",
                "1700000000.0",
            ),
        ];
        for (name, extra, want) in checks {
            assert_eq!(
                endpoint_sample(&text, name, extra).as_deref(),
                Some(want),
                "{name}{extra} in\n{text}"
            );
        }
        assert_eq!(text.matches("endpoint=\"10.0.0.1:8080\"").count(), 12);
        // A second failure is no health change; a success is.
        h.connect_failed(ConnectFailure::Timeout, SystemTime::now());
        let text = m.encode();
        assert_eq!(
            endpoint_sample(&text, ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS, "").as_deref(),
            Some("1700000000.0")
        );
        h.connect_succeeded();
        assert_eq!(h.healthy(), 1);

        drop(a);
        assert_eq!(m.endpoints.live(), 1, "b still holds them");
        assert!(m.encode().contains("endpoint=\"10.0.0.1:8080\""));
        drop(b);
        assert_eq!(m.endpoints.live(), 0);
        assert!(!m.encode().contains("endpoint="), "{}", m.encode());
        // A handle kept by a connection still counts, unexported.
        h.traffic.connections_total.inc();
        assert!(!m.encode().contains("endpoint="));

        // Back again: new handles, healthy, counting from zero, and no
        // series until the endpoint is used (a connection here).
        let c = m.endpoints(&port, &[ep]);
        assert!(!Arc::ptr_eq(&c.metrics()[0], &h));
        assert!(!m.encode().contains("endpoint="), "{}", m.encode());
        c.metrics()[0].traffic.connections_total.inc();
        let text = m.encode();
        assert_eq!(
            endpoint_sample(&text, ENDPOINT_CONNECTIONS_TOTAL, "").as_deref(),
            Some("1")
        );
        assert_eq!(
            endpoint_sample(&text, ENDPOINT_HEALTHY, "").as_deref(),
            Some("1")
        );
        assert_eq!(text.matches("endpoint=\"10.0.0.1:8080\"").count(), 12);
        // Another port's endpoint of the same address is its own series.
        let other = m.endpoints(&labels("https", "TCP"), &[ep]);
        assert!(!Arc::ptr_eq(&c.metrics()[0], &other.metrics()[0]));
    }

    #[test]
    fn port_series_start_when_it_is_used() {
        let m = Metrics::new();
        let ports = ["a", "b", "c", "d"].map(|p| m.port(&labels(p, "UDP")));
        let exported = |text: &str| -> Vec<&str> {
            ["a", "b", "c", "d"]
                .into_iter()
                .filter(|p| text.contains(&format!("port=\"{p}\"")))
                .collect()
        };
        assert_eq!(exported(&m.encode()), Vec::<&str>::new(), "none used yet");
        ports[0].connections_total.inc();
        ports[1].connect_failure(ConnectFailure::NoEndpoints);
        ports[2].udp_flows_active.inc();
        let text = m.encode();
        assert_eq!(exported(&text), vec!["a", "b", "c"], "{text}");
        // Every family of a used port: active, total, bytes ×2, failures
        // by reason, UDP flows.
        let lines = text.matches("port=\"a\"").count();
        assert_eq!(lines, 5 + ConnectFailure::ALL.len(), "{text}");
    }

    #[test]
    fn endpoint_series_start_when_it_is_used() {
        let m = Metrics::new();
        let port = labels("http", "TCP");
        let eps: Vec<SocketAddr> = (1..=4)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect();
        let lease = m.endpoints(&port, &eps);
        let exported = |text: &str| -> Vec<usize> {
            (1..=4)
                .filter(|i| text.contains(&format!("endpoint=\"10.0.0.{i}:80\"")))
                .collect()
        };
        assert_eq!(exported(&m.encode()), Vec::<usize>::new(), "none used yet");
        let [a, b, c, _] = lease.metrics() else {
            panic!("four handles")
        };
        a.traffic.connections_total.inc();
        b.connect_failed(ConnectFailure::Timeout, SystemTime::now());
        c.set_check(Some(true), SystemTime::now());
        let text = m.encode();
        assert_eq!(exported(&text), vec![1, 2, 3], "{text}");
        for i in 1..=3 {
            let n = text.matches(&format!("endpoint=\"10.0.0.{i}:80\"")).count();
            // The third has an active check: one series more.
            assert_eq!(n, if i == 3 { 13 } else { 12 }, "{text}");
        }
    }

    #[test]
    fn frontend_traffic_is_kept_across_calls() {
        let m = Metrics::new();
        // UDP: no admitted-connections gauge, which would export the address.
        let fe = |a: &str| m.frontend(a.parse().unwrap(), "UDP").traffic;
        fe("192.0.2.1:30080").connections_total.inc();
        fe("192.0.2.1:30080").connections_total.inc();
        assert_eq!(fe("192.0.2.1:30080").connections_total.get(), 2);
        assert_eq!(fe("192.0.2.2:30080").connections_total.get(), 0);
        // Not exported: status rows only.
        assert!(!m.encode().contains("192.0.2.1:30080"));
    }

    #[test]
    fn from_io_mapping() {
        use std::io::{Error, ErrorKind};
        let raw = |c| ConnectFailure::from_io(&Error::from_raw_os_error(c));
        assert_eq!(raw(libc::ECONNREFUSED), ConnectFailure::Refused);
        assert_eq!(raw(libc::ETIMEDOUT), ConnectFailure::Timeout);
        assert_eq!(raw(libc::EHOSTUNREACH), ConnectFailure::Unreachable);
        assert_eq!(raw(libc::ENETUNREACH), ConnectFailure::Unreachable);
        assert_eq!(raw(libc::EACCES), ConnectFailure::Other);
        assert_eq!(raw(libc::ECONNRESET), ConnectFailure::Other);
        let kind = |k| ConnectFailure::from_io(&Error::from(k));
        assert_eq!(kind(ErrorKind::TimedOut), ConnectFailure::Timeout);
        assert_eq!(kind(ErrorKind::ConnectionRefused), ConnectFailure::Refused);
        assert_eq!(
            kind(ErrorKind::HostUnreachable),
            ConnectFailure::Unreachable
        );
        assert_eq!(kind(ErrorKind::Other), ConnectFailure::Other);
        assert_eq!(
            ConnectFailure::from_io(&Error::new(ErrorKind::TimedOut, "connect timeout")),
            ConnectFailure::Timeout
        );
    }

    #[test]
    fn failure_index_matches_all() {
        for (i, r) in ConnectFailure::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let names: std::collections::HashSet<_> =
            ConnectFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), ConnectFailure::COUNT);
    }
}
