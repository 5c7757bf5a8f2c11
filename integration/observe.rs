//! What operators look at: per-endpoint metrics and per-frontend status
//! counters, the access log, and the log format. The real binary on loopback
//! addresses each test takes for itself (no root needed).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

/// The labels of endpoint `ep` of Service `svc`'s port `p`/TCP.
fn ep_labels(svc: &str, ep: SocketAddr) -> Vec<String> {
    vec![
        format!("service=\"{svc}\""),
        "port=\"p\"".to_string(),
        format!("endpoint=\"{ep}\""),
    ]
}

/// One sample of endpoint `ep`: `name` with its labels and `extra`.
fn ep_value(text: &str, name: &str, svc: &str, ep: SocketAddr, extra: &[&str]) -> Option<f64> {
    let mut labels = ep_labels(svc, ep);
    labels.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
    // A sample line of exactly this family (not a longer name it prefixes).
    let lines: String = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| format!("{l}\n"))
        .collect();
    metric(&lines, name, &refs)
}

/// Echoes `payload` through a fresh connection to `addr`, then closes with
/// FIN and waits for the other side's FIN.
fn echo_once(addr: SocketAddr, payload: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, payload);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    c
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Two endpoints, one refusing: each endpoint's series say exactly what went
/// to it; the status rows of the port's two frontends count only their own
/// traffic; and an endpoint that leaves has no series on the first scrape
/// after the snapshot without it is published.
#[test]
fn per_endpoint_series_and_per_frontend_rows_count_exactly() {
    let net = Loopback::take();
    let port = free_port();
    let good = net.addr(1, port);
    let _echo = Backend::start(good, "good", Mode::Echo);
    let refusing = net.addr(2, port); // nothing listens there
    let node_port = free_port();
    // A LoadBalancer: its nodePort on 127.0.0.1 and its ingress IP (local:
    // all of 127.0.0.0/8 is) on the same port, two frontends of one port.
    let external: Ipv4Addr = net.ip(3);
    let manifest = |eps: &[Ipv4Addr]| {
        let eps: Vec<(Ipv4Addr, bool, &str)> = eps.iter().map(|ip| (*ip, true, "node-a")).collect();
        service_with("obs", "TCP", node_port, port, &eps, "")
            .replace("type: NodePort", "type: LoadBalancer")
            .replacen(
                "\n---\n",
                &format!(
                    "\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: \"{external}\"\n---\n"
                ),
                1,
            )
    };
    let started = unix_now();
    // Phase 1: the refusing endpoint alone. One client: every one of the 4
    // connect tries fails (refused), and the client is reset.
    let rv = Ringvip::start(&manifest(&[net.ip(2)]), &["--connect-attempts", "4"]);
    let mut c = TcpStream::connect(np(node_port)).unwrap_or_else(|e| panic!("{e}: {}", rv.log()));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert!(
        matches!(c.read(&mut buf), Ok(0) | Err(_)),
        "no backend: the client is closed"
    );

    // Phase 2: both endpoints. The refusing one is backed off for 8 s after
    // its 4th failure, so every new connection goes to the good one.
    rv.apply(&manifest(&[net.ip(1), net.ip(2)]));
    const N: usize = 5;
    for _ in 0..N {
        echo_once(np(node_port), b"hello");
    }
    // Precondition, not the answer: each relay ends just after its client
    // saw the FIN; wait until none is open.
    let g = ep_labels("obs", good);
    let g: Vec<&str> = g.iter().map(String::as_str).collect();
    assert!(
        wait_until(Duration::from_secs(5), || {
            rv.metric("ringvip_endpoint_connections_active{", &g) == Some(0.0)
        }),
        "relays still open:\n{}",
        rv.metrics_text()
    );
    let text = rv.metrics_text();
    let v = |name: &str, ep: SocketAddr, extra: &[&str]| ep_value(&text, name, "obs", ep, extra);
    let n = N as f64;
    for (ep, total, bytes, refused, healthy) in
        [(good, n, 5.0 * n, 0.0, 1.0), (refusing, 0.0, 0.0, 4.0, 0.0)]
    {
        assert_eq!(
            v("ringvip_endpoint_connections_total", ep, &[]),
            Some(total),
            "{ep}\n{text}"
        );
        assert_eq!(
            v("ringvip_endpoint_connections_active", ep, &[]),
            Some(0.0),
            "{ep}"
        );
        for dir in ["to_backend", "to_client"] {
            let d = format!("direction=\"{dir}\"");
            assert_eq!(
                v("ringvip_endpoint_bytes_total", ep, &[&d]),
                Some(bytes),
                "{ep} {dir}"
            );
        }
        for reason in [
            "timeout",
            "refused",
            "unreachable",
            "no_endpoints",
            "source_range",
            "other",
        ] {
            let r = format!("reason=\"{reason}\"");
            let want = if reason == "refused" { refused } else { 0.0 };
            assert_eq!(
                v("ringvip_endpoint_connect_failures_total", ep, &[&r]),
                Some(want),
                "{ep} {reason}"
            );
        }
        assert_eq!(
            v("ringvip_endpoint_healthy", ep, &[]),
            Some(healthy),
            "{ep}"
        );
        let changed = v(
            "ringvip_endpoint_health_last_change_timestamp_seconds",
            ep,
            &[],
        )
        .unwrap();
        assert!(
            (started - 1.0..=unix_now() + 1.0).contains(&changed),
            "{ep}: {changed}"
        );
    }

    // Status: the NodePort row carried everything, the LoadBalancer row nothing.
    let json = command_ok(&["status", "--admin", &rv.metrics.to_string(), "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let row = |addr: String| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == addr.as_str() && r["service"] == "obs")
            .unwrap_or_else(|| panic!("no row {addr} in {json}"))
            .clone()
    };
    let nodeport = row(np(node_port).to_string());
    let ext = row(SocketAddr::from((external, node_port)).to_string());
    assert_eq!(nodeport["total"], N as u64, "{json}");
    assert_eq!(nodeport["bytes_to_backend"], 5 * N as u64);
    assert_eq!(nodeport["bytes_to_client"], 5 * N as u64);
    assert_eq!(nodeport["connect_failures"]["refused"], 4);
    assert_eq!(ext["total"], 0, "{json}");
    assert_eq!(ext["bytes_to_backend"], 0);
    assert_eq!(ext["connect_failures"], serde_json::json!({}));

    // The refusing endpoint leaves: its series are gone on the first scrape.
    rv.apply(&manifest(&[net.ip(1)]));
    let text = rv.metrics_text();
    assert!(
        !text.contains(&format!("endpoint=\"{refusing}\"")),
        "series of a gone endpoint:\n{text}"
    );
    assert_eq!(
        ep_value(
            &text,
            "ringvip_endpoint_connections_total",
            "obs",
            good,
            &[]
        ),
        Some(n),
        "the endpoint that stays keeps its counts"
    );
}

/// The access log's JSON lines (read as a precondition: a record is written
/// just after its connection or flow ends).
fn access_lines(path: &std::path::Path, at_least: usize) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || read().len() >= at_least),
        "fewer than {at_least} access-log lines: {:?}",
        read()
    );
    read()
}

/// One line per connection or flow, with exact bytes and how it ended: a
/// FIN, a client reset, the TCP idle timeout, and a UDP flow's expiry.
#[test]
fn the_access_log_says_how_each_connection_and_flow_ended() {
    let net = Loopback::take();
    let port = free_port();
    let backend = net.addr(1, port);
    let _echo = Backend::start(backend, "e", Mode::Echo);
    let _udp = UdpBackend::start(backend, "u1");
    let (tcp_np, udp_np) = (free_port(), free_port());
    let eps = [(net.ip(1), true, "node-a")];
    let manifest = format!(
        "{}\n---\n{}",
        service_with("tcp", "TCP", tcp_np, port, &eps, ""),
        service_with("udp", "UDP", udp_np, port, &eps, "")
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rv = Ringvip::start(
        &manifest,
        &[
            "--access-log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "--tcp-idle-timeout-secs",
            "1",
            "--udp-idle-timeout-secs",
            "1",
        ],
    );
    let front = np(tcp_np);
    let check = |line: &serde_json::Value,
                 client: SocketAddr,
                 proto: &str,
                 up: u64,
                 down: u64,
                 ended: &str| {
        assert_eq!(line["client"], client.to_string(), "{line}");
        assert_eq!(line["protocol"], proto, "{line}");
        assert_eq!(line["endpoint"], backend.to_string(), "{line}");
        assert_eq!(line["bytes_to_backend"], up, "{line}");
        assert_eq!(line["bytes_to_client"], down, "{line}");
        assert_eq!(line["ended"], ended, "{line}");
        assert_eq!(line["namespace"], "default", "{line}");
        assert!(line["duration_ms"].as_f64().unwrap() >= 0.0, "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    };

    // FIN both ways.
    let c = echo_once(front, b"seven!!");
    let lines = access_lines(&log, 1);
    check(&lines[0], c.local_addr().unwrap(), "TCP", 7, 7, "fin");
    assert_eq!(lines[0]["frontend"], front.to_string());
    assert_eq!(lines[0]["service"], "tcp");

    // The client resets.
    let mut c = TcpStream::connect(front).unwrap();
    c.write_all(b"four").unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).unwrap();
    let client = c.local_addr().unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let lines = access_lines(&log, 2);
    check(&lines[1], client, "TCP", 4, 4, "reset");

    // Idle: ringvip closes it after the 1 s idle timeout.
    let mut c = TcpStream::connect(front).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"ab").unwrap();
    let mut back = [0u8; 2];
    c.read_exact(&mut back).unwrap();
    let mut rest = [0u8; 1];
    assert!(
        matches!(c.read(&mut rest), Ok(0) | Err(_)),
        "closed when idle"
    );
    let lines = access_lines(&log, 3);
    check(
        &lines[2],
        c.local_addr().unwrap(),
        "TCP",
        2,
        2,
        "idle_timeout",
    );

    // A UDP flow: one datagram each way, then it expires.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.send_to(b"hello", np(udp_np)).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = u.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"u1:hello");
    let lines = access_lines(&log, 4);
    check(
        &lines[3],
        u.local_addr().unwrap(),
        "UDP",
        5,
        8,
        "idle_timeout",
    );
    assert_eq!(lines[3]["frontend"], np(udp_np).to_string());
    assert_eq!(lines.len(), 4, "one line each");
    drop(rv);
}

/// Runs `ringvip run` with stderr to a pipe until it logs "snapshot
/// published"; returns everything it wrote on stderr by then.
fn stderr_until_published(extra: &[&str], settings: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let np_port = free_port();
    let m = nodeport_service("logs", np_port, free_port(), &[Loopback::take().ip(1)], "");
    std::fs::write(dir.path().join("manifest.yaml"), m).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--no-tun", "--manifests"])
        .arg(dir.path())
        .args([
            "--nodeport-addresses",
            "127.0.0.1/32",
            "--node-port-range",
            "1-65535",
        ])
        .args([
            "--health-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--workers", "1", "--no-handover"])
        .args(extra)
        .env("RINGVIP_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(text) = settings {
        let file = dir.path().join("settings.yaml");
        std::fs::write(&file, text).unwrap();
        cmd.arg("--config").arg(file);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !out.contains("snapshot published") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                out.push_str(&l);
                out.push('\n');
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.contains("snapshot published"),
        "never published:\n{out}"
    );
    out
}

/// Log lines to a pipe carry no colour escapes.
#[test]
fn logs_to_a_pipe_have_no_colour() {
    let out = stderr_until_published(&[], None);
    assert!(!out.contains('\u{1b}'), "ESC in:\n{out:?}");
}

/// `log-format: json` in the settings file: every line is a JSON object.
#[test]
fn json_log_lines_from_the_settings_file() {
    let out = stderr_until_published(&[], Some("log-format: json\n"));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let published = lines
        .iter()
        .find(|v| v["message"] == "snapshot published")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(published["level"], "INFO");
    assert_eq!(published["generation"], 1);
    assert!(lines.iter().all(|v| v["timestamp"].is_string()));
}

/// The ClusterIP (TUN) front end counts per endpoint too: `N` HTTP requests
/// through the VIP, each endpoint series exact. Needs root for the
/// namespaces and the TUN (skipped with a message otherwise).
#[test]
fn per_endpoint_series_through_the_tun() {
    let Some(t) = support::netns::Topology::setup(&[]) else {
        return;
    };
    let ep = SocketAddr::from((t.pod_ip(2), 8080));
    let _b = t.backend(ep, "2", Mode::Http);
    let m = clusterip("web", "10.96.0.40", 80, "TCP", 8080, &[ep.ip()], "");
    let rv = t.launch(&m, &[]);
    const N: u64 = 4;
    for i in 0..N {
        let (ok, body) = t.curl("http://10.96.0.40/");
        assert!(ok, "request {i}: {body}\n{}", rv.log());
    }
    let addr = rv.metrics;
    let scrape = || support::netns::Topology::within(&t.node, move || admin_get(addr, "/metrics"));
    let labels = ep_labels("web", ep);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    // Precondition, not the answer: a relay ends just after curl has its reply.
    assert!(
        wait_until(Duration::from_secs(5), || {
            metric::<f64>(&scrape(), "ringvip_endpoint_connections_active{", &labels) == Some(0.0)
        }),
        "relays still open"
    );
    let text = scrape();
    let v = |name: &str, extra: &[&str]| ep_value(&text, name, "web", ep, extra);
    // What Mode::Http answers, byte for byte.
    let body = "backend-2\n";
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(
        v("ringvip_endpoint_connections_total", &[]),
        Some(N as f64),
        "{text}"
    );
    assert_eq!(
        v("ringvip_endpoint_bytes_total", &["direction=\"to_client\""]),
        Some((N as usize * answer.len()) as f64)
    );
    // One endpoint: it carried all the port's request bytes.
    assert_eq!(
        v(
            "ringvip_endpoint_bytes_total",
            &["direction=\"to_backend\""]
        ),
        bytes_relayed(&text, "web", "to_backend").map(|b| b as f64)
    );
    assert_eq!(v("ringvip_endpoint_healthy", &[]), Some(1.0));
}
