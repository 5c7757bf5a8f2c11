//! The API source at scale, without an API server: the Services,
//! EndpointSlices and Node of `benches/kube_scale.py`'s fixture, built as
//! k8s-openapi objects one at a time and handed through the API source's
//! conversion and [`Mirror`] as a first list would be (each object dropped
//! once converted, as the watcher's pages are). For the memory bench.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;

use crate::config::Limits;
use crate::discovery::kube::{node_item, service_item, slice_item, Filter, Mirror};
use crate::discovery::Update;
use crate::model::Kind;

/// Service `i` of the fixture: `ns-{i % 100}/svc-{i:05}`, one ClusterIP,
/// port `http` 80 → 8080.
pub fn service(i: u32) -> core::Service {
    let ip = (10u32 << 24 | 96 << 16) + i + 10;
    let ip = std::net::Ipv4Addr::from(ip).to_string();
    core::Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i:05}")),
            namespace: Some(format!("ns-{}", i % 100)),
            ..Default::default()
        },
        spec: Some(core::ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![core::ServicePort {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: 80,
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080),
                ),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Service `i`'s slice: `per` ready endpoints `10.200.x.y` with
/// `nodeName` `node-{k % 50}` and `zone` `z{k % 3}`, port `http` 8080.
pub fn slice(i: u32, per: u32) -> discovery::EndpointSlice {
    let endpoints = (0..per)
        .map(|j| {
            let k = i * per + j;
            discovery::Endpoint {
                addresses: vec![format!("10.200.{}.{}", k >> 8 & 255, k & 255)],
                conditions: Some(discovery::EndpointConditions {
                    ready: Some(true),
                    ..Default::default()
                }),
                node_name: Some(format!("node-{}", k % 50)),
                zone: Some(format!("z{}", k % 3)),
                ..Default::default()
            }
        })
        .collect();
    discovery::EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i:05}-abcde")),
            namespace: Some(format!("ns-{}", i % 100)),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("svc-{i:05}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![discovery::EndpointPort {
            name: Some("http".into()),
            protocol: Some("TCP".into()),
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

/// The fixture's Node `node-a` in zone `z1`.
pub fn node() -> core::Node {
    core::Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            labels: Some(BTreeMap::from([(
                "topology.kubernetes.io/zone".to_string(),
                "z1".to_string(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The API source's state after its first list of `services` Services with
/// `per` endpoints each, and the updates it sent the store.
pub struct Listed {
    /// What the source keeps.
    pub mirror: Box<dyn std::any::Any>,
    /// What it sent.
    pub updates: Vec<Update>,
}

/// Lists the fixture's objects through the API source (Services, then
/// slices, then the Node), each k8s object dropped once converted.
pub fn list(services: u32, per: u32) -> Listed {
    let filter = Filter {
        proxy_name: String::new(),
        keep_headless: false,
    };
    let limits = Limits::default();
    let mut m = Mirror::new(SystemTime::UNIX_EPOCH);
    let mut updates = Vec::new();
    let mut step = |m: &mut Mirror, kind, e| updates.extend(m.step(kind, e).updates);
    step(&mut m, Kind::Service, Event::Init);
    for i in 0..services {
        let item = service_item(&service(i), &filter, &limits);
        step(&mut m, Kind::Service, Event::InitApply(item));
    }
    step(&mut m, Kind::Service, Event::InitDone);
    step(&mut m, Kind::EndpointSlice, Event::Init);
    for i in 0..services {
        let item = slice_item(&slice(i, per), &filter);
        step(&mut m, Kind::EndpointSlice, Event::InitApply(item));
    }
    step(&mut m, Kind::EndpointSlice, Event::InitDone);
    step(&mut m, Kind::Node, Event::Init);
    step(&mut m, Kind::Node, Event::InitApply(node_item(&node())));
    step(&mut m, Kind::Node, Event::InitDone);
    Listed {
        mirror: Box::new(m),
        updates,
    }
}
