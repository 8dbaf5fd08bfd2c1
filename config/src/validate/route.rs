//! Routes: names, matchers, targets (pool or split), rewrites, added variables.

use std::collections::HashMap;
use std::fmt::Write;

use crate::error::Errors;
use crate::model::{
    Dns, Mode, Rewrite, Route, RouteMatch, RouteTarget, SplitTarget, Timeouts, DEFAULT_SPLIT_KEY,
};
use crate::raw::{OrderedMap, RawMode, RawRewrite, RawRoute, RawSplit, Scalar};
use crate::template::Template;

use super::checks::{self, resolve_pool, under, PoolNames, Seen};
use super::matcher::{compile_match, path_prefix};
use super::timeouts;

/// Split weights run 0..=10000 so shares down to 0.01% can be given.
const MAX_SPLIT_WEIGHT: u32 = 10_000;

pub(super) fn compile_all(
    raw: Vec<RawRoute>,
    pool_names: &PoolNames,
    global: &Timeouts,
    dns: &Dns,
    errs: &mut Errors,
) -> Vec<Route> {
    // By hash, and where each name was first seen by index: a path is written out only for
    // a duplicate (a config may have 100,000 routes).
    let mut names: HashMap<&str, usize> = HashMap::with_capacity(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    // One buffer for every route's path, extended and cut back for its parts.
    let mut path = String::new();
    for (i, r) in raw.iter().enumerate() {
        path.clear();
        let _ = write!(path, "routes[{i}]");
        if let Some(name) = r.name.as_deref() {
            if let Some(first) = names.get(name) {
                errs.push(
                    format!("{path}.name"),
                    format!(
                        "{name:?} is also the name of routes[{first}]; route names must be unique"
                    ),
                );
            } else {
                names.insert(name, i);
            }
        }
        if let Some(route) = compile(r, &mut path, pool_names, global, dns, errs) {
            out.push(route);
        }
    }
    out
}

/// One route; `None` when anything in it was refused (the errors say what).
fn compile(
    r: &RawRoute,
    path: &mut String,
    pool_names: &PoolNames,
    global: &Timeouts,
    dns: &Dns,
    errs: &mut Errors,
) -> Option<Route> {
    let mut local = Errors::default();
    let name = match &r.name {
        None => {
            local.push(
                format!("{path}.name"),
                "missing; give each route a name, e.g. name: ivr",
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
    let matcher = match &r.matcher {
        Some(m) => under(path, ".match", |p| compile_match(m, p, &mut local)),
        None => RouteMatch::default(),
    };
    let path: &str = path;
    let rollout = r.rollout.as_ref().and_then(|ro| {
        super::rollout::compile(ro, &format!("{path}.rollout"), pool_names, dns, &mut local)
    });
    let target = match (&r.rollout, &r.pool, &r.split) {
        (None, _, _) => target(r, path, pool_names, &mut local),
        (Some(_), None, None) => rollout.as_ref().map(|ro| RouteTarget::Pool(ro.from)),
        (Some(_), _, _) => {
            local.push(
                path,
                format!(
                    "has both {}: and rollout:; a rollout names its pools (from:, to:), keep one",
                    if r.pool.is_some() { "pool" } else { "split" }
                ),
            );
            None
        }
    };
    let split_key = match &r.split_key {
        None => DEFAULT_SPLIT_KEY.to_string(),
        Some(key) => {
            if let Err(m) = checks::var_name(key) {
                local.push(format!("{path}.split_key"), m);
            }
            key.clone()
        }
    };
    let rewrite = r
        .rewrite
        .as_ref()
        .and_then(|rw| rewrite(rw, &format!("{path}.rewrite"), &mut local));
    let set = r
        .set
        .as_ref()
        .map(|s| set(s, &format!("{path}.set"), &mut local))
        .unwrap_or_default();
    let timeouts = match &r.timeouts {
        None => *global,
        Some(t) => timeouts::route(global, Some(t), &format!("{path}.timeouts"), &mut local),
    };

    let ok = local.is_empty();
    errs.extend(local);
    if !ok {
        return None;
    }
    Some(Route {
        name,
        matcher,
        target: target?,
        split_key,
        rewrite,
        set,
        mode: match r.mode {
            None | Some(RawMode::Lines) => Mode::Lines,
            Some(RawMode::Raw) => Mode::Raw,
        },
        forward_hangup: r.forward_hangup.unwrap_or(true),
        timeouts,
        rollout: rollout.map(Box::new),
    })
}

fn target(
    r: &RawRoute,
    path: &str,
    pool_names: &PoolNames,
    errs: &mut Errors,
) -> Option<RouteTarget> {
    match (&r.pool, &r.split) {
        (Some(_), Some(_)) => {
            errs.push(path, "has both pool: and split:; keep one");
            None
        }
        (None, None) => {
            errs.push(
                path,
                "has no target; add pool: NAME, or split: [{ pool: NAME, weight: N }, ...]",
            );
            None
        }
        (Some(pool), None) => match resolve_pool(pool, pool_names) {
            Ok(i) => Some(RouteTarget::Pool(i)),
            Err(msg) => {
                errs.push(format!("{path}.pool"), msg);
                None
            }
        },
        (None, Some(split)) => compile_split(split, &format!("{path}.split"), pool_names, errs),
    }
}

fn compile_split(
    split: &[RawSplit],
    path: &str,
    pool_names: &PoolNames,
    errs: &mut Errors,
) -> Option<RouteTarget> {
    if split.is_empty() {
        errs.push(
            path,
            "empty; list the pools and their weights, e.g. [{ pool: ivr-blue, weight: 90 }, { pool: ivr-green, weight: 10 }]",
        );
        return None;
    }
    let mut seen = Seen::default();
    let mut out = Vec::new();
    let mut ok = true;
    for (j, side) in split.iter().enumerate() {
        let at = format!("{path}[{j}]");
        let pool = match &side.pool {
            None => {
                errs.push(
                    format!("{at}.pool"),
                    "missing; name the pool, e.g. pool: ivr-blue",
                );
                None
            }
            Some(name) => match resolve_pool(name, pool_names) {
                Err(msg) => {
                    errs.push(format!("{at}.pool"), msg);
                    None
                }
                Ok(i) => match seen.first(i, &at) {
                    Some(first) => {
                        errs.push(
                            format!("{at}.pool"),
                            format!("{name:?} is listed twice (also {first}); list each pool once"),
                        );
                        None
                    }
                    None => Some(i),
                },
            },
        };
        let weight = match side.weight {
            None => {
                errs.push(
                    format!("{at}.weight"),
                    "missing; give each pool a weight, e.g. weight: 90 (0 sends it nothing)",
                );
                None
            }
            Some(w) => match checks::in_range(w, 0..=MAX_SPLIT_WEIGHT, None) {
                Ok(w) => Some(w),
                Err(msg) => {
                    errs.push(format!("{at}.weight"), msg);
                    None
                }
            },
        };
        match (pool, weight) {
            (Some(pool), Some(weight)) => out.push(SplitTarget { pool, weight }),
            _ => ok = false,
        }
    }
    if !ok {
        return None;
    }
    if out.iter().all(|s| s.weight == 0) {
        errs.push(
            path,
            "weights add up to 0, so no call could be sent anywhere; give at least one pool a weight above 0",
        );
        return None;
    }
    Some(RouteTarget::Split(out))
}

fn rewrite(rw: &RawRewrite, path: &str, errs: &mut Errors) -> Option<Rewrite> {
    match (&rw.strip_prefix, &rw.replace_prefix) {
        (Some(_), Some(_)) => {
            errs.push(path, "has both strip_prefix and replace_prefix; keep one");
            None
        }
        (None, None) => {
            errs.push(
                path,
                "empty; write { strip_prefix: \"ivr/\" } or { replace_prefix: { from: \"ivr/\", to: \"menu/\" } }",
            );
            None
        }
        (Some(prefix), None) => {
            let at = format!("{path}.strip_prefix");
            let prefix = path_prefix(&prefix.0, &at, errs)?;
            if prefix.is_empty() {
                errs.push(at, "empty; it would strip nothing (write e.g. \"ivr/\")");
                return None;
            }
            Some(Rewrite::StripPrefix(prefix))
        }
        (None, Some(replace)) => {
            let at = format!("{path}.replace_prefix");
            let from = match &replace.from {
                None => {
                    errs.push(format!("{at}.from"), "missing; write e.g. from: \"ivr/\"");
                    None
                }
                Some(from) => path_prefix(&from.0, &format!("{at}.from"), errs),
            };
            let to = match &replace.to {
                None => {
                    errs.push(
                        format!("{at}.to"),
                        "missing; write e.g. to: \"menu/\" (or use strip_prefix to remove the prefix)",
                    );
                    None
                }
                Some(to) => path_prefix(&to.0, &format!("{at}.to"), errs),
            };
            Some(Rewrite::ReplacePrefix {
                from: from?,
                to: to?,
            })
        }
    }
}

fn set(raw: &OrderedMap<Scalar>, path: &str, errs: &mut Errors) -> Vec<(String, Template)> {
    let mut seen = Seen::default();
    let mut out = Vec::new();
    for (key, value) in &raw.0 {
        let at = format!("{path}.{}", key.0);
        if let Err(msg) = checks::var_name(&key.0) {
            errs.push(at, msg);
            continue;
        }
        if checks::is_asterisk_var(&key.0) {
            errs.push(
                at,
                format!(
                    "{} is sent by Asterisk; set adds new variables only, so pick a new name, e.g. agi_x_{}",
                    key.0,
                    key.0.trim_start_matches("agi_")
                ),
            );
            continue;
        }
        if seen.first(key.0.as_str(), &at).is_some() {
            errs.push(at, "listed twice; keep one");
            continue;
        }
        match Template::parse(&value.0) {
            Ok(t) => out.push((key.0.clone(), t)),
            Err(msg) => errs.push(at, msg),
        }
    }
    out
}
