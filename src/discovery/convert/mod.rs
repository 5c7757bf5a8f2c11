//! Conversion of Kubernetes API objects (k8s-openapi types) into the validated
//! [`crate::model`] types, applying the API server's defaults and rejecting what
//! kube-apiserver (or ringvip) would reject.
//!
//! The conversion does not depend on where an object came from: the file source
//! adds file and line to a [`ConvertError`], an API source would add nothing.
//! Every problem of an object is reported, not only the first.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{Kind, ObjectKey, Protocol};

pub mod annotations;
mod endpoint_slice;
pub(crate) mod endpoints;
mod node;
mod pod;
pub(crate) mod probe;
mod service;
#[cfg(test)]
mod tests;

pub use endpoint_slice::endpoint_slice;
pub use endpoints::endpoints;
pub use node::node;
pub use pod::pod;
pub use service::service;

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
        Kind::Endpoints => "Endpoints",
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

/// Where an error is: a path given as is, or made only when an error is
/// reported (a closure), so that valid objects format no paths: one
/// `format!` per endpoint cost ~0.4 s of CPU in a 100,000-Service start.
trait Field {
    fn path(self) -> String;
}

impl Field for &str {
    fn path(self) -> String {
        self.to_string()
    }
}

impl Field for String {
    fn path(self) -> String {
        self
    }
}

impl<F: FnOnce() -> String> Field for F {
    fn path(self) -> String {
        self()
    }
}

/// Collects field errors of one object.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Field, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.path(),
            message: message.into(),
        });
    }

    /// The value of `r`, or `None` with its message reported at `field`.
    fn ok<T>(&mut self, field: impl Field, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(m) => {
                self.push(field, m);
                None
            }
        }
    }

    /// Every entry of the list field `field` through `parse`; each failure
    /// is reported at `field[i]` and leaves its entry out.
    fn each<T>(
        &mut self,
        list: Option<&[String]>,
        field: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let list = list.unwrap_or_default().iter().enumerate();
        list.filter_map(|(i, raw)| self.ok(|| format!("{field}[{i}]"), parse(raw)))
            .collect()
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

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a valid IP address"))
}
