//! The `agiproxy` binary: flags, signals, and a call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use agiproxy::control::ControlHandle;
use agiproxy::credentials::{self, Followed};
use agiproxy::logging::{self, LogFormat};
use agiproxy::server::{FileRollouts, Origin};
use agiproxy::Server;
use agiproxy_config::{BackendTarget, Control, Dns, TokenSource};
use agiproxy_control::server::{PreparedControl, ServeOptions};
use agiproxy_control::tls::TlsFiles;
use agiproxy_control::token::FollowedToken;

mod demo;

#[derive(Parser)]
#[command(
    name = "agiproxy",
    version,
    about = "A clustered FastAGI proxy and load balancer for Asterisk"
)]
struct Cli {
    // Given before the command, for `run` and `demo`; before `check` or
    // `ctl`, refused (`serving_options_unused`).
    #[command(flatten)]
    serving: Serving,
    #[command(subcommand)]
    command: Command,
}

/// Options of the commands that serve calls (`run`, `demo`), accepted before or after the
/// command name; `check` and `ctl` neither take nor list them.
#[derive(clap::Args, Clone)]
struct Serving {
    /// Log format: human-readable text or JSON lines [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax) [default: info]; RUST_LOG
    /// overrides it.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log lines queued for the writer thread (default 8192); beyond them
    /// lines are dropped (and counted in agiproxy_log_lines_dropped_total)
    /// rather than a stalled log reader holding up calls.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    log_buffer_lines: Option<u32>,
    /// Threads serving sessions (default: the CPUs this process may use,
    /// cgroup quota included). 1 runs everything on one thread with no
    /// cross-thread scheduling: the cheapest per session, and the right
    /// choice for a replica limited to one CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

/// The serving options also read from the environment: by `run` and `demo`
/// only. A container exports them for every command its image runs, and a
/// bad value must not fail `check` or `ctl`, where they do nothing.
const SERVING_ENV: [(&str, &str); 2] = [
    ("workers", "AGIPROXY_WORKERS"),
    ("log_buffer_lines", "AGIPROXY_LOG_BUFFER_LINES"),
];

/// The command line, with `SERVING_ENV` on the commands that serve calls,
/// for the options the command line does not give (anywhere: one given
/// before the command beats the environment, whose bad value must then
/// not fail the parse).
fn cli_command() -> clap::Command {
    let mut cli = Cli::command();
    for command in ["run", "demo"] {
        cli = cli.mut_subcommand(command, |mut c| {
            for (id, var) in SERVING_ENV {
                if !on_the_line(id) {
                    c = c.mut_arg(id, |a| a.env(var));
                }
            }
            c
        });
    }
    cli
}

/// Whether the option `id` (`workers`: `--workers`) is on the command line.
fn on_the_line(id: &str) -> bool {
    let flag = format!("--{}", id.replace('_', "-"));
    let with_value = format!("{flag}=");
    std::env::args_os().any(|a| {
        // Not UTF-8: not this option (args() would panic on it).
        a.to_str()
            .is_some_and(|a| a == flag || a.starts_with(&with_value))
    })
}

impl Serving {
    /// The command's own options over those given before it (the
    /// environment's only stand for one given nowhere: `cli_command`).
    fn or(self, before: Serving) -> Serving {
        Serving {
            log_format: self.log_format.or(before.log_format),
            log_level: self.log_level.or(before.log_level),
            log_buffer_lines: self.log_buffer_lines.or(before.log_buffer_lines),
            workers: self.workers.or(before.workers),
        }
    }

    fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(LogFormat::Text)
    }

    fn log_level(&self) -> &str {
        self.log_level.as_deref().unwrap_or("info")
    }

    fn log_buffer_lines(&self) -> usize {
        self.log_buffer_lines
            .map_or(logging::DEFAULT_BUFFER_LINES as usize, |n| n as usize)
    }
}

// Parsed once at start-up: the size of the ctl variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The longest this process drains, whatever `timeouts.drain` a
        /// reload brings: the drain lasts the shorter of the two. Set it to
        /// the drain its stop was planned for (the chart sets it from the
        /// pod's grace period), so that calls past it are cut with FAILURE,
        /// not killed with the process.
        #[arg(long, value_name = "DURATION", env = "AGIPROXY_MAX_DRAIN", value_parser = duration_flag)]
        max_drain: Option<Duration>,
        /// On SIGTERM or SIGINT, first answer `/readyz` with 503 and go on
        /// accepting and serving calls for this long, so that load balancers
        /// (kube-proxy, a cloud balancer's health check) stop sending here
        /// before the listeners close; then drain. A second signal drains at
        /// once [default: 0s].
        #[arg(long, value_name = "DURATION", env = "AGIPROXY_SHUTDOWN_DELAY", value_parser = duration_flag)]
        shutdown_delay: Option<Duration>,
        #[command(flatten)]
        serving: Serving,
    },
    /// Validate a config file and print its compiled routes.
    Check {
        /// The YAML config file to check.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Talk to running replicas through their control API.
    Ctl(agiproxy_control::ctl::CtlArgs),
    /// Run a self-contained demo: the proxy, two built-in backends and
    /// simulated Asterisk calls, then keep serving on 127.0.0.1:4573.
    Demo {
        /// Where the demo proxy listens [default: 127.0.0.1:4573, or any free
        /// port when that one is taken]. An address given here is used or
        /// refused; port 0 takes any free port.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Exit after the simulated calls instead of serving on.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        serving: Serving,
    },
}

fn main() -> ExitCode {
    // Parsed through the matches, to tell where each option came from.
    let matches = cli_command()
        .try_get_matches()
        .unwrap_or_else(|e| from_env(e).exit());
    if let Err(e) = serving_options_unused(&matches) {
        e.exit();
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            max_drain,
            shutdown_delay,
            serving,
        } => {
            let serving = serving.or(cli.serving);
            let log = logging::init(
                serving.log_format(),
                serving.log_level(),
                serving.log_buffer_lines(),
            );
            let r = runtime(serving.workers).and_then(|rt| {
                rt.block_on(run(
                    config,
                    Stop {
                        max_drain,
                        delay: shutdown_delay.unwrap_or_default(),
                    },
                ))
            });
            // The queued lines first, so that an error is the last line.
            drop(log);
            report(r)
        }
        Command::Ctl(args) => {
            let code = match runtime(Some(1)) {
                Ok(rt) => rt.block_on(agiproxy_control::ctl::run(args, &DnsCluster)),
                Err(e) => {
                    eprintln!("agiproxy: {e:#}");
                    2
                }
            };
            ExitCode::from(code as u8)
        }
        Command::Demo {
            listen,
            once,
            serving,
        } => {
            let serving = serving.or(cli.serving);
            let log = logging::init(
                serving.log_format(),
                &format!("{},agiproxy::access=warn", serving.log_level()),
                serving.log_buffer_lines(),
            );
            let r = runtime(serving.workers).and_then(|rt| rt.block_on(demo::run(listen, once)));
            drop(log);
            report(r)
        }
    }
}

/// clap names the option a bad value was for, not that it came from the
/// environment, where the operator would not look: says so, when it did.
fn from_env(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    for (id, var) in SERVING_ENV {
        let flag = format!("--{}", id.replace('_', "-"));
        if arg.starts_with(&flag) && !on_the_line(id) && std::env::var_os(var).is_some() {
            let said = e.render().to_string();
            let first = said.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return cli_command()
                .error(e.kind(), format!("{first} (from {var} in the environment)"));
        }
    }
    e
}

/// Refuses a serving option (`Serving`) given on the command line before
/// `check` or `ctl`, as clap refuses a misplaced argument (exit code 2):
/// neither command serves calls, and it did nothing there, silently. The
/// same option from the environment (`AGIPROXY_WORKERS`) is fine: a
/// container exports it for every command its image runs.
fn serving_options_unused(matches: &ArgMatches) -> Result<(), clap::Error> {
    let Some(command @ ("check" | "ctl")) = matches.subcommand_name() else {
        return Ok(());
    };
    let mut cli = cli_command();
    // Built, so that each argument prints as clap prints it (`--workers <N>`).
    cli.build();
    let serving = Serving::augment_args(clap::Command::new("serving"));
    for id in serving.get_arguments().map(|a| a.get_id().as_str()) {
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let shown = cli
            .get_arguments()
            .find(|a| a.get_id() == id)
            .map_or_else(|| id.to_string(), ToString::to_string);
        return Err(cli.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "the argument '{shown}' applies to 'run' and 'demo', not to '{command}', \
                 where it would do nothing"
            ),
        ));
    }
    Ok(())
}

/// One worker: a current-thread runtime (no work stealing, no wake-ups
/// across threads: the cheapest per session). More: a multi-thread runtime
/// with that many workers.
fn runtime(workers: Option<u16>) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agiproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match agiproxy_config::load_file(path) {
        Ok(cfg) => {
            let mut out = format!(
                "{}: OK ({}, {}, {})\n",
                path.display(),
                count(cfg.listeners.len(), "listener"),
                count(cfg.routes.len(), "route"),
                count(cfg.pools.len(), "pool")
            );
            for l in &cfg.listeners {
                out += &format!("  listener {} on {}", l.name, l.address);
                if let Some(pp) = &l.proxy_protocol {
                    let from: Vec<String> = pp.from.iter().map(|n| n.to_string()).collect();
                    out += &format!(", PROXY header required from {}", from.join(", "));
                }
                out.push('\n');
            }
            out += &match cfg.tcp_keepalive {
                Some(k) => format!(
                    "  tcp keepalive: idle {}s, interval {}s, {} probes (a vanished peer found within {}s of a long command's last packet)\n",
                    k.idle.as_secs(),
                    k.interval.as_secs(),
                    k.probes,
                    k.detection().as_secs()
                ),
                None => "  tcp keepalive: off (a vanished peer holds its session until the process ends)\n".into(),
            };
            for (i, r) in cfg.routes.iter().enumerate() {
                out += &format!("  route {i}: {}\n", r.describe(&cfg.pools));
                if let Some(t) = r.timeouts.differences(&cfg.timeouts) {
                    out += &format!("    timeouts {t}\n");
                }
                if let Some(ro) = &r.rollout {
                    out += &format!(
                        "    {}\n",
                        agiproxy::rollout::explain(ro, agiproxy::rollout::now_ms())
                    );
                    if let Some(c) = ro.describe_canary() {
                        out += &format!(
                            "    canary (any one matching goes to green until a rollback): {c}\n"
                        );
                    }
                }
            }
            for w in cfg.warnings() {
                out += &format!("  warning: {w}\n");
            }
            print_out(&out);
            ExitCode::SUCCESS
        }
        Err(errors) => {
            // Cut by the config crate: the last error says how many more.
            let how_many = if errors.len() > agiproxy_config::MAX_ERRORS {
                format!(
                    "over {} errors, the first {} shown",
                    agiproxy_config::MAX_ERRORS,
                    agiproxy_config::MAX_ERRORS
                )
            } else {
                count(errors.len(), "error")
            };
            let mut out = format!("{}: {how_many}:\n", path.display());
            for e in &errors {
                out += &format!("  {e}\n");
            }
            // Written whole, so that `check 2>&1 | head` cannot cut it short with a panic.
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), out.as_bytes());
            ExitCode::from(2)
        }
    }
}

/// `1 listener`, `2 listeners`.
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Writes to stdout. A reader that went away (`agiproxy check ... | head -1`) ends the
/// output quietly, as with `ls | head`; the exit code still tells the outcome, which is
/// settled before anything is printed (a `pipefail` script sees a bad config, not EPIPE).
pub(crate) fn print_out(text: &str) -> bool {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
        Err(e) => {
            eprintln!("agiproxy: cannot write to stdout: {e}");
            false
        }
    }
}

/// Raises the soft open-files limit to the hard one: every proxied session
/// holds two descriptors, and runtimes often start processes at 1024.
fn raise_fd_limit(max_sessions: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let soft = lim.rlim_cur;
        if soft < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                lim.rlim_cur = soft;
            }
        }
    }
    let sessions = lim.rlim_cur / 2;
    if sessions < max_sessions as u64 {
        tracing::warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            sessions,
            max_sessions,
            "open-files limit too low for limits.max_sessions (two descriptors per session): \
             raise the hard limit to at least {} (ulimit -Hn, LimitNOFILE= in systemd, the \
             container runtime's nofile ulimit), or lower limits.max_sessions",
            max_sessions * 2 + 64
        );
    } else {
        tracing::info!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            sessions,
            "open-files limit (two per session)"
        );
    }
}

/// Says whether the container's memory limit holds what `limits` allow at
/// worst (see `agiproxy::memory`).
fn check_memory(limits: &agiproxy_config::Limits) {
    let limit = agiproxy::memory::limit();
    match agiproxy::memory::check(limits, limit) {
        Some(w) => tracing::warn!("{w}"),
        None => tracing::info!(
            limit_mib = limit.map(|l| l / (1024 * 1024)),
            worst_case_mib = agiproxy::memory::worst_case(limits).div_ceil(1024 * 1024),
            "memory limit (every session slot holding a whole header)"
        ),
    }
}

/// The file's `text` (parsed as `config`) with the overrides `asked` found
/// on the peers written in, logged; `(None, None)` when there are none or
/// they cannot be written in (then the file's own config is run, as said).
async fn adopted_config(
    text: &str,
    config: &agiproxy_config::Config,
    asked: &agiproxy::rollout::adopt::AtStart,
) -> (Option<std::sync::Arc<str>>, Option<agiproxy_config::Config>) {
    if !asked.unanswered.is_empty() {
        tracing::warn!(answered = asked.answered, unanswered = ?asked.unanswered, "rollout: some peers did not say which overrides they run; starting with the file's and what the others said");
    }
    if asked.adopted.is_empty() {
        return (None, None);
    }
    let (text, adopted, max) = (
        text.to_string(),
        asked.adopted.clone(),
        config.limits.max_config_bytes,
    );
    let made =
        tokio::task::spawn_blocking(move || agiproxy::rollout::adopt::apply(&text, &adopted, max))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
    match made {
        Ok((text, running)) => {
            for a in &asked.adopted {
                tracing::warn!(route = %a.carried.route, action = %a.carried.action, at = %a.carried.at, peer = %a.peer, "rollout override adopted from a peer at start: the config file does not have it; write overrides: [{}] into the file (route {}) to keep it across a restart of every replica", a.carried.entry(), a.carried.route);
            }
            (Some(text), Some(running))
        }
        Err(e) => {
            tracing::warn!(error = %e, "rollout: the overrides the peers run could not be taken; starting with the file's");
            (None, None)
        }
    }
}

/// How `run` stops on a signal: `run --shutdown-delay` and `--max-drain`.
struct Stop {
    max_drain: Option<Duration>,
    delay: Duration,
}

/// A duration flag: the config's spelling, or 0.
fn duration_flag(text: &str) -> Result<Duration, String> {
    agiproxy_config::parse_duration_flag(text)
}

async fn run(path: PathBuf, stop: Stop) -> anyhow::Result<()> {
    // Read and parsed on a blocking thread, within bounds (a regular file
    // only, at most the largest limits.max_config_bytes; the config's own
    // limit is then checked by the parse).
    let file = path.clone();
    let (text, config) = tokio::task::spawn_blocking(move || {
        let max = *agiproxy_config::Limits::MAX_CONFIG_BYTES.end();
        // The container's memory limit, read here, off the runtime.
        agiproxy::memory::init();
        let text = agiproxy_config::read_file(&file, max)?;
        let config = agiproxy_config::from_yaml_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:\n{e}", file.display()))?;
        anyhow::Ok((text, config))
    })
    .await
    .context("the config parse stopped")??;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    raise_fd_limit(config.limits.max_sessions);
    check_memory(&config.limits);
    // Installed before anything waits (the peers are asked for up to 3 s):
    // a SIGHUP meanwhile is a reload once serving, not the end of the process.
    let mut signals = Signals::install()?;
    // SIGHUP reloads the config file.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    // Everything that can refuse to start is done before the proxy accepts a call: a
    // replica that cannot start must not answer Asterisk, even for a moment.
    let token = control_token(&config.control).await?;
    // A replica that restarts starts with the rollout overrides its peers
    // run and the file lacks (written through `ctl`), before any call. Asked
    // before this replica's control port listens: peers starting beside it
    // are refused at once, not held unanswered for their whole budget.
    let (running_text, running_config, decisions) =
        if agiproxy::rollout::adopt::names_peers(&config) {
            let once = token
                .clone()
                .map(|t| Arc::new(agiproxy_control::token::Tokens::new(t)));
            let access = peer_access(&config.control, once).await?;
            let ask = agiproxy::rollout::adopt::ask_peers(
                &config,
                &access,
                agiproxy::rollout::adopt::BUDGET,
            );
            // Stopped meanwhile (the signals are taken from here on): end
            // before anything listens, as a stop before the start does.
            let asked = tokio::select! {
                asked = ask => asked,
                _ = signals.recv() => {
                    tracing::info!("stopped while asking the peers, before serving");
                    return Ok(());
                }
            };
            let (t, c) = adopted_config(&text, &config, &asked).await;
            (t, c, asked.decisions)
        } else {
            (None, None, Vec::new())
        };
    let control = prepare_control(&config.control, token).await?;
    // How rollout judgement reads the other replicas: the same token (the
    // API's, which follows its file), and TLS when they serve it.
    let peers = match &control {
        Some(api) => peer_access(&config.control, api.tokens()).await?,
        None => agiproxy::rollout::eval::PeerAccess::plain(None),
    };
    let origin = Origin {
        text: running_text.unwrap_or_else(|| text.clone().into()),
        source: format!("file:{}", path.display()),
        file: Some(path.clone()),
    };
    // Followed while running (a control block change waits for a restart).
    let token_file = match &config.control.token {
        Some(TokenSource::File(path)) => Some(path.clone()),
        _ => None,
    };
    let server = match running_config {
        Some(running) => {
            let file = FileRollouts::of(&config);
            Server::start_adopted(running, origin, &text, file, &decisions).await?
        }
        None if !decisions.is_empty() => {
            let file = FileRollouts::of(&config);
            Server::start_adopted(config, origin, &text, file, &decisions).await?
        }
        None => Server::start_with(config, origin).await?,
    };
    if let Some(addr) = control.as_ref().and_then(|api| api.local_addr()) {
        server.note_control_address(addr);
    }
    let mut followed = Vec::new();
    if let Some(api) = &control {
        followed.extend(api.tls().map(|t| Followed::tls("control_tls", t)));
        if let (Some(path), Some(tokens)) = (token_file, api.tokens()) {
            followed.push(Followed::token(FollowedToken::new(path, tokens)));
        }
    }
    followed.extend(peers.tls().map(|t| Followed::tls("peer_tls", t)));
    let credentials = credentials::spawn(
        server.metrics().credential_reloads.clone(),
        server.metrics().credential_expiry.clone(),
        followed,
        credentials::EVERY,
    );
    // Best-effort: a watch that cannot be set up (inotify's limits) is a
    // WARN, never the end of a process that already accepts calls; the file
    // is still looked at every 30 s and on SIGHUP.
    let _watch = agiproxy::watch::watch(server.clone(), agiproxy::watch::EVERY).await;
    // SIGHUP's reload runs as a task of its own: while it waits for its turn
    // or parses, the loop below still acts on a stop signal and the shutdown
    // delay. SIGHUPs meanwhile coalesce: one reload runs, at most one waits.
    let reload_asked = Arc::new(tokio::sync::Notify::new());
    let reloads = {
        let (server, asked) = (server.clone(), reload_asked.clone());
        tokio::spawn(async move {
            loop {
                asked.notified().await;
                let _ = server.reload_file().await;
            }
        })
    };

    let (stop_control, control_task) = match control {
        Some(api) => {
            agiproxy::rollout::eval::spawn(server.clone(), peers);
            let api = api.with_plane(ControlHandle::new(server.clone()));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(api.serve(async {
                let _ = stopped.await;
            }));
            (Some(stop), Some(task))
        }
        None => {
            // Rollouts are still judged, on this replica's counters and the
            // peers' it can read (peers cannot read its own).
            agiproxy::rollout::eval::spawn(server.clone(), peers);
            (None, None)
        }
    };

    // Until a signal, or a drain asked through the API; then, for a signal,
    // the shutdown delay: not ready, still serving.
    let mut delay_ends: Option<tokio::time::Instant> = None;
    // A signal came (not only a drain asked through the API): the next one
    // stops at once.
    let mut signalled = false;
    loop {
        let delay_end = delay_ends.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config file, looking at the credential files");
                credentials.now();
                reload_asked.notify_one();
            }
            _ = signals.recv() => {
                signalled = true;
                if delay_ends.is_some() || stop.delay.is_zero() {
                    break;
                }
                server.announce_stop();
                tracing::info!(
                    delay = ?stop.delay,
                    active = server.active_sessions(),
                    "stopping: /readyz answers 503; calls are still served for the shutdown delay, then the drain (a second signal drains now)"
                );
                delay_ends = Some(tokio::time::Instant::now() + stop.delay);
            }
            _ = tokio::time::sleep_until(delay_end), if delay_ends.is_some() => break,
            _ = server.draining() => break,
        }
    }
    // SIGHUP is ignored once the drain starts: a reload still waiting or
    // running is dropped (`abandoned` if it had begun to apply).
    reloads.abort();
    // The running config's deadline: a reload may have changed it; within
    // what this process was started for.
    let configured = server.snapshot().config.timeouts.drain;
    let drain_deadline = match stop.max_drain {
        Some(max) if max < configured => {
            tracing::warn!(
                configured = ?configured,
                max_drain = ?max,
                "timeouts.drain is longer than --max-drain (the drain this process's stop was planned for, e.g. its pod's grace period): draining for --max-drain; a new drain reaches new processes (roll the pods)"
            );
            max
        }
        _ => configured,
    };
    server.stop_accepting();
    tracing::info!(deadline = ?drain_deadline, active = server.active_sessions(), "draining: listeners closed, waiting for sessions");
    let drained = server.drain(drain_deadline);
    tokio::pin!(drained);
    loop {
        tokio::select! {
            clean = &mut drained => {
                if clean {
                    tracing::info!("drained, exiting");
                } else {
                    tracing::warn!("drain deadline passed; remaining sessions were cut");
                }
                break;
            }
            _ = signals.recv() => {
                if !signalled {
                    // A drain asked through the API, then the SIGTERM of
                    // the pod's deletion: it drains on (review: the calls
                    // were killed at once, read as SUCCESS).
                    signalled = true;
                    tracing::info!(active = server.active_sessions(), "signal during a drain asked through the API: draining on (another signal stops now)");
                    continue;
                }
                tracing::warn!(active = server.active_sessions(), "second signal: stopping now");
                server.abort();
                break;
            }
        }
    }
    // Stops the control API, which removes its socket file.
    if let (Some(stop), Some(task)) = (stop_control, control_task) {
        let _ = stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), task).await;
    }
    // Counts of throttled lines still held back: told now, not lost.
    agiproxy::session::throttled::flush_all();
    agiproxy_control::server::flush_throttled();
    Ok(())
}

/// Reads the control API's token and TLS files and binds its port, without serving yet.
/// How this replica reads its peers' control APIs with `token`, and TLS
/// when they serve it. Its PEM files are read off the runtime.
async fn peer_access(
    control: &Control,
    token: Option<Arc<agiproxy_control::token::Tokens>>,
) -> anyhow::Result<agiproxy::rollout::eval::PeerAccess> {
    let settings = control.clone();
    tokio::task::spawn_blocking(move || {
        agiproxy::rollout::eval::PeerAccess::from_config(&settings, token)
    })
    .await
    .context("reading control.tls.peers stopped")?
    .map_err(|e| anyhow::anyhow!(e))
}

/// The control API's token, checked; None without one or without a
/// control block.
async fn control_token(control: &Control) -> anyhow::Result<Option<String>> {
    if !control.enabled {
        return Ok(None);
    }
    let token = match &control.token {
        Some(TokenSource::File(f)) => {
            // Read as it is when followed (`token::read_token`: a regular
            // file of at most 4 KiB, trimmed, not empty), off the runtime.
            let file = f.clone();
            let token =
                tokio::task::spawn_blocking(move || agiproxy_control::token::read_token(&file))
                    .await
                    .context("reading control.token_file stopped")?
                    .map_err(|e| anyhow::anyhow!("control.token_file: {e}"))?;
            Some(token)
        }
        Some(TokenSource::Env(v)) => Some(
            std::env::var(v)
                .with_context(|| format!("control.token_env: ${v} is not set"))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    if let Some(t) = &token {
        agiproxy_control::token::presentable(t).map_err(|e| anyhow::anyhow!("control: {e}"))?;
    }
    Ok(token)
}

/// Binds the control API (not serving yet); None without a control block.
async fn prepare_control(
    control: &Control,
    token: Option<String>,
) -> anyhow::Result<Option<PreparedControl>> {
    // Off unless the file has a control block: no port opened unasked
    // (docs/control-api.md, "Where it listens").
    if !control.enabled {
        tracing::info!(
            "control API off: the config has no control block, so no port or socket is \
             opened for it (see docs/control-api.md)"
        );
        return Ok(None);
    }
    let opts = ServeOptions {
        address: control.address,
        socket: control.socket.clone(),
        token,
        tls: control.tls.as_ref().map(|t| TlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        }),
        max_body_bytes: control.max_body_bytes,
        request_timeout: control.request_timeout,
    };
    let api = PreparedControl::bind(opts).await?;
    if let Some(addr) = api.local_addr() {
        tracing::info!(address = %addr, tls = control.tls.is_some(), "control API listening");
    }
    Ok(Some(api))
}

/// Finds `ctl --cluster` replicas with the proxy's own resolver.
struct DnsCluster;

impl agiproxy_control::ctl::ClusterResolver for DnsCluster {
    async fn resolve(
        &self,
        spec: &str,
        dns_server: Option<std::net::SocketAddr>,
    ) -> Result<Vec<std::net::SocketAddr>, String> {
        let target = if spec.starts_with('_') {
            BackendTarget::Srv {
                name: spec.to_string(),
            }
        } else {
            let (name, port) = spec
                .rsplit_once(':')
                .ok_or_else(|| format!("{spec:?}: write NAME:PORT"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{spec:?}: {port:?} is not a port"))?;
            BackendTarget::Host {
                name: name.to_string(),
                port,
            }
        };
        let dns = Dns {
            nameservers: dns_server.into_iter().collect(),
            ..Dns::default()
        };
        let resolver = agiproxy::pool::discovery::resolver(&dns)?;
        let (found, _ttl) = agiproxy::pool::discovery::lookup(&resolver, &target, &dns).await?;
        Ok(found.into_iter().map(|f| f.addr).collect())
    }
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C), either of which drains.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
