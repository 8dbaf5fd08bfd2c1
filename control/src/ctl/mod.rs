//! `agiproxy ctl`: a command line over the control API, for one replica
//! (`--url`, or `--socket` on its host) or every replica behind a DNS name
//! (`--cluster dns:NAME:PORT`).
//! Human-readable tables by default, `--output json` for scripts.

use serde::Serialize;

use crate::api::{
    Applied, BackendView, ConfigView, PoolView, RolloutOverrideRequest, RolloutView, SplitRequest,
    SplitWeight, Status,
};
use crate::client::Client;
use crate::tls::{connector, ClientTls};

mod args;
mod printing;
mod replicas;

pub use args::*;
pub use printing::format_rollout;
use printing::*;
use replicas::*;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::{Address, Target};

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
