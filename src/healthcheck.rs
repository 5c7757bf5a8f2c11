//! `healthCheckNodePort` servers: one HTTP listener per port of each
//! `externalTrafficPolicy: Local` Service, opened and closed as snapshots
//! change; counts are updated in place, so probes never see a listener move.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, ServiceHealth};
use crate::dataplane::udp::AbortOnDrop;
use crate::state::Health;
use crate::state::HealthCheck;

struct Running {
    report: Arc<ServiceHealth>,
    /// Aborted when dropped too (a failed bind, shutdown).
    tasks: Vec<AbortOnDrop>,
}

impl Running {
    /// Stops the servers and waits until their listeners are closed, so a
    /// probe right after the sync is refused, not accepted and left unanswered.
    async fn close(self) {
        for t in &self.tasks {
            t.0.abort();
        }
        for mut t in self.tasks {
            let _ = (&mut t.0).await;
        }
    }
}

/// The running healthCheckNodePort servers.
pub struct HealthCheckServers {
    addrs: Vec<IpAddr>,
    health: Arc<Health>,
    timeout: Duration,
    running: HashMap<u16, Running>,
    failed: HashMap<u16, String>,
}

impl HealthCheckServers {
    /// Servers bound on `addrs` (the NodePort addresses; all addresses when
    /// empty), reporting the proxy's health from `health`.
    pub fn new(addrs: Vec<IpAddr>, health: Arc<Health>, timeout: Duration) -> Self {
        let addrs = if addrs.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            addrs
        };
        Self {
            addrs,
            health,
            timeout,
            running: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// Makes the running servers match `checks`.
    pub async fn sync(&mut self, checks: &[HealthCheck]) {
        let gone: Vec<u16> = self
            .running
            .iter()
            .filter(|(port, r)| {
                !checks
                    .iter()
                    .any(|c| c.port == **port && c.service == *r.report.service())
            })
            .map(|(port, _)| *port)
            .collect();
        for port in gone {
            if let Some(r) = self.running.remove(&port) {
                r.close().await;
            }
        }
        self.failed
            .retain(|port, _| checks.iter().any(|c| c.port == *port));
        for c in checks {
            if let Some(r) = self.running.get(&c.port) {
                r.report.set(c.local_endpoints);
                continue;
            }
            let report = Arc::new(ServiceHealth::new(c.service.clone(), c.local_endpoints));
            let mut tasks = Vec::new();
            let mut error = None;
            for ip in &self.addrs {
                match admin::bind(SocketAddr::new(*ip, c.port)).await {
                    Ok(l) => tasks.push(AbortOnDrop(tokio::spawn(admin::serve_service_health(
                        l,
                        report.clone(),
                        self.health.clone(),
                        self.timeout,
                    )))),
                    Err(e) => error = Some(format!("healthCheckNodePort of {}: {e}", c.service)),
                }
            }
            match error {
                Some(msg) => {
                    if self.failed.get(&c.port) != Some(&msg) {
                        tracing::warn!("{msg}");
                    }
                    self.failed.insert(c.port, msg);
                }
                None => {
                    self.failed.remove(&c.port);
                    self.running.insert(c.port, Running { report, tasks });
                }
            }
        }
    }
}
