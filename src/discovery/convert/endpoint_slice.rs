//! `discovery.k8s.io/v1 EndpointSlice` → [`EndpointSlice`].

use std::collections::HashMap;

use k8s_openapi::api::discovery::v1 as discovery;

use super::{
    label, namespaced_key, parse_ip, port_number, protocol, ConvertError, Errors,
    LABEL_SERVICE_NAME,
};
use crate::model::{AddressFamily, Endpoint, EndpointSlice, Kind, SlicePort};

/// Converts and validates a `discovery.k8s.io/v1 EndpointSlice`.
///
/// Defaults applied: namespace `default`, port protocol TCP, port name empty,
/// conditions ready/serving true and terminating false when missing. Only the first
/// address of each endpoint is kept, but all are checked against `addressType`.
/// SCTP ports are left out (no Service port ringvip serves joins them).
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
        let f = |part: &str| format!("ports[{i}].{part}");
        let name = p.name.as_deref().unwrap_or("");
        if let Some(j) = seen_names.insert(name, i) {
            errs.push(
                f("name"),
                format!("duplicate name {name:?} (also ports[{j}])"),
            );
        }
        // A mixed-protocol Service's slices list its SCTP ports too: they
        // join no served port, so they are left out, not refused.
        if p.protocol.as_deref() == Some("SCTP") {
            continue;
        }
        let proto = errs.ok(|| f("protocol"), protocol(p.protocol.as_deref()));
        let port = match p.port {
            None => Some(None),
            Some(n) => errs.ok(|| f("port"), port_number(n)).map(Some),
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
        if ep.addresses.is_empty() {
            errs.push(
                || format!("endpoints[{i}].addresses"),
                "at least one address is required",
            );
            continue;
        }
        let mut first = None;
        for (j, raw) in ep.addresses.iter().enumerate() {
            let af = || format!("endpoints[{i}].addresses[{j}]");
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
        let node_hints = ep
            .hints
            .as_ref()
            .and_then(|h| h.for_nodes.as_ref())
            .filter(|n| !n.is_empty())
            .map(|n| n.iter().map(|fnode| fnode.name.clone()).collect());
        endpoints.push(Endpoint {
            ip,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep
                .node_name
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(crate::model::intern),
            zone: ep
                .zone
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(crate::model::intern),
            extra: crate::model::EndpointExtra::boxed(
                zone_hints,
                node_hints,
                ep.hostname.clone().filter(|s| !s.is_empty()),
            ),
        });
    }

    // Kept as long as the slice: the length, not a first push's four.
    ports.shrink_to_fit();
    let value = EndpointSlice {
        key: key.clone(),
        service_name,
        family: family.unwrap_or(AddressFamily::V4),
        ports,
        endpoints,
    };
    errs.finish(Kind::EndpointSlice, key, value)
}
