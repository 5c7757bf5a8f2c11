//! Test backends: TCP (HTTP, echo, stream, reset), UDP echo, nginx.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{free_port, wait_until, Loopback};

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

/// `n` backends of `mode`, named "1" to "n", on hosts .1 to .n of a
/// loopback block of their own, all on one free port: (the block, the port,
/// the backends).
pub fn backends(n: u8, mode: Mode) -> (Loopback, u16, Vec<Backend>) {
    let net = Loopback::take();
    let port = free_port();
    let b = (1..=n)
        .map(|i| Backend::start(net.addr(i, port), &i.to_string(), mode))
        .collect();
    (net, port, b)
}

/// `n` UDP echo backends, named "u1" to "u<n>", on hosts .1 to .n of a
/// loopback block of their own, all on one free port: (the block, the port,
/// the backends).
pub fn udp_backends(n: u8) -> (Loopback, u16, Vec<UdpBackend>) {
    let net = Loopback::take();
    let port = free_port();
    let b = (1..=n)
        .map(|i| UdpBackend::start(net.addr(i, port), &format!("u{i}")))
        .collect();
    (net, port, b)
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

/// An nginx serving `/` with a body naming it, on `addr`, from a private prefix.
pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(bin: &Path, addr: SocketAddr, name: &str) -> Nginx {
        let server =
            format!("listen {addr};\n    location / {{ return 200 \"backend-{name}\\n\"; }}");
        Nginx::with_server(bin, addr, &server)
    }

    /// An nginx listening on `addr` with `server` as its only server block's
    /// body (its own `listen` line included).
    pub fn with_server(bin: &Path, addr: SocketAddr, server: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display().to_string();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p};\n  proxy_temp_path {p};\n  fastcgi_temp_path {p};\n  uwsgi_temp_path {p};\n  scgi_temp_path {p};\n  server {{\n    {server}\n  }}\n}}\n"
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
