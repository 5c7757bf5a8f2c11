//! The `admin_http` oracle: raw bytes to the admin HTTP servers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::model::ObjectKey;
use crate::telemetry::Metrics;

/// The admin HTTP servers fed raw bytes, each over a fresh loopback
/// connection: the health server, the metrics + API server and a
/// `healthCheckNodePort` server. Each answers only in its own shapes (hyper's
/// own error answers aside), and the health check port serves nothing but
/// the health answer.
pub fn admin_http(data: &[u8]) {
    ADMIN.with(|rig| {
        let rig = rig.get_or_init(AdminRig::start);
        for (server, addr) in [
            (Server::Health, rig.health),
            (Server::Metrics, rig.metrics),
            (Server::ServiceHealth, rig.service),
        ] {
            let reply = rig.rt.block_on(exchange(addr, data));
            check_replies(server, &reply, data);
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    Health,
    Metrics,
    ServiceHealth,
}

struct AdminRig {
    rt: tokio::runtime::Runtime,
    health: SocketAddr,
    metrics: SocketAddr,
    service: SocketAddr,
}

thread_local! {
    static ADMIN: std::cell::OnceCell<AdminRig> = const { std::cell::OnceCell::new() };
}

impl AdminRig {
    fn start() -> AdminRig {
        use crate::admin;
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            panic!("no runtime")
        };
        let (health, metrics, service) = rt.block_on(async {
            let bind = || admin::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
            let (Ok(h), Ok(m), Ok(s)) = (bind().await, bind().await, bind().await) else {
                panic!("cannot bind loopback listeners")
            };
            let addrs = (h.local_addr(), m.local_addr(), s.local_addr());
            let (Ok(ha), Ok(ma), Ok(sa)) = addrs else {
                panic!("no local address")
            };
            let state = Arc::new(crate::state::Health::new());
            let timeout = Duration::from_secs(60);
            tokio::spawn(admin::serve_health(h, state.clone(), timeout));
            let metrics = Arc::new(Metrics::new());
            let api: admin::FrontendsApi = Arc::new(|| r#"[{"frontend":"x"}]"#.to_string());
            // The real explain answer (over an empty snapshot): bad
            // queries get 400, which the oracle allows on this server.
            let explain: admin::ExplainApi = Arc::new(crate::explain::answer_empty);
            tokio::spawn(admin::serve_metrics_with_api(m, metrics, api, explain));
            let sh = Arc::new(admin::ServiceHealth::new(
                ObjectKey::new("default", "web"),
                2,
            ));
            tokio::spawn(admin::serve_service_health(s, sh, state, timeout));
            (ha, ma, sa)
        });
        AdminRig {
            rt,
            health,
            metrics,
            service,
        }
    }
}

/// Writes `data`, half-closes, and reads whatever comes back until the server
/// closes. A server that keeps the connection open after the client's EOF
/// for 5 s is a finding.
async fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        panic!("admin server at {addr} is gone")
    };
    let (mut r, mut w) = s.split();
    let mut buf = Vec::new();
    let write = async {
        // The server may answer and close before reading everything.
        let _ = w.write_all(data).await;
        let _ = w.shutdown().await;
    };
    let read = async {
        let _ = r.read_to_end(&mut buf).await;
    };
    let both = async { tokio::join!(write, read) };
    if tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .is_err()
    {
        panic!("{addr}: connection still open 5 s after the client's EOF");
    }
    buf
}

/// Checks every response in `reply` (pipelined requests get one each).
fn check_replies(server: Server, reply: &[u8], request: &[u8]) {
    // An HTTP/1.0 request gets an HTTP/1.0 answer.
    let text = String::from_utf8_lossy(reply).replace("HTTP/1.0 ", "HTTP/1.1 ");
    if text.is_empty() {
        return;
    }
    assert!(
        text.starts_with("HTTP/1.1 "),
        "{server:?}: not an HTTP/1.x response: {text:?} to {request:?}"
    );
    for piece in text.split("HTTP/1.1 ").skip(1) {
        let status: u16 = piece.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = piece.split_once("\r\n\r\n").unwrap_or((piece, ""));
        let head = head.to_ascii_lowercase();
        // Ours carry nosniff; hyper's own error answers do not and are empty.
        let ours = head.contains("x-content-type-options: nosniff");
        assert!(
            !text.contains("# TYPE") || server == Server::Metrics,
            "{server:?} served metrics"
        );
        if !ours {
            assert!(
                (400..600).contains(&status) && body.is_empty(),
                "{server:?}: unexpected {status}: {piece:?}"
            );
            continue;
        }
        let allowed: &[u16] = match server {
            Server::Health => &[200, 404, 405, 503],
            // 400: a bad /api/explain query.
            Server::Metrics => &[200, 400, 404, 405],
            Server::ServiceHealth => &[200, 503],
        };
        assert!(allowed.contains(&status), "{server:?}: {status}: {piece:?}");
        if server == Server::ServiceHealth {
            // Any path and method: the health answer and nothing else.
            assert!(
                head.contains("x-load-balancing-endpoint-weight: 2")
                    && head.contains("content-type: application/json"),
                "{piece:?}"
            );
            assert!(
                body.is_empty() || body.starts_with(r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":"#),
                "{piece:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The health check port answers every path and method with the health
    /// answer only: never metrics, the API or /healthz's body.
    #[test]
    fn health_check_port_serves_only_the_health_answer() {
        for req in [
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /api/frontends HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "POST /anything?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        ] {
            ADMIN.with(|rig| {
                let rig = rig.get_or_init(AdminRig::start);
                let reply = rig.rt.block_on(exchange(rig.service, req.as_bytes()));
                let text = String::from_utf8_lossy(&reply);
                assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{req}: {text}");
                let body = text.split_once("\r\n\r\n").unwrap().1;
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(
                    v,
                    serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
                );
                check_replies(Server::ServiceHealth, &reply, req.as_bytes());
            });
        }
        // The metrics server, fed the same, does serve metrics: the oracle
        // would notice them on the health check port.
        let reply = ADMIN.with(|rig| {
            let rig = rig.get_or_init(AdminRig::start);
            rig.rt.block_on(exchange(
                rig.metrics,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ))
        });
        assert!(String::from_utf8_lossy(&reply).contains("# TYPE"));
        let caught = std::panic::catch_unwind(|| check_replies(Server::ServiceHealth, &reply, b""));
        assert!(
            caught.is_err(),
            "metrics on the health check port must fail the oracle"
        );
    }
}
