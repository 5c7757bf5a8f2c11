//! Which endpoints a flow may use (SEMANTICS.md; kube-proxy pkg/proxy/topology.go).
//! Pure functions over one Service port's merged endpoints, run at snapshot compile.

use crate::model::TrafficPolicy;

/// One merged endpoint of a Service port, with what policy filtering needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<A> {
    /// The endpoint (ip:port in practice; generic for tests).
    pub addr: A,
    /// Ready condition.
    pub ready: bool,
    /// Serving condition.
    pub serving: bool,
    /// Terminating condition.
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    /// Zone hints; `None` when the endpoint carries none.
    pub zone_hints: Option<Vec<String>>,
    /// Node hints (`forNodes`, PreferSameNode); `None` when it carries none.
    pub node_hints: Option<Vec<String>>,
}

/// Which topology narrows the cluster set (kube-proxy 1.34
/// `topologyModeFromHints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopologyMode {
    /// No narrowing: every ready endpoint.
    None,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

/// Where this proxy runs, as topology sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    /// This node's name.
    pub node: &'a str,
    /// This node's zone, if known.
    pub zone: Option<&'a str>,
}

/// The usable sets of one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usable<A> {
    /// For cluster-wide policy (topology applied).
    pub cluster: Vec<A>,
    /// Endpoints on this node (topology never applies).
    pub local: Vec<A>,
}

impl<A: Clone> Usable<A> {
    /// The set a frontend under `policy` uses.
    pub fn for_policy(&self, policy: TrafficPolicy) -> &[A] {
        match policy {
            TrafficPolicy::Cluster => &self.cluster,
            TrafficPolicy::Local => &self.local,
        }
    }
}

/// kube-proxy's `topologyModeFromHints`: same-node when every ready endpoint
/// has node hints and one names this node; else same-zone when every ready
/// endpoint has zone hints and one names this node's zone; else none. A hint
/// set that names nothing here falls back to the next rule, never to an empty
/// set.
pub fn topology_mode<A>(eps: &[Candidate<A>], place: Place<'_>) -> TopologyMode {
    let (mut all_node, mut for_node) = (true, false);
    let (mut all_zone, mut for_zone) = (true, false);
    for e in eps.iter().filter(|e| e.ready) {
        match &e.node_hints {
            Some(h) if !h.is_empty() => for_node |= h.iter().any(|n| n == place.node),
            _ => all_node = false,
        }
        match &e.zone_hints {
            Some(h) if !h.is_empty() => {
                for_zone |= place.zone.is_some_and(|z| h.iter().any(|x| x == z))
            }
            _ => all_zone = false,
        }
    }
    if all_node && for_node {
        TopologyMode::SameNode
    } else if all_zone && for_zone {
        TopologyMode::SameZone
    } else {
        TopologyMode::None
    }
}

/// Whether `e` is available under `mode` (kube-proxy `availableForTopology`).
fn available<A>(e: &Candidate<A>, mode: TopologyMode, place: Place<'_>) -> bool {
    let has = |h: &Option<Vec<String>>, x: Option<&str>| {
        h.as_ref()
            .is_some_and(|h| x.is_some_and(|x| h.iter().any(|v| v == x)))
    };
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => has(&e.node_hints, Some(place.node)),
        TopologyMode::SameZone => has(&e.zone_hints, place.zone),
    }
}

/// Computes the cluster and local sets: ready endpoints, else serving-and-terminating
/// ones (graceful termination); never non-serving ones; topology narrows the
/// cluster set only.
pub fn categorize<A: Clone>(eps: &[Candidate<A>], place: Place<'_>) -> Usable<A> {
    let select = |f: &dyn Fn(&Candidate<A>) -> bool| -> Vec<A> {
        eps.iter()
            .filter(|e| f(e))
            .map(|e| e.addr.clone())
            .collect()
    };
    let mode = topology_mode(eps, place);
    let in_zone = |e: &Candidate<A>| available(e, mode, place);
    let mut cluster = select(&|e| e.ready && in_zone(e));
    if cluster.is_empty() {
        cluster = select(&|e| e.serving && e.terminating);
    }
    let mut local = select(&|e| e.ready && e.local);
    if local.is_empty() {
        local = select(&|e| e.serving && e.terminating && e.local);
    }
    Usable { cluster, local }
}

/// Why one endpoint is, or is not, in the set a frontend under a traffic
/// policy uses: [`categorize`]'s rules for a single endpoint, with the reason
/// kept (what `ringvip explain` shows). A property test holds the two together:
/// an endpoint is eligible here exactly when `categorize` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Eligibility {
    /// Ready (in this node's zone when topology applies, on this node under
    /// `Local` policy).
    Ready,
    /// Serving and terminating, used because no endpoint is ready.
    TerminatingFallback,
    /// Not ready and not terminating.
    NotReady,
    /// Terminating and no longer serving: never used.
    TerminatingNotServing,
    /// Serving and terminating, but a ready endpoint exists, so it is not used.
    TerminatingNotNeeded,
    /// On another node while the policy is `Local`.
    NotLocal,
    /// Topology-aware routing is on and the endpoint's hints name other zones.
    OtherZone,
    /// PreferSameNode is on and the endpoint's hints name other nodes.
    OtherNode,
}

impl Eligibility {
    /// Whether the endpoint is in the frontend's set.
    pub fn is_eligible(self) -> bool {
        matches!(self, Eligibility::Ready | Eligibility::TerminatingFallback)
    }

    /// A stable, machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Eligibility::Ready => "ready",
            Eligibility::TerminatingFallback => "terminating_fallback",
            Eligibility::NotReady => "not_ready",
            Eligibility::TerminatingNotServing => "terminating_not_serving",
            Eligibility::TerminatingNotNeeded => "terminating_not_needed",
            Eligibility::NotLocal => "not_local",
            Eligibility::OtherZone => "other_zone",
            Eligibility::OtherNode => "other_node",
        }
    }

    /// One sentence for people.
    pub fn describe(self) -> &'static str {
        match self {
            Eligibility::Ready => "ready",
            Eligibility::TerminatingFallback => {
                "terminating but still serving; used because no endpoint is ready"
            }
            Eligibility::NotReady => "not ready",
            Eligibility::TerminatingNotServing => "terminating and no longer serving",
            Eligibility::TerminatingNotNeeded => {
                "terminating; used only while no endpoint is ready"
            }
            Eligibility::NotLocal => "on another node, and the traffic policy is Local",
            Eligibility::OtherZone => {
                "topology hints name other zones than this node's (topology-aware routing)"
            }
            Eligibility::OtherNode => {
                "topology hints name other nodes than this one (PreferSameNode)"
            }
        }
    }
}

/// Explains `e`, one of `eps` (a Service port's merged endpoints of one
/// family), for a frontend under `policy` on this node (`place`). The order of
/// the reasons: locality under `Local` first (nothing else matters then),
/// then readiness, then zone.
pub fn explain_endpoint<A>(
    eps: &[Candidate<A>],
    e: &Candidate<A>,
    place: Place<'_>,
    policy: TrafficPolicy,
) -> Eligibility {
    let mode = match policy {
        TrafficPolicy::Cluster => topology_mode(eps, place),
        TrafficPolicy::Local => TopologyMode::None,
    };
    let in_scope = |c: &Candidate<A>| match policy {
        TrafficPolicy::Cluster => available(c, mode, place),
        TrafficPolicy::Local => c.local,
    };
    if policy == TrafficPolicy::Local && !e.local {
        return Eligibility::NotLocal;
    }
    if e.ready {
        return if in_scope(e) {
            Eligibility::Ready
        } else if mode == TopologyMode::SameNode {
            Eligibility::OtherNode
        } else {
            Eligibility::OtherZone
        };
    }
    if !e.terminating {
        return Eligibility::NotReady;
    }
    if !e.serving {
        return Eligibility::TerminatingNotServing;
    }
    if eps.iter().any(|c| c.ready && in_scope(c)) {
        return Eligibility::TerminatingNotNeeded;
    }
    Eligibility::TerminatingFallback
}

#[cfg(test)]
mod tests {
    use super::*;
    use TrafficPolicy::{Cluster, Local};

    #[derive(Clone, Copy)]
    enum St {
        Ready,
        Terminating, // serving + terminating
        NotServing,  // terminating, not serving
        NotReady,    // not ready, serving false, not terminating
    }

    fn c(name: &'static str, st: St, local: bool) -> Candidate<&'static str> {
        let (ready, serving, terminating) = match st {
            St::Ready => (true, true, false),
            St::Terminating => (false, true, true),
            St::NotServing => (false, false, true),
            St::NotReady => (false, false, false),
        };
        Candidate {
            addr: name,
            ready,
            serving,
            terminating,
            local,
            zone_hints: None,
            node_hints: None,
        }
    }

    /// Node `node-a` in `zone`.
    fn at(zone: Option<&str>) -> Place<'_> {
        Place {
            node: "node-a",
            zone,
        }
    }

    fn on_nodes(mut e: Candidate<&'static str>, n: &[&str]) -> Candidate<&'static str> {
        e.node_hints = Some(n.iter().map(|s| s.to_string()).collect());
        e
    }

    fn hinted(mut e: Candidate<&'static str>, z: &[&str]) -> Candidate<&'static str> {
        e.zone_hints = Some(z.iter().map(|s| s.to_string()).collect());
        e
    }

    /// The eTP/iTP × ready/terminating/remote matrix.
    #[test]
    fn policy_matrix() {
        use St::*;
        // (endpoints, expected cluster set, expected local set)
        type Case = (
            Vec<Candidate<&'static str>>,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            // ready local + ready remote
            (
                vec![c("l", Ready, true), c("r", Ready, false)],
                vec!["l", "r"],
                vec!["l"],
            ),
            // only remote ready: local set empty (Local policy then drops)
            (vec![c("r", Ready, false)], vec!["r"], vec![]),
            // ready remote, terminating local: local falls back to terminating
            (
                vec![c("lt", Terminating, true), c("r", Ready, false)],
                vec!["r"],
                vec!["lt"],
            ),
            // all terminating: both fall back
            (
                vec![c("lt", Terminating, true), c("rt", Terminating, false)],
                vec!["lt", "rt"],
                vec!["lt"],
            ),
            // not serving is never used, even as fallback
            (
                vec![c("ln", NotServing, true), c("rn", NotServing, false)],
                vec![],
                vec![],
            ),
            // not ready is never used
            (vec![c("x", NotReady, true)], vec![], vec![]),
            // ready wins over terminating: no fallback when any ready exists
            (
                vec![c("lt", Terminating, true), c("l", Ready, true)],
                vec!["l"],
                vec!["l"],
            ),
        ];
        for (eps, cluster, local) in cases {
            let u = categorize(&eps, at(None));
            assert_eq!(u.cluster, cluster, "cluster for {eps:?}");
            assert_eq!(u.local, local, "local for {eps:?}");
            assert_eq!(u.for_policy(Cluster), &cluster[..]);
            assert_eq!(u.for_policy(Local), &local[..]);
        }
    }

    #[test]
    fn topology_narrows_cluster_set_when_all_ready_hinted() {
        let eps = vec![
            hinted(c("a", St::Ready, false), &["zone-a"]),
            hinted(c("b", St::Ready, false), &["zone-b"]),
            hinted(c("l", St::Ready, true), &["zone-b"]),
        ];
        let u = categorize(&eps, at(Some("zone-a")));
        assert_eq!(u.cluster, vec!["a"]);
        // Local policy overrides topology
        assert_eq!(u.local, vec!["l"]);
    }

    #[test]
    fn topology_off_when_a_ready_endpoint_lacks_hints_or_no_match() {
        let eps = vec![
            hinted(c("a", St::Ready, false), &["zone-a"]),
            c("b", St::Ready, false),
        ];
        assert_eq!(categorize(&eps, at(Some("zone-a"))).cluster, vec!["a", "b"]);
        let eps = vec![
            hinted(c("a", St::Ready, false), &["zone-a"]),
            hinted(c("b", St::Ready, false), &["zone-b"]),
        ];
        assert_eq!(categorize(&eps, at(Some("zone-c"))).cluster, vec!["a", "b"]);
        assert_eq!(categorize(&eps, at(None)).cluster, vec!["a", "b"]);
        // unhinted non-ready endpoints do not disable topology
        let eps = vec![
            hinted(c("a", St::Ready, false), &["zone-a"]),
            c("t", St::NotServing, false),
        ];
        assert_eq!(
            topology_mode(&eps, at(Some("zone-a"))),
            TopologyMode::SameZone
        );
    }

    /// PreferSameNode (kube-proxy 1.34): node hints win over zone hints when
    /// every ready endpoint has them and one names this node; otherwise the
    /// zone rule, then no topology.
    #[test]
    fn same_node_hints_then_zone_then_all() {
        let both = |name, st, node: &str, zone: &str| {
            hinted(on_nodes(c(name, st, false), &[node]), &[zone])
        };
        let eps = vec![
            both("mine", St::Ready, "node-a", "zone-a"),
            both("neighbour", St::Ready, "node-b", "zone-a"),
            both("far", St::Ready, "node-c", "zone-b"),
        ];
        let u = categorize(&eps, at(Some("zone-a")));
        assert_eq!(u.cluster, vec!["mine"]);
        assert_eq!(
            explain_endpoint(&eps, &eps[1], at(Some("zone-a")), Cluster),
            Eligibility::OtherNode
        );
        // No endpoint for this node: fall back to the zone.
        let elsewhere = Place {
            node: "node-z",
            zone: Some("zone-a"),
        };
        assert_eq!(
            categorize(&eps, elsewhere).cluster,
            vec!["mine", "neighbour"]
        );
        // One ready endpoint without node hints: node hints are ignored.
        let mut partial = eps.clone();
        partial[2].node_hints = None;
        assert_eq!(
            categorize(&partial, at(Some("zone-a"))).cluster,
            vec!["mine", "neighbour"]
        );
        // A not-ready endpoint for this node does not count, and never
        // empties the set.
        let mut down = eps.clone();
        down[0].ready = false;
        down[0].serving = false;
        assert_eq!(
            categorize(&down, at(Some("zone-c"))).cluster,
            vec!["neighbour", "far"]
        );
        // Local policy overrides node hints.
        assert_eq!(
            explain_endpoint(&eps, &eps[0], at(Some("zone-a")), Local),
            Eligibility::NotLocal
        );
    }

    use proptest::prelude::*;

    /// Candidates named by index, in any mix of states, locality and hints
    /// (hints from a pool of two zones, sometimes absent or empty).
    fn candidates() -> impl Strategy<Value = Vec<Candidate<usize>>> {
        let pool = |names: Vec<&'static str>| {
            prop_oneof![
                2 => Just(None),
                1 => Just(Some(vec![])),
                3 => prop::sample::subsequence(names, 1..=2)
                    .prop_map(|z| Some(z.into_iter().map(String::from).collect())),
            ]
        };
        let hints = (
            pool(vec!["zone-a", "zone-b"]),
            pool(vec!["node-a", "node-b"]),
        );
        prop::collection::vec(
            (
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                hints,
            ),
            0..8,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(
                    |(i, (ready, serving, terminating, local, (zone_hints, node_hints)))| {
                        Candidate {
                            addr: i,
                            ready,
                            serving,
                            terminating,
                            local,
                            zone_hints,
                            node_hints,
                        }
                    },
                )
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every endpoint `categorize` keeps is explained eligible, every one
        /// it drops is explained with a reason: the two cannot drift.
        #[test]
        fn explain_agrees_with_categorize(
            eps in candidates(),
            zone in prop_oneof![Just(None), Just(Some("zone-a")), Just(Some("zone-c"))],
        ) {
            let u = categorize(&eps, at(zone));
            for policy in [Cluster, Local] {
                let kept = u.for_policy(policy);
                for e in &eps {
                    let why = explain_endpoint(&eps, e, at(zone), policy);
                    prop_assert_eq!(
                        why.is_eligible(),
                        kept.contains(&e.addr),
                        "{:?} under {:?} in zone {:?}: {:?} of {:?}",
                        e, policy, zone, why, eps
                    );
                }
            }
        }
    }
}
