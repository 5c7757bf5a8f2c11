//! Per-endpoint series of a Service port, and their lifetime.
//!
//! Each endpoint of a Service port (an `IP:port` listed by its
//! EndpointSlices, ready or not) has 12 series: connections total and active,
//! connect failures by each of the 6 reasons, bytes each way, healthy and the
//! time of its last health change. They are exported once the endpoint is
//! used: from its first connection, UDP flow or failed connect (or at once
//! when its Service has an active health check), as Prometheus's client
//! libraries create a labelled series at its first count. An endpoint never
//! tried has nothing to report, and at 100,000 Services × 10 a scrape of
//! every listed endpoint was 12 million lines (1.9 GB of text, for a node
//! that sent traffic to a handful). The bound is 12 × (endpoints of the
//! Service port used while listed) per Service port, and an endpoint's
//! series exist only while the endpoint is listed for that port.
//!
//! The compile takes one [`EndpointsLease`] on the endpoints of every
//! Service port it compiles (one lock and one hash of the port's labels per
//! port, then one hash of an address per endpoint) and keeps it with the
//! compiled Service (in the compile cache). Leases are counted per endpoint:
//! the first creates the endpoint's handles, the last one dropped removes
//! them from the set that is exported. That happens
//! when a recompile of the Service no longer lists the endpoint, or when the
//! Service goes; the compile drops the old leases only after taking the new
//! ones, so an endpoint that stays keeps its counts. The set is encoded at
//! each scrape (a `Collector`), so a removed endpoint has no series on the
//! next scrape, and an endpoint costs its atomics and its address (the
//! labels are its port's, held once, and the address is formatted at each
//! scrape), not a label set per series. An endpoint's handles are plain
//! atomics in one allocation (with its address), read at scrape: at a
//! million endpoints, a million allocations of ~140 bytes rather than
//! fourteen million. A port's endpoints with series are a sorted list of
//! those handles, each counting its leases itself, under the port's labels
//! shared with the lease and the port's own series (one copy per port): a
//! map per port of address to count and handle was ~80 bytes per endpoint
//! and each lease kept its own copy of the labels. The data path holds `Arc<EndpointMetrics>`
//! only (never a lease): a connection still open on an endpoint that left
//! goes on counting into handles no longer exported.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{
    counter_family, family, unix_seconds, ConnectFailure, PortLabels, Traffic,
    ENDPOINT_BYTES_TOTAL, ENDPOINT_CHECK_UP, ENDPOINT_CONNECTIONS_ACTIVE,
    ENDPOINT_CONNECTIONS_TOTAL, ENDPOINT_CONNECT_FAILURES_TOTAL, ENDPOINT_HEALTHY,
    ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
};

/// The labels of one endpoint of one Service port, borrowed for one scrape,
/// plus at most one more (`direction`, `reason`). The endpoint's `IP:port`
/// is formatted once per scrape, not kept per endpoint.
struct Labels<'a> {
    port: &'a PortLabels,
    endpoint: &'a str,
    extra: Option<(&'static str, &'static str)>,
}

impl<'a> Labels<'a> {
    fn of(ep: &Scraped<'a>) -> Labels<'a> {
        Labels {
            port: ep.port,
            endpoint: ep.endpoint,
            extra: None,
        }
    }
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.port.encode(encoder)?;
        [("endpoint", self.endpoint)].encode(encoder)?;
        match self.extra {
            Some(label) => [label].encode(encoder),
            None => Ok(()),
        }
    }
}

/// One endpoint as one scrape sees it.
struct Scraped<'a> {
    port: &'a PortLabels,
    /// Its `IP:port`, in the scrape's one buffer of addresses.
    endpoint: &'a str,
    metrics: &'a EndpointMetrics,
}

/// Handles of one endpoint of one Service port, resolved at compile;
/// every update on the data path is one atomic operation.
#[derive(Debug)]
pub struct EndpointMetrics {
    /// The endpoint (`IP:port`): its key among its port's endpoints.
    addr: Addr,
    /// Connections (and UDP flows), bytes and connect failures.
    pub traffic: Traffic,
    /// 1 usable, 0 not (see [`EndpointMetrics::healthy`]).
    healthy: AtomicI32,
    /// Active health check: 1 up, 0 down, -1 when the Service has none.
    check: AtomicI32,
    /// Unix time of the last health change, in seconds (`f64` bits).
    changed: AtomicU64,
    /// Leases on these series (changed only under the registry's lock):
    /// exported while above zero.
    leases: AtomicU32,
}

impl EndpointMetrics {
    /// Handles of a healthy endpoint `addr` first seen at `now`.
    fn new(addr: SocketAddr, now: SystemTime) -> EndpointMetrics {
        let m = EndpointMetrics {
            addr: Addr::of(addr),
            traffic: Traffic::default(),
            healthy: AtomicI32::new(1),
            check: AtomicI32::new(-1),
            changed: AtomicU64::default(),
            leases: AtomicU32::new(0),
        };
        m.set_changed(now);
        m
    }

    /// Handles of `addr` exported nowhere (endpoints a compile did not lease).
    pub fn detached(addr: SocketAddr) -> Arc<EndpointMetrics> {
        Arc::new(EndpointMetrics::new(addr, SystemTime::now()))
    }

    fn set_changed(&self, now: SystemTime) {
        self.changed.store(unix_seconds(now).to_bits(), Relaxed);
    }

    /// The endpoint (`IP:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    /// Unix time of the last health change (or of the first appearance), in seconds.
    pub fn changed(&self) -> f64 {
        f64::from_bits(self.changed.load(Relaxed))
    }

    /// A connect to the endpoint failed at `now`: unhealthy (passive health
    /// backs it off) until a connect succeeds again.
    pub fn connect_failed(&self, reason: ConnectFailure, now: SystemTime) {
        self.traffic.connect_failure(reason);
        if self.healthy.load(Relaxed) != 0 {
            self.healthy.store(0, Relaxed);
            self.set_changed(now);
        }
    }

    /// A connect to the endpoint succeeded: healthy again if it was not.
    /// One atomic load when nothing changes.
    #[inline]
    pub fn connect_succeeded(&self) {
        if self.healthy.load(Relaxed) == 0 && self.check.load(Relaxed) != 0 {
            self.healthy.store(1, Relaxed);
            self.set_changed(SystemTime::now());
        }
    }

    /// 1 when usable, 0 after a failed connect (until one succeeds) or
    /// while the active health check finds it down.
    pub fn healthy(&self) -> i64 {
        i64::from(self.healthy.load(Relaxed))
    }

    /// The active health check's verdict (`None`: the Service has none),
    /// set at compile; healthy follows it.
    pub fn set_check(&self, up: Option<bool>, now: SystemTime) {
        let v = match up {
            None => -1,
            Some(true) => 1,
            Some(false) => 0,
        };
        if self.check.load(Relaxed) == v {
            return;
        }
        self.check.store(v, Relaxed);
        let healthy = i32::from(up != Some(false));
        if self.healthy.load(Relaxed) != healthy {
            self.healthy.store(healthy, Relaxed);
            self.set_changed(now);
        }
    }

    /// The active health check's verdict: 1 up, 0 down, -1 none.
    pub fn check(&self) -> i64 {
        i64::from(self.check.load(Relaxed))
    }

    /// Whether the endpoint has anything to say: a connection or UDP flow,
    /// a failed connect, an active health check, or a health change. Only
    /// those are exported (see the module's doc).
    fn used(&self) -> bool {
        self.traffic.connections_total.get() > 0
            || self.check.load(Relaxed) >= 0
            || self.healthy.load(Relaxed) == 0
            || ConnectFailure::ALL
                .iter()
                .any(|r| self.traffic.connect_failures(*r) > 0)
    }
}

/// An endpoint's `IP:port` in 19 bytes rather than a `SocketAddr`'s 32
/// (a million of them at 100,000 Services): the endpoints of slices have
/// no IPv6 flow label or scope.
#[derive(Debug, Clone, Copy)]
struct Addr {
    ip: [u8; 16],
    port: u16,
    v6: bool,
}

impl Addr {
    fn of(a: SocketAddr) -> Addr {
        match a.ip() {
            IpAddr::V4(ip) => Addr {
                ip: ip.to_ipv6_mapped().octets(),
                port: a.port(),
                v6: false,
            },
            IpAddr::V6(ip) => Addr {
                ip: ip.octets(),
                port: a.port(),
                v6: true,
            },
        }
    }

    fn get(&self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.ip);
        let ip = match (self.v6, v6.to_ipv4_mapped()) {
            (false, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, self.port)
    }
}

/// The endpoints of one Service port with series now, sorted by address
/// (each counts its own leases).
type PortLive = Vec<Arc<EndpointMetrics>>;

/// Every Service port with an endpoint that has series now. Keyed by port
/// first, so a lease on a port's endpoints hashes the port's labels once,
/// then searches addresses.
type Live = HashMap<Arc<PortLabels>, PortLive>;

/// The endpoints with series now, with the number of leases on each.
#[derive(Debug, Default)]
pub(super) struct Endpoints {
    live: Mutex<Live>,
}

impl Endpoints {
    fn lock(&self) -> MutexGuard<'_, Live> {
        // Plain data, left consistent at every step: a panic elsewhere does
        // not make it unusable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a lease on the series of each of `endpoints` of `port` (one
    /// lock, one hash of the port's labels, then a search per endpoint),
    /// creating those no lease holds (healthy, counters at zero, last
    /// change `now`). The lease keeps `port`, or the labels already held
    /// for it: one copy per port.
    pub(super) fn lease(
        self: &Arc<Self>,
        port: &Arc<PortLabels>,
        endpoints: &[SocketAddr],
        now: SystemTime,
    ) -> EndpointsLease {
        let mut live = self.lock();
        let key = match live.get_key_value(&**port) {
            Some((k, _)) => k.clone(),
            None => port.clone(),
        };
        let held = live.entry(key.clone()).or_default();
        let find = |held: &PortLive, ep: &SocketAddr| held.binary_search_by(|m| m.addr().cmp(ep));
        // Those not held yet join the sorted list first, once each.
        let mut missing: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|ep| find(held, ep).is_err())
            .copied()
            .collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            held.extend(
                missing
                    .iter()
                    .map(|ep| Arc::new(EndpointMetrics::new(*ep, now))),
            );
            held.sort_unstable_by_key(|m| m.addr());
            held.shrink_to_fit();
        }
        let metrics = endpoints
            .iter()
            .filter_map(|ep| {
                let m = held.get(find(held, ep).ok()?)?;
                m.leases.fetch_add(1, Relaxed);
                Some(m.clone())
            })
            .collect();
        drop(live);
        EndpointsLease {
            endpoints: self.clone(),
            port: key,
            metrics,
        }
    }

    fn release(&self, port: &PortLabels, endpoints: &[Arc<EndpointMetrics>]) {
        let mut live = self.lock();
        let Some(held) = live.get_mut(port) else {
            return;
        };
        let mut gone = false;
        for m in endpoints {
            gone |= m.leases.fetch_sub(1, Relaxed) == 1;
        }
        if gone {
            held.retain(|m| m.leases.load(Relaxed) > 0);
        }
        if held.is_empty() {
            live.remove(port);
        }
    }

    /// (port, endpoint) pairs with series now.
    #[cfg(test)]
    pub(super) fn live(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

impl Collector for Endpoints {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.lock();
        // Chosen once: the data path may make an endpoint used meanwhile.
        let used: Vec<(&PortLabels, &EndpointMetrics)> = live
            .iter()
            .flat_map(|(port, held)| held.iter().map(move |m| (&**port, &**m)))
            .filter(|(_, m)| m.used())
            .collect();
        // Every address formatted into one buffer, not a `String` each: at a
        // million endpoints a scrape made a million small allocations, and
        // the heap kept their pages after.
        let mut text = String::new();
        let mut ends = Vec::new();
        for (_, m) in &used {
            write!(text, "{}", m.addr())?;
            ends.push(text.len());
        }
        let mut start = 0;
        let scraped: Vec<Scraped<'_>> = used
            .into_iter()
            .zip(ends)
            .map(|((port, metrics), end)| {
                let endpoint = text.get(start..end).unwrap_or_default();
                start = end;
                Scraped {
                    port,
                    endpoint,
                    metrics,
                }
            })
            .collect();
        let all = || scraped.iter().map(|ep| (ep, ep.metrics));
        let e = &mut encoder;
        family(
            e,
            counter_family(ENDPOINT_CONNECTIONS_TOTAL),
            "Connections (and UDP flows) relayed to an endpoint, per Service port",
            MetricType::Counter,
            all().map(|(ep, m)| {
                let v = m.traffic.connections_total.get();
                (Labels::of(ep), ConstCounter::new(v))
            }),
        )?;
        family(
            e,
            ENDPOINT_CONNECTIONS_ACTIVE,
            "Connections (and UDP flows) open to an endpoint, per Service port",
            MetricType::Gauge,
            all().map(|(ep, m)| {
                let v = m.traffic.connections_active.get();
                (Labels::of(ep), ConstGauge::new(v))
            }),
        )?;
        family(
            e,
            counter_family(ENDPOINT_CONNECT_FAILURES_TOTAL),
            "Failed connects to an endpoint, per Service port and reason",
            MetricType::Counter,
            all().flat_map(|(ep, m)| {
                ConnectFailure::ALL.iter().map(move |r| {
                    let labels = Labels {
                        extra: Some(("reason", r.as_str())),
                        ..Labels::of(ep)
                    };
                    (labels, ConstCounter::new(m.traffic.connect_failures(*r)))
                })
            }),
        )?;
        family(
            e,
            counter_family(ENDPOINT_BYTES_TOTAL),
            "Payload bytes relayed with an endpoint, per Service port and direction",
            MetricType::Counter,
            all().flat_map(|(ep, m)| {
                [
                    ("to_backend", &m.traffic.bytes_to_backend),
                    ("to_client", &m.traffic.bytes_to_client),
                ]
                .into_iter()
                .map(move |(direction, c)| {
                    let labels = Labels {
                        extra: Some(("direction", direction)),
                        ..Labels::of(ep)
                    };
                    (labels, ConstCounter::new(c.get()))
                })
            }),
        )?;
        family(
            e,
            ENDPOINT_CHECK_UP,
            "1 when the active health check (ringvip.io/health-check) finds the endpoint up, 0 when down; only for Services with one",
            MetricType::Gauge,
            all()
                .filter(|(_, m)| m.check() >= 0)
                .map(|(ep, m)| (Labels::of(ep), ConstGauge::new(m.check()))),
        )?;
        family(
            e,
            ENDPOINT_HEALTHY,
            "1 when the endpoint is usable, 0 after a failed connect (passive health) until one succeeds, or while its active health check finds it down",
            MetricType::Gauge,
            all().map(|(ep, m)| (Labels::of(ep), ConstGauge::new(m.healthy()))),
        )?;
        family(
            e,
            ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
            "Unix time of the endpoint's last health change (or of its first appearance), in seconds",
            MetricType::Gauge,
            all().map(|(ep, m)| (Labels::of(ep), ConstGauge::new(m.changed()))),
        )
    }
}

/// Keeps the series of some endpoints of one Service port exported while
/// it lives (see the module documentation).
#[derive(Debug)]
pub struct EndpointsLease {
    endpoints: Arc<Endpoints>,
    port: Arc<PortLabels>,
    /// The endpoints' handles, each with its address.
    metrics: Arc<[Arc<EndpointMetrics>]>,
}

impl EndpointsLease {
    /// The handles of each endpoint, in the order they were leased.
    pub fn metrics(&self) -> &[Arc<EndpointMetrics>] {
        &self.metrics
    }

    /// The same handles, to share (a frontend whose usable endpoints are
    /// all the leased ones keeps this list rather than a copy).
    pub fn shared(&self) -> &Arc<[Arc<EndpointMetrics>]> {
        &self.metrics
    }
}

impl Drop for EndpointsLease {
    fn drop(&mut self) {
        self.endpoints.release(&self.port, &self.metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million of these at 100,000 Services × 10 endpoints: plain
    /// atomics and a compact address, no `SocketAddr`.
    #[test]
    fn endpoint_handles_are_88_bytes() {
        assert!(std::mem::size_of::<EndpointMetrics>() <= 88);
    }

    /// The compact address gives back the address it was made of, IPv4,
    /// IPv6 and an IPv4-mapped IPv6 address alike.
    #[test]
    fn compact_address_round_trips() {
        for a in [
            "10.244.1.7:8080",
            "0.0.0.0:0",
            "[fd00::7]:53",
            "[::ffff:10.0.0.1]:80",
            "[::]:65535",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(Addr::of(a).get(), a);
        }
    }
}
