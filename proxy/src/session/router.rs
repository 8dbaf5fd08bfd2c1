//! The router: ordered rules, first match wins, compiled once per config.
//! Matching reads the header in place; nothing is allocated per call except
//! when a query value needs percent-decoding.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agiproxy_config::{Pool, Route, RouteMatch, RouteTarget};

use super::header::Header;
use super::rollout::{CompiledRollout, Pick};

/// One compiled rule.
#[derive(Debug)]
pub struct CompiledRoute {
    pub route: Route,
    /// The route's name as shared text for session records (no copy per call).
    pub name: Arc<str>,
    /// `agi_arg_N` names, built once so matching does not format strings.
    arg_names: Vec<(String, regex::Regex)>,
    /// Cumulative split weights: (upper bound, pool index).
    split_bands: Vec<(u64, usize)>,
    /// The route's declared rollout, with its live state.
    pub rollout: Option<CompiledRollout>,
}

#[derive(Debug)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    /// Drives the split for calls without the split key.
    fallback: AtomicU64,
}

impl Router {
    /// `previous`: the router being replaced, whose rollouts' live state
    /// (counters, judged rollback) carries over when unchanged.
    pub fn new(routes: &[Route], pools: &[Pool], previous: Option<&Router>) -> Router {
        let routes = routes
            .iter()
            .map(|r| {
                let arg_names = r
                    .matcher
                    .args
                    .iter()
                    .map(|(n, re)| (format!("agi_arg_{n}"), re.clone()))
                    .collect();
                let mut split_bands = Vec::new();
                if let RouteTarget::Split(targets) = &r.target {
                    let mut acc = 0u64;
                    for t in targets.iter().filter(|t| t.weight > 0) {
                        acc += u64::from(t.weight);
                        split_bands.push((acc, t.pool));
                    }
                }
                let rollout = r.rollout.as_ref().map(|ro| {
                    let before = previous
                        .and_then(|p| p.routes.iter().find(|c| c.route.name == r.name))
                        .and_then(|c| c.rollout.as_ref());
                    CompiledRollout::new(ro, pools, before)
                });
                CompiledRoute {
                    route: r.clone(),
                    rollout,
                    name: r.name.as_str().into(),
                    arg_names,
                    split_bands,
                }
            })
            .collect();
        Router {
            routes,
            fallback: AtomicU64::new(0),
        }
    }

    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// The index of the first route matching this call, if any.
    pub fn route(&self, header: &Header, source: IpAddr) -> Option<usize> {
        let source = source.to_canonical();
        self.routes.iter().position(|r| r.matches(header, source))
    }

    /// The pool a routed call goes to. A split is decided by a hash of the
    /// route's split key (default `agi_uniqueid`), so every AGI of one call
    /// lands in the same pool, and moving a weight moves only that band.
    ///
    /// A rollout route picks by its declared schedule instead (see
    /// [`CompiledRollout::pick`]); the pick says how to count the session.
    pub fn pool_for(
        &self,
        route: usize,
        header: &Header,
        source: IpAddr,
        now_ms: i64,
    ) -> (usize, Option<Pick>) {
        let r = &self.routes[route];
        if let Some(ro) = &r.rollout {
            let key = header.get(&r.route.split_key);
            let pick = ro.pick(key, header, source.to_canonical(), now_ms);
            return (pick.pool, Some(pick));
        }
        let pool = match &r.route.target {
            RouteTarget::Pool(p) => *p,
            RouteTarget::Split(_) => {
                let total = r.split_bands.last().map_or(1, |b| b.0);
                let h = match header.get(&r.route.split_key) {
                    Some(key) => crate::pool::stable_hash(key.as_bytes(), 0x5eed),
                    None => self.fallback.fetch_add(1, Ordering::Relaxed),
                };
                let point = h % total;
                r.split_bands
                    .iter()
                    .find(|(upper, _)| point < *upper)
                    .map_or(r.split_bands[0].1, |b| b.1)
            }
        };
        (pool, None)
    }
}

impl CompiledRoute {
    fn matches(&self, h: &Header, source: IpAddr) -> bool {
        let m: &RouteMatch = &self.route.matcher;
        if m.script
            .as_ref()
            .is_some_and(|s| !s.matches(h.script_path()))
        {
            return false;
        }
        if !m
            .query
            .iter()
            .all(|(k, v)| h.query_param(k).is_some_and(|got| got == v.as_str()))
        {
            return false;
        }
        if !self
            .arg_names
            .iter()
            .all(|(name, re)| h.get(name).is_some_and(|v| re.is_match(v)))
        {
            return false;
        }
        if !m
            .vars
            .iter()
            .all(|(name, re)| h.get(name).is_some_and(|v| re.is_match(v)))
        {
            return false;
        }
        m.source.is_empty() || m.source.iter().any(|net| net.contains(&source))
    }
}
