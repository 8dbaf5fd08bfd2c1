//! `agiproxy demo`: the proxy on loopback with an embedded config, two
//! built-in FastAGI backends (`blue` and `green`), and a handful of
//! simulated Asterisk calls whose conversations and AGISTATUS are printed.
//! Then it keeps serving, so a real Asterisk can be pointed at it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use agiproxy::{Server, SessionRecord};

mod sim;
use sim::{refused_addr, ScriptedBackend};

/// Prints a line; a closed stdout (`agiproxy demo | head`) silences the demo, not the proxy.
macro_rules! say {
    ($($arg:tt)*) => {
        crate::print_out(&format!("{}\n", format_args!($($arg)*)))
    };
}

const CONFIG: &str = include_str!("demo.yaml");

struct Call {
    dialplan: &'static str,
    script: &'static str,
    args: &'static [&'static str],
}

const CALLS: &[Call] = &[
    Call {
        dialplan: "AGI(agi://PROXY/ivr/main?lang=en,1001)",
        script: "ivr/main?lang=en",
        args: &["1001"],
    },
    Call {
        dialplan: "AGI(agi://PROXY/ivr/main?lang=de,1002)",
        script: "ivr/main?lang=de",
        args: &["1002"],
    },
    Call {
        dialplan: "AGI(agi://PROXY/billing,acct42)",
        script: "billing",
        args: &["acct42"],
    },
    Call {
        dialplan: "AGI(agi://PROXY/unknown/script)",
        script: "unknown/script",
        args: &[],
    },
];

fn backend_script(colour: &str) -> Vec<String> {
    vec![
        format!("VERBOSE \"{colour} backend answering\" 1"),
        "ANSWER".to_string(),
        format!("SET VARIABLE IVR_BACKEND {colour}"),
        "STREAM FILE hello-world \"\"".to_string(),
    ]
}

/// Where the demo listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4573);

/// Runs the demo on `listen`, or on [`DEFAULT_LISTEN`] (any free port when that one is taken).
pub async fn run(listen: Option<SocketAddr>, once: bool) -> anyhow::Result<()> {
    // Installed first, so that no Ctrl-C is missed once the proxy serves.
    let mut signals = crate::Signals::install()?;
    let blue = ScriptedBackend::start(backend_script("blue"))
        .await
        .context("starting the blue backend")?;
    let green = ScriptedBackend::start(backend_script("green"))
        .await
        .context("starting the green backend")?;
    let down = refused_addr().context("finding a free port")?;
    let config_for = |listen: SocketAddr| {
        let text = CONFIG
            .replace("{LISTEN}", &listen.to_string())
            .replace("{BLUE}", &blue.addr().to_string())
            .replace("{GREEN}", &green.addr().to_string())
            .replace("{DOWN}", &down.to_string());
        agiproxy_config::from_yaml_str(&text)
            .map_err(|e| anyhow::anyhow!("the embedded demo config is invalid:\n{e}"))
    };
    let server = match (
        listen,
        Server::start(config_for(listen.unwrap_or(DEFAULT_LISTEN))?).await,
    ) {
        (_, Ok(s)) => s,
        // Port 4573 may be taken (by a real Asterisk setup); any port will do for the demo.
        // An address the user named is used or refused, never silently replaced.
        (None, Err(e)) => {
            eprintln!("note: {e}; using a free port instead (--listen names one)");
            let any = SocketAddr::new(DEFAULT_LISTEN.ip(), 0);
            Server::start(config_for(any)?)
                .await
                .context("starting the demo proxy")?
        }
        (Some(_), Err(e)) => return Err(e).context("starting the demo proxy on --listen"),
    };
    let addr = server.local_addrs()[0];
    let names = [
        (blue.addr(), "blue"),
        (green.addr(), "green"),
        (down, "down (nothing listens)"),
    ];
    let name_of = |a: SocketAddr| names.iter().find(|(x, _)| *x == a).map_or("?", |(_, n)| n);

    say!("agiproxy demo: proxy on {addr}; backends blue {}, green {}; pool \"billing\" points at {down}, where nothing listens\n", blue.addr(), green.addr());
    let mut records = server.subscribe();
    for (i, call) in CALLS.iter().enumerate() {
        let out = sim::call(addr, call.script, call.args, &format!("1700000000.{i}"))
            .await
            .context("calling the demo proxy")?;
        let rec: Option<SessionRecord> =
            tokio::time::timeout(Duration::from_secs(2), records.recv())
                .await
                .ok()
                .and_then(Result::ok);
        say!(
            "call {}: {}",
            i + 1,
            call.dialplan.replace("PROXY", &addr.to_string())
        );
        if let Some(r) = &rec {
            let backend = r
                .backend
                .map_or("-".to_string(), |b| format!("{} ({b})", name_of(b)));
            say!(
                "  route {} -> pool {} -> backend {backend}",
                r.route.as_deref().unwrap_or("(none)"),
                r.pool.as_deref().unwrap_or("-")
            );
        }
        for cmd in &out.commands {
            say!("  backend> {cmd}");
        }
        let reason = out
            .error
            .as_ref()
            .map(|r| format!(" (AGIPROXY_ERROR={r})"))
            .unwrap_or_default();
        say!("  AGISTATUS={}{reason}", out.status);
        if out.status == "FAILURE" {
            say!("  -> the dialplan's fallback runs: same => n,GotoIf($[\"${{AGISTATUS}}\" = \"FAILURE\"]?fallback)");
        }
        say!("");
    }
    if once {
        server.drain(Duration::from_secs(5)).await;
        return Ok(());
    }
    say!("Serving on {addr}. Point an Asterisk at it, e.g.\n  exten => 100,1,Set(AGIPROXY_ERROR=)\n         same => n,AGI(agi://{addr}/ivr/main?lang=de,1234)\n         same => n,Verbose(AGISTATUS=${{AGISTATUS}} ${{AGIPROXY_ERROR}})\nCtrl-C drains and exits; a second Ctrl-C stops at once.");
    signals.recv().await;
    say!("draining...");
    tokio::select! {
        clean = server.drain(Duration::from_secs(10)) => {
            if clean {
                say!("drained, exiting");
            } else {
                say!("drain deadline passed; remaining sessions were cut");
            }
        }
        _ = signals.recv() => {
            let cut = server.active_sessions();
            server.abort();
            say!("second Ctrl-C: stopped at once ({cut} in flight cut)");
        }
    }
    Ok(())
}
