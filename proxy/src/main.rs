//! The `agiproxy` binary: flags, signals, and a call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use agiproxy::logging::{self, LogFormat};
use agiproxy::Server;

mod demo;

#[derive(Parser)]
#[command(name = "agiproxy", version, about = "A clustered FastAGI proxy and load balancer for Asterisk")]
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
            logging::init(cli.log_format, &format!("{},agiproxy::access=warn", cli.log_level));
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
            println!("{}: OK ({} listeners, {} routes, {} pools)", path.display(), cfg.listeners.len(), cfg.routes.len(), cfg.pools.len());
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
    let config = agiproxy_config::load_file(&path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
    let drain_deadline = config.timeouts.drain;
    let server = Server::start(config).await?;
    wait_for_signal().await?;
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
        r = wait_for_signal() => {
            r?;
            tracing::warn!(active = server.active_sessions(), "second signal: stopping now");
            server.abort();
        }
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
