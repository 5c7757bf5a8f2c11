//! The `ringvip` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use ringvip::config::{Settings, SettingsFile};
use ringvip::discovery::file;
use ringvip::status;

/// Kubernetes Services in userspace, on io_uring.
#[derive(Debug, Parser)]
#[command(name = "ringvip", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the Services in the manifests (files or directories, watched live).
    Run(Box<RunArgs>),
    /// Validate manifests: prints every error, exits 1 if there is any.
    Check(CheckArgs),
    /// Print the environment variables the kubelet would inject into a Pod of
    /// the namespace, as KEY=value lines a shell can source.
    Env(EnvArgs),
    /// Start three local backends behind two NodePorts on 127.0.0.1 and show
    /// balancing and affinity at work (no root needed).
    Demo {
        /// Exit after the self-test instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Show each frontend of a running ringvip: endpoints, connections, bytes.
    Status {
        /// The running ringvip's metrics address (its admin API).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
        admin: SocketAddr,
        /// Output: table, wide (with endpoints and failures) or json.
        #[arg(short = 'o', long, value_name = "FORMAT", default_value = "table")]
        output: StatusFormat,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StatusFormat {
    Table,
    Wide,
    Json,
}

#[derive(Debug, Args)]
struct Common {
    /// Settings file (YAML; keys are the long flag names). Flags win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Allowed nodePort range.
    #[arg(long, value_name = "LOW-HIGH")]
    node_port_range: Option<String>,
    /// Service CIDR (repeatable); ClusterIPs must be inside one. Default
    /// 10.96.0.0/12 and fd00:10:96::/112.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidrs: Vec<IpNet>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Manifest files or directories (repeatable, or comma-separated).
    #[arg(long, value_name = "PATH", value_delimiter = ',')]
    manifests: Vec<PathBuf>,
    /// This node's name (endpoints with this nodeName are local). Default: hostname.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// This node's topology zone (default: the Node object's label).
    #[arg(long)]
    zone: Option<String>,
    /// CIDRs choosing the local addresses NodePorts listen on. Default: every
    /// non-loopback address; 127.0.0.1 only when listed.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    nodeport_addresses: Vec<IpNet>,
    /// Data-plane threads (default: one per core).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// /healthz and /livez address [default: 127.0.0.1:10256].
    #[arg(long, value_name = "ADDR")]
    health_addr: Option<SocketAddr>,
    /// /metrics address [default: 127.0.0.1:10249].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Serve Services labelled service.kubernetes.io/service-proxy-name=NAME.
    #[arg(long, value_name = "NAME")]
    proxy_name: Option<String>,
    /// First backend connect try's timeout in ms; doubled at each retry [default: 250].
    #[arg(long, value_name = "MS")]
    connect_timeout_ms: Option<u64>,
    /// Backend connect tries per connection [default: 4].
    #[arg(long, value_name = "N")]
    connect_attempts: Option<u32>,
    /// UDP flow idle timeout in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    udp_idle_timeout_secs: Option<u64>,
    /// TUN device that captures the service CIDRs (ClusterIPs) [default: ringvip0].
    #[arg(long, value_name = "NAME")]
    tun: Option<String>,
    /// Run without a TUN device: no ClusterIP capture, no root needed.
    #[arg(long, conflicts_with = "tun")]
    no_tun: bool,
    /// MTU of the TUN device [default: 65535].
    #[arg(long, value_name = "BYTES")]
    tun_mtu: Option<u32>,
    /// TUN queues, each served by its own thread and stack [default: one per core].
    #[arg(long, value_name = "N")]
    tun_queues: Option<usize>,
    /// TCP connections through the TUN at most; new SYNs beyond are dropped [default: 65536].
    #[arg(long, value_name = "N")]
    tun_max_connections: Option<usize>,
    /// UDP flows through the TUN at most [default: 65536].
    #[arg(long, value_name = "N")]
    tun_max_udp_flows: Option<usize>,
    /// On SIGTERM, stop accepting and let established connections finish for
    /// this long [default: 30].
    #[arg(long, value_name = "SECS")]
    drain_timeout_secs: Option<u64>,
    /// Serve cluster DNS on this address, UDP and TCP (off unless set).
    #[arg(long, value_name = "ADDR")]
    dns_addr: Option<SocketAddr>,
    /// Cluster domain answered by the DNS responder [default: cluster.local].
    #[arg(long, value_name = "DOMAIN")]
    cluster_domain: Option<String>,
    /// Forward DNS queries outside the cluster domain here (else REFUSED).
    #[arg(long, value_name = "ADDR")]
    dns_upstream: Option<SocketAddr>,
    /// TTL of DNS answers in seconds [default: 5].
    #[arg(long, value_name = "SECS")]
    dns_ttl: Option<u32>,
    /// TCP connections at most over every front end; new ones beyond are
    /// refused (reset on NodePorts, SYN dropped on ClusterIPs) [default: 0 = unlimited].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// TCP connections at most per frontend (VIP or node address and port)
    /// [default: 0 = unlimited].
    #[arg(long, value_name = "N")]
    max_connections_per_frontend: Option<usize>,
    /// Close a TCP connection (both sides) after this many seconds without a
    /// byte either way; 0 disables [default: 3600].
    #[arg(long, value_name = "SECS")]
    tcp_idle_timeout_secs: Option<u64>,
    /// Watch Services, EndpointSlices and this Node on the Kubernetes API
    /// (in-cluster, or --kubeconfig) instead of reading manifests.
    #[arg(long, conflicts_with = "manifests")]
    kube: bool,
    /// Kubeconfig for --kube [default: $KUBECONFIG or ~/.kube/config, else in-cluster].
    #[arg(long, value_name = "FILE", requires = "kube")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct EnvArgs {
    #[command(flatten)]
    common: Common,
    /// Namespace of the Pod whose variables to print.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Manifest files or directories.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    common: Common,
    /// Manifest files or directories.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

/// A list flag given at least once.
fn nonempty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Defaults, then the settings file, then the flags: flags are applied through
/// the same `SettingsFile` mapping as the file, so both mean exactly the same.
fn settings(c: &Common, flags: SettingsFile) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    if let Some(path) = &c.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading settings file {}", path.display()))?;
        let f: SettingsFile = serde_yaml::from_str(&text)
            .with_context(|| format!("settings file {}", path.display()))?;
        s.apply_file(f)
            .with_context(|| format!("settings file {}", path.display()))?;
    }
    let common = SettingsFile {
        node_port_range: c.node_port_range.clone(),
        service_cidrs: nonempty(c.service_cidrs.clone()),
        ..SettingsFile::default()
    };
    s.apply_file(common)?;
    s.apply_file(flags)?;
    Ok(s)
}

fn run_settings(a: RunArgs) -> anyhow::Result<Settings> {
    let flags = SettingsFile {
        manifests: nonempty(a.manifests),
        node_name: a.node_name,
        zone: a.zone,
        nodeport_addresses: nonempty(a.nodeport_addresses),
        workers: a.workers,
        health_addr: a.health_addr,
        metrics_addr: a.metrics_addr,
        proxy_name: a.proxy_name,
        connect_timeout_ms: a.connect_timeout_ms,
        connect_attempts: a.connect_attempts,
        udp_idle_timeout_secs: a.udp_idle_timeout_secs,
        tun: a.tun,
        no_tun: a.no_tun.then_some(true),
        tun_mtu: a.tun_mtu,
        tun_queues: a.tun_queues,
        tun_max_connections: a.tun_max_connections,
        tun_max_udp_flows: a.tun_max_udp_flows,
        drain_timeout_secs: a.drain_timeout_secs,
        dns_addr: a.dns_addr,
        cluster_domain: a.cluster_domain,
        dns_upstream: a.dns_upstream,
        dns_ttl: a.dns_ttl,
        max_connections: a.max_connections,
        max_connections_per_frontend: a.max_connections_per_frontend,
        tcp_idle_timeout_secs: a.tcp_idle_timeout_secs,
        kube: a.kube.then_some(true),
        kubeconfig: a.kubeconfig,
        ..SettingsFile::default()
    };
    let s = settings(&a.common, flags)?;
    if s.manifests.is_empty() && !s.kube {
        anyhow::bail!(
            "no source: give --manifests PATH or --kube (or `manifests:` / `kube: true` in --config)"
        );
    }
    s.validate()?;
    Ok(s)
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let s = settings(&a.common, SettingsFile::default())?;
    let (objects, errors) = file::load(&a.paths, &s.limits);
    for e in &errors {
        println!("{e}");
    }
    println!("{} objects valid, {} errors", objects.len(), errors.len());
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `ringvip env`: nothing is printed on stdout when a manifest has an error, so
/// `eval "$(ringvip env ...)"` never half-applies.
fn env(a: EnvArgs) -> anyhow::Result<ExitCode> {
    let s = settings(&a.common, SettingsFile::default())?;
    let (objects, errors) = file::load(&a.paths, &s.limits);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let services = objects.iter().filter_map(|o| match o {
        ringvip::model::Object::Service(s) => Some(s),
        _ => None,
    });
    let vars = ringvip::envvars::for_namespace(&a.namespace, services);
    print!("{}", ringvip::envvars::render(&vars));
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; its logs would only crowd it.
    let default_level = match cli.cmd {
        Cmd::Demo { .. } => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGVIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let res = match cli.cmd {
        Cmd::Run(a) => run_settings(*a).and_then(|s| {
            ringvip::app::run(s, Arc::new(tokio::sync::Notify::new()), |_| {})
                .map(|()| ExitCode::SUCCESS)
        }),
        Cmd::Check(a) => check(a),
        Cmd::Env(a) => env(a),
        Cmd::Demo { once } => ringvip::demo::run(once).map(|()| ExitCode::SUCCESS),
        Cmd::Status { admin, output } => {
            let format = match output {
                StatusFormat::Table => status::Format::Table,
                StatusFormat::Wide => status::Format::Wide,
                StatusFormat::Json => status::Format::Json,
            };
            status::fetch(admin)
                .map(|rows| {
                    print!("{}", status::render(&rows, format));
                    ExitCode::SUCCESS
                })
                .map_err(Into::into)
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringvip: {e:#}");
            ExitCode::from(2)
        }
    }
}
