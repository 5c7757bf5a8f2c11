//! Per-endpoint series of a Service port, and their lifetime.
//!
//! Each endpoint of a Service port (an `IP:port` listed by its
//! EndpointSlices, ready or not) has 12 series: connections total and active,
//! connect failures by each of the 6 reasons, bytes each way, healthy and the
//! time of its last health change. The bound is therefore 12 × (endpoints of
//! the Service port) per Service port, and an endpoint's series exist only
//! while the endpoint is listed for that port.
//!
//! The compile takes an [`EndpointLease`] for every endpoint of every Service
//! port it compiles and keeps it with the compiled Service (in the compile
//! cache). Leases are counted: the first creates the endpoint's handles, the
//! last one dropped removes them from the set that is exported. That happens
//! when a recompile of the Service no longer lists the endpoint, or when the
//! Service goes; the compile drops the old leases only after taking the new
//! ones, so an endpoint that stays keeps its counts. The set is encoded at
//! each scrape (a `Collector`), so a removed endpoint has no series on the
//! next scrape, and an endpoint costs its atomics and one copy of its labels,
//! not a label set per series. The data path holds `Arc<EndpointMetrics>`
//! only (never a lease): a connection still open on an endpoint that left
//! goes on counting into handles no longer exported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;

use super::{
    counter_family, unix_seconds, ConnectFailure, FloatGauge, Gauge, PortLabels, Traffic,
    ENDPOINT_BYTES_TOTAL, ENDPOINT_CHECK_UP, ENDPOINT_CONNECTIONS_ACTIVE,
    ENDPOINT_CONNECTIONS_TOTAL, ENDPOINT_CONNECT_FAILURES_TOTAL, ENDPOINT_HEALTHY,
    ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
};

/// Labels of one endpoint of one Service port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    #[prometheus(flatten)]
    port: PortLabels,
    /// `IP:port` of the endpoint.
    endpoint: String,
}

/// An endpoint's labels plus at most one more (`direction`, `reason`),
/// borrowed for one scrape.
struct Labels<'a> {
    ep: &'a EndpointLabels,
    extra: Option<(&'static str, &'static str)>,
}

impl<'a> Labels<'a> {
    fn of(ep: &'a EndpointLabels) -> Labels<'a> {
        Labels { ep, extra: None }
    }
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.ep.encode(encoder)?;
        match self.extra {
            Some(label) => [label].encode(encoder),
            None => Ok(()),
        }
    }
}

/// Handles of one endpoint of one Service port, resolved at compile; every
/// update on the data path is one atomic operation.
#[derive(Debug, Default)]
pub struct EndpointMetrics {
    /// Connections (and UDP flows), bytes and connect failures.
    pub traffic: Traffic,
    healthy: Gauge,
    changed: FloatGauge,
    /// Active health check: 1 up, 0 down, -1 when the Service has none.
    check: Gauge,
}

impl EndpointMetrics {
    /// Handles of a healthy endpoint first seen at `now`.
    fn new(now: SystemTime) -> EndpointMetrics {
        let m = EndpointMetrics::default();
        m.healthy.set(1);
        m.check.set(-1);
        m.changed.set(unix_seconds(now));
        m
    }

    /// Handles exported nowhere (endpoints a compile did not lease).
    pub fn detached() -> Arc<EndpointMetrics> {
        Arc::new(EndpointMetrics::new(SystemTime::now()))
    }

    /// A connect to the endpoint failed at `now`: unhealthy (passive health
    /// backs it off) until a connect succeeds again.
    pub fn connect_failed(&self, reason: ConnectFailure, now: SystemTime) {
        self.traffic.connect_failure(reason);
        if self.healthy.get() != 0 {
            self.healthy.set(0);
            self.changed.set(unix_seconds(now));
        }
    }

    /// A connect to the endpoint succeeded: healthy again if it was not.
    /// One atomic load when nothing changes.
    #[inline]
    pub fn connect_succeeded(&self) {
        if self.healthy.get() == 0 && self.check.get() != 0 {
            self.healthy.set(1);
            self.changed.set(unix_seconds(SystemTime::now()));
        }
    }

    /// 1 when usable, 0 after a failed connect (until one succeeds) or
    /// while the active health check finds it down.
    pub fn healthy(&self) -> i64 {
        self.healthy.get()
    }

    /// The active health check's verdict (`None`: the Service has none),
    /// set at compile; healthy follows it.
    pub fn set_check(&self, up: Option<bool>, now: SystemTime) {
        let v = match up {
            None => -1,
            Some(true) => 1,
            Some(false) => 0,
        };
        if self.check.get() == v {
            return;
        }
        self.check.set(v);
        let healthy = i64::from(up != Some(false));
        if self.healthy.get() != healthy {
            self.healthy.set(healthy);
            self.changed.set(unix_seconds(now));
        }
    }

    /// The active health check's verdict: 1 up, 0 down, -1 none.
    pub fn check(&self) -> i64 {
        self.check.get()
    }
}

type Live = HashMap<EndpointLabels, (usize, Arc<EndpointMetrics>)>;

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

    /// Takes a lease on the series of `endpoint` of `port`, creating them
    /// (healthy, counters at zero, last change `now`) if no lease holds them.
    pub(super) fn lease(
        self: &Arc<Self>,
        port: &PortLabels,
        endpoint: SocketAddr,
        now: SystemTime,
    ) -> EndpointLease {
        let key = EndpointLabels {
            port: port.clone(),
            endpoint: endpoint.to_string(),
        };
        let mut live = self.lock();
        let metrics = match live.get_mut(&key) {
            Some((n, m)) => {
                *n += 1;
                m.clone()
            }
            None => {
                let m = Arc::new(EndpointMetrics::new(now));
                live.insert(key.clone(), (1, m.clone()));
                m
            }
        };
        EndpointLease {
            endpoints: self.clone(),
            key,
            metrics,
        }
    }

    fn release(&self, key: &EndpointLabels) {
        let mut live = self.lock();
        if let Some((n, _)) = live.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                live.remove(key);
            }
        }
    }

    /// (port, endpoint) pairs with series now.
    #[cfg(test)]
    pub(super) fn live(&self) -> usize {
        self.lock().len()
    }
}

/// One family: its descriptor, then one sample per item of `series`.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl Iterator<Item = (Labels<'a>, &'a dyn EncodeMetric)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in series {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Endpoints {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.lock();
        let all = || live.iter().map(|(ep, (_, m))| (ep, m.as_ref()));
        let e = &mut encoder;
        family(
            e,
            counter_family(ENDPOINT_CONNECTIONS_TOTAL),
            "Connections (and UDP flows) relayed to an endpoint, per Service port",
            MetricType::Counter,
            all().map(|(ep, m)| {
                (
                    Labels::of(ep),
                    &m.traffic.connections_total as &dyn EncodeMetric,
                )
            }),
        )?;
        family(
            e,
            ENDPOINT_CONNECTIONS_ACTIVE,
            "Connections (and UDP flows) open to an endpoint, per Service port",
            MetricType::Gauge,
            all().map(|(ep, m)| {
                (
                    Labels::of(ep),
                    &m.traffic.connections_active as &dyn EncodeMetric,
                )
            }),
        )?;
        family(
            e,
            counter_family(ENDPOINT_CONNECT_FAILURES_TOTAL),
            "Failed connects to an endpoint, per Service port and reason",
            MetricType::Counter,
            all().flat_map(|(ep, m)| {
                ConnectFailure::ALL.iter().filter_map(move |r| {
                    let c = m.traffic.failures.get(r.index())?;
                    let labels = Labels {
                        ep,
                        extra: Some(("reason", r.as_str())),
                    };
                    Some((labels, c as &dyn EncodeMetric))
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
                        ep,
                        extra: Some(("direction", direction)),
                    };
                    (labels, c as &dyn EncodeMetric)
                })
            }),
        )?;
        family(
            e,
            ENDPOINT_CHECK_UP,
            "1 when the active health check (ringvip.io/health-check) finds the endpoint up, 0 when down; only for Services with one",
            MetricType::Gauge,
            all()
                .filter(|(_, m)| m.check.get() >= 0)
                .map(|(ep, m)| (Labels::of(ep), &m.check as &dyn EncodeMetric)),
        )?;
        family(
            e,
            ENDPOINT_HEALTHY,
            "1 when the endpoint is usable, 0 after a failed connect (passive health) until one succeeds, or while its active health check finds it down",
            MetricType::Gauge,
            all().map(|(ep, m)| (Labels::of(ep), &m.healthy as &dyn EncodeMetric)),
        )?;
        family(
            e,
            ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
            "Unix time of the endpoint's last health change (or of its first appearance), in seconds",
            MetricType::Gauge,
            all().map(|(ep, m)| (Labels::of(ep), &m.changed as &dyn EncodeMetric)),
        )
    }
}

/// Keeps the series of one endpoint of one Service port exported while it
/// lives (see the module documentation).
#[derive(Debug)]
pub struct EndpointLease {
    endpoints: Arc<Endpoints>,
    key: EndpointLabels,
    metrics: Arc<EndpointMetrics>,
}

impl EndpointLease {
    /// The handles, for the data path.
    pub fn metrics(&self) -> &Arc<EndpointMetrics> {
        &self.metrics
    }
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        self.endpoints.release(&self.key);
    }
}
