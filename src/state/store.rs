//! The single writer: holds the latest objects from the sources and compiles
//! snapshots from them.

use std::collections::BTreeMap;

use crate::discovery::Update;
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
                changes
            }
            Update::Upsert(o) => {
                let kind = o.id().0;
                if self.upsert(*o) {
                    Changes::one(kind)
                } else {
                    Changes::default()
                }
            }
            Update::Delete(kind, key) => {
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
