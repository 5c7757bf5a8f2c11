//! The objects unit tests, oracles and benches build: Services, their ports,
//! EndpointSlices, endpoints, node contexts, stores and snapshots. Each
//! builder fills what a test names and leaves the rest at the model's
//! defaults; a test that needs more sets fields with struct update syntax
//! (`Service { headless: true, ..service(..) }`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::discovery::Update;
use crate::model::{
    AddressFamily, Affinity, Endpoint, EndpointSlice, Object, ObjectKey, Pod, Protocol, Service,
    ServicePort, ServiceType, SlicePort, TargetPort,
};
use crate::state::{NodeContext, Snapshot, Store};
use crate::telemetry::Metrics;

/// `text` as an IP address; panics on a malformed literal.
pub fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Port `port`/`protocol` named `name`, sending to port `target` of the
/// endpoints, without a nodePort.
pub fn port(name: &str, protocol: Protocol, port: u16, target: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        node_port: None,
        target_port: TargetPort::Number(target),
    }
}

/// A ClusterIP Service `namespace/name` at `cluster_ips` (none: headless or
/// ExternalName, as the test sets) with `ports`; everything else defaults.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ips: &[&str],
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        cluster_ips: cluster_ips.iter().map(|a| ip(a)).collect(),
        ports,
        ..Service::new(ObjectKey::new(namespace, name))
    }
}

/// An EndpointSlice port.
pub fn slice_port(name: &str, protocol: Protocol, port: u16) -> SlicePort {
    SlicePort {
        name: name.into(),
        protocol,
        port: Some(port),
    }
}

/// EndpointSlice `namespace/name` of Service `service` with `ports` and
/// `endpoints`; its family is that of the first endpoint (IPv4 when none).
pub fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: Vec<SlicePort>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        key: ObjectKey::new(namespace, name),
        service_name: service.into(),
        family: endpoints
            .first()
            .map_or(AddressFamily::V4, |e| AddressFamily::of(&e.ip)),
        ports,
        endpoints,
    }
}

/// A ready endpoint at `addr`.
pub fn endpoint(addr: &str) -> Endpoint {
    Endpoint::ready(ip(addr))
}

/// Labels (or a selector) from key/value pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A ready, running Pod `namespace/name` at `addr` with `labels`, on no node,
/// without container ports, hostname or subdomain.
pub fn pod(namespace: &str, name: &str, addr: &str, labels: BTreeMap<String, String>) -> Pod {
    Pod {
        key: ObjectKey::new(namespace, name),
        labels,
        ips: vec![ip(addr)],
        node_name: None,
        ready: true,
        terminating: false,
        container_ports: vec![],
        hostname: None,
        subdomain: None,
        terminal: false,
        readiness_probes: Vec::new(),
    }
}

/// Node `name` of proxy `ringvip` (no zone), serving NodePorts on
/// `nodeport_addresses` and owning `local_addresses`.
pub fn node(name: &str, nodeport_addresses: &[&str], local_addresses: &[&str]) -> NodeContext {
    NodeContext {
        node_name: name.into(),
        zone: None,
        proxy_name: "ringvip".into(),
        nodeport_addresses: nodeport_addresses.iter().map(|a| ip(a)).collect(),
        local_addresses: local_addresses.iter().map(|a| ip(a)).collect(),
        proxy_protocol_from: Vec::new(),
    }
}

/// A store holding exactly `objects`.
pub fn store(objects: Vec<Object>) -> Store {
    let mut st = Store::new();
    st.apply(Update::Reset(objects));
    st
}

/// `objects` compiled for `ctx` as generation 1.
pub fn snapshot(objects: Vec<Object>, ctx: &NodeContext) -> Snapshot {
    store(objects).compile(ctx, &Metrics::new(), 1)
}

/// LoadBalancer `default/web`: ClusterIP 10.96.0.10, LB IP 198.51.100.7
/// (`source_ranges` allowed), NodePort 30080, ClientIP affinity for 10 s,
/// unnamed port 80 → 8080; with its slice `web-1` holding `endpoints`.
pub fn lb_web(
    source_ranges: Vec<ipnet::IpNet>,
    endpoints: Vec<Endpoint>,
) -> (Service, EndpointSlice) {
    let svc = Service {
        service_type: ServiceType::LoadBalancer,
        load_balancer_ips: vec![ip("198.51.100.7")],
        source_ranges,
        affinity: Affinity::ClientIp {
            timeout: Duration::from_secs(10),
        },
        ..service(
            "default",
            "web",
            &["10.96.0.10"],
            vec![ServicePort {
                node_port: Some(30080),
                ..port("", Protocol::Tcp, 80, 8080)
            }],
        )
    };
    let eps = slice(
        "default",
        "web-1",
        "web",
        vec![slice_port("", Protocol::Tcp, 8080)],
        endpoints,
    );
    (svc, eps)
}
