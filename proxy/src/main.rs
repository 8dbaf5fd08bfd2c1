//! The `agiproxy` binary: flags, signals, and a call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use agiproxy::logging::{self, LogFormat};
use agiproxy::Server;

mod demo;

#[derive(Parser)]
#[command(
    name = "agiproxy",
    version,
    about = "A clustered FastAGI proxy and load balancer for Asterisk"
)]
struct Cli {
    /// Log format: human-readable text or JSON lines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and print its compiled routes.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a self-contained demo: the proxy, two built-in backends and
    /// simulated Asterisk calls, then keep serving on 127.0.0.1:4573.
    Demo {
        /// Where the demo proxy listens (use port 0 for any free port).
        #[arg(long, default_value = "127.0.0.1:4573")]
        listen: std::net::SocketAddr,
        /// Exit after the simulated calls instead of serving on.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            logging::init(cli.log_format, &cli.log_level);
            report(runtime().and_then(|rt| rt.block_on(run(config))))
        }
        Command::Demo { listen, once } => {
            logging::init(
                cli.log_format,
                &format!("{},agiproxy::access=warn", cli.log_level),
            );
            report(runtime().and_then(|rt| rt.block_on(demo::run(listen, once))))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
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
            println!(
                "{}: OK ({} listeners, {} routes, {} pools)",
                path.display(),
                cfg.listeners.len(),
                cfg.routes.len(),
                cfg.pools.len()
            );
            for l in &cfg.listeners {
                println!("  listener {} on {}", l.name, l.address);
            }
            for (i, r) in cfg.routes.iter().enumerate() {
                println!("  route {i}: {}", r.describe(&cfg.pools));
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} error(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::from(2)
        }
    }
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = agiproxy_config::load_file(&path)
        .map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
    let drain_deadline = config.timeouts.drain;
    // Installed before serving, so no signal is missed between the two waits.
    let mut signals = Signals::install()?;
    let server = Server::start(config).await?;
    signals.recv().await;
    tracing::info!(deadline = ?drain_deadline, active = server.active_sessions(), "draining: listeners closed, waiting for sessions");
    server.stop_accepting();
    tokio::select! {
        clean = server.drain(drain_deadline) => {
            if clean {
                tracing::info!("drained, exiting");
            } else {
                tracing::warn!("drain deadline passed; remaining sessions were cut");
            }
        }
        _ = signals.recv() => {
            tracing::warn!(active = server.active_sessions(), "second signal: stopping now");
            server.abort();
        }
    }
    Ok(())
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C), either of which drains.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
