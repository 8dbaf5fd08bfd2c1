//! `agiproxy-bench`: load generator, benchmark backend and report for
//! measuring what a FastAGI proxy costs. See `docs/benchmarks.md` and
//! `chaos-tests/bench/run`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use chaos_tests::loadgen::backend::{Backend, BackendConfig, BackendMode};
use chaos_tests::loadgen::client::{self, ClientConfig, IdleConfig, RunLength};
use chaos_tests::loadgen::procstat::{Watched, Watcher};
use chaos_tests::loadgen::report::{Compare, RunReport};
use chaos_tests::{Behaviour, FakeBackend};

#[derive(Parser)]
#[command(
    name = "agiproxy-bench",
    about = "FastAGI load generator and benchmark backend (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Asterisk-like clients running sessions back to back.
    Load(LoadArgs),
    /// Hold many sessions open on a long command, then release them.
    Idle(IdleArgs),
    /// The FastAGI backend the clients talk to.
    Backend(BackendArgs),
    /// Compare the JSON results in a directory (one file per run).
    Report(ReportArgs),
    /// Print N free loopback ports (bound together, then released).
    FreePorts {
        #[arg(default_value_t = 1)]
        n: usize,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Every address this tool touches must be loopback: the benchmark never
/// sends traffic anywhere else.
fn loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr}: only loopback addresses (127.0.0.0/8, ::1) are allowed"
        ));
    }
    Ok(addr)
}

#[derive(Args)]
struct ClientArgs {
    /// Where to connect (repeatable; client i uses target i mod n).
    #[arg(long = "target", value_parser = loopback, required = true)]
    targets: Vec<SocketAddr>,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A process to sample over the measurement window, NAME=PID (repeatable).
    #[arg(long = "watch")]
    watch: Vec<Watched>,
    /// The name of this run in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// The benchmark round of this run: the report pairs the runs of two
    /// labels with the same round (they ran back to back).
    #[arg(long)]
    round: Option<u32>,
    /// This run shared the proxy core, at the same time, with the run of the
    /// other proxy of its round (the report compares such runs apart).
    #[arg(long)]
    head_to_head: bool,
    /// Print JSON instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Also write the JSON to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    #[arg(long, value_parser = duration, default_value = "2s")]
    connect_timeout: Duration,
    /// Before starting, run single sessions until each target completes one
    /// (the server under test is up and routing), for at most this long.
    #[arg(long, value_parser = duration)]
    wait_ready: Option<Duration>,
    /// Arguments of the AGI() call (agi_arg_1, ...).
    #[arg(long = "arg", default_values = ["arg1", "arg2"])]
    args: Vec<String>,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    c: ClientArgs,
    /// Concurrent clients, each running sessions back to back.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Measured time (after the warm-up).
    #[arg(long, value_parser = duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured time first.
    #[arg(long, value_parser = duration, default_value = "2s")]
    warmup: Duration,
    /// Run exactly this many sessions instead (no warm-up).
    #[arg(long)]
    sessions: Option<u64>,
    /// Start this many sessions a second in all (an open loop, spread over
    /// the clients) instead of each client's next session as soon as its
    /// last one ends. Latency is compared at the same offered load this
    /// way: back to back, a faster path just gets more sessions.
    #[arg(long)]
    rate: Option<f64>,
    /// Commands a session must have; fewer is a short session (0: any).
    #[arg(long, default_value_t = 0)]
    commands: usize,
    /// The script (agi_network_script) the sessions call.
    #[arg(long, default_value = "bench/load")]
    script: String,
    /// Bound on one session.
    #[arg(long, value_parser = duration, default_value = "30s")]
    session_timeout: Duration,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    c: ClientArgs,
    /// Sessions to hold at once.
    #[arg(long, default_value_t = 5000)]
    sessions: usize,
    /// How long to hold them once all are established.
    #[arg(long, value_parser = duration, default_value = "10s")]
    hold: Duration,
    /// Sessions connecting at the same time.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Created (with the number established) once every session is held.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    #[arg(long, default_value = "bench/idle")]
    script: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Idle sessions for scripts whose last path segment is `idle`.
    Auto,
    Load,
    Idle,
}

#[derive(Args)]
struct BackendArgs {
    /// Where to listen (repeatable; port 0 picks a free one).
    #[arg(long = "listen", value_parser = loopback, required = true)]
    listen: Vec<SocketAddr>,
    /// Commands per load session.
    #[arg(long, default_value_t = 10)]
    commands: usize,
    #[arg(long, default_value = "NOOP")]
    command: String,
    /// The command an idle session holds.
    #[arg(long, default_value = "EXEC Dial PJSIP/x")]
    idle_command: String,
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// Pause before each command.
    #[arg(long, value_parser = duration, default_value = "0s")]
    think: Duration,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write the bound addresses here, one per line.
    #[arg(long, value_name = "FILE")]
    port_file: Option<PathBuf>,
    /// Serve with `chaos_tests::FakeBackend` and `Behaviour::Echo` instead
    /// (one listener on a free port, load sessions only), to compare the two.
    #[arg(long)]
    fake_echo: bool,
}

#[derive(Args)]
struct ReportArgs {
    /// Directory of *.json run results.
    dir: PathBuf,
    #[arg(long, default_value = "direct")]
    baseline: String,
    #[arg(long, default_value = "haproxy")]
    reference: String,
    #[arg(long, default_value = "agiproxy")]
    subject: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Load(a) => load(a),
        Command::Idle(a) => idle(a),
        Command::Backend(a) => backend(a),
        Command::Report(a) => report(a),
        Command::FreePorts { n } => free_ports(n),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agiproxy-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<ExitCode, String>;

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

impl ClientArgs {
    fn config(&self, script: &str) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.targets.clone(), script);
        cfg.args = self.args.clone();
        cfg.connect_timeout = self.connect_timeout;
        cfg
    }

    fn target_names(&self) -> Vec<String> {
        self.targets.iter().map(ToString::to_string).collect()
    }

    async fn wait_ready(&self, cfg: &ClientConfig) -> Result<(), String> {
        if let Some(within) = self.wait_ready {
            client::wait_ready(cfg.clone(), within)
                .await
                .map_err(|kind| {
                    format!("target not ready within {within:?}: last error {kind:?}")
                })?;
        }
        Ok(())
    }

    fn emit(&self, report: &RunReport) -> Res {
        let mut report = report.clone();
        report.round = self.round;
        report.head_to_head = self.head_to_head;
        let report = &report;
        let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        if let Some(path) = &self.json_out {
            std::fs::write(path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if self.json {
            println!("{json}");
        } else {
            print!("{}", report.human());
        }
        Ok(if report.errors_total == 0 {
            ExitCode::SUCCESS
        } else {
            // Still a complete report; the exit code tells scripts.
            ExitCode::from(3)
        })
    }
}

fn load(a: LoadArgs) -> Res {
    let rt = runtime(a.c.threads)?;
    let mut cfg = a.c.config(&a.script);
    cfg.expect_commands = a.commands;
    cfg.session_timeout = a.session_timeout;
    if let Some(rate) = a.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("--rate {rate}: give sessions a second, above 0"));
        }
        cfg.session_interval = Some(Duration::from_secs_f64(a.clients.max(1) as f64 / rate));
    }
    let length = match a.sessions {
        Some(n) => RunLength::Sessions(n),
        None => RunLength::Time {
            warmup: a.warmup,
            measure: a.duration,
        },
    };
    let mut watcher = Watcher::new(a.c.watch.clone());
    let outcome = rt.block_on(async {
        a.c.wait_ready(&cfg).await?;
        Ok::<_, String>(client::run_load(cfg, a.clients, length, &mut watcher).await)
    })?;
    let mut report = RunReport::from_load(
        &a.c.label,
        &a.c.target_names(),
        a.c.threads,
        &outcome,
        watcher.usage(),
    );
    report.offered_rate = a.rate;
    a.c.emit(&report)
}

fn idle(a: IdleArgs) -> Res {
    let rt = runtime(a.c.threads)?;
    let mut cfg = a.c.config(&a.script);
    cfg.expect_commands = 1;
    let header_lines = cfg.header_lines();
    let idle = IdleConfig {
        sessions: a.sessions,
        hold: a.hold,
        connect_concurrency: a.connect_concurrency,
    };
    let mut watcher = Watcher::new(a.c.watch.clone());
    let ready_file = a.ready_file.clone();
    let outcome = rt.block_on(async {
        a.c.wait_ready(&cfg).await?;
        Ok::<_, String>(
            client::run_idle(cfg, idle, &mut watcher, |p| {
                eprintln!(
                    "idle: {} established, {} failed after {:.0} ms; holding",
                    p.established,
                    p.failed,
                    p.elapsed.as_secs_f64() * 1000.0
                );
                if let Some(path) = &ready_file {
                    if let Err(e) = std::fs::write(path, format!("{}\n", p.established)) {
                        eprintln!("idle: cannot write {}: {e}", path.display());
                    }
                }
            })
            .await,
        )
    })?;
    let report = RunReport::from_idle(
        &a.c.label,
        &a.c.target_names(),
        a.c.threads,
        header_lines,
        &outcome,
        watcher.usage(),
    );
    a.c.emit(&report)
}

fn backend(a: BackendArgs) -> Res {
    let rt = runtime(a.threads)?;
    let cfg = BackendConfig {
        commands: a.commands,
        command: a.command,
        idle_command: a.idle_command,
        mode: match a.mode {
            Mode::Auto => BackendMode::Auto,
            Mode::Load => BackendMode::Load,
            Mode::Idle => BackendMode::Idle,
        },
        think: a.think,
        ..BackendConfig::default()
    };
    if a.fake_echo {
        return rt.block_on(fake_echo(a.commands, a.port_file.as_deref()));
    }
    rt.block_on(async {
        let backend = Backend::start(&a.listen, cfg)
            .await
            .map_err(|e| format!("cannot listen: {e}"))?;
        let addrs: Vec<String> = backend.addrs().iter().map(ToString::to_string).collect();
        if let Some(path) = &a.port_file {
            std::fs::write(path, addrs.join("\n") + "\n")
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        eprintln!("backend: listening on {}", addrs.join(" "));
        wait_for_signal().await?;
        let counts = backend.stats().snapshot();
        println!(
            "{}",
            serde_json::to_string(&counts).map_err(|e| e.to_string())?
        );
        Ok(ExitCode::SUCCESS)
    })
}

async fn fake_echo(commands: usize, port_file: Option<&std::path::Path>) -> Res {
    let fake = FakeBackend::start(Behaviour::Echo { commands }).await;
    if let Some(path) = port_file {
        std::fs::write(path, format!("{}\n", fake.addr()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    eprintln!("backend (FakeBackend Echo): listening on {}", fake.addr());
    wait_for_signal().await?;
    let stats = fake.stats();
    println!(
        "{{\"completed\":{},\"replies\":{},\"hangups\":{}}}",
        stats.sessions_completed(),
        stats.replies(),
        stats.hangups()
    );
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn report(a: ReportArgs) -> Res {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.dir)
        .map_err(|e| format!("{}: {e}", a.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut runs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let run: RunReport =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        runs.push(run);
    }
    let compare = Compare {
        baseline: a.baseline,
        reference: a.reference,
        subject: a.subject,
        ..Compare::default()
    };
    print!("{}", compare.render(&runs));
    Ok(ExitCode::SUCCESS)
}

fn free_ports(n: usize) -> Res {
    // All bound before any is released, so the ports are distinct.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    let ports: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port().to_string()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    println!("{}", ports.join(" "));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_accepted() {
        assert!(loopback("127.0.0.1:4573").is_ok());
        assert!(loopback("127.0.0.2:0").is_ok());
        assert!(loopback("[::1]:4573").is_ok());
        assert!(loopback("10.0.0.1:4573").is_err());
        assert!(loopback("0.0.0.0:4573").is_err());
        assert!(
            loopback("localhost:4573").is_err(),
            "names are not resolved"
        );
    }

    #[test]
    fn the_cli_parses_each_subcommand() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let ok = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        ok(&[
            "b",
            "load",
            "--target",
            "127.0.0.1:1",
            "--clients",
            "2",
            "--duration",
            "1s",
        ])
        .unwrap();
        ok(&[
            "b",
            "idle",
            "--target",
            "127.0.0.1:1",
            "--sessions",
            "3",
            "--hold",
            "10ms",
        ])
        .unwrap();
        ok(&["b", "backend", "--listen", "127.0.0.1:0", "--mode", "idle"]).unwrap();
        ok(&["b", "report", "/tmp"]).unwrap();
        assert!(ok(&["b", "load"]).is_err(), "a target is required");
        assert!(ok(&["b", "load", "--target", "192.0.2.1:4573"]).is_err());
    }
}
