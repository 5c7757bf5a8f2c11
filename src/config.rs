//! Process settings: from flags and an optional YAML settings file, validated once
//! at start-up. Everything here is fixed for the life of the process.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// What manifest validation needs from the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Allowed `nodePort` / `healthCheckNodePort` values (kube-apiserver's
    /// `--service-node-port-range`, default 30000-32767).
    pub node_port_range: RangeInclusive<u16>,
    /// Every ClusterIP must be inside one of these.
    pub service_cidrs: Vec<IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            node_port_range: 30000..=32767,
            service_cidrs: default_service_cidrs(),
        }
    }
}

/// Kubernetes' defaults (kubeadm's IPv4 range, kind's IPv6 range).
pub fn default_service_cidrs() -> Vec<IpNet> {
    vec![
        IpNet::V4(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(10, 96, 0, 0),
            12,
        )),
        IpNet::V6(ipnet::Ipv6Net::new_assert(
            std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0),
            112,
        )),
    ]
}

/// The settings file (`--config FILE`): the same names as the flags.
/// Flags given on the command line win over the file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SettingsFile {
    /// Manifest files or directories.
    pub manifests: Option<Vec<PathBuf>>,
    /// This node's name.
    pub node_name: Option<String>,
    /// This node's zone (overrides the Node object's label).
    pub zone: Option<String>,
    /// CIDRs selecting the local addresses NodePorts listen on.
    pub nodeport_addresses: Option<Vec<IpNet>>,
    /// Data-plane threads.
    pub workers: Option<usize>,
    /// `/healthz` and `/livez` address.
    pub health_addr: Option<SocketAddr>,
    /// `/metrics` address.
    pub metrics_addr: Option<SocketAddr>,
    /// `nodePort` range, `LOW-HIGH`.
    pub node_port_range: Option<String>,
    /// Service CIDRs.
    pub service_cidrs: Option<Vec<IpNet>>,
    /// `service.kubernetes.io/service-proxy-name` value this proxy serves.
    pub proxy_name: Option<String>,
    /// Backend connect timeout of the first try, milliseconds.
    pub connect_timeout_ms: Option<u64>,
    /// Backend connect tries per client connection.
    pub connect_attempts: Option<u32>,
    /// UDP flow idle timeout, seconds.
    pub udp_idle_timeout_secs: Option<u64>,
    /// Health timeout: an update queued longer than this makes `/healthz` 503, seconds.
    pub health_timeout_secs: Option<u64>,
    /// TUN device capturing the service CIDRs.
    pub tun: Option<String>,
    /// Run without a TUN device (no ClusterIP capture).
    pub no_tun: Option<bool>,
    /// MTU of the TUN device.
    pub tun_mtu: Option<u32>,
    /// TUN queues, one data-plane thread each.
    pub tun_queues: Option<usize>,
    /// TCP connections through the TUN at most (new SYNs beyond are dropped).
    pub tun_max_connections: Option<usize>,
    /// On SIGTERM, how long established connections may finish, seconds.
    pub drain_timeout_secs: Option<u64>,
    /// UDP flows through the TUN at most.
    pub tun_max_udp_flows: Option<usize>,
    /// DNS responder address (UDP and TCP); off when absent.
    pub dns_addr: Option<SocketAddr>,
    /// Cluster domain the DNS responder is authoritative for.
    pub cluster_domain: Option<String>,
    /// Where out-of-zone DNS queries are forwarded.
    pub dns_upstream: Option<SocketAddr>,
    /// TTL of DNS answers, seconds.
    pub dns_ttl: Option<u32>,
    /// TCP connections at most, over every front end (0: unlimited).
    pub max_connections: Option<usize>,
    /// TCP connections at most per frontend (0: unlimited).
    pub max_connections_per_frontend: Option<usize>,
    /// TCP relay idle timeout, seconds (0: never).
    pub tcp_idle_timeout_secs: Option<u64>,
    /// Watch the Kubernetes API instead of manifests.
    pub kube: Option<bool>,
    /// Kubeconfig for `kube` (default: `$KUBECONFIG` / `~/.kube/config`, else in-cluster).
    pub kubeconfig: Option<PathBuf>,
}

/// Validated process settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Manifest files or directories.
    pub manifests: Vec<PathBuf>,
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// This node's zone, if known without a Node object.
    pub zone: Option<String>,
    /// CIDRs selecting NodePort addresses; empty means all non-loopback addresses.
    pub nodeport_addresses: Vec<IpNet>,
    /// Data-plane threads.
    pub workers: usize,
    /// `/healthz` and `/livez` address.
    pub health_addr: SocketAddr,
    /// `/metrics` address.
    pub metrics_addr: SocketAddr,
    /// Validation limits (nodePort range, service CIDRs).
    pub limits: Limits,
    /// Proxy name for the service-proxy-name label.
    pub proxy_name: String,
    /// First connect try's timeout; each retry doubles it.
    pub connect_timeout: Duration,
    /// Connect tries per client connection (kube-proxy userspace: 4).
    pub connect_attempts: u32,
    /// UDP flow idle timeout.
    pub udp_idle_timeout: Duration,
    /// Health timeout for `/healthz` and `/livez`.
    pub health_timeout: Duration,
    /// TUN device capturing the service CIDRs; `None` runs without one.
    pub tun: Option<String>,
    /// MTU of the TUN device: large segments from local clients cost one
    /// read each instead of dozens.
    pub tun_mtu: u32,
    /// TUN queues (`IFF_MULTI_QUEUE`), each with its own thread and smoltcp
    /// stack; the kernel keeps a flow on one queue. Default: one per core.
    pub tun_queues: usize,
    /// TCP connections through the TUN at most; SYN floods stop here.
    pub tun_max_connections: usize,
    /// On SIGTERM, how long established connections may finish (a pod's
    /// default grace period).
    pub drain_timeout: Duration,
    /// UDP flows through the TUN at most.
    pub tun_max_udp_flows: usize,
    /// DNS responder address (UDP and TCP); `None` turns DNS off.
    pub dns_addr: Option<SocketAddr>,
    /// Cluster domain (`cluster.local`), validated as a DNS name.
    pub cluster_domain: String,
    /// Upstream for names outside the cluster domain; `None` answers REFUSED.
    pub dns_upstream: Option<SocketAddr>,
    /// TTL of DNS answers and negative answers, seconds (CoreDNS default 5).
    pub dns_ttl: u32,
    /// TCP connections at most, over every front end; new ones beyond are
    /// refused (0: unlimited).
    pub max_connections: usize,
    /// TCP connections at most per frontend (0: unlimited).
    pub max_connections_per_frontend: usize,
    /// A TCP relay with no bytes either way this long is closed, both sides
    /// (zero: never). Default 1 h, HAProxy's usual `timeout tunnel`: longer
    /// than IPVS's 900 s because a proxy's sockets never see TCP keepalive
    /// probes (the kernel answers them), so keepalive-only connections look idle.
    pub tcp_idle_timeout: Duration,
    /// Objects come from the Kubernetes API (watch) instead of manifests.
    pub kube: bool,
    /// Kubeconfig for the API source; `None` infers (kubeconfig, else in-cluster).
    pub kubeconfig: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            manifests: Vec::new(),
            node_name: default_node_name(),
            zone: None,
            nodeport_addresses: Vec::new(),
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            health_addr: SocketAddr::from(([127, 0, 0, 1], 10256)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 10249)),
            limits: Limits::default(),
            proxy_name: "ringvip".to_string(),
            connect_timeout: Duration::from_millis(250),
            connect_attempts: 4,
            udp_idle_timeout: Duration::from_secs(30),
            health_timeout: Duration::from_secs(60),
            tun: Some("ringvip0".to_string()),
            tun_mtu: 65_535,
            tun_queues: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            tun_max_connections: 65_536,
            drain_timeout: Duration::from_secs(30),
            tun_max_udp_flows: 65_536,
            dns_addr: None,
            cluster_domain: "cluster.local".to_string(),
            dns_upstream: None,
            dns_ttl: 5,
            max_connections: 0,
            max_connections_per_frontend: 0,
            tcp_idle_timeout: Duration::from_secs(3600),
            kube: false,
            kubeconfig: None,
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// `node-port-range` is not `LOW-HIGH` with LOW <= HIGH.
    #[error("node-port-range {0:?}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535")]
    NodePortRange(String),
    /// `workers` is 0 or absurd.
    #[error("workers {0}: expected 1..=1024")]
    Workers(usize),
    /// A timeout or count is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// No service CIDR.
    #[error("service-cidrs must name at least one CIDR")]
    NoServiceCidr,
    /// More TUN queues than the kernel allows (256), or none.
    #[error("tun-queues {0}: expected 1..=256")]
    TunQueues(usize),
    /// MTU outside what IPv6 and the TUN allow.
    #[error("tun-mtu {0}: expected 1280..=65535")]
    TunMtu(u32),
    /// Not a Linux interface name.
    #[error("tun {0:?}: expected 1 to 15 characters without '/' or spaces")]
    TunName(String),
    /// The cluster domain is not a DNS name.
    #[error("cluster-domain: {0}")]
    ClusterDomain(String),
    /// DNS TTL out of range.
    #[error("dns-ttl {0}: expected 0..=3600")]
    DnsTtl(u32),
    /// Both sources at once: a manifest reload would replace the API's objects.
    #[error("kube and manifests are exclusive: give one source of objects")]
    TwoSources,
    /// A kubeconfig without the API source.
    #[error("kubeconfig is only used with kube")]
    KubeconfigWithoutKube,
}

/// Parses `LOW-HIGH`.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, SettingsError> {
    let err = || SettingsError::NodePortRange(s.to_string());
    let (lo, hi) = s.split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo == 0 || lo > hi {
        return Err(err());
    }
    Ok(lo..=hi)
}

impl Settings {
    /// Applies a settings file over the defaults (flags are applied after, by the caller).
    pub fn apply_file(&mut self, f: SettingsFile) -> Result<(), SettingsError> {
        if let Some(v) = f.manifests {
            self.manifests = v;
        }
        if let Some(v) = f.node_name {
            self.node_name = v;
        }
        if f.zone.is_some() {
            self.zone = f.zone;
        }
        if let Some(v) = f.nodeport_addresses {
            self.nodeport_addresses = v;
        }
        if let Some(v) = f.workers {
            self.workers = v;
        }
        if let Some(v) = f.health_addr {
            self.health_addr = v;
        }
        if let Some(v) = f.metrics_addr {
            self.metrics_addr = v;
        }
        if let Some(v) = f.node_port_range {
            self.limits.node_port_range = parse_port_range(&v)?;
        }
        if let Some(v) = f.service_cidrs {
            self.limits.service_cidrs = v;
        }
        if let Some(v) = f.proxy_name {
            self.proxy_name = v;
        }
        if let Some(v) = f.connect_timeout_ms {
            self.connect_timeout = Duration::from_millis(v);
        }
        if let Some(v) = f.connect_attempts {
            self.connect_attempts = v;
        }
        if let Some(v) = f.udp_idle_timeout_secs {
            self.udp_idle_timeout = Duration::from_secs(v);
        }
        if let Some(v) = f.health_timeout_secs {
            self.health_timeout = Duration::from_secs(v);
        }
        if f.tun.is_some() {
            self.tun = f.tun;
        }
        if f.no_tun == Some(true) {
            self.tun = None;
        }
        if let Some(v) = f.tun_mtu {
            self.tun_mtu = v;
        }
        if let Some(v) = f.tun_queues {
            self.tun_queues = v;
        }
        if let Some(v) = f.tun_max_connections {
            self.tun_max_connections = v;
        }
        if let Some(v) = f.drain_timeout_secs {
            self.drain_timeout = Duration::from_secs(v);
        }
        if let Some(v) = f.tun_max_udp_flows {
            self.tun_max_udp_flows = v;
        }
        if f.dns_addr.is_some() {
            self.dns_addr = f.dns_addr;
        }
        if let Some(v) = f.cluster_domain {
            self.cluster_domain = v;
        }
        if f.dns_upstream.is_some() {
            self.dns_upstream = f.dns_upstream;
        }
        if let Some(v) = f.dns_ttl {
            self.dns_ttl = v;
        }
        if let Some(v) = f.max_connections {
            self.max_connections = v;
        }
        if let Some(v) = f.max_connections_per_frontend {
            self.max_connections_per_frontend = v;
        }
        if let Some(v) = f.tcp_idle_timeout_secs {
            self.tcp_idle_timeout = Duration::from_secs(v);
        }
        if let Some(v) = f.kube {
            self.kube = v;
        }
        if f.kubeconfig.is_some() {
            self.kubeconfig = f.kubeconfig;
        }
        Ok(())
    }

    /// Checks the combination once, at start-up.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(SettingsError::Workers(self.workers));
        }
        if self.connect_timeout.is_zero() {
            return Err(SettingsError::Zero("connect-timeout-ms"));
        }
        if self.connect_attempts == 0 {
            return Err(SettingsError::Zero("connect-attempts"));
        }
        if self.udp_idle_timeout.is_zero() {
            return Err(SettingsError::Zero("udp-idle-timeout-secs"));
        }
        if self.health_timeout.is_zero() {
            return Err(SettingsError::Zero("health-timeout-secs"));
        }
        if self.limits.service_cidrs.is_empty() {
            return Err(SettingsError::NoServiceCidr);
        }
        if let Err(e) = crate::dns::zone::fqdn(&self.cluster_domain) {
            return Err(SettingsError::ClusterDomain(e.to_string()));
        }
        if self.dns_ttl > 3600 {
            return Err(SettingsError::DnsTtl(self.dns_ttl));
        }
        if self.kube && !self.manifests.is_empty() {
            return Err(SettingsError::TwoSources);
        }
        if !self.kube && self.kubeconfig.is_some() {
            return Err(SettingsError::KubeconfigWithoutKube);
        }
        if self.tun_max_connections == 0 {
            return Err(SettingsError::Zero("tun-max-connections"));
        }
        if self.tun_max_udp_flows == 0 {
            return Err(SettingsError::Zero("tun-max-udp-flows"));
        }
        if !(1..=256).contains(&self.tun_queues) {
            return Err(SettingsError::TunQueues(self.tun_queues));
        }
        if !(1280..=65_535).contains(&self.tun_mtu) {
            return Err(SettingsError::TunMtu(self.tun_mtu));
        }
        if let Some(name) = &self.tun {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(SettingsError::TunName(name.clone()));
            }
        }
        Ok(())
    }

    /// Local addresses NodePorts listen on: those inside `nodeport_addresses`, or,
    /// when none are configured, every non-loopback address (kube-proxy's "primary
    /// addresses" without a Node object). Loopback is served only when listed.
    pub fn select_nodeport_addresses(&self, local: &[IpAddr]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = local
            .iter()
            .copied()
            .filter(|ip| {
                if self.nodeport_addresses.is_empty() {
                    !ip.is_loopback() && !is_link_local(ip)
                } else {
                    self.nodeport_addresses.iter().any(|n| n.contains(ip))
                }
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Addresses currently assigned to this host's interfaces.
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|i| i.ip())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(parse_port_range("30000-32767"), Ok(30000..=32767));
        assert!(parse_port_range("5-1").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("abc").is_err());
    }

    #[test]
    fn nodeport_addresses_exclude_loopback_unless_listed() {
        let local: Vec<IpAddr> = vec![
            "127.0.0.1".parse().unwrap(),
            "192.0.2.10".parse().unwrap(),
            "fe80::1".parse().unwrap(),
        ];
        let mut s = Settings::default();
        assert_eq!(
            s.select_nodeport_addresses(&local),
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        s.nodeport_addresses = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(
            s.select_nodeport_addresses(&local),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn settings_file_overrides_and_rejects_unknown_keys() {
        let f: SettingsFile =
            serde_yaml::from_str("workers: 3\nnode-port-range: 1000-2000\n").unwrap();
        let mut s = Settings::default();
        s.apply_file(f).unwrap();
        assert_eq!(s.workers, 3);
        assert_eq!(s.limits.node_port_range, 1000..=2000);
        assert!(serde_yaml::from_str::<SettingsFile>("wrokers: 3\n").is_err());
    }

    #[test]
    fn shipped_settings_file_is_valid() {
        let f: SettingsFile = serde_yaml::from_str(include_str!("../config/ringvip.yaml")).unwrap();
        let mut s = Settings::default();
        s.apply_file(f).unwrap();
        s.validate().unwrap();
        assert_eq!(s.node_name, "node-a");
    }

    #[test]
    fn tun_settings_validate_and_no_tun_wins() {
        let mut s = Settings::default();
        let f: SettingsFile = serde_yaml::from_str("tun: rv1\ntun-mtu: 9000\n").unwrap();
        s.apply_file(f).unwrap();
        assert_eq!((s.tun.as_deref(), s.tun_mtu), (Some("rv1"), 9000));
        s.validate().unwrap();
        s.apply_file(SettingsFile {
            no_tun: Some(true),
            ..SettingsFile::default()
        })
        .unwrap();
        assert_eq!(s.tun, None);
        s.tun = Some("a-name-that-is-too-long".into());
        assert!(matches!(s.validate(), Err(SettingsError::TunName(_))));
        s.tun = None;
        s.tun_mtu = 500;
        assert_eq!(s.validate(), Err(SettingsError::TunMtu(500)));
    }

    #[test]
    fn tun_queues_come_from_the_file_and_are_bounded() {
        let mut s = Settings::default();
        assert!(s.tun_queues >= 1, "one per core by default");
        let f: SettingsFile = serde_yaml::from_str("tun-queues: 4\n").unwrap();
        s.apply_file(f).unwrap();
        assert_eq!(s.tun_queues, 4);
        assert_eq!(s.validate(), Ok(()));
        for bad in [0, 257] {
            s.tun_queues = bad;
            assert_eq!(s.validate(), Err(SettingsError::TunQueues(bad)));
        }
    }

    #[test]
    fn dns_settings_default_apply_and_validate() {
        let mut s = Settings::default();
        assert_eq!(
            (
                s.dns_addr,
                s.cluster_domain.as_str(),
                s.dns_upstream,
                s.dns_ttl
            ),
            (None, "cluster.local", None, 5)
        );
        let f: SettingsFile = serde_yaml::from_str(
            "dns-addr: 127.0.0.1:5353\ncluster-domain: k8s.test\ndns-upstream: 127.0.0.1:53\ndns-ttl: 30\n",
        )
        .unwrap();
        s.apply_file(f).unwrap();
        assert_eq!(s.dns_addr, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(s.cluster_domain, "k8s.test");
        assert_eq!(s.dns_ttl, 30);
        s.validate().unwrap();
        s.cluster_domain = "bad..domain".into();
        assert!(matches!(s.validate(), Err(SettingsError::ClusterDomain(_))));
        s.cluster_domain = "cluster.local".into();
        s.dns_ttl = 3601;
        assert_eq!(s.validate(), Err(SettingsError::DnsTtl(3601)));
    }

    #[test]
    fn limit_settings_default_and_apply() {
        let mut s = Settings::default();
        assert_eq!((s.max_connections, s.max_connections_per_frontend), (0, 0));
        assert_eq!(s.tcp_idle_timeout, Duration::from_secs(3600));
        let f: SettingsFile = serde_yaml::from_str(
            "max-connections: 100\nmax-connections-per-frontend: 10\ntcp-idle-timeout-secs: 0\n",
        )
        .unwrap();
        s.apply_file(f).unwrap();
        assert_eq!(
            (s.max_connections, s.max_connections_per_frontend),
            (100, 10)
        );
        assert!(s.tcp_idle_timeout.is_zero());
        s.validate().unwrap();
    }

    #[test]
    fn kube_settings_come_from_the_file_and_exclude_manifests() {
        let f: SettingsFile =
            serde_yaml::from_str("kube: true\nkubeconfig: /etc/kc\nnode-name: n1\n").unwrap();
        let mut s = Settings::default();
        s.apply_file(f).unwrap();
        assert!(s.kube);
        assert_eq!(s.kubeconfig, Some(PathBuf::from("/etc/kc")));
        assert_eq!(s.validate(), Ok(()));
        s.manifests = vec![PathBuf::from("m.yaml")];
        assert_eq!(s.validate(), Err(SettingsError::TwoSources));
        s.manifests.clear();
        s.kube = false;
        assert_eq!(s.validate(), Err(SettingsError::KubeconfigWithoutKube));
    }

    #[test]
    fn validate_rejects_zero_workers() {
        let s = Settings {
            workers: 0,
            ..Settings::default()
        };
        assert_eq!(s.validate(), Err(SettingsError::Workers(0)));
    }
}
