//! One-line summaries of routes, for `agiproxy check` and logs.

use std::time::Duration;

use crate::model::{
    BackendTarget, Pool, Rewrite, Rollout, Route, RouteMatch, RouteTarget, ScriptMatch, Timeouts,
};

impl Route {
    /// A one-line human summary, e.g.
    /// `ivr: script prefix "ivr/", query lang=de, args 1~^[0-9]+$, source 10.0.0.0/8 -> pool ivr (least_sessions, 2 backends) rewrite strip "ivr/" set agi_x_route=ivr mode lines`.
    /// `pools` is the config's pool list, which the route's targets index into.
    pub fn describe(&self, pools: &[Pool]) -> String {
        let criteria = self.matcher.criteria();
        let criteria = if criteria.is_empty() {
            "any call".to_string()
        } else {
            criteria.join(", ")
        };

        let target = match (&self.target, &self.rollout) {
            (_, Some(ro)) => {
                let steps: Vec<String> = ro
                    .steps
                    .iter()
                    .map(|bp| format!("{}%", *bp as f64 / 100.0))
                    .collect();
                format!(
                    "rollout {} -> {} steps {} every {} from {} by {}",
                    describe_pool(pools, ro.from),
                    describe_pool(pools, ro.to),
                    steps.join(" "),
                    crate::duration::format(ro.step_duration),
                    ro.start_text,
                    self.split_key
                )
            }
            (RouteTarget::Pool(i), None) => format!("pool {}", describe_pool(pools, *i)),
            (RouteTarget::Split(sides), None) => {
                let s: Vec<String> = sides
                    .iter()
                    .map(|t| format!("{}:{}", pool_name(pools, t.pool), t.weight))
                    .collect();
                format!("split {} by {}", s.join(" "), self.split_key)
            }
        };

        let mut out = format!("{}: {criteria} -> {target}", self.name);
        match &self.rewrite {
            Some(Rewrite::StripPrefix(p)) => out.push_str(&format!(" rewrite strip {p:?}")),
            Some(Rewrite::ReplacePrefix { from, to }) => {
                out.push_str(&format!(" rewrite replace {from:?} with {to:?}"));
            }
            None => {}
        }
        if !self.set.is_empty() {
            let s: Vec<String> = self.set.iter().map(|(k, t)| format!("{k}={t}")).collect();
            out.push_str(&format!(" set {}", s.join(" ")));
        }
        out.push_str(&format!(" mode {}", self.mode));
        if !self.forward_hangup {
            out.push_str(" hangup withheld");
        }
        out
    }
}

impl RouteMatch {
    /// Each criterion in `check`'s words, in the order the matcher reads
    /// them: `script prefix "ivr/"`, `query lang=de`, `args 1~^[0-9]+$`,
    /// `vars agi_callerid~^\+49`, `source 10.0.0.0/8`. Empty when it has none.
    pub fn criteria(&self) -> Vec<String> {
        let mut criteria = Vec::new();
        if let Some(script) = &self.script {
            criteria.push(match script {
                ScriptMatch::Exact(s) => format!("script exact {s:?}"),
                ScriptMatch::Prefix(s) => format!("script prefix {s:?}"),
                ScriptMatch::Regex(r) => format!("script regex {}", r.as_str()),
            });
        }
        if !self.query.is_empty() {
            let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            criteria.push(format!("query {}", q.join("&")));
        }
        if !self.args.is_empty() {
            let a: Vec<String> = self
                .args
                .iter()
                .map(|(n, r)| format!("{n}~{}", r.as_str()))
                .collect();
            criteria.push(format!("args {}", a.join(" ")));
        }
        if !self.vars.is_empty() {
            let v: Vec<String> = self
                .vars
                .iter()
                .map(|(k, r)| format!("{k}~{}", r.as_str()))
                .collect();
            criteria.push(format!("vars {}", v.join(" ")));
        }
        if !self.source.is_empty() {
            let s: Vec<String> = self.source.iter().map(|n| n.to_string()).collect();
            criteria.push(format!("source {}", s.join(" ")));
        }
        criteria
    }
}

impl Rollout {
    /// The canary's criteria for `agiproxy check`, as
    /// `query canary=1, source 10.9.0.0/24` (any one matching is enough);
    /// None without a canary (an empty `canary: {}` matches no call).
    pub fn describe_canary(&self) -> Option<String> {
        let criteria = self.canary.criteria();
        (!criteria.is_empty()).then(|| criteria.join(", "))
    }
}

fn pool_name(pools: &[Pool], i: usize) -> String {
    pools
        .get(i)
        .map_or_else(|| format!("#{i}"), |p| p.name.clone())
}

fn describe_pool(pools: &[Pool], i: usize) -> String {
    match pools.get(i) {
        None => format!("#{i}"),
        Some(p) => {
            // Static addresses are counted; DNS and SRV names are named (their addresses
            // change at run time).
            let n = p
                .backends
                .iter()
                .filter(|b| b.target.static_addr().is_some())
                .count();
            let plural = if n == 1 { "" } else { "s" };
            let mut parts = Vec::new();
            if n > 0 || !p.has_dns() {
                parts.push(format!("{n} backend{plural}"));
            }
            for b in &p.backends {
                match &b.target {
                    BackendTarget::Static(_) => {}
                    BackendTarget::Host { .. } => parts.push(format!("dns {}", b.target)),
                    BackendTarget::Srv { .. } => parts.push(b.target.to_string()),
                }
            }
            if let Some(h) = &p.health {
                parts.push(format!("health {}", h.kind.as_str()));
            }
            format!("{} ({}, {})", p.name, p.balance, parts.join(", "))
        }
    }
}

impl crate::model::Config {
    /// Things that are valid but probably not what the operator wants, one
    /// line each, naming the config path: `agiproxy check` prints them, and
    /// `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.routes.is_empty() {
            out.push(
                "routes: none: every call gets FAILURE `no_route`; add a route, e.g. \
                 routes: [{ name: all, pool: POOL }]"
                    .to_string(),
            );
        }
        for (i, p) in self.pools.iter().enumerate() {
            let single =
                p.backends.len() == 1 && !matches!(p.backends[0].target, BackendTarget::Srv { .. });
            if single && p.health.is_none() {
                out.push(format!(
                    "pools[{i}] ({}): one backend address and no `health:`: passive ejection \
                     cannot tell a dead backend from one bad connection, so a dead one costs every \
                     call a connect; add `health:` to fail calls at once while it is down",
                    p.name
                ));
            }
        }
        // Replicas read each other's rollout counters (and, at start, the
        // overrides they run) through the control API, with its token: a
        // replica without either is never read, judgement sees every peer
        // missing at each tick, and `ctl rollout` cannot reach it (audit:
        // the blue-green walk-through's config had no control block).
        let unreadable = if !self.control.enabled || self.control.address.is_none() {
            Some("no control API listens on an address (control.address)")
        } else if self.control.token.is_none() {
            Some("the control API has no token (control.token_file or token_env): it answers 403")
        } else {
            None
        };
        if let Some(why) = unreadable {
            for (i, r) in self.routes.iter().enumerate() {
                let Some(ro) = r.rollout.as_deref() else {
                    continue;
                };
                if ro.judge.peers != crate::model::Peers::None {
                    out.push(format!(
                        "routes[{i}].rollout.judge.peers ({}): the replicas read each other's \
                         counters through the control API, and {why}: peers cannot read this \
                         replica, nor `ctl rollout` act on it; give every replica the same \
                         control: block with a token",
                        r.name
                    ));
                }
            }
        }
        out
    }
}

impl Timeouts {
    /// The fields that differ from `base` (a route's against the config's),
    /// as `connect=100ms budget=400ms`; None when none does. `agiproxy check`
    /// prints them under the route, so a mistyped override shows.
    pub fn differences(&self, base: &Timeouts) -> Option<String> {
        let fields = [
            ("header", self.header, base.header),
            ("budget", self.budget, base.budget),
            ("connect", self.connect, base.connect),
            ("first_command", self.first_command, base.first_command),
            ("next_command", self.next_command, base.next_command),
            ("drain", self.drain, base.drain),
        ];
        let diff: Vec<String> = fields
            .iter()
            .filter(|(_, mine, theirs)| mine != theirs)
            .map(|(name, mine, _)| format!("{name}={}", short(*mine)))
            .collect();
        (!diff.is_empty()).then(|| diff.join(" "))
    }
}

/// A duration as a config writes it: `10m`, `1s`, `400ms`.
fn short(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 60_000 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{ms}ms")
    } else {
        format!("{d:?}")
    }
}
