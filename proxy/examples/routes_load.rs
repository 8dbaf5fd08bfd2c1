//! Load and apply time of config files: for each file given, the time to read, parse and
//! validate it (`agiproxy check`'s work, without printing) and to build the snapshot a reload
//! swaps in (router included), and the process's peak memory after it.
//!
//! `cargo run --release -p agiproxy --example routes_load -- FILE...`; the script
//! `chaos-tests/bench/routes-load` generates the configs and runs this.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use agiproxy::snapshot::{ConfigMeta, Snapshot};

fn main() {
    let files: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if files.is_empty() {
        eprintln!("usage: routes_load FILE...");
        std::process::exit(2);
    }
    for file in files {
        let started = Instant::now();
        let max = *agiproxy_config::Limits::MAX_CONFIG_BYTES.end();
        let text = match agiproxy_config::read_file(&file, max) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let config = match agiproxy_config::from_yaml_str(&text) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}:\n{e}", file.display());
                std::process::exit(1);
            }
        };
        let loaded = started.elapsed();
        let routes = config.routes.len();
        let meta = ConfigMeta::new(1, "file", Arc::from(text.as_str()));
        let applying = Instant::now();
        let snapshot = Snapshot::build(config, meta, None);
        let applied = applying.elapsed();
        println!(
            "{}: {} routes, {} bytes: load {:.3} s, apply {:.3} s, total {:.3} s, peak RSS {} MB",
            file.display(),
            routes,
            text.len(),
            loaded.as_secs_f64(),
            applied.as_secs_f64(),
            (loaded + applied).as_secs_f64(),
            peak_rss_mb()
        );
        drop(snapshot);
    }
}

/// The process's peak resident memory so far (VmHWM), in MB.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
