//! Selector Services and the Pods they select (file mode), indexed both
//! ways, with each Service's derived EndpointSlices kept between changes.
//!
//! Deriving a Service's slices needs the Pods its selector matches, and a
//! Pod change needs the Services that select it. Scanning for either costs
//! O(Pods) or O(Services) of the namespace per Service or per Pod: at
//! 100,000 Services that is seconds per start and milliseconds per change.
//! Both indexes go through one label pair: a Pod is listed under each of
//! its labels, a Service under the first pair of its selector (every
//! matching Pod carries that pair), so each lookup costs what it finds.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{EndpointSlice, ObjectKey, Pod, Service};

/// A namespace and one label (`key`, `value`).
type Pair = (String, String, String);

/// See the module documentation.
#[derive(Debug, Default, Clone)]
pub(crate) struct Selection {
    /// The slices derived for each selector Service that has any.
    slices: BTreeMap<ObjectKey, Vec<EndpointSlice>>,
    /// Pods by namespace and label.
    pods: HashMap<Pair, BTreeSet<ObjectKey>>,
    /// Selector Services by namespace and the first pair of their selector.
    services: HashMap<Pair, BTreeSet<ObjectKey>>,
}

/// The pair a Service is listed under: `None` without a selector.
fn first_pair(svc: &Service) -> Option<Pair> {
    let sel = svc.selector.as_ref()?;
    // An empty selector never reaches the store (conversion makes it
    // `None`); listed under the empty pair, which every Pod is looked up
    // in too, it would still select every Pod of its namespace.
    let (k, v) = sel.iter().next().map_or(("", ""), |(k, v)| (k, v));
    Some((svc.key.namespace.clone(), k.to_string(), v.to_string()))
}

fn pairs(pod: &Pod) -> impl Iterator<Item = Pair> + '_ {
    pod.labels
        .iter()
        .map(|(k, v)| (pod.key.namespace.clone(), k.clone(), v.clone()))
}

fn unlist(index: &mut HashMap<Pair, BTreeSet<ObjectKey>>, pair: &Pair, key: &ObjectKey) {
    if let Some(keys) = index.get_mut(pair) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(pair);
        }
    }
}

impl Selection {
    /// Lists `pod` (call [`Selection::remove_pod`] with its old version
    /// first when it replaces one).
    pub fn add_pod(&mut self, pod: &Pod) {
        for p in pairs(pod) {
            self.pods.entry(p).or_default().insert(pod.key.clone());
        }
    }

    /// Unlists `pod`.
    pub fn remove_pod(&mut self, pod: &Pod) {
        for p in pairs(pod) {
            unlist(&mut self.pods, &p, &pod.key);
        }
    }

    /// Lists `svc` if it has a selector (call [`Selection::remove_service`]
    /// with its old version first when it replaces one).
    pub fn add_service(&mut self, svc: &Service) {
        if let Some(p) = first_pair(svc) {
            self.services.entry(p).or_default().insert(svc.key.clone());
        }
    }

    /// Unlists `svc` and forgets its slices.
    pub fn remove_service(&mut self, svc: &Service) {
        if let Some(p) = first_pair(svc) {
            unlist(&mut self.services, &p, &svc.key);
        }
        self.slices.remove(&svc.key);
    }

    /// The Pods that may match `svc`'s selector (those carrying its first
    /// pair; the caller matches the whole selector), by key.
    pub fn candidates<'a>(
        &self,
        svc: &Service,
        pods: &'a BTreeMap<ObjectKey, Pod>,
    ) -> Vec<&'a Pod> {
        match first_pair(svc) {
            None => Vec::new(),
            Some((ns, k, _)) if k.is_empty() => pods
                .range(ObjectKey::new(ns.as_str(), "")..)
                .take_while(|(key, _)| key.namespace == ns)
                .map(|(_, p)| p)
                .collect(),
            Some(pair) => self
                .pods
                .get(&pair)
                .into_iter()
                .flatten()
                .filter_map(|k| pods.get(k))
                .collect(),
        }
    }

    /// The selector Services that may select `pod` (those listed under one
    /// of its labels, or with an empty selector), by key.
    pub fn services_of(&self, pod: &Pod) -> BTreeSet<ObjectKey> {
        let ns = &pod.key.namespace;
        let empty = (ns.clone(), String::new(), String::new());
        pairs(pod)
            .chain(std::iter::once(empty))
            .filter_map(|p| self.services.get(&p))
            .flatten()
            .cloned()
            .collect()
    }

    /// Records `svc`'s derived slices (none: forgets it).
    pub fn set_slices(&mut self, svc: &ObjectKey, slices: Vec<EndpointSlice>) {
        if slices.is_empty() {
            self.slices.remove(svc);
        } else {
            self.slices.insert(svc.clone(), slices);
        }
    }

    /// `svc`'s derived slices.
    pub fn slices_of(&self, svc: &ObjectKey) -> &[EndpointSlice] {
        self.slices.get(svc).map_or(&[], Vec::as_slice)
    }

    /// Every derived slice, by Service.
    pub fn all_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.values().flatten()
    }

    /// Forgets every derived slice (the indexes stay).
    pub fn clear_slices(&mut self) {
        self.slices.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::builders::{labels, pod, service};

    fn selecting(name: &str, sel: &[(&str, &str)]) -> Service {
        Service {
            selector: Some(labels(sel)),
            ..service("default", name, &["10.96.0.1"], vec![])
        }
    }

    #[test]
    fn a_pod_finds_the_services_that_may_select_it_and_back() {
        let mut s = Selection::default();
        let web = selecting("web", &[("app", "web"), ("tier", "front")]);
        let db = selecting("db", &[("app", "db")]);
        let other_ns = Service {
            key: ObjectKey::new("other", "web"),
            ..web.clone()
        };
        for svc in [&web, &db, &other_ns] {
            s.add_service(svc);
        }
        let a = pod("default", "a", "10.0.0.1", labels(&[("app", "web")]));
        let b = pod("default", "b", "10.0.0.2", labels(&[("app", "db")]));
        let mut pods = BTreeMap::new();
        for p in [&a, &b] {
            s.add_pod(p);
            pods.insert(p.key.clone(), p.clone());
        }
        assert_eq!(
            s.services_of(&a).into_iter().collect::<Vec<_>>(),
            vec![web.key.clone()]
        );
        let of_web: Vec<&ObjectKey> = s.candidates(&web, &pods).iter().map(|p| &p.key).collect();
        assert_eq!(of_web, vec![&a.key]);
        // Relabelled: listed under its new labels only.
        s.remove_pod(&a);
        let a2 = pod("default", "a", "10.0.0.1", labels(&[("app", "db")]));
        s.add_pod(&a2);
        pods.insert(a2.key.clone(), a2.clone());
        assert!(s.candidates(&web, &pods).is_empty());
        assert_eq!(s.candidates(&db, &pods).len(), 2);
        assert_eq!(
            s.services_of(&a2).into_iter().collect::<Vec<_>>(),
            vec![db.key.clone()]
        );
        s.remove_service(&db);
        assert!(s.services_of(&a2).is_empty());
    }

    #[test]
    fn an_empty_selector_is_offered_every_pod_of_its_namespace() {
        let mut s = Selection::default();
        let all = selecting("all", &[]);
        s.add_service(&all);
        let a = pod("default", "a", "10.0.0.1", labels(&[("x", "y")]));
        let elsewhere = pod("other", "b", "10.0.0.2", labels(&[("x", "y")]));
        let mut pods = BTreeMap::new();
        for p in [&a, &elsewhere] {
            s.add_pod(p);
            pods.insert(p.key.clone(), p.clone());
        }
        assert!(s.services_of(&a).contains(&all.key));
        assert!(s.services_of(&elsewhere).is_empty());
        let found: Vec<&ObjectKey> = s.candidates(&all, &pods).iter().map(|p| &p.key).collect();
        assert_eq!(found, vec![&a.key]);
    }
}
