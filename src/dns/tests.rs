//! Query-path tests: queries built and responses parsed by hickory-proto, the
//! zone compiled from a real store.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use RecordType::{A, AAAA, PTR, SRV};

use super::*;
use crate::discovery::Update;
use crate::model::*;
use crate::state::Store;
use crate::testing::builders::{self, endpoint, labels, service, slice, slice_port, store};

/// Port `port` named `name`, sending to `port + 8000`.
fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
    builders::port(name, protocol, port, port + 8000)
}

/// An endpoint at `ip`, ready (and serving) or not, with `hostname`.
fn ep(ip: &str, ready: bool, hostname: Option<&str>) -> Endpoint {
    Endpoint {
        ready,
        serving: ready,
        ..endpoint(ip)
    }
    .with_hostname(hostname.map(str::to_string))
}

/// Headless Service default/`name` with one port, and its slice `name-1`.
fn headless(
    name: &str,
    port: ServicePort,
    slice_ports: Vec<SlicePort>,
    eps: Vec<Endpoint>,
) -> [Object; 2] {
    let svc = Service {
        headless: true,
        ..service("default", name, &[], vec![port])
    };
    let eps = slice("default", &format!("{name}-1"), name, slice_ports, eps);
    [Object::Service(svc), Object::EndpointSlice(eps)]
}

/// A store with one of each kind of Service.
pub(super) fn sample_store() -> Store {
    let web = service(
        "default",
        "web",
        &["10.96.0.10", "fd00:10:96::a"],
        vec![
            port("http", Protocol::Tcp, 80),
            port("dns", Protocol::Udp, 53),
        ],
    );
    let [db, db_slice] = headless(
        "db",
        port("pg", Protocol::Tcp, 5432),
        vec![slice_port("pg", Protocol::Tcp, 5433)],
        vec![
            ep("10.244.0.1", true, Some("db-0")),
            ep("10.244.0.2", true, None),
            ep("10.244.0.3", false, Some("db-2")),
        ],
    );
    let ext = Service {
        service_type: ServiceType::ExternalName,
        external_name: Some("db.example.com".into()),
        ..service("shop", "ext", &[], vec![])
    };
    let unnamed = service(
        "shop",
        "plain",
        &["10.96.0.11"],
        vec![port("", Protocol::Tcp, 8080)],
    );
    store(vec![
        Object::Service(web),
        db,
        db_slice,
        Object::Service(ext),
        Object::Service(unnamed),
    ])
}

fn cfg() -> ZoneConfig {
    ZoneConfig::new("cluster.local", 5).unwrap()
}

fn zone() -> Zone {
    Zone::compile(&sample_store(), &cfg(), 7)
}

pub(super) fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask_with(z: &Zone, msg: &[u8], t: Transport, opts: Options) -> (Outcome, Vec<u8>) {
    let mut out = Vec::new();
    let o = answer(z, msg, t, opts, 0, &mut out);
    (o, out)
}

fn ask(z: &Zone, name: &str, qtype: RecordType) -> Message {
    let (o, out) = ask_with(
        z,
        &query_bytes(name, qtype, None),
        Transport::Udp,
        Options::default(),
    );
    assert_eq!(o, Outcome::Reply);
    Message::from_vec(&out).unwrap()
}

fn data(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

/// The sorted answer data for `name`/`qtype`.
fn answers(z: &Zone, name: &str, qtype: RecordType) -> Vec<String> {
    data(&ask(z, name, qtype))
}

/// The response code for `name`/`qtype`.
fn rcode(z: &Zone, name: &str, qtype: RecordType) -> ResponseCode {
    ask(z, name, qtype).metadata.response_code
}

/// Each name and type answers exactly the data given (sorted); `None`:
/// NXDOMAIN.
fn expect(z: &Zone, cases: &[(&str, RecordType, Option<&[&str]>)]) {
    for &(name, qtype, want) in cases {
        match want {
            Some(want) => assert_eq!(answers(z, name, qtype), want, "{name} {qtype}"),
            None => assert_eq!(
                rcode(z, name, qtype),
                ResponseCode::NXDomain,
                "{name} {qtype}"
            ),
        }
    }
}

/// The response to query bytes `q` over `t`, and its size on the wire.
fn reply(z: &Zone, q: &[u8], t: Transport) -> (Message, usize) {
    let (_, out) = ask_with(z, q, t, Options::default());
    (Message::from_vec(&out).unwrap(), out.len())
}

#[test]
fn clusterip_a_and_aaaa() {
    let z = zone();
    let m = ask(&z, "web.default.svc.cluster.local.", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(data(&m), vec!["10.96.0.10"]);
    assert_eq!(m.answers[0].ttl, 5);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "web.default.svc.cluster.local."
    );
    let m = ask(&z, "web.default.svc.cluster.local.", AAAA);
    assert_eq!(data(&m), vec!["fd00:10:96::a"]);
}

#[test]
fn headless_ready_endpoints_and_hostnames() {
    // db-2 is not ready: skipped, also by name.
    expect(
        &zone(),
        &[
            (
                "db.default.svc.cluster.local.",
                A,
                Some(&["10.244.0.1", "10.244.0.2"]),
            ),
            (
                "db-0.db.default.svc.cluster.local.",
                A,
                Some(&["10.244.0.1"]),
            ),
            (
                "10-244-0-2.db.default.svc.cluster.local.",
                A,
                Some(&["10.244.0.2"]),
            ),
            ("db-2.db.default.svc.cluster.local.", A, None),
        ],
    );
}

#[test]
fn headless_publish_not_ready_serves_every_endpoint() {
    let mut st = sample_store();
    let mut db = st.services().find(|s| s.key.name == "db").cloned().unwrap();
    db.publish_not_ready = true;
    st.apply(Update::Upsert(Box::new(Object::Service(db))));
    let z = Zone::compile(&st, &cfg(), 2);
    let m = ask(&z, "db.default.svc.cluster.local.", A);
    assert_eq!(data(&m).len(), 3);
}

#[test]
fn address_answers_rotate() {
    let z = zone();
    let q = query_bytes("db.default.svc.cluster.local.", A, None);
    let first = |rot| {
        let mut out = Vec::new();
        answer(&z, &q, Transport::Udp, Options::default(), rot, &mut out);
        Message::from_vec(&out).unwrap().answers[0].data.to_string()
    };
    assert_ne!(first(0), first(1));
}

#[test]
fn external_name_is_a_cname_for_every_type() {
    let z = zone();
    for t in [A, AAAA, RecordType::CNAME, RecordType::TXT] {
        let m = ask(&z, "ext.shop.svc.cluster.local.", t);
        assert_eq!(m.answers.len(), 1, "{t}");
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(m.answers[0].data.to_string(), "db.example.com.");
    }
}

#[test]
fn srv_for_named_ports_only() {
    let web = "web.default.svc.cluster.local.";
    let db = [
        "0 50 5433 10-244-0-2.db.default.svc.cluster.local.",
        "0 50 5433 db-0.db.default.svc.cluster.local.",
    ];
    expect(
        &zone(),
        &[
            (
                "_http._tcp.web.default.svc.cluster.local.",
                SRV,
                Some(&[&format!("0 100 80 {web}")]),
            ),
            (
                "_dns._udp.web.default.svc.cluster.local.",
                SRV,
                Some(&[&format!("0 100 53 {web}")]),
            ),
            // The wrong protocol.
            ("_dns._tcp.web.default.svc.cluster.local.", SRV, None),
            ("_pg._tcp.db.default.svc.cluster.local.", SRV, Some(&db)),
            // The unnamed port of shop/plain has no SRV name.
            ("_tcp.plain.shop.svc.cluster.local.", SRV, None),
        ],
    );
}

#[test]
fn ptr_for_cluster_ips_and_headless_endpoints() {
    let z = zone();
    let v6 = zone::reverse_name("fd00:10:96::a".parse().unwrap());
    assert!(
        v6.starts_with("a.0.0.0.") && v6.ends_with(".0.1.0.0.0.0.d.f.ip6.arpa."),
        "{v6}"
    );
    let web: &[&str] = &["web.default.svc.cluster.local."];
    expect(
        &z,
        &[
            ("10.0.96.10.in-addr.arpa.", PTR, Some(web)),
            (
                "1.0.244.10.in-addr.arpa.",
                PTR,
                Some(&["db-0.db.default.svc.cluster.local."]),
            ),
            (&v6, PTR, Some(web)),
        ],
    );
    // An address nobody has is not ours.
    assert_eq!(
        rcode(&z, "9.9.9.9.in-addr.arpa.", PTR),
        ResponseCode::Refused
    );
}

#[test]
fn dns_version_and_soa() {
    let z = zone();
    let m = ask(&z, "dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(data(&m), vec!["1.1.0"]);
    let m = ask(&z, "cluster.local.", RecordType::SOA);
    assert_eq!(m.answers.len(), 1);
    assert!(
        m.answers[0]
            .data
            .to_string()
            .starts_with("ns.dns.cluster.local. hostmaster.cluster.local. 7 "),
        "{}",
        m.answers[0].data
    );
}

#[test]
fn nxdomain_and_nodata_carry_the_soa() {
    let z = zone();
    let (nx, nodata) = (ResponseCode::NXDomain, ResponseCode::NoError);
    for (name, t, code) in [
        ("nope.default.svc.cluster.local.", A, nx),
        ("web.nope.svc.cluster.local.", A, nx),
        ("web.default.pod.cluster.local.", A, nx),
        // Existing names (and empty non-terminals) without the type: NODATA.
        ("web.default.svc.cluster.local.", RecordType::TXT, nodata),
        ("db.default.svc.cluster.local.", AAAA, nodata),
        ("default.svc.cluster.local.", A, nodata),
        ("svc.cluster.local.", A, nodata),
        ("_tcp.web.default.svc.cluster.local.", SRV, nodata),
    ] {
        let m = ask(&z, name, t);
        assert_eq!(m.metadata.response_code, code, "{name}");
        assert!(m.answers.is_empty(), "{name}");
        assert_eq!(m.authorities.len(), 1, "{name}");
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(m.authorities[0].name.to_ascii(), "cluster.local.");
    }
}

#[test]
fn search_path_expansions_are_nxdomain() {
    expect(
        &zone(),
        &[
            (
                "web.default.svc.cluster.local.default.svc.cluster.local.",
                A,
                None,
            ),
            ("web.default.svc.cluster.local.svc.cluster.local.", A, None),
            ("web.default.svc.cluster.local.cluster.local.", A, None),
        ],
    );
}

#[test]
fn out_of_zone_is_refused_or_forwarded() {
    let z = zone();
    let m = ask(&z, "example.com.", A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
    assert_eq!(m.queries.len(), 1, "question echoed");
    let q = query_bytes("example.com.", A, None);
    let (o, _) = ask_with(&z, &q, Transport::Udp, Options { forward: true });
    assert_eq!(o, Outcome::Forward);
    let q = query_bytes("web.default.svc.cluster.local.", A, None);
    let (o, _) = ask_with(&z, &q, Transport::Udp, Options { forward: true });
    assert_eq!(o, Outcome::Reply, "in-zone names are never forwarded");
}

#[test]
fn names_match_case_insensitively_and_keep_the_clients_case() {
    let z = zone();
    let m = ask(&z, "WeB.DeFaUlT.SVC.cluster.LOCAL.", A);
    assert_eq!(data(&m), vec!["10.96.0.10"]);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "WeB.DeFaUlT.SVC.cluster.LOCAL."
    );
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "WeB.DeFaUlT.SVC.cluster.LOCAL."
    );
}

#[test]
fn edns_is_echoed_and_big_answers_truncate_over_udp_only() {
    let eps = (1..=100)
        .map(|i| ep(&format!("10.244.1.{i}"), true, None))
        .collect();
    let big = headless("big", port("", Protocol::Tcp, 80), vec![], eps);
    let st = store(big.into());
    let z = Zone::compile(&st, &cfg(), 1);
    let name = "big.default.svc.cluster.local.";
    // 100 A records = 1600 bytes of answers: too big for 512 and for 1232.
    for edns in [None, Some(4096)] {
        let (m, len) = reply(&z, &query_bytes(name, A, edns), Transport::Udp);
        assert!(m.metadata.truncation, "edns {edns:?}");
        assert!(m.answers.is_empty());
        assert_eq!(m.edns.is_some(), edns.is_some(), "OPT echoed");
        assert!(len <= 512);
    }
    let q = query_bytes(name, A, Some(4096));
    let (m, _) = reply(&z, &q, Transport::Tcp);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    assert_eq!(
        m.edns.as_ref().map(|e| e.max_payload()),
        Some(UDP_MAX as u16)
    );
}

#[test]
fn changes_to_services_show_up_in_the_next_zone() {
    let mut st = sample_store();
    let z1 = Zone::compile(&st, &cfg(), 1);
    st.apply(Update::Delete(
        Kind::Service,
        ObjectKey::new("default", "web"),
    ));
    let z2 = Zone::compile(&st, &cfg(), 2);
    assert_eq!(
        data(&ask(&z1, "web.default.svc.cluster.local.", A)).len(),
        1
    );
    let m = ask(&z2, "web.default.svc.cluster.local.", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn selector_pods_are_headless_endpoints() {
    let svc = Service {
        headless: true,
        selector: Some(labels(&[("app", "cache")])),
        ..service(
            "default",
            "cache",
            &[],
            vec![port("redis", Protocol::Tcp, 6379)],
        )
    };
    let pod = |name: &str, ip: &str, ready: bool, app: &str| {
        Object::Pod(Pod {
            ready,
            hostname: Some(name.into()),
            subdomain: Some("cache".into()),
            ..builders::pod("default", name, ip, labels(&[("app", app)]))
        })
    };
    let mut st = store(vec![
        Object::Service(svc),
        pod("cache-0", "10.244.2.1", true, "cache"),
        pod("cache-1", "10.244.2.2", false, "cache"),
        pod("other", "10.244.2.3", true, "web"),
    ]);
    let cache = "cache.default.svc.cluster.local.";
    expect(
        &Zone::compile(&st, &cfg(), 1),
        &[
            (cache, A, Some(&["10.244.2.1"])),
            (
                "cache-0.cache.default.svc.cluster.local.",
                A,
                Some(&["10.244.2.1"]),
            ),
            // The targetPort.
            (
                "_redis._tcp.cache.default.svc.cluster.local.",
                SRV,
                Some(&["0 100 14379 cache-0.cache.default.svc.cluster.local."]),
            ),
        ],
    );
    // The Pod becomes ready: it joins.
    st.apply(Update::Upsert(Box::new(pod(
        "cache-1",
        "10.244.2.2",
        true,
        "cache",
    ))));
    let z = Zone::compile(&st, &cfg(), 2);
    assert_eq!(answers(&z, cache, A), vec!["10.244.2.1", "10.244.2.2"]);
}

#[test]
fn other_domains_and_ttls() {
    let cfg = ZoneConfig::new("k8s.example.", 30).unwrap();
    let z = Zone::compile(&sample_store(), &cfg, 1);
    let m = ask(&z, "web.default.svc.k8s.example.", A);
    assert_eq!(m.answers[0].ttl, 30);
    let m = ask(&z, "web.default.svc.cluster.local.", A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(ZoneConfig::new("bad..name", 5).is_err());
    assert!(ZoneConfig::new("", 5).is_err());
}

// ---- hostile and malformed input ----

fn raw_answer(msg: &[u8]) -> (Outcome, Vec<u8>) {
    ask_with(&zone(), msg, Transport::Udp, Options::default())
}

fn rcode_of(out: &[u8]) -> u8 {
    out[3] & 0x0f
}

#[test]
fn too_short_and_responses_are_dropped() {
    for len in 0..12 {
        assert_eq!(raw_answer(&vec![0u8; len]).0, Outcome::Drop, "len {len}");
    }
    let mut q = query_bytes("web.default.svc.cluster.local.", A, None);
    q[2] |= 0x80; // QR: a response
    assert_eq!(raw_answer(&q).0, Outcome::Drop);
}

#[test]
fn truncated_queries_get_formerr() {
    let q = query_bytes("web.default.svc.cluster.local.", A, Some(1232));
    for cut in 12..q.len() {
        let (o, out) = raw_answer(&q[..cut]);
        assert_eq!(o, Outcome::Reply, "cut at {cut}");
        assert_eq!(rcode_of(&out), 1, "FORMERR at cut {cut}");
        assert_eq!(out[0..2], q[0..2], "id echoed");
        assert_eq!(out.len(), 12);
    }
}

#[test]
fn compression_loops_and_forward_pointers_get_formerr() {
    let header = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let cases: [&[u8]; 4] = [
        &[0xC0, 12, 0, 1, 0, 1],                      // points at itself
        &[0xC0, 14, 0xC0, 12, 0, 1, 0, 1],            // forward pointer
        &[3, b'a', b'b', b'c', 0xC0, 12, 0, 1, 0, 1], // loops back to its start
        &[0xC0, 0xFF, 0, 1, 0, 1],                    // beyond the message
    ];
    for (i, name) in cases.iter().enumerate() {
        let mut q = header.to_vec();
        q.extend_from_slice(name);
        let (o, out) = raw_answer(&q);
        assert_eq!(o, Outcome::Reply, "case {i}");
        assert_eq!(rcode_of(&out), 1, "case {i}");
    }
}

#[test]
fn oversized_names_and_labels_get_formerr() {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    // A 64-byte label (the limit is 63): the length byte has the 0x40 bit set,
    // which is a reserved label type.
    q.push(64);
    q.extend(std::iter::repeat_n(b'a', 64));
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_eq!(rcode_of(&raw_answer(&q).1), 1);
    // 5 labels of 63 bytes: 320 bytes, over the 255 limit.
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for _ in 0..5 {
        q.push(63);
        q.extend(std::iter::repeat_n(b'a', 63));
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_eq!(rcode_of(&raw_answer(&q).1), 1);
    // A 64 KiB message of junk after a valid question.
    let mut q = query_bytes("web.default.svc.cluster.local.", A, None);
    q[11] = 1; // one additional record, which is junk
    q.extend(std::iter::repeat_n(0xAB, 65_000));
    assert_eq!(rcode_of(&raw_answer(&q).1), 1);
}

#[test]
fn wrong_counts_opcodes_and_types() {
    let q = query_bytes("web.default.svc.cluster.local.", A, None);
    // Two questions announced, one present; zero questions.
    for qd in [0u8, 2] {
        let mut m = q.clone();
        m[5] = qd;
        assert_eq!(rcode_of(&raw_answer(&m).1), 1, "qdcount {qd}");
    }
    // Answers in a query; too many additionals.
    let mut m = q.clone();
    m[7] = 1;
    assert_eq!(rcode_of(&raw_answer(&m).1), 1);
    let mut m = q.clone();
    m[10] = 0xFF;
    assert_eq!(rcode_of(&raw_answer(&m).1), 1);
    // NOTIFY / UPDATE opcodes: NOTIMP.
    for op in [4u8, 5] {
        let mut m = q.clone();
        m[2] = (m[2] & 0x87) | (op << 3);
        let (_, out) = raw_answer(&m);
        assert_eq!(rcode_of(&out), 4, "opcode {op}");
    }
    // Zone transfers are refused; OPT as a question is malformed.
    let m = ask(&zone(), "cluster.local.", RecordType::AXFR);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let (_, out) = raw_answer(&query_bytes("cluster.local.", RecordType::OPT, None));
    assert_eq!(rcode_of(&out), 1);
    // Class CH is not served.
    let mut m = q.clone();
    let n = m.len();
    m[n - 1] = 3;
    assert_eq!(rcode_of(&raw_answer(&m).1), 5);
}

#[test]
fn edns_version_one_gets_badvers() {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
        A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let (_, out) = raw_answer(&m.to_vec().unwrap());
    let r = Message::from_vec(&out).unwrap();
    // 16 is both BADVERS and BADSIG; hickory names it the latter.
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert!(r.answers.is_empty());
    // What the responses metric counts it as: BADVERS, not the header's NOERROR.
    assert_eq!(crate::dns::response_code(&out), 16);
}

#[test]
fn response_code_reads_the_opt_record_past_every_section() {
    // An answer with records before the OPT (compressed names, rdata skipped).
    let (_, out) = raw_answer(&query_bytes(
        "web.default.svc.cluster.local.",
        A,
        Some(1232),
    ));
    let m = Message::from_vec(&out).unwrap();
    assert!(!m.answers.is_empty());
    assert_eq!(crate::dns::response_code(&out), 0);
    let mut m = m;
    m.metadata.response_code = ResponseCode::BADCOOKIE;
    assert_eq!(crate::dns::response_code(&m.to_vec().unwrap()), 23);
    // Cut short, or no OPT: the header's code alone.
    assert_eq!(crate::dns::response_code(&out[..out.len() - 3]), 0);
    assert_eq!(crate::dns::response_code(&out[..2]), 0);
    let nx = raw_answer(&query_bytes("nope.default.svc.cluster.local.", A, None)).1;
    assert_eq!(crate::dns::response_code(&nx), 3);
}

#[test]
fn servfail_echoes_the_question() {
    let q = query_bytes("example.com.", A, None);
    let mut out = Vec::new();
    servfail(&q, &mut out).unwrap();
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.queries[0].name().to_ascii(), "example.com.");
    assert!(servfail(&[1, 2, 3], &mut out).is_none());
}

/// Found by the fuzzer: a question name that is a pointer into the query's own
/// header must not be copied as is (the response's header differs).
#[test]
fn question_pointing_into_the_header_is_written_out() {
    let mut q = vec![0x00, 0x01, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(&[0xC0, 3, 0, 1, 0, 1]); // offset 3 holds 0: the root name
    let (o, out) = raw_answer(&q);
    assert_eq!(o, Outcome::Reply);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.queries[0].name().to_ascii(), ".");
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn any_returns_every_set_of_the_name() {
    let z = zone();
    let m = ask(&z, "web.default.svc.cluster.local.", RecordType::ANY);
    assert_eq!(data(&m), vec!["10.96.0.10", "fd00:10:96::a"]);
    let m = ask(&z, "cluster.local.", RecordType::ANY);
    assert_eq!(m.answers.len(), 1, "the apex SOA");
}

#[test]
fn headless_srv_carries_target_addresses_when_they_fit() {
    let z = zone();
    let m = ask(&z, "_pg._tcp.db.default.svc.cluster.local.", SRV);
    let mut extra: Vec<(String, String)> = m
        .additionals
        .iter()
        .map(|r| (r.name.to_ascii(), r.data.to_string()))
        .collect();
    extra.sort();
    assert_eq!(
        extra,
        vec![
            (
                "10-244-0-2.db.default.svc.cluster.local.".to_string(),
                "10.244.0.2".to_string()
            ),
            (
                "db-0.db.default.svc.cluster.local.".to_string(),
                "10.244.0.1".to_string()
            ),
        ]
    );
    // A ClusterIP Service's SRV has none (its target is the Service name).
    let web_srv = "_http._tcp.web.default.svc.cluster.local.";
    assert!(ask(&z, web_srv, SRV).additionals.is_empty());

    // 8 endpoints: the SRV answer fits 512 bytes without its additional
    // records, which are left out instead of truncating.
    let eps = (1..=8)
        .map(|i| ep(&format!("10.244.3.{i}"), true, Some(&format!("d{i}"))))
        .collect();
    let pg = port("pg", Protocol::Tcp, 5432);
    let d = headless("d", pg, vec![slice_port("pg", Protocol::Tcp, 5432)], eps);
    let st = store(d.into());
    let z = Zone::compile(&st, &cfg(), 1);
    let q = query_bytes("_pg._tcp.d.default.svc.cluster.local.", SRV, None);
    let (m, len) = reply(&z, &q, Transport::Udp);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 8);
    assert!(m.additionals.is_empty(), "{len} bytes");
    assert_eq!(reply(&z, &q, Transport::Tcp).0.additionals.len(), 8);
}

/// An endpoint change of a ClusterIP Service changes no record: the zone
/// answering stays (serial included) and nothing of it is copied; the same
/// change to a headless Service's endpoints publishes a new zone.
#[test]
fn only_changes_to_records_publish_a_new_zone() {
    let mut st = sample_store();
    let mut parts = ZoneParts::new(&cfg());
    let all = st.take_dirty();
    assert!(parts.update(&st, &all, 1).is_some());

    let web = slice(
        "default",
        "web-1",
        "web",
        vec![slice_port("http", Protocol::Tcp, 8080)],
        vec![endpoint("10.244.9.9")],
    );
    st.apply(Update::Upsert(Box::new(Object::EndpointSlice(web))));
    let dirty = st.take_dirty();
    assert!(!dirty.services.is_empty(), "the change is the Service's");
    assert!(parts.update(&st, &dirty, 2).is_none());

    let [_, db] = headless(
        "db",
        port("pg", Protocol::Tcp, 5432),
        vec![slice_port("pg", Protocol::Tcp, 5433)],
        vec![ep("10.244.9.8", true, Some("db-0"))],
    );
    st.apply(Update::Upsert(Box::new(db)));
    let dirty = st.take_dirty();
    let z = parts.update(&st, &dirty, 3).expect("a new zone");
    assert_eq!(z.generation, 3);
    let q = query_bytes("db-0.db.default.svc.cluster.local.", A, None);
    let (m, _) = reply(&z, &q, Transport::Udp);
    assert_eq!(m.answers.len(), 1);
}
