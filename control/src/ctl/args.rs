//! What `agiproxy ctl` takes: its flags and commands (clap).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use rustls::pki_types::ServerName;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// A replica's control API (its control.address), e.g.
    /// http://127.0.0.1:4574 or https://host:4574. There is no default: the
    /// control API has no default port. Given again, several replicas are
    /// acted on as with --cluster (one time for a rollout action on all).
    #[arg(long, conflicts_with_all = ["cluster", "socket"], global = true)]
    pub url: Vec<String>,
    /// One replica's control socket (its control.socket), on this host: no
    /// token needed, the file's permissions are the credential.
    #[arg(long, value_name = "PATH", conflicts_with = "cluster", global = true)]
    pub socket: Option<PathBuf>,
    /// Every replica behind a DNS name: dns:NAME:PORT (A/AAAA), or
    /// dns:_control._tcp.NAME (SRV, ports from the records; the helm chart's
    /// headless Service publishes `_control._tcp`).
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// Use https for --cluster replicas.
    #[arg(long, global = true)]
    pub https: bool,
    /// DNS server for --cluster (default: the system's resolver).
    #[arg(long, value_name = "IP:PORT", global = true, value_parser = dns_server)]
    pub dns_server: Option<SocketAddr>,
    /// File holding the bearer token.
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token.
    #[arg(
        long,
        value_name = "VAR",
        default_value = "AGIPROXY_TOKEN",
        global = true
    )]
    pub token_env: String,
    /// CA certificate (PEM) that signed the control API's certificate.
    #[arg(long, value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Check the certificate against NAME, a DNS name or an IP, sent as SNI
    /// and Host too, instead of the host of --url or --cluster (still connected to).
    #[arg(long, value_name = "NAME", value_parser = parse_server_name, global = true)]
    pub server_name: Option<String>,
    /// Client certificate (PEM), when the API requires one.
    #[arg(long, value_name = "FILE", requires = "key", global = true)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert", global = true)]
    pub key: Option<PathBuf>,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
    /// Tables for people, or JSON for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `--dns-server`: ip:port, IPv6 in brackets (`::1:5353` says which, not
/// clap's "invalid socket address syntax").
pub(super) fn dns_server(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        if text.matches(':').count() > 1 && !text.starts_with('[') {
            format!("{text:?}: write an IPv6 address in brackets before its port, e.g. [::1]:53")
        } else {
            format!("{text:?} is not ip:port, e.g. 127.0.0.1:53 or [::1]:53")
        }
    })
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = match num.parse() {
        Ok(n) => n,
        Err(_) if !num.is_empty() => return Err(format!("{s:?} is too long; e.g. 5s")),
        Err(_) => return Err(format!("{s:?}: write e.g. 500ms, 5s")),
    };
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(format!("{s:?}: write e.g. 500ms, 5s")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: no replica answers in no time; e.g. 5s"));
    }
    Ok(d)
}

/// A DNS name or an IP address, as a certificate carries it (clap names
/// the option in its error).
pub(super) fn parse_server_name(s: &str) -> Result<String, String> {
    // An IPv6 address as a URL writes it, [::1], is the address.
    let name = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .filter(|r| r.parse::<std::net::Ipv6Addr>().is_ok())
        .unwrap_or(s);
    ServerName::try_from(name)
        .map(|_| name.to_string())
        .map_err(|_| {
            format!(
                "{s:?} is not a DNS name or an IP address (write e.g. agiproxy.ops.svc or 10.0.0.5)"
            )
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Version, generation, config hash, listeners, sessions.
    Status,
    /// Show or change the running config.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Re-read the config file on the replica(s).
    Reload,
    /// Pools and their backends' state.
    Pools {
        /// Only this pool (default: every pool).
        pool: Option<String>,
    },
    /// Drain one backend: no new sessions, existing ones finish.
    Drain {
        /// The pool's name.
        pool: String,
        /// The backend's address, as `ctl pools` shows it.
        backend: String,
    },
    /// Take a drained backend back.
    Enable {
        /// The pool's name.
        pool: String,
        /// The backend's address, as `ctl pools` shows it.
        backend: String,
    },
    /// Set a route's pool weights: `split ROUTE blue=90 green=10`.
    Split {
        /// The route's name.
        route: String,
        /// A pool and its weight; every pool of the split, e.g. blue=90 green=10.
        #[arg(required = true, value_name = "POOL=WEIGHT")]
        weights: Vec<String>,
    },
    /// Drain the whole replica, as on SIGTERM: its listeners close at once.
    DrainReplica {
        /// With --cluster naming several replicas: drain every one of them at
        /// once (every listener closes; new calls fail until they restart).
        #[arg(long)]
        all_replicas: bool,
    },
    /// Blue-green rollouts declared in the config: status and overrides.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// State, step, weights, last judgement and sessions in flight per colour.
    Status {
        /// The route whose rollout to show (default: every rollout).
        route: Option<String>,
    },
    /// Hold the current step on every replica.
    Pause {
        /// The route of the rollout.
        route: String,
        /// Act only if the route still runs this rollout (the identity
        /// `rollout status` prints); refused (409) if a reload replaced it.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
    },
    /// Go on after a pause (the remaining steps shift by the pause).
    Resume {
        /// The route of the rollout.
        route: String,
        /// Act only if the route still runs this rollout (the identity
        /// `rollout status` prints); refused (409) if a reload replaced it.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
    },
    /// Send every new call to green; calls on blue finish there.
    Promote {
        /// The route of the rollout.
        route: String,
        /// Act only if the route still runs this rollout (the identity
        /// `rollout status` prints); refused (409) if a reload replaced it.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
    },
    /// Send every new call to blue; calls on green finish there.
    Rollback {
        /// The route of the rollout.
        route: String,
        /// Act only if the route still runs this rollout (the identity
        /// `rollout status` prints); refused (409) if a reload replaced it.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
    },
}

impl RolloutCommand {
    pub(super) fn action(&self) -> Option<(&'static str, &str)> {
        match self {
            RolloutCommand::Status { .. } => None,
            RolloutCommand::Pause { route, .. } => Some(("pause", route)),
            RolloutCommand::Resume { route, .. } => Some(("resume", route)),
            RolloutCommand::Promote { route, .. } => Some(("promote", route)),
            RolloutCommand::Rollback { route, .. } => Some(("rollback", route)),
        }
    }

    /// The rollout an action is meant for, when given.
    pub(super) fn identity(&self) -> Option<&str> {
        match self {
            RolloutCommand::Status { .. } => None,
            RolloutCommand::Pause { identity, .. }
            | RolloutCommand::Resume { identity, .. }
            | RolloutCommand::Promote { identity, .. }
            | RolloutCommand::Rollback { identity, .. } => identity.as_deref(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the running config.
    Get,
    /// Apply a config file (YAML or JSON).
    Apply {
        /// The config file to apply (YAML or JSON); `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Validate only.
        #[arg(long)]
        dry_run: bool,
        /// Apply only if this generation is still running (optimistic concurrency).
        #[arg(long, value_name = "GENERATION")]
        if_match: Option<u64>,
    },
}

/// Looks up the replicas of `--cluster` (A/AAAA for NAME:PORT, SRV for a
/// `_service._tcp` name); the binary provides it (it owns the resolver).
pub trait ClusterResolver {
    fn resolve(
        &self,
        spec: &str,
        dns_server: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Vec<SocketAddr>, String>>;
}
