//! A regex of the config: checked at load, compiled on first use.
//!
//! Compiling a `regex::Regex` costs far more than checking that it would compile: the meta
//! engine builds a prefilter, a one-pass DFA, a backtracker and a lazy DFA besides the NFA,
//! and holds them (kilobytes per pattern). A config of 100,000 regex routes took 34 s and
//! 1.4 GB that way, though the proxy matches script regexes as sets and never needs most
//! patterns on their own. So load runs only the steps of `regex`'s build that can refuse a
//! pattern: the parse (syntax and nesting limit), and the forward and reverse Thompson NFAs
//! within `regex`'s size limit (10 MiB); see `check`. Those NFAs are only built when a bound
//! computed from the parse ([`nfa_size`]) does not already prove them far within the limit,
//! as it does for the short patterns routes are made of. The `Regex` is built when something
//! first matches against the pattern alone; the router builds its regex sets from parses
//! ([`Pattern::parsed`]). The simple patterns routes are mostly made of are parsed without
//! regex-syntax's AST, to the same `Hir` ([`simple`]); the rest by regex-syntax.

mod nfa_size;
mod simple;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use regex::Regex;
use regex_automata::nfa::thompson;
use regex_syntax::ast;
use regex_syntax::hir::translate::TranslatorBuilder;
use regex_syntax::hir::Hir;

/// `regex`'s default size limit for one compiled pattern (`RegexBuilder::size_limit`).
const NFA_SIZE_LIMIT: usize = 10 << 20;

/// Patterns whose NFA bound is at most this are accepted without building the NFAs: a
/// tenth of the limit, so the bound stays sound by a wide margin should the compiler's
/// layout change (a test checks it against the real builder).
const BOUND_TRUSTED: u64 = 1 << 20;

/// What checking one config's regexes may build, all patterns together (see [`Budget`]). At
/// about 25 ns a byte of NFA, a second or two of CPU: far beyond what routes need (their
/// patterns are proven small without building anything), and it bounds a hostile config, whose
/// patterns near the size limit cost 0.4 s each (300 of them held the one config parse for
/// 105 s, and a change behind it waited).
pub const CONFIG_NFA_BUDGET: usize = 64 << 20;

/// Patterns up to this long are parsed by an AST parser kept per thread (see `parse`); what
/// it keeps between parses grows with the pattern, so long ones get their own.
const SHARED_PARSER_MAX: usize = 4096;

/// Why a pattern was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    /// `regex` refuses it; the error is regex's own.
    #[error(transparent)]
    Regex(#[from] regex::Error),
    /// The config's regexes used up [`CONFIG_NFA_BUDGET`] before this one was checked.
    #[error(
        "not checked: the config's regexes together need more than {} MiB of automata to check \
         (large Unicode classes repeated, like \\w{{100}}, are the usual cause: (?-u:\\w) is \
         ASCII-only and far smaller)",
        CONFIG_NFA_BUDGET >> 20
    )]
    OverBudget,
}

/// While one is alive, the regexes checked on this thread (one config's) share
/// [`CONFIG_NFA_BUDGET`], and a pattern written more than once is checked once. Without one
/// (a pattern on its own), each is bounded by the size limit alone.
pub struct Budget(());

struct Checks {
    left: usize,
    /// Patterns that needed their NFAs built, as `Pattern::new` made them (or `regex`'s
    /// error, which took another build to get).
    seen: HashMap<Box<str>, Result<Pattern, regex::Error>>,
}

thread_local! {
    static BUDGET: RefCell<Option<Checks>> = const { RefCell::new(None) };
}

impl Budget {
    pub fn start() -> Budget {
        BUDGET.with(|b| {
            *b.borrow_mut() = Some(Checks {
                left: CONFIG_NFA_BUDGET,
                seen: HashMap::new(),
            })
        });
        Budget(())
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        BUDGET.with(|b| *b.borrow_mut() = None);
    }
}

/// A regex that `regex::Regex::new` accepts, compiled on first use (shared by clones).
#[derive(Clone)]
pub struct Pattern(Arc<Inner>);

struct Inner {
    text: Box<str>,
    compiled: OnceLock<Regex>,
}

impl Pattern {
    /// Checks `text` as `Regex::new` would, without building it. The error is `regex`'s own,
    /// or [`PatternError::OverBudget`] under a [`Budget`] used up.
    pub fn new(text: &str) -> Result<Pattern, PatternError> {
        let Some(hir) = parse(text) else {
            return Ok(Pattern::made(text, false)?);
        };
        if nfa_size::bound(&hir) <= BOUND_TRUSTED {
            return Ok(Pattern::made(text, true).expect("checked"));
        }
        BUDGET.with(|b| {
            let mut b = b.borrow_mut();
            let Some(checks) = b.as_mut() else {
                return Ok(Pattern::made(text, nfas_within_limit(&hir).0)?);
            };
            if let Some(made) = checks.seen.get(text) {
                return Ok(made.clone()?);
            }
            // Room for the largest build, and for `Regex::new` building again for its error.
            if checks.left < 2 * NFA_SIZE_LIMIT {
                return Err(PatternError::OverBudget);
            }
            let (ok, used) = nfas_within_limit(&hir);
            checks.left = checks
                .left
                .saturating_sub(used + if ok { 0 } else { NFA_SIZE_LIMIT });
            let made = Pattern::made(text, ok);
            checks.seen.insert(text.into(), made.clone());
            Ok(made?)
        })
    }

    /// The pattern of `text`, whose check `passed`. The error to show when it did not is
    /// regex's own; and the check is stricter than regex in one case (a long alternation of
    /// literals, which regex runs without an NFA), so a pattern regex accepts is kept,
    /// compiled.
    fn made(text: &str, passed: bool) -> Result<Pattern, regex::Error> {
        let compiled = OnceLock::new();
        if !passed {
            compiled
                .set(Regex::new(text)?)
                .expect("a new cell is empty");
        }
        Ok(Pattern(Arc::new(Inner {
            text: text.into(),
            compiled,
        })))
    }

    /// The pattern as written (after the config's own rewrites, such as `^/` → `^/?`).
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The pattern parsed as `regex` parses it, for building a regex set from it. (Not kept
    /// from the load check: 100,000 parses hold 95 MB, and parsing again costs little.)
    pub fn parsed(&self) -> Hir {
        // As in `regex`: a pattern that parsed at load parses again; should it not, it
        // matches nothing rather than crash.
        parse(&self.0.text).unwrap_or_else(Hir::fail)
    }

    /// The compiled regex, built on the first call.
    pub fn regex(&self) -> &Regex {
        self.0.compiled.get_or_init(|| {
            // `new` checked every step of the build that can fail; should the regex crate
            // refuse anyway, the pattern matches nothing rather than crash a session.
            Regex::new(&self.0.text).unwrap_or_else(|_| Regex::new(r"[^\s\S]").expect("valid"))
        })
    }

    pub fn is_match(&self, haystack: &str) -> bool {
        self.regex().is_match(haystack)
    }

    /// Whether the regex has been built (for tests of the laziness).
    pub fn is_compiled(&self) -> bool {
        self.0.compiled.get().is_some()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.as_str())
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Parses and translates with `regex`'s default syntax options; `None` where regex reports
/// a syntax error (the error shown is then regex's own). Simple patterns go straight to
/// their `Hir` ([`simple::parse`], equal to regex-syntax's).
fn parse(text: &str) -> Option<Hir> {
    if let Some(hir) = simple::parse(text) {
        return Some(hir);
    }
    thread_local! {
        static SHARED: RefCell<ast::parse::Parser> = RefCell::new(ast::parse::Parser::new());
    }
    let ast = if text.len() > SHARED_PARSER_MAX {
        ast::parse::Parser::new().parse(text).ok()
    } else {
        // The AST parser resets all its state at the start of each parse.
        SHARED.with(|p| p.borrow_mut().parse(text).ok())
    }?;
    // A new translator each time: one keeps the flags a pattern sets at its top level
    // (`(?i)`) for the next pattern it translates (regex-syntax 0.8.12). A new one
    // allocates nothing until used.
    TranslatorBuilder::new()
        .utf8(true)
        .build()
        .translate(text, &ast)
        .ok()
}

// The steps of `regex::Regex::new` that can refuse a pattern (regex-automata's meta
// `Builder::build_many` and `Core::new` with `regex`'s defaults): parse and translate with
// the default syntax options, then the forward NFA (captures kept) and the reverse NFA
// (without captures) under the size limit. The engines built after those (PikeVM,
// backtracker, one-pass and lazy DFAs) give up quietly instead of failing. `Pattern::new`
// runs them: the parse, then the NFAs unless their bound is trusted.

/// Whether both NFAs are within the limit, and the bytes they took to build (the limit for
/// one that ran over it).
fn nfas_within_limit(hir: &Hir) -> (bool, usize) {
    let config = thompson::Config::new()
        .utf8(true)
        .nfa_size_limit(Some(NFA_SIZE_LIMIT))
        .shrink(false);
    let forward = match thompson::Compiler::new()
        .configure(config.clone())
        .build_from_hir(hir)
    {
        Ok(nfa) => nfa.memory_usage(),
        Err(_) => return (false, NFA_SIZE_LIMIT),
    };
    match thompson::Compiler::new()
        .configure(
            config
                .which_captures(thompson::WhichCaptures::None)
                .reverse(true),
        )
        .build_from_hir(hir)
    {
        Ok(nfa) => (true, forward + nfa.memory_usage()),
        Err(_) => (false, forward + NFA_SIZE_LIMIT),
    }
}

/// A reproducible xorshift generator for the randomized tests of the
/// pattern modules: `next(n)` is in `0..n`.
#[cfg(test)]
fn xorshift(mut state: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check refuses what regex refuses, and accepts what it accepts, over patterns at
    /// the edges: syntax, nesting, size, and the literal alternation regex runs without an NFA.
    #[test]
    fn checked_like_regex() {
        let big_literals = (0..40_000)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join("|");
        let patterns = [
            "^/?ivr/",
            "a{1000}",
            r"\w{100}",
            r"\w{1000}",
            r"(\w{100}){100}",
            r"[\p{L}\p{N}]{500}",
            "(",
            "[z-a]",
            "a{2,1}",
            r"\p{NoSuchClass}",
            "(?<n>a)(?<n>b)",
            "x{1000000}",
            &"(".repeat(300),
            &format!("{}a{}", "(".repeat(200), ")".repeat(200)),
            "",
            "(?i)straße",
            r"\b\B^$(?m)^$",
            &big_literals,
        ];
        for p in patterns {
            let regex = Regex::new(p);
            let pattern = Pattern::new(p);
            assert_eq!(regex.is_ok(), pattern.is_ok(), "{:.60}", p);
            if let (Err(a), Err(PatternError::Regex(b))) = (regex, pattern) {
                assert_eq!(a.to_string(), b.to_string());
            }
        }
    }

    /// The parse is regex's. Parses do not leak flags into each other (the AST parser is
    /// shared on a thread, the translator would keep a top-level `(?i)`).
    #[test]
    fn parsed_as_regex_parses() {
        let fresh = |p: &str| regex_syntax::Parser::new().parse(p).unwrap();
        for p in ["(?i)^/?ivr/[0-9]+$", "^/?ivr/b(?-u)x", "b.", "é"] {
            let pattern = Pattern::new(p).unwrap();
            assert_eq!(pattern.parsed(), fresh(p), "{p}");
            assert!(!pattern.is_compiled());
        }
    }

    fn routes(patterns: impl Iterator<Item = String>) -> String {
        let mut text =
            "version: 1\nlisteners: [{ name: a, address: \"127.0.0.1:4573\" }]\nroutes:\n"
                .to_string();
        for (i, p) in patterns.enumerate() {
            text.push_str(&format!(
                "  - {{ name: r{i}, match: {{ script: {{ regex: '{p}' }} }}, pool: p }}\n"
            ));
        }
        text + "pools:\n  - { name: p, backends: [{ address: \"127.0.0.1:1\" }] }\n"
    }

    /// Large patterns (here `\w{100}`: 5.6 MB of NFAs, 50 ms each) share one budget per
    /// config: past it the rest are refused unchecked, so a config of hostile patterns
    /// costs seconds, not the 105 s that 300 of them held the one config parse (audit).
    #[test]
    fn a_configs_regexes_share_one_budget() {
        let distinct = routes((0..30).map(|i| format!(r"\w{{100}}x{i}")));
        let errors = crate::from_yaml_str(&distinct).expect_err("over the budget");
        let over: Vec<_> = errors
            .0
            .iter()
            .filter(|e| e.message.contains("not checked"))
            .collect();
        // 64 MiB leaves room for about 9 of them (at least 20 MiB for the last); the first
        // ones are checked and valid.
        assert!((15..=25).contains(&over.len()), "{errors}");
        assert_eq!(errors.0.len(), over.len(), "{errors}");
        assert!(over[0].path.starts_with("routes[") && !over[0].path.starts_with("routes[0]"));
        assert!(
            over[0].message.contains("more than 64 MiB"),
            "{}",
            over[0].message
        );
        // The same pattern written many times is checked once, also when it is refused
        // (regex's own error took another build each time: 300 took 74 s).
        let same = routes((0..200).map(|_| r"\w{100}".to_string()));
        crate::from_yaml_str(&same).expect("one pattern, checked once");
        let started = std::time::Instant::now();
        let refused = routes((0..100).map(|_| r"\w{1000}".to_string()));
        let errors = crate::from_yaml_str(&refused).expect_err("over the size limit");
        assert_eq!(errors.0.len(), 100);
        assert!(
            errors.0.iter().all(|e| e.message.contains("size limit")),
            "{errors}"
        );
        let once = started.elapsed();
        let started = std::time::Instant::now();
        crate::from_yaml_str(&routes(std::iter::once(r"\w{1000}".to_string()))).unwrap_err();
        // 100 cost about what 1 does (not 100 times; a wide margin for a busy machine).
        assert!(
            once < started.elapsed() * 10,
            "{once:?} vs {:?}",
            started.elapsed()
        );
        // A pattern on its own has no budget but its size limit.
        for _ in 0..12 {
            Pattern::new(r"\w{100}").unwrap();
        }
    }

    /// Health checks' `expect` regexes are compiled whole, and share the same budget.
    #[test]
    fn health_check_regexes_share_the_budget() {
        let mut text = "version: 1\nlisteners: [{ name: a, address: \"127.0.0.1:4573\" }]\n\
                        routes:\n  - { name: all, pool: p0 }\npools:\n"
            .to_string();
        for i in 0..30 {
            text.push_str(&format!(
                "  - {{ name: p{i}, health: {{ type: agi, expect: '\\w{{100}}x{i}' }}, \
                 backends: [{{ address: \"127.0.0.1:1\" }}] }}\n"
            ));
        }
        let errors = crate::from_yaml_str(&text).expect_err("over the budget");
        assert!(
            errors.0.iter().all(|e| e.path.ends_with(".health.expect")),
            "{errors}"
        );
        assert!((15..=25).contains(&errors.0.len()), "{errors}");
        assert!(errors.0[0].message.contains("not checked"), "{errors}");
    }

    #[test]
    fn built_on_first_use_and_shared_by_clones() {
        let p = Pattern::new("^/?ivr/[0-9]+$").unwrap();
        let q = p.clone();
        assert!(!p.is_compiled());
        assert!(q.is_match("ivr/12") && !q.is_match("ivr/x"));
        assert!(p.is_compiled());
        assert_eq!(p.as_str(), "^/?ivr/[0-9]+$");
    }
}
