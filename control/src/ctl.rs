//! `agiproxy ctl`: a command line over the control API, for one replica
//! (`--url`, or `--socket` on its host) or every replica behind a DNS name
//! (`--cluster dns:NAME:PORT`).
//! Human-readable tables by default, `--output json` for scripts.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use rustls::pki_types::ServerName;
use serde::Serialize;

use crate::api::{
    Applied, BackendView, ConfigView, ErrorBody, PoolView, RolloutOverrideRequest, RolloutView,
    SplitRequest, SplitWeight, Status,
};
use crate::client::{Address, Client, Target};
use crate::tls::{connector, ClientTls};

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
fn dns_server(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        if text.matches(':').count() > 1 && !text.starts_with('[') {
            format!("{text:?}: write an IPv6 address in brackets before its port, e.g. [::1]:53")
        } else {
            format!("{text:?} is not ip:port, e.g. 127.0.0.1:53 or [::1]:53")
        }
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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
fn parse_server_name(s: &str) -> Result<String, String> {
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
    fn action(&self) -> Option<(&'static str, &str)> {
        match self {
            RolloutCommand::Status { .. } => None,
            RolloutCommand::Pause { route, .. } => Some(("pause", route)),
            RolloutCommand::Resume { route, .. } => Some(("resume", route)),
            RolloutCommand::Promote { route, .. } => Some(("promote", route)),
            RolloutCommand::Rollback { route, .. } => Some(("rollback", route)),
        }
    }

    /// The rollout an action is meant for, when given.
    fn identity(&self) -> Option<&str> {
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

/// One request, sent to every replica.
struct Call<'a> {
    method: &'a str,
    path: String,
    body: Option<Vec<u8>>,
    headers: Vec<(&'a str, String)>,
}

impl<'a> Call<'a> {
    fn new(
        method: &'a str,
        path: impl Into<String>,
        body: Option<Vec<u8>>,
        headers: Vec<(&'a str, String)>,
    ) -> Self {
        Call {
            method,
            path: path.into(),
            body,
            headers,
        }
    }
}

/// Each replica and what it reported (None: no answer).
type PerReplica = Vec<(String, Option<String>)>;

/// Each replica and its rollout as compared, or why there is none.
type RolloutPerReplica = Vec<(String, Result<String, String>)>;

/// Whether the replicas run the same config after a change.
struct Convergence {
    same: bool,
    /// Each replica's config hash.
    hashes: PerReplica,
    /// After a rollout action: the route, and each replica's rollout as
    /// `IDENTITY overrides: ...` (None: no answer). Replicas then converge
    /// when their rollouts agree, whatever else differs in their configs
    /// (a bare-metal fleet's per-replica listeners made every action end
    /// `NOT CONVERGED`, exit 1, like a refusal: audit). Err: why there is
    /// no rollout to compare (no answer, or the replica's error, e.g. a 404
    /// from one that has no such rollout).
    rollout: Option<(String, RolloutPerReplica)>,
}

/// A replica's rollout as compared after a rollout action: its identity,
/// its `split_key` and `canary` (outside the identity, but replicas that
/// differ in them colour calls differently: a refused `split_key` change
/// comes back with a restart) and its overrides (effective times), which an
/// action changes.
fn rollout_state(body: &serde_json::Value) -> Option<String> {
    let view: RolloutView = serde_json::from_value(body.clone()).ok()?;
    let overrides = if view.overrides.is_empty() {
        "none".to_string()
    } else {
        view.overrides.join(", ")
    };
    // The canary too: replicas with other canaries send the same call to
    // other colours (a file not applied everywhere yet).
    let canary = view
        .canary
        .as_ref()
        .map(|c| format!(" canary: {}", c.describe()))
        .unwrap_or_default();
    Some(format!(
        "{} split_key {}{canary} overrides: {overrides}",
        view.identity.as_deref().unwrap_or("(no identity)"),
        view.split_key.as_deref().unwrap_or("?")
    ))
}

/// One replica's answer.
#[derive(Debug, Serialize)]
struct Reply {
    replica: String,
    ok: bool,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs a ctl command; returns the process exit code (0 all good, 1 a
/// replica refused or failed, 2 bad usage).
pub async fn run<R: ClusterResolver>(args: CtlArgs, resolver: &R) -> i32 {
    match run_inner(args, resolver).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agiproxy ctl: {e}");
            2
        }
    }
}

/// The file `config apply -f` sends: any file, `/dev/stdin` included (so
/// not only regular files), read up to what any control API accepts
/// (`control.max_body_bytes`, at most 64 MiB) and no further.
fn read_config(file: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    const MAX: u64 = 64 << 20;
    let err = |e: &dyn std::fmt::Display| format!("-f {}: {e}", file.display());
    let mut text = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(MAX + 1)
            .read_to_end(&mut text)
            .map_err(|e| err(&e))?;
    } else {
        std::fs::File::open(file)
            .map_err(|e| err(&e))?
            .take(MAX + 1)
            .read_to_end(&mut text)
            .map_err(|e| err(&e))?;
    }
    if text.len() as u64 > MAX {
        return Err(err(&format!(
            "larger than {MAX} bytes, more than any control API accepts"
        )));
    }
    Ok(text)
}

async fn run_inner<R: ClusterResolver>(args: CtlArgs, resolver: &R) -> Result<i32, String> {
    let token = match &args.token_file {
        // The same bounds as the proxy's own token file.
        Some(f) => Some(crate::token::read_token(f).map_err(|e| format!("--token-file {e}"))?),
        None => match std::env::var(&args.token_env) {
            Ok(t) if !t.trim().is_empty() => {
                let t = t.trim();
                crate::token::presentable(t)
                    .map_err(|e| format!("--token-env {}: {e}", args.token_env))?;
                Some(t.to_string())
            }
            _ => None,
        },
    };
    let mut targets = targets(&args, resolver).await?;
    if let Some(name) = &args.server_name {
        // Only a certificate is checked against it: plain http (or the
        // control socket) has none, and ignoring it would hide a mistake.
        if !targets.iter().any(|t| t.https) {
            return Err(format!(
                "--server-name {name}: only for https (--url https://HOST:PORT, or --cluster \
                 with --https): there is no certificate to check"
            ));
        }
        // Every request, to every replica (and the convergence check after a change).
        for t in &mut targets {
            t.host = name.clone();
        }
    }
    if let CtlCommand::DrainReplica {
        all_replicas: false,
    } = args.command
    {
        // Every replica at once closes every listener: an outage, not a
        // drain (audit: the chart's notes offered it for the cluster).
        if targets.len() > 1 {
            return Err(format!(
                "drain-replica would drain all {} replicas at once: every listener closes and new \
                 calls fail until they restart. Drain one with --url (on Kubernetes, `kubectl \
                 delete pod NAME` drains it and takes it out of the Service first), or pass \
                 --all-replicas to drain every one",
                targets.len()
            ));
        }
    }
    let tls = if targets.iter().any(|t| t.https) {
        Some(
            connector(&ClientTls {
                ca: args.ca.clone(),
                cert: args.cert.clone(),
                key: args.key.clone(),
            })
            .map_err(|e| format!("TLS files (--ca, --cert, --key): {e}"))?,
        )
    } else if args.ca.is_some() || args.cert.is_some() || args.key.is_some() {
        // As --server-name: ignored, they would hide a plain-http mistake.
        return Err(
            "--ca, --cert and --key are for https (--url https://HOST:PORT, or --cluster with \
             --https); this replica is asked over plain http"
                .into(),
        );
    } else {
        None
    };
    let client = Client {
        token,
        tls,
        timeout: args.timeout,
    };
    let Call {
        method,
        path,
        body,
        headers,
    } = match &args.command {
        CtlCommand::Status => Call::new("GET", "/v1/status", None, vec![]),
        CtlCommand::Config(ConfigCommand::Get) => Call::new("GET", "/v1/config", None, vec![]),
        CtlCommand::Config(ConfigCommand::Apply {
            file,
            dry_run,
            if_match,
        }) => {
            let text = read_config(file)?;
            let mut headers = vec![("content-type", "application/yaml".to_string())];
            if let Some(g) = if_match {
                headers.push(("if-match", g.to_string()));
            }
            Call::new(
                "PUT",
                format!("/v1/config?dry_run={dry_run}"),
                Some(text),
                headers,
            )
        }
        CtlCommand::Reload => Call::new("POST", "/v1/reload", None, vec![]),
        CtlCommand::Pools { pool: None } => Call::new("GET", "/v1/pools", None, vec![]),
        CtlCommand::Pools { pool: Some(p) } => {
            Call::new("GET", format!("/v1/pools/{}", seg(p)), None, vec![])
        }
        CtlCommand::Drain { pool, backend } => Call::new(
            "POST",
            format!("/v1/pools/{}/backends/{}/drain", seg(pool), seg(backend)),
            None,
            vec![],
        ),
        CtlCommand::Enable { pool, backend } => Call::new(
            "POST",
            format!("/v1/pools/{}/backends/{}/enable", seg(pool), seg(backend)),
            None,
            vec![],
        ),
        CtlCommand::Split { route, weights } => {
            let split = weights
                .iter()
                .map(|w| {
                    let (pool, weight) = w
                        .split_once('=')
                        .ok_or_else(|| format!("{w:?}: write POOL=WEIGHT"))?;
                    let weight = weight.parse().map_err(|_| {
                        if !weight.is_empty() && weight.bytes().all(|b| b.is_ascii_digit()) {
                            format!("{w:?}: the weight is too large")
                        } else {
                            format!("{w:?}: the weight must be a whole number")
                        }
                    })?;
                    Ok(SplitWeight {
                        pool: pool.to_string(),
                        weight,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let body = serde_json::to_vec(&SplitRequest { split }).map_err(|e| e.to_string())?;
            Call::new(
                "PUT",
                format!("/v1/routes/{}/split", seg(route)),
                Some(body),
                vec![("content-type", "application/json".into())],
            )
        }
        CtlCommand::DrainReplica { .. } => Call::new("POST", "/v1/drain", None, vec![]),
        CtlCommand::Rollout(RolloutCommand::Status { route: None }) => {
            Call::new("GET", "/v1/rollouts", None, vec![])
        }
        CtlCommand::Rollout(RolloutCommand::Status { route: Some(r) }) => {
            Call::new("GET", format!("/v1/rollouts/{}", seg(r)), None, vec![])
        }
        CtlCommand::Rollout(cmd) => {
            let (action, route) = cmd.action().unwrap_or(("pause", ""));
            // One time for every replica: they all write the same override,
            // so they converge on one config (and one routing).
            let at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            // The time chosen; whether each replica took it is in its answer.
            eprintln!("{action} {route}: sending at {at} (in force the rollout's skew later on each replica that takes it)");
            let body = serde_json::to_vec(&RolloutOverrideRequest {
                at: Some(at),
                identity: cmd.identity().map(str::to_string),
            })
            .map_err(|e| e.to_string())?;
            Call::new(
                "POST",
                format!("/v1/rollouts/{}/{action}", seg(route)),
                Some(body),
                vec![("content-type", "application/json".into())],
            )
        }
    };
    let replies: Vec<Reply> = fan_out(&client, &targets, method, &path, &headers, body)
        .await
        .into_iter()
        .map(|r| understood(&args.command, r))
        .map(|r| hinted(r, &args.token_env))
        .collect();
    let mut code = if replies.iter().all(|r| r.ok) { 0 } else { 1 };

    // A change must leave every replica on the same config.
    let mut converged = None;
    let changes_config = matches!(
        args.command,
        CtlCommand::Config(ConfigCommand::Apply { dry_run: false, .. })
            | CtlCommand::Reload
            | CtlCommand::Split { .. }
    ) || matches!(&args.command, CtlCommand::Rollout(c) if c.action().is_some());
    // A rollout action every replica refused (no such route, say) changed
    // nothing anywhere: there is no rollout to compare, and "NOT
    // CONVERGED" over three 404s misled (audit). The errors say it all.
    let refused_everywhere = matches!(&args.command, CtlCommand::Rollout(c) if c.action().is_some())
        && !replies.iter().any(|r| r.ok);
    if changes_config && targets.len() > 1 && !refused_everywhere {
        let statuses = fan_out(&client, &targets, "GET", "/v1/status", &[], None).await;
        let hashes: Vec<Option<String>> = statuses
            .iter()
            .map(|r| {
                r.body
                    .as_ref()
                    .and_then(|b| b.get("hash"))
                    .and_then(|h| h.as_str())
                    .map(str::to_string)
            })
            .collect();
        let mut all_same = hashes.iter().all(|h| h.is_some() && *h == hashes[0]);
        let mut rollout = None;
        if let CtlCommand::Rollout(c) = &args.command {
            if let Some((_, route)) = c.action() {
                let path = format!("/v1/rollouts/{}", seg(route));
                let views = fan_out(&client, &targets, "GET", &path, &[], None).await;
                let states: RolloutPerReplica = views
                    .iter()
                    .map(|r| {
                        let state = match (&r.error, r.body.as_ref().and_then(rollout_state)) {
                            (None, Some(state)) => Ok(state),
                            (Some(e), _) if r.status == 0 => Err(format!("(no answer: {e})")),
                            (Some(e), _) => Err(format!("(HTTP {}: {e})", r.status)),
                            (None, None) => Err("(not a rollout in the answer)".to_string()),
                        };
                        (r.replica.clone(), state)
                    })
                    .collect();
                all_same = states.iter().all(|(_, s)| s.is_ok() && *s == states[0].1);
                rollout = Some((route.to_string(), states));
            }
        }
        converged = Some(Convergence {
            same: all_same,
            hashes: statuses
                .iter()
                .zip(&hashes)
                .map(|(r, h)| (r.replica.clone(), h.clone()))
                .collect(),
            rollout,
        });
        if !all_same {
            code = 1;
        }
    }
    print(&args, &replies, converged.as_ref());
    // A backup (`ctl config get > f`) cut short by a full disk is a failure.
    if WRITE_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
        code = code.max(1);
    }
    Ok(code)
}

/// Set when stdout refused a line for another reason than a reader that
/// went away.
static WRITE_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A name typed on the command line as one path segment: `ivr?x` or
/// `blue/backends/...` must name what it says, not another request (audit:
/// `enable 'p/backends/ADDR/drain?' x` drained ADDR). `:` stays, for
/// `ip:port`; brackets of IPv6 are encoded and decoded by the server.
fn seg(name: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b':');
    percent_encoding::utf8_percent_encode(name, SEGMENT).to_string()
}

/// What to do about a few errors whose words alone do not say it.
fn hinted(mut r: Reply, token_env: &str) -> Reply {
    if let Some(e) = &mut r.error {
        if r.status == 401 {
            e.push_str(&format!(
                " (give ctl the token: --token-file FILE, or ${token_env})"
            ));
        } else if r.status == 0 && e.contains("InvalidContentType") {
            e.push_str(
                " (the replica answered plain http: use http://, or turn on its control.tls)",
            );
        } else if r.status == 0 && e.contains("invalid HTTP version") {
            e.push_str(" (the replica serves https: use https:// with --ca)");
        }
    }
    r
}

/// A 2xx answer `cmd` cannot read is no success: another server on the
/// port (`--url` to the wrong one), or an incompatible version. It printed
/// nothing and exited 0 (audit).
fn understood(cmd: &CtlCommand, mut r: Reply) -> Reply {
    use serde::de::DeserializeOwned;
    fn is<T: DeserializeOwned>(b: &serde_json::Value) -> bool {
        serde_json::from_value::<T>(b.clone()).is_ok()
    }
    if !r.ok {
        return r;
    }
    let Some(body) = &r.body else { return r };
    let fits = match cmd {
        CtlCommand::Status => is::<Status>(body),
        CtlCommand::Config(ConfigCommand::Get) => is::<ConfigView>(body),
        CtlCommand::Pools { .. } => is::<Vec<PoolView>>(body) || is::<PoolView>(body),
        CtlCommand::Drain { .. } | CtlCommand::Enable { .. } => is::<BackendView>(body),
        CtlCommand::DrainReplica { .. } => body.is_object(),
        CtlCommand::Rollout(RolloutCommand::Status { .. }) => {
            is::<Vec<RolloutView>>(body) || is::<RolloutView>(body)
        }
        CtlCommand::Config(ConfigCommand::Apply { .. })
        | CtlCommand::Reload
        | CtlCommand::Split { .. }
        | CtlCommand::Rollout(_) => is::<Applied>(body),
    };
    // JSON that this ctl cannot read as it expects is a replica of another
    // version (a field added since): not refused, printed as it came (see
    // `print_table`). What is not JSON at all is no control API.
    if !(fits || body.is_object() || body.is_array()) {
        let text = match body {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let shown: String = text.chars().take(120).collect();
        r.ok = false;
        r.error = Some(format!(
            "unexpected answer (HTTP {}), not what an agiproxy control API of this version \
             sends: is the address right? {shown:?}",
            r.status
        ));
    }
    r
}

async fn targets<R: ClusterResolver>(args: &CtlArgs, resolver: &R) -> Result<Vec<Target>, String> {
    let spec = match (&args.cluster, &args.socket, args.url.as_slice()) {
        (Some(spec), _, _) => spec,
        (None, Some(path), _) => return Ok(vec![Target::socket(path.clone())]),
        (None, None, urls @ [_, ..]) => {
            let mut targets = Vec::with_capacity(urls.len());
            for url in urls {
                // A host name is looked up by the system's resolver, which
                // blocks: off this thread, and within --timeout (review).
                let u = url.clone();
                let found = tokio::time::timeout(
                    args.timeout,
                    tokio::task::spawn_blocking(move || target_from_url(&u)),
                )
                .await
                .map_err(|_| {
                    format!(
                        "--url {url}: no address within {:?} (--timeout)",
                        args.timeout
                    )
                })?
                .map_err(|e| format!("--url {url}: {e}"))?;
                targets.push(found?);
            }
            return Ok(targets);
        }
        (None, None, []) => {
            return Err(
                "say which replica: --url http://HOST:PORT (its control.address), \
                 --socket PATH (its control.socket) or --cluster dns:NAME:PORT"
                    .into(),
            )
        }
    };
    let name = spec.strip_prefix("dns:").ok_or_else(|| {
        format!("--cluster {spec:?}: write dns:NAME:PORT or dns:_service._tcp.NAME")
    })?;
    // Bounded like every request: a silent DNS server held ctl for the
    // resolver's own retries (4 s with --timeout 500ms: audit).
    let addrs = tokio::time::timeout(args.timeout, resolver.resolve(name, args.dns_server))
        .await
        .map_err(|_| {
            format!(
                "--cluster {spec}: no DNS answer within {:?} (--timeout)",
                args.timeout
            )
        })?
        .map_err(|e| format!("--cluster {spec}: {e}"))?;
    if addrs.is_empty() {
        return Err(format!("--cluster {spec}: no replica found"));
    }
    let host = tls_name(name);
    Ok(addrs
        .into_iter()
        .map(|addr| Target {
            addr: Address::Tcp(addr),
            https: args.https,
            host: host.clone(),
        })
        .collect())
}

/// The name the replicas' certificates carry: NAME of `NAME:PORT`, or the
/// SRV name without its `_service._tcp.` labels.
fn tls_name(name: &str) -> String {
    let labels: Vec<&str> = name.splitn(3, '.').collect();
    if labels.len() == 3 && labels[0].starts_with('_') && labels[1].starts_with('_') {
        return labels[2].trim_end_matches('.').to_string();
    }
    name.rsplit_once(':').map_or(name, |(h, _)| h).to_string()
}

fn target_from_url(url: &str) -> Result<Target, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "--url {url:?}: write http://HOST:PORT or https://HOST:PORT"
        ));
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains(['/', '?', '#']) {
        return Err(format!(
            "--url {url:?}: give the replica only, http(s)://HOST:PORT, without a path or query"
        ));
    }
    if !hostport.starts_with('[') && hostport.matches(':').count() > 1 {
        return Err(format!(
            "--url {url:?}: an IPv6 address takes brackets before its port, e.g. http://[::1]:4574"
        ));
    }
    let port = if hostport.starts_with('[') {
        hostport.split_once("]:").map(|(_, p)| p)
    } else {
        hostport.rsplit_once(':').map(|(_, p)| p)
    };
    match port.map(str::parse::<u16>) {
        None => {
            return Err(format!(
                "--url {url:?}: give the port of the replica's control.address, e.g. {url}:4574"
            ))
        }
        Some(Ok(0)) => return Err(format!("--url {url:?}: port 0 is no replica's port")),
        Some(Err(_)) => {
            return Err(format!(
                "--url {url:?}: the port is not a number from 1 to 65535"
            ))
        }
        Some(_) => {}
    }
    let addr: SocketAddr = hostport.parse().or_else(|_| {
        use std::net::ToSocketAddrs;
        hostport
            .to_socket_addrs()
            .map_err(|e| format!("--url {url}: {e}"))?
            .next()
            .ok_or_else(|| format!("--url {url}: no address"))
    })?;
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string();
    Ok(Target {
        addr: Address::Tcp(addr),
        https,
        host,
    })
}

async fn fan_out(
    client: &Client,
    targets: &[Target],
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> Vec<Reply> {
    let calls = targets.iter().map(|t| {
        let body = body.clone();
        async move {
            match client.call(t, method, path, headers, body).await {
                Ok(resp) => {
                    let json: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
                    let ok = (200..300).contains(&resp.status);
                    let error = (!ok).then(|| {
                        match json
                            .as_ref()
                            .and_then(|j| serde_json::from_value::<ErrorBody>(j.clone()).ok())
                        {
                            Some(e) => {
                                let details: Vec<String> = e
                                    .errors
                                    .iter()
                                    .map(|f| {
                                        if f.path.is_empty() {
                                            f.message.clone()
                                        } else {
                                            format!("{}: {}", f.path, f.message)
                                        }
                                    })
                                    .collect();
                                if details.is_empty() {
                                    e.error
                                } else {
                                    format!("{}\n  {}", e.error, details.join("\n  "))
                                }
                            }
                            None => String::from_utf8_lossy(&resp.body).trim().to_string(),
                        }
                    });
                    let body = json.or_else(|| {
                        Some(serde_json::Value::String(
                            String::from_utf8_lossy(&resp.body).into_owned(),
                        ))
                    });
                    Reply {
                        replica: t.to_string(),
                        ok,
                        status: resp.status,
                        body,
                        error,
                    }
                }
                Err(e) => Reply {
                    replica: t.to_string(),
                    ok: false,
                    status: 0,
                    body: None,
                    error: Some(e.to_string()),
                },
            }
        }
    });
    futures_util::future::join_all(calls).await
}

/// Prints a line to stdout, or returns from the printing function when it cannot: a reader
/// that went away (`ctl ... | head -1`) ends the output quietly, as with `ls | head`. The
/// exit code still tells the outcome, settled before anything is printed.
macro_rules! out {
    ($($arg:tt)*) => {
        if !line(format_args!($($arg)*)) {
            return;
        }
    };
}

/// [`line`] for a text written as it is, without a line break added.
fn text(t: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    written(out.write_all(t.as_bytes()).and_then(|()| out.flush()))
}

fn line(args: std::fmt::Arguments<'_>) -> bool {
    use std::io::Write;
    written(writeln!(std::io::stdout().lock(), "{args}"))
}

/// Whether printing may go on: a reader that went away ends it quietly;
/// any other failure is said, and makes the exit code 1.
fn written(r: std::io::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
        Err(e) => {
            eprintln!("agiproxy ctl: cannot write to stdout: {e}");
            WRITE_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            false
        }
    }
}

fn print(args: &CtlArgs, replies: &[Reply], converged: Option<&Convergence>) {
    if matches!(
        args.command,
        CtlCommand::Config(ConfigCommand::Apply { .. })
    ) {
        warn_dropped(replies);
    }
    if args.output == Output::Json {
        let mut doc = serde_json::json!({ "replicas": replies });
        if let Some(Convergence {
            same,
            hashes,
            rollout,
        }) = converged
        {
            doc["converged"] = serde_json::json!(same);
            doc["hashes"] = serde_json::json!(hashes
                .iter()
                .map(|(r, h)| serde_json::json!({"replica": r, "hash": h}))
                .collect::<Vec<_>>());
            if let Some((_, states)) = rollout {
                doc["rollouts"] = serde_json::json!(states
                    .iter()
                    .map(|(r, s)| match s {
                        Ok(s) => serde_json::json!({"replica": r, "rollout": s}),
                        Err(e) => serde_json::json!({"replica": r, "rollout": null, "error": e}),
                    })
                    .collect::<Vec<_>>());
            }
        }
        out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    for r in replies {
        if replies.len() > 1 {
            out!("== {}", r.replica);
        }
        if let Some(e) = &r.error {
            out!(
                "ERROR ({}): {e}",
                if r.status == 0 {
                    "no answer".to_string()
                } else {
                    r.status.to_string()
                }
            );
            continue;
        }
        let Some(body) = &r.body else { continue };
        print_table(&args.command, body, replies.len() > 1);
    }
    if matches!(args.command, CtlCommand::Status) && replies.len() > 1 {
        // Read by eye, hashes of several replicas hid a difference; the
        // exit code stays 0 (bare-metal replicas differ by their addresses).
        let hashes: Vec<&str> = replies
            .iter()
            .filter_map(|r| r.body.as_ref()?.get("hash")?.as_str())
            .collect();
        let mut distinct = hashes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        match distinct.as_slice() {
            [one] if hashes.len() == replies.len() => {
                out!("configs: all {} replicas run {one}", replies.len())
            }
            // One config among those that answered is no disagreement
            // ("1 different" read as one: walkthrough).
            [one] => out!(
                "configs: the {} of {} replicas that answered run {one}; {} did not answer",
                hashes.len(),
                replies.len(),
                replies.len() - hashes.len()
            ),
            _ => out!(
                "configs: {} different among the {} of {} replicas that answered ({})",
                distinct.len(),
                hashes.len(),
                replies.len(),
                distinct.join(", ")
            ),
        }
    }
    match converged {
        Some(Convergence {
            same,
            rollout: Some((route, states)),
            hashes,
        }) => {
            if *same {
                out!(
                    "converged: all {} replicas run rollout {route} {}",
                    states.len(),
                    states[0].1.as_deref().unwrap_or("?")
                );
                if !hashes.iter().all(|(_, h)| h.is_some() && *h == hashes[0].1) {
                    out!("(their config texts differ otherwise: `ctl status` shows each hash)");
                }
            } else {
                out!("NOT CONVERGED (rollout {route}):");
                for (replica, state) in states {
                    match state {
                        Ok(s) | Err(s) => out!("  {replica}  {s}"),
                    }
                }
            }
        }
        Some(Convergence { same, hashes, .. }) => {
            if *same {
                out!(
                    "converged: all {} replicas run config {}",
                    hashes.len(),
                    hashes[0].1.as_deref().unwrap_or("?")
                );
            } else {
                out!("NOT CONVERGED:");
                for (replica, hash) in hashes {
                    out!("  {replica}  {}", hash.as_deref().unwrap_or("(no answer)"));
                }
            }
        }
        None => {}
    }
}

/// An answer `print_table` cannot read: shown as it came.
fn raw(body: &serde_json::Value) {
    out!("(an answer this ctl does not know how to show: another agiproxy version?)");
    out!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
}

/// `several`: replies of several replicas follow one another.
fn print_table(cmd: &CtlCommand, body: &serde_json::Value, several: bool) {
    match cmd {
        CtlCommand::Status => {
            if let Ok(s) = serde_json::from_value::<Status>(body.clone()) {
                out!("version     {}\nuptime      {:.0}s\ngeneration  {}\nhash        {}\nsource      {}{}\nsessions    {}\ndraining    {}",
                    s.version, s.uptime_seconds, s.generation, s.hash, s.source,
                    if s.differs_from_file { " (differs from the file)" } else { "" }, s.active_sessions, s.draining);
                for l in s.listeners {
                    out!("listener    {} {}", l.name, l.address);
                }
                for note in s.rollouts_differ {
                    out!("rollout     {note}");
                }
            } else {
                raw(body);
            }
        }
        CtlCommand::Config(ConfigCommand::Get) => {
            if let Ok(c) = serde_json::from_value::<ConfigView>(body.clone()) {
                // The text alone on stdout, byte for byte: `ctl config get >
                // f` then `ctl config apply -f f` is the same config (same
                // hash); the comment put before it made another (audit).
                eprintln!(
                    "# generation {} hash {} from {}",
                    c.generation, c.hash, c.source
                );
                // Byte for byte; between replicas' texts, a line break where
                // one lacks its last (the next `== replica` line was glued on).
                if text(&c.text) && several && !c.text.ends_with('\n') {
                    out!("");
                }
            } else {
                raw(body);
            }
        }
        CtlCommand::Pools { .. } => {
            let Ok(pools) = serde_json::from_value::<Vec<PoolView>>(body.clone())
                .or_else(|_| serde_json::from_value::<PoolView>(body.clone()).map(|p| vec![p]))
            else {
                return raw(body);
            };
            let w = widths(pools.iter().flat_map(|p| {
                p.backends
                    .iter()
                    .map(|b| (p.name.as_str(), b.address.as_str()))
            }));
            out!("{}", backend_row(POOLS_COLUMNS, w));
            for p in pools {
                for b in &p.backends {
                    out!("{}", backend_row(backend_cells(&p.name, b), w));
                }
            }
        }
        // The backend as `ctl pools` shows it, so the new state is read
        // where it is usually read (the JSON stays with `--output json`).
        CtlCommand::Drain { pool, .. } | CtlCommand::Enable { pool, .. } => {
            match serde_json::from_value::<BackendView>(body.clone()) {
                Ok(b) => {
                    let w = widths([(pool.as_str(), b.address.as_str())].into_iter());
                    out!("{}", backend_row(POOLS_COLUMNS, w));
                    out!("{}", backend_row(backend_cells(pool, &b), w));
                }
                Err(_) => raw(body),
            }
        }
        CtlCommand::DrainReplica { .. } => {
            out!("draining: listeners closed, calls in flight finish, then the replica exits (at once if it has none); until then `ctl status` shows what is left")
        }
        CtlCommand::Rollout(RolloutCommand::Status { .. }) => {
            let Ok(list) = serde_json::from_value::<Vec<RolloutView>>(body.clone())
                .or_else(|_| serde_json::from_value::<RolloutView>(body.clone()).map(|r| vec![r]))
            else {
                return raw(body);
            };
            if list.is_empty() {
                out!("no rollout in the running config");
            }
            for r in list {
                let text = format_rollout(&r);
                out!("{}", text.strip_suffix('\n').unwrap_or(&text));
            }
        }
        CtlCommand::Config(ConfigCommand::Apply { .. })
        | CtlCommand::Reload
        | CtlCommand::Split { .. }
        | CtlCommand::Rollout(_) => {
            if let Ok(a) = serde_json::from_value::<Applied>(body.clone()) {
                let what = if a.dry_run && a.changed {
                    "valid (dry run, nothing changed; it would change the running config)"
                } else if a.dry_run {
                    "valid (dry run, nothing changed; the same as the running config)"
                } else if a.changed {
                    "applied"
                } else {
                    "unchanged"
                };
                match &a.reason {
                    Some(why) => out!(
                        "{what}: generation {} hash {} ({why})",
                        a.generation,
                        a.hash
                    ),
                    None => out!("{what}: generation {} hash {}", a.generation, a.hash),
                }
            } else {
                raw(body);
            }
        }
    }
}

/// `PUT /v1/config` takes a text as it is: an override written through
/// `ctl rollout` that the file lacks is gone (green takes calls again after
/// a rollback), where a reload from the file keeps it. Said on stderr, for
/// every output format (stdout, which scripts read, is unchanged), naming
/// the replica.
fn warn_dropped(replies: &[Reply]) {
    for r in replies {
        let Some(a) = r
            .body
            .clone()
            .and_then(|b| serde_json::from_value::<Applied>(b).ok())
        else {
            continue;
        };
        for o in &a.dropped_overrides {
            let done = if a.dry_run {
                "would drop a rollout override it runs"
            } else {
                "dropped a rollout override it ran"
            };
            eprintln!(
                "warning: {}: this config {done} ({o}); a reload from the file would have kept it. \
                 To keep it, write it into the file's rollout overrides and apply that (`ctl rollout` \
                 again would give it a new time)",
                r.replica
            );
        }
    }
}

/// The columns of `ctl pools`' table.
const POOLS_COLUMNS: [&str; 7] = [
    "POOL",
    "BACKEND",
    "STATE",
    "WEIGHT",
    "ACTIVE",
    "TOTAL",
    "EJECTIONS",
];

/// One line of `ctl pools`' table; `w`: the widths of its first two
/// columns (a long pool name or an IPv6 backend widens them, rather than
/// push the line out of line).
fn backend_row<S: std::fmt::Display>(c: [S; 7], w: (usize, usize)) -> String {
    format!(
        "{:<w0$} {:<w1$} {:<11} {:>6} {:>8} {:>8} {:>9}",
        c[0],
        c[1],
        c[2],
        c[3],
        c[4],
        c[5],
        c[6],
        w0 = w.0,
        w1 = w.1
    )
}

/// The widths of the table's first two columns for these rows.
fn widths<'a>(rows: impl Iterator<Item = (&'a str, &'a str)>) -> (usize, usize) {
    rows.fold((16, 24), |(p, b), (pool, backend)| {
        (p.max(pool.chars().count()), b.max(backend.chars().count()))
    })
}

fn backend_cells(pool: &str, b: &BackendView) -> [String; 7] {
    [
        pool.to_string(),
        b.address.clone(),
        b.state.clone(),
        b.weight.to_string(),
        b.active_sessions.to_string(),
        b.total_sessions.to_string(),
        b.ejections.to_string(),
    ]
}

/// `ctl rollout status` for one route, as printed.
pub fn format_rollout(r: &RolloutView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let steps: Vec<String> = r.steps.iter().map(|s| format!("{s}%")).collect();
    let _ = writeln!(
        out,
        "route {}: {} -> {}  state {}  step {} of {} [{}]  green {}% of new calls",
        r.route,
        r.from,
        r.to,
        r.state,
        r.step.map_or("-".into(), |s| s.to_string()),
        r.steps.len(),
        steps.join(" "),
        r.weight_percent
    );
    // Not started yet (pending, or paused before its start).
    let ahead = humantime::parse_rfc3339_weak(&r.start)
        .is_ok_and(|start| start > std::time::SystemTime::now());
    let verb = if ahead { "starts " } else { "started" };
    match &r.identity {
        Some(id) => {
            let _ = writeln!(out, "  {verb}   {}  identity {id}", r.start);
        }
        None => {
            let _ = writeln!(out, "  {verb}   {}", r.start);
        }
    }
    if let Some(k) = &r.split_key {
        let _ = writeln!(out, "  split key {k}");
    }
    if let Some(n) = &r.next_step_at {
        let _ = writeln!(out, "  next step {n}");
    }
    if let Some(c) = &r.canary {
        let _ = writeln!(
            out,
            "  canary    {} (any one matching goes to green until a rollback)",
            c.describe()
        );
    }
    let _ = writeln!(
        out,
        "  in flight blue {} green {}  (unkeyed sessions {})",
        r.active_blue, r.active_green, r.unkeyed_sessions
    );
    for o in &r.overrides {
        let _ = writeln!(out, "  override  {o}");
    }
    if let Some(d) = &r.decision {
        let _ = writeln!(
            out,
            "  ROLLED BACK at {} (tick {}, {}): {}",
            d.at, d.tick, d.source, d.reason
        );
    }
    if let Some(e) = &r.last_evaluation {
        let _ = writeln!(
            out,
            "  judged    tick {} ({}) step {} over {} replica(s): blue {} sessions, green {}: {}",
            e.tick, e.at, e.step, e.replicas, e.blue.sessions, e.green.sessions, e.verdict
        );
    }
    if let Some(ms) = r.peer_clock_offset_ms {
        let _ = writeln!(
            out,
            "  clocks    the farthest peer's is {ms:+} ms from this replica's (last judgement)"
        );
    }
    if let Some(d) = &r.differs_from_file {
        let _ = writeln!(out, "  DIFFERS FROM THE FILE: {d}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `--url` mistake is named for what it is (audit: a path was an
    /// "invalid port value", `::1:P` was taken, port 0 was asked).
    #[test]
    fn url_mistakes_are_named() {
        for (url, says) in [
            ("http://127.0.0.1:4574/v1", "without a path or query"),
            ("http://127.0.0.1:4574?x=1", "without a path or query"),
            ("http://127.0.0.1", "give the port"),
            ("http://[::1]", "give the port"),
            ("http://::1:4574", "takes brackets"),
            ("http://127.0.0.1:0", "port 0"),
            ("http://127.0.0.1:99999", "from 1 to 65535"),
        ] {
            let e = target_from_url(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
        assert!(target_from_url("http://[::1]:4574/").is_ok());
    }

    #[test]
    fn a_timeout_is_more_than_nothing_and_fits() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").unwrap_err().contains("no time"));
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("99999999999999999999s")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_duration("5m").unwrap_err().contains("500ms"));
    }

    #[test]
    fn a_401_says_how_to_give_the_token_and_plain_http_how_to_reach_it() {
        let reply = |status, error: &str| Reply {
            replica: "http://127.0.0.1:1".into(),
            ok: false,
            status,
            body: None,
            error: Some(error.into()),
        };
        let r = hinted(reply(401, "missing bearer token"), "AGIPROXY_TOKEN");
        assert!(r
            .error
            .unwrap()
            .ends_with("(give ctl the token: --token-file FILE, or $AGIPROXY_TOKEN)"));
        let r = hinted(
            reply(
                0,
                "TLS: received corrupt message of type InvalidContentType",
            ),
            "T",
        );
        assert!(r.error.unwrap().contains("use http://"));
        let r = hinted(reply(0, "HTTP: invalid HTTP version parsed"), "T");
        assert!(r.error.unwrap().contains("use https://"));
        let r = hinted(reply(404, "no pool \"x\""), "T");
        assert_eq!(r.error.unwrap(), "no pool \"x\"");
    }

    /// A long pool name or an IPv6 backend widens its column: every row's
    /// STATE starts where the header's does.
    #[test]
    fn the_pools_table_stays_in_line_with_long_names() {
        let rows = [
            ("a-rather-long-pool-name", "[fd00:1234:5678::10]:4573"),
            ("ivr", "10.0.0.1:4573"),
        ];
        let w = widths(rows.iter().copied());
        let lines: Vec<String> = std::iter::once(backend_row(POOLS_COLUMNS, w))
            .chain(
                rows.iter()
                    .map(|(p, b)| backend_row([*p, *b, "healthy", "1", "0", "0", "0"], w)),
            )
            .collect();
        let at = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(
            at(&lines[1], "healthy"),
            at(&lines[0], "STATE"),
            "{lines:#?}"
        );
        assert_eq!(
            at(&lines[2], "healthy"),
            at(&lines[0], "STATE"),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_dns_server_in_ipv6_wants_brackets() {
        assert_eq!(dns_server("[::1]:53"), Ok("[::1]:53".parse().unwrap()));
        assert_eq!(
            dns_server("127.0.0.1:53"),
            Ok("127.0.0.1:53".parse().unwrap())
        );
        assert!(dns_server("::1:26053").unwrap_err().contains("[::1]:53"));
        assert!(dns_server("dns.local:53")
            .unwrap_err()
            .contains("not ip:port"));
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            target_from_url("http://127.0.0.1:4574").unwrap(),
            Target {
                addr: Address::Tcp("127.0.0.1:4574".parse().unwrap()),
                https: false,
                host: "127.0.0.1".into()
            }
        );
        let t = target_from_url("https://[::1]:9443/").unwrap();
        assert!(
            t.https && t.host == "::1" && t.addr == Address::Tcp("[::1]:9443".parse().unwrap())
        );
        assert!(target_from_url("127.0.0.1:4574").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("5").is_err());
        assert_eq!(
            tls_name("_control._tcp.agiproxy.ops.svc"),
            "agiproxy.ops.svc"
        );
        assert_eq!(tls_name("agiproxy.ops.svc:9090"), "agiproxy.ops.svc");
    }

    #[test]
    fn server_names_parse() {
        assert_eq!(parse_server_name("control.test").unwrap(), "control.test");
        assert_eq!(parse_server_name("10.0.0.5").unwrap(), "10.0.0.5");
        assert_eq!(parse_server_name("[::1]").unwrap(), "::1");
        for bad in [
            "",
            "-",
            "a b",
            "[control.test]",
            "https://control.test",
            "control.test:9090",
        ] {
            let e = parse_server_name(bad).unwrap_err();
            assert!(
                e.contains("not a DNS name or an IP address"),
                "{bad:?}: {e}"
            );
        }
    }

    /// The option's error names it (clap), before any request.
    #[test]
    fn a_bad_server_name_is_refused_naming_the_option() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        let e = Cli::try_parse_from([
            "ctl",
            "--url",
            "https://127.0.0.1:9090",
            "--server-name",
            "not a name",
            "status",
        ])
        .err()
        .expect("refused");
        let text = e.to_string();
        assert!(
            text.contains("--server-name <NAME>") && text.contains("not a DNS name"),
            "{text}"
        );
        let ok = Cli::try_parse_from(["ctl", "status", "--server-name", "control.test"]).unwrap();
        assert_eq!(ok.ctl.server_name.as_deref(), Some("control.test"));
    }

    /// Replicas converge on a rollout only with the same canary: other
    /// criteria send the same call to other colours.
    #[test]
    fn the_compared_rollout_includes_the_canary() {
        let view = |canary: serde_json::Value| {
            let mut v = serde_json::json!({
                "route": "ivr", "from": "blue", "to": "green", "state": "pending",
                "step": null, "steps": [10.0, 100.0], "weight_percent": 0.0,
                "start": "2026-12-06T09:00:00Z", "overrides": [],
                "active_blue": 0, "active_green": 0, "unkeyed_sessions": 0,
                "identity": "5d0c3a9e41b7f268", "split_key": "agi_uniqueid",
            });
            if !canary.is_null() {
                v["canary"] = canary;
            }
            rollout_state(&v).unwrap()
        };
        let none = view(serde_json::Value::Null);
        let one = view(serde_json::json!({ "query": { "canary": "1" } }));
        let other = view(serde_json::json!({ "query": { "canary": "2" } }));
        assert_eq!(
            none,
            "5d0c3a9e41b7f268 split_key agi_uniqueid overrides: none"
        );
        assert_eq!(
            one,
            "5d0c3a9e41b7f268 split_key agi_uniqueid canary: query canary=1 overrides: none"
        );
        assert_ne!(one, other);
    }

    /// `rollout status` prints the canary's criteria when there is one,
    /// in `agiproxy check`'s words; nothing when there is none.
    #[test]
    fn rollout_status_prints_the_canary() {
        let view = |canary: serde_json::Value| -> RolloutView {
            let mut v = serde_json::json!({
                "route": "ivr", "from": "blue", "to": "green", "state": "pending",
                "step": null, "steps": [10.0, 100.0], "weight_percent": 0.0,
                "start": "2026-12-06T09:00:00Z", "overrides": [],
                "active_blue": 0, "active_green": 0, "unkeyed_sessions": 0,
            });
            if !canary.is_null() {
                v["canary"] = canary;
            }
            serde_json::from_value(v).unwrap()
        };
        let printed = format_rollout(&view(serde_json::json!({
            "query": { "canary": "1" },
            "args": { "2": "^qa$" },
            "vars": { "agi_callerid": "^\\+1555" },
            "source": ["10.9.0.0/24"],
        })));
        assert!(
            printed.contains(
                "\n  canary    query canary=1, args 2~^qa$, vars agi_callerid~^\\+1555, \
                 source 10.9.0.0/24 (any one matching goes to green until a rollback)\n"
            ),
            "{printed}"
        );
        let printed = format_rollout(&view(serde_json::Value::Null));
        assert!(!printed.contains("canary"), "{printed}");
        // Its start is past: "started".
        assert!(
            printed.contains("\n  started   2026-12-06T09:00:00Z\n"),
            "{printed}"
        );
        // Ahead (pending, or paused before it): "starts", not "started" at
        // a future time.
        let mut ahead = view(serde_json::Value::Null);
        ahead.start = "2999-01-01T00:00:00Z".into();
        ahead.split_key = Some("agi_arg_1".into());
        let printed = format_rollout(&ahead);
        assert!(
            printed.contains("\n  starts    2999-01-01T00:00:00Z\n  split key agi_arg_1\n"),
            "{printed}"
        );
    }
}
