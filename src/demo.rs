//! `ringvip demo`: three local HTTP backends behind two NodePorts on 127.0.0.1
//! (one random, one with ClientIP affinity), driven by a manifest file the user
//! can edit live. Needs no root: 127.0.0.0/8 is all loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
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

/// What the demo's self-test saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// Answers per backend through the random NodePort.
    pub random: [u32; 3],
    /// Answers per backend through the affinity NodePort.
    pub sticky: [u32; 3],
}

impl DemoReport {
    /// Balancing reached every backend and affinity kept to one.
    pub fn ok(&self) -> bool {
        self.random.iter().all(|&n| n > 0) && self.sticky.iter().filter(|&&n| n > 0).count() == 1
    }
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

fn self_test(np_random: u16, np_sticky: u16) -> anyhow::Result<DemoReport> {
    let random = SocketAddr::from((Ipv4Addr::LOCALHOST, np_random));
    let sticky = SocketAddr::from((Ipv4Addr::LOCALHOST, np_sticky));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(random).is_err() || get(sticky).is_err() {
        if Instant::now() > deadline {
            bail!("the NodePorts did not start serving within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut r = DemoReport {
        random: [0; 3],
        sticky: [0; 3],
    };
    // `get` answers 1..=3 only, so every answer has its slot.
    for _ in 0..30 {
        if let Some(n) = r.random.get_mut(get(random)? - 1) {
            *n += 1;
        }
    }
    for _ in 0..10 {
        if let Some(n) = r.sticky.get_mut(get(sticky)? - 1) {
            *n += 1;
        }
    }
    Ok(r)
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
    // The demo shows NodePorts and needs no root: no ClusterIP capture.
    settings.tun.no_tun = true;
    settings.admin.health_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port(10256)?));
    settings.admin.metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port(10249)?));
    let shutdown = Arc::new(Notify::new());
    let stop = shutdown.clone();
    let outcome: Arc<std::sync::Mutex<Option<anyhow::Result<DemoReport>>>> = Arc::default();
    let slot = outcome.clone();
    let file_shown = file.clone();
    let result = crate::app::run(settings, shutdown, move |bound| {
        std::thread::spawn(move || {
            let res = self_test(np_random, np_sticky);
            println!();
            println!("ringvip demo: three backends on 127.0.0.2-4:{backend_port}, two NodePorts on 127.0.0.1");
            match &res {
                Ok(r) => {
                    println!("  30 requests, random NodePort:       {}", tally(&r.random));
                    println!("  10 requests, ClientIP affinity:     {}", tally(&r.sticky));
                }
                Err(e) => println!("  self-test failed: {e:#}"),
            }
            println!();
            println!("  random balancing:    curl http://127.0.0.1:{np_random}/");
            println!("  ClientIP affinity:   curl http://127.0.0.1:{np_sticky}/");
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
    });
    let _ = std::fs::remove_dir_all(&dir);
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
