//! `v1 Pod` → [`Pod`] (file mode resolves selectors against Pods).

use k8s_openapi::api::core::v1 as core;

use super::{namespaced_key, parse_ip, port_number, protocol, ConvertError, Errors};
use crate::model::{Kind, Pod};

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
    let mut readiness_probes = Vec::new();
    if let Some(spec) = &pod.spec {
        for (i, c) in spec.containers.iter().enumerate() {
            if let Some(p) = &c.readiness_probe {
                let f = format!("spec.containers[{i}].readinessProbe");
                if let Some(p) = super::probe::probe(p, c, &f, &mut errs) {
                    readiness_probes.push(p);
                }
            }
        }
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
        readiness_probes,
    };
    errs.finish(Kind::Pod, key, value)
}
