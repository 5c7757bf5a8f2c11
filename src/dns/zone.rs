//! The DNS view of the store, compiled beside each snapshot: every name of the
//! Kubernetes DNS-Based Service Discovery specification with its answers already
//! in wire format, so answering a query is one hash lookup and a copy.
//!
//! Records (zone `Z`, default `cluster.local`):
//! - `<svc>.<ns>.svc.Z` A/AAAA: the ClusterIPs; headless: every ready endpoint
//!   (every endpoint with `publishNotReadyAddresses`).
//! - headless `<hostname>.<svc>.<ns>.svc.Z` A/AAAA for endpoints with a hostname;
//!   `<a-b-c-d>.<svc>.<ns>.svc.Z` for those without (as CoreDNS).
//! - ExternalName: `<svc>.<ns>.svc.Z` CNAME `externalName`, for every type.
//! - `_<port>._<proto>.<svc>.<ns>.svc.Z` SRV for named ports: the Service name and
//!   port, or for headless Services one per endpoint naming it and its port,
//!   with the endpoints' addresses in the additional section when they fit.
//! - PTR for ClusterIPs and headless endpoint IPs.
//! - `dns-version.Z` TXT `1.1.0`; `Z` SOA.
//!
//! Every ancestor of a name inside the zone exists (empty non-terminals), so a
//! query for a missing type there is NODATA, and anything else in the zone is
//! NXDOMAIN; both carry the SOA in the authority section.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::{Name, RecordType};

use super::parts::{NameRecords, ZoneParts};
use crate::model::{AddressFamily, EndpointSlice, Protocol, Service, ServiceType};
use crate::sharded::Sharded;
use crate::state::Store;

/// Version of the Kubernetes DNS schema served at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// Compression pointer to the question's name (offset 12 of every message): each
/// precomputed answer names its owner this way, which keeps the client's spelling.
const OWNER_IS_QUESTION: [u8; 2] = [0xC0, 0x0C];
/// Class IN.
const CLASS_IN: u16 = 1;

/// What a zone is compiled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The cluster domain, fully qualified (`cluster.local.`).
    pub origin: Name,
    /// TTL of every answer, and of negative answers (SOA minimum).
    pub ttl: u32,
}

impl ZoneConfig {
    /// A config for `domain` (with or without the trailing dot).
    pub fn new(domain: &str, ttl: u32) -> Result<Self, ZoneError> {
        Ok(Self {
            origin: fqdn(domain)?,
            ttl,
        })
    }
}

/// A name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    /// Not a valid DNS name.
    #[error("{name:?} is not a valid DNS name: {reason}")]
    BadName {
        /// The text.
        name: String,
        /// The parser's reason.
        reason: String,
    },
}

/// Parses a fully qualified name (a trailing dot is added when missing).
pub fn fqdn(s: &str) -> Result<Name, ZoneError> {
    let text = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    let bad = |reason: String| ZoneError::BadName {
        name: s.to_string(),
        reason,
    };
    if text == "." || text.contains("..") || text.starts_with('.') {
        return Err(bad("empty label".to_string()));
    }
    let name = Name::from_ascii(&text).map_err(|e| bad(e.to_string()))?;
    if name.len() > 255 {
        return Err(bad("longer than 255 bytes".to_string()));
    }
    Ok(name)
}

/// Precomputed resource records of one type at one name: each record starts with
/// the pointer to the question's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrSet {
    /// Record type.
    pub rtype: RecordType,
    /// Each record, in wire format.
    pub records: Box<[Box<[u8]>]>,
    /// Records for the additional section, owner written out: the addresses of
    /// the targets of a headless Service's SRV records (as CoreDNS sends them).
    pub additional: Box<[Box<[u8]>]>,
}

/// One name of the zone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Record sets, by type. A CNAME set is alone.
    pub sets: Box<[RrSet]>,
}

impl Node {
    /// The set answering `qtype` (the CNAME answers every type).
    pub fn set(&self, qtype: RecordType) -> Option<&RrSet> {
        self.sets
            .iter()
            .find(|s| s.rtype == qtype || s.rtype == RecordType::CNAME)
    }
}

/// The compiled DNS view. Immutable once built; published with `ArcSwap`.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The cluster domain.
    pub origin: Name,
    /// Answer TTL.
    pub ttl: u32,
    /// Snapshot generation it was compiled with.
    pub generation: u64,
    /// Every name: those inside the zone and reverse (PTR) names. Shared
    /// with the next zone but for the shards a change touches.
    nodes: Sharded<Name, Arc<Node>>,
    /// The SOA record with its owner written out, for authority sections.
    soa: Box<[u8]>,
}

/// The lookup result for one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The name exists; the set of the type, if any (`None` is NODATA).
    Found(Option<&'a RrSet>, &'a Node),
    /// Inside the zone, but no such name.
    NxDomain,
    /// Not ours: refuse or forward.
    OutOfZone,
}

impl Zone {
    /// An empty zone (only the SOA and `dns-version`).
    pub fn empty(cfg: &ZoneConfig) -> Zone {
        ZoneParts::new(cfg).publish(0)
    }

    /// Compiles every Service of the store (and its endpoints, from slices and
    /// from Pods matching selectors) into a zone. The running server keeps a
    /// [`ZoneParts`] instead and updates it change by change.
    pub fn compile(store: &Store, cfg: &ZoneConfig, generation: u64) -> Zone {
        let mut parts = ZoneParts::new(cfg);
        parts.rebuild(store);
        parts.publish(generation)
    }

    /// A zone of `nodes` (see [`ZoneParts::publish`]).
    pub(super) fn from_parts(
        cfg: &ZoneConfig,
        generation: u64,
        nodes: Sharded<Name, Arc<Node>>,
        soa: Box<[u8]>,
    ) -> Zone {
        Zone {
            origin: cfg.origin.clone(),
            ttl: cfg.ttl,
            generation,
            nodes,
            soa,
        }
    }

    /// Finds `name` (case-insensitively).
    pub fn lookup(&self, name: &Name, qtype: RecordType) -> Lookup<'_> {
        match self.nodes.get(name) {
            Some(node) => Lookup::Found(node.set(qtype), node.as_ref()),
            None if self.origin.zone_of(name) => Lookup::NxDomain,
            None => Lookup::OutOfZone,
        }
    }

    /// Whether `name` is inside the cluster domain.
    pub fn contains(&self, name: &Name) -> bool {
        self.origin.zone_of(name)
    }

    /// The SOA record for authority sections.
    pub fn soa(&self) -> &[u8] {
        &self.soa
    }

    /// Every name with its node, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &Node)> {
        self.nodes.iter().map(|(n, node)| (n, node.as_ref()))
    }

    /// Number of names (with empty non-terminals).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the zone holds no name (never: the apex always exists).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Appends a name uncompressed.
pub(crate) fn put_name(out: &mut Vec<u8>, name: &Name) {
    for label in name.iter() {
        // Labels are at most 63 bytes (checked by hickory when the Name was built).
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// One record owned by the question's name.
fn record(rtype: RecordType, ttl: u32, rdata: &[u8]) -> Box<[u8]> {
    let mut out = Vec::with_capacity(12 + rdata.len());
    out.extend_from_slice(&OWNER_IS_QUESTION);
    put_record_tail(out, rtype, ttl, rdata)
}

/// One record with its owner name written out (for the additional section).
fn owned_record(owner: &Name, rtype: RecordType, ttl: u32, rdata: &[u8]) -> Box<[u8]> {
    let mut out = Vec::with_capacity(owner.len() + 12 + rdata.len());
    put_name(&mut out, owner);
    put_record_tail(out, rtype, ttl, rdata)
}

/// Appends what follows a record's owner name (type, class, TTL, rdata) to
/// `out`, which holds the owner, and returns the finished record.
fn put_record_tail(mut out: Vec<u8>, rtype: RecordType, ttl: u32, rdata: &[u8]) -> Box<[u8]> {
    put_u16(&mut out, u16::from(rtype));
    put_u16(&mut out, CLASS_IN);
    put_u32(&mut out, ttl);
    // rdata is built here from at most a few names: far below 64 KiB.
    put_u16(&mut out, rdata.len() as u16);
    out.extend_from_slice(rdata);
    out.into_boxed_slice()
}

fn name_rdata(name: &Name) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 2);
    put_name(&mut v, name);
    v
}

fn ip_rdata(ip: IpAddr) -> (RecordType, Vec<u8>) {
    match ip {
        IpAddr::V4(a) => (RecordType::A, a.octets().to_vec()),
        IpAddr::V6(a) => (RecordType::AAAA, a.octets().to_vec()),
    }
}

/// `4.3.2.1.in-addr.arpa.` / nibbles `.ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::with_capacity(73);
            for b in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

/// CoreDNS's name for an endpoint without a hostname: the address with dashes.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string().replace('.', "-"),
        IpAddr::V6(a) => a
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    }
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
    }
}

/// A headless endpoint as DNS sees it.
struct DnsEndpoint {
    ip: IpAddr,
    label: String,
    /// (port name, protocol) → number, from its slice.
    ports: Vec<(String, Protocol, u16)>,
}

/// Ready endpoints of a headless Service (all with publishNotReadyAddresses),
/// first occurrence of each IP, in address order.
fn headless_endpoints(svc: &Service, slices: &[&EndpointSlice]) -> Vec<DnsEndpoint> {
    let mut by_ip: BTreeMap<IpAddr, DnsEndpoint> = BTreeMap::new();
    for s in slices {
        for e in &s.endpoints {
            if AddressFamily::of(&e.ip) != s.family || !(e.ready || svc.publish_not_ready) {
                continue;
            }
            let ep = by_ip.entry(e.ip).or_insert_with(|| DnsEndpoint {
                ip: e.ip,
                label: e.hostname().map_or_else(|| dashed(e.ip), str::to_string),
                ports: Vec::new(),
            });
            for p in &s.ports {
                if let Some(n) = p.port {
                    if !ep
                        .ports
                        .iter()
                        .any(|(pn, pp, _)| *pn == p.name && *pp == p.protocol)
                    {
                        ep.ports.push((p.name.clone(), p.protocol, n));
                    }
                }
            }
        }
    }
    by_ip.into_values().collect()
}

/// Records being collected: name → type → records.
type Collected = HashMap<Name, BTreeMap<u16, Vec<Box<[u8]>>>>;

/// Collects the records of one Service (or of the zone's own names).
pub(super) struct Builder {
    origin: Name,
    ttl: u32,
    sets: Collected,
    /// Additional-section records by SRV owner name.
    additional: HashMap<Name, Vec<Box<[u8]>>>,
}

impl Builder {
    /// For a Service's records.
    pub(super) fn bare(cfg: &ZoneConfig) -> Self {
        Builder {
            origin: cfg.origin.clone(),
            ttl: cfg.ttl,
            sets: HashMap::new(),
            additional: HashMap::new(),
        }
    }

    /// For the zone's own names: the apex and `dns-version`.
    pub(super) fn new(cfg: &ZoneConfig) -> Self {
        let mut b = Builder::bare(cfg);
        b.node(cfg.origin.clone());
        if let Ok(v) = cfg.origin.prepend_label("dns-version") {
            let txt = SCHEMA_VERSION.as_bytes();
            let mut rdata = vec![txt.len() as u8];
            rdata.extend_from_slice(txt);
            b.add(v, RecordType::TXT, &rdata);
        }
        b
    }

    /// Makes `name` exist. Its ancestors inside the zone exist through it:
    /// [`ZoneParts`] counts them, so a Service's part does not hold them.
    fn node(&mut self, name: Name) {
        self.sets.entry(name).or_default();
    }

    fn add(&mut self, name: Name, rtype: RecordType, rdata: &[u8]) {
        let rr = record(rtype, self.ttl, rdata);
        let set = self
            .sets
            .entry(name)
            .or_default()
            .entry(u16::from(rtype))
            .or_default();
        if !set.contains(&rr) {
            set.push(rr);
        }
    }

    fn name(&self, text: &str) -> Option<Name> {
        match Name::from_ascii(text).and_then(|n| n.append_domain(&self.origin)) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::debug!("dns: skipping name {text:?}: {e}");
                None
            }
        }
    }

    /// Adds `svc`'s records, its endpoints from `slices`.
    pub(super) fn service(&mut self, svc: &Service, slices: &[&EndpointSlice]) {
        let Some(base) = self.name(&format!("{}.{}.svc", svc.key.name, svc.key.namespace)) else {
            return;
        };
        self.node(base.clone());
        if svc.service_type == ServiceType::ExternalName {
            if let Some(target) = svc.external_name.as_deref().and_then(|t| fqdn(t).ok()) {
                self.add(base, RecordType::CNAME, &name_rdata(&target));
            }
            return;
        }
        if svc.headless {
            let eps = headless_endpoints(svc, slices);
            for ep in &eps {
                let (rtype, rdata) = ip_rdata(ep.ip);
                self.add(base.clone(), rtype, &rdata);
                let Ok(host) = base.prepend_label(ep.label.as_str()) else {
                    continue;
                };
                self.add(host.clone(), rtype, &rdata);
                if let Ok(rev) = Name::from_ascii(reverse_name(ep.ip)) {
                    self.add(rev, RecordType::PTR, &name_rdata(&host));
                }
            }
            for sp in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                let Some(owner) = self.srv_owner(&sp.name, sp.protocol, &base) else {
                    continue;
                };
                let targets: Vec<(u16, Name, IpAddr)> = eps
                    .iter()
                    .filter_map(|ep| {
                        let port = ep
                            .ports
                            .iter()
                            .find(|(n, p, _)| *n == sp.name && *p == sp.protocol)?
                            .2;
                        Some((port, base.prepend_label(ep.label.as_str()).ok()?, ep.ip))
                    })
                    .collect();
                let weight = srv_weight(targets.len());
                self.node(owner.clone());
                for (port, target, ip) in targets {
                    self.add(owner.clone(), RecordType::SRV, &srv(weight, port, &target));
                    let (rtype, rdata) = ip_rdata(ip);
                    let extra = self.additional.entry(owner.clone()).or_default();
                    let rr = owned_record(&target, rtype, self.ttl, &rdata);
                    if !extra.contains(&rr) {
                        extra.push(rr);
                    }
                }
            }
            return;
        }
        for ip in &svc.cluster_ips {
            let (rtype, rdata) = ip_rdata(*ip);
            self.add(base.clone(), rtype, &rdata);
            if let Ok(rev) = Name::from_ascii(reverse_name(*ip)) {
                self.add(rev, RecordType::PTR, &name_rdata(&base));
            }
        }
        for sp in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            if let Some(owner) = self.srv_owner(&sp.name, sp.protocol, &base) {
                self.add(owner, RecordType::SRV, &srv(100, sp.port, &base));
            }
        }
    }

    fn srv_owner(&self, port: &str, proto: Protocol, base: &Name) -> Option<Name> {
        base.prepend_label(proto_label(proto))
            .and_then(|n| n.prepend_label(format!("_{port}").as_str()))
            .ok()
    }

    /// Every name collected, with its records.
    pub(super) fn into_names(self) -> HashMap<Name, NameRecords> {
        let mut additional = self.additional;
        self.sets
            .into_iter()
            .map(|(name, sets)| {
                let extra = additional.remove(&name).unwrap_or_default();
                (
                    name,
                    NameRecords {
                        sets,
                        additional: extra,
                    },
                )
            })
            .collect()
    }
}

/// The SOA of the zone with serial `generation`: as an answer (owned by
/// the question) and as the authority section's record (owner written out).
pub(super) fn soa(cfg: &ZoneConfig, generation: u64) -> (Box<[u8]>, Box<[u8]>) {
    let origin = &cfg.origin;
    let mut rdata = Vec::with_capacity(64);
    let mname = origin
        .prepend_label("dns")
        .and_then(|n| n.prepend_label("ns"));
    let rname = origin.prepend_label("hostmaster");
    put_name(&mut rdata, mname.as_ref().unwrap_or(origin));
    put_name(&mut rdata, rname.as_ref().unwrap_or(origin));
    // Serial: the generation (wrapping is allowed by RFC 1982 arithmetic).
    put_u32(&mut rdata, generation as u32);
    for v in [7200, 1800, 86400, cfg.ttl] {
        put_u32(&mut rdata, v);
    }
    (
        record(RecordType::SOA, cfg.ttl, &rdata),
        owned_record(origin, RecordType::SOA, cfg.ttl, &rdata),
    )
}

/// CoreDNS's SRV weight: 100 shared between the records.
fn srv_weight(n: usize) -> u16 {
    match n {
        0 => 100,
        n => (100 / n).max(1) as u16,
    }
}

fn srv(weight: u16, port: u16, target: &Name) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + target.len());
    put_u16(&mut v, 0);
    put_u16(&mut v, weight);
    put_u16(&mut v, port);
    put_name(&mut v, target);
    v
}
