//! Process settings: one [`Settings`] struct, nested per component, that clap
//! reads from flags and serde from the YAML settings file, so a flag and its
//! file key are one field with one doc comment. [`load`] merges them (flags win
//! over the file, the file over the defaults); [`Settings::validate`] checks the
//! result once, at start-up. Everything here is fixed for the life of the
//! process.
//!
//! Naming rule, relied on by [`load`] and checked by tests: a field's
//! settings-file key is its clap id with `_` → `-`, which is also its long flag
//! name (the one exception: the list key `service-cidrs` is given one CIDR at a
//! time as `--service-cidr`).

pub(crate) mod load;
pub(crate) mod units;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, FromArgMatches};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use load::{from_yaml, load, LoadError};
pub use units::parse_port_range;

/// Every setting of `ringvip run`.
#[derive(Debug, Clone, PartialEq, Args, Serialize)]
pub struct Settings {
    /// Where objects come from.
    #[command(flatten)]
    #[serde(flatten)]
    pub source: SourceOptions,
    /// Who this node is.
    #[command(flatten)]
    #[serde(flatten)]
    pub node: NodeOptions,
    /// What manifest validation accepts.
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: Limits,
    /// Data-plane threads, backend connects, connection limits, timeouts.
    #[command(flatten)]
    #[serde(flatten)]
    pub dataplane: DataPlaneOptions,
    /// The TUN device capturing ClusterIP traffic.
    #[command(flatten)]
    #[serde(flatten)]
    pub tun: TunOptions,
    /// The cluster DNS responder.
    #[command(flatten)]
    #[serde(flatten)]
    pub dns: DnsOptions,
    /// The health and metrics servers.
    #[command(flatten)]
    #[serde(flatten)]
    pub admin: AdminOptions,
    /// Log format and the access log.
    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogOptions,
}

/// Where Services and endpoints come from: manifests or the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct SourceOptions {
    /// Manifest files or directories (repeatable, or comma-separated).
    #[arg(long, value_name = "PATH", value_delimiter = ',')]
    pub manifests: Vec<PathBuf>,
    /// Watch Services, EndpointSlices and this Node on the Kubernetes API
    /// (in-cluster, or --kubeconfig) instead of reading manifests.
    #[arg(long, conflicts_with = "manifests")]
    pub kube: bool,
    /// Kubeconfig for --kube [default: $KUBECONFIG or ~/.kube/config, else in-cluster].
    #[arg(long, value_name = "FILE", requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
}

/// This node's identity, what decides which endpoints are local and which
/// addresses NodePorts listen on.
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct NodeOptions {
    /// This node's name (endpoints with this nodeName are local) [default: hostname].
    #[arg(long, value_name = "NAME", default_value_t = default_node_name(), hide_default_value = true)]
    pub node_name: String,
    /// This node's topology zone [default: the Node object's label].
    #[arg(long)]
    pub zone: Option<String>,
    /// CIDRs choosing the local addresses NodePorts listen on. Default: every
    /// non-loopback address; 127.0.0.1 only when listed.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
    /// Upstream load balancers (CIDRs) whose connections to LoadBalancer IPs
    /// start with a PROXY protocol v2 header: the client it names is the
    /// client (affinity, source ranges, the header passed on). From any
    /// other address no header is read.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub proxy_protocol_from: Vec<IpNet>,
    /// Serve Services labelled service.kubernetes.io/service-proxy-name=NAME.
    #[arg(long, value_name = "NAME", default_value = "ringvip")]
    pub proxy_name: String,
}

/// What manifest validation needs from the settings (also the settings of
/// `ringvip check` and `ringvip env`).
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Limits {
    /// Allowed nodePort and healthCheckNodePort values (kube-apiserver's
    /// --service-node-port-range).
    #[arg(long, value_name = "LOW-HIGH", default_value = "30000-32767", value_parser = parse_port_range)]
    #[serde(with = "units::port_range")]
    pub node_port_range: RangeInclusive<u16>,
    /// Service CIDR (repeatable); ClusterIPs must be inside one.
    #[arg(long = "service-cidr", value_name = "CIDR", default_values = ["10.96.0.0/12", "fd00:10:96::/112"])]
    pub service_cidrs: Vec<IpNet>,
}

/// What the data plane applies to every flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct DataPlaneOptions {
    /// Data-plane threads [default: one per core].
    #[arg(long, value_name = "N", default_value_t = cores(), hide_default_value = true)]
    pub workers: usize,
    /// First backend connect try's timeout in ms; doubled at each retry.
    #[arg(id = "connect_timeout_ms", long = "connect-timeout-ms", value_name = "MS", default_value = "250", value_parser = units::parse_millis)]
    #[serde(rename = "connect-timeout-ms", with = "units::millis")]
    pub connect_timeout: Duration,
    /// Backend connect tries per connection (as kube-proxy's userspace mode).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connect_attempts: u32,
    /// UDP flow idle timeout in seconds (conntrack's 30).
    #[arg(id = "udp_idle_timeout_secs", long = "udp-idle-timeout-secs", value_name = "SECS", default_value = "30", value_parser = units::parse_secs)]
    #[serde(rename = "udp-idle-timeout-secs", with = "units::secs")]
    pub udp_idle_timeout: Duration,
    /// TCP connections at most over every front end; new ones beyond are
    /// refused (reset on NodePorts, SYN dropped on ClusterIPs); 0 = unlimited.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connections: usize,
    /// TCP connections at most per frontend (VIP or node address and port);
    /// 0 = unlimited.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connections_per_frontend: usize,
    /// Close a TCP connection (both sides) after this many seconds without a
    /// byte either way; 0 disables.
    ///
    /// The default is HAProxy's usual `timeout tunnel`: longer
    /// than IPVS's 900 s because a proxy's sockets never see TCP keepalive
    /// probes (the kernel answers them), so keepalive-only connections look idle.
    #[arg(id = "tcp_idle_timeout_secs", long = "tcp-idle-timeout-secs", value_name = "SECS", default_value = "3600", value_parser = units::parse_secs)]
    #[serde(rename = "tcp-idle-timeout-secs", with = "units::secs")]
    pub tcp_idle_timeout: Duration,
    /// On SIGTERM, stop accepting and let established connections finish for
    /// this many seconds (a pod's default grace period).
    #[arg(id = "drain_timeout_secs", long = "drain-timeout-secs", value_name = "SECS", default_value = "30", value_parser = units::parse_secs)]
    #[serde(rename = "drain-timeout-secs", with = "units::secs")]
    pub drain_timeout: Duration,
}

/// The TUN device that captures the service CIDRs (ClusterIP traffic).
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct TunOptions {
    /// TUN device that captures the service CIDRs (ClusterIPs).
    #[arg(long, value_name = "NAME", default_value = "ringvip0")]
    pub tun: String,
    /// Run without a TUN device: no ClusterIP capture, no root needed.
    #[arg(long, conflicts_with = "tun")]
    pub no_tun: bool,
    /// MTU of the TUN device: large segments from local clients cost one
    /// read each instead of dozens.
    #[arg(long, value_name = "BYTES", default_value_t = 65_535)]
    pub tun_mtu: u32,
    /// TUN queues (IFF_MULTI_QUEUE), each served by its own thread and stack;
    /// the kernel keeps a flow on one queue [default: one per core].
    #[arg(long, value_name = "N", default_value_t = cores(), hide_default_value = true)]
    pub tun_queues: usize,
    /// TCP connections through the TUN at most; new SYNs beyond are dropped.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub tun_max_connections: usize,
    /// UDP flows through the TUN at most.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub tun_max_udp_flows: usize,
    /// Network namespace (`/run/netns/NAME`) to create the TUN device and
    /// its routes in instead of ringvip's own. Not a flag or setting: the
    /// demo sets it to show a ClusterIP in a namespace of its own.
    #[arg(skip)]
    #[serde(skip)]
    pub netns: Option<PathBuf>,
}

impl TunOptions {
    /// The TUN device's name, `None` when running without one.
    pub fn device(&self) -> Option<&str> {
        (!self.no_tun).then_some(self.tun.as_str())
    }
}

/// The cluster DNS responder.
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct DnsOptions {
    /// Serve cluster DNS on this address, UDP and TCP (off unless set).
    #[arg(long, value_name = "ADDR")]
    pub dns_addr: Option<SocketAddr>,
    /// Cluster domain answered by the DNS responder.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Forward DNS queries outside the cluster domain here (else REFUSED).
    #[arg(long, value_name = "ADDR")]
    pub dns_upstream: Option<SocketAddr>,
    /// TTL of DNS answers and negative answers in seconds (CoreDNS's 5).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub dns_ttl: u32,
}

/// The health and metrics servers.
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct AdminOptions {
    /// /healthz and /livez address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10256")]
    pub health_addr: SocketAddr,
    /// /metrics address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// /healthz and /livez answer 503 once an update has waited this many
    /// seconds without being applied.
    #[arg(id = "health_timeout_secs", long = "health-timeout-secs", value_name = "SECS", default_value = "60", value_parser = units::parse_secs)]
    #[serde(rename = "health-timeout-secs", with = "units::secs")]
    pub health_timeout: Duration,
    /// Unix socket of the upgrade handover. At start, a running ringvip
    /// listening here hands over its listening sockets, ClientIP affinity and
    /// UDP flow pins, then stops accepting and drains; with nobody there (no
    /// file, or a stale one) this process binds afresh. Either way it then
    /// listens here for the next one.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/ringvip/handover.sock"
    )]
    pub handover: PathBuf,
    /// Neither take over from a running ringvip nor listen for the next one.
    #[arg(long, conflicts_with = "handover")]
    pub no_handover: bool,
    /// After handing over and draining, wait for SIGTERM instead of exiting:
    /// in a pod, an exit would restart the container, whose new process
    /// would take the node back from the one that just took over.
    #[arg(long)]
    pub linger_after_handover: bool,
}

impl AdminOptions {
    /// The handover socket's path, `None` when handover is off.
    pub fn handover_path(&self) -> Option<&std::path::Path> {
        (!self.no_handover).then_some(self.handover.as_path())
    }
}

/// Log lines and the access log.
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct LogOptions {
    /// Format of log lines on stderr, and of access-log lines: text, or json
    /// (one JSON object per line). Text is coloured only when stderr is a
    /// terminal.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Write one line per finished TCP connection or UDP flow (client,
    /// frontend, endpoint, bytes each way, duration, how it ended) to this
    /// file, appended, or to stdout with `-`. Off unless set.
    #[arg(long, value_name = "PATH|-")]
    pub access_log: Option<PathBuf>,
}

/// Format of log lines: the `log-format` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (`key=value` fields).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The defaults of an options struct are its clap defaults: written once, on
/// the field, and shown by `--help`.
fn clap_defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    // Every argument is optional, so an empty command line always parses;
    // a field without a default would fail here, in every test.
    #[allow(clippy::expect_used)]
    let matches = cmd
        .try_get_matches_from(["defaults"])
        .expect("every setting is optional");
    #[allow(clippy::expect_used)]
    T::from_arg_matches(&matches).expect("defaults parse")
}

macro_rules! defaults_from_clap {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                clap_defaults()
            }
        }
    )*};
}
defaults_from_clap!(
    Settings,
    SourceOptions,
    NodeOptions,
    Limits,
    DataPlaneOptions,
    TunOptions,
    DnsOptions,
    AdminOptions,
    LogOptions
);

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
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
    /// Neither source of objects.
    #[error(
        "no source: give --manifests PATH or --kube (or `manifests:` / `kube: true` in --config)"
    )]
    NoSource,
    /// Both sources at once: a manifest reload would replace the API's objects.
    #[error("kube and manifests are exclusive: give one source of objects")]
    TwoSources,
    /// A kubeconfig without the API source.
    #[error("kubeconfig is only used with kube")]
    KubeconfigWithoutKube,
}

impl Settings {
    /// Checks the combination once, at start-up: every check of every
    /// component is here, so a bad setting is refused before anything starts.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let (src, dp, tun, dns) = (&self.source, &self.dataplane, &self.tun, &self.dns);
        if dp.workers == 0 || dp.workers > 1024 {
            return Err(SettingsError::Workers(dp.workers));
        }
        if dp.connect_timeout.is_zero() {
            return Err(SettingsError::Zero("connect-timeout-ms"));
        }
        if dp.connect_attempts == 0 {
            return Err(SettingsError::Zero("connect-attempts"));
        }
        if dp.udp_idle_timeout.is_zero() {
            return Err(SettingsError::Zero("udp-idle-timeout-secs"));
        }
        if self.admin.health_timeout.is_zero() {
            return Err(SettingsError::Zero("health-timeout-secs"));
        }
        if self.limits.service_cidrs.is_empty() {
            return Err(SettingsError::NoServiceCidr);
        }
        if let Err(e) = crate::dns::zone::fqdn(&dns.cluster_domain) {
            return Err(SettingsError::ClusterDomain(e.to_string()));
        }
        if dns.dns_ttl > 3600 {
            return Err(SettingsError::DnsTtl(dns.dns_ttl));
        }
        match (src.kube, src.manifests.is_empty()) {
            (true, false) => return Err(SettingsError::TwoSources),
            (false, true) => return Err(SettingsError::NoSource),
            _ => {}
        }
        if !src.kube && src.kubeconfig.is_some() {
            return Err(SettingsError::KubeconfigWithoutKube);
        }
        if tun.tun_max_connections == 0 {
            return Err(SettingsError::Zero("tun-max-connections"));
        }
        if tun.tun_max_udp_flows == 0 {
            return Err(SettingsError::Zero("tun-max-udp-flows"));
        }
        if !(1..=256).contains(&tun.tun_queues) {
            return Err(SettingsError::TunQueues(tun.tun_queues));
        }
        if !(1280..=65_535).contains(&tun.tun_mtu) {
            return Err(SettingsError::TunMtu(tun.tun_mtu));
        }
        if let Some(name) = tun.device() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(SettingsError::TunName(name.to_string()));
            }
        }
        Ok(())
    }
}

impl NodeOptions {
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
    use clap::{CommandFactory, Parser};

    /// What `ringvip run` parses: the settings file path and every setting.
    #[derive(Debug, Parser)]
    struct Run {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    }

    /// Settings from a file with `text` and the command line `args`.
    fn run(text: Option<&str>, args: &[&str]) -> Result<Settings, LoadError> {
        let dir = std::env::temp_dir().join(format!(
            "ringvip-settings-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.yaml");
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        let argv = std::iter::once("ringvip").chain(args.iter().copied());
        let matches = Run::command().try_get_matches_from(argv).unwrap();
        let run = Run::from_arg_matches(&matches).unwrap();
        let res = load(text.map(|_| path.as_path()), &run.settings, &matches);
        std::fs::remove_dir_all(&dir).ok();
        res
    }

    fn valid(manifests: &str) -> Settings {
        let mut s = Settings::default();
        s.source.manifests = vec![PathBuf::from(manifests)];
        s
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
            s.node.select_nodeport_addresses(&local),
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        s.node.nodeport_addresses = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(
            s.node.select_nodeport_addresses(&local),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::default();
        assert_eq!(s.limits.node_port_range, 30000..=32767);
        assert_eq!(
            s.limits.service_cidrs,
            ["10.96.0.0/12", "fd00:10:96::/112"].map(|c| c.parse::<IpNet>().unwrap())
        );
        assert_eq!(s.node.proxy_name, "ringvip");
        assert!(s.dataplane.workers >= 1 && s.tun.tun_queues >= 1);
        assert_eq!(s.dataplane.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.dataplane.connect_attempts, 4);
        assert_eq!(s.dataplane.udp_idle_timeout, Duration::from_secs(30));
        assert_eq!(s.dataplane.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.admin.health_timeout, Duration::from_secs(60));
        assert_eq!(s.tun.device(), Some("ringvip0"));
        assert_eq!((s.tun.tun_mtu, s.tun.tun_max_connections), (65_535, 65_536));
        assert_eq!(s.tun.tun_max_udp_flows, 65_536);
        assert!(!s.source.kube && s.source.manifests.is_empty());
        assert_eq!(
            (s.admin.health_addr, s.admin.metrics_addr),
            (
                SocketAddr::from(([127, 0, 0, 1], 10256)),
                SocketAddr::from(([127, 0, 0, 1], 10249))
            )
        );
        // Without a source there is nothing to serve.
        assert_eq!(s.validate(), Err(SettingsError::NoSource));
        assert_eq!(valid("m.yaml").validate(), Ok(()));
    }

    #[test]
    fn settings_file_overrides_and_rejects_unknown_keys() {
        let s = from_yaml("workers: 3\nnode-port-range: 1000-2000\n").unwrap();
        assert_eq!(s.dataplane.workers, 3);
        assert_eq!(s.limits.node_port_range, 1000..=2000);
        let e = from_yaml("wrokers: 3\n").unwrap_err();
        assert!(
            matches!(&e, LoadError::UnknownKey { key, .. } if key == "wrokers"),
            "{e}"
        );
        // A bad value names its key.
        let e = from_yaml("workers: many\n").unwrap_err().to_string();
        assert!(e.contains("workers: invalid type"), "{e}");
        let e = from_yaml("node-port-range: 5-1\n").unwrap_err().to_string();
        assert!(
            e.contains("node-port-range") && e.contains("LOW-HIGH"),
            "{e}"
        );
        // Not a map at all.
        assert!(matches!(
            from_yaml("- workers\n"),
            Err(LoadError::Syntax { .. })
        ));
        assert_eq!(from_yaml("# nothing\n").unwrap(), Settings::default());
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let file =
            "workers: 3\nconnect-attempts: 2\nservice-cidrs: [10.0.0.0/16]\nmanifests: [a]\n";
        let s = run(Some(file), &["--workers", "5"]).unwrap();
        assert_eq!(s.dataplane.workers, 5, "flag over file");
        assert_eq!(s.dataplane.connect_attempts, 2, "file over default");
        assert_eq!(s.dataplane.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.limits.service_cidrs, ["10.0.0.0/16".parse().unwrap()]);
        // A flag given with the default's value still wins over the file.
        let s = run(Some(file), &["--connect-attempts", "4"]).unwrap();
        assert_eq!(s.dataplane.connect_attempts, 4);
        // A list flag replaces the file's list.
        let s = run(Some(file), &["--service-cidr", "10.1.0.0/16"]).unwrap();
        assert_eq!(s.limits.service_cidrs, ["10.1.0.0/16".parse().unwrap()]);
        // Durations: the flag and the key read the same unit.
        let s = run(
            Some("connect-timeout-ms: 100\ntcp-idle-timeout-secs: 7\n"),
            &["--udp-idle-timeout-secs", "9"],
        )
        .unwrap();
        assert_eq!(s.dataplane.connect_timeout, Duration::from_millis(100));
        assert_eq!(s.dataplane.tcp_idle_timeout, Duration::from_secs(7));
        assert_eq!(s.dataplane.udp_idle_timeout, Duration::from_secs(9));
        // Without a file: the flags alone.
        let s = run(None, &["--manifests", "a,b", "--no-tun"]).unwrap();
        assert_eq!(s.source.manifests, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(s.tun.device(), None);
        assert!(run(Some("wrokers: 1\n"), &[]).is_err());
    }

    #[test]
    fn a_flag_undoes_the_file_keys_it_conflicts_with() {
        let s = run(Some("no-tun: true\n"), &["--tun", "rv1"]).unwrap();
        assert_eq!(s.tun.device(), Some("rv1"));
        let s = run(Some("tun: rv1\n"), &["--no-tun"]).unwrap();
        assert_eq!(s.tun.device(), None);
        let s = run(Some("manifests: [a]\n"), &["--kube"]).unwrap();
        assert!(s.source.kube && s.source.manifests.is_empty());
        assert_eq!(s.validate(), Ok(()));
        // In the file alone both sources are refused.
        let s = from_yaml("manifests: [a]\nkube: true\n").unwrap();
        assert_eq!(s.validate(), Err(SettingsError::TwoSources));
    }

    #[test]
    fn every_setting_is_a_flag_and_a_key_with_the_same_name() {
        let cmd = Run::command();
        let mut flags: Vec<String> = cmd
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "help"))
            .map(|a| a.get_id().as_str().replace('_', "-"))
            .collect();
        let mut keys = load::keys();
        flags.sort();
        keys.sort();
        assert_eq!(flags, keys);
        for a in Settings::augment_args(clap::Command::new("run")).get_arguments() {
            let (id, long) = (a.get_id().as_str(), a.get_long().unwrap_or_default());
            if !matches!(id, "help" | "service_cidrs") {
                assert_eq!(id.replace('_', "-"), long, "the flag of {id}");
            }
            assert!(a.get_help().is_some(), "--{long} has a doc comment");
        }
    }

    #[test]
    fn shipped_settings_file_is_valid() {
        let s = from_yaml(include_str!("../../config/ringvip.yaml")).unwrap();
        s.validate().unwrap();
        assert_eq!(s.node.node_name, "node-a");
    }

    #[test]
    fn tun_settings_validate_and_no_tun_wins() {
        let mut s = from_yaml("tun: rv1\ntun-mtu: 9000\nmanifests: [m]\n").unwrap();
        assert_eq!((s.tun.device(), s.tun.tun_mtu), (Some("rv1"), 9000));
        s.validate().unwrap();
        let t = from_yaml("tun: rv1\nno-tun: true\n").unwrap();
        assert_eq!(t.tun.device(), None);
        s.tun.tun = "a-name-that-is-too-long".into();
        assert!(matches!(s.validate(), Err(SettingsError::TunName(_))));
        s.tun.no_tun = true;
        s.tun.tun_mtu = 500;
        assert_eq!(s.validate(), Err(SettingsError::TunMtu(500)));
    }

    #[test]
    fn tun_queues_come_from_the_file_and_are_bounded() {
        assert!(
            Settings::default().tun.tun_queues >= 1,
            "one per core by default"
        );
        let mut s = from_yaml("tun-queues: 4\nmanifests: [m]\n").unwrap();
        assert_eq!(s.tun.tun_queues, 4);
        assert_eq!(s.validate(), Ok(()));
        for bad in [0, 257] {
            s.tun.tun_queues = bad;
            assert_eq!(s.validate(), Err(SettingsError::TunQueues(bad)));
        }
    }

    #[test]
    fn dns_settings_default_apply_and_validate() {
        let d = DnsOptions::default();
        assert_eq!(
            (
                d.dns_addr,
                d.cluster_domain.as_str(),
                d.dns_upstream,
                d.dns_ttl
            ),
            (None, "cluster.local", None, 5)
        );
        let mut s = from_yaml(
            "dns-addr: 127.0.0.1:5353\ncluster-domain: k8s.test\ndns-upstream: 127.0.0.1:53\ndns-ttl: 30\nmanifests: [m]\n",
        )
        .unwrap();
        assert_eq!(s.dns.dns_addr, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(s.dns.cluster_domain, "k8s.test");
        assert_eq!(s.dns.dns_ttl, 30);
        s.validate().unwrap();
        s.dns.cluster_domain = "bad..domain".into();
        assert!(matches!(s.validate(), Err(SettingsError::ClusterDomain(_))));
        s.dns.cluster_domain = "cluster.local".into();
        s.dns.dns_ttl = 3601;
        assert_eq!(s.validate(), Err(SettingsError::DnsTtl(3601)));
    }

    #[test]
    fn proxy_protocol_from_is_a_settings_key() {
        let s = from_yaml("proxy-protocol-from: [10.0.0.0/8, \"192.0.2.1/32\"]\nmanifests: [m]\n")
            .unwrap();
        assert_eq!(
            s.node.proxy_protocol_from,
            ["10.0.0.0/8", "192.0.2.1/32"].map(|c| c.parse::<IpNet>().unwrap())
        );
        assert!(from_yaml("proxy-protocol-from: [nonsense]\nmanifests: [m]\n").is_err());
    }

    #[test]
    fn limit_settings_default_and_apply() {
        let d = DataPlaneOptions::default();
        assert_eq!((d.max_connections, d.max_connections_per_frontend), (0, 0));
        assert_eq!(d.tcp_idle_timeout, Duration::from_secs(3600));
        let s = from_yaml(
            "max-connections: 100\nmax-connections-per-frontend: 10\ntcp-idle-timeout-secs: 0\nmanifests: [m]\n",
        )
        .unwrap();
        let d = s.dataplane;
        assert_eq!(
            (d.max_connections, d.max_connections_per_frontend),
            (100, 10)
        );
        assert!(d.tcp_idle_timeout.is_zero());
        s.validate().unwrap();
    }

    #[test]
    fn kube_settings_come_from_the_file_and_exclude_manifests() {
        let mut s = from_yaml("kube: true\nkubeconfig: /etc/kc\nnode-name: n1\n").unwrap();
        assert!(s.source.kube);
        assert_eq!(s.source.kubeconfig, Some(PathBuf::from("/etc/kc")));
        assert_eq!(s.validate(), Ok(()));
        s.source.manifests = vec![PathBuf::from("m.yaml")];
        assert_eq!(s.validate(), Err(SettingsError::TwoSources));
        s.source.kube = false;
        assert_eq!(s.validate(), Err(SettingsError::KubeconfigWithoutKube));
    }

    #[test]
    fn validate_rejects_zero_workers() {
        let mut s = valid("m");
        s.dataplane.workers = 0;
        assert_eq!(s.validate(), Err(SettingsError::Workers(0)));
    }
}
