//! Routes: names, matchers, targets (pool or split), rewrites, added variables.

use crate::error::Errors;
use crate::model::{
    Dns, Mode, Rewrite, Route, RouteMatch, RouteTarget, ScriptMatch, SplitTarget, Timeouts,
    DEFAULT_SPLIT_KEY,
};
use crate::raw::{
    OrderedMap, RawMatch, RawMode, RawRewrite, RawRoute, RawScript, RawSplit, Scalar,
};
use crate::template::Template;

use super::checks::{self, Seen};
use super::timeouts;

/// Largest argument number Asterisk sends (`agi_arg_127`).
const MAX_ARG: usize = 127;
/// Split weights run 0..=10000 so shares down to 0.01% can be given.
const MAX_SPLIT_WEIGHT: u32 = 10_000;

pub(super) fn compile_all(
    raw: Vec<RawRoute>,
    pool_names: &[Option<&str>],
    global: &Timeouts,
    dns: &Dns,
    errs: &mut Errors,
) -> Vec<Route> {
    let mut names = Seen::default();
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(name) = r.name.as_deref() {
            if let Some(first) = names.first(name, &path) {
                errs.push(
                    format!("{path}.name"),
                    format!("{name:?} is also the name of {first}; route names must be unique"),
                );
            }
        }
        if let Some(route) = compile(r, &path, pool_names, global, dns, errs) {
            out.push(route);
        }
    }
    out
}

/// One route; `None` when anything in it was refused (the errors say what).
fn compile(
    r: &RawRoute,
    path: &str,
    pool_names: &[Option<&str>],
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
        Some(m) => compile_match(m, &format!("{path}.match"), &mut local),
        None => RouteMatch::default(),
    };
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
    let split_key = r
        .split_key
        .clone()
        .unwrap_or_else(|| DEFAULT_SPLIT_KEY.to_string());
    if let Err(m) = checks::var_name(&split_key) {
        local.push(format!("{path}.split_key"), m);
    }
    let rewrite = r
        .rewrite
        .as_ref()
        .and_then(|rw| rewrite(rw, &format!("{path}.rewrite"), &mut local));
    let set = r
        .set
        .as_ref()
        .map(|s| set(s, &format!("{path}.set"), &mut local))
        .unwrap_or_default();
    let timeouts = timeouts::route(
        global,
        r.timeouts.as_ref(),
        &format!("{path}.timeouts"),
        &mut local,
    );

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
        rollout,
    })
}

pub(super) fn compile_match(m: &RawMatch, path: &str, errs: &mut Errors) -> RouteMatch {
    let mut out = RouteMatch {
        script: m
            .script
            .as_ref()
            .and_then(|s| script(s, &format!("{path}.script"), errs)),
        ..RouteMatch::default()
    };

    if let Some(query) = &m.query {
        let mut seen = Seen::default();
        for (key, value) in &query.0 {
            let at = format!("{path}.query.{}", key.0);
            if key.0.is_empty() {
                errs.push(at, "empty parameter name; write e.g. lang: de");
            } else if seen.first(key.0.as_str(), &at).is_some() {
                errs.push(at, "listed twice; keep one");
            } else {
                out.query.push((key.0.clone(), value.0.clone()));
            }
        }
    }

    if let Some(args) = &m.args {
        let mut seen = Seen::default();
        for (key, pattern) in &args.0 {
            let at = format!("{path}.args.{}", key.0);
            let n = match key.0.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_ARG).contains(&n) => n,
                _ => {
                    errs.push(
                        at,
                        format!(
                            "{:?} is not an argument number; they run from 1 to {MAX_ARG} \
                             (agi_arg_1 .. agi_arg_{MAX_ARG})",
                            key.0
                        ),
                    );
                    continue;
                }
            };
            if let Some(first) = seen.first(n, &at) {
                errs.push(
                    at,
                    format!("argument {n} is listed twice (also {first}); keep one"),
                );
                continue;
            }
            match checks::regex(&pattern.0) {
                Ok(re) => out.args.push((n, re)),
                Err(msg) => errs.push(at, msg),
            }
        }
    }

    if let Some(vars) = &m.vars {
        let mut seen = Seen::default();
        for (key, pattern) in &vars.0 {
            let at = format!("{path}.vars.{}", key.0);
            if let Err(msg) = checks::var_name(&key.0) {
                errs.push(at, msg);
                continue;
            }
            if seen.first(key.0.as_str(), &at).is_some() {
                errs.push(at, "listed twice; keep one");
                continue;
            }
            match checks::regex(&pattern.0) {
                Ok(re) => out.vars.push((key.0.clone(), re)),
                Err(msg) => errs.push(at, msg),
            }
        }
    }

    if let Some(source) = &m.source {
        if source.is_empty() {
            // Ambiguous: "nobody" or "anybody"? Make the operator say which.
            errs.push(
                format!("{path}.source"),
                "empty; remove the key to accept every address, or list networks, e.g. [\"10.0.0.0/8\"]",
            );
        }
        for (j, net) in source.iter().enumerate() {
            match checks::network(&net.0) {
                Ok(net) => out.source.push(net),
                Err(msg) => errs.push(format!("{path}.source[{j}]"), msg),
            }
        }
    }
    out
}

/// `{ exact | prefix | regex }`, normalised to Asterisk's spelling: no leading `/`.
fn script(s: &RawScript, path: &str, errs: &mut Errors) -> Option<ScriptMatch> {
    let given: Vec<(&str, &Scalar)> = [
        ("exact", &s.exact),
        ("prefix", &s.prefix),
        ("regex", &s.regex),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let (kind, value) = match given.as_slice() {
        [one] => *one,
        [] => {
            errs.push(
                path,
                "empty; write one of { exact: \"ivr/main\" }, { prefix: \"ivr/\" }, { regex: \"^ivr/\" }",
            );
            return None;
        }
        many => {
            let keys: Vec<&str> = many.iter().map(|(k, _)| *k).collect();
            errs.push(
                path,
                format!(
                    "has {}; a script match takes exactly one of them",
                    keys.join(" and ")
                ),
            );
            return None;
        }
    };
    let at = format!("{path}.{kind}");
    match kind {
        "regex" => {
            // Validated as written, so errors quote the user's pattern.
            if let Err(msg) = checks::regex(&value.0) {
                errs.push(at, msg);
                return None;
            }
            match checks::regex(&optional_leading_slash(&value.0)) {
                Ok(re) => Some(ScriptMatch::Regex(re)),
                Err(msg) => {
                    errs.push(at, msg);
                    None
                }
            }
        }
        _ => {
            let text = path_prefix(&value.0, &at, errs)?;
            Some(if kind == "exact" {
                ScriptMatch::Exact(text)
            } else {
                ScriptMatch::Prefix(text)
            })
        }
    }
}

/// Asterisk sends the script without a leading `/`, but patterns written against URLs often
/// start `^/`: that slash becomes optional. A slash the pattern quantifies itself (`^/*`, `^/+`)
/// is left alone, as the pattern already says what it wants (and `^/?*` would not compile).
fn optional_leading_slash(pattern: &str) -> String {
    match pattern.strip_prefix("^/") {
        Some(rest) if !rest.starts_with(['*', '+', '?', '{']) => format!("^/?{rest}"),
        _ => pattern.to_string(),
    }
}

/// A script path written in the config (match or rewrite): one leading `/` dropped, no query,
/// nothing that would break the header line.
fn path_prefix(text: &str, at: &str, errs: &mut Errors) -> Option<String> {
    if text.contains(['\n', '\r']) {
        errs.push(
            at,
            format!("{text:?} contains a line break; script paths are one line"),
        );
        return None;
    }
    if text.contains('?') {
        errs.push(
            at,
            format!(
                "{text:?} contains '?'; scripts are matched and rewritten on the path only \
                 (before '?'); match query parameters with match.query"
            ),
        );
        return None;
    }
    Some(text.strip_prefix('/').unwrap_or(text).to_string())
}

fn target(
    r: &RawRoute,
    path: &str,
    pool_names: &[Option<&str>],
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
    pool_names: &[Option<&str>],
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

/// The index of the pool named `name`, or a message listing the known pools.
pub(super) fn resolve_pool(name: &str, pool_names: &[Option<&str>]) -> Result<usize, String> {
    if let Some(i) = pool_names.iter().position(|p| *p == Some(name)) {
        return Ok(i);
    }
    let mut known: Vec<&str> = pool_names.iter().flatten().copied().collect();
    known.sort_unstable();
    known.dedup();
    if known.is_empty() {
        Err(format!(
            "unknown pool {name:?}; no pools are defined (add one under pools:)"
        ))
    } else {
        Err(format!(
            "unknown pool {name:?}; known pools: {}",
            known.join(", ")
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_slash_in_regexes_becomes_optional() {
        assert_eq!(optional_leading_slash("^/ivr/(a|b)$"), "^/?ivr/(a|b)$");
        assert_eq!(optional_leading_slash("^/"), "^/?");
        assert_eq!(optional_leading_slash("^ivr"), "^ivr");
        assert_eq!(optional_leading_slash("ivr/"), "ivr/");
        assert_eq!(optional_leading_slash("^/*ivr"), "^/*ivr");
        assert_eq!(optional_leading_slash("^/+ivr"), "^/+ivr");
        assert_eq!(optional_leading_slash("^/{0,1}ivr"), "^/{0,1}ivr");
    }
}
