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
//!
//! A name's lookup task belongs to the pool, not to one config: a reload
//! that keeps the name with the same `dns` settings hands it over (see
//! [`hand_over`]), so a reload asks nothing. A name that is new or resolved
//! differently is asked at once; a dropped one is forgotten.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use agiproxy_config::{BackendTarget, Dns, Pool};
use futures_util::stream::{self, StreamExt};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record};
use hickory_resolver::{Resolver, TokioResolver};
use tokio_util::sync::CancellationToken;

use super::clock::lock;
use super::live::{key, Follower, Found, Owner, PoolLive, TargetKnown};

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

/// Makes `pool`, whose config was just activated, the one its DNS names
/// work for: a changed answer rebuilds its member set from now on.
///
/// A name this config keeps with the same `dns` settings keeps its lookup
/// task, handed over as it is: its lookup in flight, its next lookup when
/// the answer's TTL runs out, its backoff. (A task per config asked every
/// name again at every reload, and a rollout steps its weights by reloads.
/// Handing the one task over, rather than starting another that resumes a
/// stored schedule, leaves no moment with two lookups of a name and nothing
/// to re-derive.) The tasks of names dropped or resolved differently end,
/// and the answers of dropped names go, under the lock a task records
/// under: nothing of theirs lands after this. [`start`] then starts the
/// tasks this config lacks.
///
/// Returns [`PoolLive::answers_changed`]: a change recorded after the pool
/// was built went to the config running then, and the caller rebuilds.
pub(crate) fn hand_over<P: Owner + 'static>(pool: &Arc<P>) -> u64 {
    let names: HashMap<String, &BackendTarget> =
        dns_names(pool.config()).map(|t| (key(t), t)).collect();
    let mut followers = lock(&pool.live().followers);
    let current: Weak<dyn Owner> = Arc::downgrade(pool) as Weak<P>;
    followers.current = Some(current);
    let mut map = lock(&pool.live().discovery);
    let mut respelled = Vec::new();
    followers.by_name.retain(|k, f| {
        // The same spelling, case aside: `agi` and `agi.` share a key, but
        // the search list completes only the first (audit: a reload from
        // one to the other was handed over and changed nothing). Spelled
        // otherwise, the name is asked again at once, like one with other
        // settings, and its last good set serves meanwhile: dropped, a
        // final dot added during a DNS outage emptied the pool (audit: 10
        // of 10 calls `no_backend`).
        let same = names.get(k).map(|t| same_spelling(t, &f.target));
        let keep = same == Some(true) && f.dns == pool.config().dns;
        if keep {
            f.reloads.fetch_add(1, Ordering::Relaxed);
        } else {
            f.cancel.cancel();
        }
        if same == Some(false) {
            respelled.push(k.clone());
        }
        keep
    });
    // Its backoff is the old spelling's: the new one starts at `min_ttl`.
    for k in respelled {
        if let Some(d) = map.get_mut(&k) {
            d.failing = 0;
        }
    }
    // The DNS answers of names this config no longer follows go: kept,
    // they piled up with every name a pool ever had, and a name coming
    // back brought its old answer back at once instead of contributing
    // nothing until it answers again (audit).
    map.retain(|k, _| names.contains_key(k));
    pool.live().answers_changed.load(Ordering::Relaxed)
}

/// Starts a lookup task ([`follow`]) for each DNS name of `pool` that has
/// none: a new name, new settings, the first config. Only for the config
/// [`hand_over`] made current.
pub(crate) fn start<P: Owner>(pool: &Arc<P>, rt: &tokio::runtime::Handle) {
    let mut followers = lock(&pool.live().followers);
    if !followers.work_for(Arc::as_ptr(pool)) {
        return;
    }
    for target in dns_names(pool.config()) {
        let k = key(target);
        if followers.by_name.contains_key(&k) {
            continue;
        }
        let cancel = CancellationToken::new();
        let reloads = Arc::new(AtomicU64::new(0));
        followers.by_name.insert(
            k.clone(),
            Follower {
                target: target.clone(),
                dns: pool.config().dns.clone(),
                cancel: cancel.clone(),
                reloads: reloads.clone(),
            },
        );
        rt.spawn(follow(Followed {
            live: pool.live().clone(),
            pool: pool.name().to_string(),
            target: target.clone(),
            key: k,
            dns: pool.config().dns.clone(),
            cancel,
            reloads,
        }));
    }
}

/// Ends the pool's lookup tasks if `pool` is the config they work for (the
/// pool is gone from the running config, or the process stops); once a
/// newer config has taken them over, nothing.
pub(crate) fn stop<P: Owner>(pool: &Arc<P>) {
    let mut followers = lock(&pool.live().followers);
    if !followers.work_for(Arc::as_ptr(pool)) {
        return;
    }
    for f in followers.by_name.values() {
        f.cancel.cancel();
    }
    followers.by_name.clear();
    followers.current = None;
}

/// Whether two DNS entries ask the same question: the same name, case
/// aside (DNS ignores it), the final `.` included (without it the search
/// list applies), the same port.
pub(crate) fn same_spelling(a: &BackendTarget, b: &BackendTarget) -> bool {
    match (a, b) {
        (BackendTarget::Host { name: n, port: p }, BackendTarget::Host { name: m, port: q }) => {
            p == q && n.eq_ignore_ascii_case(m)
        }
        (BackendTarget::Srv { name: n }, BackendTarget::Srv { name: m }) => {
            n.eq_ignore_ascii_case(m)
        }
        _ => a == b,
    }
}

/// The DNS entries of a pool's config.
fn dns_names(pool: &Pool) -> impl Iterator<Item = &BackendTarget> {
    pool.backends
        .iter()
        .map(|b| &b.target)
        .filter(|t| t.static_addr().is_none())
}

/// What one lookup task follows.
struct Followed {
    live: Arc<PoolLive>,
    /// The pool's, for logs.
    pool: String,
    target: BackendTarget,
    key: String,
    dns: Dns,
    cancel: CancellationToken,
    /// [`Follower::reloads`].
    reloads: Arc<AtomicU64>,
}

/// Follows one DNS name of a pool until it is cancelled (see [`hand_over`],
/// [`stop`]).
async fn follow(name: Followed) {
    let Followed {
        live,
        target,
        dns,
        cancel,
        reloads,
        ..
    } = &name;
    let mut resolver: Option<TokioResolver> = None;
    let mut built_at = reloads.load(Ordering::Relaxed);
    let mut first = true;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        // What the last good answer held: a family failing now that held
        // addresses then fails the lookup (the set stays).
        let known = lock(&live.discovery)
            .get(&name.key)
            .map(|d| Known {
                families: Families::of(&d.found),
                targets: d.targets.clone(),
                first: d.last_success.is_none(),
            })
            .unwrap_or_else(Known::first);
        // Built anew after a reload has taken this task over, as a new task
        // would be: the system's resolver configuration (`/etc/resolv.conf`,
        // the hosts file) is read again, at the next lookup, not at once.
        let handovers = reloads.load(Ordering::Relaxed);
        if handovers != built_at {
            resolver = None;
        }
        let lookup = async {
            let r = match resolver.take() {
                Some(r) => r,
                None => {
                    // Off the runtime's threads: it may read files.
                    let d = dns.clone();
                    let r = tokio::task::spawn_blocking(move || self::resolver(&d))
                        .await
                        .map_err(|e| format!("cannot build a resolver: {e}"))??;
                    built_at = handovers;
                    r
                }
            };
            let out = lookup_known(&r, target, dns, &known).await;
            resolver = Some(r);
            out
        };
        // A lookup of a name a reload dropped ends with it: left to its
        // timeout, a storm of reloads held thousands of sockets (audit).
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = lookup => r,
        };
        let wait = match result {
            Ok(answer) => {
                let wait = answer.ttl.clamp(dns.min_ttl, dns.max_ttl);
                let Some(changed) = record_success(&name, answer, wait) else {
                    return;
                };
                if changed || first {
                    // The config running now: once a reload has taken
                    // this task over, that one's.
                    let current = lock(&live.followers)
                        .current
                        .as_ref()
                        .and_then(Weak::upgrade);
                    if let Some(pool) = current {
                        pool.rebuild_members();
                    }
                }
                first = false;
                wait
            }
            Err(error) => {
                let Some(failing) = record_failure(&name, error) else {
                    return;
                };
                // min_ttl, doubling with each failure in a row, up to max_ttl.
                dns.min_ttl
                    .saturating_mul(1 << failing.saturating_sub(1).min(16))
                    .min(dns.max_ttl)
                    .max(dns.min_ttl)
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Stores a good answer; whether the set changed, None when the task was
/// ended meanwhile (its name may be dropped: no answer of it comes back).
fn record_success(name: &Followed, answer: Answer, ttl: Duration) -> Option<bool> {
    let Answer {
        mut found, targets, ..
    } = answer;
    let mut map = lock(&name.live.discovery);
    if name.cancel.is_cancelled() {
        return None;
    }
    let k = name.key.as_str();
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
        let added = some_of(after.difference(&before));
        let removed = some_of(before.difference(&after));
        tracing::info!(
            pool = %name.pool,
            // As the config spells it, like the failure line (the key
            // folds case and a final dot).
            name = %name.target,
            backends = found.len(),
            added = %added,
            removed = %removed,
            ttl = ?ttl,
            "DNS answer changed the backend set"
        );
        d.found = found;
        name.live.answers_changed.fetch_add(1, Ordering::Relaxed);
    }
    d.last_success = Some(SystemTime::now());
    d.targets = Arc::new(targets);
    d.ttl = ttl;
    d.lookups += 1;
    d.failing = 0;
    Some(changed)
}

/// The first addresses of a change, and how many more: a log line stays a
/// line whatever the answer's size.
fn some_of<'a>(addrs: impl Iterator<Item = &'a SocketAddr>) -> String {
    const SHOWN: usize = 16;
    let mut out = String::new();
    let mut more = 0usize;
    for (i, a) in addrs.enumerate() {
        if i < SHOWN {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(&a.to_string());
        } else {
            more += 1;
        }
    }
    if more > 0 {
        out.push_str(&format!(" and {more} more"));
    }
    out
}

/// Counts a failed or empty lookup; the last good set stays. Returns the
/// failures in a row, None when the task was ended meanwhile.
fn record_failure(name: &Followed, error: String) -> Option<u32> {
    let mut map = lock(&name.live.discovery);
    if name.cancel.is_cancelled() {
        return None;
    }
    let d = map.entry(name.key.clone()).or_default();
    d.lookups += 1;
    d.failures += 1;
    d.failing += 1;
    let failing = d.failing;
    if failing == 1 || failing.is_multiple_of(10) {
        tracing::warn!(
            pool = %name.pool,
            name = %name.target,
            error = %error,
            failures_in_a_row = failing,
            kept = d.found.len(),
            "DNS lookup failed; keeping the last good backend set"
        );
    }
    d.last_error = Some(error);
    Some(failing)
}

/// The address families a name's last good answer held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    fn of(found: &[Found]) -> Families {
        Families {
            v4: found.iter().any(|f| f.addr.is_ipv4()),
            v6: found.iter().any(|f| f.addr.is_ipv6()),
        }
    }

    fn has(self, v6: bool) -> bool {
        if v6 {
            self.v6
        } else {
            self.v4
        }
    }
}

/// What a name's last good answer says of the lookup to come.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The families the whole answer held (a name's A/AAAA lookup).
    pub families: Families,
    /// Each SRV target it looked up: a target is judged by its own
    /// families, not the name's (an AAAA failure of an IPv4-only target,
    /// beside an IPv6 one, failed every lookup and froze the set: audit).
    pub targets: Arc<HashMap<String, TargetKnown>>,
    /// No answer yet.
    pub first: bool,
}

impl Known {
    /// Nothing known: a name's first lookup.
    pub fn first() -> Known {
        Known {
            first: true,
            ..Known::default()
        }
    }
}

/// A good answer: the backends, the TTL (the lowest of the records used),
/// and what each SRV target looked up held ([`Known::targets`] next time).
#[derive(Debug, Clone)]
pub struct Answer {
    pub found: Vec<Found>,
    pub ttl: Duration,
    pub targets: HashMap<String, TargetKnown>,
}

/// Resolves `target`: its backends and the TTL of the answer (the lowest
/// of the records used). A first lookup: see [`lookup_known`].
pub async fn lookup(
    resolver: &TokioResolver,
    target: &BackendTarget,
    dns: &Dns,
) -> Result<(Vec<Found>, Duration), String> {
    let a = lookup_known(resolver, target, dns, &Known::first()).await?;
    Ok((a.found, a.ttl))
}

/// [`lookup`] for a name whose last good answer held the address families
/// `known`: a family that fails (a timeout, SERVFAIL) fails the lookup if
/// it held addresses then, so that the set does not shrink to the other
/// family; one that never answered (a server that drops AAAA queries) is
/// left out.
pub async fn lookup_known(
    resolver: &TokioResolver,
    target: &BackendTarget,
    dns: &Dns,
    known: &Known,
) -> Result<Answer, String> {
    // Bounded whatever the resolver does with retries and its transports.
    let limit = dns.timeout.saturating_mul(3) + Duration::from_secs(1);
    resolver.clear_cache();
    let out = match target {
        BackendTarget::Static(a) => Ok(Answer {
            found: vec![Found {
                addr: *a,
                weight: None,
                tier: 0,
                new: false,
            }],
            ttl: Duration::MAX,
            targets: HashMap::new(),
        }),
        BackendTarget::Host { name, port } => {
            tokio::time::timeout(limit, lookup_host(resolver, name, *port, known.families))
                .await
                .unwrap_or_else(|_| Err(format!("lookup of {name} timed out")))
                .map(|(found, ttl)| Answer {
                    found,
                    ttl,
                    targets: HashMap::new(),
                })
        }
        // Bounded inside, per query: its targets' lookups take rounds.
        BackendTarget::Srv { name } => lookup_srv(resolver, name, known, limit).await,
    }?;
    if out.found.is_empty() {
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
    known: Families,
) -> Result<(Vec<Found>, Duration), String> {
    let (ips, ttl) = addresses(resolver, name, known, true, None)
        .await
        .map_err(|e| format!("{name}: {}", dns_error(&e)))?;
    let mut seen = HashSet::new();
    let found = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .filter(|a| seen.insert(*a))
        // The pool takes no more (`Pool::MAX_MEMBERS`): nor is more kept.
        .take(Pool::MAX_MEMBERS)
        .map(|addr| Found {
            addr,
            weight: None,
            tier: 0,
            new: false,
        })
        .collect();
    Ok((found, ttl))
}

/// The addresses of `name` and the lowest TTL among them: A and AAAA asked
/// apart, at once. A family without records is no error. Another failure
/// (a timeout, SERVFAIL) of a family that `known` says held addresses fails
/// the lookup, so that the last good set stays: hickory's `lookup_ip`
/// succeeds when either family does, and an audit's SERVFAIL on A, with
/// AAAA answered, shrank a pool to its IPv6 addresses every few seconds. A
/// family that held none is left out when it fails (a server that drops
/// AAAA queries), as long as the other answers.
///
/// `ask_v6`: whether AAAA is asked at all (see [`lookup_srv`]).
/// `v6_failed`, shared by the lookups of one SRV answer's targets: set by
/// the first AAAA that fails so.
async fn addresses(
    resolver: &TokioResolver,
    name: impl hickory_resolver::proto::rr::IntoName + Clone,
    known: Families,
    ask_v6: bool,
    v6_failed: Option<&AtomicBool>,
) -> Addresses {
    let (v4, v6) = tokio::join!(resolver.ipv4_lookup(name.clone()), async {
        if ask_v6 {
            Some(resolver.ipv6_lookup(name).await)
        } else {
            None
        }
    });
    let mut ips = Vec::new();
    let mut ttl = Duration::MAX;
    let mut first_error = None;
    for (answer, v6) in [(Some(v4), false), (v6, true)] {
        let Some(answer) = answer else { continue };
        match answer {
            Ok(l) => {
                // An IPv4-mapped AAAA is the IPv4 address, as a backend
                // written so in the config is (and the drain API takes).
                let answered = l.answers().iter().filter_map(|r| r.data.ip_addr());
                ips.extend(answered.map(|ip| ip.to_canonical()));
                ttl = ttl.min(min_ttl(l.answers()));
            }
            Err(e @ NetError::Dns(DnsError::NoRecordsFound(_))) => {
                first_error.get_or_insert(e);
            }
            Err(e) if known.has(v6) => return Err(e),
            Err(e) => {
                if let (true, Some(f)) = (v6, v6_failed) {
                    f.store(true, Ordering::Relaxed);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if ips.is_empty() => Err(e),
        _ => Ok((ips, ttl)),
    }
}

/// What [`addresses`] gives.
type Addresses = Result<(Vec<IpAddr>, Duration), NetError>;

/// SRV targets resolved at once: their lookups run side by side (one after
/// another, a server that drops AAAA queries cost a whole timeout per
/// target, and two targets already outlasted the lookup's limit).
const TARGETS_AT_ONCE: usize = 16;

/// `limit` bounds each query: the SRV query, then each target's address
/// lookup. One limit for the whole lookup failed every SRV name with more
/// than 16 targets to look up where each took most of it (a server that
/// drops AAAA queries: audit), and kept such a pool empty for good. The
/// whole is bounded by the number of targets (an answer holds at most
/// about 3,000), in rounds of [`TARGETS_AT_ONCE`].
///
/// Each target is judged by what it held in the last good answer
/// (`known.targets`): a family it held that fails now fails the lookup,
/// one it did not is left out. Once one target's AAAA has failed so, AAAA
/// is not asked of the targets after it that held no IPv6 and were asked
/// before (each would wait its whole timeout for nothing: one round of 16
/// pays it, not every round); up to a round of targets never asked AAAA (a
/// new one, or one a first lookup passed over) are asked all the same, so
/// that their IPv6 addresses are found within a few lookups.
async fn lookup_srv(
    resolver: &TokioResolver,
    name: &str,
    known: &Known,
    limit: Duration,
) -> Result<Answer, String> {
    let answer = tokio::time::timeout(limit, resolver.srv_lookup(name))
        .await
        .map_err(|_| format!("SRV lookup of {name} timed out"))?
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
    let mut records = records;
    // Lowest priority first: what the member cap leaves out is the last tiers.
    records.sort_by_key(|s| s.priority);
    let mut priorities: Vec<u16> = records.iter().map(|s| s.priority).collect();
    priorities.dedup();
    let top = records.iter().map(|s| s.weight).max().unwrap_or(0);
    // Addresses from the additional section when the server sent them
    // (Kubernetes does), else a lookup of the target: those at once. Looked
    // up by name in a map made once: a scan of the section per target was
    // quadratic (audit: 1,350 targets with a long shared suffix, 0.65 s of a
    // runtime thread per lookup, every second with a TTL of 0).
    let mut additionals: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for r in answer.additionals() {
        if let Some(ip) = r.data.ip_addr() {
            additionals
                .entry(target_key(&r.name))
                .or_default()
                .push(ip.to_canonical());
        }
    }
    let additional = |target: &Name| -> Vec<IpAddr> {
        additionals
            .get(&target_key(target))
            .cloned()
            .unwrap_or_default()
    };
    let mut to_ask: Vec<Name> = records
        .iter()
        .filter(|srv| !additionals.contains_key(&target_key(&srv.target)))
        .map(|srv| srv.target.clone())
        .collect();
    to_ask.sort();
    to_ask.dedup();
    let v6_failed = AtomicBool::new(false);
    let v6_failed = &v6_failed;
    // Targets never asked AAAA are asked even once AAAA has failed, but at
    // most a round of them a lookup: 3,000 of them behind a server that
    // drops AAAA would otherwise hold one lookup for minutes.
    let probes = std::sync::atomic::AtomicUsize::new(TARGETS_AT_ONCE);
    let probes = &probes;
    let mut asked = stream::iter(to_ask)
        .map(|target| async move {
            let k = target_key(&target);
            let was = known.targets.get(&k).copied();
            let families = was.map_or_else(Families::default, |w| Families { v4: w.v4, v6: w.v6 });
            let failed = v6_failed.load(Ordering::Relaxed);
            let probe = || {
                probes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            };
            let ask_v6 = match was {
                Some(w) => w.v6 || !failed || (!w.v6_asked && probe()),
                None if known.first => !failed,
                None => !failed || probe(),
            };
            let found = addresses(resolver, target.clone(), families, ask_v6, Some(v6_failed));
            let r = tokio::time::timeout(limit, found).await;
            // Once asked, for good: recorded as this lookup's choice alone,
            // a target the shortcut passed over again counted as never
            // asked, and the probes went round the same targets (review).
            let v6_asked = ask_v6 || was.is_some_and(|w| w.v6_asked);
            (target, k, v6_asked, r)
        })
        .buffer_unordered(TARGETS_AT_ONCE);
    let mut resolved = std::collections::HashMap::new();
    let mut targets = HashMap::new();
    while let Some((target, k, v6_asked, r)) = asked.next().await {
        // The first that times out fails the name: the rounds left would
        // change nothing (dropped, they end their lookups).
        let Ok(r) = r else {
            return Err(format!("srv {name}: lookup of target {target} timed out"));
        };
        match r {
            Ok((ips, t)) => {
                ttl = ttl.min(t);
                let held = TargetKnown {
                    v4: ips.iter().any(IpAddr::is_ipv4),
                    v6: ips.iter().any(IpAddr::is_ipv6),
                    v6_asked,
                };
                targets.insert(k, held);
                resolved.insert(target, ips);
            }
            // The name has no address: the target is gone, drop it.
            Err(e @ NetError::Dns(DnsError::NoRecordsFound(_))) => {
                tracing::debug!(srv = name, target = %target, error = dns_error(&e), "SRV target has no address");
                targets.insert(
                    k,
                    TargetKnown {
                        v6_asked,
                        ..TargetKnown::default()
                    },
                );
                resolved.insert(target, Vec::new());
            }
            // A timeout or a server failure says nothing about the target:
            // fail the whole lookup, so that the last good set stays (a
            // partial set would shrink the pool for a TTL).
            Err(e) => return Err(format!("srv {name}: target {target}: {}", dns_error(&e))),
        }
    }
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for srv in &records {
        let ips = match resolved.get(&srv.target) {
            Some(ips) => ips.clone(),
            None => additional(&srv.target),
        };
        let tier = priorities
            .iter()
            .position(|&p| p == srv.priority)
            .unwrap_or(0) as u16;
        let weight = srv_weight(srv.weight, top);
        for ip in ips {
            let addr = SocketAddr::new(ip, srv.port);
            if found.len() < Pool::MAX_MEMBERS && seen.insert(addr) {
                found.push(Found {
                    addr,
                    weight: Some(weight),
                    tier,
                    new: false,
                });
            }
        }
    }
    Ok(Answer {
        found,
        ttl,
        targets,
    })
}

/// An SRV target's key in [`Known::targets`]: lower case, no final dot.
fn target_key(target: &Name) -> String {
    target.to_ascii().trim_end_matches('.').to_ascii_lowercase()
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
    fn a_change_logs_its_first_addresses_and_a_count() {
        let addrs: Vec<SocketAddr> = (0..20u16)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], 1000 + p)))
            .collect();
        let line = some_of(addrs.iter());
        assert!(line.starts_with("127.0.0.1:1000 127.0.0.1:1001 "), "{line}");
        assert!(line.ends_with("127.0.0.1:1015 and 4 more"), "{line}");
        assert_eq!(some_of(addrs[..2].iter()), "127.0.0.1:1000 127.0.0.1:1001");
        assert_eq!(some_of([].iter()), "");
    }

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
