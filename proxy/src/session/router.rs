//! The router: ordered rules, first match wins, compiled once per config.
//! Matching reads the header in place; nothing is allocated per call except
//! when a query value needs percent-decoding or regex script routes are
//! searched as a set.
//!
//! Routes are not tried one by one: at load, script matches are indexed
//! (exact scripts in a map, prefixes in a map by length, regexes in
//! regex sets), so a call only looks at routes whose script criterion
//! already holds, plus those without one. The first match is the smallest
//! route index whose criteria all hold; each candidate list is in route
//! order, so each is walked only until a match or an index no better than
//! the best so far. Same answer as a scan, by construction and by test
//! (`compiled_router_decides_like_a_scan`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use agiproxy_config::{Pattern, Pool, Route, RouteMatch, RouteTarget, ScriptMatch};

use super::header::Header;
use super::rollout::{CompiledRollout, Pick};
use super::script_regex::{self, RegexChunk};

/// One compiled rule.
#[derive(Debug)]
pub struct CompiledRoute {
    pub route: Route,
    /// The route's name as shared text for session records (no copy per call).
    pub name: Arc<str>,
    /// `agi_arg_N` names, built once so matching does not format strings.
    arg_names: Vec<(String, Pattern)>,
    /// Cumulative split weights: (upper bound, pool index).
    split_bands: Vec<(u64, usize)>,
    /// The route's declared rollout, with its live state.
    /// Boxed: rare, and large (a table holds up to 100,000 routes).
    pub rollout: Option<Box<CompiledRollout>>,
}

#[derive(Debug)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    index: ScriptIndex,
    /// Drives the split for calls without the split key.
    fallback: AtomicU64,
    /// Set when dropped: background regex compiling for it stops.
    retired: Arc<AtomicBool>,
}

/// Route indices by script criterion; every list in route order.
#[derive(Debug, Default)]
struct ScriptIndex {
    /// Routes without a script criterion: candidates for every call.
    any: Vec<usize>,
    exact: HashMap<Box<str>, Vec<usize>>,
    prefix: HashMap<Box<str>, Vec<usize>>,
    /// The distinct prefix lengths in bytes, ascending: a path is looked up
    /// once per length it is at least as long as.
    prefix_lens: Vec<usize>,
    /// Regex script routes in route order, in sets.
    regex: Vec<RegexChunk>,
}

impl ScriptIndex {
    fn new(routes: &[Route]) -> ScriptIndex {
        let mut ix = ScriptIndex::default();
        let mut regexes: Vec<(usize, &Pattern)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match &r.matcher.script {
                None => ix.any.push(i),
                Some(ScriptMatch::Exact(s)) => {
                    ix.exact.entry(s.as_str().into()).or_default().push(i)
                }
                Some(ScriptMatch::Prefix(p)) => {
                    ix.prefix.entry(p.as_str().into()).or_default().push(i)
                }
                Some(ScriptMatch::Regex(re)) => regexes.push((i, re)),
            }
        }
        ix.prefix_lens = ix.prefix.keys().map(|p| p.len()).collect();
        ix.prefix_lens.sort_unstable();
        ix.prefix_lens.dedup();
        ix.regex = script_regex::chunks(&regexes);
        ix
    }
}

impl Router {
    /// `previous`: the router being replaced, whose rollouts' live state
    /// (counters, judged rollback) carries over when unchanged. The routes
    /// are moved in, not copied: a config may have 100,000 of them.
    pub fn new(routes: Vec<Route>, pools: &[Pool], previous: Option<&Router>) -> Router {
        let index = ScriptIndex::new(&routes);
        // By name, so a reload of many routes does not search the old
        // table once per route.
        let before: HashMap<&str, &CompiledRoute> = previous
            .map(|p| {
                p.routes
                    .iter()
                    .filter(|c| c.rollout.is_some())
                    .map(|c| (c.route.name.as_str(), c))
                    .collect()
            })
            .unwrap_or_default();
        let routes = routes
            .into_iter()
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
                    let before = before
                        .get(r.name.as_str())
                        .and_then(|c| c.rollout.as_deref());
                    Box::new(CompiledRollout::new(&r.name, ro, pools, before))
                });
                CompiledRoute {
                    name: r.name.as_str().into(),
                    route: r,
                    rollout,
                    arg_names,
                    split_bands,
                }
            })
            .collect::<Vec<CompiledRoute>>();
        let retired = Arc::new(AtomicBool::new(false));
        warm_patterns(&routes, &retired);
        Router {
            routes,
            index,
            fallback: AtomicU64::new(0),
            retired,
        }
    }

    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// The index of the first route matching this call, if any.
    pub fn route(&self, header: &Header, source: IpAddr) -> Option<usize> {
        let source = source.to_canonical();
        let path = header.script_path();
        let ix = &self.index;
        // Smallest matching index so far; usize::MAX for none.
        let mut best = usize::MAX;
        let first_of = |best: &mut usize, candidates: &mut dyn Iterator<Item = usize>| {
            for i in candidates {
                if i >= *best {
                    return;
                }
                if self.routes[i].matches_beyond_script(header, source) {
                    *best = i;
                    return;
                }
            }
        };
        if let Some(list) = ix.exact.get(path) {
            first_of(&mut best, &mut list.iter().copied());
        }
        for &len in &ix.prefix_lens {
            let Some(head) = path.get(..len) else {
                if len > path.len() {
                    break;
                }
                continue; // not a char boundary: no prefix of this length
            };
            if let Some(list) = ix.prefix.get(head) {
                first_of(&mut best, &mut list.iter().copied());
            }
        }
        first_of(&mut best, &mut ix.any.iter().copied());
        for chunk in &ix.regex {
            if chunk.first_route() >= best {
                break;
            }
            chunk.with_matches(path, |hits| first_of(&mut best, hits));
        }
        (best != usize::MAX).then_some(best)
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

/// Argument and variable regexes a config may leave to be compiled by
/// the first call that needs them (huge tables load in a second that way)
/// while the router is built off the runtime threads (`Snapshot::build` runs
/// on a blocking thread): up to this many are compiled here, so an ordinary
/// config never compiles a regex on a session's thread; the rest are
/// compiled by a background thread right after (see [`warm_rest`]).
const WARM_PATTERNS: usize = 4096;

/// Compiles the first [`WARM_PATTERNS`] argument and variable regexes, and
/// hands the rest to [`warm_rest`]. `retired` is set when the router is
/// dropped.
fn warm_patterns(routes: &[CompiledRoute], retired: &Arc<AtomicBool>) {
    let mut all = routes.iter().flat_map(|r| {
        let m = &r.route.matcher;
        m.args
            .iter()
            .map(|(_, p)| p)
            .chain(m.vars.iter().map(|(_, p)| p))
    });
    all.by_ref().take(WARM_PATTERNS).for_each(|p| {
        p.regex();
    });
    let rest: Vec<Pattern> = all.filter(|p| !p.is_compiled()).cloned().collect();
    if !rest.is_empty() {
        warm_rest(rest, retired.clone());
    }
}

/// Compiles `rest` on a blocking thread, in route order, so that a call
/// rarely finds its regex still to compile (it would compile it on its
/// session's thread, once, as before): the CPU of a reload, not of the
/// calls. Stops early when the router it serves is replaced.
fn warm_rest(rest: Vec<Pattern>, retired: Arc<AtomicBool>) {
    let work = move || {
        for p in &rest {
            if retired.load(Ordering::Relaxed) {
                return;
            }
            p.regex();
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(work)),
        Err(_) => {
            let _ = std::thread::Builder::new()
                .name("agiproxy-regex".into())
                .spawn(work);
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

impl CompiledRoute {
    /// Every criterion, the script included: the plain definition of a
    /// match, kept for the scan the compiled router is checked against.
    #[cfg(test)]
    fn matches(&self, h: &Header, source: IpAddr) -> bool {
        self.route
            .matcher
            .script
            .as_ref()
            .is_none_or(|s| s.matches(h.script_path()))
            && self.matches_beyond_script(h, source)
    }

    /// The criteria the script index does not decide: query, arguments,
    /// variables and source, in that order.
    fn matches_beyond_script(&self, h: &Header, source: IpAddr) -> bool {
        let m: &RouteMatch = &self.route.matcher;
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

#[cfg(test)]
mod tests {
    use std::fmt::Write;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// xorshift64*: reproducible without a crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
    }

    // Small vocabularies, so scripts, prefixes and criteria collide often.
    const SCRIPTS: &[&str] = &[
        "ivr/main",
        "ivr/m1",
        "ivr/m2",
        "ivr",
        "ivr/",
        "billing",
        "billing/pay",
        "app-1/x",
        "app-12/y",
        "app-2",
        "",
        "é/x",
        "éa",
        "queue/5",
        "queue/55",
    ];
    const PREFIXES: &[&str] = &[
        "ivr/", "ivr/m", "i", "billing", "app-1", "app-", "", "é", "queue/5", "q", "nomatch/",
    ];
    const REGEXES: &[&str] = &[
        "^/?ivr/m[0-9]$",
        "m1",
        "^/?app-[0-9]+/",
        "^/?billing$",
        "pay$",
        "^/?é",
        "5{2}",
        ".",
        "^$",
        "^/?queue/",
    ];
    const LANGS: &[&str] = &["de", "en", "fr%20x", "fr x"];

    fn route_yaml(rng: &mut Rng, i: usize, out: &mut String) {
        let mut m = Vec::new();
        match rng.below(10) {
            0 => {}
            1..=3 => m.push(format!("script: {{ exact: \"{}\" }}", rng.pick(SCRIPTS))),
            4..=6 => m.push(format!("script: {{ prefix: \"{}\" }}", rng.pick(PREFIXES))),
            _ => m.push(format!("script: {{ regex: '{}' }}", rng.pick(REGEXES))),
        }
        if rng.below(3) == 0 {
            m.push(format!("query: {{ lang: \"{}\" }}", rng.pick(LANGS)));
        }
        if rng.below(3) == 0 {
            m.push(format!("args: {{ 1: '^[{}-3]' }}", rng.below(4)));
        }
        // Most routes also want one of 40 accounts, so first matches land
        // deep in the table and some calls match nothing.
        match (rng.below(4), rng.below(5)) {
            (0, 0) => m.push(format!("vars: {{ agi_callerid: '^10{}' }}", rng.below(3))),
            (0, _) => m.push(format!(
                "vars: {{ agi_callerid: '^10{}', agi_accountcode: '^{}$' }}",
                rng.below(3),
                rng.below(40)
            )),
            (_, 0) => {}
            _ => m.push(format!(
                "vars: {{ agi_accountcode: '^{}$' }}",
                rng.below(40)
            )),
        }
        if rng.below(4) == 0 {
            let net = ["127.0.0.0/30", "127.0.0.4/30", "::1/128", "127.0.0.0/8"][rng.below(4)];
            m.push(format!("source: [\"{net}\"]"));
        }
        writeln!(
            out,
            "  - name: r{i}\n    match: {{ {} }}\n    pool: p",
            m.join(", ")
        )
        .unwrap();
    }

    fn header(rng: &mut Rng) -> Header {
        let mut script = rng.pick(SCRIPTS).to_string();
        if rng.below(3) == 0 {
            script.insert(0, '/');
        }
        if rng.below(2) == 0 {
            write!(script, "?lang={}", rng.pick(LANGS)).unwrap();
        }
        let mut text = format!("agi_network_script: {script}\nagi_request: agi://x/{script}\n");
        if rng.below(4) != 0 {
            writeln!(text, "agi_arg_1: {}", rng.below(6)).unwrap();
        }
        writeln!(text, "agi_accountcode: {}", rng.below(45)).unwrap();
        if rng.below(4) != 0 {
            writeln!(text, "agi_callerid: 10{}9", rng.below(4)).unwrap();
        }
        text.push('\n');
        Header::parse(text.into_bytes(), 512).unwrap()
    }

    fn source(rng: &mut Rng) -> IpAddr {
        match rng.below(4) {
            0 => IpAddr::V6(Ipv6Addr::LOCALHOST),
            1 => IpAddr::V6(Ipv4Addr::new(127, 0, 0, rng.below(8) as u8).to_ipv6_mapped()),
            _ => IpAddr::V4(Ipv4Addr::new(127, 0, 0, rng.below(8) as u8)),
        }
    }

    /// The index must never change a decision: over a large mixed config
    /// (more regex routes than one set holds), the compiled router and a
    /// plain first-match scan agree on every call.
    #[test]
    fn compiled_router_decides_like_a_scan() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut none, mut deep) = (0, 0);
        for (routes, seed) in [(3000, 1u64), (40, 2), (600, 3)] {
            rng.0 ^= seed;
            let mut yaml = String::from(
                "version: 1\nlisteners:\n  - name: pbx\n    address: \"127.0.0.1:4573\"\nroutes:\n",
            );
            for i in 0..routes {
                route_yaml(&mut rng, i, &mut yaml);
            }
            yaml.push_str("pools:\n  - name: p\n    backends: [{ address: \"127.0.0.1:9\" }]\n");
            let config = agiproxy_config::from_yaml_str(&yaml).unwrap();
            let router = Router::new(config.routes, &config.pools, None);
            let mut routed = 0;
            for _ in 0..20_000 {
                let (h, src) = (header(&mut rng), source(&mut rng));
                // The scan as `route` did it before the index.
                let canonical = src.to_canonical();
                let scan = router
                    .routes()
                    .iter()
                    .position(|r| r.matches(&h, canonical));
                let got = router.route(&h, src);
                assert_eq!(
                    got,
                    scan,
                    "{routes} routes: script {:?}, arg {:?}, callerid {:?}, from {src}",
                    h.get("agi_network_script"),
                    h.get("agi_arg_1"),
                    h.get("agi_callerid")
                );
                routed += usize::from(scan.is_some());
                deep += usize::from(scan.is_some_and(|i| i > 20));
            }
            none += 20_000 - routed;
        }
        // The mix must exercise both answers and matches well past the first
        // routes, or the comparison proves little.
        assert!(
            none > 1000 && deep > 1000,
            "{none} unrouted, {deep} past route 20"
        );
    }

    /// A network written IPv4-mapped matches the IPv4 callers it maps,
    /// whether they come as IPv4 or mapped (a dual-stack listener, a PROXY
    /// header): it was accepted and never matched.
    #[test]
    fn an_ipv4_mapped_source_network_matches_its_ipv4_callers() {
        let yaml = "version: 1\nlisteners: [{ name: a, address: \"127.0.0.1:4573\" }]\n\
             pools: [{ name: p, backends: [{ address: \"127.0.0.1:9\" }] }]\nroutes:\n\
             \x20 - { name: mapped, match: { source: [\"::ffff:127.0.0.0/104\"] }, pool: p }\n";
        let config = agiproxy_config::from_yaml_str(yaml).unwrap();
        let router = Router::new(config.routes, &config.pools, None);
        let h = Header::parse(b"agi_network_script: x\n\n".to_vec(), 512).unwrap();
        let v4 = Ipv4Addr::new(127, 0, 0, 5);
        assert_eq!(router.route(&h, IpAddr::V4(v4)), Some(0));
        assert_eq!(router.route(&h, IpAddr::V6(v4.to_ipv6_mapped())), Some(0));
        assert_eq!(
            router.route(&h, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))),
            None
        );
        assert_eq!(router.route(&h, IpAddr::V6(Ipv6Addr::LOCALHOST)), None);
    }

    #[test]
    fn an_ordinary_configs_argument_and_variable_regexes_are_compiled_with_the_router() {
        let mut yaml = String::from(
            "version: 1\nlisteners: [{ name: a, address: \"127.0.0.1:4573\" }]\n\
             pools: [{ name: p, backends: [{ address: \"127.0.0.1:9\" }] }]\nroutes:\n",
        );
        let n = WARM_PATTERNS / 2 + 10;
        for i in 0..n {
            writeln!(
                yaml,
                "  - {{ name: r{i}, match: {{ args: {{ 1: \"^a{i}$\" }}, vars: {{ agi_callerid: \"^{i}\" }} }}, pool: p }}"
            )
            .unwrap();
        }
        let config = agiproxy_config::from_yaml_str(&yaml).unwrap();
        let router = Router::new(config.routes, &config.pools, None);
        let compiled = |r: &CompiledRoute| {
            let m = &r.route.matcher;
            (m.args[0].1.is_compiled(), m.vars[0].1.is_compiled())
        };
        // The first WARM_PATTERNS on the building thread...
        assert_eq!(compiled(&router.routes()[0]), (true, true));
        assert_eq!(
            compiled(&router.routes()[WARM_PATTERNS / 2 - 1]),
            (true, true)
        );
        // ...the rest by a background thread soon after (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while router.routes()[WARM_PATTERNS / 2..]
            .iter()
            .any(|r| compiled(r) != (true, true))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the regexes past the first {WARM_PATTERNS} were not compiled in the background"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
