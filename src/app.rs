//! Wires everything together: the control runtime (sources, store, admin), the
//! data-plane threads, signals and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::access_log;
use crate::admin;
use crate::config::{self, Settings};
use crate::dataplane::socket::WorkerCmd;
use crate::dataplane::tun::{self, TunSettings};
use crate::dataplane::{socket, Shared};
use crate::discovery::file::FileSource;
use crate::discovery::kube;
use crate::discovery::Batch;
use crate::dns::server::Dns;
use crate::handover;
use crate::healthcheck::HealthCheckServers;
use crate::probe::{CheckTable, Checks};
use crate::state::{Changes, Health, NodeContext, Snapshot, Store};
use crate::telemetry::{DnsMetrics, Gauge, Metrics};

/// Addresses the admin servers actually bound (ports may have been 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// `/healthz`, `/livez`.
    pub health: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    /// The DNS responder (UDP and TCP), when `--dns-addr` is set.
    pub dns: Option<SocketAddr>,
}

/// Builds this node's context from the settings and the host's addresses.
pub fn node_context(settings: &Settings) -> anyhow::Result<NodeContext> {
    let local = config::local_addresses().context("listing local addresses")?;
    Ok(NodeContext {
        node_name: settings.node.node_name.clone(),
        zone: settings.node.zone.clone(),
        proxy_name: settings.node.proxy_name.clone(),
        nodeport_addresses: settings.node.select_nodeport_addresses(&local),
        local_addresses: local,
        proxy_protocol_from: settings.node.proxy_protocol_from.clone(),
    })
}

/// Called once the admin servers are bound. A trait object, not a type
/// parameter: a generic `run` would be compiled again, with the whole control
/// loop, in every crate that calls it (the binary's build took 37 s of it).
pub type OnReady = Box<dyn FnOnce(Bound) + Send>;

/// Runs ringvip until SIGTERM/SIGINT or until `shutdown` is notified.
/// `on_ready` is called once the admin servers are bound.
pub fn run(settings: Settings, shutdown: Arc<Notify>, on_ready: OnReady) -> anyhow::Result<()> {
    settings.validate()?;
    let ctx = node_context(&settings)?;
    prepare_process();
    // Before anything is bound: the sockets may come from a running ringvip.
    let taking = match settings.admin.handover_path() {
        Some(path) => match handover::take_over(path)? {
            handover::Start::Fresh(why) => {
                tracing::info!("{why}");
                None
            }
            handover::Start::Taking(t) => {
                if let (Some((dev, _)), None) = (&t.tun, settings.tun.device()) {
                    // Dropping `t` ends the conversation: the running
                    // process keeps serving, untouched.
                    anyhow::bail!(
                        "ringvip {} captures ClusterIPs on TUN device {dev}, which this process \
                         (--no-tun) could not take over: it keeps serving; start this one with \
                         its TUN device, or stop that one first",
                        t.from
                    );
                }
                tracing::info!(
                    from = t.from,
                    sockets = t.sockets.len(),
                    affinity = t.affinity.len(),
                    pins = t.pins.len(),
                    tun = ?t.tun.as_ref().map(|(name, _)| name),
                    "handover: taking over"
                );
                Some(t)
            }
        },
        None => None,
    };
    tracing::info!(
        node = %ctx.node_name,
        nodeport_addresses = ?ctx.nodeport_addresses,
        workers = settings.dataplane.workers,
        "starting"
    );
    let (log, log_writer) = match &settings.log.access_log {
        Some(path) => {
            let (log, writer) =
                access_log::open(path, settings.log.log_format, access_log::CAPACITY)
                    .with_context(|| format!("opening the access log {}", path.display()))?;
            (Some(log), Some(writer))
        }
        None => (None, None),
    };
    let upstream = crate::dataplane::accept_proxy::Upstream {
        from: settings.node.proxy_protocol_from.clone().into(),
        ..Default::default()
    };
    let shared = Shared::with_upstream(settings.dataplane, log, upstream);
    let mut taking = taking;
    if let Some(t) = &mut taking {
        inherit(t, &shared, settings.dataplane.udp_idle_timeout);
    }
    let (snap_tx, snap_rx) = watch::channel(shared.snapshot.load_full());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    // A process taking over attaches its queues to the running process's
    // device, by the name it got (link and routes are there already).
    let shared_tun = taking.as_ref().and_then(|t| t.tun.as_ref());
    let tun = match (settings.tun.device(), shared_tun) {
        (Some(_), Some((name, _))) => Some(attach_tun(name, &settings)?),
        (Some(name), None) => Some(open_tun(name, &settings, &rt)?),
        (None, _) => None,
    };
    if let Some((_, inboxes)) = taking.as_mut().and_then(|t| t.tun.as_mut()) {
        let inboxes = std::mem::take(inboxes);
        shared
            .tun_links
            .set_peer(tun::peer::Peer::new(tun::peer::Role::Previous, inboxes));
    }
    // Setup that needed root is done (TUN open, routes set): keep only what
    // runtime needs, before any other thread exists to inherit more.
    crate::privileges::drop_and_log().context("dropping capabilities after setup")?;
    let (mut workers, programmed, commands) =
        socket::spawn_workers(settings.dataplane.workers, shared.clone(), snap_rx.clone())
            .context("starting data-plane threads")?;
    let mut tun_commands = Vec::new();
    let tun_name = tun
        .as_ref()
        .and_then(|q| q.first())
        .map(|q| q.name().to_string());
    if let Some(queues) = tun {
        // Caps are per stack; split them so the device as a whole keeps them.
        let n = queues.len();
        let inboxes = tun::peer::inboxes(n).context("creating the TUN threads' inboxes")?;
        let (rxs, txs): (Vec<_>, Vec<_>) = inboxes.into_iter().map(|b| (b.rx, b.tx)).unzip();
        shared.tun_links.set_siblings(txs);
        let wait_first = taking.is_some();
        let tun_settings = TunSettings {
            mtu: settings.tun.tun_mtu as usize,
            max_connections: settings.tun.tun_max_connections.div_ceil(n),
            max_udp_flows: settings.tun.tun_max_udp_flows.div_ceil(n),
            ..TunSettings::default()
        };
        for (i, (dev, inbox)) in queues.into_iter().zip(rxs).enumerate() {
            let shared = shared.clone();
            let snap_rx = snap_rx.clone();
            let (cmd_tx, cmds) = mpsc::unbounded_channel();
            tun_commands.push(cmd_tx);
            let q = tun::Queue {
                tun: dev,
                thread: i,
                inbox,
                cmds,
                wait_first,
            };
            let t = std::thread::Builder::new()
                .name(format!("ringvip-tun{i}"))
                .spawn(move || {
                    // A current-thread runtime, as the engine threads have:
                    // tokio-uring's flushed its own (empty) ring with a system
                    // call on every park.
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, queue = i, "cannot start a TUN thread's runtime");
                            return;
                        }
                    };
                    let run = tun::run(q, shared, tun_settings, snap_rx);
                    if let Err(e) = tokio::task::LocalSet::new().block_on(&rt, run) {
                        tracing::error!(error = %e, queue = i, "a TUN queue stopped");
                    }
                })
                .context("starting a TUN thread")?;
            workers.push(t);
        }
    }
    let publish = Publisher {
        shared,
        snap_tx,
        programmed,
        commands,
        tun_commands,
        tun_name,
        served: Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::default())),
    };
    let result = rt.block_on(control(settings, ctx, publish, taking, shutdown, on_ready));
    // snap_tx is dropped by now: every worker closes its listeners and returns.
    for w in workers {
        let _ = w.join();
    }
    // The workers' connections have ended (as `drain` when still open), so
    // every access-log record is queued: written out before the exit.
    if let Some(w) = log_writer {
        w.finish();
    }
    result
}

/// Process-wide settings a proxy needs: every connection holds two
/// descriptors, and per-connection buffers should cost memory only as traffic
/// fills them.
fn prepare_process() {
    // Raise the soft descriptor limit to the hard one.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-files limit");
            }
        }
    }
    tracing::info!(open_files = lim.rlim_cur, "descriptor limit");
    // Large buffers (smoltcp socket rings) come straight from
    // mmap as zero pages, so a connection's resident memory grows only with the
    // bytes it actually moves. A fixed threshold keeps glibc from raising it
    // after the first free and serving them from the heap, memset and all.
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Creates the TUN device and routes every service CIDR into it. The device
/// (and with it its routes) disappears when the process exits, however it exits.
fn open_tun(
    name: &str,
    settings: &Settings,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<tun::Tun>> {
    // The device and its routes are made where the thread is: in
    // `settings.tun.netns` when set (left again below, or on error by drop).
    let inside = match &settings.tun.netns {
        Some(ns) => Some(crate::netns::enter(ns).context("creating the TUN device")?),
        None => None,
    };
    let queues = tun::Tun::open_queues(name, settings.tun.tun_queues)
        .context("use --no-tun to run without ClusterIP capture")?;
    let link = tun::LinkConfig {
        name: queues.first().map_or(name, |q| q.name()).to_string(),
        mtu: settings.tun.tun_mtu,
        // The default 500 drops packets under a large window.
        txqueuelen: 10_000,
        routes: settings.limits.service_cidrs.clone(),
    };
    rt.block_on(tun::configure(&link))
        .with_context(|| format!("configuring TUN device {}", link.name))?;
    if let Some(inside) = inside {
        inside
            .leave()
            .context("returning to ringvip's own network namespace")?;
    }
    let uso = queues.first().is_some_and(|q| q.uso());
    tracing::info!(dev = %link.name, mtu = link.mtu, queues = queues.len(), routes = ?link.routes, udp_segmentation_offload = uso, "capturing ClusterIP traffic");
    Ok(queues)
}

/// Attaches queues of this process to the TUN device `name` a running
/// ringvip captures ClusterIPs on (a handover): its link and routes are
/// set, and stay when that process exits, since this one holds queues.
fn attach_tun(name: &str, settings: &Settings) -> anyhow::Result<Vec<tun::Tun>> {
    let inside = match &settings.tun.netns {
        Some(ns) => Some(crate::netns::enter(ns).context("attaching to the TUN device")?),
        None => None,
    };
    let queues = tun::Tun::open_queues(name, settings.tun.tun_queues)
        .with_context(|| format!("attaching to the handed-over TUN device {name}"))?;
    if let Some(inside) = inside {
        inside
            .leave()
            .context("returning to ringvip's own network namespace")?;
    }
    tracing::info!(dev = %name, queues = queues.len(), "capturing ClusterIP traffic on the handed-over device");
    Ok(queues)
}

/// Puts what the previous process handed over where this one takes it: the
/// sockets into the pool the listeners bind from, the affinity table, the
/// UDP pins (kept for one UDP idle timeout).
fn inherit(t: &mut handover::Taking, shared: &Shared, udp_idle: std::time::Duration) {
    shared.inherited.fill(std::mem::take(&mut t.sockets));
    let at = t.received;
    for a in &t.affinity {
        let idle = std::time::Duration::from_millis(a.idle_ms);
        shared.affinity.record(
            a.port,
            a.client,
            a.endpoint,
            std::time::Duration::from_millis(a.timeout_ms),
            at.checked_sub(idle).unwrap_or(at),
        );
    }
    shared.pins.set(&t.pins, at, udp_idle);
}

/// Hands snapshots to the data plane and waits until its listeners follow.
struct Publisher {
    shared: Arc<Shared>,
    snap_tx: watch::Sender<Arc<Snapshot>>,
    programmed: Arc<crate::dataplane::listener::Programmed>,
    /// The kernel-socket threads' commands (the handover).
    commands: socket::Commands,
    /// The TUN threads' commands (the handover).
    tun_commands: Vec<mpsc::UnboundedSender<tun::TunCmd>>,
    /// The TUN device's name, when ClusterIPs are captured.
    tun_name: Option<String>,
    /// The last snapshot every kernel-socket thread holds the listeners of
    /// (or gave up waiting for): what the admin API shows, so a frontend it
    /// calls served has its port open.
    served: Arc<arc_swap::ArcSwap<Snapshot>>,
}

/// How long a published snapshot may take to reach every worker's listeners
/// before the control loop goes on without (a worker that slow is reported).
const PROGRAMMING_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Publisher {
    /// Asks every TUN thread and collects the answers.
    async fn ask_tun<T>(&self, cmd: impl Fn(oneshot::Sender<T>) -> tun::TunCmd) -> Vec<T> {
        let mut out = Vec::with_capacity(self.tun_commands.len());
        for c in &self.tun_commands {
            let (tx, rx) = oneshot::channel();
            if c.send(cmd(tx)).is_ok() {
                if let Ok(v) = rx.await {
                    out.push(v);
                }
            }
        }
        out
    }

    /// Publishes `snap`: new flows see it at once; returns once every
    /// kernel-socket worker has opened and closed its listeners to match.
    async fn publish(&self, snap: Arc<Snapshot>) {
        let generation = snap.generation;
        self.shared.snapshot.store(snap.clone());
        self.snap_tx.send_replace(snap);
        if !self.programmed.wait(generation, PROGRAMMING_LIMIT).await {
            tracing::warn!(
                generation,
                limit_ms = PROGRAMMING_LIMIT.as_millis() as u64,
                "a data-plane thread has not applied the snapshot in time"
            );
        }
        self.served.store(self.shared.snapshot.load_full());
    }
}

/// This process's sockets outside the data-plane threads, as the handover
/// gives them away: duplicates of the admin listeners and the tasks that
/// serve them.
struct AdminSockets {
    dups: Vec<(handover::SocketEntry, std::os::fd::OwnedFd)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Everything this process serves, for the process taking over.
async fn gather(
    publisher: &Publisher,
    admin: &AdminSockets,
    dns: Option<&Dns>,
    health_checks: &HealthCheckServers,
) -> handover::Dump {
    use handover::{Role, SocketEntry, Transport};
    let mut d = handover::Dump::default();
    for w in publisher.commands.ask(WorkerCmd::Dump).await {
        for (spec, fd) in w.sockets {
            let e = SocketEntry {
                role: Role::Listener,
                addr: spec.addr,
                transport: spec.proto.into(),
            };
            d.sockets.push((e, fd));
        }
        d.pins.extend(w.pins);
    }
    for pins in publisher.ask_tun(tun::TunCmd::Pins).await {
        d.pins.extend(pins);
    }
    if let Some(name) = &publisher.tun_name {
        match publisher.shared.tun_links.dup_siblings() {
            Ok(inboxes) => d.tun = Some((name.to_string(), inboxes)),
            Err(e) => tracing::warn!(error = %e, "handover: the TUN inboxes cannot be duplicated"),
        }
    }
    for (e, fd) in &admin.dups {
        if let Ok(fd) = fd.try_clone() {
            d.sockets.push((*e, fd));
        }
    }
    if let Some((udp, tcp)) = dns.and_then(Dns::handover_sockets) {
        let entry = |transport| SocketEntry {
            role: Role::Dns,
            addr: dns.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |d| d.addr),
            transport,
        };
        d.sockets.push((entry(Transport::Udp), udp));
        d.sockets.push((entry(Transport::Tcp), tcp));
    }
    for (addr, fd) in health_checks.handover_sockets() {
        let e = SocketEntry {
            role: Role::HealthCheck,
            addr,
            transport: Transport::Tcp,
        };
        d.sockets.push((e, fd));
    }
    let now = Instant::now();
    d.affinity = publisher
        .shared
        .affinity
        .export(now)
        .into_iter()
        .map(
            |(port, client, endpoint, idle, timeout)| handover::wire::AffinityEntry {
                port,
                client,
                endpoint,
                idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            },
        )
        .collect();
    d
}

/// Stops accepting anything new, everywhere, without closing a socket the
/// next process shares; from now on the TUN threads send the packets of
/// flows they do not hold to the next process's `inboxes`.
async fn release(
    publisher: &Publisher,
    admin: &AdminSockets,
    dns: Option<&Dns>,
    health_checks: &mut HealthCheckServers,
    inboxes: Vec<std::os::fd::OwnedFd>,
) {
    if !inboxes.is_empty() {
        publisher
            .shared
            .tun_links
            .set_peer(tun::peer::Peer::new(tun::peer::Role::Next, inboxes));
    }
    publisher.commands.ask(WorkerCmd::Release).await;
    for t in &admin.tasks {
        t.abort();
    }
    if let Some(d) = dns {
        d.stop_serving();
    }
    health_checks.stop_serving();
}

/// Once this process (having taken over) serves: lets the previous one go,
/// drops the sockets nobody took, and listens for the next one.
async fn finish_takeover(
    taking: handover::Taking,
    shared: &Shared,
    path: Option<&std::path::Path>,
    events: &mpsc::Sender<handover::Event>,
) -> Option<handover::Server> {
    let from = taking.from;
    let inboxes = match shared.tun_links.dup_siblings() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "handover: the TUN inboxes cannot be duplicated");
            Vec::new()
        }
    };
    match tokio::task::spawn_blocking(move || taking.ready(&inboxes)).await {
        Ok(Ok(took)) => tracing::info!(
            from,
            release_ms = took.as_secs_f64() * 1e3,
            "handover complete: the previous process accepts nothing new"
        ),
        Ok(Err(e)) => {
            tracing::warn!(from, error = %e, "handover: the previous process did not confirm; serving anyway")
        }
        Err(e) => tracing::warn!(from, error = %e, "handover: the release wait failed"),
    }
    let rest = shared.inherited.release_rest();
    if !rest.is_empty() {
        tracing::info!(sockets = ?rest, "handover: closed the sockets this snapshot does not want");
    }
    listen_for_next(path, events)
}

/// Listens on the handover path for the next process (a failure only costs
/// that: this process serves on).
fn listen_for_next(
    path: Option<&std::path::Path>,
    events: &mpsc::Sender<handover::Event>,
) -> Option<handover::Server> {
    let path = path?;
    match handover::Server::listen(path, events.clone()) {
        Ok(s) => {
            tracing::info!(path = %path.display(), "handover: listening for the next process");
            Some(s)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "handover: cannot listen; an upgrade will start fresh");
            None
        }
    }
}

async fn control(
    settings: Settings,
    ctx: NodeContext,
    publisher: Publisher,
    mut taking: Option<handover::Taking>,
    shutdown: Arc<Notify>,
    on_ready: OnReady,
) -> anyhow::Result<()> {
    let shared = publisher.shared.clone();
    let mut metrics = Metrics::new();
    metrics.register_limit_hits(&shared.limits.hits);
    metrics.register_proxy_protocol_rejected(&shared.upstream.rejected);
    let draining = Gauge::default();
    metrics.register_drain(&draining);
    let dns_metrics = DnsMetrics::default();
    if settings.dns.dns_addr.is_some() {
        metrics.register_dns(&dns_metrics);
    }
    if let Some(log) = &shared.access_log {
        metrics.register_access_log_dropped(log.dropped());
    }
    let metrics = Arc::new(metrics);
    let health = Arc::new(Health::new());
    let (admin_opts, dns_opts) = (&settings.admin, &settings.dns);
    let inherited = &shared.inherited;
    let hl = admin::bind_or_take(admin_opts.health_addr, handover::Role::Health, inherited)
        .await
        .with_context(|| format!("binding the health address {}", admin_opts.health_addr))?;
    let ml = admin::bind_or_take(admin_opts.metrics_addr, handover::Role::Metrics, inherited)
        .await
        .with_context(|| format!("binding the metrics address {}", admin_opts.metrics_addr))?;
    let mut admin_socks = AdminSockets {
        dups: Vec::new(),
        tasks: Vec::new(),
    };
    for (role, l) in [
        (handover::Role::Health, &hl),
        (handover::Role::Metrics, &ml),
    ] {
        let entry = handover::SocketEntry {
            role,
            addr: l.local_addr()?,
            transport: handover::Transport::Tcp,
        };
        admin_socks.dups.push((entry, admin::dup(l)?));
    }
    let mut dns = match dns_opts.dns_addr {
        Some(addr) => Some(
            Dns::start_on(
                addr,
                take_dns(inherited, addr),
                &dns_opts.cluster_domain,
                dns_opts.dns_ttl,
                dns_opts.dns_upstream,
                dns_metrics,
            )
            .await
            .with_context(|| format!("starting DNS on {addr}"))?,
        ),
        None => None,
    };
    let bound = Bound {
        health: hl.local_addr()?,
        metrics: ml.local_addr()?,
        dns: dns.as_ref().map(|d| d.addr),
    };
    admin_socks.tasks.push(tokio::spawn(admin::serve_health(
        hl,
        health.clone(),
        admin_opts.health_timeout,
    )));
    // ClusterIP frontends are served only through a TUN: status and explain
    // say so rather than show them as served.
    let cluster_ips = settings.tun.device().is_some();
    let status_of = shared.clone();
    let served = publisher.served.clone();
    let check_table = CheckTable::default();
    let api_checks = check_table.clone();
    let api: admin::FrontendsApi = Arc::new(move || {
        crate::status::frontends_json(&served.load(), &status_of.health, &api_checks, cluster_ips)
    });
    let explain_of = shared.clone();
    let explain: admin::ExplainApi = Arc::new(move |query| {
        let live = crate::explain::Live {
            health: &explain_of.health,
            affinity: &explain_of.affinity,
            limits: Some(&explain_of.limits),
            cluster_ips,
            now: Instant::now(),
        };
        crate::explain::answer(query, &explain_of.snapshot.load(), &live)
    });
    admin_socks
        .tasks
        .push(tokio::spawn(admin::serve_metrics_with_api(
            ml,
            metrics.clone(),
            api,
            explain,
        )));
    let (events_tx, mut events) = mpsc::channel::<handover::Event>(4);
    let handover_path = settings
        .admin
        .handover_path()
        .map(std::path::Path::to_path_buf);
    // A process taking over listens once the previous one has let go.
    let mut _handover_server = match taking {
        Some(_) => None,
        None => listen_for_next(handover_path.as_deref(), &events_tx),
    };

    let (tx, mut rx) = mpsc::channel::<Batch>(64);
    // Readiness probes and health checks: tasks on this runtime, sending
    // what they find into the same loop as the sources.
    let mut checks = Checks::new(tx.downgrade(), check_table);
    let reload = Arc::new(Notify::new());
    if settings.source.kube {
        start_kube(&settings, &ctx, tx).await?;
    } else {
        let source = FileSource::new(settings.source.manifests.clone(), settings.limits.clone());
        tokio::spawn(source.run(tx, reload.clone()));
    }
    on_ready(bound);

    // Forget ClientIP affinity entries that outlived their timeout.
    let sweeper = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            tick.tick().await;
            sweeper.affinity.sweep(Instant::now());
        }
    });

    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut store = Store::new();
    let mut health_checks = HealthCheckServers::new(
        ctx.nodeport_addresses.clone(),
        health.clone(),
        admin_opts.health_timeout,
    );
    let mut generation = 0u64;
    // Unchanged Services are not compiled again (see CompileCache).
    let mut compile_cache = crate::state::CompileCache::default();
    loop {
        tokio::select! {
            b = rx.recv() => {
                let Some(b) = b else { break };
                let started = Instant::now();
                let mut received = Received::default();
                received.take(b, &mut store, &health, &metrics);
                while let Ok(more) = rx.try_recv() {
                    received.take(more, &mut store, &health, &metrics);
                }
                received.pending(&metrics);
                generation += 1;
                let (snap, changed) = store.compile_changes(&ctx, &metrics, generation, &mut compile_cache);
                let snap = Arc::new(snap);
                for c in &snap.conflicts {
                    tracing::warn!("frontend conflict: {c}");
                }
                metrics.set_no_local_endpoints(snap.no_local_internal as i64, snap.no_local_external as i64);
                metrics.set_skipped_ports(snap.skipped_ports as i64);
                publisher.publish(snap.clone()).await;
                // The DNS view of the same objects, right after the data
                // plane: a name is never answered before its address is
                // served, and the data plane never waits for the zone (a
                // full zone build at 100k Services takes seconds).
                if let Some(d) = &mut dns {
                    d.publish(&store, &changed, generation);
                }
                checks.sync(&mut store);
                health_checks.sync(&snap.health_checks, &shared.inherited).await;
                if let Some(t) = taking.take() {
                    _handover_server = finish_takeover(t, &shared, handover_path.as_deref(), &events_tx).await;
                }
                if generation == 1 {
                    // systemd follows this process from now on (a reload's
                    // new process takes the unit's main pid over).
                    handover::notify::serving();
                    // The first load's garbage (list responses, parsed
                    // files, the first compile's scratch) goes back to the
                    // kernel now, not in the middle of the next change.
                    tokio::task::spawn_blocking(crate::heap::release_free_memory);
                }
                metrics.observe_sync(started.elapsed());
                let now = SystemTime::now();
                received.published(&metrics, now);
                metrics.set_last_sync(now);
                health.set_node_deleting(store.node(&ctx.node_name).is_some_and(|n| n.deleting));
                health.applied(now);
                // Logged last, once the data plane follows the snapshot and
                // health and metrics say so: a client that connects after
                // this line sees exactly this snapshot's listeners.
                tracing::info!(
                    generation,
                    services = store.service_count(),
                    frontends = snap.frontend_count(),
                    listeners = snap.listeners().len(),
                    "snapshot published"
                );
            }
            Some(ev) = events.recv() => match ev {
                handover::Event::Dump(tx) => {
                    let _ = tx.send(gather(&publisher, &admin_socks, dns.as_ref(), &health_checks).await);
                }
                handover::Event::Release { taker, done, inboxes, told } => {
                    release(&publisher, &admin_socks, dns.as_ref(), &mut health_checks, inboxes).await;
                    let _ = done.send(());
                    // The new process hears "released" before this one may
                    // exit (with nothing to drain it exits at once).
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), told).await;
                    tracing::info!(taker, "handed over: accepting nothing new");
                    let stopped = drain_handed_over(&publisher, settings.dataplane.drain_timeout, &mut sigterm, &draining).await;
                    let c = shared.tun_links.counts();
                    tracing::info!(packets_to_peer = c.to_peer, packets_from_peer = c.from_peer, packets_between_threads = c.between_threads, "handed over: TUN packets forwarded");
                    if settings.admin.linger_after_handover && !stopped {
                        tracing::info!("handed over and drained: waiting for SIGTERM");
                        let _ = sigterm.recv().await;
                    }
                    break;
                }
            },
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading manifests");
                reload.notify_one();
            }
            _ = sigterm.recv() => {
                drain(&publisher, generation + 1, settings.dataplane.drain_timeout, &mut sigterm, &draining).await;
                break;
            }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break }
            _ = shutdown.notified() => break,
        }
    }
    // What took a detour through the TUN threads' inboxes: nothing between
    // threads on a single process whose queues stayed put.
    let c = shared.tun_links.counts();
    tracing::info!(
        packets_to_peer = c.to_peer,
        packets_from_peer = c.from_peer,
        packets_between_threads = c.between_threads,
        "stopped: TUN packets passed"
    );
    Ok(())
}

/// Batches taken from the sources for one snapshot: what they changed and
/// when. The control loop alone turns them into health and metrics.
#[derive(Debug, Default)]
struct Received {
    changes: Changes,
    /// Each change's trigger time, with when its source queued it.
    triggers: Vec<(SystemTime, SystemTime)>,
}

impl Received {
    /// Applies `b` to the store. Its queued time counts for health (pending
    /// since then) and the last-queued metric at once; its trigger times
    /// once the snapshot holding it is published.
    fn take(&mut self, b: Batch, store: &mut Store, health: &Health, metrics: &Metrics) {
        health.queued(b.queued);
        metrics.set_last_queued(b.queued);
        for u in b.updates {
            let c = store.apply(u);
            self.changes.services += c.services;
            self.changes.endpoints += c.endpoints;
            self.changes.other += c.other;
        }
        self.triggers
            .extend(b.triggers.into_iter().map(|t| (t, b.queued)));
    }

    /// Shows the changes taken as pending until [`Received::published`].
    fn pending(&self, metrics: &Metrics) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.set_pending_changes(gauge(self.changes.services), gauge(self.changes.endpoints));
    }

    /// The snapshot holding these changes was published at `now`: counts
    /// them and observes each trigger's network programming latency.
    fn published(self, metrics: &Metrics, now: SystemTime) {
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        for (t, queued) in self.triggers {
            if let Ok(d) = now.duration_since(t) {
                metrics.observe_network_programming(d);
                // Each sample, for benches/kube_scale.py's churn mode: the
                // histogram's buckets (kube-proxy's) start at 0.25 s. The
                // part since the source queued the change is ringvip's
                // control loop alone (the rest: delivery and decoding).
                let since_queued = now.duration_since(queued).unwrap_or_default();
                tracing::debug!(target: "ringvip::programming", latency_us = us(d), since_queued_us = us(since_queued), "programmed");
            }
        }
        metrics.set_pending_changes(0, 0);
        metrics.add_service_changes(self.changes.services);
        metrics.add_endpoint_changes(self.changes.endpoints);
    }
}

/// Starts the API source (see [`kube`]).
async fn start_kube(
    settings: &Settings,
    ctx: &NodeContext,
    tx: mpsc::Sender<Batch>,
) -> anyhow::Result<()> {
    let client = kube::client(settings.source.kubeconfig.as_deref()).await?;
    let filter = kube::Filter {
        proxy_name: ctx.proxy_name.clone(),
        keep_headless: settings.dns.dns_addr.is_some(),
    };
    let source = kube::KubeSource::new(
        client,
        ctx.node_name.clone(),
        filter,
        settings.limits.clone(),
    );
    tracing::info!(node = %ctx.node_name, "watching the Kubernetes API");
    tokio::spawn(source.run(tx));
    Ok(())
}

/// Stops taking new flows and waits up to `timeout` for relayed connections
/// to finish, as a pod's grace period does. Publishing an empty snapshot is
/// all it takes: listeners close (new clients are refused) and the TUN path
/// refuses new SYNs, while established connections keep their frontend.
/// A second SIGTERM ends the wait. `remaining` shows the connections still
/// waited for, so that a drain that does not end can be seen (and alerted
/// on) from the metrics, which are served until the process exits.
async fn drain(
    publisher: &Publisher,
    generation: u64,
    timeout: std::time::Duration,
    sigterm: &mut tokio::signal::unix::Signal,
    remaining: &Gauge,
) {
    publisher
        .publish(Arc::new(Snapshot::empty(generation)))
        .await;
    let shared = &publisher.shared;
    let active = || {
        let n = shared.active.load(std::sync::atomic::Ordering::Relaxed);
        remaining.set(i64::try_from(n).unwrap_or(i64::MAX));
        n
    };
    tracing::info!(
        connections = active(),
        timeout_secs = timeout.as_secs(),
        "SIGTERM: draining"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    while active() > 0 {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(connections = active(), "drain timeout: closing remaining connections");
                return;
            }
            _ = sigterm.recv() => {
                tracing::warn!(connections = active(), "second SIGTERM: closing remaining connections");
                return;
            }
        }
    }
    tracing::info!("drained");
}

/// The DNS sockets the previous process handed over for `addr`, when both are.
fn take_dns(
    inherited: &handover::Inherited,
    addr: SocketAddr,
) -> Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use handover::{Role, Transport};
    let udp = inherited.take(Role::Dns, addr, Transport::Udp);
    let tcp = inherited.take(Role::Dns, addr, Transport::Tcp);
    udp.zip(tcp)
}

/// After a handover: waits up to `timeout` for the TCP connections and UDP
/// flows this process still relays to end (the new process takes every new
/// one). Unlike [`drain`], no snapshot is published: an empty one would end
/// the UDP flows, whose late replies are still relayed. True when a SIGTERM
/// ended it.
async fn drain_handed_over(
    publisher: &Publisher,
    timeout: std::time::Duration,
    sigterm: &mut tokio::signal::unix::Signal,
    remaining: &Gauge,
) -> bool {
    let shared = &publisher.shared;
    let left = || async {
        let tcp = shared.active.load(std::sync::atomic::Ordering::Relaxed);
        let udp: usize = publisher
            .commands
            .ask(WorkerCmd::Flows)
            .await
            .iter()
            .sum::<usize>()
            + publisher
                .ask_tun(tun::TunCmd::Flows)
                .await
                .iter()
                .sum::<usize>();
        remaining.set(i64::try_from(tcp).unwrap_or(i64::MAX));
        (tcp, udp)
    };
    let (tcp, udp) = left().await;
    tracing::info!(
        connections = tcp,
        udp_flows = udp,
        timeout_secs = timeout.as_secs(),
        "handed over: draining"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        let (tcp, udp) = left().await;
        if tcp == 0 && udp == 0 {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(connections = tcp, udp_flows = udp, "drain timeout: closing remaining connections");
                return false;
            }
            _ = sigterm.recv() => {
                tracing::warn!(connections = tcp, udp_flows = udp, "SIGTERM: closing remaining connections");
                return true;
            }
        }
    }
    tracing::info!("drained");
    false
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;
    use crate::telemetry::{
        NETWORK_PROGRAMMING_DURATION_SECONDS, SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS,
        SYNC_PROXY_RULES_SERVICE_CHANGES_PENDING, SYNC_PROXY_RULES_SERVICE_CHANGES_TOTAL,
    };

    fn service(port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: default}}\n\
             spec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}\n"
        )
    }

    fn scrape(addr: SocketAddr) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The value of the sample named exactly `name` (no labels).
    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// Waits for a precondition (a snapshot published), not for the answer
    /// under test: the publish takes a moment after the file is written.
    fn wait_until_changes(addr: SocketAddr, at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while value(&scrape(addr), SYNC_PROXY_RULES_SERVICE_CHANGES_TOTAL) < at_least {
            assert!(
                Instant::now() < deadline,
                "no snapshot with {at_least} Service changes"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file source feeds the same control-loop metrics as the API
    /// source: a manifest edit is one network programming latency sample,
    /// its Service change is no longer pending once published, and the last
    /// queued time is set.
    #[test]
    fn a_manifest_change_feeds_the_programming_latency() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, service(80)).unwrap();
        let mut settings = Settings::default();
        settings.source.manifests = vec![dir.path().to_path_buf()];
        settings.tun.no_tun = true;
        settings.admin.no_handover = true;
        settings.dataplane.workers = 1;
        settings.node.nodeport_addresses = vec!["127.0.0.1/32".parse().unwrap()];
        settings.admin.health_addr = "127.0.0.1:0".parse().unwrap();
        settings.admin.metrics_addr = "127.0.0.1:0".parse().unwrap();
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let app = std::thread::spawn(move || {
            run(settings, stop, Box::new(move |b| bound_tx.send(b).unwrap()))
        });
        let metrics = bound_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .metrics;
        let count = format!("{NETWORK_PROGRAMMING_DURATION_SECONDS}_count");

        wait_until_changes(metrics, 1.0);
        let text = scrape(metrics);
        assert_eq!(value(&text, &count), 0.0, "the first load is no change");
        assert!(value(&text, SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS) > 0.0);

        std::fs::write(&file, service(81)).unwrap();
        wait_until_changes(metrics, 2.0);
        let text = scrape(metrics);
        assert_eq!(value(&text, &count), 1.0, "{text}");
        assert_eq!(value(&text, SYNC_PROXY_RULES_SERVICE_CHANGES_PENDING), 0.0);

        shutdown.notify_one();
        app.join().unwrap().unwrap();
    }
}
