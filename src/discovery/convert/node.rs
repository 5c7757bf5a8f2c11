//! `v1 Node` → [`Node`].

use k8s_openapi::api::core::v1 as core;

use super::{label, object_name, parse_ip, ConvertError, Errors, LABEL_ZONE};
use crate::model::{Kind, Node, ObjectKey};

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
