//! The single writer: holds the latest objects from the sources and compiles
//! snapshots from them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::selection::Selection;
use crate::discovery::{selector, Checked, Update};
use crate::model::{
    EndpointSlice, HealthCheckSpec, Kind, LegacyEndpoints, Node, Object, ObjectKey, Pod, Probe,
    Service,
};

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
    /// The keys of `slices` by their Service (namespace, Service name): a
    /// change finds its Service's slices without a pass over all of them.
    /// A sorted `Vec`, not a `BTreeSet`: a Service has one slice or a few,
    /// and a set's first node alone was ~500 bytes per Service.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// The Services with `ringvip.io/health-check`: what
    /// [`Store::check_targets`] walks, rather than every Service per change.
    health_checked: BTreeSet<ObjectKey>,
    pub(crate) nodes: BTreeMap<String, Node>,
    pub(crate) pods: BTreeMap<ObjectKey, Pod>,
    /// The Pods with readiness probes: what the prober syncs against, at
    /// every snapshot (without scanning every Pod).
    probed: BTreeSet<ObjectKey>,
    /// The slices derived from Pods by each selector Service (see
    /// [`Store::selector_slices`]), kept up to date as Services and Pods
    /// change: a Pod change derives again only the Services that select it
    /// (before or after), not every Service.
    selection: Selection,
    /// Legacy `v1 Endpoints` (file mode), by the key of their Service.
    pub(crate) endpoints: BTreeMap<ObjectKey, LegacyEndpoints>,
    /// Services to compile again since the last [`Store::take_dirty`].
    pub(crate) dirty: Dirty,
    /// What ringvip's own checks found, laid over the objects and kept
    /// across resets (a reload of the same files keeps what was probed).
    pub(crate) checked: CheckedState,
}

/// Results of the prober and the health checker.
#[derive(Debug, Default, Clone)]
pub(crate) struct CheckedState {
    /// Readiness probe results by Pod and container (absent: not yet
    /// succeeded, so not ready, as the kubelet's initial result).
    probes: HashMap<(ObjectKey, usize), bool>,
    /// Endpoints of a Service whose health check found them down (absent:
    /// up, as HAProxy's default `init-state up`).
    down: HashSet<(ObjectKey, SocketAddr)>,
}

impl CheckedState {
    /// Whether the health check of `service` found `endpoint` down.
    pub(crate) fn is_down(&self, service: &ObjectKey, endpoint: SocketAddr) -> bool {
        !self.down.is_empty() && self.down.contains(&(service.clone(), endpoint))
    }

    /// A Pod with readiness probes is ready when every probe succeeded.
    fn pod_ready(&self, pod: &Pod) -> bool {
        (0..pod.readiness_probes.len())
            .all(|i| self.probes.get(&(pod.key.clone(), i)) == Some(&true))
    }
}

/// One readiness probe to run: a container's probe of a Pod at an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeTarget {
    /// The Pod.
    pub pod: ObjectKey,
    /// Index of the probe among the Pod's readiness probes.
    pub container: usize,
    /// The Pod's (first) IP.
    pub ip: IpAddr,
    /// The probe.
    pub probe: Probe,
}

/// One endpoint to health-check for a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckTarget {
    /// The Service asking for the check.
    pub service: ObjectKey,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// The check.
    pub spec: HealthCheckSpec,
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
            Update::Checked(c) => self.checked(c),
            Update::Reset(objects) => {
                let mut next = Store {
                    checked: std::mem::take(&mut self.checked),
                    ..Store::new()
                };
                for o in objects {
                    next.upsert(o);
                }
                next.compact();
                next.select_all();
                let changes = Changes {
                    services: count(&self.services, &next.services),
                    endpoints: count(&self.slices, &next.slices)
                        + count(&self.endpoints, &next.endpoints),
                    other: count(&self.nodes, &next.nodes) + count(&self.pods, &next.pods),
                };
                *self = next;
                self.dirty.all = true;
                changes
            }
            Update::Upsert(o) => {
                let (kind, key) = o.id();
                self.mark(&o);
                let before = (kind == Kind::Pod)
                    .then(|| self.pods.get(&key).cloned())
                    .flatten();
                if !self.upsert(*o) {
                    return Changes::default();
                }
                match kind {
                    Kind::Pod => self.pod_changed(before.as_ref(), &key),
                    Kind::Service => self.select(&key),
                    Kind::Node => self.select_all(),
                    Kind::EndpointSlice | Kind::Endpoints => {}
                }
                Changes::one(kind)
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
                    Kind::Node => self.dirty.all = true,
                    Kind::Pod => {}
                    Kind::Endpoints => {
                        self.dirty.services.insert(key.clone());
                    }
                }
                let pod = (kind == Kind::Pod)
                    .then(|| self.pods.get(&key).cloned())
                    .flatten();
                let gone = match kind {
                    Kind::Service => {
                        self.health_checked.remove(&key);
                        let old = self.services.remove(&key);
                        if let Some(old) = &old {
                            self.selection.remove_service(old);
                        }
                        old.is_some()
                    }
                    Kind::EndpointSlice => self.remove_slice(&key),
                    Kind::Node => self.nodes.remove(&key.name).is_some(),
                    Kind::Pod => {
                        // A Pod created again under this name is a new Pod:
                        // not ready until its probes succeed.
                        self.checked.probes.retain(|(p, _), _| *p != key);
                        let old = self.pods.remove(&key);
                        if let Some(old) = &old {
                            self.selection.remove_pod(old);
                        }
                        self.probed.remove(&key);
                        old.is_some()
                    }
                    Kind::Endpoints => self.endpoints.remove(&key).is_some(),
                };
                if gone {
                    match kind {
                        Kind::Service => self.select(&key),
                        Kind::Pod => self.pod_changed(pod.as_ref(), &key),
                        Kind::Node => self.select_all(),
                        _ => {}
                    }
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
            // A Node's zone is in every endpoint derived from its Pods.
            Object::Node(_) => self.dirty.all = true,
            // Marked by `pod_changed`, once the Pod is stored.
            Object::Pod(_) => {}
            Object::Endpoints(e) => {
                self.dirty.services.insert(e.key.clone());
            }
        }
    }

    /// Lays a check result over the objects.
    fn checked(&mut self, c: Checked) -> Changes {
        match c {
            Checked::PodReady {
                pod,
                container,
                ready,
            } => {
                self.checked.probes.insert((pod.clone(), container), ready);
                let Some(p) = self.pods.get_mut(&pod) else {
                    return Changes::default();
                };
                let now = !p.readiness_probes.is_empty() && self.checked.pod_ready(p);
                if p.readiness_probes.is_empty() || p.ready == now {
                    return Changes::default();
                }
                let before = p.clone();
                p.ready = now;
                self.pod_changed(Some(&before), &pod);
                Changes::one(Kind::Pod)
            }
            Checked::Endpoint {
                service,
                endpoint,
                up,
            } => {
                let key = (service, endpoint);
                let changed = if up {
                    self.checked.down.remove(&key)
                } else {
                    self.checked.down.insert(key.clone())
                };
                if !changed {
                    return Changes::default();
                }
                self.dirty.services.insert(key.0);
                Changes::one(Kind::EndpointSlice)
            }
        }
    }

    /// Every readiness probe to run now: those of Pods with an IP that are
    /// not finished (Succeeded or Failed).
    pub fn probe_targets(&self) -> Vec<ProbeTarget> {
        let mut out = Vec::new();
        let probed = self.probed.iter().filter_map(|k| self.pods.get(k));
        for p in probed.filter(|p| !p.terminal) {
            let Some(ip) = p.ips.first() else { continue };
            for (i, probe) in p.readiness_probes.iter().enumerate() {
                out.push(ProbeTarget {
                    pod: p.key.clone(),
                    container: i,
                    ip: *ip,
                    probe: probe.clone(),
                });
            }
        }
        out
    }

    /// Every endpoint to health-check now: each endpoint (ip:port, any
    /// condition) of each port of each Service with `ringvip.io/health-check`.
    /// Forgets results of endpoints no longer listed, so one that comes
    /// back starts up again, as a new server in HAProxy.
    pub fn check_targets(&mut self) -> Vec<CheckTarget> {
        if self.health_checked.is_empty() {
            self.checked.down.clear();
            return Vec::new();
        }
        let mut out = Vec::new();
        for svc in self
            .health_checked
            .iter()
            .filter_map(|k| self.services.get(k))
        {
            let Some(spec) = &svc.options.health_check else {
                continue;
            };
            let mut seen = HashSet::new();
            let slices = self
                .slices_of(&svc.key)
                .chain(self.selection.slices_of(&svc.key));
            for s in slices {
                for sp in &svc.ports {
                    let Some(port) = s.port_for(sp) else { continue };
                    for e in &s.endpoints {
                        let endpoint = SocketAddr::new(e.ip, port);
                        if sp.protocol == crate::model::Protocol::Tcp && seen.insert(endpoint) {
                            out.push(CheckTarget {
                                service: svc.key.clone(),
                                endpoint,
                                spec: spec.clone(),
                            });
                        }
                    }
                }
            }
        }
        let listed: HashSet<(&ObjectKey, SocketAddr)> =
            out.iter().map(|t| (&t.service, t.endpoint)).collect();
        self.checked.down.retain(|(s, e)| listed.contains(&(s, *e)));
        out
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
            Object::Service(s) => {
                if s.options.health_check.is_some() {
                    self.health_checked.insert(s.key.clone());
                } else {
                    self.health_checked.remove(&s.key);
                }
                if self.services.get(&s.key) == Some(&s) {
                    return false;
                }
                if let Some(old) = self.services.get(&s.key) {
                    self.selection.remove_service(old);
                }
                self.selection.add_service(&s);
                self.services.insert(s.key.clone(), s);
                true
            }
            Object::EndpointSlice(s) => {
                if self.slices.get(&s.key) == Some(&s) {
                    return false;
                }
                self.remove_slice(&s.key);
                let service = ObjectKey::new(s.key.namespace.clone(), s.service_name.clone());
                let keys = self.slices_by_service.entry(service).or_default();
                if let Err(i) = keys.binary_search(&s.key) {
                    // One more place, not the four a first push reserves:
                    // a Service has one slice or a few.
                    keys.reserve_exact(1);
                    keys.insert(i, s.key.clone());
                }
                self.slices.insert(s.key.clone(), s);
                true
            }
            Object::Node(n) => put(&mut self.nodes, n.name.clone(), n),
            Object::Pod(mut p) => {
                // With readiness probes, ringvip's prober decides, not the
                // Ready condition written in the file.
                if !p.readiness_probes.is_empty() {
                    p.ready = self.checked.pod_ready(&p);
                }
                if self.pods.get(&p.key) == Some(&p) {
                    return false;
                }
                if let Some(old) = self.pods.get(&p.key) {
                    self.selection.remove_pod(old);
                }
                self.selection.add_pod(&p);
                if p.readiness_probes.is_empty() {
                    self.probed.remove(&p.key);
                } else {
                    self.probed.insert(p.key.clone());
                }
                self.pods.insert(p.key.clone(), p);
                true
            }
            Object::Endpoints(e) => put(&mut self.endpoints, e.key.clone(), e),
        }
    }

    /// Rebuilds the maps of Services and slices from their sorted entries
    /// after a reset: keys inserted one by one leave each B-tree node about
    /// half full (6 of 11 entries at 100,000 Services, ~45 % of the nodes'
    /// bytes unused); a build from sorted entries fills them.
    fn compact(&mut self) {
        self.services = std::mem::take(&mut self.services).into_iter().collect();
        self.slices = std::mem::take(&mut self.slices).into_iter().collect();
    }

    /// Takes the slice `key` out, and out of its Service's index entry.
    fn remove_slice(&mut self, key: &ObjectKey) -> bool {
        let Some(old) = self.slices.remove(key) else {
            return false;
        };
        let service = ObjectKey::new(key.namespace.clone(), old.service_name);
        if let Some(keys) = self.slices_by_service.get_mut(&service) {
            if let Ok(i) = keys.binary_search(key) {
                keys.remove(i);
            }
            if keys.is_empty() {
                self.slices_by_service.remove(&service);
            }
        }
        true
    }

    /// The EndpointSlices (from the sources, not derived) of the Service
    /// `service`, by key: O(its slices), whatever the number of Services.
    pub fn slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
    }

    /// The Node object of this name, if a source delivered one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Number of Services held.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The Service `key`, if held.
    pub fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key)
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

    /// Derives again the selector slices of the Service `key` (gone, or
    /// without a selector: none).
    fn select(&mut self, key: &ObjectKey) {
        let slices = match self.services.get(key) {
            Some(svc) if svc.selector.is_some() && !self.pods.is_empty() => {
                let zones = |n: &str| self.nodes.get(n).and_then(|n| n.zone.clone());
                let pods = self.selection.candidates(svc, &self.pods);
                selector::slices_for(svc, pods, &zones)
            }
            _ => Vec::new(),
        };
        self.selection.set_slices(key, slices);
    }

    /// Derives every selector Service's slices again (a Node's zone or the
    /// first or last Pod changes them all).
    fn select_all(&mut self) {
        self.selection.clear_slices();
        let keys: Vec<ObjectKey> = self
            .services
            .values()
            .filter(|s| s.selector.is_some())
            .map(|s| s.key.clone())
            .collect();
        for k in keys {
            self.select(&k);
        }
    }

    /// After the Pod `key` changed from `before` (None: it is new) to what
    /// the store holds now (nothing: it is gone): derives again the slices
    /// of the Services that select it before or now, and marks them
    /// changed. The first Pod and the last one change every selector
    /// Service (selectors derive slices only while there are Pods).
    fn pod_changed(&mut self, before: Option<&Pod>, key: &ObjectKey) {
        let now = self.pods.get(key);
        if self.pods.len() == usize::from(now.is_some()) {
            self.dirty.all = true;
            self.select_all();
            return;
        }
        let mut touched = BTreeSet::new();
        for p in [before, now].into_iter().flatten() {
            for k in self.selection.services_of(p) {
                let selects = self.services.get(&k).is_some_and(|svc| {
                    svc.selector
                        .as_ref()
                        .is_some_and(|sel| selector::matches(sel, &p.labels))
                });
                if selects {
                    touched.insert(k);
                }
            }
        }
        for k in touched {
            self.select(&k);
            self.dirty.services.insert(k);
        }
    }

    /// Selectors without a cluster: when the sources delivered any Pod, the
    /// EndpointSlices the EndpointSlice controller would build for every Service
    /// with a selector (see [`selector::slices_for`]), by Service. Empty when
    /// there is no Pod, so a cluster's own slices are never second-guessed.
    pub fn selector_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.selection.all_slices()
    }

    /// Every slice of the Service `service`: from the sources, derived from
    /// Pods by its selector, and mirrored from its legacy Endpoints. O(its
    /// slices), whatever the number of Services.
    pub fn all_slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        let mirrored = self.endpoints.get(service).filter(|e| {
            e.mirror
                && self
                    .services
                    .get(service)
                    .is_some_and(|s| s.selector.is_none())
        });
        self.slices_of(service)
            .chain(self.selection.slices_of(service))
            .chain(mirrored.into_iter().flat_map(|e| e.slices.iter()))
    }

    /// The EndpointSliceMirroring controller's work in file mode: the slices
    /// of each legacy Endpoints object whose same-name Service exists and has
    /// no selector, unless the object opted out of mirroring.
    pub fn mirrored_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.endpoints
            .values()
            .filter(|e| {
                e.mirror
                    && self
                        .services
                        .get(&e.key)
                        .is_some_and(|s| s.selector.is_none())
            })
            .flat_map(|e| e.slices.iter())
    }
}

impl Changes {
    fn one(kind: Kind) -> Self {
        let mut c = Changes::default();
        match kind {
            Kind::Service => c.services = 1,
            Kind::EndpointSlice | Kind::Endpoints => c.endpoints = 1,
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
        assert_eq!(st.selector_slices().count(), 0, "no Pods: nothing derived");
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

    /// Objects parsed from a manifest, as the file source delivers them.
    fn parsed(yaml: &str) -> Vec<Object> {
        let limits = crate::config::Limits::default();
        match crate::discovery::file::parse_str("m.yaml", yaml, &limits) {
            Ok(o) => o,
            Err(e) => panic!("{e:?}"),
        }
    }

    /// A selector-less Service `name` (10.96.0.20, ports http 80/TCP and
    /// dns 53/UDP) and its legacy Endpoints: one subset with two ready and
    /// one not-ready address, another with an IPv6 one; `labels` on the
    /// Endpoints.
    fn legacy(name: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nsubsets:\n- addresses: [{{ip: 192.0.2.10, nodeName: node-a}}, {{ip: 192.0.2.11}}]\n  notReadyAddresses: [{{ip: 192.0.2.12}}]\n  ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}, {{name: sig, port: 3868, protocol: SCTP}}]\n- addresses: [{{ip: \"fd00::10\"}}, {{ip: 192.0.2.13}}]\n  ports: [{{name: http, port: 8081}}]\n"
        )
    }

    #[test]
    fn legacy_endpoints_are_mirrored_for_selectorless_services() {
        let mut st = Store::new();
        st.apply(Update::Reset(parsed(&legacy("ext", ""))));
        let snap = st.compile(&NodeContext::default(), &Metrics::new(), 1);
        let eps = |addr: &str, proto| {
            let key = crate::state::FrontendKey {
                addr: addr.parse().unwrap(),
                proto,
            };
            let fe = snap.frontend(&key).map(|f| f.endpoints.to_vec());
            fe.unwrap_or_default()
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        };
        // Ready addresses of both subsets, each with its subset's port; the
        // not-ready one and the other family's left out.
        assert_eq!(
            eps("10.96.0.20:80", Protocol::Tcp),
            vec!["192.0.2.10:8080", "192.0.2.11:8080", "192.0.2.13:8081"]
        );
        assert_eq!(
            eps("10.96.0.20:53", Protocol::Udp),
            vec!["192.0.2.10:5353", "192.0.2.11:5353"]
        );
        let mirrored: Vec<_> = st.mirrored_slices().collect();
        assert_eq!(mirrored.len(), 3, "subset 0 v4, subset 1 v4 and v6");
        assert!(mirrored.iter().all(|s| s.service_name == "ext"));
        let nr = mirrored[0].endpoints.iter().find(|e| !e.ready).unwrap();
        assert_eq!(nr.ip.to_string(), "192.0.2.12");
        assert_eq!(
            mirrored[0].endpoints[0].node_name.as_deref(),
            Some("node-a")
        );
    }

    #[test]
    fn legacy_endpoints_mirror_only_as_the_controller_does() {
        let count = |yaml: &str| {
            let mut st = Store::new();
            st.apply(Update::Reset(parsed(yaml)));
            st.mirrored_slices().count()
        };
        let skip = "endpointslice.kubernetes.io/skip-mirror";
        assert_eq!(count(&legacy("ext", &format!("{skip}: \"true\""))), 0);
        assert_eq!(count(&legacy("ext", &format!("{skip}: \"false\""))), 3);
        // A Service with a selector ignores its Endpoints.
        let with_selector = legacy("ext", "").replace(
            "  clusterIP: 10.96.0.20\n",
            "  clusterIP: 10.96.0.20\n  selector: {app: x}\n",
        );
        assert_eq!(count(&with_selector), 0);
        // No Service of that name: nothing.
        let other =
            legacy("ext", "").replacen("metadata: {name: ext}", "metadata: {name: other}", 1);
        assert_eq!(count(&other), 0);
        // A leader-election lock is never mirrored.
        let lock = legacy("ext", "").replace(
            "  name: ext\n  labels",
            "  name: ext\n  annotations: {control-plane.alpha.kubernetes.io/leader: x}\n  labels",
        );
        assert_eq!(count(&lock), 0);
    }

    #[test]
    fn legacy_endpoints_mirror_at_most_1000_addresses_per_subset() {
        let addrs: Vec<String> = (0..1200)
            .map(|i| format!("{{ip: 10.1.{}.{}}}", i / 250, i % 250 + 1))
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big}}\nspec:\n  clusterIP: 10.96.0.21\n  ports: [{{port: 80}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: big}}\nsubsets:\n- notReadyAddresses: [{{ip: 10.2.0.1}}]\n  addresses: [{}]\n  ports: [{{port: 80}}]\n",
            addrs.join(", ")
        );
        let mut st = Store::new();
        st.apply(Update::Reset(parsed(&yaml)));
        let s: Vec<_> = st.mirrored_slices().collect();
        assert_eq!(s.len(), 1);
        // Ready addresses first: the not-ready one is past the limit.
        assert_eq!(s[0].endpoints.len(), 1000);
        assert!(s[0].endpoints.iter().all(|e| e.ready));
        // Deleting the Endpoints object takes the endpoints away.
        st.apply(Update::Delete(
            Kind::Endpoints,
            ObjectKey::new("default", "big"),
        ));
        assert_eq!(st.mirrored_slices().count(), 0);
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

    /// A TCP readiness probe of port 8080, every second.
    fn tcp_probe() -> crate::model::Probe {
        use crate::model::ProbeAction;
        use std::time::Duration;
        crate::model::Probe {
            action: ProbeAction::Tcp {
                host: None,
                port: 8080,
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 1,
        }
    }

    /// A Pod with a readiness probe is not ready until the prober says so,
    /// whatever its file says; a reload of the same files keeps what was
    /// probed; a Pod created again starts not ready.
    #[test]
    fn probe_results_lay_over_pods_and_survive_a_reload() {
        use crate::discovery::Checked;
        let mut p = pod("a", "10.0.0.1", true);
        p.readiness_probes = vec![tcp_probe()];
        let all = || Update::Reset(vec![Object::Service(svc()), Object::Pod(p.clone())]);
        let mut st = Store::new();
        st.apply(all());
        assert!(endpoints(&st).is_empty(), "ready before its probe");
        let ready = Checked::PodReady {
            pod: p.key.clone(),
            container: 0,
            ready: true,
        };
        assert_eq!(st.apply(Update::Checked(ready)).other, 1);
        assert_eq!(endpoints(&st), vec!["10.0.0.1:8080"]);
        st.apply(all());
        assert_eq!(endpoints(&st), vec!["10.0.0.1:8080"], "lost on reload");
        st.apply(Update::Delete(Kind::Pod, p.key.clone()));
        st.apply(Update::Upsert(Box::new(Object::Pod(p.clone()))));
        assert!(endpoints(&st).is_empty(), "a new Pod kept the old result");
    }

    /// The prober's targets are the Pods with probes, as they change one
    /// by one and on a reset.
    #[test]
    fn probe_targets_follow_the_pods_with_probes() {
        let probed = |name: &str, ip: &str| {
            let mut p = pod(name, ip, true);
            p.readiness_probes = vec![tcp_probe()];
            p
        };
        let targets = |st: &Store| -> Vec<String> {
            st.probe_targets()
                .iter()
                .map(|t| t.pod.name.clone())
                .collect()
        };
        let upsert = |st: &mut Store, p: Pod| st.apply(Update::Upsert(Box::new(Object::Pod(p))));
        let mut st = Store::new();
        upsert(&mut st, probed("a", "10.0.0.1"));
        upsert(&mut st, pod("b", "10.0.0.2", true));
        assert_eq!(targets(&st), vec!["a"]);
        upsert(&mut st, probed("b", "10.0.0.2"));
        assert_eq!(targets(&st), vec!["a", "b"]);
        upsert(&mut st, pod("a", "10.0.0.1", true));
        assert_eq!(targets(&st), vec!["b"]);
        st.apply(Update::Delete(Kind::Pod, probed("b", "10.0.0.2").key));
        assert!(targets(&st).is_empty());
        st.apply(Update::Reset(vec![Object::Pod(probed("c", "10.0.0.3"))]));
        assert_eq!(targets(&st), vec!["c"]);
    }
}
