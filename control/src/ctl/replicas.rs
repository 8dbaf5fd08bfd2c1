//! The replicas a command goes to (`--url`, `--socket`, `--cluster`), and
//! one request sent to all of them at once.

use std::net::SocketAddr;

use super::{ClusterResolver, CtlArgs, Reply};
use crate::api::ErrorBody;
use crate::client::{Address, Client, Target};

pub(super) async fn targets<R: ClusterResolver>(
    args: &CtlArgs,
    resolver: &R,
) -> Result<Vec<Target>, String> {
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
pub(super) fn tls_name(name: &str) -> String {
    let labels: Vec<&str> = name.splitn(3, '.').collect();
    if labels.len() == 3 && labels[0].starts_with('_') && labels[1].starts_with('_') {
        return labels[2].trim_end_matches('.').to_string();
    }
    name.rsplit_once(':').map_or(name, |(h, _)| h).to_string()
}

pub(super) fn target_from_url(url: &str) -> Result<Target, String> {
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

pub(super) async fn fan_out(
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
