//! Conversion of Kubernetes API objects (k8s-openapi types) into the validated
//! [`crate::model`] types, applying the API server's defaults and rejecting what
//! kube-apiserver (or ringvip) would reject.
//!
//! The conversion does not depend on where an object came from: the file source
//! adds file and line to a [`ConvertError`], an API source would add nothing.
//! Every problem of an object is reported, not only the first.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::Limits;
use crate::model::{
    AddressFamily, Affinity, Endpoint, EndpointSlice, Kind, Node, ObjectKey, Pod, Protocol,
    Service, ServicePort, ServiceType, SlicePort, TargetPort, TrafficPolicy,
    DEFAULT_AFFINITY_TIMEOUT,
};

/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label naming the proxy that should program a Service.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking a Service headless for proxies.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Node label carrying the zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Largest `sessionAffinityConfig.clientIP.timeoutSeconds` (one day), as in Kubernetes.
pub const MAX_AFFINITY_TIMEOUT_SECS: i32 = 86400;

/// The message for SCTP, which ringvip cannot serve.
pub const SCTP_UNSUPPORTED: &str =
    "SCTP is not supported by ringvip: no kernel socket or smoltcp support";

/// Kubernetes spelling of a kind (`Service`, `EndpointSlice`, `Node`, `Pod`).
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "Service",
        Kind::EndpointSlice => "EndpointSlice",
        Kind::Node => "Node",
        Kind::Pod => "Pod",
    }
}

/// `Service default/web`, or `Node node-a` for cluster-scoped objects.
pub fn describe(kind: Kind, key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{} {}", kind_name(kind), key.name)
    } else {
        format!("{} {}", kind_name(kind), key)
    }
}

/// One problem of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field in the object, e.g. `spec.ports[1].port`.
    pub field: String,
    /// What is wrong, e.g. `70000 is out of range 1..65535`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem of one object. Display: `Service default/web: spec.ports[1].port:
/// 70000 is out of range 1..65535` (several problems joined by `; `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConvertError {
    /// Kind of the object.
    pub kind: Kind,
    /// Namespace (empty for Nodes) and name; the name may be empty when missing.
    pub key: ObjectKey,
    /// At least one problem.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", describe(self.kind, &self.key))?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects field errors of one object.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn finish<T>(self, kind: Kind, key: ObjectKey, value: T) -> Result<T, ConvertError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConvertError {
                kind,
                key,
                errors: self.0,
            })
        }
    }
}

/// Namespace (default `default`) and name of a namespaced object.
fn namespaced_key(meta: &ObjectMeta, errs: &mut Errors) -> ObjectKey {
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    ObjectKey::new(namespace, object_name(meta, errs))
}

fn object_name(meta: &ObjectMeta, errs: &mut Errors) -> String {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => {
            errs.push("metadata.name", "required");
            String::new()
        }
    }
}

fn label<'a>(meta: &'a ObjectMeta, name: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(name).map(String::as_str)
}

/// Parses a protocol, TCP when empty.
fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("") {
        "" | "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(SCTP_UNSUPPORTED.to_string()),
        other => Err(format!("unknown protocol {other:?} (expected TCP or UDP)")),
    }
}

/// A port number 1..=65535.
fn port_number(v: i32) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{v} is out of range 1..65535")),
    }
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

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a valid IP address"))
}

fn traffic_policy(v: Option<&str>) -> Result<TrafficPolicy, String> {
    match v.unwrap_or("") {
        "" | "Cluster" => Ok(TrafficPolicy::Cluster),
        "Local" => Ok(TrafficPolicy::Local),
        other => Err(format!(
            "unknown traffic policy {other:?} (expected Cluster or Local)"
        )),
    }
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
    let (cluster_ips, headless) = cluster_ips(spec, service_type, limits, e);
    let ports = ports(spec, service_type, headless, limits, e);
    let external_ips = external_ips(spec, e);
    let load_balancer_ips = load_balancer_ips(svc, e);
    let source_ranges = source_ranges(spec, e);
    let external_policy =
        traffic_policy(spec.external_traffic_policy.as_deref()).unwrap_or_else(|m| {
            e.push("spec.externalTrafficPolicy", m);
            TrafficPolicy::Cluster
        });
    let internal_policy =
        traffic_policy(spec.internal_traffic_policy.as_deref()).unwrap_or_else(|m| {
            e.push("spec.internalTrafficPolicy", m);
            TrafficPolicy::Cluster
        });
    let affinity = session_affinity(spec, e);
    let health_check_node_port =
        health_check_node_port(spec, service_type, external_policy, limits, e);
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
    };
    errs.finish(Kind::Service, key, value)
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

/// `spec.clusterIPs` (or `spec.clusterIP`): the addresses, and whether the
/// Service is headless (`None`).
fn cluster_ips(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
    limits: &Limits,
    errs: &mut Errors,
) -> (Vec<IpAddr>, bool) {
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
                            format!("{ip} is not inside any service CIDR ({})", cidrs.join(", ")),
                        );
                    }
                    if cluster_ips
                        .iter()
                        .any(|o: &IpAddr| AddressFamily::of(o) == AddressFamily::of(&ip))
                    {
                        errs.push(
                            field_at(i),
                            format!("{ip}: dual-stack clusterIPs must be of different families"),
                        );
                    }
                    cluster_ips.push(ip);
                }
                Err(m) => errs.push(field_at(i), m),
            }
        }
    }
    (cluster_ips, headless)
}

/// `spec.ports`: names, protocols and numbers unique, defaults applied.
fn ports(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
    headless: bool,
    limits: &Limits,
    errs: &mut Errors,
) -> Vec<ServicePort> {
    let raw_ports = spec.ports.as_deref().unwrap_or_default();
    if raw_ports.is_empty() && !headless && service_type != ServiceType::ExternalName {
        errs.push("spec.ports", "at least one port is required");
    }
    let mut ports = Vec::with_capacity(raw_ports.len());
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
        let proto = match protocol(p.protocol.as_deref()) {
            Ok(pr) => Some(pr),
            Err(m) => {
                errs.push(format!("{f}.protocol"), m);
                None
            }
        };
        let port = match port_number(p.port) {
            Ok(n) => Some(n),
            Err(m) => {
                errs.push(format!("{f}.port"), m);
                None
            }
        };
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
    ports
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
    node_port(np, limits)
        .map_err(|m| errs.push(format!("{f}.nodePort"), m))
        .ok()
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
        Some(IntOrString::Int(t)) => match port_number(*t) {
            Ok(n) => Some(TargetPort::Number(n)),
            Err(m) => {
                errs.push(format!("{f}.targetPort"), m);
                None
            }
        },
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
    let mut external_ips = Vec::new();
    for (i, raw) in spec
        .external_ips
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let f = format!("spec.externalIPs[{i}]");
        match parse_ip(raw) {
            Ok(ip) if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() => {
                errs.push(
                    f,
                    format!("{ip} may not be unspecified, loopback or multicast"),
                );
            }
            Ok(ip) => external_ips.push(ip),
            Err(m) => errs.push(f, m),
        }
    }
    external_ips
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
    let mut source_ranges = Vec::new();
    for (i, raw) in spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match raw.trim().parse::<IpNet>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) => errs.push(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{raw:?} is not a valid CIDR"),
            ),
        }
    }
    source_ranges
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

/// `spec.healthCheckNodePort`: only with LoadBalancer and
/// `externalTrafficPolicy: Local`.
fn health_check_node_port(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
    external_policy: TrafficPolicy,
    limits: &Limits,
    errs: &mut Errors,
) -> Option<u16> {
    match spec.health_check_node_port.filter(|&p| p != 0) {
        None => None,
        Some(p) => {
            if service_type != ServiceType::LoadBalancer || external_policy != TrafficPolicy::Local
            {
                errs.push(
                    "spec.healthCheckNodePort",
                    "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
                );
                None
            } else {
                match node_port(p, limits) {
                    Ok(n) => Some(n),
                    Err(m) => {
                        errs.push("spec.healthCheckNodePort", m);
                        None
                    }
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

/// Converts and validates a `discovery.k8s.io/v1 EndpointSlice`.
///
/// Defaults applied: namespace `default`, port protocol TCP, port name empty,
/// conditions ready/serving true and terminating false when missing. Only the first
/// address of each endpoint is kept, but all are checked against `addressType`.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSlice, ConvertError> {
    let mut errs = Errors::default();
    let key = namespaced_key(&slice.metadata, &mut errs);
    let service_name = match label(&slice.metadata, LABEL_SERVICE_NAME) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => {
            errs.push(
                format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                "required: it names the Service this slice belongs to",
            );
            String::new()
        }
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(AddressFamily::V4),
        "IPv6" => Some(AddressFamily::V6),
        "FQDN" => {
            errs.push(
                "addressType",
                "FQDN slices are not supported (only IPv4 and IPv6, like kube-proxy)",
            );
            None
        }
        "" => {
            errs.push("addressType", "required (IPv4 or IPv6)");
            None
        }
        other => {
            errs.push(
                "addressType",
                format!("unknown addressType {other:?} (expected IPv4 or IPv6)"),
            );
            None
        }
    };

    let mut ports = Vec::new();
    let mut seen_names: HashMap<&str, usize> = HashMap::new();
    for (i, p) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let f = format!("ports[{i}]");
        let name = p.name.as_deref().unwrap_or("");
        if let Some(j) = seen_names.insert(name, i) {
            errs.push(
                format!("{f}.name"),
                format!("duplicate name {name:?} (also ports[{j}])"),
            );
        }
        let proto = protocol(p.protocol.as_deref())
            .map_err(|m| errs.push(format!("{f}.protocol"), m))
            .ok();
        let port = match p.port {
            None => Some(None),
            Some(n) => port_number(n)
                .map(Some)
                .map_err(|m| errs.push(format!("{f}.port"), m))
                .ok(),
        };
        if let (Some(protocol), Some(port)) = (proto, port) {
            ports.push(SlicePort {
                name: name.to_string(),
                protocol,
                port,
            });
        }
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let f = format!("endpoints[{i}]");
        if ep.addresses.is_empty() {
            errs.push(format!("{f}.addresses"), "at least one address is required");
            continue;
        }
        let mut first = None;
        for (j, raw) in ep.addresses.iter().enumerate() {
            let af = format!("{f}.addresses[{j}]");
            match parse_ip(raw) {
                Ok(ip) => {
                    if let Some(fam) = family {
                        if AddressFamily::of(&ip) != fam {
                            let want = match fam {
                                AddressFamily::V4 => "IPv4",
                                AddressFamily::V6 => "IPv6",
                            };
                            errs.push(
                                af,
                                format!("{ip} is not an {want} address (addressType is {want})"),
                            );
                            continue;
                        }
                    }
                    if j == 0 {
                        first = Some(ip);
                    }
                }
                Err(m) => errs.push(af, m),
            }
        }
        let Some(ip) = first else { continue };
        let cond = ep.conditions.as_ref();
        let zone_hints = ep
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .filter(|z| !z.is_empty())
            .map(|z| z.iter().map(|fz| fz.name.clone()).collect());
        endpoints.push(Endpoint {
            ip,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone().filter(|s| !s.is_empty()),
            zone: ep.zone.clone().filter(|s| !s.is_empty()),
            zone_hints,
            hostname: ep.hostname.clone().filter(|s| !s.is_empty()),
        });
    }

    let value = EndpointSlice {
        key: key.clone(),
        service_name,
        family: family.unwrap_or(AddressFamily::V4),
        ports,
        endpoints,
    };
    errs.finish(Kind::EndpointSlice, key, value)
}

/// Converts a `v1 Node`: zone label, InternalIP then ExternalIP addresses, and
/// whether it is being deleted.
pub fn node(node: &core::Node) -> Result<Node, ConvertError> {
    let mut errs = Errors::default();
    let name = object_name(&node.metadata, &mut errs);
    let mut internal = Vec::new();
    let mut external = Vec::new();
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    for (i, a) in addresses.iter().enumerate() {
        let list = match a.type_.as_str() {
            "InternalIP" => &mut internal,
            "ExternalIP" => &mut external,
            _ => continue,
        };
        match parse_ip(&a.address) {
            Ok(ip) => list.push(ip),
            Err(m) => errs.push(format!("status.addresses[{i}].address"), m),
        }
    }
    internal.extend(external);
    let value = Node {
        name: name.clone(),
        zone: label(&node.metadata, LABEL_ZONE)
            .filter(|z| !z.is_empty())
            .map(str::to_string),
        addresses: internal,
        deleting: node.metadata.deletion_timestamp.is_some(),
    };
    errs.finish(Kind::Node, ObjectKey::new("", name), value)
}

/// Converts a `v1 Pod` (file mode): labels, IPs (`podIPs`, else `podIP`), node,
/// Ready condition, deletion, named container ports and `spec.hostname`.
///
/// Container ports come from `containers` and from restartable (sidecar) init
/// containers, as the EndpointSlice controller resolves them. Named ports with a
/// protocol ringvip cannot serve (SCTP) are left out without error: no Service
/// port that ringvip accepts can refer to them.
pub fn pod(pod: &core::Pod) -> Result<Pod, ConvertError> {
    let mut errs = Errors::default();
    let key = namespaced_key(&pod.metadata, &mut errs);
    let status = pod.status.as_ref();

    let mut ips = Vec::new();
    let pod_ips = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default();
    if !pod_ips.is_empty() {
        for (i, p) in pod_ips.iter().enumerate() {
            match parse_ip(&p.ip) {
                Ok(ip) => ips.push(ip),
                Err(m) => errs.push(format!("status.podIPs[{i}].ip"), m),
            }
        }
    } else if let Some(raw) = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|s| !s.is_empty())
    {
        match parse_ip(raw) {
            Ok(ip) => ips.push(ip),
            Err(m) => errs.push("status.podIP", m),
        }
    }

    let ready = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");

    let mut container_ports = Vec::new();
    if let Some(spec) = &pod.spec {
        let sidecars = spec
            .init_containers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c));
        for (cf, c) in containers.chain(sidecars) {
            for (j, p) in c.ports.as_deref().unwrap_or_default().iter().enumerate() {
                let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                let Ok(proto) = protocol(p.protocol.as_deref()) else {
                    continue;
                };
                match port_number(p.container_port) {
                    Ok(n) => container_ports.push((name.to_string(), proto, n)),
                    Err(m) => errs.push(format!("{cf}.ports[{j}].containerPort"), m),
                }
            }
        }
    }

    let spec = pod.spec.as_ref();
    let value = Pod {
        key: key.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node_name: spec
            .and_then(|s| s.node_name.clone())
            .filter(|s| !s.is_empty()),
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        container_ports,
        hostname: spec
            .and_then(|s| s.hostname.clone())
            .filter(|s| !s.is_empty()),
        subdomain: spec
            .and_then(|s| s.subdomain.clone())
            .filter(|s| !s.is_empty()),
        terminal: matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
    };
    errs.finish(Kind::Pod, key, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn k8s_service(yaml: &str) -> core::Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn convert_service(yaml: &str) -> Result<Service, ConvertError> {
        service(&k8s_service(yaml), &Limits::default())
    }

    /// A Service named web in default with the given spec (YAML, indented 2).
    fn with_spec(spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n{spec}")
    }

    fn slice_yaml(body: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\n{body}"
        )
    }

    fn convert_slice(yaml: &str) -> Result<EndpointSlice, ConvertError> {
        endpoint_slice(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn service_defaults_are_applied() {
        let s = convert_service(&with_spec(
            "  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n",
        ))
        .unwrap();
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
        let s = convert_service(&with_spec(
            "  clusterIP: None\n  clusterIPs: [None]\n  ports:\n  - port: 80\n",
        ))
        .unwrap();
        assert!(s.headless);
        assert!(s.cluster_ips.is_empty());
        let s = convert_service(&with_spec("  clusterIP: None\n")).unwrap();
        assert!(s.headless, "headless needs no ports");

        let s = convert_service(&with_spec(
            "  type: ExternalName\n  externalName: db.example.com\n",
        ))
        .unwrap();
        assert_eq!(s.service_type, ServiceType::ExternalName);
        assert_eq!(s.external_name.as_deref(), Some("db.example.com"));

        let s = convert_service(&with_spec(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n  ports:\n  - port: 80\n",
        ))
        .unwrap();
        assert_eq!(
            s.affinity,
            Affinity::ClientIp {
                timeout: Duration::from_secs(60)
            }
        );
        // targetPort 0 and "" mean "same as port", nodePort 0 means unallocated.
        let s = convert_service(&with_spec(
            "  type: NodePort\n  ports:\n  - name: a\n    port: 81\n    targetPort: 0\n    nodePort: 0\n  - name: b\n    port: 82\n    targetPort: \"\"\n",
        ))
        .unwrap();
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
            ("  ports:\n  - port: 80\n    protocol: SCTP\n", "spec.ports[0].protocol", "SCTP is not supported by ringvip: no kernel socket or smoltcp support"),
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
                "spec.ports[1].protocol",
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
        let s = convert_slice(&slice_yaml(
            "addressType: IPv4\nports:\n- port: 8080\n- name: dns\n  protocol: UDP\n  port: 53\nendpoints:\n- addresses: [10.244.1.10, 10.244.1.99]\n- addresses: [10.244.1.11]\n  conditions: {ready: false, serving: true, terminating: true}\n  nodeName: node-a\n  zone: z1\n  hostname: pod-1\n  hints:\n    forZones: [{name: z1}, {name: z2}]\n- addresses: [10.244.1.12]\n  hints: {forZones: []}\n",
        ))
        .unwrap();
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
        assert_eq!(e0.zone_hints, None);
        assert_eq!(e0.node_name, None);
        let e1 = &s.endpoints[1];
        assert!(!e1.ready && e1.serving && e1.terminating);
        assert_eq!(e1.node_name.as_deref(), Some("node-a"));
        assert_eq!(e1.zone.as_deref(), Some("z1"));
        assert_eq!(e1.hostname.as_deref(), Some("pod-1"));
        assert_eq!(
            e1.zone_hints,
            Some(vec!["z1".to_string(), "z2".to_string()])
        );
        assert_eq!(s.endpoints[2].zone_hints, None, "empty hints are no hints");

        let s = convert_slice(&slice_yaml(
            "addressType: IPv6\nendpoints:\n- addresses: [\"fd00::1\"]\n  conditions: {}\n",
        ))
        .unwrap();
        assert_eq!(s.family, AddressFamily::V6);
        assert!(s.endpoints[0].ready && s.endpoints[0].serving);
    }

    #[test]
    fn endpoint_slice_validation_errors() {
        let cases: &[(String, &str, &str)] = &[
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: orphan\naddressType: IPv4\nendpoints: []\n".to_string(),
                "metadata.labels[kubernetes.io/service-name]",
                "required",
            ),
            (slice_yaml("addressType: FQDN\nendpoints: []\n"), "addressType", "FQDN slices are not supported"),
            (slice_yaml("addressType: IPv5\nendpoints: []\n"), "addressType", "unknown addressType \"IPv5\""),
            (slice_yaml("endpoints: []\n"), "addressType", "required"),
            (
                slice_yaml("addressType: IPv6\nendpoints:\n- addresses: [10.0.0.1]\n"),
                "endpoints[0].addresses[0]",
                "10.0.0.1 is not an IPv6 address (addressType is IPv6)",
            ),
            (
                slice_yaml("addressType: IPv4\nendpoints:\n- addresses: [\"fd00::1\"]\n"),
                "endpoints[0].addresses[0]",
                "fd00::1 is not an IPv4 address",
            ),
            (
                slice_yaml("addressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\n- addresses: [web-0.local]\n"),
                "endpoints[1].addresses[0]",
                "\"web-0.local\" is not a valid IP address",
            ),
            (slice_yaml("addressType: IPv4\nendpoints:\n- addresses: []\n"), "endpoints[0].addresses", "at least one address"),
            (slice_yaml("addressType: IPv4\nports:\n- port: 0\nendpoints: []\n"), "ports[0].port", "0 is out of range 1..65535"),
            (slice_yaml("addressType: IPv4\nports:\n- port: 80\n  protocol: SCTP\nendpoints: []\n"), "ports[0].protocol", "SCTP is not supported"),
            (
                slice_yaml("addressType: IPv4\nports:\n- {name: a, port: 80}\n- {name: a, port: 81}\nendpoints: []\n"),
                "ports[1].name",
                "duplicate name \"a\"",
            ),
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
        let n: core::Node = serde_yaml::from_str(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  deletionTimestamp: \"2024-05-01T10:00:00Z\"\n  labels:\n    topology.kubernetes.io/zone: zone-a\nstatus:\n  addresses:\n  - {type: Hostname, address: node-a}\n  - {type: ExternalIP, address: 203.0.113.5}\n  - {type: InternalIP, address: 192.168.1.5}\n  - {type: InternalIP, address: \"fd00::5\"}\n",
        )
        .unwrap();
        let n = node(&n).unwrap();
        assert_eq!(n.name, "node-a");
        assert_eq!(n.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            n.addresses,
            vec![ip("192.168.1.5"), ip("fd00::5"), ip("203.0.113.5")]
        );
        assert!(n.deleting);

        let bad: core::Node = serde_yaml::from_str(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\nstatus:\n  addresses:\n  - {type: InternalIP, address: x}\n",
        )
        .unwrap();
        let e = node(&bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Node node-b: status.addresses[0].address: \"x\" is not a valid IP address"
        );
    }

    #[test]
    fn pod_is_converted() {
        let p: core::Pod = serde_yaml::from_str(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  labels: {app: web}\nspec:\n  hostname: web-0\n  nodeName: node-a\n  initContainers:\n  - name: proxy\n    restartPolicy: Always\n    ports: [{name: admin, containerPort: 9901}]\n  - name: init\n    ports: [{name: ignored, containerPort: 1}]\n  containers:\n  - name: app\n    ports:\n    - {name: http, containerPort: 8080}\n    - {containerPort: 9090}\n    - {name: dns, containerPort: 53, protocol: UDP}\n    - {name: sctp, containerPort: 99, protocol: SCTP}\nstatus:\n  podIP: 10.244.1.10\n  podIPs: [{ip: 10.244.1.10}, {ip: \"fd00::10\"}]\n  conditions:\n  - {type: PodScheduled, status: \"True\"}\n  - {type: Ready, status: \"True\"}\n",
        )
        .unwrap();
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

        let p: core::Pod = serde_yaml::from_str(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  deletionTimestamp: \"2024-05-01T10:00:00Z\"\nspec:\n  containers: []\nstatus:\n  podIP: 10.244.1.11\n  conditions:\n  - {type: Ready, status: \"False\"}\n",
        )
        .unwrap();
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

        let p: core::Pod = serde_yaml::from_str(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: job-1\nspec:\n  hostname: job-1\n  subdomain: jobs\n  containers: []\nstatus:\n  phase: Succeeded\n  podIP: 10.244.1.12\n",
        )
        .unwrap();
        let p = pod(&p).unwrap();
        assert!(p.terminal, "Succeeded and Failed Pods are terminal");
        assert_eq!(p.subdomain.as_deref(), Some("jobs"));
    }
}
