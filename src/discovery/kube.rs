//! The API source: Services, EndpointSlices and this Node watched on the
//! Kubernetes API with kube-rs, converted by [`super::convert`] and sent to the
//! store as the same [`Update`]s the file source sends.
//!
//! `kube_runtime::watcher` does the protocol work: list then watch from the
//! list's resourceVersion, bookmarks, a relist on `410 Gone`, a resumed watch
//! when the connection drops, and (with `default_backoff`) growing pauses while
//! the API server is unreachable. What this module adds is the [`Mirror`], a
//! pure state machine that:
//! - sends nothing until every watch has listed once, then one `Reset` (like
//!   kube-proxy, which programs nothing before its Service and EndpointSlice
//!   informers have synced), so a half-synced cluster is never served;
//! - turns a relist of one kind into upserts and deletes of that kind only;
//! - keeps an object's last good version when a new version fails validation;
//! - skips what kube-proxy's informers never see: Services and slices labelled
//!   `service.kubernetes.io/service-proxy-name` for another proxy, and slices
//!   labelled `service.kubernetes.io/headless` (kept when DNS needs them).
//!
//! While the API server is away nothing is sent, so the data plane keeps serving
//! the last snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use futures_util::stream::{self, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::convert::{self, ConvertError, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
use super::{print, Batch, Print, Update};
use crate::config::Limits;
use crate::model::{Kind, Object, ObjectKey};

/// EndpointSlice annotation: when the change that produced this version
/// happened (set by the EndpointSlice controller); the start of kube-proxy's
/// network programming latency.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The API source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// `--kubeconfig` could not be read or used.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The file given.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig and not in a cluster.
    #[error("no Kubernetes configuration found (give --kubeconfig, or run in a pod): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration (TLS, proxy, …).
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or inferred: `$KUBECONFIG` / `~/.kube/config`,
/// else the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Which labelled objects this proxy ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The `service-proxy-name` this proxy serves (other values are skipped).
    pub proxy_name: String,
    /// Keep EndpointSlices labelled headless (DNS answers from them).
    pub keep_headless: bool,
}

impl Filter {
    /// True when a Service or slice with these labels is none of our business.
    pub fn skips(&self, meta: &ObjectMeta, kind: Kind) -> bool {
        let Some(labels) = meta.labels.as_ref() else {
            return false;
        };
        if labels
            .get(LABEL_SERVICE_PROXY_NAME)
            .is_some_and(|p| *p != self.proxy_name)
        {
            return true;
        }
        kind == Kind::EndpointSlice && !self.keep_headless && labels.contains_key(LABEL_HEADLESS)
    }
}

/// One object of a watch event, converted: `Ok(None)` when filtered out.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Namespace (empty for Nodes) and name.
    pub key: ObjectKey,
    /// The model object, `None` when skipped, or why it is invalid.
    pub object: Result<Option<Object>, ConvertError>,
    /// The EndpointSlice's change trigger time, when annotated.
    pub trigger: Option<SystemTime>,
}

fn key_of(meta: &ObjectMeta, kind: Kind) -> ObjectKey {
    let namespace = match kind {
        Kind::Node => "",
        _ => meta.namespace.as_deref().unwrap_or("default"),
    };
    ObjectKey::new(namespace, meta.name.clone().unwrap_or_default())
}

/// Converts a Service.
pub fn service_item(svc: &core::Service, filter: &Filter, limits: &Limits) -> Item {
    Item {
        key: key_of(&svc.metadata, Kind::Service),
        object: if filter.skips(&svc.metadata, Kind::Service) {
            Ok(None)
        } else {
            convert::service(svc, limits).map(|s| Some(Object::Service(s)))
        },
        trigger: None,
    }
}

/// Converts an EndpointSlice, with its change trigger time.
pub fn slice_item(slice: &discovery::EndpointSlice, filter: &Filter) -> Item {
    let trigger = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(SystemTime::from);
    Item {
        key: key_of(&slice.metadata, Kind::EndpointSlice),
        object: if filter.skips(&slice.metadata, Kind::EndpointSlice) {
            Ok(None)
        } else {
            convert::endpoint_slice(slice).map(|s| Some(Object::EndpointSlice(s)))
        },
        trigger,
    }
}

/// Converts a Node.
pub fn node_item(node: &core::Node) -> Item {
    Item {
        key: key_of(&node.metadata, Kind::Node),
        object: convert::node(node).map(|n| Some(Object::Node(n))),
        trigger: None,
    }
}

/// A watch event with its object converted.
fn convert_event<K>(e: Event<K>, f: impl FnOnce(&K) -> Item) -> Event<Item> {
    match e {
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
        Event::InitApply(o) => Event::InitApply(f(&o)),
        Event::Apply(o) => Event::Apply(f(&o)),
        Event::Delete(o) => Event::Delete(f(&o)),
    }
}

/// What a [`Mirror`] step produced.
#[derive(Debug, Default, PartialEq)]
pub struct Output {
    /// Updates for the store, in order.
    pub updates: Vec<Update>,
    /// Service changes among them.
    pub services: u64,
    /// EndpointSlice changes among them.
    pub endpoints: u64,
    /// Change trigger times of the slices changed, for network programming latency.
    pub triggers: Vec<SystemTime>,
}

impl Output {
    fn push(&mut self, kind: Kind, update: Update, trigger: Option<SystemTime>) {
        match kind {
            Kind::Service => self.services += 1,
            Kind::EndpointSlice => self.endpoints += 1,
            // Never watched: in a cluster the EndpointSliceMirroring
            // controller mirrors Endpoints into slices, which are watched.
            Kind::Node | Kind::Pod | Kind::Endpoints => {}
        }
        self.triggers.extend(trigger);
        self.updates.push(update);
    }
}

/// What the mirror holds of one object of a kind.
#[derive(Debug, Clone)]
enum Held {
    /// Before the first `Reset`: the object itself, which that `Reset`
    /// carries (boxed: a map entry holding a print stays small), with its
    /// print, taken as it arrives: while the list is still arriving, not
    /// once it is complete and the Reset waits for them all.
    Object(Box<Object>, Print),
    /// Once the store has it: only a fingerprint of its converted form, to
    /// tell a changed version from a replayed one (a resumed watch, a
    /// relist). The source keeps no copy of what it sent: at 100,000
    /// Services that copy was as large as the store.
    Print(Print),
}

impl Held {
    /// The print of what is held.
    fn fingerprint(&self) -> Print {
        match self {
            Held::Object(_, p) | Held::Print(p) => *p,
        }
    }
}

#[derive(Debug, Default)]
struct KindState {
    current: BTreeMap<ObjectKey, Held>,
    /// Objects of a list in progress: once started, objects only where they
    /// differ from `current` (what the list's end sends), prints elsewhere.
    relist: Option<BTreeMap<ObjectKey, Held>>,
    /// Trigger times seen during the list in progress, by key.
    relist_triggers: BTreeMap<ObjectKey, SystemTime>,
    synced: bool,
}

/// The API's view of the three kinds, turned into store updates. Pure: watch
/// events in, updates out.
#[derive(Debug)]
pub struct Mirror {
    kinds: [KindState; 3],
    started: bool,
    /// Trigger times before this are from before we watched: not our latency.
    since: SystemTime,
}

/// The per-kind entry of a three-slot array (Services, slices, the Node).
fn slot<T>(slots: &mut [T; 3], kind: Kind) -> &mut T {
    let [services, slices, node] = slots;
    match kind {
        Kind::Service => services,
        Kind::EndpointSlice => slices,
        Kind::Node | Kind::Pod | Kind::Endpoints => node,
    }
}

fn warn_invalid(e: &ConvertError, kept: bool) {
    if kept {
        warn!("{e} (keeping its last good version)");
    } else {
        warn!("{e} (ignored)");
    }
}

impl Mirror {
    /// An empty mirror; trigger times before `since` are not reported.
    pub fn new(since: SystemTime) -> Self {
        Mirror {
            kinds: Default::default(),
            started: false,
            since,
        }
    }

    /// True once every kind has listed once and the first `Reset` was produced.
    pub fn started(&self) -> bool {
        self.started
    }

    fn trigger(&self, t: Option<SystemTime>) -> Option<SystemTime> {
        t.filter(|t| *t >= self.since)
    }

    /// Objects held whole (not as prints), over every kind.
    #[cfg(test)]
    fn objects_held(&self) -> usize {
        let whole = |m: &BTreeMap<ObjectKey, Held>| {
            m.values().filter(|h| matches!(h, Held::Object(..))).count()
        };
        self.kinds
            .iter()
            .map(|k| whole(&k.current) + k.relist.as_ref().map_or(0, whole))
            .sum()
    }

    /// Applies one watch event of `kind`.
    pub fn step(&mut self, kind: Kind, event: Event<Item>) -> Output {
        let mut out = Output::default();
        let started = self.started;
        match event {
            Event::Init => {
                let k = slot(&mut self.kinds, kind);
                k.relist = Some(BTreeMap::new());
                k.relist_triggers.clear();
            }
            Event::InitApply(item) => {
                let trigger = self.trigger(item.trigger);
                let k = slot(&mut self.kinds, kind);
                let relist = k.relist.get_or_insert_with(BTreeMap::new);
                match item.object {
                    Ok(Some(o)) => {
                        // Once started, an unchanged object is kept as its
                        // print alone: the list's end sends nothing for it.
                        let p = print(&o);
                        let held = match k.current.get(&item.key) {
                            Some(Held::Print(q)) if *q == p => Held::Print(p),
                            _ => Held::Object(Box::new(o), p),
                        };
                        relist.insert(item.key.clone(), held);
                        if let Some(t) = trigger {
                            k.relist_triggers.insert(item.key, t);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let old = k.current.get(&item.key).cloned();
                        warn_invalid(&e, old.is_some());
                        if let Some(o) = old {
                            relist.insert(item.key, o);
                        }
                    }
                }
            }
            Event::InitDone => {
                let k = slot(&mut self.kinds, kind);
                let mut listed = k.relist.take().unwrap_or_default();
                let mut triggers = std::mem::take(&mut k.relist_triggers);
                k.synced = true;
                if started {
                    for (key, held) in &mut listed {
                        let Held::Object(_, p) = held else { continue };
                        let p = *p;
                        let sent = matches!(k.current.get(key), Some(Held::Print(q)) if *q == p);
                        if let Held::Object(o, _) = std::mem::replace(held, Held::Print(p)) {
                            if !sent {
                                let t = triggers.remove(key);
                                out.push(kind, Update::Upsert(o), t);
                            }
                        }
                    }
                    for key in k.current.keys() {
                        if !listed.contains_key(key) {
                            out.push(kind, Update::Delete(kind, key.clone()), None);
                        }
                    }
                }
                k.current = listed;
                if !started && self.kinds.iter().all(|k| k.synced) {
                    self.started = true;
                    let mut all = Vec::new();
                    for (i, k) in self.kinds.iter_mut().enumerate() {
                        let n = k.current.len() as u64;
                        match i {
                            0 => out.services += n,
                            1 => out.endpoints += n,
                            _ => {}
                        }
                        // The objects move into the Reset; the mirror keeps
                        // their prints.
                        for held in k.current.values_mut() {
                            let p = held.fingerprint();
                            if let Held::Object(o, _) = std::mem::replace(held, Held::Print(p)) {
                                all.push(*o);
                            }
                        }
                    }
                    out.updates.push(Update::Reset(all));
                }
            }
            Event::Apply(item) => {
                let trigger = self.trigger(item.trigger);
                let k = slot(&mut self.kinds, kind);
                match item.object {
                    Ok(Some(o)) => {
                        let p = print(&o);
                        if k.current.get(&item.key).map(Held::fingerprint) != Some(p) {
                            if started {
                                k.current.insert(item.key, Held::Print(p));
                                out.push(kind, Update::Upsert(Box::new(o)), trigger);
                            } else {
                                k.current.insert(item.key, Held::Object(Box::new(o), p));
                            }
                        }
                    }
                    // Newly labelled for another proxy: gone for us.
                    Ok(None) => {
                        if k.current.remove(&item.key).is_some() && started {
                            out.push(kind, Update::Delete(kind, item.key), None);
                        }
                    }
                    Err(e) => warn_invalid(&e, k.current.contains_key(&item.key)),
                }
            }
            Event::Delete(item) => {
                let k = slot(&mut self.kinds, kind);
                if k.current.remove(&item.key).is_some() && started {
                    out.push(kind, Update::Delete(kind, item.key), None);
                }
            }
        }
        out
    }
}

/// The running API source.
pub struct KubeSource {
    client: Client,
    node_name: String,
    filter: Filter,
    limits: Limits,
}

impl KubeSource {
    /// A source on `client` for node `node_name`.
    pub fn new(client: Client, node_name: String, filter: Filter, limits: Limits) -> Self {
        KubeSource {
            client,
            node_name,
            filter,
            limits,
        }
    }

    /// Watches until `tx` closes. Never returns on API errors: the watchers
    /// back off and resume, and the store keeps what it has.
    pub async fn run(self, tx: mpsc::Sender<Batch>) {
        // Informer-style lists (resourceVersion=0: served from the API
        // server's cache), bookmarks on, client-go-like backoff on errors.
        let cfg = watcher::Config::default().any_semantic();
        let node_cfg = cfg
            .clone()
            .fields(&format!("metadata.name={}", self.node_name));
        let (filter, limits) = (self.filter.clone(), self.limits.clone());
        let services =
            watcher::watcher(Api::<core::Service>::all(self.client.clone()), cfg.clone())
                .default_backoff()
                .map(move |r| {
                    (
                        Kind::Service,
                        r.map(|e| convert_event(e, |s| service_item(s, &filter, &limits))),
                    )
                });
        let filter = self.filter.clone();
        let slices = watcher::watcher(
            Api::<discovery::EndpointSlice>::all(self.client.clone()),
            cfg,
        )
        .default_backoff()
        .map(move |r| {
            (
                Kind::EndpointSlice,
                r.map(|e| convert_event(e, |s| slice_item(s, &filter))),
            )
        });
        let nodes = watcher::watcher(Api::<core::Node>::all(self.client.clone()), node_cfg)
            .default_backoff()
            .map(|r| (Kind::Node, r.map(|e| convert_event(e, node_item))));
        let mut events = std::pin::pin!(stream::select(services, stream::select(slices, nodes)));
        let mut mirror = Mirror::new(SystemTime::now());
        let mut failing = [false; 3];
        while let Some((kind, r)) = events.next().await {
            let ev = match r {
                Ok(ev) => {
                    if std::mem::take(slot(&mut failing, kind)) {
                        info!(kind = convert::kind_name(kind), "watch resumed");
                    }
                    ev
                }
                Err(e) => {
                    // Logged once per outage and kind; the backoff paces retries.
                    if !std::mem::replace(slot(&mut failing, kind), true) {
                        warn!(kind = convert::kind_name(kind), error = %e, "watch failed; serving the last state while retrying");
                    }
                    continue;
                }
            };
            let was_started = mirror.started();
            if !was_started && matches!(ev, Event::InitDone) {
                // Where start-up time goes: each kind's first list, apart.
                info!(kind = convert::kind_name(kind), "listed");
            }
            let out = mirror.step(kind, ev);
            if !was_started && mirror.started() {
                info!(
                    services = out.services,
                    endpoint_slices = out.endpoints,
                    "initial list complete"
                );
            }
            if out.updates.is_empty() {
                continue;
            }
            let batch = Batch {
                updates: out.updates,
                queued: SystemTime::now(),
                triggers: out.triggers,
            };
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;
    use std::time::Duration;

    use super::*;

    fn filter() -> Filter {
        Filter {
            proxy_name: "ringvip".into(),
            keep_headless: false,
        }
    }

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Map<_, _>>(),
            ),
            ..ObjectMeta::default()
        }
    }

    fn svc(name: &str, port: i32, labels: &[(&str, &str)]) -> core::Service {
        core::Service {
            metadata: meta("default", name, labels),
            spec: Some(core::ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                ports: Some(vec![core::ServicePort {
                    port,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(name: &str, ip: &str, labels: &[(&str, &str)]) -> discovery::EndpointSlice {
        let mut l = vec![("kubernetes.io/service-name", "web")];
        l.extend_from_slice(labels);
        discovery::EndpointSlice {
            metadata: meta("default", name, &l),
            address_type: "IPv4".into(),
            endpoints: vec![discovery::Endpoint {
                addresses: vec![ip.into()],
                ..Default::default()
            }],
            ports: None,
        }
    }

    fn node(deleting: bool) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                deletion_timestamp: deleting.then_some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn s(name: &str, port: i32) -> Item {
        service_item(&svc(name, port, &[]), &filter(), &Limits::default())
    }

    fn e(name: &str, ip: &str) -> Item {
        slice_item(&slice(name, ip, &[]), &filter())
    }

    /// Lists every kind once: Init, the items, InitDone.
    fn list(m: &mut Mirror, kind: Kind, items: Vec<Item>) -> Output {
        let mut out = m.step(kind, Event::Init);
        for i in items {
            let o = m.step(kind, Event::InitApply(i));
            out.updates.extend(o.updates);
        }
        let o = m.step(kind, Event::InitDone);
        out.updates.extend(o.updates);
        out.services += o.services;
        out.endpoints += o.endpoints;
        out
    }

    fn names(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Reset(all) => format!(
                    "reset[{}]",
                    all.iter()
                        .map(|o| o.id().1.name)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Update::Upsert(o) => format!("upsert {}", o.id().1.name),
                Update::Delete(_, k) => format!("delete {}", k.name),
                Update::Checked(c) => format!("{c:?}"),
            })
            .collect()
    }

    #[test]
    fn nothing_is_sent_until_every_kind_listed_once() {
        let mut m = Mirror::new(SystemTime::UNIX_EPOCH);
        assert!(list(&mut m, Kind::Service, vec![s("web", 80)])
            .updates
            .is_empty());
        // Watch events of a synced kind before the others are held back too.
        assert!(m
            .step(Kind::Service, Event::Apply(s("api", 81)))
            .updates
            .is_empty());
        assert!(list(&mut m, Kind::Node, vec![node_item(&node(false))])
            .updates
            .is_empty());
        assert!(!m.started());
        let out = list(&mut m, Kind::EndpointSlice, vec![e("web-1", "10.0.0.1")]);
        assert!(m.started());
        assert_eq!(names(&out.updates), vec!["reset[api,web,web-1,n1]"]);
        assert_eq!((out.services, out.endpoints), (2, 1));
    }

    fn started() -> Mirror {
        let mut m = Mirror::new(SystemTime::UNIX_EPOCH);
        list(&mut m, Kind::Service, vec![s("a", 80), s("b", 80)]);
        list(&mut m, Kind::Node, vec![]);
        list(&mut m, Kind::EndpointSlice, vec![e("a-1", "10.0.0.1")]);
        m
    }

    #[test]
    fn watch_events_become_upserts_and_deletes() {
        let mut m = started();
        let out = m.step(Kind::Service, Event::Apply(s("a", 81)));
        assert_eq!(names(&out.updates), vec!["upsert a"]);
        assert_eq!(out.services, 1);
        // The same version again (a resumed watch replays it): nothing.
        assert!(m
            .step(Kind::Service, Event::Apply(s("a", 81)))
            .updates
            .is_empty());
        let out = m.step(Kind::EndpointSlice, Event::Delete(e("a-1", "10.0.0.1")));
        assert_eq!(names(&out.updates), vec!["delete a-1"]);
        assert_eq!(out.endpoints, 1);
        // Deleting what we never had: nothing.
        assert!(m
            .step(Kind::EndpointSlice, Event::Delete(e("zz", "10.0.0.9")))
            .updates
            .is_empty());
    }

    #[test]
    fn a_relist_touches_only_its_own_kind_and_only_what_changed() {
        let mut m = started();
        // After a 410: the Services are listed again; "a" changed, "b" is
        // gone, "c" is new. Slices and the Node are left alone.
        let out = list(&mut m, Kind::Service, vec![s("a", 90), s("c", 80)]);
        let mut got = names(&out.updates);
        got.sort();
        assert_eq!(got, vec!["delete b", "upsert a", "upsert c"]);
        assert_eq!(out.services, 3);
        // Relisting the same again changes nothing.
        assert!(list(&mut m, Kind::Service, vec![s("a", 90), s("c", 80)])
            .updates
            .is_empty());
    }

    #[test]
    fn an_invalid_version_keeps_the_last_good_one() {
        let mut m = started();
        let bad = s("a", 70000);
        assert!(bad.object.is_err());
        assert!(m
            .step(Kind::Service, Event::Apply(bad.clone()))
            .updates
            .is_empty());
        // Also across a relist: "a" stays as it was, not deleted.
        let out = list(&mut m, Kind::Service, vec![bad, s("b", 80)]);
        assert!(out.updates.is_empty(), "{:?}", names(&out.updates));
        // A new object that is invalid is ignored.
        assert!(m
            .step(Kind::Service, Event::Apply(s("new", 0)))
            .updates
            .is_empty());
    }

    #[test]
    fn labels_for_other_proxies_and_headless_slices_are_skipped() {
        let f = filter();
        let other = [(LABEL_SERVICE_PROXY_NAME, "cilium")];
        let mine = [(LABEL_SERVICE_PROXY_NAME, "ringvip")];
        let headless = [(LABEL_HEADLESS, "")];
        let limits = Limits::default();
        assert_eq!(
            service_item(&svc("x", 80, &other), &f, &limits).object,
            Ok(None)
        );
        assert!(matches!(
            service_item(&svc("x", 80, &mine), &f, &limits).object,
            Ok(Some(_))
        ));
        assert_eq!(
            slice_item(&slice("x", "10.0.0.1", &other), &f).object,
            Ok(None)
        );
        assert_eq!(
            slice_item(&slice("x", "10.0.0.1", &headless), &f).object,
            Ok(None)
        );
        // Headless Services themselves stay (DNS); their slices only with DNS on.
        assert!(matches!(
            service_item(&svc("x", 80, &headless), &f, &limits).object,
            Ok(Some(_))
        ));
        let dns = Filter {
            keep_headless: true,
            ..f
        };
        assert!(matches!(
            slice_item(&slice("x", "10.0.0.1", &headless), &dns).object,
            Ok(Some(_))
        ));

        // A Service relabelled for another proxy disappears.
        let mut m = started();
        let out = m.step(
            Kind::Service,
            Event::Apply(service_item(&svc("a", 80, &other), &filter(), &limits)),
        );
        assert_eq!(names(&out.updates), vec!["delete a"]);
    }

    #[test]
    fn trigger_times_after_the_start_are_reported() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut m = Mirror::new(start);
        list(&mut m, Kind::Service, vec![]);
        list(&mut m, Kind::Node, vec![]);
        list(&mut m, Kind::EndpointSlice, vec![]);
        let with_trigger = |t: &str| {
            let mut sl = slice("w-1", "10.0.0.1", &[]);
            sl.metadata.annotations =
                Some([(ANNOTATION_TRIGGER_TIME.to_string(), t.to_string())].into());
            slice_item(&sl, &filter())
        };
        // Before the source started: not ours to measure.
        let out = m.step(
            Kind::EndpointSlice,
            Event::Apply(with_trigger("2020-01-01T00:00:00Z")),
        );
        assert_eq!(out.updates.len(), 1);
        assert!(out.triggers.is_empty());
        let out = m.step(
            Kind::EndpointSlice,
            Event::Apply({
                let mut i = with_trigger("2023-11-14T22:13:21.5Z");
                i.object = e("w-1", "10.0.0.2").object;
                i
            }),
        );
        assert_eq!(out.triggers, vec![start + Duration::from_millis(1500)]);
    }

    /// Once the store has the objects, the source keeps only their prints:
    /// what it sent is not held twice, and changes are still told from
    /// replays.
    #[test]
    fn the_mirror_keeps_no_copy_of_what_it_sent() {
        let mut m = Mirror::new(SystemTime::UNIX_EPOCH);
        list(&mut m, Kind::Service, vec![s("a", 80), s("b", 80)]);
        list(&mut m, Kind::Node, vec![]);
        assert_eq!(m.objects_held(), 2, "held until every kind listed");
        list(&mut m, Kind::EndpointSlice, vec![e("a-1", "10.0.0.1")]);
        assert_eq!(m.objects_held(), 0);
        assert_eq!(
            names(&m.step(Kind::Service, Event::Apply(s("a", 81))).updates),
            vec!["upsert a"]
        );
        assert!(m
            .step(Kind::Service, Event::Apply(s("a", 81)))
            .updates
            .is_empty());
        assert_eq!(m.objects_held(), 0);
        // A relist sends only what differs from what was sent.
        let out = list(&mut m, Kind::Service, vec![s("a", 81), s("b", 82)]);
        assert_eq!(names(&out.updates), vec!["upsert b"]);
        assert_eq!(m.objects_held(), 0);
    }

    #[test]
    fn node_deletion_is_carried() {
        let mut m = started();
        let out = m.step(Kind::Node, Event::Apply(node_item(&node(true))));
        let [Update::Upsert(o)] = out.updates.as_slice() else {
            panic!("{:?}", out.updates)
        };
        assert!(matches!(&**o, Object::Node(n) if n.deleting));
    }
}
