//! The `dns_query` oracle: any bytes as a DNS query, answered from a zone
//! with one Service of each kind.

use super::builders::{endpoint, port, service, slice, slice_port, store};
use crate::dns::{answer, Options, Outcome, Transport, Zone, ZoneConfig, TCP_MAX, UDP_MAX};
use crate::model::{Object, Protocol, Service, ServiceType};

/// Any bytes as a DNS query (fuzz/fuzz_targets/dns_query.rs): answers `data`
/// as a query over both transports, with and without forwarding, and checks
/// what every response must be — a well-formed message with the query's id, within the transport's size.
/// Panics when one is not.
pub fn dns_query(data: &[u8]) {
    use std::sync::OnceLock;
    static ZONE: OnceLock<Zone> = OnceLock::new();
    let zone = ZONE.get_or_init(zone);
    let mut out = Vec::with_capacity(TCP_MAX);
    for transport in [Transport::Udp, Transport::Tcp] {
        for forward in [false, true] {
            let o = answer(
                zone,
                data,
                transport,
                Options { forward },
                data.len(),
                &mut out,
            );
            match o {
                Outcome::Drop => assert!(data.len() < 12 || data[2] & 0x80 != 0),
                Outcome::Forward => assert!(forward && out.is_empty()),
                Outcome::Reply => {
                    assert!(out.len() >= 12);
                    assert_eq!(out[0..2], data[0..2], "id echoed");
                    assert!(out[2] & 0x80 != 0, "QR set");
                    if transport == Transport::Udp {
                        assert!(out.len() <= UDP_MAX, "UDP response of {} bytes", out.len());
                    }
                    if let Err(e) = hickory_proto::op::Message::from_vec(&out) {
                        panic!("response does not parse: {e}: {out:02x?}");
                    }
                }
            }
        }
    }
}

/// A zone with one Service of each kind: ClusterIP (dual-stack), headless
/// with 60 named endpoints, ExternalName.
fn zone() -> Zone {
    let web = service(
        "default",
        "web",
        &["10.96.0.10", "fd00:10:96::a"],
        vec![port("http", Protocol::Tcp, 80, 80)],
    );
    let db = Service {
        headless: true,
        ..service(
            "default",
            "db",
            &[],
            vec![port("pg", Protocol::Tcp, 5432, 5432)],
        )
    };
    let db_slice = slice(
        "default",
        "db-1",
        "db",
        vec![slice_port("pg", Protocol::Tcp, 5432)],
        (1..=60u8)
            .map(|i| endpoint(&format!("10.244.0.{i}")).with_hostname(Some(format!("db-{i}"))))
            .collect(),
    );
    let ext = Service {
        service_type: ServiceType::ExternalName,
        external_name: Some("db.example.com".into()),
        ..service("default", "ext", &[], vec![])
    };
    let st = store(vec![
        Object::Service(web),
        Object::Service(db),
        Object::EndpointSlice(db_slice),
        Object::Service(ext),
    ]);
    Zone::compile(&st, &ZoneConfig::new("cluster.local", 5).unwrap(), 1)
}
