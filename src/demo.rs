//! `ringvip demo`: three local HTTP backends behind two NodePorts on 127.0.0.1
//! (one random, one with ClientIP affinity), driven by a manifest file the user
//! can edit live. Needs no root: 127.0.0.0/8 is all loopback.
//!
//! Run as root, it also shows the heart of ringvip: a ClusterIP answered
//! through its TUN device. The device and the service CIDR's routes live in a
//! network namespace the demo creates (`ringvip-demo-<pid>`) and removes when
//! it exits (also on Ctrl-C or SIGTERM), so nothing of the host's routing
//! changes; a client thread inside that namespace makes the requests.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::Notify;

use crate::config::Settings;

/// Backend addresses: one loopback IP each, all on the same port (an
/// EndpointSlice has one port for all its endpoints).
const BACKEND_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
    Ipv4Addr::new(127, 0, 0, 4),
];

/// The ClusterIP the demo shows through the TUN (the random Service's).
const CLUSTER_IP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 80)), 80);
/// The client's address inside the demo's namespace (on its loopback
/// device, so the kernel has a source address for the ClusterIP route).
const CLIENT_ADDR: &str = "10.254.0.1/32";

/// What the demo's self-test saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// Answers per backend through the random NodePort.
    pub random: [u32; 3],
    /// Answers per backend through the affinity NodePort.
    pub sticky: [u32; 3],
    /// Answers per backend through the ClusterIP (root only).
    pub cluster_ip: Option<[u32; 3]>,
}

impl DemoReport {
    /// Balancing reached every backend and affinity kept to one, through
    /// the NodePorts and the ClusterIP when it was shown.
    pub fn ok(&self) -> bool {
        let all = |c: &[u32; 3]| c.iter().all(|&n| n > 0);
        all(&self.random)
            && self.sticky.iter().filter(|&&n| n > 0).count() == 1
            && self.cluster_ip.as_ref().is_none_or(all)
    }
}

/// The demo's network namespace: created with `ip netns add`, loopback up
/// with the client's address; deleted (with the TUN device in it) on drop.
///
/// Deleting needs `CAP_SYS_ADMIN`, which ringvip drops from the main thread
/// once its TUN is up; capabilities belong to threads, so a thread started
/// before that (keeping root's) deletes it when asked.
struct DemoNetns {
    name: String,
    delete: mpsc::Sender<()>,
    deleted: mpsc::Receiver<Result<(), String>>,
}

impl DemoNetns {
    /// Creates it, or says why the ClusterIP part cannot be shown.
    fn create() -> Result<DemoNetns, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "it needs root (to create a network namespace and a TUN device in it)".into(),
            );
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun is missing (no TUN support here)".into());
        }
        let name = format!("ringvip-demo-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let (delete, asked) = mpsc::channel::<()>();
        let (done, deleted) = mpsc::channel();
        let doomed = name.clone();
        std::thread::spawn(move || {
            // Asked, or the demo is gone (the sender dropped): delete.
            let _ = asked.recv();
            let _ = done.send(ip(&["netns", "del", &doomed]));
        });
        // From here on, drop removes it.
        let ns = DemoNetns {
            name,
            delete,
            deleted,
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns.name, "addr", "add", CLIENT_ADDR, "dev", "lo"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for DemoNetns {
    fn drop(&mut self) {
        let _ = self.delete.send(());
        match self.deleted.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "ringvip demo: removing network namespace {}: {e}",
                self.name
            ),
            Err(_) => eprintln!(
                "ringvip demo: network namespace {} not removed in time",
                self.name
            ),
        }
    }
}

/// Runs `ip ARGS`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The ClusterIP requests of the self-test, made from a thread inside the
/// demo's namespace. It enters the namespace before ringvip starts, because
/// entering needs `CAP_SYS_ADMIN`, which ringvip drops once its TUN is up;
/// a thread keeps its namespace after that.
struct Client {
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<anyhow::Result<[u32; 3]>>,
}

impl Client {
    fn start(ns: &Path) -> anyhow::Result<Client> {
        let (go, wait) = mpsc::channel::<()>();
        let (report, done) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        let ns = ns.to_path_buf();
        std::thread::spawn(move || match crate::netns::enter(&ns) {
            // The guard stays alive: the thread stays inside for good.
            Ok(_inside) => {
                let _ = entered_tx.send(Ok(()));
                if wait.recv().is_ok() {
                    let _ = report.send(requests(CLUSTER_IP, 30));
                }
            }
            Err(e) => {
                let _ = entered_tx.send(Err(e));
            }
        });
        entered
            .recv()
            .map_err(|_| anyhow::anyhow!("the ClusterIP client thread stopped"))?
            .context("entering the demo's network namespace")?;
        Ok(Client { go, done })
    }

    /// Makes the requests; their answers per backend.
    fn run(&self) -> anyhow::Result<[u32; 3]> {
        self.go
            .send(())
            .map_err(|_| anyhow::anyhow!("the ClusterIP client thread stopped"))?;
        self.done
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow::anyhow!("no ClusterIP answers within 60 s"))?
    }
}

/// `n` requests to `addr` once it answers (the wait is for the data plane
/// to come up, a precondition); the answers per backend.
fn requests(addr: SocketAddr, n: u32) -> anyhow::Result<[u32; 3]> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut counts = [0; 3];
    // `get` answers 1..=3 only, so every answer has its slot.
    for _ in 0..n {
        if let Some(c) = counts.get_mut(get(addr)? - 1) {
            *c += 1;
        }
    }
    Ok(counts)
}

fn bind_backends() -> anyhow::Result<(u16, Vec<TcpListener>)> {
    for _ in 0..20 {
        let first = TcpListener::bind((BACKEND_IPS[0], 0)).context("binding a backend")?;
        let port = first.local_addr()?.port();
        let rest: Result<Vec<_>, _> = BACKEND_IPS[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if let Ok(mut rest) = rest {
            rest.insert(0, first);
            return Ok((port, rest));
        }
    }
    bail!("could not find one free port on 127.0.0.2-4")
}

fn serve_backend(l: TcpListener, n: usize) {
    let me = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => req.extend_from_slice(buf.get(..k).unwrap_or_default()),
            }
        }
        let body = format!("hello from backend-{n} ({me})\n");
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn free_port(candidates: impl Iterator<Item = u16>) -> anyhow::Result<u16> {
    for p in candidates {
        if TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port")
}

/// The demo's manifests: two NodePort Services over the same three backends.
pub fn manifest(backend_port: u16, np_random: u16, np_sticky: u16) -> String {
    let endpoints: String = BACKEND_IPS
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
        .collect();
    let slice = |svc: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: demo\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n- name: http\n  protocol: TCP\n  port: {backend_port}\nendpoints:\n{endpoints}"
        )
    };
    format!(
        "# ringvip demo manifests: edit and save, changes apply live.\n\
apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.80\n  ports:\n  - name: http\n    port: 80\n    targetPort: {backend_port}\n    nodePort: {np_random}\n\
---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web-sticky\n  namespace: demo\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.81\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n  ports:\n  - name: http\n    port: 80\n    targetPort: {backend_port}\n    nodePort: {np_sticky}\n{}{}",
        slice("web"),
        slice("web-sticky")
    )
}

/// One HTTP GET; returns the backend number that answered.
pub fn get(addr: SocketAddr) -> std::io::Result<usize> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        c,
        "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    )?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    s.split("backend-")
        .nth(1)
        .and_then(|r| r.get(..1))
        .and_then(|d| d.parse::<usize>().ok())
        .filter(|n| (1..=3).contains(n))
        .ok_or_else(|| std::io::Error::other(format!("unexpected answer: {s:?}")))
}

fn self_test(
    np_random: u16,
    np_sticky: u16,
    client: Option<&Client>,
) -> anyhow::Result<DemoReport> {
    let random = SocketAddr::from((Ipv4Addr::LOCALHOST, np_random));
    let sticky = SocketAddr::from((Ipv4Addr::LOCALHOST, np_sticky));
    Ok(DemoReport {
        random: requests(random, 30)?,
        sticky: requests(sticky, 10)?,
        cluster_ip: client.map(Client::run).transpose()?,
    })
}

fn tally(counts: &[u32; 3]) -> String {
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| format!("backend-{} ×{n}", i + 1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the demo. With `once`, exits after the self-test (for tests and CI).
pub fn run(once: bool) -> anyhow::Result<()> {
    let (backend_port, listeners) = bind_backends()?;
    for (i, l) in listeners.into_iter().enumerate() {
        std::thread::spawn(move || serve_backend(l, i + 1));
    }
    let np_random = free_port(30080..=30099)?;
    let np_sticky = free_port((30100..=30199).filter(|p| *p != np_random))?;
    let dir = std::env::temp_dir().join(format!("ringvip-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file: PathBuf = dir.join("demo.yaml");
    std::fs::write(&file, manifest(backend_port, np_random, np_sticky))
        .with_context(|| format!("writing {}", file.display()))?;
    let admin_port = |p| free_port(std::iter::once(p).chain(std::iter::once(0)));
    let mut settings = Settings::default();
    settings.source.manifests = vec![dir.clone()];
    settings.node.nodeport_addresses = vec!["127.0.0.1/32".parse()?];
    settings.dataplane.workers = 2;
    // Nothing long-lived to wait for on SIGTERM.
    settings.dataplane.drain_timeout = Duration::from_secs(2);
    settings.admin.health_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port(10256)?));
    settings.admin.metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port(10249)?));
    // The demo is no upgrade of a ringvip that may be running here.
    settings.admin.no_handover = true;
    // The ClusterIP part, where it can be shown: the TUN device in a
    // namespace of the demo's own. Dropped last: removed however run ends.
    let netns = DemoNetns::create();
    let client = match &netns {
        Ok(ns) => {
            settings.tun.netns = Some(ns.path());
            settings.tun.tun_queues = 1;
            Some(Client::start(&ns.path())?)
        }
        Err(_) => {
            settings.tun.no_tun = true;
            None
        }
    };
    let shown = netns
        .as_ref()
        .map(|ns| ns.name.clone())
        .map_err(Clone::clone);
    let shutdown = Arc::new(Notify::new());
    let stop = shutdown.clone();
    let outcome: Arc<std::sync::Mutex<Option<anyhow::Result<DemoReport>>>> = Arc::default();
    let slot = outcome.clone();
    let file_shown = file.clone();
    let result = crate::app::run(
        settings,
        shutdown,
        Box::new(move |bound| {
            std::thread::spawn(move || {
                let res = self_test(np_random, np_sticky, client.as_ref());
                println!();
                println!("ringvip demo: three backends on 127.0.0.2-4:{backend_port}, two NodePorts on 127.0.0.1");
                match &res {
                    Ok(r) => {
                        println!("  30 requests, random NodePort:       {}", tally(&r.random));
                        println!("  10 requests, ClientIP affinity:     {}", tally(&r.sticky));
                        if let (Some(c), Ok(ns)) = (&r.cluster_ip, &shown) {
                            println!("  30 requests, ClusterIP {CLUSTER_IP} through the TUN, from namespace {ns}: {}", tally(c));
                        }
                    }
                    Err(e) => println!("  self-test failed: {e:#}"),
                }
                if let Err(why) = &shown {
                    println!("  ClusterIP part not shown: {why}. As root, the demo also answers");
                    println!("  ClusterIP {CLUSTER_IP} through ringvip's TUN, in a network namespace of its own.");
                }
                println!();
                println!("  random balancing:    curl http://127.0.0.1:{np_random}/");
                println!("  ClientIP affinity:   curl http://127.0.0.1:{np_sticky}/");
                if let Ok(ns) = &shown {
                    println!(
                        "  ClusterIP:           ip netns exec {ns} curl http://{}/",
                        CLUSTER_IP.ip()
                    );
                }
                println!(
                    "  what is served:      ringvip status --admin {}",
                    bound.metrics
                );
                println!(
                "  why a flow goes where it goes: ringvip explain --admin {} 127.0.0.1 127.0.0.1:{np_sticky}",
                bound.metrics
            );
                println!(
                    "  metrics:             curl http://{}/metrics",
                    bound.metrics
                );
                println!(
                    "  health:              curl http://{}/healthz",
                    bound.health
                );
                println!();
                println!(
                    "  manifests (edit and save; changes apply live): {}",
                    file_shown.display()
                );
                let failed = !matches!(&res, Ok(r) if r.ok());
                if let Ok(mut s) = slot.lock() {
                    *s = Some(res);
                }
                if once || failed {
                    stop.notify_one();
                } else {
                    println!("  Ctrl-C to stop.");
                }
            });
        }),
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop(netns);
    result?;
    let report = outcome
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .ok_or_else(|| anyhow::anyhow!("stopped before the self-test finished"))??;
    if !report.ok() {
        bail!("self-test failed: balancing or affinity did not behave ({report:?})");
    }
    Ok(())
}
