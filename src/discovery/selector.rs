//! Service selectors without a cluster: EndpointSlices built from Pods, as the
//! EndpointSlice controller builds them (kubernetes pkg/controller/endpointslice,
//! `podToEndpoint`, `getEndpointPorts`; pkg/api/v1/pod `FindPort`).
//!
//! Pure: the store calls [`slices_for`] for each Service a change touches (a
//! Pod change: the Services selecting it, before or after; see
//! `state/selection.rs`), so a Pod that changes labels, readiness or IP in a
//! file moves in and out of its Services live.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::{
    AddressFamily, Endpoint, EndpointSlice, ObjectKey, Pod, Protocol, Service, ServiceType,
    SlicePort, TargetPort, TrafficDistribution,
};

/// Suffix of the names of slices built here (`<service>-ringvip-v4-0`), so they can
/// never collide with slices from the manifests in messages and status.
pub const SLICE_SUFFIX: &str = "ringvip";

/// Whether the selector matches the labels (every `key: value` present; an empty
/// selector is treated as no selector by conversion and never reaches here).
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `FindPort`: the container port a Service port targets on this Pod. A number is
/// used as is; a name is looked up among the Pod's named container ports of the
/// same protocol (regular containers first, then restartable init containers).
pub fn find_port(pod: &Pod, target: &TargetPort, protocol: Protocol) -> Option<u16> {
    match target {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => pod
            .container_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == protocol)
            .map(|(_, _, num)| *num),
    }
}

/// `ShouldPodBeInEndpoints` with terminating Pods included: not Succeeded or
/// Failed, and has an IP.
fn eligible(pod: &Pod) -> bool {
    !pod.terminal && !pod.ips.is_empty()
}

/// Address families the Service's slices are built for: those of its ClusterIPs,
/// or, without ClusterIPs (headless, or none set in a file), every family some
/// selected Pod has an address in.
fn families(svc: &Service, pods: &[&Pod]) -> Vec<AddressFamily> {
    let mut out: Vec<AddressFamily> = if svc.cluster_ips.is_empty() {
        pods.iter()
            .flat_map(|p| p.ips.iter().map(AddressFamily::of))
            .collect()
    } else {
        svc.cluster_ips.iter().map(AddressFamily::of).collect()
    };
    out.sort_by_key(|f| matches!(f, AddressFamily::V6));
    out.dedup();
    out
}

/// `podToEndpoint`: conditions from the Ready condition and deletionTimestamp
/// (ready is never true while terminating unless `publishNotReadyAddresses`),
/// nodeName, the Node's zone, and the hostname when the Pod's `subdomain` names
/// this Service.
fn endpoint(
    pod: &Pod,
    ip: IpAddr,
    svc: &Service,
    zones: &dyn Fn(&str) -> Option<String>,
) -> Endpoint {
    let serving = pod.ready;
    let terminating = pod.terminating;
    let ready = svc.publish_not_ready || (serving && !terminating);
    let hostname = match (&pod.hostname, &pod.subdomain) {
        (Some(h), Some(sub)) if *sub == svc.key.name && pod.key.namespace == svc.key.namespace => {
            Some(h.clone())
        }
        _ => None,
    };
    let zone = pod.node_name.as_deref().and_then(zones);
    let (zone_hints, node_hints) = hints(svc, pod.node_name.as_deref(), zone.as_deref());
    Endpoint {
        ip,
        ready,
        serving,
        terminating,
        node_name: pod.node_name.as_deref().map(crate::model::intern),
        zone: zone.as_deref().map(crate::model::intern),
        extra: crate::model::EndpointExtra::boxed(zone_hints, node_hints, hostname),
    }
}

/// The hints the EndpointSlice controller of Kubernetes 1.34 sets for
/// `trafficDistribution` (`trafficdist`): `PreferSameZone`/`PreferClose`
/// hint each endpoint for its own zone, `PreferSameNode` for its own node
/// and zone; an endpoint without a zone (or node) gets no such hint.
fn hints(
    svc: &Service,
    node: Option<&str>,
    zone: Option<&str>,
) -> (Option<Vec<String>>, Option<Vec<String>>) {
    let one = |v: Option<&str>| v.map(|s| vec![s.to_string()]);
    match svc.traffic_distribution {
        None => (None, None),
        Some(TrafficDistribution::PreferSameZone) => (one(zone), None),
        Some(TrafficDistribution::PreferSameNode) => (one(zone), one(node)),
    }
}

/// The EndpointSlices the EndpointSlice controller would maintain for `svc`, given
/// the Pods of its namespace (`pods` may hold others; they are filtered) and a
/// lookup of a Node's zone. Empty for Services without a selector and for
/// ExternalName Services. Pods are grouped by their resolved port set, as the
/// controller does, so a named `targetPort` that resolves to different numbers on
/// different Pods gives one slice per number; a Pod on which a port cannot be
/// resolved is still an endpoint, without that port.
pub fn slices_for<'a>(
    svc: &Service,
    pods: impl IntoIterator<Item = &'a Pod>,
    zones: &dyn Fn(&str) -> Option<String>,
) -> Vec<EndpointSlice> {
    let Some(selector) = &svc.selector else {
        return Vec::new();
    };
    if svc.service_type == ServiceType::ExternalName {
        return Vec::new();
    }
    let mut selected: Vec<&Pod> = pods
        .into_iter()
        .filter(|p| p.key.namespace == svc.key.namespace)
        .filter(|p| matches(selector, &p.labels) && eligible(p))
        .collect();
    selected.sort_by(|a, b| a.key.cmp(&b.key));

    let mut out = Vec::new();
    for family in families(svc, &selected) {
        let tag = match family {
            AddressFamily::V4 => "v4",
            AddressFamily::V6 => "v6",
        };
        // Port set → endpoints, in a stable order.
        let mut groups: BTreeMap<Vec<SlicePort>, Vec<Endpoint>> = BTreeMap::new();
        for pod in &selected {
            let Some(ip) = pod.ips.iter().find(|ip| AddressFamily::of(ip) == family) else {
                continue;
            };
            let ports: Vec<SlicePort> = svc
                .ports
                .iter()
                .filter_map(|sp| {
                    find_port(pod, &sp.target_port, sp.protocol).map(|n| SlicePort {
                        name: sp.name.clone(),
                        protocol: sp.protocol,
                        port: Some(n),
                    })
                })
                .collect();
            groups
                .entry(ports)
                .or_default()
                .push(endpoint(pod, *ip, svc, zones));
        }
        for (i, (ports, endpoints)) in groups.into_iter().enumerate() {
            out.push(EndpointSlice {
                key: ObjectKey::new(
                    svc.key.namespace.clone(),
                    format!("{}-{SLICE_SUFFIX}-{tag}-{i}", svc.key.name),
                ),
                service_name: svc.key.name.clone(),
                family,
                ports,
                endpoints,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePort;
    use crate::testing::builders::{self, labels, service};

    /// A Pod on node-a with app=`app`, tier=x, its port "http" at 8080.
    fn pod(name: &str, ip: &str, app: &str) -> Pod {
        Pod {
            node_name: Some("node-a".into()),
            container_ports: vec![("http".into(), Protocol::Tcp, 8080)],
            ..builders::pod("default", name, ip, labels(&[("app", app), ("tier", "x")]))
        }
    }

    /// default/web at 10.96.0.10 selecting app=web, port "web" 80/TCP to
    /// `target`.
    fn svc(target: TargetPort) -> Service {
        let web = ServicePort {
            target_port: target,
            ..builders::port("web", Protocol::Tcp, 80, 0)
        };
        Service {
            selector: Some(labels(&[("app", "web")])),
            ..service("default", "web", &["10.96.0.10"], vec![web])
        }
    }

    fn no_zone(_: &str) -> Option<String> {
        None
    }

    fn ips(slices: &[EndpointSlice]) -> Vec<String> {
        slices
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| e.ip.to_string()))
            .collect()
    }

    #[test]
    fn selector_matches_every_label_and_namespace() {
        let mut other_ns = pod("c", "10.0.0.3", "web");
        other_ns.key.namespace = "shop".into();
        let pods = [
            pod("a", "10.0.0.1", "web"),
            pod("b", "10.0.0.2", "db"),
            other_ns,
        ];
        let s = slices_for(&svc(TargetPort::Number(8080)), &pods, &no_zone);
        assert_eq!(ips(&s), vec!["10.0.0.1"]);
        assert_eq!(s[0].service_name, "web");
        assert_eq!(s[0].key.name, "web-ringvip-v4-0");
        assert_eq!(s[0].ports[0].port, Some(8080));
        let none = Service {
            selector: None,
            ..svc(TargetPort::Number(1))
        };
        assert!(slices_for(&none, &pods, &no_zone).is_empty());
    }

    #[test]
    fn conditions_follow_readiness_and_deletion() {
        let mut not_ready = pod("b", "10.0.0.2", "web");
        not_ready.ready = false;
        let mut terminating = pod("c", "10.0.0.3", "web");
        terminating.terminating = true;
        let mut done = pod("d", "10.0.0.4", "web");
        done.terminal = true;
        let mut no_ip = pod("e", "10.0.0.5", "web");
        no_ip.ips.clear();
        let pods = [
            pod("a", "10.0.0.1", "web"),
            not_ready,
            terminating,
            done,
            no_ip,
        ];
        let s = slices_for(&svc(TargetPort::Number(8080)), &pods, &no_zone);
        let by_ip: BTreeMap<String, (bool, bool, bool)> = s[0]
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), (e.ready, e.serving, e.terminating)))
            .collect();
        assert_eq!(
            by_ip.len(),
            3,
            "terminal and IP-less Pods are skipped: {by_ip:?}"
        );
        assert_eq!(by_ip["10.0.0.1"], (true, true, false));
        assert_eq!(by_ip["10.0.0.2"], (false, false, false));
        assert_eq!(
            by_ip["10.0.0.3"],
            (false, true, true),
            "terminating is never ready"
        );

        let publish = Service {
            publish_not_ready: true,
            ..svc(TargetPort::Number(8080))
        };
        let s = slices_for(&publish, &pods, &no_zone);
        assert!(
            s[0].endpoints.iter().all(|e| e.ready),
            "publishNotReadyAddresses"
        );
    }

    #[test]
    fn named_target_port_resolves_per_pod_and_protocol() {
        let mut other = pod("b", "10.0.0.2", "web");
        other.container_ports = vec![
            ("http".into(), Protocol::Udp, 9999),
            ("http".into(), Protocol::Tcp, 9090),
        ];
        let mut missing = pod("c", "10.0.0.3", "web");
        missing.container_ports.clear();
        let pods = [pod("a", "10.0.0.1", "web"), other, missing];
        let s = slices_for(&svc(TargetPort::Name("http".into())), &pods, &no_zone);
        let by_port: BTreeMap<Option<u16>, Vec<String>> = s
            .iter()
            .map(|sl| {
                (
                    sl.ports.first().and_then(|p| p.port),
                    sl.endpoints.iter().map(|e| e.ip.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(by_port[&Some(8080)], vec!["10.0.0.1"]);
        assert_eq!(
            by_port[&Some(9090)],
            vec!["10.0.0.2"],
            "TCP, not the UDP port"
        );
        assert_eq!(
            by_port[&None],
            vec!["10.0.0.3"],
            "unresolved: endpoint without the port"
        );
    }

    #[test]
    fn hostname_only_with_matching_subdomain_and_zone_from_node() {
        let mut a = pod("a", "10.0.0.1", "web");
        a.hostname = Some("a".into());
        a.subdomain = Some("web".into());
        let mut b = pod("b", "10.0.0.2", "web");
        b.hostname = Some("b".into());
        b.subdomain = Some("other".into());
        let zones = |n: &str| (n == "node-a").then(|| "z1".to_string());
        let s = slices_for(&svc(TargetPort::Number(1)), &[a, b], &zones);
        let e = &s[0].endpoints;
        assert_eq!(e[0].hostname(), Some("a"));
        assert_eq!(e[1].hostname(), None);
        assert_eq!(e[0].zone.as_deref(), Some("z1"));
        assert_eq!(e[0].node_name.as_deref(), Some("node-a"));
    }

    /// The hints the EndpointSlice controller sets per trafficDistribution:
    /// none by default, the endpoint's zone for PreferSameZone/PreferClose,
    /// its node and zone for PreferSameNode.
    #[test]
    fn traffic_distribution_sets_the_controllers_hints() {
        let a = pod("a", "10.0.0.1", "web");
        let mut b = pod("b", "10.0.0.2", "web");
        b.node_name = Some("node-b".into());
        let mut c = pod("c", "10.0.0.3", "web");
        c.node_name = None;
        let zones = |n: &str| (n == "node-a").then(|| "z1".to_string());
        let pods = [a, b, c];
        let hints_of = |td| {
            let svc = Service {
                traffic_distribution: td,
                ..svc(TargetPort::Number(1))
            };
            slices_for(&svc, &pods, &zones)[0]
                .endpoints
                .iter()
                .map(|e| (e.zone_hints().cloned(), e.node_hints().cloned()))
                .collect::<Vec<_>>()
        };
        let v = |s: &str| Some(vec![s.to_string()]);
        assert!(hints_of(None).iter().all(|h| *h == (None, None)));
        assert_eq!(
            hints_of(Some(TrafficDistribution::PreferSameZone)),
            vec![(v("z1"), None), (None, None), (None, None)]
        );
        assert_eq!(
            hints_of(Some(TrafficDistribution::PreferSameNode)),
            vec![(v("z1"), v("node-a")), (None, v("node-b")), (None, None)]
        );
    }

    #[test]
    fn families_follow_cluster_ips_or_pods() {
        let mut dual = pod("a", "10.0.0.1", "web");
        dual.ips.push("fd00::1".parse().unwrap());
        let pods = [dual];
        let s = slices_for(&svc(TargetPort::Number(1)), &pods, &no_zone);
        assert_eq!(s.len(), 1, "single-stack v4 Service: v4 slice only");
        let headless = Service {
            cluster_ips: vec![],
            headless: true,
            ..svc(TargetPort::Number(1))
        };
        let s = slices_for(&headless, &pods, &no_zone);
        assert_eq!(
            s.iter().map(|s| s.family).collect::<Vec<_>>(),
            vec![AddressFamily::V4, AddressFamily::V6]
        );
        assert_eq!(ips(&s), vec!["10.0.0.1", "fd00::1"]);
    }
}
