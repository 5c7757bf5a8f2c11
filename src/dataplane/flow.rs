//! A new flow, reduced to what every front end has in common, and the one
//! synchronous decision made for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::balance::{choose, pick_avoiding, pick_retry, Inputs};
use crate::dataplane::Shared;
use crate::model::Protocol;
use crate::state::{EmptyAction, Frontend, FrontendKey, Snapshot};
use crate::telemetry::ConnectFailure;

/// A new flow: who sent it, where to, over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address.
    pub src: SocketAddr,
    /// Frontend address (VIP or node address) and port.
    pub dst: SocketAddr,
    /// Protocol.
    pub proto: Protocol,
}

/// What to do with a new flow.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Proxy it through this frontend (it has at least one usable endpoint).
    Forward(Arc<Frontend>),
    /// Refuse at once (RST / ICMP port unreachable).
    Refuse(ConnectFailure),
    /// Drop silently.
    Drop(ConnectFailure),
}

/// Decides for a new flow from the current snapshot, counting a refusal or
/// drop in the frontend's metrics.
pub fn resolve(snap: &Snapshot, key: &FlowKey) -> Verdict {
    let (fe, verdict) = decide(snap, key);
    if let (Some(fe), Verdict::Refuse(why) | Verdict::Drop(why)) = (fe, &verdict) {
        fe.connect_failure(*why, None);
    }
    verdict
}

/// The decision of [`resolve`] without counting anything (what `ringvip
/// explain` shows): the frontend the flow was addressed to, if any, and the
/// verdict.
pub fn decide<'s>(snap: &'s Snapshot, key: &FlowKey) -> (Option<&'s Arc<Frontend>>, Verdict) {
    let fk = FrontendKey {
        addr: key.dst,
        proto: key.proto,
    };
    let Some(fe) = snap.frontend(&fk) else {
        return (None, Verdict::Refuse(ConnectFailure::NoEndpoints));
    };
    let verdict = if !fe.allows(key.src.ip()) {
        Verdict::Drop(ConnectFailure::SourceRange)
    } else if fe.endpoints.is_empty() {
        match fe.when_empty {
            EmptyAction::Refuse => Verdict::Refuse(ConnectFailure::NoEndpoints),
            EmptyAction::Drop => Verdict::Drop(ConnectFailure::NoEndpoints),
        }
    } else {
        Verdict::Forward(fe.clone())
    };
    (Some(fe), verdict)
}

/// The endpoint a pick chose: its address and its index in
/// [`Frontend::endpoints`], so the caller reaches its metrics (and any other
/// per-endpoint state at the same index) in O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked {
    /// Address and port.
    pub addr: SocketAddr,
    /// Index in [`Frontend::endpoints`].
    pub index: usize,
}

/// Chooses the endpoint for try number `attempt` (0-based) of a flow: on the
/// first try affinity, else the Service's algorithm (with slow start); then
/// untried endpoints, bypassing affinity after a failure. Endpoints backed
/// off by passive health are skipped while another will do.
pub fn pick<R: Rng + ?Sized>(
    fe: &Frontend,
    client: IpAddr,
    shared: &Shared,
    attempt: u32,
    tried: &[SocketAddr],
    now: Instant,
    rng: &mut R,
) -> Option<Picked> {
    let eps = &fe.endpoints;
    let failing = |e: &SocketAddr| shared.health.is_failing(e, now);
    let index = match attempt {
        0 => {
            let inputs = Inputs {
                n: eps.len(),
                active: |i: usize| {
                    fe.endpoint_metrics
                        .get(i)
                        .map_or(0, |m| m.traffic.connections_active.get())
                },
                avoid: |i: usize| eps.get(i).is_some_and(failing),
                warmup: fe.warmup.as_deref(),
                client,
                now,
            };
            let mut fresh = || choose(&fe.balancer, &inputs, rng);
            match fe.affinity {
                Some(timeout) => {
                    let a = &shared.affinity;
                    a.pick_with(fe.port_id, client, eps, timeout, now, failing, fresh)
                }
                None => fresh(),
            }
        }
        _ => {
            let fresh = |e: &SocketAddr| !tried.contains(e) && !failing(e);
            let addr = if eps.iter().any(fresh) {
                pick_avoiding(eps, |e| !fresh(e), rng)
            } else {
                pick_retry(eps, tried, rng)
            };
            addr.and_then(|a| fe.endpoint_index(&a))
        }
    }?;
    let addr = *eps.get(index)?;
    Some(Picked { addr, index })
}

/// Timeout of connect try `attempt`: the first timeout doubled at each retry
/// (250 ms, 500 ms, 1 s, 2 s with the defaults, like kube-proxy's userspace mode).
/// `--connect-timeout-ms` sets the first, `--connect-attempts` the number of tries.
pub fn connect_timeout(first: Duration, attempt: u32) -> Duration {
    first.saturating_mul(1u32 << attempt.min(16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::testing::builders::{self, endpoint, node};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// LoadBalancer default/web (ClusterIP 10.96.0.10, LB IP 198.51.100.7,
    /// NodePort 30080 on 192.0.2.1) with ClientIP affinity, port 80 to 8080
    /// on `eps`.
    fn snapshot(eps: &[&str], source_ranges: Vec<ipnet::IpNet>) -> Snapshot {
        let (svc, eps) =
            builders::lb_web(source_ranges, eps.iter().map(|ip| endpoint(ip)).collect());
        let ctx = node("n", &["192.0.2.1"], &["192.0.2.1"]);
        builders::snapshot(vec![Object::Service(svc), Object::EndpointSlice(eps)], &ctx)
    }

    /// [`super::pick`], checking the index it hands back, as an address.
    fn pick(
        fe: &Frontend,
        client: IpAddr,
        shared: &Shared,
        attempt: u32,
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut SmallRng,
    ) -> Option<SocketAddr> {
        let p = super::pick(fe, client, shared, attempt, tried, now, rng)?;
        assert_eq!(fe.endpoints.get(p.index), Some(&p.addr));
        Some(p.addr)
    }

    fn key(src: &str, dst: &str) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Protocol::Tcp,
        }
    }

    #[test]
    fn unknown_frontend_is_refused() {
        let snap = snapshot(&["10.0.0.1"], vec![]);
        assert!(matches!(
            resolve(&snap, &key("192.0.2.9:1000", "10.96.0.10:81")),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn no_endpoints_is_refused() {
        let snap = snapshot(&[], vec![]);
        assert!(matches!(
            resolve(&snap, &key("192.0.2.9:1000", "192.0.2.1:30080")),
            Verdict::Refuse(ConnectFailure::NoEndpoints)
        ));
    }

    #[test]
    fn source_ranges_drop_outsiders_on_lb_only() {
        let snap = snapshot(&["10.0.0.1"], vec!["203.0.113.0/24".parse().unwrap()]);
        assert!(matches!(
            resolve(&snap, &key("192.0.2.9:1000", "198.51.100.7:80")),
            Verdict::Drop(ConnectFailure::SourceRange)
        ));
        assert!(matches!(
            resolve(&snap, &key("203.0.113.4:1000", "198.51.100.7:80")),
            Verdict::Forward(_)
        ));
        assert!(matches!(
            resolve(&snap, &key("192.0.2.9:1000", "192.0.2.1:30080")),
            Verdict::Forward(_)
        ));
    }

    #[test]
    fn first_try_uses_affinity_retries_bypass_it() {
        let (fe, shared, client, now, mut rng) = three_endpoints(9);
        let first = pick(&fe, client, &shared, 0, &[], now, &mut rng).unwrap();
        for _ in 0..20 {
            assert_eq!(
                pick(&fe, client, &shared, 0, &[], now, &mut rng),
                Some(first)
            );
            let retry = pick(&fe, client, &shared, 1, &[first], now, &mut rng).unwrap();
            assert_ne!(retry, first);
        }
    }

    /// A NodePort frontend with three endpoints, the data plane's shared
    /// state, a client, the time and a seeded generator.
    fn three_endpoints(
        seed: u64,
    ) -> (
        std::sync::Arc<Frontend>,
        std::sync::Arc<Shared>,
        IpAddr,
        Instant,
        SmallRng,
    ) {
        let snap = snapshot(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], vec![]);
        let Verdict::Forward(fe) = resolve(&snap, &key("192.0.2.9:1000", "192.0.2.1:30080")) else {
            panic!("expected forward");
        };
        let shared = Shared::new(crate::config::DataPlaneOptions {
            tcp_idle_timeout: Duration::ZERO,
            ..Default::default()
        });
        let client = IpAddr::from([192, 0, 2, 9]);
        (
            fe,
            shared,
            client,
            Instant::now(),
            SmallRng::seed_from_u64(seed),
        )
    }

    #[test]
    fn failing_endpoints_are_skipped_unless_all_fail() {
        let (fe, shared, client, now, mut rng) = three_endpoints(4);
        // The client's affinity endpoint starts failing: it moves elsewhere.
        let first = pick(&fe, client, &shared, 0, &[], now, &mut rng).unwrap();
        shared.health.failed(first, now);
        for _ in 0..50 {
            let p = pick(&fe, client, &shared, 0, &[], now, &mut rng).unwrap();
            assert_ne!(p, first);
        }
        // Every endpoint failing: they are tried anyway.
        for ep in fe.endpoints.iter() {
            shared.health.failed(*ep, now);
        }
        assert!(pick(&fe, client, &shared, 0, &[], now, &mut rng).is_some());
        // After the back-off, the endpoint is picked again.
        let later = now + Duration::from_secs(2);
        let seen: std::collections::HashSet<_> = (0..100)
            .map(|i| {
                pick(
                    &fe,
                    IpAddr::from([192, 0, 2, i as u8]),
                    &shared,
                    0,
                    &[],
                    later,
                    &mut rng,
                )
            })
            .collect();
        assert!(seen.contains(&Some(first)));
    }

    #[test]
    fn connect_timeouts_double() {
        let f = Duration::from_millis(250);
        let t: Vec<_> = (0..4).map(|a| connect_timeout(f, a).as_millis()).collect();
        assert_eq!(t, vec![250, 500, 1000, 2000]);
    }
}
