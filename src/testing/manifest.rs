//! The `manifest` oracle: any bytes as a manifest file, in both formats.

use std::collections::BTreeSet;

use crate::config::Limits;
use crate::discovery::file::parse_str;
use crate::model::{AddressFamily, Object, TargetPort, TrafficPolicy};

/// Manifest text in both formats: no panic, every error one line naming the
/// file, every object valid.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    manifest_text("fuzz.yaml", &text);
    manifest_text("fuzz.json", &text);
}

/// Parses `text` as file `origin` and checks the result; returns the objects
/// (none when the file has an error, as the file source would serve).
pub fn manifest_text(origin: &str, text: &str) -> Vec<Object> {
    let limits = Limits::default();
    match parse_str(origin, text, &limits) {
        Ok(objects) => {
            objects.iter().for_each(|o| check_object(o, &limits));
            objects
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "Err without errors");
            for e in errors {
                let line = e.to_string();
                assert!(line.starts_with(&format!("{origin}:")), "{line}");
            }
            Vec::new()
        }
    }
}

/// What every object that comes out of parsing must satisfy, whatever went in.
pub fn check_object(o: &Object, limits: &Limits) {
    match o {
        Object::Service(s) => {
            assert!(
                !s.key.name.is_empty() && !s.key.namespace.is_empty(),
                "{s:?}"
            );
            assert!(s.cluster_ips.len() <= 2, "{s:?}");
            for ip in &s.cluster_ips {
                assert!(
                    limits.service_cidrs.iter().any(|n| n.contains(ip)),
                    "{ip} outside the service CIDRs"
                );
            }
            let mut seen = BTreeSet::new();
            for p in &s.ports {
                assert_ne!(p.port, 0, "{s:?}");
                assert!(seen.insert((p.port, p.protocol)), "duplicate port {s:?}");
                if let Some(np) = p.node_port {
                    assert!(limits.node_port_range.contains(&np), "{s:?}");
                }
                if let TargetPort::Number(n) = p.target_port {
                    assert_ne!(n, 0, "{s:?}");
                }
            }
            if s.ports.len() > 1 {
                assert!(s.ports.iter().all(|p| !p.name.is_empty()), "{s:?}");
            }
            for ip in &s.external_ips {
                assert!(
                    !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast(),
                    "{ip}"
                );
            }
            if let Some(p) = s.health_check_node_port {
                assert!(limits.node_port_range.contains(&p), "{s:?}");
                assert_eq!(s.external_policy, TrafficPolicy::Local, "{s:?}");
            }
        }
        Object::EndpointSlice(s) => check_slice(s),
        Object::Node(n) => assert!(!n.name.is_empty(), "{n:?}"),
        Object::Pod(p) => assert!(!p.key.name.is_empty(), "{p:?}"),
        Object::Endpoints(e) => {
            assert!(!e.key.name.is_empty(), "{e:?}");
            for s in &e.slices {
                check_slice(s);
                assert_eq!(s.service_name, e.key.name, "{e:?}");
                assert!(
                    s.endpoints.len()
                        <= crate::discovery::convert::endpoints::MAX_MIRRORED_PER_SUBSET
                );
            }
        }
    }
}

fn check_slice(s: &crate::model::EndpointSlice) {
    assert!(!s.service_name.is_empty(), "{s:?}");
    for e in &s.endpoints {
        assert_eq!(AddressFamily::of(&e.ip), s.family, "{s:?}");
    }
    for p in &s.ports {
        assert_ne!(p.port, Some(0), "{s:?}");
    }
}
