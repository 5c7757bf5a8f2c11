//! Manifests: Services and their EndpointSlices as YAML.

use std::net::{IpAddr, Ipv4Addr};

/// An EndpointSlice's `endpoints:` value: one ready endpoint per address,
/// each with the `extra` lines (indented by two).
pub fn endpoints_yaml<T: std::fmt::Display>(addresses: &[T], extra: &str) -> String {
    let eps: String = addresses
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n{extra}"))
        .collect();
    if eps.is_empty() {
        "[]\n".to_string()
    } else {
        format!("\n{eps}")
    }
}

/// A NodePort Service `name` in `default` with one TCP port, plus its slice.
pub fn nodeport_service(
    name: &str,
    node_port: u16,
    target: u16,
    endpoints: &[Ipv4Addr],
    extra_spec: &str,
) -> String {
    let eps = endpoints_yaml(endpoints, "  nodeName: node-a\n");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n{extra_spec}  ports:\n  - name: p\n    protocol: TCP\n    port: 80\n    targetPort: {target}\n    nodePort: {node_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: p\n  protocol: TCP\n  port: {target}\nendpoints: {eps}"
    )
}

/// A Service with endpoints `eps` (address, ready, nodeName) on one port of
/// `proto`, as NodePort on 127.0.0.1 plus whatever `extra_spec` adds; the
/// Service port is the nodePort too, so a LoadBalancer ingress IP serves on
/// the same port.
pub fn service_with(
    name: &str,
    proto: &str,
    node_port: u16,
    target: u16,
    eps: &[(Ipv4Addr, bool, &str)],
    extra_spec: &str,
) -> String {
    let eps: String = eps
        .iter()
        .map(|(a, ready, node)| {
            format!(
                "- addresses: [\"{a}\"]\n  conditions: {{ready: {ready}}}\n  nodeName: {node}\n"
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n{extra_spec}  ports:\n  - name: p\n    protocol: {proto}\n    port: {node_port}\n    targetPort: {target}\n    nodePort: {node_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: p\n  protocol: {proto}\n  port: {target}\nendpoints:{eps}"
    )
}

/// A ClusterIP Service `name` in `default` with one port (TCP or UDP) and
/// its slice of ready endpoints `eps`, plus whatever `extra` adds to the spec
/// (lines indented by two).
pub fn clusterip(
    name: &str,
    vip: &str,
    port: u16,
    proto: &str,
    target: u16,
    eps: &[IpAddr],
    extra: &str,
) -> String {
    let family = if vip.contains(':') { "IPv6" } else { "IPv4" };
    let eps = endpoints_yaml(eps, "");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: \"{vip}\"\n{extra}  ports: [{{name: p, port: {port}, protocol: {proto}, targetPort: {target}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nports: [{{name: p, port: {target}, protocol: {proto}}}]\nendpoints: {eps}"
    )
}
