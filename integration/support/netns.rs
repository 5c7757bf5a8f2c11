//! Network namespaces the tests create themselves: a "node" namespace where
//! ringvip runs with its TUN, and a "pod" namespace holding the backends,
//! joined by a veth pair. Service CIDRs are only ever routed inside the node
//! namespace, into ringvip's own TUN. Everything is removed on drop.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// True when this process may create namespaces and TUN devices.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a namespace test can run; explains the skip otherwise (and fails
/// under CI, which runs as root).
pub fn can_run() -> bool {
    if is_root() && std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    assert!(
        !super::in_ci(),
        "CI must run the namespace tests as root with /dev/net/tun"
    );
    eprintln!("SKIP: needs root and /dev/net/tun to create network namespaces and a TUN device");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ClusterIP Service with one port (TCP or UDP) and its slice.
pub fn clusterip(
    name: &str,
    vip: &str,
    port: u16,
    proto: &str,
    target: u16,
    eps: &[IpAddr],
    extra: &str,
) -> String {
    let family = if vip.contains(':') { "IPv6" } else { "IPv4" };
    let eps = super::endpoints_yaml(eps, "");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: \"{vip}\"\n{extra}  ports: [{{name: p, port: {port}, protocol: {proto}, targetPort: {target}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nports: [{{name: p, port: {target}, protocol: {proto}}}]\nendpoints: {eps}"
    )
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// node ⇄ pod, IPv4 10.<n>.0.1 ⇄ 10.<n>.0.2 (+ extra pod IPs) and IPv6
/// fd00:<n>::1 ⇄ fd00:<n>::2.
pub struct Topology {
    pub node: String,
    pub pod: String,
    pub net: u8,
}

impl Topology {
    /// Creates both namespaces and the veth pair; `pod_hosts` extra host
    /// numbers get addresses 10.<n>.0.<h> on the pod side.
    pub fn new(pod_hosts: &[u8]) -> Topology {
        let id = std::process::id() % 100_000;
        let seq = NEXT.fetch_add(1, Ordering::SeqCst);
        let net = 200 + (seq as u8 % 50);
        let node = format!("rvn{id}-{seq}");
        let pod = format!("rvp{id}-{seq}");
        let (vn, vp) = (format!("rv{id}{seq}n"), format!("rv{id}{seq}p"));
        ip(&["netns", "add", &node]);
        let t = Topology {
            node: node.clone(),
            pod: pod.clone(),
            net,
        };
        ip(&["netns", "add", &pod]);
        ip(&[
            "link", "add", &vn, "netns", &node, "type", "veth", "peer", "name", &vp, "netns", &pod,
        ]);
        for (ns, dev, host) in [(&node, &vn, 1u8), (&pod, &vp, 2u8)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.{net}.0.{host}/24"),
                "dev",
                dev,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("fd00:{net}::{host}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for h in pod_hosts {
            ip(&[
                "-n",
                &pod,
                "addr",
                "add",
                &format!("10.{net}.0.{h}/32"),
                "dev",
                &vp,
            ]);
        }
        t
    }

    /// Runs `f` on a thread inside namespace `ns`; sockets it creates stay there.
    pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// Runs a program inside the node namespace.
    pub fn on_node(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.node, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Starts a program inside the pod namespace; it is killed when the
    /// returned guard drops.
    pub fn spawn_on_pod(&self, program: &std::path::Path, args: &[&str]) -> Spawned {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pod])
            .arg(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ip netns exec");
        Spawned(child)
    }

    /// Starts dnsmasq in the pod namespace on pod address .2, `port`,
    /// answering from `addresses` only (`--address=/<domain>/<ip>` values,
    /// no upstream, no hosts file); killed when the guard drops.
    pub fn spawn_dnsmasq(
        &self,
        dnsmasq: &std::path::Path,
        port: u16,
        addresses: &[String],
    ) -> Spawned {
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--port={port}"),
            format!("--listen-address={}", self.pod_ip(2)),
            // With no value: no pid file.
            "--pid-file".into(),
        ];
        args.extend(addresses.iter().map(|a| format!("--address={a}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_on_pod(dnsmasq, &args)
    }

    /// A pod address.
    pub fn pod_ip(&self, host: u8) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, self.net, 0, host)
    }
}

/// A process started by a test; killed on drop.
pub struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting the namespaces removes the veth pair (and any TUN in them).
        for ns in [&self.node, &self.pod] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
