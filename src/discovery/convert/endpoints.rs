//! Legacy `v1 Endpoints` → [`LegacyEndpoints`]: the EndpointSlices the
//! EndpointSliceMirroring controller would write for it
//! [pkg/controller/endpointslicemirroring]. Whether they are used (a
//! same-name Service without selector) is decided by the store, which knows
//! the Services.
//!
//! As the controller: one slice per subset and address family; `addresses`
//! are ready, `notReadyAddresses` not ready (serving left unset, which reads
//! as serving, terminating false); the subset's ports on each of its slices;
//! at most [`MAX_MIRRORED_PER_SUBSET`] addresses per subset, ready ones
//! first, the rest dropped; objects labelled [`LABEL_SKIP_MIRROR`] `"true"`
//! or holding a leader-election lock are not mirrored. SCTP ports are left
//! out (no Service port ringvip serves joins them).

use k8s_openapi::api::core::v1 as core;

use super::{label, namespaced_key, parse_ip, port_number, protocol, ConvertError, Errors};
use crate::model::{
    AddressFamily, Endpoint, EndpointSlice, Kind, LegacyEndpoints, ObjectKey, SlicePort,
};

/// Label by which an Endpoints object opts out of mirroring.
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Annotation of leader-election locks kept in Endpoints objects (never
/// mirrored by the controller).
const ANNOTATION_LEADER: &str = "control-plane.alpha.kubernetes.io/leader";

/// The controller's `--mirroring-max-endpoints-per-subset` default.
pub const MAX_MIRRORED_PER_SUBSET: usize = 1000;

/// Converts and validates a `v1 Endpoints` (see the module documentation).
pub fn endpoints(e: &core::Endpoints) -> Result<LegacyEndpoints, ConvertError> {
    let mut errs = Errors::default();
    let key = namespaced_key(&e.metadata, &mut errs);
    let leader = e
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_LEADER));
    let mirror = label(&e.metadata, LABEL_SKIP_MIRROR) != Some("true") && !leader;
    let mut slices = Vec::new();
    for (i, subset) in e.subsets.as_deref().unwrap_or_default().iter().enumerate() {
        let f = format!("subsets[{i}]");
        let ports = ports(subset, &f, &mut errs);
        let ready = subset.addresses.as_deref().unwrap_or_default();
        let not_ready = subset.not_ready_addresses.as_deref().unwrap_or_default();
        let all = ready
            .iter()
            .enumerate()
            .map(|(j, a)| (a, true, format!("{f}.addresses[{j}].ip")))
            .chain(
                not_ready
                    .iter()
                    .enumerate()
                    .map(|(j, a)| (a, false, format!("{f}.notReadyAddresses[{j}].ip"))),
            );
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (a, is_ready, field) in all.take(MAX_MIRRORED_PER_SUBSET) {
            let Some(ip) = errs.ok(field, parse_ip(&a.ip)) else {
                continue;
            };
            let ep = Endpoint {
                ready: is_ready,
                node_name: a.node_name.as_deref().map(crate::model::intern),
                extra: crate::model::EndpointExtra::boxed(None, None, a.hostname.clone()),
                ..Endpoint::ready(ip)
            };
            if ip.is_ipv6() {
                v6.push(ep);
            } else {
                v4.push(ep);
            }
        }
        for (family, eps) in [AddressFamily::V4, AddressFamily::V6]
            .into_iter()
            .zip([v4, v6])
        {
            if eps.is_empty() {
                continue;
            }
            let suffix = match family {
                AddressFamily::V4 => "ipv4",
                AddressFamily::V6 => "ipv6",
            };
            slices.push(EndpointSlice {
                key: ObjectKey::new(
                    key.namespace.clone(),
                    format!("{}-mirror-{i}-{suffix}", key.name),
                ),
                service_name: key.name.clone(),
                family,
                ports: ports.clone(),
                endpoints: eps,
            });
        }
    }
    let value = LegacyEndpoints {
        key: key.clone(),
        mirror,
        slices,
    };
    errs.finish(Kind::Endpoints, key, value)
}

/// A subset's ports, SCTP ones left out.
fn ports(subset: &core::EndpointSubset, f: &str, errs: &mut Errors) -> Vec<SlicePort> {
    let mut out = Vec::new();
    for (j, p) in subset
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if p.protocol.as_deref() == Some("SCTP") {
            continue;
        }
        let pf = format!("{f}.ports[{j}]");
        let proto = errs.ok(format!("{pf}.protocol"), protocol(p.protocol.as_deref()));
        let port = errs.ok(format!("{pf}.port"), port_number(p.port));
        if let (Some(protocol), Some(port)) = (proto, port) {
            out.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port: Some(port),
            });
        }
    }
    out
}
