//! `healthCheckNodePort` servers: one HTTP listener per port of each
//! `externalTrafficPolicy: Local` Service, opened and closed as snapshots
//! change; counts are updated in place, so probes never see a listener move.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, ServiceHealth};
use crate::dataplane::udp::AbortOnDrop;
use crate::handover::{Inherited, Role};
use crate::state::Health;
use crate::state::HealthCheck;

struct Running {
    report: Arc<ServiceHealth>,
    /// Duplicates of its listeners (for the next process of an upgrade).
    sockets: Vec<(SocketAddr, OwnedFd)>,
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
    /// Handed over to the next process: nothing is served or opened.
    released: bool,
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
            released: false,
        }
    }

    /// Duplicates of every listener, for the next process.
    pub fn handover_sockets(&self) -> Vec<(SocketAddr, OwnedFd)> {
        self.running
            .values()
            .flat_map(|r| &r.sockets)
            .filter_map(|(a, fd)| Some((*a, fd.try_clone().ok()?)))
            .collect()
    }

    /// Stops serving (the next process serves the same sockets); nothing is
    /// shut down, and no sync opens anything again.
    pub fn stop_serving(&mut self) {
        for (_, r) in self.running.drain() {
            for t in &r.tasks {
                t.0.abort();
            }
        }
        self.released = true;
    }

    /// Makes the running servers match `checks`, taking the listeners the
    /// previous process handed over in `inherited` where there are.
    pub async fn sync(&mut self, checks: &[HealthCheck], inherited: &Inherited) {
        if self.released {
            return;
        }
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
            let mut sockets = Vec::new();
            let mut error = None;
            for ip in &self.addrs {
                let addr = SocketAddr::new(*ip, c.port);
                match admin::bind_or_take(addr, Role::HealthCheck, inherited).await {
                    Ok(l) => {
                        if let Ok(fd) = admin::dup(&l) {
                            sockets.push((addr, fd));
                        }
                        tasks.push(AbortOnDrop(tokio::spawn(admin::serve_service_health(
                            l,
                            report.clone(),
                            self.health.clone(),
                            self.timeout,
                        ))))
                    }
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
                    self.running.insert(
                        c.port,
                        Running {
                            report,
                            sockets,
                            tasks,
                        },
                    );
                }
            }
        }
    }
}
