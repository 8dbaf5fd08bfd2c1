//! A route's match criteria (script, query, arguments, variables, source),
//! checked once at load (regexes compile on first use, see `crate::pattern`): for routes and for
//! a rollout's canaries.

use crate::error::Errors;
use crate::model::{RouteMatch, ScriptMatch};
use crate::raw::{RawMatch, RawScript, Scalar};

use super::checks::{self, under, Seen};

/// Largest argument number Asterisk sends (`agi_arg_127`).
const MAX_ARG: usize = 127;

/// `path` is the match's own (`routes[2].match`); it is extended for its parts and cut back.
pub(super) fn compile_match(m: &RawMatch, path: &mut String, errs: &mut Errors) -> RouteMatch {
    let mut out = RouteMatch {
        script: m
            .script
            .as_ref()
            .and_then(|s| under(path, ".script", |p| script(s, p, errs))),
        ..RouteMatch::default()
    };
    let path: &str = path;

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
            match checks::pattern(&pattern.0) {
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
            match checks::pattern(&pattern.0) {
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
fn script(s: &RawScript, path: &mut String, errs: &mut Errors) -> Option<ScriptMatch> {
    let all: [(&str, &Option<Scalar>); 3] = [
        ("exact", &s.exact),
        ("prefix", &s.prefix),
        ("regex", &s.regex),
    ];
    let mut given = all.iter().filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)));
    let (kind, value) = match (given.next(), given.next()) {
        (Some(one), None) => one,
        (None, _) => {
            errs.push(
                path.as_str(),
                "empty; write one of { exact: \"ivr/main\" }, { prefix: \"ivr/\" }, { regex: \"^ivr/\" }",
            );
            return None;
        }
        _ => {
            let keys: Vec<&str> = all
                .iter()
                .filter(|(_, v)| v.is_some())
                .map(|(k, _)| *k)
                .collect();
            errs.push(
                path.as_str(),
                format!(
                    "has {}; a script match takes exactly one of them",
                    keys.join(" and ")
                ),
            );
            return None;
        }
    };
    under(path, ".", |path| {
        under(path, kind, |at| match kind {
            "regex" => match checks::pattern(&optional_leading_slash(&value.0)) {
                Ok(re) => Some(ScriptMatch::Regex(re)),
                Err(rewritten) => {
                    // Errors quote the pattern as written, when it is the one at fault.
                    errs.push(
                        at.as_str(),
                        checks::pattern(&value.0).err().unwrap_or(rewritten),
                    );
                    None
                }
            },
            _ => {
                let text = path_prefix(&value.0, at, errs)?;
                Some(if kind == "exact" {
                    ScriptMatch::Exact(text)
                } else {
                    ScriptMatch::Prefix(text)
                })
            }
        })
    })
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
pub(super) fn path_prefix(text: &str, at: &str, errs: &mut Errors) -> Option<String> {
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
