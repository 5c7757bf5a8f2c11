//! Harness for end-to-end tests: the real `ringvip` binary, real sockets on
//! loopback (127.0.0.0/8 is all local on Linux, so each test uses its own
//! addresses), test backends, and bounded waits.

#![allow(dead_code)]

pub mod kubeapi;
pub mod netns;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A free TCP+UDP port on 127.0.0.1 (best effort: bound then released).
pub fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// What a test backend does with a connection.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Answers one HTTP request with `backend-<name>` and closes.
    Http,
    /// Echoes bytes until EOF, then closes its side.
    Echo,
    /// Writes one byte every 10 ms until the peer goes away.
    Stream,
    /// Resets the connection right after accepting it.
    Reset,
}

/// A TCP backend on its own thread; stops (port closed) when dropped or killed.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicU32>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start(addr: SocketAddr, name: &str, mode: Mode) -> Backend {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let (s, a, n) = (stop.clone(), accepted.clone(), name.to_string());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let n = n.clone();
                        let s = s.clone();
                        thread::spawn(move || serve(c, &n, mode, &s));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Closes the listening socket (new connects are refused).
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(mut c: TcpStream, name: &str, mode: Mode, stop: &AtomicBool) {
    c.set_nonblocking(false).unwrap();
    match mode {
        Mode::Http => {
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            c.set_read_timeout(Some(Duration::from_secs(5))).ok();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let body = format!("backend-{name}\n");
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Mode::Echo => {
            let mut buf = [0u8; 16384];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        if c.write_all(&buf[..k]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
        Mode::Stream => {
            // Keeps streaming even after the backend's listener is killed, like
            // an established connection to a pod that left the Service.
            let _ = stop;
            while c.write_all(b"x").is_ok() {
                thread::sleep(Duration::from_millis(10));
            }
        }
        Mode::Reset => {
            let s = socket2::SockRef::from(&c);
            let _ = s.set_linger(Some(Duration::ZERO));
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A UDP echo backend: replies `<name>:<payload>`.
pub struct UdpBackend {
    stop: Arc<AtomicBool>,
}

impl UdpBackend {
    pub fn start(addr: SocketAddr, name: &str) -> UdpBackend {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let name = name.to_string();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    let _ = s.send_to(&out, peer);
                }
            }
        });
        UdpBackend { stop }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One HTTP GET through `addr` from source `src` (any port); returns the body.
pub fn http_get_from(src: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<String> {
    let mut c = connect_from(src, addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    match s.split("\r\n\r\n").nth(1) {
        Some(body) if s.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(std::io::Error::other(format!("bad response {s:?}"))),
    }
}

pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    http_get_from(None, addr)
}

/// A TCP connection from a chosen loopback source address.
pub fn connect_from(src: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if let Some(ip) = src {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    Ok(s.into())
}

/// Connects once the frontend accepts (ringvip opens listeners asynchronously).
pub fn connect_when_ready(addr: SocketAddr) -> TcpStream {
    let mut conn = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            conn = connect_from(None, addr).ok();
            conn.is_some()
        }),
        "{addr} never accepted"
    );
    conn.expect("checked above")
}

/// Bytes read from a streaming connection over `dur` (it must not stall).
pub fn bytes_within(conn: &mut TcpStream, dur: Duration) -> usize {
    let mut buf = [0u8; 64];
    let end = Instant::now() + dur;
    let mut got = 0;
    while Instant::now() < end {
        got += conn.read(&mut buf).unwrap();
    }
    got
}

/// GET `path` from an admin server; the whole response, headers included.
pub fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// The value of `ringvip_connect_failures_total` for a Service and reason.
pub fn connect_failures(metrics: &str, service: &str, reason: &str) -> Option<u64> {
    let svc = format!("service=\"{service}\"");
    let why = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .find(|l| {
            l.starts_with("ringvip_connect_failures_total") && l.contains(&svc) && l.contains(&why)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `ringvip_bytes_total` of a Service in one direction (`to_backend` or `to_client`).
pub fn bytes_relayed(metrics: &str, service: &str, direction: &str) -> Option<u64> {
    let svc = format!("service=\"{service}\"");
    let dir = format!("direction=\"{direction}\"");
    metrics
        .lines()
        .find(|l| l.starts_with("ringvip_bytes_total") && l.contains(&svc) && l.contains(&dir))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The ringvip process under test.
pub struct Ringvip {
    child: Child,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringvip")
}

impl Ringvip {
    /// Starts `ringvip run` on a directory holding `manifest.yaml`, NodePorts on
    /// 127.0.0.1, any nodePort allowed, fast connect retries.
    pub fn start(manifest: &str, extra: &[&str]) -> Ringvip {
        Self::launch(None, manifest, extra)
    }

    /// Like `start`, but inside network namespace `netns` (when given) with
    /// its TUN device capturing the service CIDRs.
    pub fn launch(netns: Option<&str>, manifest: &str, extra: &[&str]) -> Ringvip {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.yaml"), manifest).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(["run", "--manifests"]).arg(dir.path());
        // Many tests run at once: only those in their own namespace get a TUN.
        if netns.is_none() {
            cmd.arg("--no-tun");
        }
        Ringvip::spawn(cmd, dir, extra, "snapshot published")
    }

    /// Starts `cmd` (ringvip with its source arguments) with the settings
    /// every test shares (NodePorts on 127.0.0.1, node `node-a`, 2 workers,
    /// 100 ms connect timeout, admin ports of its own), logging into `dir`;
    /// returns once the log shows `ready`.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir, extra: &[&str], ready: &str) -> Ringvip {
        let log = dir.path().join("ringvip.log");
        let health = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        // free_port releases its port: two calls may return the same one.
        let metrics = loop {
            let m = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            if m != health {
                break m;
            }
        };
        let child = cmd
            .args([
                "--nodeport-addresses",
                "127.0.0.1/32",
                "--node-port-range",
                "1-65535",
                "--workers",
                "2",
                "--node-name",
                "node-a",
                "--connect-timeout-ms",
                "100",
            ])
            .arg("--health-addr")
            .arg(health.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(extra)
            .env("RINGVIP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ringvip");
        let r = Ringvip {
            child,
            dir,
            log,
            health,
            metrics,
        };
        assert!(
            wait_until(Duration::from_secs(20), || r.log().contains(ready)),
            "ringvip never logged {ready:?}:\n{}",
            r.log()
        );
        r
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the manifest (atomically, by rename, as editors and kubectl do).
    pub fn write_manifest(&self, text: &str) {
        let tmp = self.dir.path().join(".manifest.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("manifest.yaml")).unwrap();
    }

    /// Replaces the manifest and returns once ringvip has compiled and published
    /// the change (a precondition of every "first connection after a change"
    /// check, not a wait for the good answer).
    pub fn apply(&self, text: &str) {
        let before = self.generations();
        self.write_manifest(text);
        assert!(
            wait_until(Duration::from_secs(10), || self.generations() > before),
            "the change was never published:\n{}",
            self.log()
        );
    }

    /// Sends SIGTERM (graceful stop: drain).
    pub fn sigterm(&self) {
        // SAFETY: kill only signals our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Process id of ringvip (`ip netns exec` execs it, so the same process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`: re-read the manifests).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only signals our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits up to `limit` for the process to exit; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let child = &mut self.child;
        wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Number of "snapshot published" lines so far.
    pub fn generations(&self) -> usize {
        self.log().matches("snapshot published").count()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Ringvip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An EndpointSlice's `endpoints:` value: one ready endpoint per address,
/// each with the `extra` lines (indented by two).
pub fn endpoints_yaml<T: std::fmt::Display>(addresses: &[T], extra: &str) -> String {
    let eps: String = addresses
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n{extra}"))
        .collect();
    if eps.is_empty() {
        "[]\n".to_string()
    } else {
        format!("\n{eps}")
    }
}

/// A NodePort Service `name` in `default` with one TCP port, plus its slice.
pub fn nodeport_service(
    name: &str,
    node_port: u16,
    target: u16,
    endpoints: &[Ipv4Addr],
    extra_spec: &str,
) -> String {
    let eps = endpoints_yaml(endpoints, "  nodeName: node-a\n");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n{extra_spec}  ports:\n  - name: p\n    protocol: TCP\n    port: 80\n    targetPort: {target}\n    nodePort: {node_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: p\n  protocol: TCP\n  port: {target}\nendpoints: {eps}"
    )
}

/// A Service with endpoints `eps` (address, ready, nodeName) on one port of
/// `proto`, as NodePort on 127.0.0.1 plus whatever `extra_spec` adds; the
/// Service port is the nodePort too, so a LoadBalancer ingress IP serves on
/// the same port.
pub fn service_with(
    name: &str,
    proto: &str,
    node_port: u16,
    target: u16,
    eps: &[(Ipv4Addr, bool, &str)],
    extra_spec: &str,
) -> String {
    let eps: String = eps
        .iter()
        .map(|(a, ready, node)| {
            format!(
                "- addresses: [\"{a}\"]\n  conditions: {{ready: {ready}}}\n  nodeName: {node}\n"
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n{extra_spec}  ports:\n  - name: p\n    protocol: {proto}\n    port: {node_port}\n    targetPort: {target}\n    nodePort: {node_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: p\n  protocol: {proto}\n  port: {target}\nendpoints:{eps}"
    )
}

/// What one request through a frontend got, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// HTTP served: the body's backend name (`backend-<name>`).
    Backend(String),
    /// An echo backend sent the bytes back.
    Echoed,
    /// Refused at connect.
    Refused,
    /// Reset or closed without an answer (a connection that raced a
    /// listener's close, or was refused after the handshake).
    Reset,
    /// The SYN went unanswered for 1 s (a dropping listener).
    Dropped,
    /// Connected, then nothing for 2 s: a listener that accepted and never
    /// relayed. Never acceptable.
    Hung,
}

/// Connects to `addr`, or says how the connect failed.
fn connect_or_answer(addr: SocketAddr) -> Result<TcpStream, Answer> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .unwrap_or_else(|e| panic!("socket: {e}"));
    match s.connect_timeout(&addr.into(), Duration::from_secs(1)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(Answer::Refused),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(Answer::Dropped),
        Err(_) => return Err(Answer::Reset),
    }
    let c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    Ok(c)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One HTTP GET through `addr`, classified.
pub fn ask(addr: SocketAddr) -> Answer {
    let mut c = match connect_or_answer(addr) {
        Ok(c) => c,
        Err(a) => return a,
    };
    if write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").is_err() {
        return Answer::Reset;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if timed_out(&e) => {
                return if got.is_empty() {
                    Answer::Hung
                } else {
                    Answer::Reset
                };
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    match text.split("\r\n\r\n").nth(1) {
        Some(body) if text.starts_with("HTTP/1.1 200") => {
            Answer::Backend(body.trim().trim_start_matches("backend-").to_string())
        }
        _ => Answer::Reset,
    }
}

/// One `ping` through `addr` to an echo backend, classified.
pub fn echo(addr: SocketAddr) -> Answer {
    let mut c = match connect_or_answer(addr) {
        Ok(c) => c,
        Err(a) => return a,
    };
    let _ = c.write_all(b"ping");
    let mut b = [0u8; 4];
    match c.read_exact(&mut b) {
        Ok(()) if &b == b"ping" => Answer::Echoed,
        Err(e) if timed_out(&e) => Answer::Hung,
        _ => Answer::Reset,
    }
}

/// True when running under CI, where every peer must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Finds a program, or explains the skip (and fails under CI, where `.ci/run`
/// installs it).
pub fn need_program(name: &str, why: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    assert!(
        !in_ci(),
        "{name} is missing under CI: .ci/run must install it ({why})"
    );
    eprintln!("SKIP: {name} not installed; {why}. `apt-get install {name}` to run this test.");
    None
}

/// An nginx serving `/` with a body naming it, on `addr`, from a private prefix.
pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(bin: &Path, addr: SocketAddr, name: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display().to_string();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p};\n  proxy_temp_path {p};\n  fastcgi_temp_path {p};\n  uwsgi_temp_path {p};\n  scgi_temp_path {p};\n  server {{\n    listen {addr};\n    location / {{ return 200 \"backend-{name}\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        // Its own process group, so dropping it ends the workers too (they
        // outlive a killed master).
        let child = Command::new(bin)
            .process_group(0)
            .args(["-e", &format!("{p}/error.log"), "-p", &p, "-c"])
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        assert!(
            wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(
                addr
            )
            .is_ok()),
            "nginx did not start on {addr}"
        );
        Nginx { child, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills a child started with `process_group(0)` and everything in its group.
pub fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.wait();
}

/// One kernel socket as `ss` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sock {
    /// `tcp` or `udp`.
    pub proto: String,
    /// `LISTEN`, `UNCONN`, `ESTAB`, `CLOSE-WAIT`, ...
    pub state: String,
    /// Local address:port.
    pub local: String,
    /// Peer address:port (`*` parts when unconnected).
    pub peer: String,
}

/// TCP and UDP sockets of this network namespace that `ss` selects with
/// `filter` (ss's filter syntax, e.g. `sport = :30085`).
pub fn sockets(filter: &str) -> Vec<Sock> {
    ss(&["-t", "-u", "-a"], filter)
}

/// Like [`sockets`], only LISTEN (TCP) and UNCONN (UDP) ones, asked so that
/// the kernel skips TIME-WAIT sockets, which a load leaves by the ten
/// thousand and which make a full listing take 100 ms.
pub fn listening(filter: &str) -> Vec<Sock> {
    // With one `state`, ss drops its state column: put it back.
    let tcp = ss_lines(&["-t", "state", "listening"], filter)
        .into_iter()
        .filter_map(|f| match f.as_slice() {
            [.., local, peer] => Some(Sock {
                proto: "tcp".into(),
                state: "LISTEN".into(),
                local: local.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        });
    // With one protocol, ss drops its netid column.
    let udp = ss_lines(&["-u", "-l"], filter)
        .into_iter()
        .filter_map(|f| match f.as_slice() {
            [state, _, _, local, peer, ..] => Some(Sock {
                proto: "udp".into(),
                state: state.clone(),
                local: local.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        });
    tcp.chain(udp).collect()
}

fn ss(which: &[&str], filter: &str) -> Vec<Sock> {
    ss_lines(which, filter)
        .into_iter()
        .filter_map(|f| match f.as_slice() {
            [proto, state, _, _, local, peer, ..] => Some(Sock {
                proto: proto.clone(),
                state: state.clone(),
                local: local.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// `ss -H -n WHICH FILTER`, each line split into fields.
fn ss_lines(which: &[&str], filter: &str) -> Vec<Vec<String>> {
    let out = Command::new("ss")
        .args(["-H", "-n"])
        .args(which)
        .args(filter.split_whitespace())
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "ss {filter}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Sockets whose local port is `port`.
pub fn sockets_on(port: u16) -> Vec<Sock> {
    sockets(&format!("sport = :{port}"))
}

/// Waits at most `limit` for the sockets on `port` to satisfy `ok` (the
/// contract: a listener change reaches the kernel within that time); the
/// sockets last seen, and whether they did.
pub fn sockets_within(
    limit: Duration,
    port: u16,
    ok: impl Fn(&[Sock]) -> bool,
) -> (bool, Vec<Sock>) {
    let end = Instant::now() + limit;
    loop {
        // A listing shows the sockets as they were when it started (it may
        // take 100 ms among many TIME-WAIT sockets): judge it by that time.
        let started = Instant::now();
        let s = sockets_on(port);
        if ok(&s) || started >= end {
            return (ok(&s), s);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// How many of `socks` are in `state`.
pub fn count(socks: &[Sock], state: &str) -> usize {
    socks.iter().filter(|s| s.state == state).count()
}
