//! Timeouts: the global block, and each route's overrides merged over it.

use std::time::Duration;

use crate::duration;
use crate::error::Errors;
use crate::model::Timeouts;
use crate::raw::{DurationText, RawTimeouts};

/// The top-level `timeouts:` over the built-in defaults.
pub(super) fn global(raw: Option<&RawTimeouts>, errs: &mut Errors) -> Timeouts {
    let (t, parsed) = overlay(Timeouts::default(), raw, "timeouts", errs);
    if parsed {
        check_connect_fits(&t, raw, "timeouts", errs);
    }
    t
}

/// A route's `timeouts:` over the global ones.
pub(super) fn route(
    global: &Timeouts,
    raw: Option<&RawTimeouts>,
    path: &str,
    errs: &mut Errors,
) -> Timeouts {
    let (t, parsed) = overlay(*global, raw, path, errs);
    // Only when the route changes connect or budget: otherwise any clash is the global
    // block's, already reported there.
    if parsed && raw.is_some_and(|r| r.connect.is_some() || r.budget.is_some()) {
        check_connect_fits(&t, raw, path, errs);
    }
    t
}

/// Applies the durations written in `raw`; false when any of them was refused (then
/// cross-checks are skipped, as they would compare against a stand-in value).
fn overlay(
    base: Timeouts,
    raw: Option<&RawTimeouts>,
    path: &str,
    errs: &mut Errors,
) -> (Timeouts, bool) {
    let mut t = base;
    let mut parsed = true;
    let Some(raw) = raw else { return (t, parsed) };
    let fields: [(&str, &Option<DurationText>, &mut Duration); 6] = [
        ("header", &raw.header, &mut t.header),
        ("budget", &raw.budget, &mut t.budget),
        ("connect", &raw.connect, &mut t.connect),
        ("first_command", &raw.first_command, &mut t.first_command),
        ("next_command", &raw.next_command, &mut t.next_command),
        ("drain", &raw.drain, &mut t.drain),
    ];
    for (key, text, slot) in fields {
        let Some(text) = text else { continue };
        match duration::parse(&text.0) {
            Ok(d) => *slot = d,
            Err(m) => {
                errs.push(format!("{path}.{key}"), m);
                parsed = false;
            }
        }
    }
    (t, parsed)
}

/// One connect attempt longer than the whole budget could never run to its end.
fn check_connect_fits(t: &Timeouts, raw: Option<&RawTimeouts>, path: &str, errs: &mut Errors) {
    if t.connect <= t.budget {
        return;
    }
    // Blame the key written here; if both are, the connect attempt.
    let key = match raw {
        Some(r) if r.connect.is_none() && r.budget.is_some() => "budget",
        _ => "connect",
    };
    errs.push(
        format!("{path}.{key}"),
        format!(
            "connect ({}) is longer than budget ({}); one connect attempt must fit in the \
             budget for finding a backend: lower connect or raise budget",
            duration::format(t.connect),
            duration::format(t.budget)
        ),
    );
}
