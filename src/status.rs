//! `ringvip status`: what each frontend serves and has carried, from the admin
//! JSON API (`/api/frontends` on the metrics address), as a table or JSON.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::admin::API_FRONTENDS_PATH;
use crate::balance::PassiveHealth;
use crate::probe::CheckTable;
use crate::state::{EmptyAction, Frontend, FrontendKind, Snapshot};
use crate::telemetry::{ConnectFailure, Traffic};

/// Which Service port a frontend serves, as `status` and `explain` both
/// report it (flattened into their JSON rows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendOf {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub service: String,
    /// Service port name (may be empty).
    pub port: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    pub kind: String,
}

impl FrontendOf {
    /// The Service port `fe` serves.
    pub fn of(fe: &Frontend) -> Self {
        FrontendOf {
            namespace: fe.service.namespace.clone(),
            service: fe.service.name.clone(),
            port: fe.port_name.clone(),
            protocol: fe.proto.as_str().into(),
            kind: kind_name(fe.kind).into(),
        }
    }
}

/// What a frontend does with no usable endpoint: `refuse` or `drop`.
pub fn when_empty_name(fe: &Frontend) -> &'static str {
    match fe.when_empty {
        EmptyAction::Refuse => "refuse",
        EmptyAction::Drop => "drop",
    }
}

/// A frontend kind as Kubernetes users name it.
pub fn kind_name(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::LoadBalancer => "LoadBalancer",
        FrontendKind::ExternalIp => "ExternalIP",
    }
}

/// One frontend as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendStatus {
    /// The Service port it serves.
    #[serde(flatten)]
    pub of: FrontendOf,
    /// Address and port clients use.
    pub address: String,
    /// Usable endpoints after policy filtering.
    pub endpoints: Vec<String>,
    /// Of those, the ones backed off after failed connects (passive health).
    pub failing: Vec<String>,
    /// With no usable endpoint: `refuse` or `drop`.
    pub when_empty: String,
    /// Active health checks (`ringvip.io/health-check`) of every endpoint
    /// of the port, usable or not; empty without the annotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<EndpointCheck>,
    /// What this frontend has carried (its own counters, not its Service
    /// port's); its fields are the row's own in JSON.
    #[serde(flatten)]
    pub traffic: PortTraffic,
}

/// One endpoint's active health check, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCheck {
    /// `IP:port`.
    pub endpoint: String,
    /// `up` or `down` (after rise/fall).
    pub health: String,
    /// `ok`, `pending`, or why the last check failed.
    pub last: String,
}

/// The checks of every endpoint of `fe`'s port, in address order.
fn checks_of(fe: &crate::state::Frontend, checks: &CheckTable) -> Vec<EndpointCheck> {
    fe.candidates
        .addrs()
        .filter_map(|addr| {
            let s = checks.get(&fe.service, addr)?;
            Some(EndpointCheck {
                endpoint: addr.to_string(),
                health: if s.up { "up" } else { "down" }.into(),
                last: s.last,
            })
        })
        .collect()
}

/// What a frontend has carried, from its live counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTraffic {
    /// Connections (and UDP flows) relayed now.
    pub active: i64,
    /// Connections (and UDP flows) relayed since start.
    pub total: u64,
    /// Bytes client → backend.
    pub bytes_to_backend: u64,
    /// Bytes backend → client.
    pub bytes_to_client: u64,
    /// Failed connects by reason (non-zero only).
    pub connect_failures: BTreeMap<String, u64>,
}

impl PortTraffic {
    /// The counters of a frontend, now.
    pub fn of(m: &Traffic) -> Self {
        PortTraffic {
            active: m.connections_active.get(),
            total: m.connections_total.get(),
            bytes_to_backend: m.bytes_to_backend.get(),
            bytes_to_client: m.bytes_to_client.get(),
            connect_failures: ConnectFailure::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), m.connect_failures(*r)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// Every frontend of a snapshot that is served, sorted by Service, port and
/// address: ClusterIP frontends only with `cluster_ips` (a TUN device
/// captures them; without one nothing reaches them).
pub fn frontends(
    snap: &Snapshot,
    health: &PassiveHealth,
    checks: &CheckTable,
    now: Instant,
    cluster_ips: bool,
) -> Vec<FrontendStatus> {
    let mut rows: Vec<FrontendStatus> = snap
        .frontends()
        .filter(|(_, fe)| cluster_ips || fe.kind != FrontendKind::ClusterIp)
        .map(|(key, fe)| FrontendStatus {
            of: FrontendOf::of(fe),
            address: key.addr.to_string(),
            endpoints: fe.endpoints.iter().map(ToString::to_string).collect(),
            failing: fe
                .endpoints
                .iter()
                .filter(|e| health.is_failing(e, now))
                .map(ToString::to_string)
                .collect(),
            when_empty: when_empty_name(fe).into(),
            checks: checks_of(fe, checks),
            traffic: PortTraffic::of(&fe.traffic),
        })
        .collect();
    rows.sort_by(|a, b| {
        (
            &a.of.namespace,
            &a.of.service,
            &a.of.port,
            &a.of.protocol,
            &a.address,
        )
            .cmp(&(
                &b.of.namespace,
                &b.of.service,
                &b.of.port,
                &b.of.protocol,
                &b.address,
            ))
    });
    rows
}

/// The admin API's JSON answer (see [`frontends`] for `cluster_ips`).
pub fn frontends_json(
    snap: &Snapshot,
    health: &PassiveHealth,
    checks: &CheckTable,
    cluster_ips: bool,
) -> String {
    serde_json::to_string(&frontends(
        snap,
        health,
        checks,
        Instant::now(),
        cluster_ips,
    ))
    .unwrap_or_else(|_| "[]".to_string())
}

/// Output format of `ringvip status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line per frontend.
    Table,
    /// The table plus endpoints and failures.
    Wide,
    /// The API's JSON, pretty-printed.
    Json,
}

/// Renders rows as `ringvip status` prints them.
pub fn render(rows: &[FrontendStatus], format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(rows).unwrap_or_default() + "\n";
    }
    let mut out = String::new();
    let header = [
        "SERVICE",
        "PORT",
        "KIND",
        "ADDRESS",
        "ENDPOINTS",
        "ACTIVE",
        "TOTAL",
        "IN",
        "OUT",
    ];
    let mut first: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    if format == Format::Wide {
        first.push("FAILURES".into());
        first.push("ENDPOINT LIST".into());
        first.push("CHECKS".into());
    }
    let cols = first.len();
    let mut lines: Vec<Vec<String>> = vec![first];
    for r in rows {
        let port = if r.of.port.is_empty() {
            r.of.protocol.clone()
        } else {
            format!("{}/{}", r.of.port, r.of.protocol)
        };
        let mut l = vec![
            format!("{}/{}", r.of.namespace, r.of.service),
            port,
            r.of.kind.clone(),
            r.address.clone(),
            r.endpoints.len().to_string(),
            r.traffic.active.to_string(),
            r.traffic.total.to_string(),
            r.traffic.bytes_to_backend.to_string(),
            r.traffic.bytes_to_client.to_string(),
        ];
        if format == Format::Wide {
            let f: Vec<String> = r
                .traffic
                .connect_failures
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            l.push(if f.is_empty() {
                "-".into()
            } else {
                f.join(",")
            });
            l.push(if r.endpoints.is_empty() {
                format!("(none: {})", r.when_empty)
            } else {
                r.endpoints
                    .iter()
                    .map(|e| {
                        if r.failing.contains(e) {
                            format!("{e}(failing)")
                        } else {
                            e.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            });
            l.push(if r.checks.is_empty() {
                "-".into()
            } else {
                r.checks
                    .iter()
                    .map(|c| format!("{} {} ({})", c.endpoint, c.health, c.last))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
        }
        lines.push(l);
    }
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Could not get the status from a running ringvip.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Connecting or reading failed.
    #[error("cannot reach the admin API at {addr}: {source} (is ringvip running with --metrics-addr {addr}?)")]
    Io {
        /// Admin address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not what the API sends.
    #[error("unexpected answer from {addr}: {detail}")]
    Answer {
        /// Admin address.
        addr: SocketAddr,
        /// What was wrong.
        detail: String,
    },
}

/// Fetches the frontends from a running ringvip's admin API.
pub fn fetch(addr: SocketAddr) -> Result<Vec<FrontendStatus>, StatusError> {
    let (status, body) = admin_get(addr, API_FRONTENDS_PATH)?;
    let answer = |detail: String| StatusError::Answer { addr, detail };
    if status != 200 {
        return Err(answer(format!("HTTP {status}")));
    }
    serde_json::from_str(&body).map_err(|e| answer(e.to_string()))
}

/// `GET path` on a running ringvip's admin API: the status code and body.
pub fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), StatusError> {
    let io = |source| StatusError::Io { addr, source };
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(io)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut text = String::new();
    c.read_to_string(&mut text).map_err(io)?;
    let answer = |detail: String| StatusError::Answer { addr, detail };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| answer("no HTTP header".into()))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| answer(head.lines().next().unwrap_or_default().to_string()))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tun::sample_snapshot;

    #[test]
    fn rows_follow_the_snapshot_and_metrics() {
        let snap = sample_snapshot(true);
        let health = PassiveHealth::default();
        let now = Instant::now();
        let rows = frontends(&snap, &health, &CheckTable::default(), now, true);
        // TCP and UDP ports on two ClusterIPs
        assert_eq!(rows.len(), 4);
        let tcp4 = rows
            .iter()
            .find(|r| r.address == "10.96.0.10:80")
            .expect("tcp v4 row");
        assert_eq!(tcp4.of.kind, "ClusterIP");
        assert_eq!(tcp4.endpoints, vec!["10.0.0.1:8080".to_string()]);
        let tcp6 = rows
            .iter()
            .find(|r| r.address == "[fd00:10:96::10]:80")
            .expect("tcp v6 row");
        assert!(tcp6.endpoints.is_empty(), "the slice is IPv4 only");
        // counters are the frontend's own live counters, not its port's
        let (_, fe) = snap
            .frontends()
            .find(|(k, _)| k.addr.to_string() == "10.96.0.10:80")
            .unwrap();
        fe.traffic.connections_total.inc_by(3);
        fe.traffic.bytes_to_client.inc_by(10);
        fe.connect_failure(ConnectFailure::Refused, None);
        fe.metrics.connections_total.inc_by(5);
        health.failed("10.0.0.1:8080".parse().unwrap(), now);
        let again = frontends(&snap, &health, &CheckTable::default(), now, true);
        let tcp4 = again.iter().find(|r| r.address == "10.96.0.10:80").unwrap();
        assert_eq!(tcp4.traffic.total, 3);
        assert_eq!(tcp4.traffic.bytes_to_client, 10);
        assert_eq!(tcp4.traffic.connect_failures.get("refused"), Some(&1));
        // The other frontend of the same Service port carried nothing.
        let tcp6 = again
            .iter()
            .find(|r| r.address == "[fd00:10:96::10]:80")
            .unwrap();
        assert_eq!((tcp6.traffic.total, tcp6.traffic.bytes_to_client), (0, 0));
        assert!(tcp6.traffic.connect_failures.is_empty());
        assert_eq!(tcp4.failing, vec!["10.0.0.1:8080".to_string()]);
        assert!(render(&again, Format::Wide).contains("10.0.0.1:8080(failing)"));
    }

    /// The JSON row is flat, its keys in the order the API has always sent.
    #[test]
    fn json_rows_keep_their_keys() {
        let rows = frontends(
            &sample_snapshot(true),
            &PassiveHealth::default(),
            &CheckTable::default(),
            Instant::now(),
            true,
        );
        let json = serde_json::to_string(&rows[0]).unwrap();
        let keys = [
            "namespace",
            "service",
            "port",
            "protocol",
            "kind",
            "address",
            "endpoints",
            "failing",
            "when_empty",
            "active",
            "total",
            "bytes_to_backend",
            "bytes_to_client",
            "connect_failures",
        ];
        let at: Vec<usize> = keys
            .iter()
            .map(|k| json.find(&format!("\"{k}\":")).expect(k))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{json}");
    }

    #[test]
    fn table_json_round_trip_and_wide_columns() {
        let health = PassiveHealth::default();
        let rows = frontends(
            &sample_snapshot(true),
            &health,
            &CheckTable::default(),
            Instant::now(),
            true,
        );
        let json = frontends_json(
            &sample_snapshot(true),
            &health,
            &CheckTable::default(),
            true,
        );
        let back: Vec<FrontendStatus> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), rows.len());
        let table = render(&rows, Format::Table);
        assert!(table.starts_with("SERVICE"));
        assert!(table.contains("default/web"));
        assert_eq!(table.lines().count(), rows.len() + 1);
        let wide = render(&rows, Format::Wide);
        assert!(wide.contains("10.0.0.1:8080"));
        assert!(wide.contains("(none: refuse)"));
    }

    /// Without a TUN nothing reaches a ClusterIP: no row claims it is served.
    #[test]
    fn cluster_ip_rows_only_with_a_tun() {
        let snap = sample_snapshot(true);
        let health = PassiveHealth::default();
        let with = frontends(&snap, &health, &CheckTable::default(), Instant::now(), true);
        assert!(with.iter().any(|r| r.of.kind == "ClusterIP"));
        let without = frontends(
            &snap,
            &health,
            &CheckTable::default(),
            Instant::now(),
            false,
        );
        assert!(without.is_empty(), "{without:?}");
    }
}
