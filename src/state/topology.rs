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

/// Topology-aware routing applies when every ready endpoint has zone hints and at
/// least one is hinted for this node's zone.
pub fn can_use_topology<A>(eps: &[Candidate<A>], zone: Option<&str>) -> bool {
    let Some(zone) = zone else { return false };
    let mut has_zone = false;
    for e in eps.iter().filter(|e| e.ready) {
        match &e.zone_hints {
            Some(h) if !h.is_empty() => has_zone |= h.iter().any(|z| z == zone),
            _ => return false,
        }
    }
    has_zone
}

/// Computes the cluster and local sets: ready endpoints, else serving-and-terminating
/// ones (graceful termination); never non-serving ones; topology narrows the
/// cluster set only.
pub fn categorize<A: Clone>(eps: &[Candidate<A>], zone: Option<&str>) -> Usable<A> {
    let select = |f: &dyn Fn(&Candidate<A>) -> bool| -> Vec<A> {
        eps.iter()
            .filter(|e| f(e))
            .map(|e| e.addr.clone())
            .collect()
    };
    let topo = can_use_topology(eps, zone);
    let in_zone = |e: &Candidate<A>| {
        !topo
            || e.zone_hints
                .as_ref()
                .is_some_and(|h| zone.is_some_and(|z| h.iter().any(|x| x == z)))
    };
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
        }
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
            let u = categorize(&eps, None);
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
        let u = categorize(&eps, Some("zone-a"));
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
        assert_eq!(categorize(&eps, Some("zone-a")).cluster, vec!["a", "b"]);
        let eps = vec![
            hinted(c("a", St::Ready, false), &["zone-a"]),
            hinted(c("b", St::Ready, false), &["zone-b"]),
        ];
        assert_eq!(categorize(&eps, Some("zone-c")).cluster, vec!["a", "b"]);
        assert_eq!(categorize(&eps, None).cluster, vec!["a", "b"]);
        // unhinted non-ready endpoints do not disable topology
        let eps = vec![
            hinted(c("a", St::Ready, false), &["zone-a"]),
            c("t", St::NotServing, false),
        ];
        assert!(can_use_topology(&eps, Some("zone-a")));
    }
}
