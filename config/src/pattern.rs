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

/// Patterns up to this long are parsed by an AST parser kept per thread (see `parse`); what
/// it keeps between parses grows with the pattern, so long ones get their own.
const SHARED_PARSER_MAX: usize = 4096;

/// A regex that `regex::Regex::new` accepts, compiled on first use (shared by clones).
#[derive(Clone)]
pub struct Pattern(Arc<Inner>);

struct Inner {
    text: Box<str>,
    compiled: OnceLock<Regex>,
}

impl Pattern {
    /// Checks `text` as `Regex::new` would, without building it. The error is `regex`'s own.
    pub fn new(text: &str) -> Result<Pattern, regex::Error> {
        let compiled = OnceLock::new();
        if !check(text) {
            // The error to show is regex's own; and the check is stricter than regex in one
            // case (a long alternation of literals, which regex runs without an NFA), so a
            // pattern regex accepts is kept, compiled.
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

/// The steps of `regex::Regex::new` that can refuse a pattern (regex-automata's meta
/// `Builder::build_many` and `Core::new` with `regex`'s defaults): parse and translate with
/// the default syntax options, then the forward NFA (captures kept) and the reverse NFA
/// (without captures) under the size limit. The engines built after those (PikeVM,
/// backtracker, one-pass and lazy DFAs) give up quietly instead of failing.
fn check(text: &str) -> bool {
    parse(text).is_some_and(|hir| nfa_size::bound(&hir) <= BOUND_TRUSTED || nfas_within_limit(&hir))
}

fn nfas_within_limit(hir: &Hir) -> bool {
    let config = thompson::Config::new()
        .utf8(true)
        .nfa_size_limit(Some(NFA_SIZE_LIMIT))
        .shrink(false);
    let forward = thompson::Compiler::new()
        .configure(config.clone())
        .build_from_hir(hir);
    forward.is_ok()
        && thompson::Compiler::new()
            .configure(
                config
                    .which_captures(thompson::WhichCaptures::None)
                    .reverse(true),
            )
            .build_from_hir(hir)
            .is_ok()
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
            if let (Err(a), Err(b)) = (regex, pattern) {
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
