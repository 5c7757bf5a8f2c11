//! The `ringvip` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;

use ringvip::config::{self, Limits, NodeOptions, Settings};
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
    /// Explain what ringvip does with a new flow from CLIENT to
    /// VIP:PORT[/PROTO], and why: the frontend it matches (or why none),
    /// every endpoint with why it is or is not eligible, ClientIP affinity
    /// for that client, and what a pick would choose.
    Explain(Box<ExplainArgs>),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExplainFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// The client's IP address.
    #[arg(value_name = "CLIENT")]
    client: String,
    /// Where the client connects: VIP:PORT[/tcp|udp] (TCP when not given;
    /// IPv6 as [ADDR]:PORT).
    #[arg(value_name = "VIP:PORT[/PROTO]")]
    to: String,
    /// The running ringvip's metrics address (its admin API).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    admin: SocketAddr,
    /// Explain against these manifest files or directories instead of a
    /// running ringvip: compiled for this node as `run` would, with no live
    /// state (health, affinity, limits).
    #[arg(
        long,
        value_name = "PATH",
        value_delimiter = ',',
        conflicts_with = "admin"
    )]
    manifests: Vec<PathBuf>,
    /// Output: text or json.
    #[arg(short = 'o', long, value_name = "FORMAT", default_value = "text")]
    output: ExplainFormat,
    #[command(flatten)]
    file: ConfigFile,
    #[command(flatten)]
    node: ExplainNode,
}

/// The settings `explain --manifests` compiles with.
#[derive(Debug, Args, Serialize)]
struct ExplainNode {
    #[command(flatten)]
    #[serde(flatten)]
    node: NodeOptions,
    #[command(flatten)]
    #[serde(flatten)]
    limits: Limits,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StatusFormat {
    Table,
    Wide,
    Json,
}

/// The settings file, for every subcommand that reads settings.
#[derive(Debug, Args)]
struct ConfigFile {
    /// Settings file (YAML; keys are the long flag names). Flags win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct Common {
    #[command(flatten)]
    file: ConfigFile,
    #[command(flatten)]
    limits: Limits,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    file: ConfigFile,
    #[command(flatten)]
    settings: Settings,
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

/// `ringvip check` and `ringvip env` read only the validation limits; the
/// settings file may still hold every setting.
fn limits(c: &Common, matches: &ArgMatches) -> anyhow::Result<Limits> {
    Ok(config::load(c.file.config.as_deref(), &c.limits, matches)?.limits)
}

fn run_settings(a: &RunArgs, matches: &ArgMatches) -> anyhow::Result<Settings> {
    let s = config::load(a.file.config.as_deref(), &a.settings, matches)?;
    s.validate()?;
    Ok(s)
}

fn check(a: CheckArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let limits = limits(&a.common, matches)?;
    let (objects, errors) = file::load(&a.paths, &limits);
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
fn env(a: EnvArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let limits = limits(&a.common, matches)?;
    let (objects, errors) = file::load(&a.paths, &limits);
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

/// `ringvip explain`: bad input is an error (exit code 2), a flow that is
/// refused or dropped is an answer (exit code 0).
fn explain(a: ExplainArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    use ringvip::explain;
    let q = explain::Query::parse(&a.client, &a.to)?;
    let e = if a.manifests.is_empty() {
        explain::fetch(a.admin, &q)?
    } else {
        let settings = config::load(a.file.config.as_deref(), &a.node, matches)?;
        let (e, errors) = explain::from_manifests(&a.manifests, &settings, &q)?;
        for err in errors {
            eprintln!("ringvip: {err} (explained without it)");
        }
        e
    };
    match a.output {
        ExplainFormat::Text => print!("{}", explain::render(&e)),
        ExplainFormat::Json => println!("{}", serde_json::to_string_pretty(&e)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// mimalloc, not glibc's malloc: at 100,000 Services, 41 % of start-up's
/// cycles went to glibc's own bookkeeping (`unlink_chunk`,
/// `malloc_consolidate`), and 40-60 % of a file reload's; mimalloc halves the
/// start (BENCHMARKS.md, "mimalloc, endpoint series from first use, ...").
/// jemalloc did as well but kept a UDP flood's pages past the fault suite's
/// RSS bound; mimalloc returns them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// No transparent huge pages for this process. mimalloc reserves large
/// arenas and touches them sparsely; backed by 2 MiB pages they multiplied
/// RSS (the fault suite's SYN flood: 2.2 GiB instead of 35 MiB). The crate's
/// `no_thp` feature stops it asking for them; this also covers hosts where
/// THP is `always`. Before anything else, so no page is faulted in huge.
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and sets a flag of
    // this process's memory map; failure (kernels before 3.15) leaves THP
    // as the host has it.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    // The matches are kept: they tell which settings the command line gave.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub = matches
        .subcommand()
        .map_or_else(|| matches.clone(), |(_, m)| m.clone());
    // The demo prints its own summary; its logs would only crowd it.
    let default_level = match cli.cmd {
        Cmd::Demo { .. } => "warn",
        _ => "info",
    };
    // `run`'s settings say how to log, so they are read first (their errors
    // are printed below, without a logger).
    let settings = match &cli.cmd {
        Cmd::Run(a) => Some(run_settings(a, &sub)),
        _ => None,
    };
    let format = match &settings {
        Some(Ok(s)) => s.log.log_format,
        _ => config::LogFormat::Text,
    };
    ringvip::logging::init(format, default_level);
    let res = match cli.cmd {
        Cmd::Run(_) => settings
            .unwrap_or_else(|| Err(anyhow::anyhow!("no settings for run")))
            .and_then(|s| {
                ringvip::app::run(s, Arc::new(tokio::sync::Notify::new()), Box::new(|_| {}))
                    .map(|()| ExitCode::SUCCESS)
            }),
        Cmd::Check(a) => check(a, &sub),
        Cmd::Env(a) => env(a, &sub),
        Cmd::Explain(a) => explain(*a, &sub),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `ringvip run --help` and the example settings file describe the same
    /// settings: a flag missing from the file, or a key that is no flag,
    /// fails here. A key is its flag's id with `_` → `-`.
    #[test]
    fn run_help_and_example_settings_file_list_the_same_settings() {
        let cli = Cli::command();
        let Some(run) = cli.find_subcommand("run") else {
            panic!("no run subcommand");
        };
        let help = run.clone().render_long_help().to_string();
        let mut flags = Vec::new();
        for a in run.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "config") {
                continue;
            }
            let long = a.get_long().unwrap_or_default();
            assert!(help.contains(&format!("--{long}")), "--{long} in --help");
            flags.push(id.replace('_', "-"));
        }
        let text = include_str!("../config/ringvip.yaml");
        let yaml: serde_yaml::Mapping = serde_yaml::from_str(text).unwrap();
        let mut keys: Vec<String> = yaml
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        flags.sort();
        keys.sort();
        let missing: Vec<_> = flags.iter().filter(|f| !keys.contains(f)).collect();
        let extra: Vec<_> = keys.iter().filter(|k| !flags.contains(k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "flags missing from config/ringvip.yaml: {missing:?}; keys that are no flag: {extra:?}"
        );
    }
}
