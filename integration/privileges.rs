//! Least privilege, end to end: ringvip started as root (in a network
//! namespace of its own, with its TUN) ends up holding only CAP_NET_ADMIN and
//! CAP_NET_BIND_SERVICE on every thread, with no_new_privs set, and still opens
//! a port-80 listener and serves its ClusterIP afterwards. Needs root (CI runs
//! as root).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use support::netns::{need_root, Namespace, Topology};
use support::*;

/// CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12).
const KEPT_MASK: u64 = (1 << 10) | (1 << 12);

/// The pid of the ringvip process serving manifests from `dir` (`ip netns
/// exec` execs it, so it is the only process naming `dir`).
fn pid_of(dir: &Path) -> u32 {
    let needle = dir.display().to_string();
    let mut found = None;
    let ok = wait_until(Duration::from_secs(5), || {
        found = std::fs::read_dir("/proc").ok().and_then(|rd| {
            rd.flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd);
                let exe = std::fs::read_link(e.path().join("exe")).ok()?;
                (cmd.contains(&needle) && exe.ends_with("ringvip")).then_some(pid)
            })
        });
        found.is_some()
    });
    assert!(ok, "no ringvip process for {needle}");
    found.unwrap()
}

fn field(status: &str, name: &str) -> u64 {
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("{name} missing:\n{status}"))
        .split_whitespace()
        .next()
        .unwrap_or_default();
    if name.starts_with("Cap") {
        u64::from_str_radix(v, 16).unwrap()
    } else {
        v.parse().unwrap()
    }
}

#[test]
fn runs_with_only_net_admin_and_net_bind_service_after_setup() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let _backend = t.backend((t.pod_ip(2), 8080).into(), "priv", Mode::Http);
    // An externalIP on the node's own address, port 80: its listener is opened
    // when the snapshot is published, after the drop, so it needs the kept
    // CAP_NET_BIND_SERVICE. The ClusterIP goes through the TUN.
    let node_ip = t.node_ip();
    let external = format!("  externalIPs: [\"{node_ip}\"]\n");
    let pod = [IpAddr::V4(t.pod_ip(2))];
    let manifest = clusterip("low", "10.96.0.20", 80, "TCP", 8080, &pod, &external);
    let rv = t.launch(&manifest, &[]);
    let log = rv.log();
    let dropped = log
        .find("capabilities dropped after setup")
        .unwrap_or_else(|| panic!("no drop logged:\n{log}"));
    let published = log.find("snapshot published").expect("published");
    assert!(dropped < published, "drop must come before serving:\n{log}");
    assert!(
        log.contains("kept only CAP_NET_ADMIN and CAP_NET_BIND_SERVICE"),
        "{log}"
    );

    let pid = pid_of(rv.path());
    // Every thread: main, control, data-plane workers, the TUN thread.
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that just ended
        };
        let name = status.lines().next().unwrap_or_default().to_string();
        for f in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                field(&status, f),
                KEPT_MASK,
                "{name} {f} {:x}\n{status}",
                field(&status, f)
            );
        }
        assert_eq!(field(&status, "CapInh:"), 0, "{name}");
        assert_eq!(field(&status, "CapAmb:"), 0, "{name}");
        assert_eq!(field(&status, "NoNewPrivs:"), 1, "{name}");
        threads += 1;
    }
    assert!(
        threads >= 4,
        "expected main, control, workers and TUN: {threads}"
    );
    eprintln!(
        "{threads} threads of pid {pid}: CapEff=CapPrm=CapBnd={KEPT_MASK:016x}, NoNewPrivs=1"
    );

    // Still able to do its job with what it kept.
    let low = SocketAddr::from((node_ip, 80));
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    for addr in [low, vip] {
        // The first request once ringvip says it serves.
        let got = Topology::within(&t.node, move || http_get(addr).map_err(|e| e.to_string()));
        assert_eq!(got.as_deref(), Ok("backend-priv"), "{addr}\n{}", rv.log());
    }
}

/// As systemd's unit runs it: an unprivileged user holding CAP_NET_ADMIN and
/// CAP_NET_BIND_SERVICE as ambient capabilities, no CAP_SETPCAP. ringvip must
/// start, keep exactly those two (the bounding set is systemd's business),
/// set no_new_privs, and still bind ports below 1024 afterwards.
#[test]
fn unprivileged_user_with_ambient_capabilities_starts_and_keeps_only_them() {
    if !need_root("to start ringvip as another user with chosen capabilities") {
        return;
    }
    let Some(setpriv) = need_program(
        "setpriv",
        "runs ringvip as nobody with ambient capabilities",
    ) else {
        return;
    };
    let ns = Namespace::new("rvpriv");
    // nobody must be able to read the manifests and write the log.
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n",
    )
    .unwrap();
    let log = dir.path().join("ringvip.log");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_admin,+net_bind_service",
            "--ambient-caps=-all,+net_admin,+net_bind_service",
            "--",
        ])
        .arg(bin())
        .args(["run", "--manifests"])
        .arg(dir.path())
        .args([
            "--no-tun",
            "--no-handover",
            "--workers",
            "1",
            "--node-name",
            "node-a",
            "--nodeport-addresses",
            "127.0.0.1/32",
            // Ports below 1024, bound after the drop.
            "--health-addr",
            "127.0.0.1:81",
            "--metrics-addr",
            "127.0.0.1:82",
        ])
        .env("RINGVIP_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let published = wait_until(Duration::from_secs(20), || {
        read_log().contains("snapshot published")
    });
    let pid = child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let metrics = Topology::within(&ns, || {
        std::net::TcpStream::connect("127.0.0.1:82")
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = read_log();
    assert!(published, "ringvip did not start as nobody:\n{log}");
    assert!(log.contains("bounding set left as given"), "{log}");
    assert_eq!(field(&status, "Uid:"), 65534, "{status}");
    for f in ["CapEff:", "CapPrm:"] {
        assert_eq!(field(&status, f), KEPT_MASK, "{f}\n{status}");
    }
    assert_eq!(field(&status, "CapAmb:"), 0, "{status}");
    assert_eq!(field(&status, "NoNewPrivs:"), 1, "{status}");
    assert_eq!(metrics, Ok(()), "metrics on port 82 after the drop\n{log}");
}
