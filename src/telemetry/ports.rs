//! Per-Service-port series: every Service port compiled since the process
//! started keeps one [`PortMetrics`] (plain atomics in one allocation,
//! kept across compiles, so counters accumulate), encoded at each scrape
//! from its labels held once. Eleven label sets and eleven separately
//! allocated atomics per port, as registry families hold them, were 2 KiB
//! and more per Service at 100,000 Services.
//!
//! A port's series are exported from its first connection, flow or failed
//! connect, as a Prometheus client library creates a labelled series at its
//! first count (and as the per-endpoint series are): at 100,000 Services
//! the ports nobody used were a 120 MB scrape, all zeros.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{
    counter_family, family, ConnectFailure, PortLabels, PortMetrics, BYTES_TOTAL,
    CONNECTIONS_ACTIVE, CONNECTIONS_TOTAL, CONNECT_FAILURES_TOTAL, UDP_FLOWS_ACTIVE,
};

/// A port's labels, borrowed for one scrape, plus at most one more
/// (`direction`, `reason`).
struct Labels<'a> {
    port: &'a PortLabels,
    extra: Option<(&'static str, &'static str)>,
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.port.encode(encoder)?;
        match self.extra {
            Some(label) => [label].encode(encoder),
            None => Ok(()),
        }
    }
}

fn labels(port: &PortLabels) -> Labels<'_> {
    Labels { port, extra: None }
}

/// The handles of every Service port seen, by labels.
#[derive(Debug, Default)]
pub(super) struct Ports {
    ports: Mutex<HashMap<Arc<PortLabels>, Arc<PortMetrics>>>,
}

impl Ports {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<PortLabels>, Arc<PortMetrics>>> {
        // Plain data, consistent at every step.
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handles of the port `labels`, created (at zero) the first time.
    pub(super) fn get(&self, labels: &PortLabels) -> Arc<PortMetrics> {
        self.shared(labels).1
    }

    /// The labels of the port as held here (the copy other per-port
    /// records can share) and its handles, created the first time.
    pub(super) fn shared(&self, labels: &PortLabels) -> (Arc<PortLabels>, Arc<PortMetrics>) {
        let mut ports = self.lock();
        if let Some((l, m)) = ports.get_key_value(labels) {
            return (l.clone(), m.clone());
        }
        let l = Arc::new(labels.clone());
        let m = Arc::new(PortMetrics::detached());
        ports.insert(l.clone(), m.clone());
        (l, m)
    }
}

/// Whether the port has anything to say: a connection or flow (open or
/// done), bytes, or a failed connect.
fn used(m: &PortMetrics) -> bool {
    m.connections_total.get() > 0
        || m.connections_active.get() != 0
        || m.udp_flows_active.get() != 0
        || m.bytes_to_backend.get() > 0
        || m.bytes_to_client.get() > 0
        || ConnectFailure::ALL
            .iter()
            .any(|r| m.connect_failures(*r) > 0)
}

impl Collector for Ports {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ports = self.lock();
        // Chosen once, so each used port is in every family of the scrape.
        let used: Vec<(&PortLabels, &PortMetrics)> = ports
            .iter()
            .map(|(l, m)| (&**l, &**m))
            .filter(|(_, m)| used(m))
            .collect();
        let all = || used.iter().copied();
        let e = &mut encoder;
        family(
            e,
            CONNECTIONS_ACTIVE,
            "Connections currently open, per Service port",
            MetricType::Gauge,
            all().map(|(l, m)| (labels(l), ConstGauge::new(m.connections_active.get()))),
        )?;
        family(
            e,
            counter_family(CONNECTIONS_TOTAL),
            "Connections accepted, per Service port",
            MetricType::Counter,
            all().map(|(l, m)| (labels(l), ConstCounter::new(m.connections_total.get()))),
        )?;
        family(
            e,
            counter_family(BYTES_TOTAL),
            "Payload bytes relayed, per Service port and direction",
            MetricType::Counter,
            all().flat_map(|(l, m)| {
                [
                    ("to_backend", &m.bytes_to_backend),
                    ("to_client", &m.bytes_to_client),
                ]
                .into_iter()
                .map(move |(direction, c)| {
                    let labels = Labels {
                        port: l,
                        extra: Some(("direction", direction)),
                    };
                    (labels, ConstCounter::new(c.get()))
                })
            }),
        )?;
        family(
            e,
            counter_family(CONNECT_FAILURES_TOTAL),
            "Flows that could not be connected to a backend, per Service port and reason",
            MetricType::Counter,
            all().flat_map(|(l, m)| {
                ConnectFailure::ALL.iter().map(move |r| {
                    let labels = Labels {
                        port: l,
                        extra: Some(("reason", r.as_str())),
                    };
                    (labels, ConstCounter::new(m.connect_failures(*r)))
                })
            }),
        )?;
        family(
            e,
            UDP_FLOWS_ACTIVE,
            "UDP flows currently in the flow table, per Service port",
            MetricType::Gauge,
            all()
                .filter(|(l, _)| l.protocol.eq_ignore_ascii_case("UDP"))
                .map(|(l, m)| (labels(l), ConstGauge::new(m.udp_flows_active.get()))),
        )
    }
}
