//! The environment variables the kubelet injects into a Pod's containers for the
//! Services it can see (kubernetes pkg/kubelet/envvars/envvars.go `FromServices`,
//! and pkg/kubelet `getServiceEnvVarMap` for which Services count).
//!
//! For a Service `redis-primary` with ClusterIP 10.96.0.11 and port 6379/TCP:
//!
//! ```text
//! REDIS_PRIMARY_SERVICE_HOST=10.96.0.11
//! REDIS_PRIMARY_SERVICE_PORT=6379
//! REDIS_PRIMARY_PORT=tcp://10.96.0.11:6379
//! REDIS_PRIMARY_PORT_6379_TCP=tcp://10.96.0.11:6379
//! REDIS_PRIMARY_PORT_6379_TCP_PROTO=tcp
//! REDIS_PRIMARY_PORT_6379_TCP_PORT=6379
//! REDIS_PRIMARY_PORT_6379_TCP_ADDR=10.96.0.11
//! ```
//!
//! plus `<NAME>_SERVICE_PORT_<PORTNAME>` for every named port.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::model::{Service, ServiceType};

/// Namespace whose `kubernetes` Service every Pod sees (the kubelet's master
/// Services).
pub const MASTER_NAMESPACE: &str = "default";
/// Name of the API server's Service.
pub const MASTER_SERVICE: &str = "kubernetes";

/// `makeEnvVariableName`: upper case, `-` → `_`.
pub fn env_name(s: &str) -> String {
    s.replace('-', "_").to_uppercase()
}

/// Whether the kubelet makes variables for this Service: it has a ClusterIP
/// (not headless, not ExternalName, not unset) and at least one port.
fn has_cluster_ip(svc: &Service) -> bool {
    svc.service_type != ServiceType::ExternalName
        && !svc.headless
        && !svc.cluster_ips.is_empty()
        && !svc.ports.is_empty()
}

/// `FromServices` for one Service, in the kubelet's order.
pub fn service_vars(svc: &Service) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (Some(ip), Some(first)) = (svc.cluster_ips.first(), svc.ports.first()) else {
        return out;
    };
    if !has_cluster_ip(svc) {
        return out;
    }
    let prefix = env_name(&svc.key.name);
    out.push((format!("{prefix}_SERVICE_HOST"), ip.to_string()));
    let service_port = format!("{prefix}_SERVICE_PORT");
    out.push((service_port.clone(), first.port.to_string()));
    for sp in svc.ports.iter().filter(|p| !p.name.is_empty()) {
        out.push((
            format!("{service_port}_{}", env_name(&sp.name)),
            sp.port.to_string(),
        ));
    }
    // Docker-link variables (`makeLinkVariables`).
    for (i, sp) in svc.ports.iter().enumerate() {
        let proto_upper = sp.protocol.as_str();
        let proto = proto_upper.to_ascii_lowercase();
        // net.JoinHostPort: IPv6 in brackets.
        let url = format!("{proto}://{}", SocketAddr::new(*ip, sp.port));
        if i == 0 {
            out.push((format!("{prefix}_PORT"), url.clone()));
        }
        let pp = format!("{prefix}_PORT_{}_{proto_upper}", sp.port);
        out.push((format!("{pp}_PROTO"), proto));
        out.push((format!("{pp}_PORT"), sp.port.to_string()));
        out.push((format!("{pp}_ADDR"), ip.to_string()));
        out.push((pp, url));
    }
    out
}

/// Every variable a Pod in `namespace` gets, sorted by name: the namespace's
/// Services, plus `default/kubernetes` unless the namespace has its own Service
/// of that name (`getServiceEnvVarMap`). Later definitions of a name (two
/// Services mapping to one prefix, e.g. `a-b` and `a_b`) win in Service-name order.
pub fn for_namespace<'a>(
    namespace: &str,
    services: impl IntoIterator<Item = &'a Service>,
) -> BTreeMap<String, String> {
    let mut mine: BTreeMap<&str, &Service> = BTreeMap::new();
    let mut master: Option<&Service> = None;
    for s in services {
        if !has_cluster_ip(s) {
            continue;
        }
        if s.key.namespace == namespace {
            mine.insert(&s.key.name, s);
        } else if s.key.namespace == MASTER_NAMESPACE && s.key.name == MASTER_SERVICE {
            master = Some(s);
        }
    }
    if let Some(m) = master {
        mine.entry(MASTER_SERVICE).or_insert(m);
    }
    let mut out = BTreeMap::new();
    for s in mine.values() {
        out.extend(service_vars(s));
    }
    out
}

/// `KEY=value` lines, one per variable, in name order. Values are addresses,
/// ports and URLs: nothing a shell needs quoted.
pub fn render(vars: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (k, v) in vars {
        s.push_str(k);
        s.push('=');
        s.push_str(v);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePort};
    use crate::testing::builders;

    /// Port `port` sending to the same port.
    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        builders::port(name, protocol, port, port)
    }

    /// Service `ns/name` at ClusterIP `ip`.
    fn svc(ns: &str, name: &str, ip: &str, ports: Vec<ServicePort>) -> Service {
        builders::service(ns, name, &[ip], ports)
    }

    /// Service `ns/name` at ClusterIP `ip` with one TCP port `number` named `port_name`.
    fn tcp(ns: &str, name: &str, ip: &str, port_name: &str, number: u16) -> Service {
        svc(ns, name, ip, vec![port(port_name, Protocol::Tcp, number)])
    }

    #[test]
    fn single_port_service_matches_the_kubelet_documentation() {
        let s = tcp("default", "redis-primary", "10.96.0.11", "", 6379);
        let got = render(&for_namespace("default", [&s]));
        assert_eq!(
            got,
            "REDIS_PRIMARY_PORT=tcp://10.96.0.11:6379\n\
             REDIS_PRIMARY_PORT_6379_TCP=tcp://10.96.0.11:6379\n\
             REDIS_PRIMARY_PORT_6379_TCP_ADDR=10.96.0.11\n\
             REDIS_PRIMARY_PORT_6379_TCP_PORT=6379\n\
             REDIS_PRIMARY_PORT_6379_TCP_PROTO=tcp\n\
             REDIS_PRIMARY_SERVICE_HOST=10.96.0.11\n\
             REDIS_PRIMARY_SERVICE_PORT=6379\n"
        );
    }

    #[test]
    fn multi_port_named_udp_and_ipv6() {
        let s = svc(
            "shop",
            "kube-dns",
            "fd00:10:96::a",
            vec![
                port("dns", Protocol::Udp, 53),
                port("dns-tcp", Protocol::Tcp, 53),
            ],
        );
        let v = for_namespace("shop", [&s]);
        assert_eq!(v["KUBE_DNS_SERVICE_PORT"], "53");
        assert_eq!(v["KUBE_DNS_SERVICE_PORT_DNS"], "53");
        assert_eq!(v["KUBE_DNS_SERVICE_PORT_DNS_TCP"], "53");
        assert_eq!(v["KUBE_DNS_PORT"], "udp://[fd00:10:96::a]:53", "first port");
        assert_eq!(v["KUBE_DNS_PORT_53_UDP"], "udp://[fd00:10:96::a]:53");
        assert_eq!(v["KUBE_DNS_PORT_53_TCP"], "tcp://[fd00:10:96::a]:53");
        assert_eq!(v["KUBE_DNS_PORT_53_TCP_PROTO"], "tcp");
        assert_eq!(v["KUBE_DNS_PORT_53_UDP_ADDR"], "fd00:10:96::a");
        assert_eq!(v.len(), 13);
    }

    #[test]
    fn namespace_filter_master_service_and_skips() {
        let api = tcp("default", "kubernetes", "10.96.0.1", "https", 443);
        let other = tcp("other", "web", "10.96.0.2", "", 80);
        let headless = Service {
            cluster_ips: vec![],
            headless: true,
            ..tcp("shop", "db", "10.96.0.3", "", 5432)
        };
        let mine = tcp("shop", "cart", "10.96.0.4", "", 80);
        let v = for_namespace("shop", [&api, &other, &headless, &mine]);
        assert_eq!(v["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(v["KUBERNETES_SERVICE_PORT_HTTPS"], "443");
        assert_eq!(v["CART_SERVICE_HOST"], "10.96.0.4");
        assert!(!v
            .keys()
            .any(|k| k.starts_with("WEB_") || k.starts_with("DB_")));

        let own_api = tcp("shop", "kubernetes", "10.96.0.9", "", 1);
        let v = for_namespace("shop", [&api, &own_api]);
        assert_eq!(
            v["KUBERNETES_SERVICE_HOST"], "10.96.0.9",
            "the namespace's own wins"
        );
    }
}
