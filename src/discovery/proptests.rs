//! Property tests of manifest parsing (file.rs → convert.rs): generated valid
//! Services and EndpointSlices come back as exactly the model they were
//! written from, in YAML, JSON and `kind: List` form; arbitrary text and
//! mutated valid documents never panic, every error names the file, and
//! whatever still parses is valid.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::file::parse_str;
use crate::config::Limits;
use crate::model::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,8}"
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

fn target_port() -> impl Strategy<Value = TargetPort> {
    prop_oneof![
        (1u16..=u16::MAX).prop_map(TargetPort::Number),
        "[a-z][a-z0-9]{0,9}".prop_map(TargetPort::Name),
    ]
}

fn policy() -> impl Strategy<Value = TrafficPolicy> {
    prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)]
}

fn policy_str(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

/// A Service as written in a manifest, and the model it must become.
#[derive(Debug, Clone)]
struct GenService {
    doc: Value,
    want: Service,
}

/// Everything a Service generator draws, in groups (proptest tuples are finite).
type Addresses = (
    Option<u32>,
    Option<u16>,
    Vec<(u8, u8)>,
    Vec<(u8, u8)>,
    Vec<([u8; 4], u8)>,
);

fn addresses() -> impl Strategy<Value = Addresses> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u16>()),
        prop::collection::vec((any::<u8>(), 1u8..255), 0..3),
        prop::collection::vec((any::<u8>(), 1u8..255), 0..3),
        prop::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..3),
    )
}

fn service() -> impl Strategy<Value = GenService> {
    let ports = prop::collection::vec(
        (protocol(), 1u16..=u16::MAX, target_port(), any::<bool>()),
        1..5,
    );
    let meta = (
        name(),
        proptest::option::of("[a-z]{1,6}"),
        proptest::option::of(name()),
    );
    let behaviour = (
        0u8..3,
        policy(),
        policy(),
        proptest::option::of(proptest::option::of(1u32..=86_400)),
        proptest::option::of(0u16..700),
        proptest::option::of(prop::collection::btree_map(
            "[a-z]{1,5}",
            "[a-z0-9]{0,5}",
            0..3,
        )),
        any::<bool>(),
        proptest::option::of(any::<bool>()),
    );
    (meta, ports, addresses(), behaviour, any::<bool>()).prop_map(
        |(meta, raw_ports, addrs, behaviour, unnamed_single)| {
            let (name, namespace, proxy_name) = meta;
            let (v4, v6, ext, lb, ranges) = addrs;
            let (ty, etp, itp, affinity, hcnp, selector, publish, alloc) = behaviour;
            let service_type = [
                ServiceType::ClusterIp,
                ServiceType::NodePort,
                ServiceType::LoadBalancer,
            ][usize::from(ty)];
            let node_ports = service_type != ServiceType::ClusterIp;

            let mut want = Service::new(ObjectKey::new(
                namespace.clone().unwrap_or_else(|| "default".into()),
                name.clone(),
            ));
            want.service_type = service_type;
            // ClusterIPs: inside the default service CIDRs, one per family.
            if let Some(x) = v4 {
                let [_, b, c, d] = x.to_be_bytes();
                want.cluster_ips
                    .push(IpAddr::V4(Ipv4Addr::new(10, 96 + b % 16, c, d)));
            }
            if let Some(x) = v6 {
                want.cluster_ips
                    .push(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, x)));
            }
            // Ports: distinct (port, protocol); names required once there are several.
            let mut seen = std::collections::HashSet::new();
            let kept: Vec<_> = raw_ports
                .into_iter()
                .filter(|(pr, port, _, _)| seen.insert((*port, *pr)))
                .collect();
            let several = kept.len() > 1;
            for (i, (protocol, port, target_port, np)) in kept.into_iter().enumerate() {
                want.ports.push(ServicePort {
                    name: if !several && unnamed_single {
                        String::new()
                    } else {
                        format!("p{i}")
                    },
                    protocol,
                    port,
                    node_port: (node_ports && np).then(|| 30000 + i as u16),
                    target_port,
                });
            }
            want.external_ips = ext
                .iter()
                .map(|&(c, d)| IpAddr::V4(Ipv4Addr::new(198, 51, c, d)))
                .collect();
            if service_type == ServiceType::LoadBalancer {
                want.load_balancer_ips = lb
                    .iter()
                    .map(|&(c, d)| IpAddr::V4(Ipv4Addr::new(203, 0, c, d)))
                    .collect();
            }
            want.source_ranges = ranges
                .iter()
                .filter_map(|&(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).ok())
                .map(|n| IpNet::V4(n.trunc()))
                .collect();
            want.external_policy = etp;
            want.internal_policy = itp;
            want.affinity = match affinity {
                None => Affinity::None,
                Some(None) => Affinity::ClientIp {
                    timeout: DEFAULT_AFFINITY_TIMEOUT,
                },
                Some(Some(t)) => Affinity::ClientIp {
                    timeout: Duration::from_secs(u64::from(t)),
                },
            };
            if service_type == ServiceType::LoadBalancer && etp == TrafficPolicy::Local {
                want.health_check_node_port = hcnp.map(|p| 32000 + p);
            }
            want.selector = selector.clone().filter(|s| !s.is_empty());
            want.publish_not_ready = publish;
            want.allocate_lb_node_ports = alloc.unwrap_or(true);
            want.proxy_name = proxy_name.clone();

            // The manifest.
            let label = proxy_name
                .as_deref()
                .map(|p| (super::convert::LABEL_SERVICE_PROXY_NAME, p));
            let metadata = metadata(&name, namespace.as_deref(), label);
            let mut spec = Map::new();
            spec.insert(
                "type".into(),
                json!(["ClusterIP", "NodePort", "LoadBalancer"][usize::from(ty)]),
            );
            if !want.cluster_ips.is_empty() {
                let ips: Vec<String> = want.cluster_ips.iter().map(|i| i.to_string()).collect();
                spec.insert("clusterIP".into(), json!(ips[0]));
                spec.insert("clusterIPs".into(), json!(ips));
            }
            let ports: Vec<Value> = want
                .ports
                .iter()
                .map(|p| {
                    let mut m = port_entry(&p.name, p.protocol);
                    m.insert("port".into(), json!(p.port));
                    m.insert(
                        "targetPort".into(),
                        match &p.target_port {
                            TargetPort::Number(n) => json!(n),
                            TargetPort::Name(s) => json!(s),
                        },
                    );
                    if let Some(np) = p.node_port {
                        m.insert("nodePort".into(), json!(np));
                    }
                    Value::Object(m)
                })
                .collect();
            spec.insert("ports".into(), Value::Array(ports));
            if !want.external_ips.is_empty() {
                spec.insert(
                    "externalIPs".into(),
                    json!(want
                        .external_ips
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()),
                );
            }
            if !ranges.is_empty() {
                // Written untruncated, as people do (10.1.2.3/8): the model truncates.
                let raw: Vec<String> = ranges
                    .iter()
                    .filter_map(|&(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).ok())
                    .map(|n| n.to_string())
                    .collect();
                spec.insert("loadBalancerSourceRanges".into(), json!(raw));
            }
            spec.insert("externalTrafficPolicy".into(), json!(policy_str(etp)));
            spec.insert("internalTrafficPolicy".into(), json!(policy_str(itp)));
            match affinity {
                None => {}
                Some(t) => {
                    spec.insert("sessionAffinity".into(), json!("ClientIP"));
                    if let Some(t) = t {
                        spec.insert(
                            "sessionAffinityConfig".into(),
                            json!({"clientIP": {"timeoutSeconds": t}}),
                        );
                    }
                }
            }
            if let Some(p) = want.health_check_node_port {
                spec.insert("healthCheckNodePort".into(), json!(p));
            }
            if let Some(s) = &selector {
                spec.insert("selector".into(), json!(s));
            }
            spec.insert("publishNotReadyAddresses".into(), json!(publish));
            if let Some(a) = alloc {
                spec.insert("allocateLoadBalancerNodePorts".into(), json!(a));
            }
            let mut doc =
                json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec});
            if !want.load_balancer_ips.is_empty() {
                let ingress: Vec<Value> = want
                    .load_balancer_ips
                    .iter()
                    .map(|i| json!({"ip": i.to_string()}))
                    .collect();
                doc["status"] = json!({"loadBalancer": {"ingress": ingress}});
            }
            GenService { doc, want }
        },
    )
}

/// An EndpointSlice as written, and the model it must become.
#[derive(Debug, Clone)]
struct GenSlice {
    doc: Value,
    want: EndpointSlice,
}

type RawEndpoint = (
    u32,
    u8,
    (Option<bool>, Option<bool>, Option<bool>),
    Option<String>,
    Option<String>,
    Option<Vec<String>>,
    Option<String>,
);

fn endpoint() -> impl Strategy<Value = RawEndpoint> {
    (
        any::<u32>(),
        0u8..3,
        (
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
        ),
        proptest::option::of("node-[ab]"),
        proptest::option::of("zone-[ab]"),
        proptest::option::of(prop::collection::vec("zone-[abc]", 1..3)),
        proptest::option::of(name()),
    )
}

fn slice() -> impl Strategy<Value = GenSlice> {
    (
        (
            name(),
            proptest::option::of("[a-z]{1,6}"),
            name(),
            any::<bool>(),
        ),
        prop::collection::vec((protocol(), proptest::option::of(1u16..=u16::MAX)), 0..4),
        any::<bool>(),
        prop::collection::vec(endpoint(), 0..6),
    )
        .prop_map(
            |((name, namespace, service, v6), raw_ports, first_unnamed, raw_eps)| {
                let family = if v6 {
                    AddressFamily::V6
                } else {
                    AddressFamily::V4
                };
                let ip_of = |x: u32| -> IpAddr {
                    if v6 {
                        let [a, b, c, d] = x.to_be_bytes();
                        IpAddr::V6(Ipv6Addr::new(
                            0xfd00,
                            0xa,
                            0,
                            0,
                            0,
                            0,
                            u16::from_be_bytes([a, b]),
                            u16::from_be_bytes([c, d]),
                        ))
                    } else {
                        let [_, b, c, d] = x.to_be_bytes();
                        IpAddr::V4(Ipv4Addr::new(10, b, c, d))
                    }
                };
                let ports: Vec<SlicePort> = raw_ports
                    .into_iter()
                    .enumerate()
                    .map(|(i, (protocol, port))| SlicePort {
                        name: if i == 0 && first_unnamed {
                            String::new()
                        } else {
                            format!("p{i}")
                        },
                        protocol,
                        port,
                    })
                    .collect();
                let mut endpoints = Vec::new();
                let mut eps_doc = Vec::new();
                for (x, extra, (ready, serving, terminating), node, zone, hints, hostname) in
                    raw_eps
                {
                    let ip = ip_of(x);
                    // Further addresses are checked but not used.
                    let addrs: Vec<String> = (0..=u32::from(extra))
                        .map(|k| ip_of(x.wrapping_add(k)).to_string())
                        .collect();
                    endpoints.push(Endpoint {
                        ip,
                        ready: ready.unwrap_or(true),
                        serving: serving.unwrap_or(true),
                        terminating: terminating.unwrap_or(false),
                        node_name: node.as_deref().map(Into::into),
                        zone: zone.as_deref().map(Into::into),
                        extra: crate::model::EndpointExtra::boxed(
                            hints.clone(),
                            None,
                            hostname.clone(),
                        ),
                    });
                    let mut m = Map::new();
                    m.insert("addresses".into(), json!(addrs));
                    let mut cond = Map::new();
                    for (k, v) in [
                        ("ready", ready),
                        ("serving", serving),
                        ("terminating", terminating),
                    ] {
                        if let Some(v) = v {
                            cond.insert(k.into(), json!(v));
                        }
                    }
                    if !cond.is_empty() {
                        m.insert("conditions".into(), Value::Object(cond));
                    }
                    if let Some(n) = node {
                        m.insert("nodeName".into(), json!(n));
                    }
                    if let Some(z) = zone {
                        m.insert("zone".into(), json!(z));
                    }
                    if let Some(h) = hints {
                        let zs: Vec<Value> = h.iter().map(|z| json!({"name": z})).collect();
                        m.insert("hints".into(), json!({"forZones": zs}));
                    }
                    if let Some(h) = hostname {
                        m.insert("hostname".into(), json!(h));
                    }
                    eps_doc.push(Value::Object(m));
                }
                let label = (super::convert::LABEL_SERVICE_NAME, service.as_str());
                let metadata = metadata(&name, namespace.as_deref(), Some(label));
                let ports_doc: Vec<Value> = ports
                    .iter()
                    .map(|p| {
                        let mut m = port_entry(&p.name, p.protocol);
                        if let Some(n) = p.port {
                            m.insert("port".into(), json!(n));
                        }
                        Value::Object(m)
                    })
                    .collect();
                let doc = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": metadata,
                    "addressType": if v6 { "IPv6" } else { "IPv4" },
                    "ports": ports_doc,
                    "endpoints": eps_doc,
                });
                let want = EndpointSlice {
                    key: ObjectKey::new(namespace.unwrap_or_else(|| "default".into()), name),
                    service_name: service,
                    family,
                    ports,
                    endpoints,
                };
                GenSlice { doc, want }
            },
        )
}

/// A generated object's `metadata`: its name, its namespace when given (else
/// it defaults), and one label when given.
fn metadata(name: &str, namespace: Option<&str>, label: Option<(&str, &str)>) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    if let Some(ns) = namespace {
        m.insert("namespace".into(), json!(ns));
    }
    if let Some((k, v)) = label {
        m.insert("labels".into(), json!({ k: v }));
    }
    Value::Object(m)
}

/// A Service or slice port's `name` (left out when empty, as for a single
/// unnamed port) and `protocol`.
fn port_entry(name: &str, protocol: Protocol) -> Map<String, Value> {
    let mut m = Map::new();
    if !name.is_empty() {
        m.insert("name".into(), json!(name));
    }
    m.insert("protocol".into(), json!(protocol.as_str()));
    m
}

fn yaml(v: &Value) -> String {
    serde_yaml::to_string(v).unwrap()
}

/// Parses `text` with the `manifest` fuzz target's oracle: no panic, every
/// error names the file, every object is valid.
fn parse_checked(origin: &str, text: &str) {
    crate::testing::manifest_text(origin, text);
}

/// Pieces of YAML and Kubernetes structure, so random documents get deep.
const TOKENS: &[&str] = &[
    "---\n",
    "...\n",
    ": ",
    "- ",
    "\n",
    "  ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "&a ",
    "*a",
    "<<: *a\n",
    "!!binary ",
    "!!str ",
    "? ",
    "|\n",
    ">-\n",
    "null",
    "~",
    "-1",
    "0",
    "65536",
    "99999999999999999999",
    "1e400",
    "true",
    "0x1F",
    "%YAML 1.2\n",
    "#",
    "\t",
    "\u{feff}",
    "\u{0}",
    "é",
    "apiVersion: v1\n",
    "apiVersion: discovery.k8s.io/v1\n",
    "kind: Service\n",
    "kind: EndpointSlice\n",
    "kind: List\n",
    "kind: ServiceList\n",
    "kind: Pod\n",
    "kind: Node\n",
    "items:\n",
    "metadata:\n  name: x\n",
    "spec:\n",
    "ports:\n",
    "- port: 80\n",
    "  nodePort: 30000\n",
    "targetPort: x\n",
    "clusterIP: None\n",
    "clusterIPs: [10.96.0.1, fd00:10:96::1]\n",
    "type: LoadBalancer\n",
    "addressType: IPv6\n",
    "endpoints:\n- addresses: [\"10.0.0.1\"]\n",
    "labels: {kubernetes.io/service-name: s}\n",
    "protocol: SCTP\n",
    "sessionAffinity: ClientIP\n",
    "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n",
];

fn token_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|t| t.concat())
}

/// One edit of a document: (what, where as a fraction, a byte, a token).
type Mutation = (u8, u16, u8, prop::sample::Index);

fn mutate(text: &str, edits: &[Mutation]) -> String {
    let mut b = text.as_bytes().to_vec();
    for (what, at, byte, tok) in edits {
        let pos = usize::from(*at) * b.len() / usize::from(u16::MAX).max(1);
        let pos = pos.min(b.len());
        match what % 6 {
            0 => b.insert(pos, *byte),
            1 => {
                if pos < b.len() {
                    b.remove(pos);
                }
            }
            2 => {
                if let Some(x) = b.get_mut(pos) {
                    *x = *byte;
                }
            }
            3 => {
                let t = TOKENS[tok.index(TOKENS.len())].as_bytes();
                b.splice(pos..pos, t.iter().copied());
            }
            4 => b.truncate(pos),
            _ => {
                // Duplicate a span (repeated keys, repeated documents).
                let end = (pos + usize::from(*byte)).min(b.len());
                let span = b[pos..end].to_vec();
                b.splice(end..end, span);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn generated_service_round_trips(s in service()) {
        let limits = Limits::default();
        let text = yaml(&s.doc);
        prop_assert_eq!(parse_str("svc.yaml", &text, &limits).map_err(|e| format!("{e:?}\n{text}")), Ok(vec![Object::Service(s.want.clone())]));
        let json_text = serde_json::to_string_pretty(&s.doc).unwrap();
        prop_assert_eq!(parse_str("svc.json", &json_text, &limits).map_err(|e| format!("{e:?}")), Ok(vec![Object::Service(s.want)]));
    }

    #[test]
    fn generated_slice_round_trips(s in slice()) {
        let limits = Limits::default();
        let text = yaml(&s.doc);
        prop_assert_eq!(parse_str("eps.yaml", &text, &limits).map_err(|e| format!("{e:?}\n{text}")), Ok(vec![Object::EndpointSlice(s.want)]));
    }

    /// Several objects per file, as documents and as a `kind: List`, keep
    /// their order and their fields.
    #[test]
    fn multi_document_and_list_round_trip(svcs in prop::collection::vec(service(), 1..3), slices in prop::collection::vec(slice(), 0..3)) {
        let limits = Limits::default();
        // Distinct names: a duplicate is (rightly) an error.
        let mut want = Vec::new();
        let mut docs = Vec::new();
        for (i, mut s) in svcs.into_iter().enumerate() {
            s.want.key.name = format!("s{i}");
            s.doc["metadata"]["name"] = json!(format!("s{i}"));
            want.push(Object::Service(s.want));
            docs.push(s.doc);
        }
        for (i, mut s) in slices.into_iter().enumerate() {
            s.want.key.name = format!("e{i}");
            s.doc["metadata"]["name"] = json!(format!("e{i}"));
            want.push(Object::EndpointSlice(s.want));
            docs.push(s.doc);
        }
        let multi: String = docs.iter().map(|d| format!("---\n{}", yaml(d))).collect();
        prop_assert_eq!(parse_str("m.yaml", &multi, &limits).map_err(|e| format!("{e:?}")), Ok(want.clone()));
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        prop_assert_eq!(parse_str("l.yaml", &yaml(&list), &limits).map_err(|e| format!("{e:?}")), Ok(want));
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        parse_checked("any.yaml", &text);
        parse_checked("any.json", &text);
    }

    #[test]
    fn token_soup_never_panics(text in token_text()) {
        parse_checked("soup.yaml", &text);
    }

    #[test]
    fn mutated_manifests_never_panic(s in service(), e in slice(), edits in prop::collection::vec(any::<Mutation>(), 1..8)) {
        let text = format!("{}---\n{}", yaml(&s.doc), yaml(&e.doc));
        let m = mutate(&text, &edits);
        parse_checked("mut.yaml", &m);
        let j = mutate(&serde_json::to_string(&s.doc).unwrap(), &edits);
        parse_checked("mut.json", &j);
    }
}

#[test]
fn mutate_applies_every_edit_kind() {
    // The mutator itself must change documents, or the property above is idle.
    let text = "apiVersion: v1\nkind: Service\n";
    let mut changed = 0;
    for what in 0..6u8 {
        let m = mutate(text, &[(what, 1000, b'x', any_index())]);
        changed += usize::from(m != text);
    }
    assert_eq!(changed, 6);
}

fn any_index() -> prop::sample::Index {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    any::<prop::sample::Index>()
        .new_tree(&mut TestRunner::deterministic())
        .unwrap()
        .current()
}
