//! Drives the fixture Kubernetes API server (`kube_fixture.py`, a real HTTP
//! server process) and starts ringvip against it with `--kube`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::{json, Value};

use super::{bin, in_ci, Ringvip};

/// The fixture API server process.
pub struct ApiServer {
    child: Child,
    /// Held open: the fixture exits when it closes.
    _stdin: ChildStdin,
    /// Where the kubeconfig is.
    pub dir: tempfile::TempDir,
    /// The API port (plain HTTP on 127.0.0.1).
    pub api: SocketAddr,
    /// The control port.
    pub control: SocketAddr,
    /// A kubeconfig pointing at `api`.
    pub kubeconfig: PathBuf,
}

/// Path of the fixture script.
pub fn fixture_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("integration/support/kube_fixture.py")
}

/// python3, or a clear skip (a failure under CI, where `.ci/run` installs it).
pub fn python3() -> Option<PathBuf> {
    super::need_program(
        "python3",
        "the fixture Kubernetes API server is a python3 script",
    )
    .or_else(|| {
        // pyenv and friends put it elsewhere on developer machines.
        let ok = Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok || !in_ci(), "python3 is missing under CI");
        ok.then(|| PathBuf::from("python3"))
    })
}

impl ApiServer {
    /// Starts the fixture with `preload` (a `/batch` body) already applied.
    pub fn start(preload: Value) -> Option<ApiServer> {
        let py = python3()?;
        let dir = tempfile::tempdir().unwrap();
        let load = dir.path().join("preload.json");
        std::fs::write(&load, preload.to_string()).unwrap();
        let mut child = Command::new(py)
            .arg(fixture_script())
            .arg("--dir")
            .arg(dir.path())
            .arg("--load")
            .arg(&load)
            .args(["--bookmark-interval", "0.5", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the fixture API server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: Value = serde_json::from_str(&line).expect("fixture start-up line");
        let port =
            |k: &str| SocketAddr::from((Ipv4Addr::LOCALHOST, info[k].as_u64().unwrap() as u16));
        Some(ApiServer {
            _stdin: child.stdin.take().unwrap(),
            child,
            api: port("api"),
            control: port("control"),
            kubeconfig: PathBuf::from(info["kubeconfig"].as_str().unwrap()),
            dir,
        })
    }

    /// POSTs a control command; panics unless it answers 200.
    pub fn post(&self, path: &str, body: Value) -> Value {
        let body = body.to_string();
        let mut c = TcpStream::connect(self.control).unwrap();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(
            s.starts_with("HTTP/1.1 200") || s.starts_with("HTTP/1.0 200"),
            "{path}: {s}"
        );
        serde_json::from_str(s.split("\r\n\r\n").nth(1).unwrap_or("null")).unwrap_or(Value::Null)
    }

    /// Creates or replaces objects: `[(resource, object)]`.
    pub fn apply(&self, objects: &[(&str, Value)]) {
        let ops: Vec<Value> = objects
            .iter()
            .map(|(r, o)| json!({"op": "apply", "resource": r, "object": o}))
            .collect();
        self.post("/batch", Value::Array(ops));
    }

    /// Deletes one object.
    pub fn delete(&self, resource: &str, name: &str) {
        self.post(
            "/delete",
            json!({"resource": resource, "namespace": if resource == "nodes" { "" } else { "default" }, "name": name}),
        );
    }

    /// The fixture's counters (`lists`, `watch_requests`, `watches`, `rv`, …).
    pub fn stats(&self) -> Value {
        let mut c = TcpStream::connect(self.control).unwrap();
        write!(
            c,
            "GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        serde_json::from_str(s.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    /// GETs `path_and_query` from the API port: the status code and the
    /// JSON body.
    pub fn get(&self, path_and_query: &str) -> (u16, Value) {
        let mut c = TcpStream::connect(self.api).unwrap();
        write!(
            c,
            "GET {path_and_query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        let code = s.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = s.split("\r\n\r\n").nth(1).unwrap_or("null");
        (code, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// One counter of [`ApiServer::stats`].
    pub fn stat(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A batch op applying `object` to `resource`.
pub fn op(resource: &str, object: Value) -> Value {
    json!({"op": "apply", "resource": resource, "object": object})
}

/// A NodePort Service in `default`, one TCP port named `p` (port 80).
pub fn service(name: &str, node_port: u16, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"type": "NodePort", "ports": [{"name": "p", "protocol": "TCP", "port": 80, "nodePort": node_port}]}
    })
}

/// An EndpointSlice of Service `service` with ready endpoints `ips` on `port`.
pub fn slice(name: &str, service: &str, port: u16, ips: &[Ipv4Addr]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": "node-a"}))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "protocol": "TCP", "port": port}],
        "endpoints": eps
    })
}

/// This node.
pub fn node(labels: Value, deleting: bool) -> Value {
    let mut n = json!({"metadata": {"name": "node-a", "labels": labels}});
    if deleting {
        n["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    n
}

impl Ringvip {
    /// Starts `ringvip run --kube` against `api` (NodePorts on 127.0.0.1, no
    /// TUN, node `node-a`); returns once it is watching, not once it serves.
    pub fn start_kube(api: &ApiServer, extra: &[&str]) -> Ringvip {
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--kube", "--kubeconfig"])
            .arg(&api.kubeconfig)
            .arg("--no-tun");
        let dir = tempfile::tempdir().unwrap();
        Ringvip::spawn(cmd, dir, extra, "watching the Kubernetes API")
    }
}
