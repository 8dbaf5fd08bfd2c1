//! DNS discovery: backends named by DNS, re-resolved on their TTL.
//!
//! - `address: NAME:PORT`: every A and AAAA address of NAME is a backend on
//!   PORT, with the entry's weight and max_sessions.
//! - `srv: NAME` (e.g. `_agi._tcp.ivr.backends.svc.cluster.local`, what a
//!   Kubernetes headless Service publishes for a port named `agi`): every
//!   SRV record is a backend at its target's addresses and its port. The
//!   lowest priority is the first failover tier, the next one the second,
//!   and so on; within a tier the record weights are the backend weights.
//!
//! Each name is re-resolved when its answer's TTL runs out, bounded by
//! `dns.min_ttl` and `dns.max_ttl`. A lookup that fails or comes back empty
//! keeps the last good set (and is counted, and retried after `min_ttl`,
//! doubling up to `max_ttl`). A change replaces the pool's member set: new
//! addresses join (and slow-start), removed ones take no new sessions while
//! the sessions they hold run to their end.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agiproxy_config::{BackendTarget, Dns};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record};
use hickory_resolver::{Resolver, TokioResolver};

use super::clock::lock;
use super::live::{key, Found};
use super::state::PoolShared;

/// Builds the resolver `dns` describes: the system's configuration
/// (`/etc/resolv.conf`) unless nameservers are given, search domains
/// overridden when given. Answers are not cached: each lookup asks.
pub fn resolver(dns: &Dns) -> Result<TokioResolver, String> {
    let search: Vec<Name> = dns
        .search
        .iter()
        .map(|s| Name::from_ascii(s).map_err(|e| format!("search domain {s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let (config, mut opts) = if dns.nameservers.is_empty() {
        let (system, opts) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?;
        if search.is_empty() {
            (system, opts)
        } else {
            let (domain, _, servers) = system.into_parts();
            (ResolverConfig::from_parts(domain, search, servers), opts)
        }
    } else {
        let servers = dns
            .nameservers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        let opts = hickory_resolver::config::ResolverOpts::default();
        (ResolverConfig::from_parts(None, search, servers), opts)
    };
    opts.timeout = dns.timeout;
    opts.attempts = 1;
    // Every address is a backend: A and AAAA both, not AAAA only when A is empty.
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot build a resolver: {e}"))
}

/// Follows one DNS entry of a pool (`pool.config.backends[index]`) until the
/// pool's snapshot retires.
pub(crate) async fn follow(pool: Arc<PoolShared>, index: usize) {
    let target = pool.config.backends[index].target.clone();
    let k = key(&target);
    let dns = pool.config.dns.clone();
    let mut resolver: Option<TokioResolver> = None;
    let mut first = true;
    loop {
        if pool.cancel.is_cancelled() {
            return;
        }
        let result = match &resolver {
            Some(r) => lookup(r, &target, &dns).await,
            None => match self::resolver(&dns) {
                Ok(r) => {
                    let out = lookup(&r, &target, &dns).await;
                    resolver = Some(r);
                    out
                }
                Err(e) => Err(e),
            },
        };
        if pool.cancel.is_cancelled() {
            return;
        }
        let wait = match result {
            Ok((found, ttl)) => {
                let wait = ttl.clamp(dns.min_ttl, dns.max_ttl);
                let changed = record_success(&pool, &k, found, wait);
                if changed || first {
                    pool.rebuild_members();
                }
                first = false;
                wait
            }
            Err(error) => {
                let failing = record_failure(&pool, &k, &target, error);
                // min_ttl, doubling with each failure in a row, up to max_ttl.
                dns.min_ttl
                    .saturating_mul(1 << failing.saturating_sub(1).min(16))
                    .min(dns.max_ttl)
                    .max(dns.min_ttl)
            }
        };
        tokio::select! {
            _ = pool.cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Stores a good answer; true when the set changed.
fn record_success(pool: &PoolShared, k: &str, mut found: Vec<Found>, ttl: Duration) -> bool {
    let mut map = lock(&pool.live.discovery);
    let d = map.entry(k.to_string()).or_default();
    let first = d.last_success.is_none();
    let before: HashSet<SocketAddr> = d.found.iter().map(|f| f.addr).collect();
    for f in &mut found {
        f.new = !first && !before.contains(&f.addr);
    }
    let same = |a: &[Found], b: &[Found]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x.addr, x.weight, x.tier) == (y.addr, y.weight, y.tier))
    };
    let changed = !same(&d.found, &found);
    if changed {
        let after: HashSet<SocketAddr> = found.iter().map(|f| f.addr).collect();
        let added: Vec<String> = after.difference(&before).map(|a| a.to_string()).collect();
        let removed: Vec<String> = before.difference(&after).map(|a| a.to_string()).collect();
        tracing::info!(
            pool = %pool.name,
            name = k,
            backends = found.len(),
            added = %added.join(" "),
            removed = %removed.join(" "),
            ttl = ?ttl,
            "DNS answer changed the backend set"
        );
        d.found = found;
    }
    d.last_success = Some(SystemTime::now());
    d.ttl = ttl;
    d.lookups += 1;
    d.failing = 0;
    changed
}

/// Counts a failed or empty lookup; the last good set stays. Returns the
/// failures in a row.
fn record_failure(pool: &PoolShared, k: &str, target: &BackendTarget, error: String) -> u32 {
    let mut map = lock(&pool.live.discovery);
    let d = map.entry(k.to_string()).or_default();
    d.lookups += 1;
    d.failures += 1;
    d.failing += 1;
    let failing = d.failing;
    if failing == 1 || failing.is_multiple_of(10) {
        tracing::warn!(
            pool = %pool.name,
            name = %target,
            error = %error,
            failures_in_a_row = failing,
            kept = d.found.len(),
            "DNS lookup failed; keeping the last good backend set"
        );
    }
    d.last_error = Some(error);
    failing
}

/// Resolves `target`: its backends and the TTL of the answer (the lowest
/// of the records used).
pub async fn lookup(
    resolver: &TokioResolver,
    target: &BackendTarget,
    dns: &Dns,
) -> Result<(Vec<Found>, Duration), String> {
    // Bounded whatever the resolver does with retries and its transports.
    let limit = dns.timeout.saturating_mul(3) + Duration::from_secs(1);
    resolver.clear_cache();
    let out = match target {
        BackendTarget::Static(a) => Ok((
            vec![Found {
                addr: *a,
                weight: None,
                tier: 0,
                new: false,
            }],
            Duration::MAX,
        )),
        BackendTarget::Host { name, port } => {
            tokio::time::timeout(limit, lookup_host(resolver, name, *port))
                .await
                .unwrap_or_else(|_| Err(format!("lookup of {name} timed out")))
        }
        BackendTarget::Srv { name } => tokio::time::timeout(limit, lookup_srv(resolver, name))
            .await
            .unwrap_or_else(|_| Err(format!("SRV lookup of {name} timed out"))),
    }?;
    if out.0.is_empty() {
        return Err(format!("{target}: the answer has no usable address"));
    }
    Ok(out)
}

fn min_ttl(records: &[Record]) -> Duration {
    Duration::from_secs(u64::from(records.iter().map(|r| r.ttl).min().unwrap_or(0)))
}

/// A resolver error in words: hickory prints "no records found" with its query's Rust debug
/// form (`Query { name: Name("…"), query_type: SRV, … }`).
fn dns_error(e: &NetError) -> String {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(none)) => {
            let kind = none.query.query_type();
            if none.response_code == ResponseCode::NXDomain {
                format!("no such name (NXDOMAIN), asked for {kind}")
            } else {
                format!("no {kind} record")
            }
        }
        other => other.to_string(),
    }
}

async fn lookup_host(
    resolver: &TokioResolver,
    name: &str,
    port: u16,
) -> Result<(Vec<Found>, Duration), String> {
    let answer = resolver
        .lookup_ip(name)
        .await
        .map_err(|e| format!("{name}: {}", dns_error(&e)))?;
    let mut seen = HashSet::new();
    let found = answer
        .iter()
        .map(|ip| SocketAddr::new(ip, port))
        .filter(|a| seen.insert(*a))
        .map(|addr| Found {
            addr,
            weight: None,
            tier: 0,
            new: false,
        })
        .collect();
    Ok((found, min_ttl(answer.as_lookup().answers())))
}

async fn lookup_srv(
    resolver: &TokioResolver,
    name: &str,
) -> Result<(Vec<Found>, Duration), String> {
    let answer = resolver
        .srv_lookup(name)
        .await
        .map_err(|e| format!("srv {name}: {}", dns_error(&e)))?;
    let mut ttl = min_ttl(answer.answers());
    let records: Vec<_> = answer
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(srv.clone()),
            _ => None,
        })
        // A target of "." means "no service here" (RFC 2782).
        .filter(|srv| !srv.target.is_root())
        .collect();
    let mut priorities: Vec<u16> = records.iter().map(|s| s.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let top = records.iter().map(|s| s.weight).max().unwrap_or(0);
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for srv in &records {
        // Addresses from the additional section when the server sent them
        // (Kubernetes does), else a lookup of the target.
        let additional: Vec<std::net::IpAddr> = answer
            .additionals()
            .iter()
            .filter(|r| r.name.eq_ignore_root(&srv.target))
            .filter_map(|r| r.data.ip_addr())
            .collect();
        let ips = if additional.is_empty() {
            match resolver.lookup_ip(srv.target.clone()).await {
                Ok(a) => {
                    ttl = ttl.min(min_ttl(a.as_lookup().answers()));
                    a.iter().collect()
                }
                // The name has no address: the target is gone, drop it.
                Err(e @ NetError::Dns(DnsError::NoRecordsFound(_))) => {
                    tracing::debug!(srv = name, target = %srv.target, error = dns_error(&e), "SRV target has no address");
                    Vec::new()
                }
                // A timeout or a server failure says nothing about the
                // target: fail the whole lookup, so that the last good set
                // stays (a partial set would shrink the pool for a TTL).
                Err(e) => {
                    return Err(format!(
                        "srv {name}: target {}: {}",
                        srv.target,
                        dns_error(&e)
                    ))
                }
            }
        } else {
            additional
        };
        let tier = priorities
            .iter()
            .position(|&p| p == srv.priority)
            .unwrap_or(0) as u16;
        let weight = srv_weight(srv.weight, top);
        for ip in ips {
            let addr = SocketAddr::new(ip, srv.port);
            if seen.insert(addr) {
                found.push(Found {
                    addr,
                    weight: Some(weight),
                    tier,
                    new: false,
                });
            }
        }
    }
    Ok((found, ttl))
}

/// An SRV weight as a backend weight (1..=1000): weights above 1000 are
/// scaled down in proportion; 0 counts as 1 (RFC 2782 gives it a small
/// chance when others are higher).
fn srv_weight(weight: u16, top: u16) -> u32 {
    let w = u32::from(weight);
    let w = if top > 1000 {
        w * 1000 / u32::from(top)
    } else {
        w
    };
    w.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_weights_scale_into_range() {
        assert_eq!(srv_weight(3, 3), 3);
        assert_eq!(srv_weight(0, 3), 1);
        assert_eq!(srv_weight(65535, 65535), 1000);
        assert_eq!(srv_weight(16384, 65535), 250);
    }

    #[test]
    fn keys_ignore_case_and_the_final_dot() {
        let a = BackendTarget::Host {
            name: "IVR.test.".into(),
            port: 1,
        };
        let b = BackendTarget::Host {
            name: "ivr.test".into(),
            port: 1,
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(
            key(&b),
            key(&BackendTarget::Srv {
                name: "ivr.test".into()
            })
        );
    }

    #[test]
    fn configured_nameservers_replace_the_system_ones() {
        let dns = Dns {
            nameservers: vec!["127.0.0.1:5353".parse().unwrap()],
            search: vec!["svc.test".into()],
            ..Dns::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(resolver(&dns).is_ok());
        });
    }
}
