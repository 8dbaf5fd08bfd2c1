//! Script regex routes as regex sets: which of many patterns match a path,
//! a set at a time.
//!
//! A set is the meta regex a `regex::RegexSet` is (same engine, same
//! options), built here from the patterns' parses ([`Pattern::parsed`]) for
//! two reasons: those parses are cheaper (`RegexSet` makes a new parser per
//! pattern), and a set of large patterns too big together for the set's
//! size limit can be split, where `RegexSet` only fails.

use agiproxy_config::Pattern;
use regex_automata::nfa::thompson::WhichCaptures;
use regex_automata::{meta, Input, MatchKind, PatternSet};
use regex_syntax::hir::Hir;

/// Regex script routes per set. One set for thousands of patterns compiles
/// slowly and outgrows the lazy DFA's cache (then searches fall back to the
/// slow engine); sets of this size stay fast, and a set is only searched
/// when it holds a route earlier than the best match so far.
const SET_SIZE: usize = 256;

/// The NFA size limit of a whole set. Each pattern alone is within
/// regex's 10 MiB; sets of large ones that together exceed this are split.
const SET_NFA_LIMIT: usize = 256 << 20;

/// The routes of one set, in route order.
#[derive(Debug)]
pub(super) struct RegexChunk {
    matcher: Matcher,
    /// Pattern i of the set is route `routes[i]`.
    routes: Vec<usize>,
}

#[derive(Debug)]
enum Matcher {
    Set(meta::Regex),
    /// A pattern that regex runs alone but that does not build in a set:
    /// a huge alternation of literals, which regex matches without an NFA.
    Alone(Pattern),
}

impl RegexChunk {
    /// The first (smallest) route of the chunk.
    pub(super) fn first_route(&self) -> usize {
        self.routes[0]
    }

    /// Calls `f` with the routes whose pattern matches `path`, in route
    /// order; not at all when none does.
    pub(super) fn with_matches(&self, path: &str, f: impl FnOnce(&mut dyn Iterator<Item = usize>)) {
        match &self.matcher {
            Matcher::Set(set) => {
                // Most sets hold no match for a call: `is_match` says so in
                // tens of nanoseconds, where the overlapping search below
                // costs a `PatternSet` (a flag per pattern) and a pass over
                // it, ten times that for a set of 256 (issue 19: 10,000
                // regex routes cost 1.11x of 10 per call before this).
                if !set.is_match(path) {
                    return;
                }
                // As `RegexSet::matches` does.
                let mut hits = PatternSet::new(set.pattern_len());
                set.which_overlapping_matches(&Input::new(path), &mut hits);
                f(&mut hits.iter().map(|p| self.routes[p.as_usize()]));
            }
            Matcher::Alone(pattern) => {
                f(&mut pattern.is_match(path).then_some(self.routes[0]).into_iter());
            }
        }
    }
}

/// The sets for `regexes` (route index, pattern), in route order.
pub(super) fn chunks(regexes: &[(usize, &Pattern)]) -> Vec<RegexChunk> {
    chunks_within(regexes, SET_NFA_LIMIT)
}

fn chunks_within(regexes: &[(usize, &Pattern)], nfa_limit: usize) -> Vec<RegexChunk> {
    let mut out = Vec::with_capacity(regexes.len().div_ceil(SET_SIZE));
    // The parses are dropped with each chunk (a parse is about 1 KB); their vector is
    // reused, since allocating it anew made glibc consolidate its free lists each time.
    let mut hirs: Vec<Hir> = Vec::with_capacity(SET_SIZE.min(regexes.len()));
    for chunk in regexes.chunks(SET_SIZE) {
        hirs.extend(chunk.iter().map(|(_, p)| p.parsed()));
        build(chunk, &hirs, nfa_limit, &mut out);
        hirs.clear();
    }
    out
}

fn build(routes: &[(usize, &Pattern)], hirs: &[Hir], nfa_limit: usize, out: &mut Vec<RegexChunk>) {
    // `regex::RegexSetBuilder`'s options, with the router's limits (the
    // lazy DFA's cache is `dfa_size_limit` there).
    let config = meta::Config::new()
        .match_kind(MatchKind::All)
        .utf8_empty(true)
        .which_captures(WhichCaptures::None)
        .nfa_size_limit(Some(nfa_limit))
        .hybrid_cache_capacity(64 << 20);
    let matcher = match meta::Builder::new()
        .configure(config)
        .build_many_from_hir(hirs)
    {
        Ok(set) => Matcher::Set(set),
        // Too large together: halves, until they fit.
        Err(_) if routes.len() > 1 => {
            let (a, b) = routes.split_at(routes.len() / 2);
            let (ha, hb) = hirs.split_at(a.len());
            build(a, ha, nfa_limit, out);
            build(b, hb, nfa_limit, out);
            return;
        }
        Err(_) => Matcher::Alone(routes[0].1.clone()),
    };
    out.push(RegexChunk {
        matcher,
        routes: routes.iter().map(|(i, _)| *i).collect(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets too large together are split, down to a pattern alone when it
    /// does not build in a set at all; every pattern still answers as it
    /// does alone, and the routes stay in order.
    #[test]
    fn sets_too_large_are_split() {
        let texts: Vec<String> = (0..40)
            .map(|i| match i % 3 {
                0 => format!(r"^/?r{i}/\w{{3}}$"),
                1 => format!("^/?r{i}/[0-9]+$"),
                _ => format!("r{i}"),
            })
            .chain([(0..3000)
                .map(|w| format!("w{w}"))
                .collect::<Vec<_>>()
                .join("|")])
            .collect();
        let patterns: Vec<Pattern> = texts.iter().map(|t| Pattern::new(t).unwrap()).collect();
        let regexes: Vec<(usize, &Pattern)> = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| (i * 2, p))
            .collect();
        // Room for about one `\w{3}` pattern's NFAs, not for the literals.
        let sets = chunks_within(&regexes, 40 << 10);
        assert!(sets.len() > 3, "{} sets", sets.len());
        assert!(matches!(sets.last().unwrap().matcher, Matcher::Alone(_)));
        let routes: Vec<usize> = sets.iter().flat_map(|s| s.routes.iter().copied()).collect();
        assert_eq!(routes, (0..41).map(|i| i * 2).collect::<Vec<_>>());
        for path in [
            "r3/abc", "/r3/abcd", "r4/12", "x/r5/", "r9/é_1", "w2999", "w30", "r1",
        ] {
            let mut got = Vec::new();
            for s in &sets {
                s.with_matches(path, |hits| got.extend(hits));
            }
            let want: Vec<usize> = regexes
                .iter()
                .filter(|(_, p)| p.is_match(path))
                .map(|(i, _)| *i)
                .collect();
            assert_eq!(got, want, "{path}");
        }
    }
}
