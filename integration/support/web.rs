//! Real HTTP backends (nginx) and real HTTP load (wrk), for the suites
//! that put a ringvip under load (fault, handover).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use super::{free_port, http_get, kill_group, need_program, wait_until, Loopback};

/// An nginx backend with room for many connections. Its listening socket is
/// made here and handed over (nginx's `NGINX` inherited-sockets variable), so
/// the test keeps a handle on it for [`Web::drain_and_quit`].
pub struct Web {
    child: Child,
    listener: socket2::Socket,
    _dir: tempfile::TempDir,
}

impl Web {
    pub fn start(bin: &Path, addr: SocketAddr, name: &str) -> Web {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display().to_string();
        let conf = format!(
            "daemon off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {p};\n  proxy_temp_path {p};\n  fastcgi_temp_path {p};\n  uwsgi_temp_path {p};\n  scgi_temp_path {p};\n  server {{\n    listen {addr} backlog=4096;\n    location / {{ return 200 \"backend-{name}\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.set_reuse_address(true).unwrap();
        listener.bind(&addr.into()).unwrap();
        listener.listen(4096).unwrap();
        // nginx must inherit it: clear close-on-exec.
        listener.set_cloexec(false).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        // Its own process group: dropping it ends the worker too.
        let child = Command::new(bin)
            .process_group(0)
            .args(["-e", &format!("{p}/error.log"), "-p", &p, "-c"])
            .arg(dir.path().join("nginx.conf"))
            .env("NGINX", format!("{fd};"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        listener.set_cloexec(true).unwrap();
        // A precondition on the backend (nginx starts asynchronously).
        assert!(
            wait_until(Duration::from_secs(5), || http_get(addr).is_ok()),
            "nginx did not serve on {addr}"
        );
        Web {
            child,
            listener,
            _dir: dir,
        }
    }

    /// Stops like a drained pod: the listening socket first stops taking
    /// SYNs (a drop-all socket filter), the connections already queued or
    /// accepted finish, then nginx stops gracefully (SIGQUIT). A plain SIGQUIT
    /// resets connections still in the accept queue and closes accepted ones
    /// whose request has not arrived yet: those reach a client through any L4
    /// proxy, which cannot replay them.
    pub fn drain_and_quit(&mut self) {
        self.listener
            .attach_filter(&[socket2::SockFilter::new(0x06, 0, 0, 0)])
            .expect("attach a drop-all filter");
        thread::sleep(Duration::from_millis(300));
        self.quit();
    }

    /// Graceful stop: nginx closes its listener, finishes what it has, exits.
    pub fn quit(&mut self) {
        // SAFETY: signals only our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGQUIT);
        }
        let child = &mut self.child;
        assert!(
            wait_until(Duration::from_secs(5), || matches!(
                child.try_wait(),
                Ok(Some(_))
            )),
            "nginx did not stop"
        );
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// What wrk reported.
#[derive(Debug)]
pub struct WrkResult {
    pub requests: u64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    pub per_sec: f64,
    pub text: String,
}

impl WrkResult {
    pub fn errors(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }
}

/// A wrk run in the background (in namespace `netns` when given).
pub struct Wrk(Child);

impl Wrk {
    pub fn start(netns: Option<&str>, url: &str, secs: u32, conns: u32, close: bool) -> Wrk {
        let wrk = need_program("wrk", "HTTP load for the fault suite").expect("checked by caller");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(wrk);
                c
            }
            None => Command::new(wrk),
        };
        let threads = conns.min(2).to_string();
        cmd.args(["-t", &threads, "-c", &conns.to_string(), "-d"])
            .arg(format!("{secs}s"))
            .args(["--timeout", "3s"]);
        if close {
            cmd.args(["-H", "Connection: close"]);
        }
        let child = cmd
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wrk");
        Wrk(child)
    }

    /// Ends the run early (wrk prints its figures on SIGINT).
    pub fn interrupt(self) -> WrkResult {
        // SAFETY: signals only our own child.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGINT);
        }
        self.finish()
    }

    pub fn finish(self) -> WrkResult {
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "wrk failed: {text}");
        let num = |s: &str| -> u64 { s.trim().trim_end_matches(',').parse().unwrap_or(0) };
        let mut r = WrkResult {
            requests: 0,
            socket_errors: 0,
            non_2xx: 0,
            per_sec: 0.0,
            text: text.clone(),
        };
        for l in text.lines() {
            let l = l.trim();
            if l.contains(" requests in ") {
                r.requests = num(l.split_whitespace().next().unwrap_or("0"));
            } else if let Some(rest) = l.strip_prefix("Socket errors:") {
                // "connect 0, read 0, write 0, timeout 0"
                let w: Vec<&str> = rest.split_whitespace().collect();
                r.socket_errors = w.chunks(2).map(|p| num(p.get(1).unwrap_or(&"0"))).sum();
            } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = num(rest);
            } else if let Some(rest) = l.strip_prefix("Requests/sec:") {
                r.per_sec = rest.trim().parse().unwrap_or(0.0);
            }
        }
        assert!(r.requests > 0, "wrk made no requests: {text}");
        r
    }
}

/// `n` nginx, named "1" to "n", on hosts .1 to .n of `net`, same port.
pub fn nginxes(bin: &Path, net: Loopback, n: u8) -> (u16, Vec<Web>) {
    let port = free_port();
    let webs = (1..=n)
        .map(|i| Web::start(bin, net.addr(i, port), &i.to_string()))
        .collect();
    (port, webs)
}
