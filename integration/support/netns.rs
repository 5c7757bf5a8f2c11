//! Network namespaces the tests create themselves: a "node" namespace where
//! ringvip runs with its TUN, and a "pod" namespace holding the backends,
//! joined by a veth pair. Service CIDRs are only ever routed inside the node
//! namespace, into ringvip's own TUN. Everything is removed on drop.
//!
//! Every namespace test starts with [`Topology::setup`], which skips (with
//! the reason) where this process may not create namespaces and a TUN, and
//! fails under CI, which runs as root.
//!
//! Names come from [`unique_name`] (pid and counter), so parallel tests and
//! parallel runs never clash. The veth subnet needs no allocation: its
//! addresses exist only inside the two namespaces of one topology, which no
//! other test sees, so every topology uses the same [`NET`].

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::addrs::unique_name;
use super::{clusterip, in_ci, need_programs, Backend, Mode, Ringvip, UdpBackend};

/// The veth subnet: 10.<NET>.0.0/24 (and an IPv6 /64), clear of the
/// service CIDR 10.96.0.0/12 and the spoofed flood sources 10.77.0.0/16.
pub const NET: u8 = 200;

/// True when this process may create namespaces and TUN devices.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a test needing root can run; explains the skip otherwise (`what`
/// root is needed for), and fails under CI, which runs as root.
pub fn need_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(!in_ci(), "CI runs as root ({what})");
    eprintln!("SKIP: needs root {what}");
    false
}

/// Whether a namespace test can run; explains the skip otherwise (and fails
/// under CI, which runs as root with /dev/net/tun).
pub fn can_run() -> bool {
    let why = "to create network namespaces and a TUN device";
    if !need_root(why) {
        return false;
    }
    if Path::new("/dev/net/tun").exists() {
        return true;
    }
    assert!(!in_ci(), "CI must provide /dev/net/tun ({why})");
    eprintln!("SKIP: needs /dev/net/tun {why}");
    false
}

/// Runs `ip ARGS`; panics with its error output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test, its loopback up; deleted on drop (with
/// every device in it). Derefs to its name.
#[derive(Debug)]
pub struct Namespace(String);

impl Namespace {
    /// Creates `<prefix><pid>-<k>` (see [`unique_name`]).
    pub fn new(prefix: &str) -> Namespace {
        Namespace::named(unique_name(prefix))
    }

    fn named(name: String) -> Namespace {
        ip(&["netns", "add", &name]);
        let ns = Namespace(name);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }
}

impl std::ops::Deref for Namespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// node ⇄ pod, IPv4 10.<NET>.0.1 ⇄ 10.<NET>.0.2 (+ extra pod IPs) and IPv6
/// fd00:<NET>::1 ⇄ fd00:<NET>::2 (the second group of the IPv6
/// addresses is NET, which IPv6 prints in hex).
pub struct Topology {
    pub node: Namespace,
    pub pod: Namespace,
}

impl Topology {
    /// The setup of every namespace test: both namespaces and the veth pair,
    /// `pod_hosts` extra host numbers with addresses 10.<NET>.0.<h> on the
    /// pod side; `None` (the test skips, see [`can_run`]) where they cannot
    /// be made.
    pub fn setup(pod_hosts: &[u8]) -> Option<Topology> {
        Topology::setup_with(pod_hosts, []).map(|(t, [])| t)
    }

    /// [`Topology::setup`] for a test that also needs `programs` (name,
    /// what for; see [`need_programs`]): the topology and their paths.
    pub fn setup_with<const N: usize>(
        pod_hosts: &[u8],
        programs: [(&str, &str); N],
    ) -> Option<(Topology, [PathBuf; N])> {
        if !can_run() {
            return None;
        }
        let found = need_programs(programs)?;
        Some((Topology::new(pod_hosts), found))
    }

    fn new(pod_hosts: &[u8]) -> Topology {
        // One tag names all four: device names must fit 15 bytes.
        let tag = unique_name("");
        let t = Topology {
            node: Namespace::named(format!("rvn{tag}")),
            pod: Namespace::named(format!("rvp{tag}")),
        };
        let (vn, vp) = (format!("rv{tag}n"), format!("rv{tag}p"));
        ip(&[
            "link", "add", &vn, "netns", &t.node, "type", "veth", "peer", "name", &vp, "netns",
            &t.pod,
        ]);
        let sides = [
            (&t.node, &vn, t.node_ip(), t.node_ip6()),
            (&t.pod, &vp, t.pod_ip(2), t.pod_ip6()),
        ];
        for (ns, dev, v4, v6) in sides {
            let (v4, v6) = (format!("{v4}/24"), format!("{v6}/64"));
            ip(&["-n", ns, "addr", "add", &v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", &v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for h in pod_hosts {
            let v4 = format!("{}/32", t.pod_ip(*h));
            ip(&["-n", &t.pod, "addr", "add", &v4, "dev", &vp]);
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

    /// Runs `f` on a thread inside the node namespace.
    pub fn on_node_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        Topology::within(&self.node, f)
    }

    /// Runs `f` on a thread inside the pod namespace.
    pub fn on_pod_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        Topology::within(&self.pod, f)
    }

    /// Runs a program inside the node namespace.
    pub fn on_node(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.node, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// `curl -sS --max-time 5 URL` in the node namespace: whether it
    /// succeeded, and what it printed (trimmed).
    pub fn curl(&self, url: &str) -> (bool, String) {
        let out = self.on_node("curl", &["-sS", "--max-time", "5", url]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// Starts ringvip in the node namespace with its TUN (see [`Ringvip::launch`]).
    pub fn launch(&self, manifest: &str, extra: &[&str]) -> Ringvip {
        Ringvip::launch(Some(&self.node), manifest, extra)
    }

    /// A TCP backend on `addr` in the pod namespace.
    pub fn backend(&self, addr: SocketAddr, name: &str, mode: Mode) -> Backend {
        let name = name.to_string();
        self.on_pod_thread(move || Backend::start(addr, &name, mode))
    }

    /// A UDP echo backend on `addr` in the pod namespace.
    pub fn udp_backend(&self, addr: SocketAddr, name: &str) -> UdpBackend {
        let name = name.to_string();
        self.on_pod_thread(move || UdpBackend::start(addr, &name))
    }

    /// A ClusterIP Service `name` at `vip`:`port` whose one endpoint is pod
    /// address .2, port `target`.
    pub fn pod_service(
        &self,
        name: &str,
        vip: &str,
        port: u16,
        proto: &str,
        target: u16,
    ) -> String {
        let pod = [IpAddr::V4(self.pod_ip(2))];
        clusterip(name, vip, port, proto, target, &pod, "")
    }

    /// Starts a program inside the pod namespace; it is killed when the
    /// returned guard drops.
    pub fn spawn_on_pod(&self, program: &Path, args: &[&str]) -> Spawned {
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
    pub fn spawn_dnsmasq(&self, dnsmasq: &Path, port: u16, addresses: &[String]) -> Spawned {
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

    /// Writes the node namespace's resolv.conf, which `ip netns exec` mounts
    /// over /etc/resolv.conf for the programs it runs there; removed when
    /// the guard drops.
    pub fn resolv_conf(&self, text: &str) -> ResolvConf {
        let dir = PathBuf::from("/etc/netns").join(&*self.node);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = ResolvConf(dir);
        std::fs::write(conf.0.join("resolv.conf"), text).unwrap();
        conf
    }

    /// A pod address, 10.<NET>.0.<host>.
    pub fn pod_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, NET, 0, host)
    }

    /// The node's veth address, 10.<NET>.0.1.
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, NET, 0, 1)
    }

    /// The pod's IPv6 veth address, fd00:<NET>::2.
    pub fn pod_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(NET), 0, 0, 0, 0, 0, 2)
    }

    /// The node's IPv6 veth address, fd00:<NET>::1.
    pub fn node_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(NET), 0, 0, 0, 0, 0, 1)
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

/// `/etc/netns/<ns>/`, holding a namespace's resolv.conf; removed on drop.
pub struct ResolvConf(PathBuf);

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
