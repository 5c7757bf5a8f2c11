//! `ringvip explain CLIENT VIP:PORT[/PROTO]`: what ringvip does with a new
//! flow from a client to an address, and why — the question kube-proxy's
//! operators answer by reading iptables.
//!
//! Built from the same pure pieces the data plane uses, so it cannot tell a
//! different story: [`crate::dataplane::flow::decide`] for the verdict, the
//! snapshot's per-port candidates with [`crate::state::explain_endpoint`]
//! (held to the compile's own filter by a property test) for each endpoint,
//! and the live passive-health, affinity and limit state, read without
//! changing it. A running instance answers it on its admin API
//! ([`API_EXPLAIN_PATH`]); `--manifests` compiles a snapshot from files.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::balance::{AffinityTable, PassiveHealth};
use crate::dataplane::flow::{decide, FlowKey, Verdict};
use crate::dataplane::limits::ConnLimits;
use crate::model::{Protocol, TrafficPolicy};
use crate::state::{explain_endpoint, EmptyAction, Frontend, FrontendKind, Snapshot};
use crate::status::{kind_name, when_empty_name, FrontendOf};

/// Path of the explain endpoint on the metrics (admin) address:
/// `GET /api/explain?client=IP&to=VIP:PORT&proto=tcp|udp`.
pub const API_EXPLAIN_PATH: &str = "/api/explain";

/// The flow to explain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// The client's address.
    pub client: IpAddr,
    /// Where it connects: a ClusterIP, node address, LB IP or externalIP, and port.
    pub to: SocketAddr,
    /// TCP or UDP.
    pub proto: Protocol,
}

/// A query that cannot be explained, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The client is not an IP address.
    #[error("bad client address {0:?}: expected an IP address such as 10.0.0.5")]
    Client(String),
    /// The destination is not ADDRESS:PORT.
    #[error(
        "bad destination {0:?}: expected VIP:PORT such as 10.96.0.10:80 or [fd00:10:96::10]:80"
    )]
    To(String),
    /// Neither TCP nor UDP.
    #[error("unknown protocol {0:?}: expected tcp or udp")]
    Proto(String),
    /// A required API parameter is absent.
    #[error("missing parameter {0:?} (expected client=IP&to=VIP:PORT[&proto=tcp|udp])")]
    Missing(&'static str),
    /// An API parameter that does not exist (a typo would otherwise be ignored).
    #[error("unknown parameter {0:?} (expected client, to, proto)")]
    Unknown(String),
}

fn parse_proto(s: &str) -> Result<Protocol, QueryError> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(QueryError::Proto(s.to_string())),
    }
}

fn parse_client(s: &str) -> Result<IpAddr, QueryError> {
    // A client given with its port is accepted: only its address matters.
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
        .map_err(|_| QueryError::Client(s.to_string()))
}

fn parse_to(s: &str) -> Result<SocketAddr, QueryError> {
    s.parse().map_err(|_| QueryError::To(s.to_string()))
}

impl Query {
    /// The command line's form: `CLIENT` and `VIP:PORT[/PROTO]` (TCP when
    /// no protocol is given).
    pub fn parse(client: &str, to: &str) -> Result<Query, QueryError> {
        let (addr, proto) = match to.rsplit_once('/') {
            Some((a, p)) => (a, parse_proto(p)?),
            None => (to, Protocol::Tcp),
        };
        Ok(Query {
            client: parse_client(client)?,
            to: parse_to(addr)?,
            proto,
        })
    }

    /// The API's form: the URL query `client=..&to=..&proto=..`
    /// (percent-encoded or not; `proto` defaults to tcp).
    pub fn from_params(query: &str) -> Result<Query, QueryError> {
        let (mut client, mut to, mut proto) = (None, None, None);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "client" => client = Some(v.into_owned()),
                "to" => to = Some(v.into_owned()),
                "proto" => proto = Some(v.into_owned()),
                other => return Err(QueryError::Unknown(other.to_string())),
            }
        }
        Ok(Query {
            client: parse_client(&client.ok_or(QueryError::Missing("client"))?)?,
            to: parse_to(&to.ok_or(QueryError::Missing("to"))?)?,
            proto: proto.as_deref().map_or(Ok(Protocol::Tcp), parse_proto)?,
        })
    }

    /// The URL query [`Query::from_params`] reads.
    pub fn to_params(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("client", &self.client.to_string())
            .append_pair("to", &self.to.to_string())
            .append_pair("proto", &self.proto.as_str().to_ascii_lowercase())
            .finish()
    }
}

/// The live data-plane state an explanation reads (never changes).
#[derive(Debug, Clone, Copy)]
pub struct Live<'a> {
    /// Passive health (endpoints backed off after failed connects).
    pub health: &'a PassiveHealth,
    /// ClientIP affinity entries.
    pub affinity: &'a AffinityTable,
    /// Connection limits; `None` when explaining manifests.
    pub limits: Option<&'a ConnLimits>,
    /// Whether ClusterIPs are captured (a TUN device is up).
    pub cluster_ips: bool,
    /// The time the explanation is for.
    pub now: Instant,
}

/// What ringvip does with the flow, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The client address.
    pub client: String,
    /// The destination address and port.
    pub to: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `forward`, `refuse`, `drop` or `not_served`.
    pub verdict: String,
    /// Why, in one sentence.
    pub reason: String,
    /// The frontend matched, if any.
    pub frontend: Option<FrontendExplained>,
    /// Every endpoint of the Service port (this address family), eligible or not.
    pub endpoints: Vec<EndpointExplained>,
    /// ClientIP affinity for this client, when the Service has it.
    pub affinity: Option<AffinityExplained>,
    /// What a pick for a new flow would choose from; empty when none is made.
    pub pick: Vec<String>,
    /// How the pick chooses: `affinity`, `random`, `random_any_failing` or `none`.
    pub pick_rule: String,
    /// Connection limits that would refuse a new TCP connection now.
    pub limits: Vec<String>,
    /// Other frontends on the same address (when nothing matched).
    pub same_address: Vec<String>,
}

/// The frontend a flow matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendExplained {
    /// The Service port it serves.
    #[serde(flatten)]
    pub of: FrontendOf,
    /// `internalTrafficPolicy` (ClusterIPs) or `externalTrafficPolicy`.
    pub policy_field: String,
    /// `Cluster` or `Local`.
    pub policy: String,
    /// This node's zone at compile.
    pub zone: Option<String>,
    /// ClientIP affinity timeout in seconds, when enabled.
    pub affinity_timeout_secs: Option<u64>,
    /// `loadBalancerSourceRanges` applied (LoadBalancer IPs only).
    pub source_ranges: Vec<String>,
    /// What happens with no eligible endpoint: `refuse` or `drop`.
    pub when_empty: String,
}

/// One endpoint and why it is or is not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointExplained {
    /// `IP:port`.
    pub address: String,
    /// In the set the frontend picks from.
    pub eligible: bool,
    /// The policy rule's verdict (see [`crate::state::Eligibility::as_str`]).
    pub rule: String,
    /// The same for people, with live state.
    pub why: String,
    /// Ready condition.
    pub ready: bool,
    /// Serving condition.
    pub serving: bool,
    /// Terminating condition.
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    /// Zone hints, when it has any.
    pub zone_hints: Option<Vec<String>>,
    /// Node hints (PreferSameNode), when it has any.
    #[serde(default)]
    pub node_hints: Option<Vec<String>>,
    /// Milliseconds it stays backed off after failed connects (passive health).
    pub backed_off_ms: Option<u64>,
}

/// ClientIP affinity state for the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityExplained {
    /// The endpoint remembered for the client, if any.
    pub endpoint: Option<String>,
    /// Milliseconds until it is forgotten without use.
    pub expires_in_ms: Option<u64>,
    /// Whether the next pick keeps it (still eligible and not backed off
    /// while another is healthy).
    pub kept: bool,
}

fn policy_name(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Explains a new flow `q` against `snap` and the live state.
pub fn explain(snap: &Snapshot, q: &Query, live: &Live<'_>) -> Explanation {
    let key = FlowKey {
        src: SocketAddr::new(q.client, 0),
        dst: q.to,
        proto: q.proto,
    };
    let (fe, verdict) = decide(snap, &key);
    let mut out = Explanation {
        client: q.client.to_string(),
        to: q.to.to_string(),
        protocol: q.proto.as_str().to_string(),
        verdict: String::new(),
        reason: String::new(),
        frontend: None,
        endpoints: Vec::new(),
        affinity: None,
        pick: Vec::new(),
        pick_rule: "none".into(),
        limits: Vec::new(),
        same_address: Vec::new(),
    };
    let Some(fe) = fe else {
        out.verdict = "refuse".into();
        out.same_address = same_address(snap, q.to.ip(), live.cluster_ips);
        out.reason = if out.same_address.is_empty() {
            format!(
                "no Service port is served at {} here (no ClusterIP, node address, LoadBalancer IP or externalIP of this node with that port and protocol): the connection is refused",
                q.to.ip()
            )
        } else {
            format!(
                "no Service port {}/{} on this address: the connection is refused",
                q.to.port(),
                q.proto
            )
        };
        return out;
    };
    out.frontend = Some(frontend_explained(fe));
    out.endpoints = endpoints_explained(fe, live);
    let not_served = fe.kind == FrontendKind::ClusterIp && !live.cluster_ips;
    match (&verdict, not_served) {
        (_, true) => {
            out.verdict = "not_served".into();
            out.reason = "ClusterIPs are not captured: this ringvip runs without a TUN device (--no-tun), so the flow never reaches it".into();
        }
        (Verdict::Forward(_), false) => {
            out.verdict = "forward".into();
            out.reason = format!(
                "{} of {} endpoints eligible",
                fe.endpoints.len(),
                out.endpoints.len()
            );
        }
        (Verdict::Drop(crate::telemetry::ConnectFailure::SourceRange), false) => {
            out.verdict = "drop".into();
            out.reason =
                "the client is outside loadBalancerSourceRanges: its packets are dropped".into();
        }
        (Verdict::Drop(_) | Verdict::Refuse(_), false) => {
            let (verdict, what) = match fe.when_empty {
                EmptyAction::Refuse => {
                    ("refuse", "refused (TCP RST, ICMP port unreachable for UDP)")
                }
                EmptyAction::Drop => ("drop", "dropped: clients time out"),
            };
            out.verdict = verdict.into();
            out.reason = if fe.when_empty == EmptyAction::Drop {
                format!("traffic policy Local and no eligible endpoint on this node (there are some on other nodes): {what}")
            } else {
                format!("no eligible endpoint: {what}")
            };
        }
    }
    if out.verdict == "forward" {
        pick(fe, q.client, live, &mut out);
        if q.proto == Protocol::Tcp {
            out.limits = limits_hit(fe, live.limits);
        }
    }
    out
}

/// The other frontends on `ip`, as `PORT/PROTO namespace/service (kind)`.
fn same_address(snap: &Snapshot, ip: IpAddr, cluster_ips: bool) -> Vec<String> {
    let mut v: Vec<String> = snap
        .frontends()
        .filter(|(k, _)| k.addr.ip() == ip)
        .map(|(k, fe)| {
            let note = if fe.kind == FrontendKind::ClusterIp && !cluster_ips {
                ", not served without a TUN"
            } else {
                ""
            };
            format!(
                "{}/{} {} ({}{note})",
                k.addr.port(),
                k.proto,
                fe.service,
                kind_name(fe.kind)
            )
        })
        .collect();
    v.sort();
    v
}

fn frontend_explained(fe: &Frontend) -> FrontendExplained {
    FrontendExplained {
        of: FrontendOf::of(fe),
        policy_field: if fe.kind == FrontendKind::ClusterIp {
            "internalTrafficPolicy"
        } else {
            "externalTrafficPolicy"
        }
        .into(),
        policy: policy_name(fe.policy).into(),
        zone: fe.candidates.zone().map(str::to_string),
        affinity_timeout_secs: fe.affinity.map(|t| t.as_secs()),
        source_ranges: fe.source_ranges.iter().map(ToString::to_string).collect(),
        when_empty: when_empty_name(fe).into(),
    }
}

fn endpoints_explained(fe: &Frontend, live: &Live<'_>) -> Vec<EndpointExplained> {
    let eps = &fe.candidates.endpoints();
    let place = fe.candidates.place();
    let any_healthy = fe
        .endpoints
        .iter()
        .any(|e| live.health.backed_off_for(e, live.now).is_none());
    eps.iter()
        .map(|c| {
            let rule = explain_endpoint(eps, c, place, fe.policy);
            let backed_off = live.health.backed_off_for(&c.addr, live.now);
            let mut why = rule.describe().to_string();
            if let Some(left) = backed_off {
                let _ = write!(
                    why,
                    "; backed off for {} ms more after failed connects",
                    ms(left)
                );
                if rule.is_eligible() {
                    why.push_str(if any_healthy {
                        " (skipped while another endpoint is healthy)"
                    } else {
                        " (still tried: every eligible endpoint is backed off)"
                    });
                }
            }
            EndpointExplained {
                address: c.addr.to_string(),
                eligible: rule.is_eligible(),
                rule: rule.as_str().into(),
                why,
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
                local: c.local,
                zone_hints: c.zone_hints.clone(),
                node_hints: c.node_hints.clone(),
                backed_off_ms: backed_off.map(ms),
            }
        })
        .collect()
}

/// What [`crate::dataplane::flow::pick`] would choose from on a first try,
/// without recording anything.
fn pick(fe: &Frontend, client: IpAddr, live: &Live<'_>, out: &mut Explanation) {
    let failing = |e: &SocketAddr| live.health.backed_off_for(e, live.now).is_some();
    let healthy: Vec<SocketAddr> = fe
        .endpoints
        .iter()
        .copied()
        .filter(|e| !failing(e))
        .collect();
    let (pool, rule) = if healthy.is_empty() {
        (fe.endpoints.to_vec(), "random_any_failing")
    } else {
        (healthy, "random")
    };
    if fe.affinity.is_some() {
        let entry = live.affinity.peek(fe.port_id, client, live.now);
        let kept = entry.is_some_and(|(e, _)| {
            fe.endpoints.contains(&e) && !(failing(&e) && fe.endpoints.iter().any(|u| !failing(u)))
        });
        out.affinity = Some(AffinityExplained {
            endpoint: entry.map(|(e, _)| e.to_string()),
            expires_in_ms: entry.map(|(_, left)| ms(left)),
            kept,
        });
        if let (true, Some((e, _))) = (kept, entry) {
            out.pick = vec![e.to_string()];
            out.pick_rule = "affinity".into();
            return;
        }
    }
    out.pick = pool.iter().map(ToString::to_string).collect();
    out.pick_rule = rule.into();
}

/// The limits that would refuse a new TCP connection through `fe` now.
fn limits_hit(fe: &Frontend, limits: Option<&ConnLimits>) -> Vec<String> {
    let Some(l) = limits else {
        return Vec::new();
    };
    let mut hit = Vec::new();
    if l.max_total() != 0 && l.total() >= l.max_total() {
        hit.push(format!(
            "--max-connections {} reached ({} open): a new TCP connection is refused",
            l.max_total(),
            l.total()
        ));
    }
    let open = usize::try_from(fe.admitted.get()).unwrap_or(0);
    if l.max_per_frontend() != 0 && open >= l.max_per_frontend() {
        hit.push(format!(
            "--max-connections-per-frontend {} reached ({open} open): a new TCP connection is refused",
            l.max_per_frontend()
        ));
    }
    hit
}

/// The admin API's answer to `GET /api/explain?QUERY`: status code and JSON
/// body (`{"error": ...}` with 400 for a bad query).
pub fn answer(query: &str, snap: &Snapshot, live: &Live<'_>) -> (u16, String) {
    match Query::from_params(query) {
        Ok(q) => (
            200,
            serde_json::to_string(&explain(snap, &q, live)).unwrap_or_default(),
        ),
        Err(e) => (400, error_json(&e.to_string())),
    }
}

/// [`answer`] over an empty snapshot and empty live state (tests, fuzzing).
#[cfg(any(test, feature = "testing"))]
pub fn answer_empty(query: &str) -> (u16, String) {
    let (health, affinity) = (PassiveHealth::default(), AffinityTable::default());
    let live = Live {
        health: &health,
        affinity: &affinity,
        limits: None,
        cluster_ips: true,
        now: Instant::now(),
    };
    answer(query, &Snapshot::default(), &live)
}

/// `{"error": message}`.
pub fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// Asks a running ringvip's admin API (at its metrics address) to explain `q`.
pub fn fetch(addr: SocketAddr, q: &Query) -> anyhow::Result<Explanation> {
    let path = format!("{API_EXPLAIN_PATH}?{}", q.to_params());
    let (status, body) = crate::status::admin_get(addr, &path)?;
    match status {
        200 => serde_json::from_str(&body)
            .map_err(|e| anyhow::anyhow!("unexpected answer from {addr}: {e}")),
        404 => anyhow::bail!("the ringvip at {addr} has no {API_EXPLAIN_PATH} (an older version?)"),
        _ => {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or(body);
            anyhow::bail!("{addr} answered HTTP {status}: {msg}")
        }
    }
}

/// Explains `q` against manifest files or directories: compiled for this
/// node (`settings`' node options and limits, this host's addresses) as
/// `ringvip run` would, with no live state (nothing backed off, no affinity
/// yet, no limit reached). Also returns the manifest errors: the objects
/// without them are explained, as `run` would serve them.
pub fn from_manifests(
    paths: &[std::path::PathBuf],
    settings: &crate::config::Settings,
    q: &Query,
) -> anyhow::Result<(Explanation, Vec<String>)> {
    let (objects, errors) = crate::discovery::file::load(paths, &settings.limits);
    let mut store = crate::state::Store::new();
    store.apply(crate::discovery::Update::Reset(objects));
    let ctx = crate::app::node_context(settings)?;
    let snap = store.compile(&ctx, &crate::telemetry::Metrics::new(), 1);
    let (health, affinity) = (PassiveHealth::default(), AffinityTable::default());
    let live = Live {
        health: &health,
        affinity: &affinity,
        limits: None,
        cluster_ips: settings.tun.device().is_some(),
        now: Instant::now(),
    };
    let errors = errors.iter().map(ToString::to_string).collect();
    Ok((explain(&snap, q, &live), errors))
}

/// Renders an explanation for people.
pub fn render(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "flow:      {} → {}/{}", e.client, e.to, e.protocol);
    if let Some(f) = &e.frontend {
        let port = if f.of.port.is_empty() {
            String::new()
        } else {
            format!(" port {}", f.of.port)
        };
        let _ = writeln!(
            s,
            "frontend:  {}/{}{port} ({}), {} {}",
            f.of.namespace, f.of.service, f.of.kind, f.policy_field, f.policy
        );
        if let Some(t) = f.affinity_timeout_secs {
            let _ = writeln!(s, "           sessionAffinity ClientIP, timeout {t} s");
        }
        if let Some(z) = &f.zone {
            let _ = writeln!(s, "           this node's zone: {z}");
        }
        if !f.source_ranges.is_empty() {
            let _ = writeln!(
                s,
                "           loadBalancerSourceRanges: {}",
                f.source_ranges.join(", ")
            );
        }
    } else {
        let _ = writeln!(s, "frontend:  none");
    }
    let _ = writeln!(s, "verdict:   {} — {}", e.verdict, e.reason);
    for other in &e.same_address {
        let _ = writeln!(s, "           served on this address: {other}");
    }
    if !e.endpoints.is_empty() || e.frontend.is_some() {
        let _ = writeln!(
            s,
            "endpoints:{}",
            if e.endpoints.is_empty() { " none" } else { "" }
        );
        let width = e
            .endpoints
            .iter()
            .map(|x| x.address.len())
            .max()
            .unwrap_or(0);
        for x in &e.endpoints {
            let mark = if x.eligible {
                "eligible    "
            } else {
                "not eligible"
            };
            let _ = writeln!(s, "  {:<width$}  {mark}  {}", x.address, x.why);
        }
    }
    if let Some(a) = &e.affinity {
        match (&a.endpoint, a.expires_in_ms) {
            (Some(ep), Some(left)) => {
                let kept = if a.kept { "kept" } else { "not kept" };
                let _ = writeln!(
                    s,
                    "affinity:  {} → {ep}, forgotten in {} ms without use ({kept})",
                    e.client, left
                );
            }
            _ => {
                let _ = writeln!(s, "affinity:  nothing remembered for {}", e.client);
            }
        }
    }
    match e.pick_rule.as_str() {
        "none" => {}
        "affinity" => {
            let _ = writeln!(s, "pick:      {} (ClientIP affinity)", e.pick.join(", "));
        }
        rule => {
            let how = if rule == "random_any_failing" {
                "every eligible endpoint is backed off: any of them"
            } else {
                "uniformly at random"
            };
            if let [one] = e.pick.as_slice() {
                let _ = writeln!(s, "pick:      {one}");
            } else {
                let _ = writeln!(s, "pick:      one of {} ({how})", e.pick.join(", "));
            }
        }
    }
    for l in &e.limits {
        let _ = writeln!(s, "limit:     {l}");
    }
    s
}

#[cfg(test)]
mod tests;
