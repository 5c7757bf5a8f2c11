//! ringvip's own checking, on the control runtime (never on a data-plane
//! thread): Pods' readiness probes in file mode, run as the kubelet runs
//! them, and `ringvip.io/health-check` of a Service's endpoints, with
//! HAProxy's rise/fall. Each target is one task; results that change a
//! verdict go to the control loop as [`Update::Checked`], so the store lays
//! them over the objects and the usual compile follows.
//!
//! Spread: a check's first run waits a random part of its interval (the
//! kubelet does so for probes when it has just started), so targets added
//! together are not checked together. Bounded: at most [`MAX_CONCURRENT`]
//! checks are in flight; the others wait for a slot.

mod io;
pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::discovery::{Batch, Checked, Update};
use crate::model::{CheckKind, ObjectKey, ProbeAction};
use crate::state::store::{CheckTarget, ProbeTarget};
use crate::state::Store;
use state::{KubeletThresholds, RiseFall};

/// Checks in flight at once, over every target.
pub const MAX_CONCURRENT: usize = 64;

/// `User-Agent` of HTTP probes and checks.
const USER_AGENT: &str = concat!("kube-probe/ringvip-", env!("CARGO_PKG_VERSION"));

/// The last result of one endpoint's health check, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStatus {
    /// Up (usable) after rise/fall.
    pub up: bool,
    /// `ok`, or why the last check failed; `pending` before the first.
    pub last: String,
    /// When the last check ended.
    pub at: Option<SystemTime>,
}

/// Health check results by Service and endpoint, written by the checks,
/// read by `/api/frontends`. Not on the data path.
#[derive(Debug, Default, Clone)]
pub struct CheckTable(Arc<Mutex<HashMap<(ObjectKey, SocketAddr), CheckStatus>>>);

impl CheckTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<(ObjectKey, SocketAddr), CheckStatus>> {
        // Plain data, consistent at every step.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The check of `endpoint` for `service`, if it has one.
    pub fn get(&self, service: &ObjectKey, endpoint: SocketAddr) -> Option<CheckStatus> {
        self.lock().get(&(service.clone(), endpoint)).cloned()
    }

    fn set(&self, service: &ObjectKey, endpoint: SocketAddr, s: CheckStatus) {
        self.lock().insert((service.clone(), endpoint), s);
    }

    fn remove(&self, service: &ObjectKey, endpoint: SocketAddr) {
        self.lock().remove(&(service.clone(), endpoint));
    }
}

/// The running probes and checks; dropping it stops them all.
pub struct Checks {
    tx: mpsc::WeakSender<Batch>,
    table: CheckTable,
    slots: Arc<Semaphore>,
    started: Instant,
    rng: SmallRng,
    probes: HashMap<(ObjectKey, usize), (ProbeTarget, JoinHandle<()>)>,
    checks: HashMap<(ObjectKey, SocketAddr), (CheckTarget, JoinHandle<()>)>,
}

impl Checks {
    /// Checks sending their results on `tx` and recording them in `table`.
    pub fn new(tx: mpsc::WeakSender<Batch>, table: CheckTable) -> Self {
        Checks {
            tx,
            table,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            started: Instant::now(),
            rng: SmallRng::from_os_rng(),
            probes: HashMap::new(),
            checks: HashMap::new(),
        }
    }

    /// Runs exactly the store's probes and checks now: new ones start,
    /// gone or changed ones stop (a changed one starts afresh, as the
    /// kubelet restarts a worker for a new probe spec). Call on the
    /// control runtime after each compile.
    pub fn sync(&mut self, store: &mut Store) {
        let probes: HashMap<_, _> = store
            .probe_targets()
            .into_iter()
            .map(|t| ((t.pod.clone(), t.container), t))
            .collect();
        self.probes.retain(|k, (t, task)| {
            let keep = probes.get(k) == Some(t);
            if !keep {
                task.abort();
            }
            keep
        });
        for (k, t) in probes {
            if self.probes.contains_key(&k) {
                continue;
            }
            let jitter = self.first_wait(t.probe.period, true);
            let task = tokio::spawn(probe_task(
                t.clone(),
                self.tx.clone(),
                self.slots.clone(),
                jitter,
            ));
            self.probes.insert(k, (t, task));
        }

        let checks: HashMap<_, _> = store
            .check_targets()
            .into_iter()
            .map(|t| ((t.service.clone(), t.endpoint), t))
            .collect();
        let table = &self.table;
        self.checks.retain(|k, (t, task)| {
            let keep = checks.get(k) == Some(t);
            if !keep {
                task.abort();
                table.remove(&k.0, k.1);
            }
            keep
        });
        for (k, t) in checks {
            if self.checks.contains_key(&k) {
                continue;
            }
            let jitter = self.first_wait(t.spec.interval, false);
            self.table.set(
                &t.service,
                t.endpoint,
                CheckStatus {
                    up: true,
                    last: "pending".into(),
                    at: None,
                },
            );
            let task = tokio::spawn(check_task(
                t.clone(),
                self.tx.clone(),
                self.slots.clone(),
                self.table.clone(),
                jitter,
            ));
            self.checks.insert(k, (t, task));
        }
    }

    /// How long a new target waits before its first run: a random part of
    /// its period. For probes only while the prober is younger than one
    /// period (the kubelet's rule: a Pod added later is probed at once).
    fn first_wait(&mut self, period: Duration, kubelet: bool) -> Duration {
        if kubelet && self.started.elapsed() >= period {
            return Duration::ZERO;
        }
        period.mul_f64(self.rng.random::<f64>())
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.probes.values().for_each(|(_, task)| task.abort());
        self.checks.values().for_each(|(_, task)| task.abort());
    }
}

/// Sends one result; false once the control loop is gone. The tasks hold
/// the channel weakly, so they never keep the loop waiting for sources
/// that ended.
async fn send(tx: &mpsc::WeakSender<Batch>, c: Checked) -> bool {
    let Some(tx) = tx.upgrade() else { return false };
    tx.send(Batch::now(vec![Update::Checked(c)])).await.is_ok()
}

/// One readiness probe, as the kubelet's worker: a tick every period, the
/// first at once (after `jitter`); ticks within `initialDelaySeconds` of the
/// Pod's appearance are skipped (whole seconds, as the kubelet compares);
/// thresholds decide what is published. Not ready until then.
async fn probe_task(
    t: ProbeTarget,
    tx: mpsc::WeakSender<Batch>,
    slots: Arc<Semaphore>,
    jitter: Duration,
) {
    let seen = Instant::now();
    tokio::time::sleep(jitter).await;
    let p = &t.probe;
    let mut k = KubeletThresholds::readiness(p.success_threshold, p.failure_threshold);
    let mut tick = tokio::time::interval(p.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if seen.elapsed().as_secs() < p.initial_delay.as_secs() {
            continue;
        }
        let result = {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            probe_once(&t).await
        };
        if let Err(why) = &result {
            tracing::debug!(pod = %t.pod, container = t.container, "readiness probe failed: {why}");
        }
        if let Some(ready) = k.observe(result.is_ok()) {
            tracing::info!(pod = %t.pod, container = t.container, ready, "readiness probe result changed");
            let c = Checked::PodReady {
                pod: t.pod.clone(),
                container: t.container,
                ready,
            };
            if !send(&tx, c).await {
                return;
            }
        }
    }
}

/// The address a probe connects to: its `host` (resolved) or the Pod IP.
async fn probe_addr(host: Option<&str>, t: &ProbeTarget, port: u16) -> Result<SocketAddr, String> {
    match host {
        None => Ok(SocketAddr::new(t.ip, port)),
        Some(h) => tokio::net::lookup_host((h, port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("cannot resolve host {h:?}")),
    }
}

async fn probe_once(t: &ProbeTarget) -> Result<(), String> {
    let timeout = t.probe.timeout;
    match &t.probe.action {
        ProbeAction::Tcp { host, port } => {
            io::tcp(probe_addr(host.as_deref(), t, *port).await?, timeout).await
        }
        ProbeAction::Http {
            host,
            port,
            path,
            headers,
        } => {
            let addr = probe_addr(host.as_deref(), t, *port).await?;
            let host = match host {
                Some(h) => format!("{h}:{port}"),
                None => addr.to_string(),
            };
            let req = io::HttpGet {
                host: &host,
                path,
                headers,
                user_agent: USER_AGENT,
            };
            io::http(addr, req, timeout).await
        }
        ProbeAction::Grpc { port, service } => {
            let addr = SocketAddr::new(t.ip, *port);
            io::grpc(addr, &addr.to_string(), service, timeout).await
        }
    }
}

/// One endpoint's health check, as HAProxy's: every `interval`, up or down
/// by rise/fall from `init-state up`.
async fn check_task(
    t: CheckTarget,
    tx: mpsc::WeakSender<Batch>,
    slots: Arc<Semaphore>,
    table: CheckTable,
    jitter: Duration,
) {
    tokio::time::sleep(jitter).await;
    let spec = &t.spec;
    let mut health = RiseFall::new(spec.rise, spec.fall);
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            match &spec.kind {
                CheckKind::Tcp => io::tcp(t.endpoint, spec.timeout).await,
                CheckKind::Http { path } => {
                    let host = t.endpoint.to_string();
                    let req = io::HttpGet {
                        host: &host,
                        path,
                        headers: &[],
                        user_agent: USER_AGENT,
                    };
                    io::http(t.endpoint, req, spec.timeout).await
                }
            }
        };
        let changed = health.observe(result.is_ok());
        table.set(
            &t.service,
            t.endpoint,
            CheckStatus {
                up: health.up(),
                last: result.clone().err().unwrap_or_else(|| "ok".into()),
                at: Some(SystemTime::now()),
            },
        );
        if let Some(up) = changed {
            tracing::info!(service = %t.service, endpoint = %t.endpoint, up, last = ?result, "health check state changed");
            let c = Checked::Endpoint {
                service: t.service.clone(),
                endpoint: t.endpoint,
                up,
            };
            if !send(&tx, c).await {
                return;
            }
        }
    }
}
