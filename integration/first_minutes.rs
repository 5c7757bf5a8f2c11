//! A new user's first five minutes: the README's two commands, `ringvip
//! demo` (with its ClusterIP through the TUN when run as root) and `ringvip
//! status` showing only what is served. The real binary throughout; the demo
//! tests that need root create (through the demo) a network namespace and
//! TUN device of their own, and skip with the reason elsewhere.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::netns::{need_root, Topology};
use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The commands of the README's "Two commands" block, in order.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("## Two commands")
        .nth(1)
        .expect("a Two commands section");
    let block = section
        .split("```sh")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// What CI runs as the test command must be the README's, word for word.
#[test]
fn ci_runs_exactly_the_readme_test_command() {
    let cmds = readme_commands();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert_eq!(cmds[0], "cargo run --release -- demo");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert_eq!(last, cmds[1], ".ci/run ends with the README's test command");
}

/// A stand-in `cargo` for a fresh machine: `nextest` is an unknown command
/// until `cargo install --locked cargo-nextest` ran. Every call is logged.
fn fake_cargo(dir: &Path) {
    let script = r#"#!/bin/sh
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  nextest)
    [ -f "$FAKE_DIR/installed" ] || { echo "error: no such command: \`nextest\`" >&2; exit 101; }
    exit 0 ;;
  install)
    [ "$*" = "install --locked cargo-nextest" ] && touch "$FAKE_DIR/installed" && exit 0
    exit 1 ;;
esac
exit 1
"#;
    let path = dir.join("cargo");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// On a fresh machine (rustup's toolchain: no cargo-nextest), the README's
/// test command as written installs what it uses, then runs the suite; once
/// installed, it only runs it.
#[test]
fn readme_test_command_works_without_cargo_nextest() {
    let test_cmd = readme_commands().pop().unwrap();
    let fake = tempfile::tempdir().unwrap();
    fake_cargo(fake.path());
    let run = || {
        Command::new("sh")
            .arg("-c")
            .arg(&test_cmd)
            .current_dir(repo())
            .env("PATH", format!("{}:/usr/bin:/bin", fake.path().display()))
            .env("FAKE_DIR", fake.path())
            .output()
            .unwrap()
    };
    let calls = || std::fs::read_to_string(fake.path().join("calls")).unwrap_or_default();
    let out = run();
    assert!(
        out.status.success(),
        "`{test_cmd}` on a machine without cargo-nextest: {}\ncargo calls:\n{}",
        String::from_utf8_lossy(&out.stderr),
        calls()
    );
    let log: Vec<String> = calls().lines().map(String::from).collect();
    assert!(
        log.contains(&"install --locked cargo-nextest".to_string()),
        "{log:?}"
    );
    assert_eq!(
        log.last().map(String::as_str),
        Some("nextest run --no-fail-fast"),
        "{log:?}"
    );

    std::fs::remove_file(fake.path().join("calls")).unwrap();
    assert!(run().status.success());
    assert!(
        !calls().contains("install"),
        "installed twice:\n{}",
        calls()
    );
}

/// `backend-1 ×N, backend-2 ×N, backend-3 ×N` on the line containing `what`.
fn tally(text: &str, what: &str) -> Vec<u32> {
    let line = text
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line with {what:?} in\n{text}"));
    line.split('×')
        .skip(1)
        .map(|n| n.split(',').next().unwrap().trim().parse().unwrap())
        .collect()
}

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// As root, the demo also answers its ClusterIP through the TUN, from a
/// network namespace of its own that is gone once the demo exits.
#[test]
fn demo_as_root_answers_a_cluster_ip_through_the_tun() {
    if !need_root("for the demo's network namespace and TUN device") {
        return;
    }
    // Demos started at once race for the demo's ports (it finds 10256 and
    // 10249 free, then binds them): one demo at a time, across binaries.
    let _demo = exclusive("demo");
    let child = Command::new(bin())
        .args(["demo", "--once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns = format!("ringvip-demo-{pid}");
    let counts = tally(&text, "through the TUN");
    assert_eq!(counts.len(), 3, "{text}");
    assert_eq!(counts.iter().sum::<u32>(), 30, "{text}");
    assert!(counts.iter().all(|&n| n > 0), "{text}");
    assert!(text.contains(&format!("from namespace {ns}")), "{text}");
    assert!(
        text.contains(&format!("ip netns exec {ns} curl http://10.96.0.80/")),
        "{text}"
    );
    assert!(!netns_exists(&ns), "namespace {ns} left behind");
}

/// Ctrl-C (SIGINT) and SIGTERM both stop the demo with its namespace removed.
#[test]
fn demo_removes_its_namespace_on_ctrl_c_and_sigterm() {
    if !need_root("for the demo's network namespace and TUN device") {
        return;
    }
    // Demos started at once race for the demo's ports (it finds 10256 and
    // 10249 free, then binds them): one demo at a time, across binaries.
    let _demo = exclusive("demo");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = Command::new(bin())
            .arg("demo")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let ns = format!("ringvip-demo-{pid}");
        // Wait (a precondition) for the demo to be serving: it says so.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Ctrl-C to stop") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the demo never said it was serving");
        assert!(netns_exists(&ns), "namespace {ns} while the demo runs");
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
        let exited = wait_until(Duration::from_secs(15), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
            panic!("signal {sig}: the demo did not exit");
        }
        assert!(
            !netns_exists(&ns),
            "signal {sig}: namespace {ns} left behind"
        );
    }
}

/// Without root the demo shows the NodePorts and says why not the ClusterIP.
#[test]
fn demo_without_root_says_why_it_shows_only_nodeports() {
    // Demos started at once race for the demo's ports (it finds 10256 and
    // 10249 free, then binds them): one demo at a time, across binaries.
    let _demo = exclusive("demo");
    let mut cmd = if support::netns::is_root() {
        // Root drops to nobody, as a user without root runs it.
        let Some(setpriv) = need_program("setpriv", "runs the demo as nobody") else {
            return;
        };
        let mut c = Command::new(setpriv);
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin());
        c
    } else {
        Command::new(bin())
    };
    let out = cmd.args(["demo", "--once"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("random NodePort"), "{text}");
    assert!(
        text.contains("ClusterIP part not shown: it needs root (to create a network namespace and a TUN device in it)"),
        "{text}"
    );
    assert!(!text.contains("through the TUN,"), "{text}");
}

/// A NodePort Service with a ClusterIP, one backend.
fn nodeport_with_cluster_ip(node_port: u16, target: u16, ep: std::net::Ipv4Addr) -> String {
    nodeport_service("web", node_port, target, &[ep], "  clusterIP: 10.96.0.10\n")
}

/// `ringvip status -o json` against `metrics`, run by `cmd` (a netns
/// wrapper or nothing): the rows' (kind, address).
fn status_rows(prefix: &[&str], metrics: std::net::SocketAddr) -> Vec<(String, String)> {
    let metrics = metrics.to_string();
    let out = command_ok_in(prefix, &["status", "-o", "json", "--admin", &metrics]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Without a TUN nothing serves a ClusterIP: status lists the NodePort only.
#[test]
fn status_without_a_tun_shows_no_cluster_ip_rows() {
    let (net, port, _b) = backends(1, Mode::Http);
    let node_port = free_port();
    let rv = Ringvip::start(&nodeport_with_cluster_ip(node_port, port, net.ip(1)), &[]);
    let rows = status_rows(&[], rv.metrics);
    assert_eq!(
        rows,
        vec![("NodePort".to_string(), format!("127.0.0.1:{node_port}"))]
    );
}

/// With its TUN, the ClusterIP is served and listed.
#[test]
fn status_with_a_tun_shows_the_cluster_ip_row() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let _b = t.backend((t.pod_ip(2), 8080).into(), "1", Mode::Http);
    let rv = t.launch(&nodeport_with_cluster_ip(30080, 8080, t.pod_ip(2)), &[]);
    let rows = status_rows(&["ip", "netns", "exec", &t.node], rv.metrics);
    assert!(
        rows.contains(&("ClusterIP".to_string(), "10.96.0.10:80".to_string())),
        "{rows:?}"
    );
}
