//! End-to-end: Service discovery for clients. The real binary serving cluster DNS
//! to real clients (`dig`, over UDP and TCP), `ringvip env` against the kubelet's
//! format, and Service selectors resolved from Pods in the manifests, changing
//! live. Everything runs on loopback addresses each test takes for itself
//! (`Loopback::take`), but for one test in network namespaces of its own.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::netns::Topology;
use support::*;

/// Why the DNS tests need dig.
const DIG_WHY: &str = "DNS tests query with a real client (Debian package bind9-dnsutils)";

fn dig_bin() -> Option<PathBuf> {
    need_program("dig", DIG_WHY)
}

/// What `dig` printed for one query.
#[derive(Debug, Default, Clone)]
struct Dig {
    status: String,
    flags: String,
    /// (type, rdata) of the answer section, sorted.
    answers: Vec<(String, String)>,
    /// (owner, type) of the authority section.
    authority: Vec<(String, String)>,
    /// TTLs of the answer section.
    ttls: Vec<u32>,
    raw: String,
}

impl Dig {
    fn data(&self, rtype: &str) -> Vec<String> {
        self.answers
            .iter()
            .filter(|(t, _)| t == rtype)
            .map(|(_, d)| d.clone())
            .collect()
    }

    fn has_soa(&self) -> bool {
        self.authority.iter().any(|(_, t)| t == "SOA")
    }
}

/// Runs dig against `server` (one try, two seconds at most).
fn dig(bin: &Path, server: SocketAddr, args: &[&str]) -> Dig {
    let out = Command::new(bin)
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([
            "+norec",
            "+time=2",
            "+tries=1",
            "+noall",
            "+comments",
            "+answer",
            "+authority",
        ])
        .args(args)
        .output()
        .expect("run dig");
    let raw = String::from_utf8_lossy(&out.stdout).to_string();
    let mut d = Dig {
        raw: raw.clone(),
        ..Dig::default()
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or("").to_string();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest.split(';').next().unwrap_or("").to_string();
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
            continue;
        }
        if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
            continue;
        }
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        match section {
            "answer" => {
                d.answers.push((f[3].to_string(), f[4..].join(" ")));
                d.ttls.push(f[1].parse().unwrap_or(u32::MAX));
            }
            "authority" => d.authority.push((f[0].to_string(), f[3].to_string())),
            _ => {}
        }
    }
    d.answers.sort();
    d
}

/// [`dig`], over TCP when `tcp`.
fn dig_over(bin: &Path, server: SocketAddr, tcp: bool, args: &[&str]) -> Dig {
    let mut args = args.to_vec();
    if tcp {
        args.push("+tcp");
    }
    dig(bin, server, &args)
}

fn dns_flags(port: u16) -> Vec<String> {
    vec!["--dns-addr".into(), format!("127.0.0.1:{port}")]
}

/// Starts ringvip with DNS on a free port; waits until it answers.
fn start_with_dns(manifest: &str, extra: &[&str]) -> (Ringvip, SocketAddr) {
    let port = free_port();
    let mut args: Vec<String> = dns_flags(port);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let rv = Ringvip::start(manifest, &refs);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(
        rv.log().contains("serving cluster DNS"),
        "DNS did not start:\n{}",
        rv.log()
    );
    (rv, addr)
}

const ZONE_MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIPs: [10.96.0.10, "fd00:10:96::a"]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  ports:
  - {name: pg, port: 5432}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports:
- {name: pg, port: 5433, protocol: TCP}
endpoints:
- addresses: [10.244.0.1]
  hostname: db-0
- addresses: [10.244.0.2]
- addresses: [10.244.0.3]
  hostname: db-2
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ExternalName
  externalName: db.example.com
"#;

#[test]
fn dig_gets_every_record_type_over_udp_and_tcp() {
    let Some(dig_bin) = dig_bin() else { return };
    let (rv, dns) = start_with_dns(ZONE_MANIFEST, &[]);
    for tcp in [false, true] {
        let q = |name: &str, t: &str| {
            let d = dig_over(&dig_bin, dns, tcp, &[name, t]);
            assert!(
                !d.status.is_empty(),
                "no answer for {name} {t}:\n{}\n{}",
                d.raw,
                rv.log()
            );
            d
        };
        let d = q("web.default.svc.cluster.local", "A");
        assert_eq!(d.status, "NOERROR");
        assert!(d.flags.contains("aa"), "authoritative: {}", d.flags);
        assert_eq!(d.data("A"), vec!["10.96.0.10"]);
        assert_eq!(d.ttls, vec![5], "default TTL");
        assert_eq!(
            q("web.default.svc.cluster.local", "AAAA").data("AAAA"),
            vec!["fd00:10:96::a"]
        );
        assert_eq!(
            q("_http._tcp.web.default.svc.cluster.local", "SRV").data("SRV"),
            vec!["0 100 80 web.default.svc.cluster.local."]
        );
        assert_eq!(
            q("_dns._udp.web.default.svc.cluster.local", "SRV").data("SRV"),
            vec!["0 100 53 web.default.svc.cluster.local."]
        );
        // Headless: ready endpoints only, hostnames, SRV per endpoint.
        assert_eq!(
            q("db.shop.svc.cluster.local", "A").data("A"),
            vec!["10.244.0.1", "10.244.0.2"]
        );
        assert_eq!(
            q("db-0.db.shop.svc.cluster.local", "A").data("A"),
            vec!["10.244.0.1"]
        );
        assert_eq!(
            q("_pg._tcp.db.shop.svc.cluster.local", "SRV").data("SRV"),
            vec![
                "0 50 5433 10-244-0-2.db.shop.svc.cluster.local.",
                "0 50 5433 db-0.db.shop.svc.cluster.local.",
            ]
        );
        // ExternalName.
        let d = q("ext.default.svc.cluster.local", "A");
        assert_eq!(d.data("CNAME"), vec!["db.example.com."]);
        // PTR.
        assert_eq!(
            dig_over(&dig_bin, dns, tcp, &["-x", "10.96.0.10"]).data("PTR"),
            vec!["web.default.svc.cluster.local."]
        );
        assert_eq!(
            dig_over(&dig_bin, dns, tcp, &["-x", "10.244.0.1"]).data("PTR"),
            vec!["db-0.db.shop.svc.cluster.local."]
        );
        assert_eq!(
            q("dns-version.cluster.local", "TXT").data("TXT"),
            vec!["\"1.1.0\""]
        );
        assert_eq!(q("cluster.local", "SOA").data("SOA").len(), 1);
    }
}

#[test]
fn dig_negative_answers_search_path_and_refused() {
    let Some(dig_bin) = dig_bin() else { return };
    let (_rv, dns) = start_with_dns(ZONE_MANIFEST, &[]);
    for tcp in [false, true] {
        let q = |name: &str, t: &str| dig_over(&dig_bin, dns, tcp, &[name, t]);
        for name in [
            "nope.default.svc.cluster.local",
            "web.nope.svc.cluster.local",
            "db-2.db.shop.svc.cluster.local",
        ] {
            let d = q(name, "A");
            assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.raw);
            assert!(d.has_soa(), "{name}: SOA in authority\n{}", d.raw);
        }
        for (name, t) in [
            ("web.default.svc.cluster.local", "TXT"),
            ("db.shop.svc.cluster.local", "AAAA"),
            ("shop.svc.cluster.local", "A"),
        ] {
            let d = q(name, t);
            assert_eq!(d.status, "NOERROR", "{name} {t}: {}", d.raw);
            assert!(d.answers.is_empty(), "NODATA {name} {t}: {}", d.raw);
            assert!(d.has_soa(), "{name}: SOA in authority\n{}", d.raw);
        }
        // The ndots:5 search-path storm: answered NXDOMAIN at once.
        let start = Instant::now();
        for suffix in [
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ] {
            let d = q(&format!("web.default.svc.cluster.local.{suffix}"), "A");
            assert_eq!(d.status, "NXDOMAIN", "{suffix}: {}", d.raw);
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // Outside the zone, no upstream: REFUSED.
        let d = q("example.com", "A");
        assert_eq!(d.status, "REFUSED", "{}", d.raw);
    }
}

#[test]
fn answers_follow_manifest_changes() {
    let Some(dig_bin) = dig_bin() else { return };
    let (rv, dns) = start_with_dns(ZONE_MANIFEST, &[]);
    let name = "web.default.svc.cluster.local";
    assert_eq!(
        dig(&dig_bin, dns, &[name, "A"]).data("A"),
        vec!["10.96.0.10"]
    );
    // The DNS view is published with the snapshot: the first query after
    // the change gets the new answer.
    rv.apply(&ZONE_MANIFEST.replace("10.96.0.10", "10.96.0.20"));
    assert_eq!(
        dig(&dig_bin, dns, &[name, "A"]).data("A"),
        vec!["10.96.0.20"],
        "{}",
        rv.log()
    );
    rv.apply("");
    let d = dig(&dig_bin, dns, &[name, "A"]);
    assert_eq!(
        d.status, "NXDOMAIN",
        "the removed Service still answered: {}",
        d.raw
    );
}

#[test]
fn out_of_zone_names_go_to_the_upstream() {
    let Some(dig_bin) = dig_bin() else { return };
    // The upstream: another ringvip, authoritative for another domain.
    let (_up, up_addr) = start_with_dns(
        ZONE_MANIFEST,
        &["--cluster-domain", "upstream.test", "--dns-ttl", "30"],
    );
    let (_rv, dns) = start_with_dns(ZONE_MANIFEST, &["--dns-upstream", &up_addr.to_string()]);
    for tcp in [false, true] {
        let d = dig_over(&dig_bin, dns, tcp, &["web.default.svc.upstream.test", "A"]);
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert_eq!(d.data("A"), vec!["10.96.0.10"]);
        assert_eq!(d.ttls, vec![30], "the upstream's --dns-ttl");
        // Its own zone is still its own.
        let d = dig_over(&dig_bin, dns, tcp, &["web.default.svc.cluster.local", "A"]);
        assert!(d.flags.contains("aa"), "{}", d.raw);
    }
    // An upstream that does not answer: SERVFAIL, not a hang. The upstream
    // address is a socket this test holds open and never reads.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (_rv2, dns2) = start_with_dns(
        ZONE_MANIFEST,
        &["--dns-upstream", &silent.local_addr().unwrap().to_string()],
    );
    let out = Command::new(&dig_bin)
        .arg(format!("@{}", dns2.ip()))
        .args([
            "-p",
            &dns2.port().to_string(),
            "+time=4",
            "+tries=1",
            "example.com",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: SERVFAIL"), "{text}");
}

/// A raw UDP exchange; `None` when nothing came back within 500 ms.
fn udp_exchange(dns: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.send_to(msg, dns).unwrap();
    let mut buf = [0u8; 2048];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn hostile_queries_get_errors_or_silence_and_never_a_crash() {
    let Some(dig_bin) = dig_bin() else { return };
    let (rv, dns) = start_with_dns(ZONE_MANIFEST, &[]);
    let header = |qd: u8| vec![0xAB, 0xCD, 0x01, 0x00, 0, qd, 0, 0, 0, 0, 0, 0];
    // Compression loop: FORMERR with the id echoed.
    let mut looped = header(1);
    looped.extend_from_slice(&[3, b'a', b'b', b'c', 0xC0, 12, 0, 1, 0, 1]);
    let r = udp_exchange(dns, &looped).expect("FORMERR expected");
    assert_eq!(&r[0..2], &[0xAB, 0xCD]);
    assert_eq!(r[3] & 0x0f, 1, "FORMERR");
    // Truncated question.
    let mut cut = header(1);
    cut.extend_from_slice(&[3, b'w', b'e']);
    assert_eq!(udp_exchange(dns, &cut).expect("FORMERR")[3] & 0x0f, 1);
    // Too short for a header, and a response: silence.
    assert_eq!(udp_exchange(dns, &[1, 2, 3]), None);
    let mut resp = header(1);
    resp[2] |= 0x80;
    assert_eq!(udp_exchange(dns, &resp), None);
    // Oversized: 60 KB of junk after a header.
    let mut big = header(1);
    big.extend(std::iter::repeat_n(0x3F, 60_000));
    let r = udp_exchange(dns, &big).expect("FORMERR");
    assert_eq!(r[3] & 0x0f, 1);
    // A bounded burst of pseudo-random datagrams.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for i in 0..2000usize {
        let len = 12 + (i % 300);
        let msg: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.send_to(&msg, dns);
    }
    // TCP: a length prefix promising more than is sent, then a close; a length
    // with garbage; a half-sent prefix.
    for bytes in [
        &[0xFF, 0xFF, 1, 2, 3][..],
        &[0, 5, 1, 2, 3, 4, 5][..],
        &[0][..],
    ] {
        let mut c = TcpStream::connect(dns).unwrap();
        c.write_all(bytes).unwrap();
        drop(c);
    }
    let mut c = TcpStream::connect(dns).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(&[0, looped.len() as u8]).unwrap();
    c.write_all(&looped).unwrap();
    let mut len = [0u8; 2];
    c.read_exact(&mut len).unwrap();
    let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r[3] & 0x0f, 1, "FORMERR over TCP");
    // Still serving.
    let d = dig(&dig_bin, dns, &["web.default.svc.cluster.local", "A"]);
    assert_eq!(d.data("A"), vec!["10.96.0.10"], "{}\n{}", d.raw, rv.log());
    assert!(!rv.log().contains("panicked"), "{}", rv.log());
}

/// A headless Service whose endpoints come from Pods (by selector), resolved by
/// name with dig, then connected to directly, as a client of a headless Service
/// does; SRV gives the port.
#[test]
fn client_resolves_a_headless_service_then_connects() {
    let Some(dig_bin) = dig_bin() else { return };
    let (net, port, _b) = backends(2, Mode::Http);
    let pod = |i: u8| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: api-{i}, namespace: default, labels: {{app: api}}}}\nspec:\n  hostname: api-{i}\n  subdomain: api\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: {port}}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
            net.ip(i)
        )
    };
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: default}}\nspec:\n  clusterIP: None\n  selector: {{app: api}}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n{}{}",
        pod(1),
        pod(2)
    );
    let (_rv, dns) = start_with_dns(&manifest, &[]);
    let d = dig(&dig_bin, dns, &["api.default.svc.cluster.local", "A"]);
    let want: Vec<String> = net.ips(1..=2).iter().map(|a| a.to_string()).collect();
    assert_eq!(d.data("A"), want, "{}", d.raw);
    let srv = dig(
        &dig_bin,
        dns,
        &["_http._tcp.api.default.svc.cluster.local", "SRV"],
    );
    let mut seen = BTreeSet::new();
    for rdata in srv.data("SRV") {
        // "0 50 PORT api-1.api.default.svc.cluster.local."
        let f: Vec<&str> = rdata.split_whitespace().collect();
        let srv_port: u16 = f[2].parse().unwrap();
        assert_eq!(srv_port, port, "named targetPort resolved against the Pod");
        let target = dig(&dig_bin, dns, &[f[3], "A"]).data("A");
        assert_eq!(target.len(), 1, "{rdata}");
        let ip: IpAddr = target[0].parse().unwrap();
        seen.insert(http_get(SocketAddr::new(ip, srv_port)).unwrap());
    }
    assert_eq!(
        seen,
        BTreeSet::from(["backend-1".to_string(), "backend-2".to_string()])
    );
}

const ENV_MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443, targetPort: 6443}]
---
apiVersion: v1
kind: Service
metadata: {name: cart-api, namespace: shop}
spec:
  clusterIP: 10.96.5.5
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: grpc-web, port: 9090}
  - {name: metrics, port: 9100, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: elsewhere}
spec:
  clusterIP: 10.96.9.9
  ports: [{port: 1}]
"#;

/// What the kubelet (pkg/kubelet/envvars) injects into a Pod in `shop` for the
/// Services above: the master Service, the multi-port Service, nothing for the
/// headless one or other namespaces.
const ENV_EXPECTED: &str = "\
CART_API_PORT=tcp://10.96.5.5:80
CART_API_PORT_80_TCP=tcp://10.96.5.5:80
CART_API_PORT_80_TCP_ADDR=10.96.5.5
CART_API_PORT_80_TCP_PORT=80
CART_API_PORT_80_TCP_PROTO=tcp
CART_API_PORT_9090_TCP=tcp://10.96.5.5:9090
CART_API_PORT_9090_TCP_ADDR=10.96.5.5
CART_API_PORT_9090_TCP_PORT=9090
CART_API_PORT_9090_TCP_PROTO=tcp
CART_API_PORT_9100_UDP=udp://10.96.5.5:9100
CART_API_PORT_9100_UDP_ADDR=10.96.5.5
CART_API_PORT_9100_UDP_PORT=9100
CART_API_PORT_9100_UDP_PROTO=udp
CART_API_SERVICE_HOST=10.96.5.5
CART_API_SERVICE_PORT=80
CART_API_SERVICE_PORT_GRPC_WEB=9090
CART_API_SERVICE_PORT_HTTP=80
CART_API_SERVICE_PORT_METRICS=9100
KUBERNETES_PORT=tcp://10.96.0.1:443
KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443
KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1
KUBERNETES_PORT_443_TCP_PORT=443
KUBERNETES_PORT_443_TCP_PROTO=tcp
KUBERNETES_SERVICE_HOST=10.96.0.1
KUBERNETES_SERVICE_PORT=443
KUBERNETES_SERVICE_PORT_HTTPS=443
";

#[test]
fn env_prints_the_kubelets_variables_for_a_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.yaml");
    std::fs::write(&path, ENV_MANIFEST).unwrap();
    let stdout = command_ok(&["env", "--namespace", "shop", path.to_str().unwrap()]);
    assert_eq!(stdout, ENV_EXPECTED);

    // A shell can source it.
    let script = format!(
        "eval \"$({} env --namespace shop {})\" && echo \"$CART_API_SERVICE_HOST:$CART_API_SERVICE_PORT_GRPC_WEB $KUBERNETES_PORT\"",
        bin(),
        path.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.96.5.5:9090 tcp://10.96.0.1:443"
    );

    // A broken manifest: the error on stderr, nothing on stdout, exit 1.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: 0}]\n",
    )
    .unwrap();
    let out = command(&["env", "-n", "shop", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.ports[0].port"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A NodePort Service with a selector and no EndpointSlice: its endpoints are
/// the matching ready Pods, and they change as the Pods in the file change.
#[test]
fn selector_membership_changes_live() {
    let (net, port, _b) = backends(2, Mode::Http);
    let node_port = free_port();
    let pod = |i: u8, app: &str, ready: bool| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: shop-{i}, namespace: default, labels: {{app: {app}}}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: c\n    ports: [{{name: web, containerPort: {port}}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
            net.ip(i),
            if ready { "True" } else { "False" }
        )
    };
    let manifest = |pods: &[String]| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: shop, namespace: default}}\nspec:\n  type: NodePort\n  selector: {{app: shop}}\n  ports:\n  - {{name: web, port: 80, targetPort: web, nodePort: {node_port}}}\n{}",
            pods.concat()
        )
    };
    let front = SocketAddr::from((Ipv4Addr::LOCALHOST, node_port));
    let backends_seen = |n: usize| {
        let mut seen: HashMap<String, u32> = HashMap::new();
        for i in 0..n {
            let b = http_get(front).unwrap_or_else(|e| panic!("request {i} through {front}: {e}"));
            *seen.entry(b).or_default() += 1;
        }
        seen.into_keys().collect::<BTreeSet<_>>()
    };
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    // Pod 2 not ready: only pod 1 serves.
    let rv = Ringvip::start(
        &manifest(&[pod(1, "shop", true), pod(2, "shop", false)]),
        &[],
    );
    // Each check is of the requests right after the snapshot is published.
    assert_eq!(backends_seen(20), set(&["backend-1"]), "{}", rv.log());

    // Pod 2 becomes ready: both.
    rv.apply(&manifest(&[pod(1, "shop", true), pod(2, "shop", true)]));
    assert_eq!(
        backends_seen(20),
        set(&["backend-1", "backend-2"]),
        "{}",
        rv.log()
    );

    // Pod 1's labels change: it leaves.
    rv.apply(&manifest(&[pod(1, "other", true), pod(2, "shop", true)]));
    assert_eq!(backends_seen(20), set(&["backend-2"]), "{}", rv.log());

    // No matching Pod: refused at once.
    rv.apply(&manifest(&[pod(1, "other", true)]));
    let e = TcpStream::connect_timeout(&front, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
}

/// 100 endpoints do not fit a UDP response: dig sees TC and retries over TCP,
/// where the whole answer comes back.
#[test]
fn big_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let Some(dig_bin) = dig_bin() else { return };
    let eps: String = (1..=100)
        .map(|i| format!("- addresses: [10.244.9.{i}]\n"))
        .collect();
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: default}}\nspec:\n  clusterIP: None\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: big}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{eps}"
    );
    let (_rv, dns) = start_with_dns(&manifest, &[]);
    let name = "big.default.svc.cluster.local";
    // +ignore: keep the truncated UDP answer.
    let d = dig(&dig_bin, dns, &[name, "A", "+ignore"]);
    assert!(d.flags.contains("tc"), "{}", d.raw);
    assert!(d.answers.is_empty(), "{}", d.raw);
    // Default dig: retries over TCP on TC.
    let d = dig(&dig_bin, dns, &[name, "A"]);
    assert_eq!(d.data("A").len(), 100, "{}", d.raw);
    assert!(!d.flags.contains("tc"));
}

/// The whole path a Pod's client takes: glibc's resolver (resolv.conf with the
/// kubelet's search path and ndots:5) asks ringvip's DNS for `web`, gets the
/// ClusterIP, and curl connects to it through ringvip's TUN. Runs in network
/// namespaces the test creates (root), like integration/tun.rs.
#[test]
fn curl_resolves_a_short_name_and_connects_through_the_clusterip() {
    let Some((t, [_, curl])) = Topology::setup_with(
        &[3],
        [
            ("dig", DIG_WHY),
            ("curl", "the client resolving through the system resolver"),
        ],
    ) else {
        return;
    };
    let backend_addr = SocketAddr::from((t.pod_ip(3), 8080));
    let _backend = t.backend(backend_addr, "3", Mode::Http);
    let pod = [IpAddr::V4(t.pod_ip(3))];
    let manifest = clusterip("web", "10.96.0.10", 80, "TCP", 8080, &pod, "");
    let _conf = t.resolv_conf(
        "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n",
    );
    let rv = t.launch(&manifest, &["--dns-addr", "127.0.0.1:53"]);
    let curl = curl.display().to_string();
    // The first request once ringvip is up: DNS, TUN and relay all ready.
    let out = t.on_node(&curl, &["-sS", "--max-time", "5", "http://web/"]);
    let last = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && last.trim() == "backend-3",
        "curl http://web/ failed: {last}\n{}",
        rv.log()
    );
    // And by the fully qualified name.
    let out = t.on_node(
        &curl,
        &[
            "-sS",
            "--max-time",
            "5",
            "http://web.default.svc.cluster.local./",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "backend-3");
    drop(rv);
}
