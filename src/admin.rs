//! HTTP endpoints on the control runtime: `/healthz` and `/livez` on the
//! health address, `/metrics` on the metrics address.
//!
//! The health endpoints serve [`crate::state::Health`], the readiness model
//! the control loop keeps, in kube-proxy 1.33's shapes
//! (`pkg/proxy/healthcheck/proxy_health.go`). Differences, on purpose:
//!
//! * Times are RFC 3339 (UTC, nanoseconds when non-zero) rather than Go's
//!   `time.Time.String()`, and the body also carries `healthy`.
//! * Only GET and HEAD are answered (405 otherwise); kube-proxy's mux answers
//!   any method.
//!
//! As in kube-proxy, `lastUpdated` in a healthy response is the current time
//! (compatibility with old releases, where it meant "the sync loop ran
//! recently"). In an unhealthy response it is the time of the last apply, or
//! `""` when nothing was applied yet. [`HealthReport::last_updated`] always
//! holds the real value.
//!
//! Each connection is served in its own task by hyper's HTTP/1 server: a
//! malformed request gets a 400 and only its own connection is closed; a client
//! that does not send a complete request head within [`HEADER_READ_TIMEOUT`]
//! (also between keep-alive requests) is disconnected; at most
//! [`MAX_CONNECTIONS`] connections per server are open at once (further ones
//! wait in the listen backlog).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::model::ObjectKey;
use crate::state::{Health, HealthReport};
use crate::telemetry::{Metrics, OPENMETRICS_CONTENT_TYPE};

/// Path of the health endpoint that also reflects Node deletion.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Path of the liveness endpoint (proxy health only).
pub const LIVEZ_PATH: &str = "/livez";
/// Path of the Prometheus endpoint.
pub const METRICS_PATH: &str = "/metrics";

/// A client must send a complete request head within this time, also for
/// each further request on a kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once by one admin server.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest request head accepted (bigger gets 431).
const MAX_HEADER_SIZE: usize = 16 * 1024;

/// Bind an admin listener. The error names the address, so start-up fails
/// clearly (e.g. on EADDRINUSE); its kind is the original one.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// [`bind`], or take the listener the previous process served `role` on
/// `addr` with, when it handed one over.
pub async fn bind_or_take(
    addr: SocketAddr,
    role: crate::handover::Role,
    inherited: &crate::handover::Inherited,
) -> std::io::Result<TcpListener> {
    match inherited.take(role, addr, crate::handover::Transport::Tcp) {
        Some(fd) => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        }
        None => bind(addr).await,
    }
}

/// A duplicate of `l`'s socket (for the next process of an upgrade).
pub fn dup(l: &TcpListener) -> std::io::Result<std::os::fd::OwnedFd> {
    Ok(socket2::SockRef::from(l).try_clone()?.into())
}

/// Serve `/healthz` and `/livez` on `l` until the task is dropped.
/// `timeout` is how long an update may stay queued before the proxy counts
/// as unhealthy (kube-proxy: twice the sync period by default).
pub async fn serve_health(l: TcpListener, health: Arc<Health>, timeout: Duration) {
    serve(l, "health", HEADER_READ_TIMEOUT, move |req| {
        health_response(req, &health, timeout, SystemTime::now())
    })
    .await
}

/// Path of the JSON list of frontends (what `ringvip status` shows).
pub const API_FRONTENDS_PATH: &str = "/api/frontends";

/// Produces the JSON answer of [`API_FRONTENDS_PATH`].
pub type FrontendsApi = Arc<dyn Fn() -> String + Send + Sync>;

/// Answers [`crate::explain::API_EXPLAIN_PATH`] from the URL query (without
/// the `?`): an HTTP status code and a JSON body.
pub type ExplainApi = Arc<dyn Fn(&str) -> (u16, String) + Send + Sync>;

/// Serve `/metrics` and the admin JSON API on `l` until the task is dropped.
pub async fn serve_metrics_with_api(
    l: TcpListener,
    metrics: Arc<Metrics>,
    api: FrontendsApi,
    explain: ExplainApi,
) {
    serve(l, "metrics", HEADER_READ_TIMEOUT, move |req| {
        if req.uri().path() == API_FRONTENDS_PATH {
            if !is_get_or_head(req.method()) {
                return method_not_allowed();
            }
            return response(StatusCode::OK, "application/json", api());
        }
        if req.uri().path() == crate::explain::API_EXPLAIN_PATH {
            if !is_get_or_head(req.method()) {
                return method_not_allowed();
            }
            let (code, body) = explain(req.uri().query().unwrap_or_default());
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return response(status, "application/json", body);
        }
        metrics_response(req, &metrics)
    })
    .await
}

/// What one `healthCheckNodePort` server reports; its count is updated in
/// place after every snapshot compile, so the listener never moves.
#[derive(Debug)]
pub struct ServiceHealth {
    service: ObjectKey,
    local_endpoints: AtomicUsize,
}

impl ServiceHealth {
    /// A report for `service` with `n` local ready endpoints.
    pub fn new(service: ObjectKey, n: usize) -> Self {
        Self {
            service,
            local_endpoints: AtomicUsize::new(n),
        }
    }

    /// The Service reported on.
    pub fn service(&self) -> &ObjectKey {
        &self.service
    }

    /// Sets the number of local ready endpoints.
    pub fn set(&self, n: usize) {
        self.local_endpoints.store(n, Ordering::Relaxed);
    }
}

/// Serves a Service's `healthCheckNodePort` (kube-proxy's service health
/// server, pkg/proxy/healthcheck/service_health.go): any path answers with the
/// Service, its local endpoint count and the proxy's health; 200 when there
/// are local endpoints and the proxy is healthy, else 503.
pub async fn serve_service_health(
    l: TcpListener,
    sh: Arc<ServiceHealth>,
    health: Arc<Health>,
    timeout: Duration,
) {
    serve(l, "service-health", HEADER_READ_TIMEOUT, move |_req| {
        let healthy = health.report(SystemTime::now(), timeout).healthy;
        service_health_response(&sh, healthy)
    })
    .await
}

/// JSON body of a `healthCheckNodePort` answer, in kube-proxy's field names.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceHealthBody<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

fn service_health_response(sh: &ServiceHealth, proxy_healthy: bool) -> Response<Full<Bytes>> {
    let n = sh.local_endpoints.load(Ordering::Relaxed);
    let body = ServiceHealthBody {
        service: ServiceName {
            namespace: &sh.service.namespace,
            name: &sh.service.name,
        },
        local_endpoints: n,
        service_proxy_healthy: proxy_healthy,
    };
    let status = if n > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
    let mut resp = response(status, "application/json", json);
    resp.headers_mut().insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(n as u64),
    );
    resp
}

/// Accept loop shared by every admin server: one task per connection.
async fn serve<H>(l: TcpListener, server: &'static str, header_timeout: Duration, handler: H)
where
    H: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEADER_SIZE);
    if let Ok(local) = l.local_addr() {
        tracing::info!(server, address = %local, "admin HTTP server listening");
    }
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            // The semaphore is never closed; nothing sensible is left to do.
            return;
        };
        let (stream, peer) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(server, error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = handler(&req);
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(server, %peer, error = %e, "admin connection ended with error");
            }
        });
    }
}

fn is_get_or_head(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

fn not_found() -> Response<Full<Bytes>> {
    response(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n",
    )
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut resp = response(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain; charset=utf-8",
        "405 method not allowed\n",
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// JSON body of `/healthz` and `/livez`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthBody {
    last_updated: String,
    current_time: String,
    healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

fn health_response(
    req: &Request<Incoming>,
    health: &Health,
    timeout: Duration,
    now: SystemTime,
) -> Response<Full<Bytes>> {
    let with_node = match req.uri().path() {
        HEALTHZ_PATH => true,
        LIVEZ_PATH => false,
        _ => return not_found(),
    };
    if !is_get_or_head(req.method()) {
        return method_not_allowed();
    }
    let (status, body) = health_body(&health.report(now, timeout), with_node);
    response(status, "application/json", body)
}

/// Status and JSON body for a report; `with_node` for `/healthz`.
fn health_body(r: &HealthReport, with_node: bool) -> (StatusCode, String) {
    let healthy = if with_node { r.healthz() } else { r.healthy };
    let last_updated = if healthy {
        // kube-proxy: "lastUpdated" is "recent" whenever the server is healthy.
        rfc3339(r.current_time)
    } else {
        r.last_updated.map(rfc3339).unwrap_or_default()
    };
    let body = HealthBody {
        last_updated,
        current_time: rfc3339(r.current_time),
        healthy,
        node_eligible: with_node.then_some(!r.node_deleting),
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Serializing a struct of strings and bools cannot fail.
    let json = serde_json::to_string(&body).unwrap_or_default();
    (status, json)
}

fn metrics_response(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.uri().path() != METRICS_PATH {
        return not_found();
    }
    if !is_get_or_head(req.method()) {
        return method_not_allowed();
    }
    response(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, metrics.encode())
}

/// `t` as RFC 3339 in UTC: `2024-05-01T10:00:00Z`, with a fraction of up to
/// nine digits (trailing zeros dropped) when `t` is not on a whole second;
/// `""` outside the years -9999..=9999.
pub fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{PortLabels, CONNECTIONS_TOTAL};
    use std::time::UNIX_EPOCH;

    #[test]
    fn service_health_follows_kube_proxy() {
        let sh = ServiceHealth::new(ObjectKey::new("default", "web"), 2);
        let r = service_health_response(&sh, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["X-Load-Balancing-Endpoint-Weight"], "2");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        // no local endpoints, or an unhealthy proxy: 503
        sh.set(0);
        assert_eq!(
            service_health_response(&sh, true).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        sh.set(1);
        assert_eq!(
            service_health_response(&sh, false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let body = ServiceHealthBody {
            service: ServiceName {
                namespace: "default",
                name: "web",
            },
            local_endpoints: 1,
            service_proxy_healthy: false,
        };
        let v: serde_json::Value = serde_json::to_value(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 1);
        assert_eq!(v["serviceProxyHealthy"], false);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const TIMEOUT: Duration = Duration::from_secs(1);

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).expect("JSON body")
        }
    }

    /// Write `raw` and read until the server closes the connection.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw).await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("server closed in time")
            .expect("read");
        let text = String::from_utf8(buf).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("complete head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    async fn get(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        exchange(addr, req.as_bytes()).await
    }

    /// A listener on a free loopback port, and its address.
    async fn loopback() -> (TcpListener, SocketAddr) {
        let l = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("local addr");
        (l, addr)
    }

    /// A health server for a fresh [`Health`], and its address.
    async fn health_server() -> (Arc<Health>, SocketAddr) {
        let health = Arc::new(Health::new());
        (Arc::clone(&health), start_health(health).await)
    }

    /// The JSON body of `GET path`, which must answer `status` with a
    /// JSON content type.
    async fn json_at(addr: SocketAddr, path: &str, status: u16) -> serde_json::Value {
        let r = get(addr, "GET", path).await;
        assert_eq!(r.status, status, "GET {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json()
    }

    async fn start_health(health: Arc<Health>) -> SocketAddr {
        let (l, addr) = loopback().await;
        tokio::spawn(serve_health(l, health, TIMEOUT));
        addr
    }

    async fn start_metrics(metrics: Arc<Metrics>) -> SocketAddr {
        let (l, addr) = loopback().await;
        tokio::spawn(serve_metrics_with_api(
            l,
            metrics,
            Arc::new(|| "[]".to_string()),
            explain_api(),
        ));
        addr
    }

    /// The explain API over an empty snapshot.
    fn explain_api() -> ExplainApi {
        Arc::new(crate::explain::answer_empty)
    }

    /// Bad parameters get a 400 with a message saying what is wrong, good
    /// ones an explanation; the server keeps serving either way.
    #[tokio::test]
    async fn explain_endpoint_answers_and_refuses_bad_parameters() {
        let addr = start_metrics(Arc::new(Metrics::new())).await;
        for (query, says) in [
            ("", "missing parameter \"client\""),
            ("client=10.0.0.5", "missing parameter \"to\""),
            ("client=nope&to=10.96.0.10:80", "bad client address"),
            ("client=10.0.0.5&to=10.96.0.10", "bad destination"),
            (
                "client=10.0.0.5&to=10.96.0.10:80&proto=sctp",
                "unknown protocol",
            ),
            (
                "client=10.0.0.5&to=10.96.0.10:80&prot=udp",
                "unknown parameter",
            ),
        ] {
            let r = get(addr, "GET", &format!("/api/explain?{query}")).await;
            assert_eq!(r.status, 400, "{query}: {}", r.body);
            assert_eq!(r.header("content-type"), Some("application/json"));
            let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
            assert!(msg.contains(says), "{query}: {msg}");
        }
        let v = json_at(
            addr,
            "/api/explain?client=10.0.0.5&to=%5Bfd00%3A10%3A96%3A%3A10%5D%3A53&proto=UDP",
            200,
        )
        .await;
        assert_eq!(v["to"], "[fd00:10:96::10]:53");
        assert_eq!(v["protocol"], "UDP");
        assert_eq!(v["verdict"], "refuse");
        assert_eq!(
            get(addr, "POST", "/api/explain?client=1.2.3.4")
                .await
                .status,
            405
        );
        assert_eq!(get(addr, "GET", "/metrics").await.status, 200);
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn body_follows_kube_proxy() {
        let report = HealthReport {
            healthy: false,
            node_deleting: false,
            last_updated: None,
            current_time: at(1_700_000_000),
        };
        let (status, body) = health_body(&report, false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["lastUpdated"], "");
        assert_eq!(v["currentTime"], "2023-11-14T22:13:20Z");
        assert_eq!(v["healthy"], false);
        assert!(v.get("nodeEligible").is_none());

        let report = HealthReport {
            last_updated: Some(at(1_699_999_990)),
            ..report
        };
        let (_, body) = health_body(&report, true);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["lastUpdated"], "2023-11-14T22:13:10Z");
        assert_eq!(v["nodeEligible"], true);

        // Healthy: lastUpdated is the current time, as in kube-proxy.
        let report = HealthReport {
            healthy: true,
            ..report
        };
        let (status, body) = health_body(&report, true);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["lastUpdated"], v["currentTime"]);
        // Field order as in kube-proxy's body.
        assert!(body.starts_with(r#"{"lastUpdated":"#));
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(951_868_799)), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(at(1_709_251_199)), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(at(4_107_542_400)), "2100-03-01T00:00:00Z");
        assert_eq!(
            rfc3339(at(1_700_000_000) + Duration::from_millis(500)),
            "2023-11-14T22:13:20.5Z"
        );
        assert_eq!(
            rfc3339(at(1_700_000_000) + Duration::from_nanos(123_456_789)),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(250)),
            "1969-12-31T23:59:59.75Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(86_400 * 365)),
            "1969-01-01T00:00:00Z"
        );
    }

    #[tokio::test]
    async fn livez_turns_503_when_update_is_late() {
        let (health, addr) = health_server().await;

        let r = get(addr, "GET", "/livez").await;
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        let v = json_at(addr, "/livez", 200).await;
        assert_eq!(v["healthy"], true);
        assert!(v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(v["currentTime"].as_str().is_some_and(|s| s.ends_with('Z')));
        assert!(v.get("nodeEligible").is_none());

        // A fresh pending update is not late yet.
        health.queued(SystemTime::now());
        assert_eq!(get(addr, "GET", "/livez").await.status, 200);

        health.queued(SystemTime::now() - Duration::from_secs(10));
        let v = json_at(addr, "/livez", 503).await;
        assert_eq!(v["healthy"], false);
        assert_eq!(v["lastUpdated"], "");
        assert_eq!(get(addr, "GET", "/healthz").await.status, 503);

        let applied = SystemTime::now();
        health.applied(applied);
        assert_eq!(get(addr, "GET", "/livez").await.status, 200);
        health.queued(SystemTime::now() - Duration::from_secs(10));
        let v = get(addr, "GET", "/livez").await.json();
        assert_eq!(v["lastUpdated"], rfc3339(applied).as_str());
    }

    #[tokio::test]
    async fn healthz_503_when_node_deleting() {
        let (health, addr) = health_server().await;

        let v = json_at(addr, "/healthz", 200).await;
        assert_eq!(v["healthy"], true);
        assert_eq!(v["nodeEligible"], true);
        for field in ["lastUpdated", "currentTime"] {
            assert!(v[field].is_string(), "{field} in {v}");
        }

        health.set_node_deleting(true);
        let v = json_at(addr, "/healthz", 503).await;
        assert_eq!(v["healthy"], false);
        assert_eq!(v["nodeEligible"], false);
        // /livez ignores the Node.
        assert_eq!(get(addr, "GET", "/livez").await.status, 200);

        health.set_node_deleting(false);
        assert_eq!(get(addr, "GET", "/healthz").await.status, 200);
    }

    #[tokio::test]
    async fn health_server_routes() {
        let addr = start_health(Arc::new(Health::new())).await;
        assert_eq!(get(addr, "GET", "/metrics").await.status, 404);
        assert_eq!(get(addr, "GET", "/").await.status, 404);
        assert_eq!(get(addr, "GET", "/healthz/x").await.status, 404);
        assert_eq!(get(addr, "GET", "/healthz?verbose=1").await.status, 200);
        assert_eq!(get(addr, "POST", "/healthz").await.status, 405);
        let r = get(addr, "HEAD", "/livez").await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
    }

    #[tokio::test]
    async fn metrics_endpoint() {
        let metrics = Arc::new(Metrics::new());
        let port = metrics.port(&PortLabels {
            namespace: "ns".into(),
            service: "svc".into(),
            port: "http".into(),
            protocol: "TCP".into(),
        });
        port.connections_total.inc_by(7);
        let addr = start_metrics(Arc::clone(&metrics)).await;

        let r = get(addr, "GET", "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        let line = format!(
            "{CONNECTIONS_TOTAL}{{namespace=\"ns\",service=\"svc\",port=\"http\",protocol=\"TCP\"}} 7"
        );
        assert!(r.body.lines().any(|l| l == line), "{line} in\n{}", r.body);
        assert!(r
            .body
            .contains(crate::telemetry::SYNC_PROXY_RULES_DURATION_SECONDS));

        assert_eq!(get(addr, "HEAD", "/metrics").await.status, 200);
        assert_eq!(get(addr, "POST", "/metrics").await.status, 405);
        assert_eq!(get(addr, "PUT", "/metrics").await.status, 405);
        assert_eq!(get(addr, "GET", "/healthz").await.status, 404);
        assert_eq!(get(addr, "GET", "/nope").await.status, 404);
    }

    #[tokio::test]
    async fn post_metrics_with_body_is_405() {
        let addr = start_metrics(Arc::new(Metrics::new())).await;
        let r = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }

    #[tokio::test]
    async fn garbage_gets_400_and_server_keeps_serving() {
        let (_health, addr) = health_server().await;
        let metrics_addr = start_metrics(Arc::new(Metrics::new())).await;

        // A connection left open mid-request must not block others.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET /livez HTTP/1.1\r\n")
            .await
            .expect("write");

        for a in [addr, metrics_addr] {
            let r = exchange(a, b"\x00\x01garbage \xff\r\n\r\n").await;
            assert_eq!(r.status, 400);
            let r = exchange(a, b"GET / HTTP/1.1\r\nHost\r\n\r\n").await;
            assert_eq!(r.status, 400);
        }
        assert_eq!(get(addr, "GET", "/livez").await.status, 200);
        assert_eq!(get(metrics_addr, "GET", "/metrics").await.status, 200);

        // Keep-alive: two requests on one connection.
        let r = exchange(
            addr,
            b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.matches("HTTP/1.1 200 OK").count(), 1);
        drop(idle);
    }

    #[tokio::test]
    async fn slow_client_is_disconnected() {
        let (l, addr) = loopback().await;
        let health = Arc::new(Health::new());
        tokio::spawn(serve(l, "test", Duration::from_millis(200), move |req| {
            health_response(req, &health, TIMEOUT, SystemTime::now())
        }));

        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /livez HTTP/1.1\r\nHost")
            .await
            .expect("write");
        let mut buf = Vec::new();
        // The server closes the connection (possibly after a 408) well
        // before the test's own timeout.
        tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut buf))
            .await
            .expect("slow client disconnected")
            .ok();
        let silent = TcpStream::connect(addr).await.expect("connect");
        let mut silent = silent;
        tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut buf))
            .await
            .expect("silent client disconnected")
            .ok();
        assert_eq!(get(addr, "GET", "/livez").await.status, 200);
    }

    #[tokio::test]
    async fn bind_reports_address_in_use() {
        let (_l, addr) = loopback().await;
        let e = bind(addr).await.expect_err("second bind fails");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
