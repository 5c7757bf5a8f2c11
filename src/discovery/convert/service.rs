//! `v1 Service` → [`Service`]: one function per field group, every problem
//! reported.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    annotations, label, namespaced_key, parse_ip, port_number, protocol, ConvertError, Errors,
    LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, MAX_AFFINITY_TIMEOUT_SECS,
};
use crate::config::Limits;
use crate::model::{
    AddressFamily, Affinity, Kind, Protocol, Service, ServicePort, ServiceType, SkippedPort,
    TargetPort, TrafficDistribution, TrafficPolicy, DEFAULT_AFFINITY_TIMEOUT,
};

/// Converts and validates a `v1 Service`.
///
/// Defaults applied: namespace `default`, `type: ClusterIP`, protocol TCP,
/// `targetPort` = `port`, traffic policies `Cluster`, ClientIP timeout 10800 s,
/// `allocateLoadBalancerNodePorts: true`. `clusterIPs` wins over `clusterIP`;
/// `None` means headless. A `nodePort` or `healthCheckNodePort` of 0 means "not
/// allocated" (as when creating through the API). An empty `selector` is the same
/// as none (the API server drops empty maps).
pub fn service(svc: &core::Service, limits: &Limits) -> Result<Service, ConvertError> {
    let mut errs = Errors::default();
    let key = namespaced_key(&svc.metadata, &mut errs);
    let empty_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&empty_spec);
    let e = &mut errs;
    let service_type = service_type(spec, e);
    let typed = Typed {
        spec,
        service_type,
        limits,
    };
    let (cluster_ips, headless) = typed.cluster_ips(e);
    let (ports, skipped_ports) = typed.ports(headless, e);
    let options = annotations::options(svc.metadata.annotations.as_ref(), e);
    let external_ips = external_ips(spec, e);
    let load_balancer_ips = load_balancer_ips(svc, e);
    let source_ranges = source_ranges(spec, e);
    let external_policy = traffic_policy(e, "externalTrafficPolicy", &spec.external_traffic_policy);
    let internal_policy = traffic_policy(e, "internalTrafficPolicy", &spec.internal_traffic_policy);
    let affinity = session_affinity(spec, e);
    let health_check_node_port = typed.health_check_node_port(external_policy, e);
    let external_name = external_name(spec, service_type, e);

    let selector = spec.selector.clone().filter(|s| !s.is_empty());
    let value = Service {
        key: key.clone(),
        service_type,
        cluster_ips,
        headless,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        allocate_lb_node_ports: spec.allocate_load_balancer_node_ports.unwrap_or(true),
        external_policy,
        internal_policy,
        affinity,
        health_check_node_port,
        external_name,
        selector,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        proxy_name: label(&svc.metadata, LABEL_SERVICE_PROXY_NAME).map(str::to_string),
        headless_label: label(&svc.metadata, LABEL_HEADLESS).is_some(),
        traffic_distribution: traffic_distribution(spec),
        options,
        skipped_ports,
    };
    errs.finish(Kind::Service, key, value)
}

/// `spec.trafficDistribution`: values the EndpointSlice controller of
/// Kubernetes 1.34 knows; any other value is ignored, as there.
fn traffic_distribution(spec: &core::ServiceSpec) -> Option<TrafficDistribution> {
    match spec.traffic_distribution.as_deref()? {
        "PreferSameNode" => Some(TrafficDistribution::PreferSameNode),
        "PreferSameZone" | "PreferClose" => Some(TrafficDistribution::PreferSameZone),
        _ => None,
    }
}

/// What the field groups that depend on the Service's type read.
#[derive(Clone, Copy)]
struct Typed<'a> {
    spec: &'a core::ServiceSpec,
    service_type: ServiceType,
    limits: &'a Limits,
}

/// `spec.type`, default ClusterIP.
fn service_type(spec: &core::ServiceSpec, errs: &mut Errors) -> ServiceType {
    match spec.type_.as_deref().unwrap_or("") {
        "" | "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => {
            errs.push(
                "spec.type",
                format!(
                    "unknown type {other:?} (expected ClusterIP, NodePort, LoadBalancer or ExternalName)"
                ),
            );
            ServiceType::ClusterIp
        }
    }
}

impl Typed<'_> {
    /// `spec.clusterIPs` (or `spec.clusterIP`): the addresses, and whether the
    /// Service is headless (`None`).
    fn cluster_ips(self, errs: &mut Errors) -> (Vec<IpAddr>, bool) {
        let Typed {
            spec,
            service_type,
            limits,
        } = self;
        let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
        let listed: Vec<&str> = spec
            .cluster_ips
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let (raw_ips, ips_field): (Vec<&str>, &str) = if let Some(&first) = listed.first() {
            if !cluster_ip.is_empty() && first != cluster_ip {
                errs.push(
                    "spec.clusterIPs[0]",
                    format!("{first:?} must be the same as spec.clusterIP {cluster_ip:?}"),
                );
            }
            (listed, "spec.clusterIPs")
        } else if !cluster_ip.is_empty() {
            (vec![cluster_ip], "spec.clusterIP")
        } else {
            (Vec::new(), "spec.clusterIPs")
        };
        let field_at = |i: usize| {
            if ips_field == "spec.clusterIP" {
                ips_field.to_string()
            } else {
                format!("{ips_field}[{i}]")
            }
        };
        let mut headless = false;
        let mut cluster_ips = Vec::new();
        if service_type == ServiceType::ExternalName && !raw_ips.is_empty() {
            errs.push(
                ips_field,
                "may not be set when type is ExternalName".to_string(),
            );
        } else if raw_ips.contains(&"None") {
            if raw_ips.len() > 1 {
                errs.push(ips_field, "\"None\" must be the only entry");
            }
            headless = true;
            if matches!(
                service_type,
                ServiceType::NodePort | ServiceType::LoadBalancer
            ) {
                errs.push(
                    ips_field,
                    "may not be \"None\" (headless) when type is NodePort or LoadBalancer",
                );
            }
        } else {
            if raw_ips.len() > 2 {
                errs.push(ips_field, "at most two addresses (one per family) allowed");
            }
            for (i, raw) in raw_ips.iter().enumerate() {
                match parse_ip(raw) {
                    Ok(ip) => {
                        if !limits.service_cidrs.is_empty()
                            && !limits.service_cidrs.iter().any(|n| n.contains(&ip))
                        {
                            let cidrs: Vec<String> =
                                limits.service_cidrs.iter().map(|n| n.to_string()).collect();
                            errs.push(
                                field_at(i),
                                format!(
                                    "{ip} is not inside any service CIDR ({})",
                                    cidrs.join(", ")
                                ),
                            );
                        }
                        if cluster_ips
                            .iter()
                            .any(|o: &IpAddr| AddressFamily::of(o) == AddressFamily::of(&ip))
                        {
                            errs.push(
                                field_at(i),
                                format!(
                                    "{ip}: dual-stack clusterIPs must be of different families"
                                ),
                            );
                        }
                        cluster_ips.push(ip);
                    }
                    Err(m) => errs.push(field_at(i), m),
                }
            }
        }
        // Kept as long as the Service: the length, not a first push's four.
        cluster_ips.shrink_to_fit();
        (cluster_ips, headless)
    }

    /// `spec.ports`: names, protocols and numbers unique, defaults applied.
    /// SCTP ports are validated like the others, then set aside (ringvip
    /// cannot serve SCTP; the Service's TCP and UDP ports are still served).
    fn ports(self, headless: bool, errs: &mut Errors) -> (Vec<ServicePort>, Vec<SkippedPort>) {
        let Typed {
            spec,
            service_type,
            limits,
        } = self;
        let raw_ports = spec.ports.as_deref().unwrap_or_default();
        if raw_ports.is_empty() && !headless && service_type != ServiceType::ExternalName {
            errs.push("spec.ports", "at least one port is required");
        }
        let mut ports = Vec::with_capacity(raw_ports.len());
        let mut skipped = Vec::new();
        let mut seen_sctp: HashMap<i32, usize> = HashMap::new();
        let mut seen_names: HashMap<&str, usize> = HashMap::new();
        let mut seen_ports: HashMap<(i32, Protocol), usize> = HashMap::new();
        let mut seen_node_ports: HashMap<(i32, Protocol), usize> = HashMap::new();
        for (i, p) in raw_ports.iter().enumerate() {
            let f = format!("spec.ports[{i}]");
            let name = p.name.as_deref().unwrap_or("");
            if name.is_empty() {
                if raw_ports.len() > 1 {
                    errs.push(
                        format!("{f}.name"),
                        "required when the Service has more than one port",
                    );
                }
            } else if let Some(j) = seen_names.insert(name, i) {
                errs.push(
                    format!("{f}.name"),
                    format!("duplicate name {name:?} (also spec.ports[{j}])"),
                );
            }
            if p.protocol.as_deref() == Some("SCTP") {
                let port = errs.ok(format!("{f}.port"), port_number(p.port));
                if let Some(j) = seen_sctp.insert(p.port, i) {
                    errs.push(
                        f.clone(),
                        format!("duplicate port {}/SCTP (also spec.ports[{j}])", p.port),
                    );
                }
                if let Some(port) = port {
                    skipped.push(SkippedPort {
                        name: name.to_string(),
                        port,
                    });
                }
                continue;
            }
            let proto = errs.ok(format!("{f}.protocol"), protocol(p.protocol.as_deref()));
            let port = errs.ok(format!("{f}.port"), port_number(p.port));
            if let (Some(n), Some(pr)) = (port, proto) {
                if let Some(j) = seen_ports.insert((i32::from(n), pr), i) {
                    errs.push(
                        f.clone(),
                        format!("duplicate port {n}/{pr} (also spec.ports[{j}])"),
                    );
                }
            }
            let node_port_v = port_node_port(p, &f, service_type, limits, errs);
            if let (Some(np), Some(pr)) = (node_port_v, proto) {
                if let Some(j) = seen_node_ports.insert((i32::from(np), pr), i) {
                    errs.push(
                        format!("{f}.nodePort"),
                        format!("duplicate nodePort {np}/{pr} (also spec.ports[{j}])"),
                    );
                }
            }
            let target_port = target_port(p, &f, port, errs);
            if let (Some(protocol), Some(port), Some(target_port)) = (proto, port, target_port) {
                ports.push(ServicePort {
                    name: name.to_string(),
                    protocol,
                    port,
                    node_port: node_port_v,
                    target_port,
                });
            }
        }
        (ports, skipped)
    }
}

/// A port's `nodePort` (0: not allocated).
fn port_node_port(
    p: &core::ServicePort,
    f: &str,
    service_type: ServiceType,
    limits: &Limits,
    errs: &mut Errors,
) -> Option<u16> {
    let np = p.node_port.filter(|&np| np != 0)?;
    if matches!(
        service_type,
        ServiceType::ClusterIp | ServiceType::ExternalName
    ) {
        errs.push(
            format!("{f}.nodePort"),
            "may not be set when type is ClusterIP or ExternalName",
        );
        return None;
    }
    errs.ok(format!("{f}.nodePort"), node_port(np, limits))
}

/// A port's `targetPort`: a number (default: the port) or a port name.
fn target_port(
    p: &core::ServicePort,
    f: &str,
    port: Option<u16>,
    errs: &mut Errors,
) -> Option<TargetPort> {
    match &p.target_port {
        None | Some(IntOrString::Int(0)) => port.map(TargetPort::Number),
        Some(IntOrString::String(s)) if s.is_empty() => port.map(TargetPort::Number),
        Some(IntOrString::Int(t)) => errs
            .ok(format!("{f}.targetPort"), port_number(*t))
            .map(TargetPort::Number),
        Some(IntOrString::String(s)) => {
            if is_iana_svc_name(s) {
                Some(TargetPort::Name(s.clone()))
            } else if s.parse::<u16>().is_ok() {
                errs.push(
                    format!("{f}.targetPort"),
                    format!(
                        "{s:?} is not a valid port name (a quoted number is a name in Kubernetes: write it without quotes)"
                    ),
                );
                None
            } else {
                errs.push(
                    format!("{f}.targetPort"),
                    format!(
                        "{s:?} is not a valid port name (1-15 lowercase letters, digits and '-', at least one letter)"
                    ),
                );
                None
            }
        }
    }
}

/// `spec.externalIPs`.
fn external_ips(spec: &core::ServiceSpec, errs: &mut Errors) -> Vec<IpAddr> {
    errs.each(
        spec.external_ips.as_deref(),
        "spec.externalIPs",
        |raw| match parse_ip(raw)? {
            ip if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() => Err(format!(
                "{ip} may not be unspecified, loopback or multicast"
            )),
            ip => Ok(ip),
        },
    )
}

/// `status.loadBalancer.ingress[].ip` served here (`ipMode` VIP or empty).
fn load_balancer_ips(svc: &core::Service, errs: &mut Errors) -> Vec<IpAddr> {
    let mut load_balancer_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    for (i, ing) in ingress.iter().enumerate() {
        let f = format!("status.loadBalancer.ingress[{i}]");
        let use_it = match ing.ip_mode.as_deref().unwrap_or("") {
            "" | "VIP" => true,
            "Proxy" => false,
            other => {
                errs.push(
                    format!("{f}.ipMode"),
                    format!("unknown ipMode {other:?} (expected VIP or Proxy)"),
                );
                false
            }
        };
        match ing.ip.as_deref().filter(|s| !s.is_empty()) {
            None => {} // hostname-only: nothing to serve
            Some(raw) => match parse_ip(raw) {
                Ok(ip) if use_it => load_balancer_ips.push(ip),
                Ok(_) => {}
                Err(m) => errs.push(format!("{f}.ip"), m),
            },
        }
    }
    load_balancer_ips
}

/// `spec.loadBalancerSourceRanges`.
fn source_ranges(spec: &core::ServiceSpec, errs: &mut Errors) -> Vec<IpNet> {
    let list = spec.load_balancer_source_ranges.as_deref();
    errs.each(list, "spec.loadBalancerSourceRanges", |raw| {
        raw.trim()
            .parse::<IpNet>()
            .map(|net| net.trunc())
            .map_err(|_| format!("{raw:?} is not a valid CIDR"))
    })
}

/// `spec.sessionAffinity` and its ClientIP timeout.
fn session_affinity(spec: &core::ServiceSpec, errs: &mut Errors) -> Affinity {
    match spec.session_affinity.as_deref().unwrap_or("") {
        "" | "None" => Affinity::None,
        "ClientIP" => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Affinity::ClientIp {
                    timeout: DEFAULT_AFFINITY_TIMEOUT,
                },
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&t) => Affinity::ClientIp {
                    timeout: Duration::from_secs(u64::from(t.unsigned_abs())),
                },
                Some(t) => {
                    errs.push(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1..{MAX_AFFINITY_TIMEOUT_SECS}"),
                    );
                    Affinity::None
                }
            }
        }
        other => {
            errs.push(
                "spec.sessionAffinity",
                format!("unknown sessionAffinity {other:?} (expected None or ClientIP)"),
            );
            Affinity::None
        }
    }
}

impl Typed<'_> {
    /// `spec.healthCheckNodePort`: only with LoadBalancer and
    /// `externalTrafficPolicy: Local`.
    fn health_check_node_port(
        self,
        external_policy: TrafficPolicy,
        errs: &mut Errors,
    ) -> Option<u16> {
        let Typed {
            spec,
            service_type,
            limits,
        } = self;
        match spec.health_check_node_port.filter(|&p| p != 0) {
            None => None,
            Some(p) => {
                if service_type != ServiceType::LoadBalancer
                    || external_policy != TrafficPolicy::Local
                {
                    errs.push(
                        "spec.healthCheckNodePort",
                        "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
                    );
                    None
                } else {
                    errs.ok("spec.healthCheckNodePort", node_port(p, limits))
                }
            }
        }
    }
}

/// `spec.externalName`: required, and a DNS name, for type ExternalName.
fn external_name(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
    errs: &mut Errors,
) -> Option<String> {
    let external_name = spec.external_name.clone().filter(|s| !s.is_empty());
    if service_type == ServiceType::ExternalName {
        match &external_name {
            None => errs.push("spec.externalName", "required when type is ExternalName"),
            Some(n) if !is_dns_subdomain(n) => errs.push(
                "spec.externalName",
                format!("{n:?} is not a valid DNS name"),
            ),
            Some(_) => {}
        }
    }
    external_name
}

/// A nodePort / healthCheckNodePort inside the configured range.
fn node_port(v: i32, limits: &Limits) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if limits.node_port_range.contains(&p) => Ok(p),
        _ => Err(format!(
            "{v} is outside the node port range {}-{}",
            limits.node_port_range.start(),
            limits.node_port_range.end()
        )),
    }
}

/// `spec.<field>`, a traffic policy (default Cluster, also when invalid).
fn traffic_policy(errs: &mut Errors, field: &str, v: &Option<String>) -> TrafficPolicy {
    let policy = match v.as_deref().unwrap_or("") {
        "" | "Cluster" => Ok(TrafficPolicy::Cluster),
        "Local" => Ok(TrafficPolicy::Local),
        other => Err(format!(
            "unknown traffic policy {other:?} (expected Cluster or Local)"
        )),
    };
    errs.ok(format!("spec.{field}"), policy).unwrap_or_default()
}

/// IANA service name, as Kubernetes validates named ports: 1-15 characters,
/// lowercase letters, digits and `-`, at least one letter, no `-` at either end
/// and no `--`.
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// RFC 1123 subdomain (what `externalName` must be), a trailing dot allowed.
fn is_dns_subdomain(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}
