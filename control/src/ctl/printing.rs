//! What `ctl` prints: tables by default, the answers as JSON with
//! `--output json`.

use super::{
    ConfigCommand, Convergence, CtlArgs, CtlCommand, Output, Reply, RolloutCommand, WRITE_FAILED,
};
use crate::api::{Applied, BackendView, ConfigView, PoolView, RolloutView, Status};

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
pub(super) fn text(t: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    written(out.write_all(t.as_bytes()).and_then(|()| out.flush()))
}

pub(super) fn line(args: std::fmt::Arguments<'_>) -> bool {
    use std::io::Write;
    written(writeln!(std::io::stdout().lock(), "{args}"))
}

/// Whether printing may go on: a reader that went away ends it quietly;
/// any other failure is said, and makes the exit code 1.
pub(super) fn written(r: std::io::Result<()>) -> bool {
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

pub(super) fn print(args: &CtlArgs, replies: &[Reply], converged: Option<&Convergence>) {
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
pub(super) fn raw(body: &serde_json::Value) {
    out!("(an answer this ctl does not know how to show: another agiproxy version?)");
    out!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
}

/// `several`: replies of several replicas follow one another.
pub(super) fn print_table(cmd: &CtlCommand, body: &serde_json::Value, several: bool) {
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
pub(super) fn warn_dropped(replies: &[Reply]) {
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
pub(super) const POOLS_COLUMNS: [&str; 7] = [
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
pub(super) fn backend_row<S: std::fmt::Display>(c: [S; 7], w: (usize, usize)) -> String {
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
pub(super) fn widths<'a>(rows: impl Iterator<Item = (&'a str, &'a str)>) -> (usize, usize) {
    rows.fold((16, 24), |(p, b), (pool, backend)| {
        (p.max(pool.chars().count()), b.max(backend.chars().count()))
    })
}

pub(super) fn backend_cells(pool: &str, b: &BackendView) -> [String; 7] {
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
