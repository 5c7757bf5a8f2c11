//! A container's `readinessProbe` → [`Probe`], with the API server's
//! defaults and validation, and the kubelet's port lookup by name.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::time::Duration;

use super::{port_number, Errors};
use crate::model::{Probe, ProbeAction};

/// Why an `exec` probe is refused.
pub const EXEC_UNSUPPORTED: &str = "exec probes cannot run in ringvip (it runs no containers): \
     use tcpSocket, httpGet or grpc";

/// Converts the probe at `field` of container `c`; `None` (with errors) when
/// it cannot run here.
pub(super) fn probe(
    p: &core::Probe,
    c: &core::Container,
    field: &str,
    errs: &mut Errors,
) -> Option<Probe> {
    let handlers = [
        p.exec.is_some(),
        p.http_get.is_some(),
        p.tcp_socket.is_some(),
        p.grpc.is_some(),
    ];
    if handlers.iter().filter(|h| **h).count() != 1 {
        errs.push(
            field.to_string(),
            "must have exactly one handler (tcpSocket, httpGet or grpc)",
        );
        return None;
    }
    let action = if p.exec.is_some() {
        errs.push(format!("{field}.exec"), EXEC_UNSUPPORTED);
        None
    } else if let Some(t) = &p.tcp_socket {
        let port = errs.ok(format!("{field}.tcpSocket.port"), port_of(&t.port, c));
        port.map(|port| ProbeAction::Tcp {
            host: t.host.clone().filter(|h| !h.is_empty()),
            port,
        })
    } else if let Some(h) = &p.http_get {
        let f = format!("{field}.httpGet");
        let scheme_ok = match h.scheme.as_deref().unwrap_or("HTTP") {
            "HTTP" | "" => true,
            other => {
                errs.push(
                    format!("{f}.scheme"),
                    format!("scheme {other:?} is not supported by ringvip's prober (only HTTP)"),
                );
                false
            }
        };
        let port = errs.ok(format!("{f}.port"), port_of(&h.port, c));
        let headers = h
            .http_headers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|hd| (hd.name.clone(), hd.value.clone()))
            .collect();
        let path = match h.path.as_deref().unwrap_or("") {
            "" => "/".to_string(),
            p if p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        };
        port.filter(|_| scheme_ok).map(|port| ProbeAction::Http {
            host: h.host.clone().filter(|h| !h.is_empty()),
            port,
            path,
            headers,
        })
    } else if let Some(g) = &p.grpc {
        let port = errs.ok(format!("{field}.grpc.port"), port_number(g.port));
        port.map(|port| ProbeAction::Grpc {
            port,
            service: g.service.clone().unwrap_or_default(),
        })
    } else {
        None
    };
    let secs = |errs: &mut Errors, name: &str, v: Option<i32>, default: u64, min: i32| {
        match v {
            // The API server's defaulting turns 0 (unset) into the default.
            None | Some(0) => Some(default),
            Some(n) if n >= min => Some(n as u64),
            Some(n) => {
                errs.push(
                    format!("{field}.{name}"),
                    format!("{n} must be at least {min}"),
                );
                None
            }
        }
    };
    let initial = secs(errs, "initialDelaySeconds", p.initial_delay_seconds, 0, 0);
    let period = secs(errs, "periodSeconds", p.period_seconds, 10, 1);
    let timeout = secs(errs, "timeoutSeconds", p.timeout_seconds, 1, 1);
    let success = secs(errs, "successThreshold", p.success_threshold, 1, 1);
    let failure = secs(errs, "failureThreshold", p.failure_threshold, 3, 1);
    Some(Probe {
        action: action?,
        initial_delay: Duration::from_secs(initial?),
        period: Duration::from_secs(period?),
        timeout: Duration::from_secs(timeout?),
        success_threshold: u32::try_from(success?).ok()?,
        failure_threshold: u32::try_from(failure?).ok()?,
    })
}

/// A probe's port: a number, or the name of one of this container's ports
/// (the kubelet's `findPortByName`).
fn port_of(port: &IntOrString, c: &core::Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => port_number(*n),
        IntOrString::String(name) => c
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .ok_or_else(|| format!("no container port named {name:?} in this container"))
            .and_then(|p| port_number(p.container_port)),
    }
}
