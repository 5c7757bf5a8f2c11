//! The Grafana dashboard (`config/grafana/ringvip.json`) and the Prometheus
//! alert rules (`config/prometheus/alerts.yaml`) against the real thing:
//! Debian's Prometheus scraping a live ringvip on loopback addresses of this
//! test's own (`Loopback::take`), every PromQL expression run through its
//! HTTP API, one alert made to fire and resolve for real; and promtool's
//! `check rules` and `test rules` (the unit tests in
//! `config/prometheus/alerts_test.yaml`). Without Prometheus the tests that
//! need it say why and skip; under CI (`.ci/run` installs it) they fail.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::netns::Topology;
use support::*;

const PROM_WHY: &str = "the dashboard and the alert rules are checked against a real \
     Prometheus (Debian package prometheus, which brings promtool)";

/// Series of the per-endpoint metric contract (`ringvip_endpoint_*`, see
/// docs/ARCHITECTURE.md). Expressions over them are checked only when the
/// scrape has such series: they come with the per-endpoint metrics, which
/// may not be in this build yet.
const ENDPOINT_SERIES: &str = "ringvip_endpoint_";

/// Alerts whose whole expression this test makes true on the live ringvip.
const MADE_TRUE: [&str; 3] = [
    "RingvipEndpointsAllFailing",
    "RingvipLimitsHit",
    "RingvipDrainStuck",
];
/// Alerts whose condition these tests cannot reach: every series they
/// select must exist, and alerts_test.yaml tests the condition. A healthy
/// process does not take 30 s to program a change, nor stall a sync for 2
/// minutes.
const SELECTORS_ONLY: [&str; 2] = ["RingvipNetworkProgrammingLatencyHigh", "RingvipSyncStalled"];
/// Made true (and firing) by the namespace test: `no_endpoints` failures are
/// counted on the ClusterIP (TUN) path; a NodePort without endpoints has no
/// listener (the kernel refuses, as kube-proxy's REJECT does), so nothing
/// counts them on loopback.
const MADE_TRUE_IN_A_NAMESPACE: [&str; 1] = ["RingvipNoEndpointsWithTraffic"];
/// Alerts over per-endpoint series: whole expression made true when the
/// scrape has them.
const ENDPOINT_ALERTS: [&str; 1] = ["RingvipEndpointsAllUnhealthy"];

fn config(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Value {
    let path = config("grafana/ringvip.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// (panel title, PromQL) of every query of the dashboard, as written.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
}

/// `expr` as Grafana sends it with every variable at "All" (`.*`) and a
/// rate interval that holds several 1 s scrapes.
fn substitute(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$namespace", ".*")
        .replace("$service", ".*");
    assert!(
        !out.contains('$'),
        "a variable the test does not know: {expr}"
    );
    out
}

fn rules_yaml() -> serde_yaml::Value {
    let path = config("prometheus/alerts.yaml");
    serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (alert name, expression) of every alerting rule.
fn alert_exprs(rules: &serde_yaml::Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| {
            let alert = r["alert"].as_str()?.to_string();
            Some((alert, r["expr"].as_str()?.to_string()))
        })
        .collect()
}

/// The vector selectors of `expr` naming a ringvip metric
/// (`ringvip_x{matchers}` or `ringvip_x`), range brackets left out.
fn selectors(expr: &str) -> Vec<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ringvip_") {
        let preceded_by_word = rest[..i].chars().next_back().is_some_and(word);
        let tail = &rest[i..];
        let name_len = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
        let mut sel = tail[..name_len].to_string();
        let after = &tail[name_len..];
        let mut used = name_len;
        if let Some(m) = after.strip_prefix('{') {
            let close = m.find('}').expect("unclosed matcher");
            sel.push_str(&after[..close + 2]);
            used += close + 2;
        }
        if !preceded_by_word {
            out.push(sel);
        }
        rest = &tail[used..];
    }
    out
}

/// The expression of alert `name`.
fn expr_of(name: &str) -> String {
    alert_exprs(&rules_yaml())
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("no alert {name}"))
}

/// Percent-encodes `s` for a URL query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of this test: its own directory, a free port,
/// scraping `target` every second and evaluating `rules` every second;
/// inside network namespace `netns` when given (where ringvip runs).
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    netns: Option<String>,
}

impl Prometheus {
    fn start(bin: &Path, target: SocketAddr, rules: &str) -> Prometheus {
        Prometheus::start_in(None, bin, target, rules)
    }

    fn start_in(netns: Option<&str>, bin: &Path, target: SocketAddr, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alerts.yaml"), rules).unwrap();
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: ringvip\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = dir.path().join("alerts.yaml").display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), cfg).unwrap();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let netns = netns.map(str::to_string);
        let p = Prometheus {
            child,
            dir,
            addr,
            netns,
        };
        // Precondition: Prometheus has loaded its configuration and rules.
        assert!(
            wait_until(Duration::from_secs(30), || p
                .raw_get("/-/ready")
                .is_some_and(|(code, _)| code == 200)),
            "Prometheus never became ready:\n{}",
            p.log()
        );
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` (HTTP/1.0: the body is not chunked): status and body.
    fn raw_get(&self, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (self.addr, path.to_string());
        let get = move || {
            let mut c = TcpStream::connect(addr).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            write!(c, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").ok()?;
            let mut s = String::new();
            c.read_to_string(&mut s).ok()?;
            let code = s.split(' ').nth(1)?.parse().ok()?;
            let body = s.split_once("\r\n\r\n")?.1.to_string();
            Some((code, body))
        };
        match &self.netns {
            Some(ns) => Topology::within(ns, get),
            None => get(),
        }
    }

    /// The `data` of an API call, which must succeed.
    fn api(&self, path: &str) -> Value {
        let (code, body) = self
            .raw_get(path)
            .unwrap_or_else(|| panic!("GET {path}: no answer\n{}", self.log()));
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
        assert!(
            code == 200 && v["status"] == "success",
            "GET {path}: {code} {body}"
        );
        v["data"].clone()
    }

    /// The series an instant query returns.
    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Active (pending or firing) alerts named `name` for Service `service`.
    fn alert_states(&self, name: &str, service: &str) -> Vec<String> {
        self.api("/api/v1/alerts")["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name && a["labels"]["service"] == service)
            .map(|a| a["state"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The state (`inactive`, `pending`, `firing`) of alerting rule `name`.
    fn rule_state(&self, name: &str) -> String {
        self.rules()
            .into_iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["state"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no rule {name}"))
    }

    fn rules(&self) -> Vec<Value> {
        self.api("/api/v1/rules")["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// When the rule group was last evaluated.
    fn last_evaluation(&self) -> jiff::Timestamp {
        let groups = self.api("/api/v1/rules")["groups"].clone();
        let at = groups[0]["lastEvaluation"].as_str().unwrap_or_default();
        at.parse()
            .unwrap_or_else(|e| panic!("lastEvaluation {at:?}: {e}"))
    }

    /// Waits until the rules have been evaluated twice after now (each
    /// evaluation sees every scrape before it): a precondition, so that the
    /// next look at the alerts sees data that is already scraped.
    fn two_evaluations(&self) {
        let after = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(2100);
        assert!(
            wait_until(Duration::from_secs(15), || self.last_evaluation() >= after),
            "the rules were not evaluated:\n{}",
            self.log()
        );
    }

    /// Once a scrape after now is in (precondition), the expression of
    /// alert `name` returns a series for Service `service`.
    fn assert_true_after_a_scrape(&self, name: &str, service: &str, rv: &Ringvip) {
        self.scraped();
        let series = self.query(&expr_of(name));
        assert!(
            series.iter().any(|s| s["metric"]["service"] == service),
            "{name} not true for {service}: {series:?}\n{}",
            rv.log()
        );
    }

    /// Waits until Prometheus holds a scrape of ringvip taken after now.
    fn scraped(&self) {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        let newer = || {
            self.query("timestamp(up{job=\"ringvip\"})")
                .first()
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .is_some_and(|t| t > now)
        };
        assert!(
            wait_until(Duration::from_secs(15), newer),
            "no scrape of ringvip:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// alerts.yaml with every `for:` at 1 s, so that an alert fires within
/// seconds of its condition; the expressions stay as shipped.
fn rules_for_the_test() -> String {
    let mut rules = rules_yaml();
    for g in rules["groups"].as_sequence_mut().into_iter().flatten() {
        for r in g["rules"].as_sequence_mut().into_iter().flatten() {
            if let Some(m) = r.as_mapping_mut() {
                if m.contains_key("for") {
                    m.insert("for".into(), "1s".into());
                }
            }
        }
    }
    serde_yaml::to_string(&rules).unwrap()
}

/// One UDP and one TCP query to the DNS server at `addr`, both answered.
fn ask_dns(addr: SocketAddr) {
    let q = a_query("web.default.svc.cluster.local");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    udp.send_to(&q, addr).unwrap();
    let mut buf = [0u8; 1500];
    assert!(udp.recv(&mut buf).unwrap() >= 12, "a DNS answer over UDP");
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    tcp.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).unwrap();
    assert!(u16::from_be_bytes(len) >= 12, "a DNS answer over TCP");
}

/// `n` distinct free ports.
fn free_ports(n: usize) -> Vec<u16> {
    let mut set = BTreeSet::new();
    while set.len() < n {
        set.insert(free_port());
    }
    set.into_iter().collect()
}

/// Each expression returns at least one series; the failures, listed.
fn without_series(prom: &Prometheus, exprs: &[(String, String)]) -> Vec<String> {
    exprs
        .iter()
        .filter(|(_, e)| prom.query(e).is_empty())
        .map(|(origin, e)| format!("{origin}: {e}"))
        .collect()
}

/// The dashboard as Grafana imports it: a dashboard object of a current
/// schema whose every query goes to the Prometheus data source the user
/// picks, with a panel for each thing the operator looks at.
#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    assert_eq!(d["uid"], "ringvip");
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 39,
        "Grafana 11 or later"
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels(&d) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "gridPos.{k} of {}", p["title"]);
        }
        titles.push(p["title"].as_str().unwrap().to_string());
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{}", p["title"]);
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    for want in [
        "Traffic per Service port",
        "Traffic per endpoint",
        "New connections per Service port",
        "Connect failures by reason",
        "Endpoint health",
        "Network programming latency",
        "Sync duration",
        "Limits hit",
        "DNS answers by rcode",
    ] {
        assert!(titles.iter().any(|t| t == want), "no panel {want:?}");
    }
    let exprs = dashboard_exprs(&d);
    assert!(exprs.iter().all(|(_, e)| !substitute(e).is_empty()));
}

/// `promtool check rules` accepts alerts.yaml and `promtool test rules`
/// passes its unit tests, which cover every alert.
#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let tests = read(&config("prometheus/alerts_test.yaml"));
    for (alert, _) in alert_exprs(&rules_yaml()) {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "alerts_test.yaml has no test of {alert}"
        );
    }
    let Some(promtool) = need_program("promtool", PROM_WHY) else {
        return;
    };
    for (args, file) in [
        (["check", "rules"], "prometheus/alerts.yaml"),
        (["test", "rules"], "prometheus/alerts_test.yaml"),
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .arg(config(file))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?} {file}:\n{text}");
        assert!(text.contains("SUCCESS"), "{text}");
    }
}

/// The selector scanner the live test relies on.
#[test]
fn selectors_are_found_in_expressions() {
    assert_eq!(
        selectors(
            "sum by (a) (rate(ringvip_x_total{reason=~\"a|b\"}[2m])) > 0 unless ringvip_y > time() - ringvip_z"
        ),
        vec!["ringvip_x_total{reason=~\"a|b\"}", "ringvip_y", "ringvip_z"]
    );
    assert!(selectors("foo_ringvip_x").is_empty());
}

/// The live check: ringvip serving traffic, failures, limits and DNS;
/// Prometheus scraping it with the shipped rules (`for:` shortened). Every
/// dashboard query and every rule expression returns series; the "all
/// endpoints failing" alert fires when a Service's only backend refuses,
/// and resolves when it is back; the drain alert fires while a drain waits.
#[test]
fn dashboard_and_alerts_work_on_a_real_prometheus() {
    let Some(prom_bin) = need_program("prometheus", PROM_WHY) else {
        return;
    };
    let net = Loopback::take();
    let backend_port = 8080;
    let [web, down, hold, udp, dns] = <[u16; 5]>::try_from(free_ports(5)).unwrap();
    // Service `name` with one endpoint, host `host` of the block.
    let svc = |name: &str, proto: &str, port: u16, host: u8| {
        let target = if proto == "UDP" { 5353 } else { backend_port };
        service_with(
            name,
            proto,
            port,
            target,
            &[(net.ip(host), true, "node-a")],
            "",
        )
    };
    let manifest = [
        svc("web", "TCP", web, 1),
        svc("down", "TCP", down, 2),
        svc("hold", "TCP", hold, 3),
        svc("udp", "UDP", udp, 4),
    ]
    .join("---\n");
    let _web_backend = Backend::start(net.addr(1, backend_port), "web", Mode::Http);
    let _hold_backend = Backend::start(net.addr(3, backend_port), "hold", Mode::Echo);
    let _udp_backend = UdpBackend::start(net.addr(4, 5353), "u");
    let dns_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, dns));
    let mut rv = Ringvip::start(
        &manifest,
        &[
            "--dns-addr",
            &dns_addr.to_string(),
            "--max-connections-per-frontend",
            "2",
            "--drain-timeout-secs",
            "60",
        ],
    );
    let prom = Prometheus::start(&prom_bin, rv.metrics, &rules_for_the_test());
    // Precondition: a scrape before any traffic, so that every counter's
    // rise shows in a rate.
    prom.scraped();

    // Traffic of every kind the dashboard and the rules show.
    for _ in 0..5 {
        assert_eq!(ask(np(web)), Answer::Backend("web".into()));
    }
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(b"ping", np(udp)).unwrap();
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"u:ping");
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_when_ready(np(hold))).collect();
    for c in &mut held {
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
    }
    assert_ne!(
        echo(np(hold)),
        Answer::Echoed,
        "the third is over the limit"
    );
    ask_dns(dns_addr);
    // A Service change: one network programming latency sample.
    rv.apply(&format!(
        "{manifest}---\n{}",
        svc("extra", "TCP", free_port(), 1)
    ));
    prom.scraped();
    // An endpoint's series appear at the first scrape after its first use;
    // a rate needs a second sample.
    prom.scraped();
    let up = prom.query("up{job=\"ringvip\"}");
    assert_eq!(up[0]["value"][1], "1", "{up:?}");

    let has_endpoint_series = !prom
        .query(&format!("{{__name__=~\"{ENDPOINT_SERIES}.+\"}}"))
        .is_empty();
    let skip_endpoint = |what: &str| {
        eprintln!(
            "SKIP {what}: the scrape has no {ENDPOINT_SERIES}* series (per-endpoint \
             metrics not in this build); checked once they are"
        );
    };

    // Every dashboard query returns series.
    let (endpoint_exprs, port_exprs): (Vec<_>, Vec<_>) = dashboard_exprs(&dashboard())
        .into_iter()
        .map(|(t, e)| (t, substitute(&e)))
        .partition(|(_, e)| e.contains(ENDPOINT_SERIES));
    assert!(!port_exprs.is_empty() && !endpoint_exprs.is_empty());
    let missing = without_series(&prom, &port_exprs);
    assert!(
        missing.is_empty(),
        "dashboard queries without series:\n{}",
        missing.join("\n")
    );
    if has_endpoint_series {
        let missing = without_series(&prom, &endpoint_exprs);
        assert!(
            missing.is_empty(),
            "per-endpoint dashboard queries without series:\n{}",
            missing.join("\n")
        );
    } else {
        skip_endpoint(&format!(
            "{} per-endpoint dashboard queries",
            endpoint_exprs.len()
        ));
    }

    // Every rule is checked here, one way or another.
    let alerts = alert_exprs(&rules_yaml());
    for (name, _) in &alerts {
        let n = name.as_str();
        assert!(
            [
                &MADE_TRUE[..],
                &SELECTORS_ONLY,
                &MADE_TRUE_IN_A_NAMESPACE,
                &ENDPOINT_ALERTS
            ]
            .iter()
            .any(|list| list.contains(&n)),
            "{name}: say how this test checks it"
        );
    }
    // Every series a rule selects exists.
    let selected: Vec<(String, String)> = alerts
        .iter()
        .flat_map(|(name, e)| selectors(e).into_iter().map(move |s| (name.clone(), s)))
        .filter(|(_, s)| has_endpoint_series || !s.starts_with(ENDPOINT_SERIES))
        .collect();
    let missing = without_series(&prom, &selected);
    assert!(
        missing.is_empty(),
        "rule selectors without series:\n{}",
        missing.join("\n")
    );
    // The third hold client made this true.
    let limits = "RingvipLimitsHit";
    let missing = without_series(&prom, &[(limits.into(), expr_of(limits))]);
    assert!(missing.is_empty(), "not true:\n{}", missing.join("\n"));

    // All endpoints of "down" refuse: its only backend is not running.
    let failing = "RingvipEndpointsAllFailing";
    prom.two_evaluations();
    assert!(
        prom.alert_states(failing, "down").is_empty(),
        "not failing yet"
    );
    assert!(
        prom.alert_states(failing, "web").is_empty(),
        "web is healthy"
    );
    // Failing on: the port's series appear at the scrape after its first
    // failure, and a rate needs the rise after that.
    for _ in 0..3 {
        assert_ne!(ask(np(down)), Answer::Backend("down".into()));
    }
    prom.scraped();
    for _ in 0..3 {
        assert_ne!(ask(np(down)), Answer::Backend("down".into()));
    }
    prom.assert_true_after_a_scrape(failing, "down", &rv);
    if has_endpoint_series {
        let unhealthy = ENDPOINT_ALERTS[0];
        let missing = without_series(&prom, &[(unhealthy.into(), expr_of(unhealthy))]);
        assert!(missing.is_empty(), "not true:\n{}", missing.join("\n"));
    } else {
        skip_endpoint(ENDPOINT_ALERTS[0]);
    }
    prom.two_evaluations();
    assert_eq!(prom.alert_states(failing, "down"), vec!["firing"]);
    assert_eq!(prom.rule_state(failing), "firing");

    // The backend comes back: the next client is served, the alert resolves.
    let _down_backend = Backend::start(net.addr(2, backend_port), "down", Mode::Http);
    assert_eq!(ask(np(down)), Answer::Backend("down".into()));
    prom.scraped();
    prom.two_evaluations();
    assert!(prom.alert_states(failing, "down").is_empty(), "resolved");
    assert_eq!(prom.rule_state(failing), "inactive");

    // A drain that waits: one hold client stays connected after SIGTERM.
    held.truncate(1);
    rv.sigterm();
    let drain = "RingvipDrainStuck";
    // Precondition: the drain has begun, and a scrape after it.
    assert!(
        wait_until(Duration::from_secs(10), || rv.log().contains("draining")),
        "no drain:\n{}",
        rv.log()
    );
    prom.scraped();
    let draining = prom.query(&expr_of(drain));
    assert!(!draining.is_empty(), "{drain} not true:\n{}", rv.log());
    prom.two_evaluations();
    assert_eq!(prom.rule_state(drain), "firing");
    held.clear();
    assert!(rv.wait_exit(Duration::from_secs(10)), "{}", rv.log());
}

/// "No endpoints for a Service with traffic", for real: a ClusterIP without
/// endpoints, reached through ringvip's TUN in a network namespace of this
/// test (root), where ringvip refuses the client and counts `no_endpoints`;
/// Prometheus runs in the same namespace.
#[test]
fn no_endpoints_alert_fires_for_a_clusterip_with_traffic() {
    let Some((t, [prom_bin])) = Topology::setup_with(&[], [("prometheus", PROM_WHY)]) else {
        return;
    };
    let vip: SocketAddr = "10.96.0.40:80".parse().unwrap();
    let m = clusterip("orphan", "10.96.0.40", 80, "TCP", 8080, &[], "");
    let rv = t.launch(&m, &[]);
    let prom = Prometheus::start_in(Some(&t.node), &prom_bin, rv.metrics, &rules_for_the_test());
    let name = MADE_TRUE_IN_A_NAMESPACE[0];
    // Clients keep coming: the port's series appear at the scrape after the
    // first refusal, and the rate shows the refusals after that.
    for round in 0..2 {
        let refused = Topology::within(&t.node, move || connect_from(None, vip).is_err());
        assert!(
            refused,
            "a Service without endpoints refuses:\n{}",
            rv.log()
        );
        if round == 0 {
            prom.scraped();
        }
    }
    prom.assert_true_after_a_scrape(name, "orphan", &rv);
    prom.two_evaluations();
    assert_eq!(prom.alert_states(name, "orphan"), vec!["firing"]);
}
