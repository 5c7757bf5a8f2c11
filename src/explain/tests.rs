use std::time::Duration;

use super::*;
use crate::model::*;
use crate::testing::builders::{self, node, port, service, slice, slice_port};

const NODE: &str = "n";

fn ep(ip: &str, ready: bool, terminating: bool, node: &str) -> Endpoint {
    Endpoint {
        ready,
        serving: ready || terminating,
        terminating,
        node_name: Some(node.into()),
        ..builders::endpoint(ip)
    }
}

/// `builders::lb_web` (only 203.0.113.0/24 allowed on the LB IP) with
/// externalTrafficPolicy Local, NodePort on 192.0.2.1. Endpoints: .1 ready
/// here, .2 ready elsewhere, .3 terminating here, .4 not ready here.
/// Plus default/far (NodePort 30081, Local) whose one endpoint is elsewhere.
fn snapshot() -> Snapshot {
    let (web, web_eps) = builders::lb_web(
        vec!["203.0.113.0/24".parse().unwrap()],
        vec![
            ep("10.0.0.1", true, false, NODE),
            ep("10.0.0.2", true, false, "other"),
            ep("10.0.0.3", false, true, NODE),
            ep("10.0.0.4", false, false, NODE),
        ],
    );
    let web = Service {
        external_policy: TrafficPolicy::Local,
        ..web
    };
    let far = Service {
        service_type: ServiceType::NodePort,
        external_policy: TrafficPolicy::Local,
        ..service(
            "default",
            "far",
            &["10.96.0.11"],
            vec![ServicePort {
                node_port: Some(30081),
                ..port("", Protocol::Tcp, 80, 8080)
            }],
        )
    };
    let far_eps = slice(
        "default",
        "far-1",
        "far",
        vec![slice_port("", Protocol::Tcp, 8080)],
        vec![ep("10.0.0.9", true, false, "other")],
    );
    let ctx = node(NODE, &["192.0.2.1"], &["192.0.2.1", "198.51.100.7"]);
    builders::snapshot(
        vec![
            Object::Service(web),
            Object::EndpointSlice(web_eps),
            Object::Service(far),
            Object::EndpointSlice(far_eps),
        ],
        &ctx,
    )
}

struct Rig {
    snap: Snapshot,
    health: PassiveHealth,
    affinity: AffinityTable,
    now: Instant,
}

impl Rig {
    fn new() -> Rig {
        Rig {
            snap: snapshot(),
            health: PassiveHealth::default(),
            affinity: AffinityTable::default(),
            now: Instant::now(),
        }
    }

    fn live(&self) -> Live<'_> {
        Live {
            health: &self.health,
            affinity: &self.affinity,
            limits: None,
            cluster_ips: true,
            now: self.now,
        }
    }

    fn explain(&self, client: &str, to: &str) -> Explanation {
        explain(&self.snap, &Query::parse(client, to).unwrap(), &self.live())
    }

    fn port_id(&self, to: &str) -> crate::balance::affinity::PortId {
        let key = crate::state::FrontendKey {
            addr: to.parse().unwrap(),
            proto: Protocol::Tcp,
        };
        self.snap.frontend(&key).unwrap().port_id
    }
}

fn rules(e: &Explanation) -> Vec<(&str, &str)> {
    e.endpoints
        .iter()
        .map(|x| (x.address.as_str(), x.rule.as_str()))
        .collect()
}

#[test]
fn cluster_ip_lists_every_endpoint_with_its_reason() {
    let rig = Rig::new();
    let e = rig.explain("10.1.1.1", "10.96.0.10:80");
    assert_eq!(e.verdict, "forward", "{e:?}");
    let f = e.frontend.as_ref().unwrap();
    assert_eq!(
        (
            f.of.kind.as_str(),
            f.policy_field.as_str(),
            f.policy.as_str()
        ),
        ("ClusterIP", "internalTrafficPolicy", "Cluster")
    );
    assert_eq!(
        rules(&e),
        vec![
            ("10.0.0.1:8080", "ready"),
            ("10.0.0.2:8080", "ready"),
            ("10.0.0.3:8080", "terminating_not_needed"),
            ("10.0.0.4:8080", "not_ready"),
        ]
    );
    assert_eq!(e.pick, vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert_eq!(e.pick_rule, "random");
    assert_eq!(e.affinity.as_ref().unwrap().endpoint, None);
    // Explaining changes nothing: no affinity entry was made.
    assert!(rig.affinity.is_empty());
}

#[test]
fn node_port_under_local_policy_keeps_local_endpoints_only() {
    let rig = Rig::new();
    let e = rig.explain("10.1.1.1", "192.0.2.1:30080/tcp");
    assert_eq!(e.verdict, "forward");
    assert_eq!(
        e.frontend.as_ref().unwrap().policy_field,
        "externalTrafficPolicy"
    );
    assert_eq!(
        rules(&e),
        vec![
            ("10.0.0.1:8080", "ready"),
            ("10.0.0.2:8080", "not_local"),
            ("10.0.0.3:8080", "terminating_not_needed"),
            ("10.0.0.4:8080", "not_ready"),
        ]
    );
    assert_eq!(e.pick, vec!["10.0.0.1:8080"]);
    // A Local Service whose endpoints are all elsewhere: dropped.
    let e = rig.explain("10.1.1.1", "192.0.2.1:30081");
    assert_eq!(e.verdict, "drop");
    assert!(e.reason.contains("traffic policy Local"), "{}", e.reason);
    assert_eq!(rules(&e), vec![("10.0.0.9:8080", "not_local")]);
    assert!(e.pick.is_empty());
}

#[test]
fn affinity_and_passive_health_are_read_live() {
    let rig = Rig::new();
    let client: IpAddr = "10.1.1.1".parse().unwrap();
    let two: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let id = rig.port_id("10.96.0.10:80");
    rig.affinity.record(
        id,
        client,
        two,
        Duration::from_secs(10),
        rig.now - Duration::from_secs(4),
    );
    let e = rig.explain("10.1.1.1", "10.96.0.10:80");
    let a = e.affinity.as_ref().unwrap();
    assert_eq!(a.endpoint.as_deref(), Some("10.0.0.2:8080"));
    assert_eq!(a.expires_in_ms, Some(6000));
    assert!(a.kept);
    assert_eq!(
        (e.pick.as_slice(), e.pick_rule.as_str()),
        (&["10.0.0.2:8080".to_string()][..], "affinity")
    );
    // Another client has no entry: a random pick.
    assert_eq!(rig.explain("10.1.1.2", "10.96.0.10:80").pick_rule, "random");

    // Its endpoint fails: the client moves, the endpoint says why.
    rig.health.failed(two, rig.now);
    let e = rig.explain("10.1.1.1", "10.96.0.10:80");
    assert!(!e.affinity.as_ref().unwrap().kept);
    assert_eq!(e.pick, vec!["10.0.0.1:8080"]);
    let x = &e.endpoints[1];
    assert!(x.eligible && x.backed_off_ms == Some(1000), "{x:?}");
    assert!(
        x.why.contains("skipped while another endpoint is healthy"),
        "{}",
        x.why
    );

    // Every eligible endpoint failing: they are all tried anyway, and a
    // remembered one is kept (as the affinity table does).
    rig.health.failed("10.0.0.1:8080".parse().unwrap(), rig.now);
    let e = rig.explain("10.1.1.2", "10.96.0.10:80");
    assert_eq!(e.pick_rule, "random_any_failing");
    assert_eq!(e.pick.len(), 2);
    let e = rig.explain("10.1.1.1", "10.96.0.10:80");
    assert_eq!(e.pick_rule, "affinity");
    assert!(
        e.endpoints[0].why.contains("still tried"),
        "{}",
        e.endpoints[0].why
    );
}

#[test]
fn source_ranges_and_unknown_frontends() {
    let rig = Rig::new();
    let e = rig.explain("192.0.2.99", "198.51.100.7:80");
    assert_eq!(e.verdict, "drop");
    assert!(
        e.reason.contains("loadBalancerSourceRanges"),
        "{}",
        e.reason
    );
    assert_eq!(
        rig.explain("203.0.113.5", "198.51.100.7:80").verdict,
        "forward"
    );

    let e = rig.explain("10.1.1.1", "10.96.0.10:81");
    assert_eq!(e.verdict, "refuse");
    assert!(e.frontend.is_none() && e.endpoints.is_empty());
    assert_eq!(e.same_address, vec!["80/TCP default/web (ClusterIP)"]);
    let e = rig.explain("10.1.1.1", "10.96.0.10:80/udp");
    assert_eq!(e.verdict, "refuse");
    let e = rig.explain("10.1.1.1", "10.99.9.9:80");
    assert!(e.same_address.is_empty());
    assert!(
        e.reason.contains("no Service port is served at 10.99.9.9"),
        "{}",
        e.reason
    );
}

#[test]
fn cluster_ips_without_a_tun_are_not_served() {
    let rig = Rig::new();
    let live = Live {
        cluster_ips: false,
        ..rig.live()
    };
    let q = Query::parse("10.1.1.1", "10.96.0.10:80").unwrap();
    let e = explain(&rig.snap, &q, &live);
    assert_eq!(e.verdict, "not_served");
    assert!(e.reason.contains("--no-tun"), "{}", e.reason);
    assert!(e.pick.is_empty());
    // NodePorts are served all the same.
    let q = Query::parse("10.1.1.1", "192.0.2.1:30080").unwrap();
    assert_eq!(explain(&rig.snap, &q, &live).verdict, "forward");
}

#[test]
fn limits_reached_are_shown() {
    let rig = Rig::new();
    let limits = ConnLimits::new(1, 0, Duration::ZERO);
    let live = Live {
        limits: Some(&limits),
        ..rig.live()
    };
    let q = Query::parse("10.1.1.1", "10.96.0.10:80").unwrap();
    assert!(explain(&rig.snap, &q, &live).limits.is_empty());
    let fe = rig
        .snap
        .frontend(&crate::state::FrontendKey {
            addr: q.to,
            proto: Protocol::Tcp,
        })
        .unwrap();
    let _slot = limits.try_admit(&fe.admitted).unwrap();
    let e = explain(&rig.snap, &q, &live);
    assert_eq!(e.limits.len(), 1, "{e:?}");
    assert!(
        e.limits[0].contains("--max-connections 1"),
        "{:?}",
        e.limits
    );
}

#[test]
fn queries_parse_or_say_what_is_wrong() {
    let q = Query::parse("10.0.0.5", "[fd00:10:96::10]:53/UDP").unwrap();
    assert_eq!(q.to, "[fd00:10:96::10]:53".parse().unwrap());
    assert_eq!(q.proto, Protocol::Udp);
    assert_eq!(
        Query::parse("10.0.0.5:4000", "10.96.0.10:80")
            .unwrap()
            .client,
        "10.0.0.5".parse::<IpAddr>().unwrap()
    );
    assert_eq!(Query::from_params(&q.to_params()), Ok(q));
    let bad = [
        (("nope", "10.96.0.10:80"), QueryError::Client("nope".into())),
        (
            ("10.0.0.5", "10.96.0.10"),
            QueryError::To("10.96.0.10".into()),
        ),
        (
            ("10.0.0.5", "fd00::10:80"),
            QueryError::To("fd00::10:80".into()),
        ),
        (
            ("10.0.0.5", "10.96.0.10:80/sctp"),
            QueryError::Proto("sctp".into()),
        ),
        (
            ("10.0.0.5", "10.96.0.10:99999"),
            QueryError::To("10.96.0.10:99999".into()),
        ),
    ];
    for ((client, to), want) in bad {
        assert_eq!(Query::parse(client, to), Err(want), "{client} {to}");
    }
    assert_eq!(
        Query::from_params("to=1.2.3.4:5"),
        Err(QueryError::Missing("client"))
    );
}

#[test]
fn text_and_json_show_the_same_explanation() {
    let rig = Rig::new();
    let e = rig.explain("10.1.1.1", "192.0.2.1:30080");
    let text = render(&e);
    for want in [
        "10.1.1.1 → 192.0.2.1:30080/TCP",
        "default/web (NodePort), externalTrafficPolicy Local",
        "sessionAffinity ClientIP, timeout 10 s",
        "verdict:   forward",
        "10.0.0.2:8080  not eligible  on another node, and the traffic policy is Local",
        "10.0.0.3:8080  not eligible  terminating; used only while no endpoint is ready",
        "pick:      10.0.0.1:8080",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let json = serde_json::to_string(&e).unwrap();
    let back: Explanation = serde_json::from_str(&json).unwrap();
    assert_eq!(back, e);
    let (code, body) = answer("client=10.1.1.1&to=192.0.2.1:30080", &rig.snap, &rig.live());
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Explanation>(&body).unwrap(), e);
}
