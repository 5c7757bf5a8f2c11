//! The single writer: holds the latest objects from the sources and compiles
//! snapshots from them.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::discovery::{selector, Update};
use crate::model::{EndpointSlice, Kind, Node, Object, ObjectKey, Pod, Service};

/// How many objects an update changed, for kube-proxy's change metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services added, changed or removed.
    pub services: u64,
    /// EndpointSlices added, changed or removed.
    pub endpoints: u64,
    /// Nodes or Pods added, changed or removed.
    pub other: u64,
}

impl Changes {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services == 0 && self.endpoints == 0 && self.other == 0
    }
}

/// Current objects, by kind and key.
#[derive(Debug, Default, Clone)]
pub struct Store {
    pub(crate) services: BTreeMap<ObjectKey, Service>,
    pub(crate) slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub(crate) nodes: BTreeMap<String, Node>,
    pub(crate) pods: BTreeMap<ObjectKey, Pod>,
    /// Services to compile again since the last [`Store::take_dirty`].
    pub(crate) dirty: Dirty,
}

/// Which Services changed (their object or one of their slices) since the
/// last compile with a cache; `all` after a reset or a Node/Pod change.
#[derive(Debug, Default, Clone)]
pub struct Dirty {
    /// Everything must be compiled again.
    pub all: bool,
    /// Namespace and name of each changed Service.
    pub services: HashSet<ObjectKey>,
}

fn count<K: Ord, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> u64 {
    let changed_or_added = new.iter().filter(|(k, v)| old.get(k) != Some(v)).count();
    let removed = old.keys().filter(|k| !new.contains_key(k)).count();
    (changed_or_added + removed) as u64
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one update; reports what changed.
    pub fn apply(&mut self, update: Update) -> Changes {
        match update {
            Update::Reset(objects) => {
                let mut next = Store::new();
                for o in objects {
                    next.upsert(o);
                }
                let changes = Changes {
                    services: count(&self.services, &next.services),
                    endpoints: count(&self.slices, &next.slices),
                    other: count(&self.nodes, &next.nodes) + count(&self.pods, &next.pods),
                };
                *self = next;
                self.dirty.all = true;
                changes
            }
            Update::Upsert(o) => {
                let kind = o.id().0;
                self.mark(&o);
                if self.upsert(*o) {
                    Changes::one(kind)
                } else {
                    Changes::default()
                }
            }
            Update::Delete(kind, key) => {
                match kind {
                    Kind::Service => {
                        self.dirty.services.insert(key.clone());
                    }
                    Kind::EndpointSlice => {
                        if let Some(old) = self.slices.get(&key) {
                            let svc =
                                ObjectKey::new(key.namespace.clone(), old.service_name.clone());
                            self.dirty.services.insert(svc);
                        }
                    }
                    Kind::Node | Kind::Pod => self.dirty.all = true,
                }
                let gone = match kind {
                    Kind::Service => self.services.remove(&key).is_some(),
                    Kind::EndpointSlice => self.slices.remove(&key).is_some(),
                    Kind::Node => self.nodes.remove(&key.name).is_some(),
                    Kind::Pod => self.pods.remove(&key).is_some(),
                };
                if gone {
                    Changes::one(kind)
                } else {
                    Changes::default()
                }
            }
        }
    }

    /// Marks the Services an upsert of `o` may change (a slice that moves to
    /// another Service changes both).
    fn mark(&mut self, o: &Object) {
        match o {
            Object::Service(s) => {
                self.dirty.services.insert(s.key.clone());
            }
            Object::EndpointSlice(s) => {
                let ns = &s.key.namespace;
                if let Some(old) = self.slices.get(&s.key) {
                    let before = ObjectKey::new(ns.clone(), old.service_name.clone());
                    self.dirty.services.insert(before);
                }
                let now = ObjectKey::new(ns.clone(), s.service_name.clone());
                self.dirty.services.insert(now);
            }
            Object::Node(_) | Object::Pod(_) => self.dirty.all = true,
        }
    }

    /// What changed since the last call (see [`Dirty`]).
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Inserts or replaces; true when the stored object changed.
    fn upsert(&mut self, o: Object) -> bool {
        fn put<K: Ord, V: PartialEq>(m: &mut BTreeMap<K, V>, k: K, v: V) -> bool {
            if m.get(&k) == Some(&v) {
                return false;
            }
            m.insert(k, v);
            true
        }
        match o {
            Object::Service(s) => put(&mut self.services, s.key.clone(), s),
            Object::EndpointSlice(s) => put(&mut self.slices, s.key.clone(), s),
            Object::Node(n) => put(&mut self.nodes, n.name.clone(), n),
            Object::Pod(p) => put(&mut self.pods, p.key.clone(), p),
        }
    }

    /// The Node object of this name, if a source delivered one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Number of Services held.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every Service held, by namespace and name.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// The Pods of one namespace, by name.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> {
        self.pods
            .range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, p)| p)
    }

    /// Selectors without a cluster: when the sources delivered any Pod, the
    /// EndpointSlices the EndpointSlice controller would build for every Service
    /// with a selector (see [`selector::slices_for`]). Empty when there is no Pod,
    /// so a cluster's own slices are never second-guessed.
    pub fn selector_slices(&self) -> Vec<EndpointSlice> {
        if self.pods.is_empty() {
            return Vec::new();
        }
        let zones = |n: &str| self.nodes.get(n).and_then(|n| n.zone.clone());
        let mut out = Vec::new();
        for svc in self.services.values().filter(|s| s.selector.is_some()) {
            out.extend(selector::slices_for(
                svc,
                self.pods_in(&svc.key.namespace),
                &zones,
            ));
        }
        out
    }

    /// Every EndpointSlice, from the sources and `derived` (from
    /// [`Store::selector_slices`]), grouped by (namespace, Service name).
    pub fn slices_by_service<'a>(
        &'a self,
        derived: &'a [EndpointSlice],
    ) -> HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>> {
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in self.slices.values().chain(derived) {
            by_service
                .entry((s.key.namespace.as_str(), s.service_name.as_str()))
                .or_default()
                .push(s);
        }
        by_service
    }
}

impl Changes {
    fn one(kind: Kind) -> Self {
        let mut c = Changes::default();
        match kind {
            Kind::Service => c.services = 1,
            Kind::EndpointSlice => c.endpoints = 1,
            Kind::Node | Kind::Pod => c.other = 1,
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePort, TargetPort};
    use crate::state::NodeContext;
    use crate::telemetry::Metrics;
    use crate::testing::builders::{self, labels, service};

    /// default/web at 10.96.0.10 selecting app=web, port "http" 80/TCP to the
    /// Pods' port named "http".
    fn svc() -> Service {
        let http = ServicePort {
            target_port: TargetPort::Name("http".into()),
            ..builders::port("http", Protocol::Tcp, 80, 0)
        };
        Service {
            selector: Some(labels(&[("app", "web")])),
            ..service("default", "web", &["10.96.0.10"], vec![http])
        }
    }

    /// A Pod with app=web, its port "http" at 8080.
    fn pod(name: &str, ip: &str, ready: bool) -> Pod {
        Pod {
            ready,
            container_ports: vec![("http".into(), Protocol::Tcp, 8080)],
            ..builders::pod("default", name, ip, labels(&[("app", "web")]))
        }
    }

    fn endpoints(st: &Store) -> Vec<String> {
        let snap = st.compile(&NodeContext::default(), &Metrics::new(), 1);
        let mut v: Vec<String> = snap
            .frontends()
            .flat_map(|(_, f)| f.endpoints.iter().map(|e| e.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn selector_services_get_endpoints_from_pods_live() {
        let mut st = Store::new();
        st.apply(Update::Reset(vec![Object::Service(svc())]));
        assert!(st.selector_slices().is_empty(), "no Pods: nothing derived");
        assert!(endpoints(&st).is_empty());
        st.apply(Update::Upsert(Box::new(Object::Pod(pod(
            "a", "10.0.0.1", true,
        )))));
        st.apply(Update::Upsert(Box::new(Object::Pod(pod(
            "b", "10.0.0.2", false,
        )))));
        assert_eq!(endpoints(&st), vec!["10.0.0.1:8080"]);
        st.apply(Update::Upsert(Box::new(Object::Pod(pod(
            "b", "10.0.0.2", true,
        )))));
        assert_eq!(endpoints(&st), vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
        st.apply(Update::Delete(Kind::Pod, ObjectKey::new("default", "a")));
        assert_eq!(endpoints(&st), vec!["10.0.0.2:8080"]);
    }

    #[test]
    fn pods_in_lists_one_namespace() {
        let mut st = Store::new();
        let mut other = pod("a", "10.0.0.3", true);
        other.key.namespace = "defaultx".into();
        st.apply(Update::Reset(vec![
            Object::Pod(pod("a", "10.0.0.1", true)),
            Object::Pod(pod("b", "10.0.0.2", true)),
            Object::Pod(other),
        ]));
        let names: Vec<&str> = st.pods_in("default").map(|p| p.key.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(st.pods_in("defaultx").count(), 1);
        assert_eq!(st.pods_in("nope").count(), 0);
    }
}
