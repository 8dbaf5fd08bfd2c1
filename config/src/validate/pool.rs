//! Pools and their backends.

use crate::duration;
use crate::error::Errors;
use std::time::Duration;

/// Passive failures in a row before an ejection. Envoy's outlier detection
/// ejects after 5 consecutive errors; HAProxy, asked to observe, after 10.
/// One failure (the old default) turned a single early close into a second
/// of failed calls on a one-address pool.
pub const DEFAULT_EJECT_AFTER: u32 = 5;

use crate::model::{
    Backend, BackendTarget, Backoff, Balance, Dns, HealthCheck, HealthKind, Pool, DEFAULT_SPLIT_KEY,
};
use crate::raw::{
    DurationText, RawBackend, RawBalance, RawDns, RawHealth, RawHealthKind, RawPassive, RawPool,
};

use super::checks::{self, Seen};

/// Backend weights for `balance: weighted`.
const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=1000;

/// Health check and DNS bounds: nothing sensible lies outside them.
const RISE_FALL: std::ops::RangeInclusive<u32> = 1..=100;

/// The top-level `dns:` block, the defaults every pool's own `dns:` overrides.
pub(super) fn global_dns(raw: Option<&RawDns>, errs: &mut Errors) -> Dns {
    dns(Dns::default(), raw, "dns", errs)
}

pub(super) fn compile_all(raw: &[RawPool], global_dns: &Dns, errs: &mut Errors) -> Vec<Pool> {
    let mut names = Seen::default();
    let mut out = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let path = format!("pools[{i}]");
        if let Some(name) = p.name.as_deref() {
            if let Some(first) = names.first(name, &path) {
                errs.push(
                    format!("{path}.name"),
                    format!("{name:?} is also the name of {first}; pool names must be unique"),
                );
            }
        }
        if let Some(pool) = compile(p, &path, global_dns, errs) {
            out.push(pool);
        }
    }
    out
}

fn compile(p: &RawPool, path: &str, global_dns: &Dns, errs: &mut Errors) -> Option<Pool> {
    let mut local = Errors::default();
    let name = match &p.name {
        None => {
            local.push(
                format!("{path}.name"),
                "missing; give each pool a name, e.g. name: ivr",
            );
            String::new()
        }
        Some(name) => {
            if let Err(m) = checks::name(name) {
                local.push(format!("{path}.name"), m);
            }
            name.clone()
        }
    };
    let balance = balance(p, path, &mut local);
    let backends = backends(
        p.backends.as_deref(),
        &format!("{path}.backends"),
        &mut local,
    );
    let max_sessions = p.max_sessions.and_then(|n| {
        checks::in_range(n, 1..=u32::MAX, None)
            .map_err(|m| local.push(format!("{path}.max_sessions"), m))
            .ok()
    });
    let backoff = passive(p.passive.as_ref(), &format!("{path}.passive"), &mut local);
    let eject_after = match p.passive.as_ref().and_then(|r| r.consecutive_failures) {
        None => DEFAULT_EJECT_AFTER,
        Some(n) => checks::in_range(n, 1..=100u32, Some(DEFAULT_EJECT_AFTER))
            .map_err(|m| local.push(format!("{path}.passive.consecutive_failures"), m))
            .unwrap_or(DEFAULT_EJECT_AFTER),
    };
    let max_ejection_percent = match p.max_ejection_percent {
        None => 50,
        Some(n) => checks::in_range(n, 0..=100u32, Some(50))
            .map_err(|m| local.push(format!("{path}.max_ejection_percent"), m))
            .unwrap_or(50),
    };
    let health = p
        .health
        .as_ref()
        .and_then(|h| health(h, &format!("{path}.health"), &mut local));
    let slow_start = p
        .slow_start
        .as_ref()
        .and_then(|t| one_duration(t, &format!("{path}.slow_start"), &mut local));
    let dns = dns(
        global_dns.clone(),
        p.dns.as_ref(),
        &format!("{path}.dns"),
        &mut local,
    );

    let ok = local.is_empty();
    errs.extend(local);
    if !ok {
        return None;
    }
    Some(Pool {
        name,
        balance,
        backends,
        max_sessions,
        backoff,
        eject_after,
        max_ejection_percent,
        health,
        slow_start,
        dns,
    })
}

/// `hash_key` is checked whatever the balance, but only used by `hash`: the contract config
/// itself writes it next to `balance: least_sessions`, so it cannot be refused there.
fn balance(p: &RawPool, path: &str, errs: &mut Errors) -> Balance {
    let key = p
        .hash_key
        .clone()
        .unwrap_or_else(|| DEFAULT_SPLIT_KEY.to_string());
    if let Err(m) = checks::var_name(&key) {
        errs.push(format!("{path}.hash_key"), m);
    }
    match p.balance.unwrap_or(RawBalance::LeastSessions) {
        RawBalance::RoundRobin => Balance::RoundRobin,
        RawBalance::Weighted => Balance::Weighted,
        RawBalance::LeastSessions => Balance::LeastSessions,
        RawBalance::Hash => Balance::Hash { key },
    }
}

fn backends(raw: Option<&[RawBackend]>, path: &str, errs: &mut Errors) -> Vec<Backend> {
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        errs.push(
            path,
            "a pool needs at least one backend, e.g. backends: [{ address: \"10.0.0.1:4573\" }]",
        );
    }
    if raw.len() > Pool::MAX_BACKENDS {
        // A pool's member set is rebuilt and each call orders its tier:
        // bounded work per call and per change needs a bounded list.
        errs.push(
            path,
            format!(
                "{} entries; a pool takes at most {}: split it into pools, or let DNS \
                 (a name or SRV record) list the addresses",
                raw.len(),
                Pool::MAX_BACKENDS
            ),
        );
        return Vec::new();
    }
    let mut seen = Seen::default();
    let mut out = Vec::new();
    for (j, b) in raw.iter().enumerate() {
        let at = format!("{path}[{j}]");
        let (key, parsed) = match (&b.address, &b.srv) {
            (Some(_), Some(_)) => {
                errs.push(&at, "has both address and srv; keep one");
                ("address", None)
            }
            (None, None) => {
                errs.push(
                    &at,
                    "has no address; write e.g. { address: \"10.0.0.1:4573\" }, \
                     { address: \"ivr.svc.cluster.local:4573\" } or \
                     { srv: \"_agi._tcp.ivr.svc.cluster.local\" }",
                );
                ("address", None)
            }
            (None, Some(text)) => (
                "srv",
                srv_name(text)
                    .map_err(|m| errs.push(format!("{at}.srv"), m))
                    .ok(),
            ),
            (Some(text), None) => (
                "address",
                checks::backend_address(text)
                    .map_err(|m| errs.push(format!("{at}.address"), m))
                    .ok(),
            ),
        };
        let target = parsed.and_then(|t| match seen.first(dedup_key(&t), &at) {
            Some(first) => {
                errs.push(
                    format!("{at}.{key}"),
                    format!(
                        "{t} is listed twice in this pool (also {first}); list each backend once"
                    ),
                );
                None
            }
            None => Some(t),
        });
        let weight = match (b.weight, &target) {
            (Some(_), Some(BackendTarget::Srv { .. })) => {
                errs.push(
                    format!("{at}.weight"),
                    "an SRV name takes each record's own weight (and priority); remove weight here",
                );
                None
            }
            (None, _) => Some(1),
            (Some(w), _) => checks::in_range(w, WEIGHTS, Some(1))
                .map_err(|m| errs.push(format!("{at}.weight"), m))
                .ok(),
        };
        let max_sessions = match b.max_sessions {
            None => Some(None),
            Some(n) => checks::in_range(n, 1..=u32::MAX, None)
                .map(Some)
                .map_err(|m| errs.push(format!("{at}.max_sessions"), m))
                .ok(),
        };
        if let (Some(target), Some(weight), Some(max_sessions)) = (target, weight, max_sessions) {
            out.push(Backend {
                target,
                weight,
                max_sessions,
            });
        }
    }
    out
}

/// Names compare without case and without a final dot.
fn dedup_key(t: &BackendTarget) -> String {
    let norm = |n: &str| n.trim_end_matches('.').to_ascii_lowercase();
    match t {
        BackendTarget::Static(a) => a.to_string(),
        BackendTarget::Host { name, port } => format!("{}:{port}", norm(name)),
        BackendTarget::Srv { name } => format!("srv {}", norm(name)),
    }
}

fn srv_name(text: &str) -> Result<BackendTarget, String> {
    let trimmed = text.trim();
    if let Some((host, port)) = trimmed.rsplit_once(':') {
        if port.parse::<u16>().is_ok() {
            return Err(format!(
                "{trimmed:?} has a port; SRV records give each backend's port, so write the name \
                 alone, e.g. srv: \"{host}\" (or address: \"{trimmed}\" for an A/AAAA name)"
            ));
        }
    }
    checks::dns_name(trimmed).map(|name| BackendTarget::Srv { name })
}

fn one_duration(text: &DurationText, path: &str, errs: &mut Errors) -> Option<Duration> {
    duration::parse(&text.0)
        .map_err(|m| errs.push(path, m))
        .ok()
}

fn health(raw: &RawHealth, path: &str, errs: &mut Errors) -> Option<HealthCheck> {
    let mut ok = true;
    let mut dur = |key: &str, text: &Option<DurationText>, default: Duration| match text {
        None => default,
        Some(t) => one_duration(t, &format!("{path}.{key}"), errs).unwrap_or_else(|| {
            ok = false;
            default
        }),
    };
    let interval = dur("interval", &raw.interval, Duration::from_secs(2));
    let timeout = dur("timeout", &raw.timeout, Duration::from_secs(1));
    let jitter = dur("jitter", &raw.jitter, interval / 10);
    let mut count = |key: &str, value: Option<u64>, default: u32| match value {
        None => default,
        Some(n) => checks::in_range(n, RISE_FALL, Some(default)).unwrap_or_else(|m| {
            errs.push(format!("{path}.{key}"), m);
            ok = false;
            default
        }),
    };
    let rise = count("rise", raw.rise, 2);
    let fall = count("fall", raw.fall, 3);
    let kind = match raw.kind.unwrap_or(RawHealthKind::Agi) {
        RawHealthKind::Agi => {
            let script = raw.script.as_ref().map_or("healthz", |s| s.0.as_str());
            let script = script.trim().strip_prefix('/').unwrap_or(script.trim());
            if script.is_empty() || script.contains(char::is_whitespace) {
                errs.push(
                    format!("{path}.script"),
                    format!(
                        "{script:?} is not a script name; write the path a backend serves its \
                         health check on, e.g. script: healthz"
                    ),
                );
                ok = false;
            }
            // Checked like a route's pattern (within the config's budget, a repeated one
            // once), then compiled: health checks match it on every probe.
            let expect = raw.expect.as_ref().and_then(|e| {
                checks::pattern(&e.0)
                    .map(|p| p.regex().clone())
                    .map_err(|m| {
                        errs.push(format!("{path}.expect"), m);
                        ok = false;
                    })
                    .ok()
            });
            HealthKind::Agi {
                script: script.to_string(),
                expect,
            }
        }
        RawHealthKind::Tcp => {
            for (key, set) in [
                ("script", raw.script.is_some()),
                ("expect", raw.expect.is_some()),
            ] {
                if set {
                    errs.push(
                        format!("{path}.{key}"),
                        "only used by type: agi; remove it, or use type: agi",
                    );
                    ok = false;
                }
            }
            HealthKind::Tcp
        }
    };
    if ok && timeout > interval {
        errs.push(
            format!("{path}.timeout"),
            format!(
                "timeout ({}) is longer than interval ({}); a check must end before the next \
                 one starts: lower timeout or raise interval",
                duration::format(timeout),
                duration::format(interval)
            ),
        );
        ok = false;
    }
    if ok && jitter >= interval {
        errs.push(
            format!("{path}.jitter"),
            format!(
                "jitter ({}) must be shorter than interval ({}); e.g. a tenth of it",
                duration::format(jitter),
                duration::format(interval)
            ),
        );
        ok = false;
    }
    ok.then_some(HealthCheck {
        kind,
        interval,
        timeout,
        jitter,
        rise,
        fall,
    })
}

/// `raw` over `base`, field by field.
fn dns(base: Dns, raw: Option<&RawDns>, path: &str, errs: &mut Errors) -> Dns {
    let mut out = base;
    let Some(raw) = raw else { return out };
    if let Some(list) = &raw.nameservers {
        out.nameservers = list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                checks::nameserver(&s.0)
                    .map_err(|m| errs.push(format!("{path}.nameservers[{i}]"), m))
                    .ok()
            })
            .collect();
        if list.is_empty() {
            errs.push(
                format!("{path}.nameservers"),
                "empty; list nameserver IPs, or remove the key to use the system's",
            );
        }
    }
    if let Some(list) = &raw.search {
        out.search = list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                checks::dns_name(&s.0)
                    .map_err(|m| errs.push(format!("{path}.search[{i}]"), m))
                    .ok()
            })
            .collect();
    }
    let mut parsed = true;
    for (key, text, slot) in [
        ("min_ttl", &raw.min_ttl, &mut out.min_ttl),
        ("max_ttl", &raw.max_ttl, &mut out.max_ttl),
        ("timeout", &raw.timeout, &mut out.timeout),
    ] {
        if let Some(t) = text {
            match one_duration(t, &format!("{path}.{key}"), errs) {
                Some(d) => *slot = d,
                None => parsed = false,
            }
        }
    }
    // Only when this block sets a bound: otherwise a clash is the outer block's, reported there.
    let sets_bound = raw.min_ttl.is_some() || raw.max_ttl.is_some();
    if parsed && sets_bound && out.min_ttl > out.max_ttl {
        let key = if raw.max_ttl.is_some() {
            "max_ttl"
        } else {
            "min_ttl"
        };
        errs.push(
            format!("{path}.{key}"),
            format!(
                "min_ttl ({}) is longer than max_ttl ({}); names are re-resolved on their TTL, \
                 bounded by min_ttl below and max_ttl above",
                duration::format(out.min_ttl),
                duration::format(out.max_ttl)
            ),
        );
    }
    out
}

fn passive(raw: Option<&RawPassive>, path: &str, errs: &mut Errors) -> Backoff {
    let mut backoff = Backoff::default();
    let Some(raw) = raw else { return backoff };
    let mut parsed = true;
    for (key, text, slot) in [
        ("backoff", &raw.backoff, &mut backoff.base),
        ("max_backoff", &raw.max_backoff, &mut backoff.max),
    ] {
        let Some(text) = text else { continue };
        match duration::parse(&text.0) {
            Ok(d) => *slot = d,
            Err(m) => {
                errs.push(format!("{path}.{key}"), m);
                parsed = false;
            }
        }
    }
    if parsed && backoff.base > backoff.max {
        let key = if raw.max_backoff.is_some() {
            "max_backoff"
        } else {
            "backoff"
        };
        errs.push(
            format!("{path}.{key}"),
            format!(
                "backoff ({}) is longer than max_backoff ({}); the backoff starts at backoff and grows up to max_backoff",
                duration::format(backoff.base),
                duration::format(backoff.max)
            ),
        );
    }
    backoff
}
