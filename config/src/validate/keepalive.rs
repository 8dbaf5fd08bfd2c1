//! `tcp_keepalive:` over its defaults: on unless `enabled: false`.

use std::time::Duration;

use crate::duration;
use crate::error::Errors;
use crate::model::Keepalive;
use crate::raw::{DurationText, RawKeepalive};

pub(super) fn compile(raw: Option<&RawKeepalive>, errs: &mut Errors) -> Option<Keepalive> {
    let mut k = Keepalive::default();
    let Some(raw) = raw else { return Some(k) };
    seconds(&raw.idle, "tcp_keepalive.idle", &mut k.idle, errs);
    seconds(
        &raw.interval,
        "tcp_keepalive.interval",
        &mut k.interval,
        errs,
    );
    if let Some(n) = raw.probes {
        match u32::try_from(n)
            .ok()
            .filter(|n| Keepalive::PROBES.contains(n))
        {
            Some(n) => k.probes = n,
            None => errs.push(
                "tcp_keepalive.probes",
                format!(
                    "{n} is out of range; use {} to {} (the kernel's limits)",
                    Keepalive::PROBES.start(),
                    Keepalive::PROBES.end()
                ),
            ),
        }
    }
    (raw.enabled != Some(false)).then_some(k)
}

/// The kernel takes whole seconds: anything else would be silently rounded.
fn seconds(text: &Option<DurationText>, path: &str, slot: &mut Duration, errs: &mut Errors) {
    let Some(text) = text else { return };
    match duration::parse(&text.0) {
        Ok(d) if d.subsec_nanos() == 0 && Keepalive::SECONDS.contains(&d.as_secs()) => *slot = d,
        Ok(_) => errs.push(
            path,
            format!(
                "{:?} is not whole seconds from {}s to {}s (the kernel counts keepalive in \
                 seconds); write e.g. `60s`",
                text.0,
                Keepalive::SECONDS.start(),
                Keepalive::SECONDS.end()
            ),
        ),
        Err(m) => errs.push(path, m),
    }
}
