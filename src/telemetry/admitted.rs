//! The admitted-connections gauge of each TCP frontend
//! ([`FRONTEND_CONNECTIONS_ACTIVE`]), exported from the first scrape that
//! finds it above zero, then at every scrape: at 100,000 Services a line
//! per frontend, nearly all of them zero, was 8 MB of each scrape. The data
//! path only moves the gauge; the choice is made at scrape.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;

use super::{family, FrontendLabels, FRONTEND_CONNECTIONS_ACTIVE};

/// One frontend's gauge, and whether a scrape has shown it.
#[derive(Debug, Default)]
struct Admitted {
    gauge: Gauge,
    shown: AtomicBool,
}

/// Every TCP frontend's gauge, by labels (kept across snapshots).
#[derive(Debug, Default)]
pub(super) struct Frontends {
    gauges: Mutex<HashMap<FrontendLabels, Admitted>>,
}

impl Frontends {
    fn lock(&self) -> MutexGuard<'_, HashMap<FrontendLabels, Admitted>> {
        // Plain data, consistent at every step.
        self.gauges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gauge of the frontend `labels` (the same atomic every time).
    pub(super) fn gauge(&self, labels: &FrontendLabels) -> Gauge {
        let mut gauges = self.lock();
        if let Some(a) = gauges.get(labels) {
            return a.gauge.clone();
        }
        let a = Admitted::default();
        let g = a.gauge.clone();
        gauges.insert(labels.clone(), a);
        g
    }
}

impl Collector for Frontends {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = self.lock();
        family(
            &mut encoder,
            FRONTEND_CONNECTIONS_ACTIVE,
            "TCP connections admitted (connecting or relaying), per frontend",
            MetricType::Gauge,
            gauges.iter().filter_map(|(labels, a)| {
                let v = a.gauge.get();
                if v != 0 {
                    a.shown.store(true, Relaxed);
                }
                a.shown
                    .load(Relaxed)
                    .then(|| (labels.clone(), ConstGauge::new(v)))
            }),
        )
    }
}
