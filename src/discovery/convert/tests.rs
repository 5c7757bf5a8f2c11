//! Tests of the conversions: defaults, validation, every problem reported.

use super::*;
use crate::config::Limits;
use crate::model::*;
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use std::net::IpAddr;
use std::time::Duration;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A Kubernetes object from YAML.
fn k8s<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

fn k8s_service(yaml: &str) -> core::Service {
    k8s(yaml)
}

fn convert_service(yaml: &str) -> Result<Service, ConvertError> {
    service(&k8s_service(yaml), &Limits::default())
}

/// A Service named web in default with the given spec (YAML, indented 2).
fn with_spec(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n{spec}")
}

/// The Service [`with_spec`] converts to, which must be valid.
fn web(spec: &str) -> Service {
    convert_service(&with_spec(spec)).unwrap()
}

/// The slice [`slice_yaml`] converts to, which must be valid.
fn web_slice(body: &str) -> EndpointSlice {
    convert_slice(&slice_yaml(body)).unwrap()
}

fn slice_yaml(body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\n{body}"
    )
}

fn convert_slice(yaml: &str) -> Result<EndpointSlice, ConvertError> {
    endpoint_slice(&k8s(yaml))
}

#[test]
fn service_defaults_are_applied() {
    let s = web("  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n");
    assert_eq!(s.key, ObjectKey::new("default", "web"));
    assert_eq!(s.service_type, ServiceType::ClusterIp);
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.10")]);
    assert!(!s.headless);
    assert_eq!(
        s.ports,
        vec![ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
            target_port: TargetPort::Number(80),
        }]
    );
    assert_eq!(s.external_policy, TrafficPolicy::Cluster);
    assert_eq!(s.internal_policy, TrafficPolicy::Cluster);
    assert_eq!(s.affinity, Affinity::None);
    assert!(s.allocate_lb_node_ports);
    assert!(!s.publish_not_ready);
    assert_eq!(s.selector, None);
    assert_eq!(s.proxy_name, None);
    assert!(!s.headless_label);
    assert!(s.is_proxied("ringvip"));
}

#[test]
fn service_fields_are_converted() {
    let s = convert_service(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\n  namespace: shop\n  labels:\n    service.kubernetes.io/service-proxy-name: other\n    service.kubernetes.io/headless: \"\"\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.2, \"fd00:10:96::2\"]\n  externalIPs: [192.0.2.7]\n  loadBalancerSourceRanges: [\" 198.51.100.9/24 \", \"::/0\"]\n  allocateLoadBalancerNodePorts: false\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  publishNotReadyAddresses: true\n  selector: {app: shop}\n  sessionAffinity: ClientIP\n  ports:\n  - name: http\n    port: 80\n    targetPort: web\n    nodePort: 30001\n  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 203.0.113.1\n    - ip: 203.0.113.2\n      ipMode: VIP\n    - ip: 203.0.113.3\n      ipMode: Proxy\n    - hostname: lb.example.com\n",
    );
    // clusterIP 10.96.0.1 disagrees with clusterIPs[0]: reported.
    let e = s.unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(e.errors[0].field, "spec.clusterIPs[0]");

    let s = convert_service(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\n  namespace: shop\n  labels:\n    service.kubernetes.io/service-proxy-name: other\n    service.kubernetes.io/headless: \"\"\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.2\n  clusterIPs: [10.96.0.2, \"fd00:10:96::2\"]\n  externalIPs: [192.0.2.7]\n  loadBalancerSourceRanges: [\" 198.51.100.9/24 \", \"::/0\"]\n  allocateLoadBalancerNodePorts: false\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  publishNotReadyAddresses: true\n  selector: {app: shop}\n  sessionAffinity: ClientIP\n  ports:\n  - name: http\n    port: 80\n    targetPort: web\n    nodePort: 30001\n  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 203.0.113.1\n    - ip: 203.0.113.2\n      ipMode: VIP\n    - ip: 203.0.113.3\n      ipMode: Proxy\n    - hostname: lb.example.com\n",
    )
    .unwrap();
    assert_eq!(s.key, ObjectKey::new("shop", "lb"));
    assert_eq!(s.service_type, ServiceType::LoadBalancer);
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.2"), ip("fd00:10:96::2")]);
    assert_eq!(s.external_ips, vec![ip("192.0.2.7")]);
    assert_eq!(
        s.load_balancer_ips,
        vec![ip("203.0.113.1"), ip("203.0.113.2")]
    );
    assert_eq!(
        s.source_ranges,
        vec![
            "198.51.100.0/24".parse::<IpNet>().unwrap(),
            "::/0".parse::<IpNet>().unwrap()
        ]
    );
    assert!(!s.allocate_lb_node_ports);
    assert_eq!(s.external_policy, TrafficPolicy::Local);
    assert_eq!(s.internal_policy, TrafficPolicy::Local);
    assert_eq!(s.health_check_node_port, Some(32000));
    assert!(s.publish_not_ready);
    assert_eq!(
        s.selector,
        Some([("app".to_string(), "shop".to_string())].into())
    );
    assert_eq!(
        s.affinity,
        Affinity::ClientIp {
            timeout: Duration::from_secs(10800)
        }
    );
    assert_eq!(s.ports[0].target_port, TargetPort::Name("web".into()));
    assert_eq!(s.ports[0].node_port, Some(30001));
    assert_eq!(s.ports[1].protocol, Protocol::Udp);
    assert_eq!(s.ports[1].target_port, TargetPort::Number(5353));
    assert_eq!(s.proxy_name.as_deref(), Some("other"));
    assert!(s.headless_label);
    assert!(!s.is_proxied("ringvip"));
}

#[test]
fn headless_and_external_name_and_affinity_timeout() {
    let s = web("  clusterIP: None\n  clusterIPs: [None]\n  ports:\n  - port: 80\n");
    assert!(s.headless);
    assert!(s.cluster_ips.is_empty());
    let s = web("  clusterIP: None\n");
    assert!(s.headless, "headless needs no ports");

    let s = web("  type: ExternalName\n  externalName: db.example.com\n");
    assert_eq!(s.service_type, ServiceType::ExternalName);
    assert_eq!(s.external_name.as_deref(), Some("db.example.com"));

    let s = web("  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n  ports:\n  - port: 80\n");
    assert_eq!(
        s.affinity,
        Affinity::ClientIp {
            timeout: Duration::from_secs(60)
        }
    );
    // targetPort 0 and "" mean "same as port", nodePort 0 means unallocated.
    let s = web("  type: NodePort\n  ports:\n  - name: a\n    port: 81\n    targetPort: 0\n    nodePort: 0\n  - name: b\n    port: 82\n    targetPort: \"\"\n");
    assert_eq!(s.ports[0].target_port, TargetPort::Number(81));
    assert_eq!(s.ports[0].node_port, None);
    assert_eq!(s.ports[1].target_port, TargetPort::Number(82));
}

/// Each case: spec (YAML), the field reported, a piece of the message.
#[test]
fn service_validation_errors() {
    let cases: &[(&str, &str, &str)] = &[
        ("  ports:\n  - port: 70000\n", "spec.ports[0].port", "70000 is out of range 1..65535"),
        ("  ports:\n  - port: 0\n", "spec.ports[0].port", "0 is out of range 1..65535"),
        ("  ports:\n  - port: 80\n    targetPort: 70000\n", "spec.ports[0].targetPort", "70000 is out of range"),
        ("  ports:\n  - port: 80\n    targetPort: \"8080\"\n", "spec.ports[0].targetPort", "a quoted number is a name"),
        ("  ports:\n  - port: 80\n    targetPort: Http_Port\n", "spec.ports[0].targetPort", "not a valid port name"),
        ("  ports:\n  - {name: a, port: 80}\n  - {name: b, port: 80}\n", "spec.ports[1]", "duplicate port 80/TCP (also spec.ports[0])"),
        ("  ports:\n  - {name: a, port: 80}\n  - {name: a, port: 81}\n", "spec.ports[1].name", "duplicate name \"a\" (also spec.ports[0])"),
        ("  ports:\n  - {name: a, port: 80}\n  - {port: 81}\n", "spec.ports[1].name", "required when the Service has more than one port"),
        ("  type: NodePort\n  ports:\n  - {port: 80, nodePort: 80}\n", "spec.ports[0].nodePort", "80 is outside the node port range 30000-32767"),
        ("  type: NodePort\n  ports:\n  - {name: a, port: 80, nodePort: 30000}\n  - {name: b, port: 81, nodePort: 30000}\n", "spec.ports[1].nodePort", "duplicate nodePort 30000/TCP"),
        ("  ports:\n  - {port: 80, nodePort: 30080}\n", "spec.ports[0].nodePort", "may not be set when type is ClusterIP"),
        ("  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 1000\n  ports:\n  - port: 80\n", "spec.healthCheckNodePort", "1000 is outside the node port range 30000-32767"),
        ("  type: NodePort\n  healthCheckNodePort: 30001\n  ports:\n  - port: 80\n", "spec.healthCheckNodePort", "may only be set when type is LoadBalancer and externalTrafficPolicy is Local"),
        ("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n  ports:\n  - port: 80\n", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "0 is out of range 1..86400"),
        ("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n  ports:\n  - port: 80\n", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "86401 is out of range 1..86400"),
        ("  sessionAffinity: Cookie\n  ports:\n  - port: 80\n", "spec.sessionAffinity", "unknown sessionAffinity \"Cookie\""),
        ("  clusterIP: 10.0.0.1\n  ports:\n  - port: 80\n", "spec.clusterIP", "10.0.0.1 is not inside any service CIDR (10.96.0.0/12, fd00:10:96::/112)"),
        ("  clusterIPs: [10.96.0.1, \"2001:db8::1\"]\n  ports:\n  - port: 80\n", "spec.clusterIPs[1]", "2001:db8::1 is not inside any service CIDR"),
        ("  clusterIPs: [10.96.0.1, 10.96.0.2]\n  ports:\n  - port: 80\n", "spec.clusterIPs[1]", "different families"),
        ("  clusterIP: 10.96.0.300\n  ports:\n  - port: 80\n", "spec.clusterIP", "\"10.96.0.300\" is not a valid IP address"),
        ("  externalIPs: [nope]\n  ports:\n  - port: 80\n", "spec.externalIPs[0]", "\"nope\" is not a valid IP address"),
        ("  externalIPs: [127.0.0.1]\n  ports:\n  - port: 80\n", "spec.externalIPs[0]", "loopback"),
        ("  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/33]\n  ports:\n  - port: 80\n", "spec.loadBalancerSourceRanges[0]", "\"10.0.0.0/33\" is not a valid CIDR"),
        ("  ports:\n  - port: 0\n    protocol: SCTP\n", "spec.ports[0].port", "0 is out of range 1..65535"),
        ("  ports:\n  - {name: a, port: 80, protocol: SCTP}\n  - {name: b, port: 80, protocol: SCTP}\n", "spec.ports[1]", "duplicate port 80/SCTP (also spec.ports[0])"),
        ("  ports:\n  - port: 80\n    protocol: tcp\n", "spec.ports[0].protocol", "unknown protocol \"tcp\" (expected TCP or UDP)"),
        ("  type: Magic\n  ports:\n  - port: 80\n", "spec.type", "unknown type \"Magic\""),
        ("  externalTrafficPolicy: Global\n  ports:\n  - port: 80\n", "spec.externalTrafficPolicy", "unknown traffic policy \"Global\""),
        ("  internalTrafficPolicy: Nearby\n  ports:\n  - port: 80\n", "spec.internalTrafficPolicy", "unknown traffic policy \"Nearby\""),
        ("  type: ExternalName\n", "spec.externalName", "required when type is ExternalName"),
        ("  type: ExternalName\n  externalName: \"not a name\"\n", "spec.externalName", "not a valid DNS name"),
        ("  type: ExternalName\n  externalName: db.example.com\n  clusterIP: 10.96.0.1\n", "spec.clusterIP", "may not be set when type is ExternalName"),
        ("  type: NodePort\n  clusterIP: None\n  ports:\n  - port: 80\n", "spec.clusterIP", "may not be \"None\""),
        ("  clusterIP: 10.96.0.1\n", "spec.ports", "at least one port is required"),
    ];
    for (spec, field, msg) in cases {
        let e = convert_service(&with_spec(spec)).expect_err(spec);
        assert!(
            e.errors
                .iter()
                .any(|fe| fe.field == *field && fe.message.contains(msg)),
            "spec:\n{spec}\nwant {field}: {msg}\ngot {e}"
        );
    }
    let e = convert_service("apiVersion: v1\nkind: Service\nspec:\n  ports:\n  - port: 80\n")
        .unwrap_err();
    assert_eq!(e.errors[0].field, "metadata.name");
}

#[test]
fn service_error_display_matches_the_documented_shape() {
    let e = convert_service(&with_spec(
        "  ports:\n  - {name: a, port: 80}\n  - {name: b, port: 70000}\n",
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service default/web: spec.ports[1].port: 70000 is out of range 1..65535"
    );
}

#[test]
fn every_error_of_an_object_is_reported() {
    let e = convert_service(&with_spec(
        "  type: Weird\n  clusterIP: 1.2.3.4\n  ports:\n  - {name: a, port: 0}\n  - {port: 80, protocol: SCTP}\n",
    ))
    .unwrap_err();
    let fields: Vec<&str> = e.errors.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "spec.type",
            "spec.clusterIP",
            "spec.ports[0].port",
            "spec.ports[1].name",
        ],
        "{e}"
    );
}

#[test]
fn node_port_range_comes_from_limits() {
    let limits = Limits {
        node_port_range: 1000..=2000,
        ..Limits::default()
    };
    let svc = k8s_service(&with_spec(
        "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 1500}\n",
    ));
    assert_eq!(
        service(&svc, &limits).unwrap().ports[0].node_port,
        Some(1500)
    );
    assert!(service(&svc, &Limits::default()).is_err());
    let limits = Limits {
        service_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        ..Limits::default()
    };
    let svc = k8s_service(&with_spec(
        "  clusterIP: 10.1.2.3\n  ports:\n  - port: 80\n",
    ));
    assert!(service(&svc, &limits).is_ok());
}

#[test]
fn endpoint_slice_defaults_and_fields() {
    let s = web_slice("addressType: IPv4\nports:\n- port: 8080\n- name: dns\n  protocol: UDP\n  port: 53\nendpoints:\n- addresses: [10.244.1.10, 10.244.1.99]\n- addresses: [10.244.1.11]\n  conditions: {ready: false, serving: true, terminating: true}\n  nodeName: node-a\n  zone: z1\n  hostname: pod-1\n  hints:\n    forZones: [{name: z1}, {name: z2}]\n- addresses: [10.244.1.12]\n  hints: {forZones: []}\n");
    assert_eq!(s.key, ObjectKey::new("default", "web-1"));
    assert_eq!(s.service_name, "web");
    assert_eq!(s.family, AddressFamily::V4);
    assert_eq!(
        s.ports,
        vec![
            SlicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: Some(8080)
            },
            SlicePort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: Some(53)
            },
        ]
    );
    let e0 = &s.endpoints[0];
    assert_eq!(e0.ip, ip("10.244.1.10"), "only the first address is used");
    assert!(e0.ready && e0.serving && !e0.terminating);
    assert_eq!(e0.zone_hints(), None);
    assert_eq!(e0.node_name, None);
    let e1 = &s.endpoints[1];
    assert!(!e1.ready && e1.serving && e1.terminating);
    assert_eq!(e1.node_name.as_deref(), Some("node-a"));
    assert_eq!(e1.zone.as_deref(), Some("z1"));
    assert_eq!(e1.hostname(), Some("pod-1"));
    assert_eq!(
        e1.zone_hints(),
        Some(&vec!["z1".to_string(), "z2".to_string()])
    );
    assert_eq!(
        s.endpoints[2].zone_hints(),
        None,
        "empty hints are no hints"
    );

    let s =
        web_slice("addressType: IPv6\nendpoints:\n- addresses: [\"fd00::1\"]\n  conditions: {}\n");
    assert_eq!(s.family, AddressFamily::V6);
    assert!(s.endpoints[0].ready && s.endpoints[0].serving);
}

#[test]
fn endpoint_slice_validation_errors() {
    let cases: &[(String, &str, &str)] = &[
        ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: orphan\naddressType: IPv4\nendpoints: []\n".to_string(), "metadata.labels[kubernetes.io/service-name]", "required"),
        (slice_yaml("addressType: FQDN\nendpoints: []\n"), "addressType", "FQDN slices are not supported"),
        (slice_yaml("addressType: IPv5\nendpoints: []\n"), "addressType", "unknown addressType \"IPv5\""),
        (slice_yaml("endpoints: []\n"), "addressType", "required"),
        (slice_yaml("addressType: IPv6\nendpoints:\n- addresses: [10.0.0.1]\n"), "endpoints[0].addresses[0]", "10.0.0.1 is not an IPv6 address (addressType is IPv6)"),
        (slice_yaml("addressType: IPv4\nendpoints:\n- addresses: [\"fd00::1\"]\n"), "endpoints[0].addresses[0]", "fd00::1 is not an IPv4 address"),
        (slice_yaml("addressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\n- addresses: [web-0.local]\n"), "endpoints[1].addresses[0]", "\"web-0.local\" is not a valid IP address"),
        (slice_yaml("addressType: IPv4\nendpoints:\n- addresses: []\n"), "endpoints[0].addresses", "at least one address"),
        (slice_yaml("addressType: IPv4\nports:\n- port: 0\nendpoints: []\n"), "ports[0].port", "0 is out of range 1..65535"),
        (slice_yaml("addressType: IPv4\nports:\n- {name: a, port: 80}\n- {name: a, port: 81}\nendpoints: []\n"), "ports[1].name", "duplicate name \"a\""),
    ];
    for (yaml, field, msg) in cases {
        let e = convert_slice(yaml).expect_err(yaml);
        assert!(
            e.errors
                .iter()
                .any(|fe| fe.field == *field && fe.message.contains(msg)),
            "{yaml}\nwant {field}: {msg}\ngot {e}"
        );
    }
}

#[test]
fn node_is_converted() {
    let n: core::Node = k8s("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  deletionTimestamp: \"2024-05-01T10:00:00Z\"\n  labels:\n    topology.kubernetes.io/zone: zone-a\nstatus:\n  addresses:\n  - {type: Hostname, address: node-a}\n  - {type: ExternalIP, address: 203.0.113.5}\n  - {type: InternalIP, address: 192.168.1.5}\n  - {type: InternalIP, address: \"fd00::5\"}\n");
    let n = node(&n).unwrap();
    assert_eq!(n.name, "node-a");
    assert_eq!(n.zone.as_deref(), Some("zone-a"));
    assert_eq!(
        n.addresses,
        vec![ip("192.168.1.5"), ip("fd00::5"), ip("203.0.113.5")]
    );
    assert!(n.deleting);

    let bad: core::Node = k8s("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\nstatus:\n  addresses:\n  - {type: InternalIP, address: x}\n");
    let e = node(&bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Node node-b: status.addresses[0].address: \"x\" is not a valid IP address"
    );
}

#[test]
fn pod_is_converted() {
    let p: core::Pod = k8s("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  labels: {app: web}\nspec:\n  hostname: web-0\n  nodeName: node-a\n  initContainers:\n  - name: proxy\n    restartPolicy: Always\n    ports: [{name: admin, containerPort: 9901}]\n  - name: init\n    ports: [{name: ignored, containerPort: 1}]\n  containers:\n  - name: app\n    ports:\n    - {name: http, containerPort: 8080}\n    - {containerPort: 9090}\n    - {name: dns, containerPort: 53, protocol: UDP}\n    - {name: sctp, containerPort: 99, protocol: SCTP}\nstatus:\n  podIP: 10.244.1.10\n  podIPs: [{ip: 10.244.1.10}, {ip: \"fd00::10\"}]\n  conditions:\n  - {type: PodScheduled, status: \"True\"}\n  - {type: Ready, status: \"True\"}\n");
    let p = pod(&p).unwrap();
    assert_eq!(p.key, ObjectKey::new("default", "web-0"));
    assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(p.ips, vec![ip("10.244.1.10"), ip("fd00::10")]);
    assert_eq!(p.node_name.as_deref(), Some("node-a"));
    assert!(p.ready);
    assert!(!p.terminating);
    assert_eq!(p.hostname.as_deref(), Some("web-0"));
    assert_eq!(
        p.container_ports,
        vec![
            ("http".to_string(), Protocol::Tcp, 8080),
            ("dns".to_string(), Protocol::Udp, 53),
            ("admin".to_string(), Protocol::Tcp, 9901),
        ]
    );

    let p: core::Pod = k8s("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  deletionTimestamp: \"2024-05-01T10:00:00Z\"\nspec:\n  containers: []\nstatus:\n  podIP: 10.244.1.11\n  conditions:\n  - {type: Ready, status: \"False\"}\n");
    let p = pod(&p).unwrap();
    assert_eq!(
        p.ips,
        vec![ip("10.244.1.11")],
        "podIP when podIPs is absent"
    );
    assert!(!p.ready);
    assert!(p.terminating);
    assert!(!p.terminal);
    assert_eq!(p.subdomain, None);

    let p: core::Pod = k8s("apiVersion: v1\nkind: Pod\nmetadata:\n  name: job-1\nspec:\n  hostname: job-1\n  subdomain: jobs\n  containers: []\nstatus:\n  phase: Succeeded\n  podIP: 10.244.1.12\n");
    let p = pod(&p).unwrap();
    assert!(p.terminal, "Succeeded and Failed Pods are terminal");
    assert_eq!(p.subdomain.as_deref(), Some("jobs"));
}

/// A Service web with `annotations` (YAML lines indented 4) and one port.
fn annotated(annotations: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n{annotations}spec:\n  ports:\n  - port: 80\n")
}

#[test]
fn ringvip_annotations_are_parsed() {
    let opts = |a: &str| convert_service(&annotated(a)).unwrap().options;
    assert_eq!(
        web("  ports:\n  - port: 80\n").options,
        ServiceOptions::default()
    );
    let cases = [
        ("    ringvip.io/balance: random\n", Balance::Random),
        ("    ringvip.io/balance: round-robin\n", Balance::RoundRobin),
        (
            "    ringvip.io/balance: least-connections\n",
            Balance::LeastConnections,
        ),
        (
            "    ringvip.io/balance: maglev\n",
            Balance::Maglev { table_size: 65537 },
        ),
        (
            "    ringvip.io/balance: maglev\n    ringvip.io/maglev-table-size: \"251\"\n",
            Balance::Maglev { table_size: 251 },
        ),
    ];
    for (a, want) in cases {
        assert_eq!(opts(a).balance, want, "{a}");
    }
    assert_eq!(
        opts("    ringvip.io/slow-start-seconds: \"30\"\n").slow_start,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        opts("    ringvip.io/slow-start-seconds: \"0\"\n").slow_start,
        None
    );
    // Someone else's annotations, and unknown ringvip.io ones, are left alone.
    assert_eq!(
        opts("    example.com/x: y\n    ringvip.io/future: z\n"),
        ServiceOptions::default()
    );
}

#[test]
fn bad_ringvip_annotations_are_field_errors() {
    let cases = [
        ("    ringvip.io/balance: fastest\n", "ringvip.io/balance", "unknown balancing \"fastest\" (expected random, round-robin, least-connections or maglev)"),
        ("    ringvip.io/balance: maglev\n    ringvip.io/maglev-table-size: \"65536\"\n", "ringvip.io/maglev-table-size", "65536 is not a prime"),
        ("    ringvip.io/balance: maglev\n    ringvip.io/maglev-table-size: \"5\"\n", "ringvip.io/maglev-table-size", "5 is out of range 7..1048573"),
        ("    ringvip.io/balance: maglev\n    ringvip.io/maglev-table-size: big\n", "ringvip.io/maglev-table-size", "\"big\" is not a whole number"),
        ("    ringvip.io/maglev-table-size: \"251\"\n", "ringvip.io/maglev-table-size", "only meaningful with ringvip.io/balance: maglev"),
        ("    ringvip.io/slow-start-seconds: \"3601\"\n", "ringvip.io/slow-start-seconds", "3601 is out of range 0..3600 seconds"),
        ("    ringvip.io/slow-start-seconds: 1m\n", "ringvip.io/slow-start-seconds", "\"1m\" is not a whole number of seconds"),
        ("    ringvip.io/slow-start-seconds: \"-5\"\n", "ringvip.io/slow-start-seconds", "\"-5\" is not a whole number of seconds"),
    ];
    for (a, name, msg) in cases {
        let e = convert_service(&annotated(a)).expect_err(a);
        let field = format!("metadata.annotations[{name}]");
        assert!(
            e.errors
                .iter()
                .any(|fe| fe.field == field && fe.message.contains(msg)),
            "{a}\nwant {field}: {msg}\ngot {e}"
        );
    }
}

#[test]
fn sctp_ports_are_set_aside_and_the_others_kept() {
    let s = web("  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n  - {name: sig, port: 3868, protocol: SCTP}\n  - {name: dns, port: 53, protocol: UDP}\n");
    let served: Vec<(u16, Protocol)> = s.ports.iter().map(|p| (p.port, p.protocol)).collect();
    assert_eq!(served, vec![(80, Protocol::Tcp), (53, Protocol::Udp)]);
    assert_eq!(
        s.skipped_ports,
        vec![SkippedPort {
            name: "sig".into(),
            port: 3868
        }]
    );
    // Its slices list the SCTP port too: left out, the rest kept.
    let sl = web_slice("addressType: IPv4\nports:\n- {name: http, port: 8080}\n- {name: sig, port: 3868, protocol: SCTP}\nendpoints:\n- addresses: [10.0.0.1]\n");
    assert_eq!(sl.ports.len(), 1);
    assert_eq!(sl.ports[0].name, "http");
}

#[test]
fn node_hints_and_traffic_distribution() {
    let s = web_slice("addressType: IPv4\nendpoints:\n- addresses: [10.244.1.10]\n  hints:\n    forNodes: [{name: node-a}]\n    forZones: [{name: z1}]\n- addresses: [10.244.1.11]\n  hints: {forNodes: []}\n");
    assert_eq!(
        s.endpoints[0].node_hints(),
        Some(&vec!["node-a".to_string()])
    );
    assert_eq!(
        s.endpoints[1].node_hints(),
        None,
        "empty hints are no hints"
    );
    let td = |v: &str| {
        web(&format!(
            "  clusterIP: 10.96.2.3\n  trafficDistribution: {v}\n  ports:\n  - port: 80\n"
        ))
        .traffic_distribution
    };
    assert_eq!(
        td("PreferSameNode"),
        Some(TrafficDistribution::PreferSameNode)
    );
    assert_eq!(
        td("PreferSameZone"),
        Some(TrafficDistribution::PreferSameZone)
    );
    assert_eq!(td("PreferClose"), Some(TrafficDistribution::PreferSameZone));
    assert_eq!(td("Whatever"), None, "unknown values are ignored");
}

/// A Pod named p whose first container has `probe` (YAML, indented 6) as
/// its readinessProbe and a port named http at 8080.
fn probe_pod(probe: &str) -> Result<Pod, ConvertError> {
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: c\n    ports:\n    - name: http\n      containerPort: 8080\n    readinessProbe:\n{probe}"
    );
    pod(&k8s(&yaml))
}

#[test]
fn readiness_probes_with_the_api_servers_defaults() {
    let p = probe_pod(
        "      httpGet: {port: http, path: healthz, httpHeaders: [{name: X-A, value: b}]}\n",
    )
    .unwrap();
    assert_eq!(
        p.readiness_probes,
        vec![Probe {
            action: ProbeAction::Http {
                host: None,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![("X-A".into(), "b".into())],
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        }]
    );
    let p = probe_pod("      tcpSocket: {port: 9000}\n      initialDelaySeconds: 5\n      periodSeconds: 2\n      timeoutSeconds: 3\n      successThreshold: 2\n      failureThreshold: 4\n").unwrap();
    let pr = &p.readiness_probes[0];
    assert_eq!(
        pr.action,
        ProbeAction::Tcp {
            host: None,
            port: 9000
        }
    );
    assert_eq!(
        (
            pr.initial_delay,
            pr.period,
            pr.timeout,
            pr.success_threshold,
            pr.failure_threshold
        ),
        (
            Duration::from_secs(5),
            Duration::from_secs(2),
            Duration::from_secs(3),
            2,
            4
        )
    );
    let p = probe_pod("      grpc: {port: 9090}\n").unwrap();
    assert_eq!(
        p.readiness_probes[0].action,
        ProbeAction::Grpc {
            port: 9090,
            service: String::new()
        }
    );
}

#[test]
fn exec_and_bad_probes_are_refused_clearly() {
    let e = probe_pod("      exec: {command: [cat, /tmp/ready]}\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Pod default/p: spec.containers[0].readinessProbe.exec: {}",
            probe::EXEC_UNSUPPORTED
        )
    );
    let e = probe_pod("      httpGet: {port: metrics, scheme: HTTPS}\n      periodSeconds: -1\n")
        .unwrap_err();
    let msgs: Vec<String> = e.errors.iter().map(ToString::to_string).collect();
    assert_eq!(msgs, vec![
        "spec.containers[0].readinessProbe.httpGet.scheme: scheme \"HTTPS\" is not supported by ringvip's prober (only HTTP)",
        "spec.containers[0].readinessProbe.httpGet.port: no container port named \"metrics\" in this container",
        "spec.containers[0].readinessProbe.periodSeconds: -1 must be at least 1",
    ]);
}
