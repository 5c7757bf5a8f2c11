//! Reading ringvip's Prometheus metrics.

use std::str::FromStr;

use super::{admin_get, Ringvip};

/// The value of the first sample line of `metrics` that starts with `name`
/// and contains every one of `labels` (each a whole `key="value"` pair).
pub fn metric<T: FromStr>(metrics: &str, name: &str, labels: &[&str]) -> Option<T> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The value of `ringvip_connect_failures_total` for a Service and reason.
pub fn connect_failures(metrics: &str, service: &str, reason: &str) -> Option<u64> {
    let svc = format!("service=\"{service}\"");
    let why = format!("reason=\"{reason}\"");
    metric(metrics, "ringvip_connect_failures_total", &[&svc, &why])
}

/// `ringvip_bytes_total` of a Service in one direction (`to_backend` or `to_client`).
pub fn bytes_relayed(metrics: &str, service: &str, direction: &str) -> Option<u64> {
    let svc = format!("service=\"{service}\"");
    let dir = format!("direction=\"{direction}\"");
    metric(metrics, "ringvip_bytes_total", &[&svc, &dir])
}

impl Ringvip {
    /// Its `/metrics` page.
    pub fn metrics_text(&self) -> String {
        admin_get(self.metrics, "/metrics")
    }

    /// One value of its metrics (see [`metric`]).
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric(&self.metrics_text(), name, labels)
    }
}
