//! Pools and their backends.

use crate::duration;
use crate::error::Errors;
use crate::model::{Backend, Backoff, Balance, Pool, DEFAULT_SPLIT_KEY};
use crate::raw::{RawBackend, RawBalance, RawPassive, RawPool};

use super::checks::{self, Seen};

/// Backend weights for `balance: weighted`.
const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=1000;

pub(super) fn compile_all(raw: &[RawPool], errs: &mut Errors) -> Vec<Pool> {
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
        if let Some(pool) = compile(p, &path, errs) {
            out.push(pool);
        }
    }
    out
}

fn compile(p: &RawPool, path: &str, errs: &mut Errors) -> Option<Pool> {
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
    if p.health.is_some() {
        local.push(
            format!("{path}.health"),
            "active health checks are not supported yet (they arrive in a later release); \
             remove the block for now (passive ejection after connect failures still applies)",
        );
    }

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
    let mut seen = Seen::default();
    let mut out = Vec::new();
    for (j, b) in raw.iter().enumerate() {
        let at = format!("{path}[{j}]");
        let address = match (&b.address, &b.srv) {
            (Some(_), Some(_)) => {
                errs.push(&at, "has both address and srv; keep one");
                None
            }
            (None, None) => {
                errs.push(
                    &at,
                    "has no address; write e.g. { address: \"10.0.0.1:4573\" }",
                );
                None
            }
            (None, Some(_)) => {
                errs.push(
                    format!("{at}.srv"),
                    "SRV lookups are not supported yet (DNS discovery arrives in a later release); \
                     use address: ip:port",
                );
                None
            }
            (Some(text), None) => match checks::backend_address(text) {
                Err(m) => {
                    errs.push(format!("{at}.address"), m);
                    None
                }
                Ok(addr) => match seen.first(addr, &at) {
                    Some(first) => {
                        errs.push(
                            format!("{at}.address"),
                            format!("{addr} is listed twice in this pool (also {first}); list each backend once"),
                        );
                        None
                    }
                    None => Some(addr),
                },
            },
        };
        let weight = match b.weight {
            None => Some(1),
            Some(w) => checks::in_range(w, WEIGHTS, Some(1))
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
        if let (Some(address), Some(weight), Some(max_sessions)) = (address, weight, max_sessions) {
            out.push(Backend {
                address,
                weight,
                max_sessions,
            });
        }
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
