//! An upper bound on the NFA a parsed regex compiles to, so that the load check can accept
//! the small patterns routes are made of without building their NFAs.
//!
//! regex refuses a pattern whose Thompson NFA, forward or reverse, outgrows its size limit
//! while being built: the builder counts `size_of::<State>()` per state plus the heap of
//! each state's transitions and alternates. The bound below follows what
//! regex-automata 0.4's compiler adds per `Hir` node (`nfa/thompson/compiler.rs`: `c` and
//! the `c_*` it calls, the literal trie, both UTF-8 automata), in either direction, and
//! charges each item at least twice its size (a state at most 32 bytes on 64-bit, a
//! transition 8, an alternate 4). The check trusts it only far below the limit, and a test
//! builds every pattern of a varied list with the bound as its size limit.

use regex_syntax::hir::{Class, Hir, HirKind};
use regex_syntax::utf8::Utf8Sequences;

/// Per state: twice `size_of::<State>()`, plus an alternate it may gain as the end of a
/// sub-expression its parent patches (once per sub-expression).
const STATE: u64 = 96;
/// Per transition of a sparse state (8 bytes).
const TRANSITION: u64 = 16;
/// Per alternate of a union state (a `StateID`, 4 bytes).
const ALTERNATE: u64 = 8;
/// What a whole pattern adds around its `Hir`: the unanchored prefix (a union, a byte class
/// and an empty state), the capture states of group 0, the match state.
const PATTERN_STATES: u64 = 16;
const PATTERN_HEAP: u64 = 256;

/// States and heap bytes of a compiled sub-expression, both upper bounds.
#[derive(Clone, Copy, Default)]
struct Size {
    states: u64,
    heap: u64,
}

impl Size {
    fn plus(self, other: Size) -> Size {
        Size {
            states: self.states.saturating_add(other.states),
            heap: self.heap.saturating_add(other.heap),
        }
    }
}

/// An upper bound on the bytes regex-automata's Thompson builder counts against its size
/// limit while compiling `hir` as one pattern, forward (captures kept) or reverse.
pub(super) fn bound(hir: &Hir) -> u64 {
    let s = size(hir);
    s.states
        .saturating_add(PATTERN_STATES)
        .saturating_mul(STATE)
        .saturating_add(s.heap)
        .saturating_add(PATTERN_HEAP)
}

fn size(hir: &Hir) -> Size {
    match hir.kind() {
        // c_empty, c_look: one state.
        HirKind::Empty | HirKind::Look(_) => Size { states: 1, heap: 0 },
        // One byte-range state per byte (an empty state for no bytes).
        HirKind::Literal(lit) => Size {
            states: (lit.0.len() as u64).max(1),
            heap: 0,
        },
        // An empty state and a sparse state with a transition per range.
        HirKind::Class(Class::Bytes(c)) => class_states(c.ranges().len()),
        HirKind::Class(Class::Unicode(c)) if c.is_ascii() => class_states(c.ranges().len()),
        // A UTF-8 automaton of the class's byte sequences (at most 4 bytes each). Forward,
        // a trie of them: a target state and at most one state and one transition per byte
        // of each sequence, plus the root. Reverse (unshrunk): a union and an end state, at
        // most a byte-range state per byte and one alternate per sequence.
        HirKind::Class(Class::Unicode(c)) => {
            let seqs = c
                .iter()
                .map(|r| Utf8Sequences::new(r.start(), r.end()).count() as u64)
                .fold(0u64, u64::saturating_add);
            let nodes = seqs.saturating_mul(4).saturating_add(1);
            Size {
                states: nodes.saturating_add(2),
                heap: nodes.saturating_mul(TRANSITION.max(ALTERNATE)),
            }
        }
        // c_cap: a start and an end state around the group (none when captures are off).
        HirKind::Capture(c) => size(&c.sub).plus(Size { states: 2, heap: 0 }),
        HirKind::Concat(subs) => subs
            .iter()
            .map(size)
            .fold(Size::default(), Size::plus)
            .plus(Size { states: 1, heap: 0 }),
        // c_alt_iter: a union with an alternate per branch and an end state; or, when every
        // branch is a literal, the literal trie: at most a union and two chunk states per
        // trie state (one per byte, plus the root) and one chunk per literal, a transition
        // per byte and two alternates per chunk. Covered by: three states plus one per
        // branch plus twice the branches' states, and that many transitions and alternates.
        HirKind::Alternation(subs) => {
            let inner = subs.iter().map(size).fold(Size::default(), Size::plus);
            let units = (subs.len() as u64)
                .saturating_add(inner.states.saturating_mul(2))
                .saturating_add(3);
            Size {
                states: units,
                heap: inner
                    .heap
                    .saturating_add(units.saturating_mul(TRANSITION + 2 * ALTERNATE)),
            }
        }
        // c_repetition: the sub-expression compiled k = max(min, max, 1) times at most,
        // with at most one union (two alternates) per copy and three more states.
        HirKind::Repetition(rep) => {
            let copies = u64::from(rep.min.max(rep.max.unwrap_or(0)).max(1));
            let sub = size(&rep.sub);
            Size {
                states: sub
                    .states
                    .saturating_add(1)
                    .saturating_mul(copies)
                    .saturating_add(3),
                heap: sub
                    .heap
                    .saturating_mul(copies)
                    .saturating_add(copies.saturating_add(2).saturating_mul(2 * ALTERNATE)),
            }
        }
    }
}

fn class_states(ranges: usize) -> Size {
    Size {
        states: 2,
        heap: (ranges as u64).saturating_mul(TRANSITION),
    }
}

#[cfg(test)]
mod tests {
    use regex_automata::nfa::thompson;

    use super::*;

    /// The real builder, as the load check runs it, never counts more than the bound: each
    /// pattern builds forward and reverse with the bound as its size limit.
    fn assert_bound_holds(pattern: &str) -> bool {
        let hir = super::super::parse(pattern).expect(pattern);
        let limit = usize::try_from(bound(&hir)).unwrap();
        // Beyond this the check builds the NFAs anyway; and building them is slow.
        if limit > 64 << 20 {
            return false;
        }
        let config = thompson::Config::new()
            .utf8(true)
            .nfa_size_limit(Some(limit))
            .shrink(false);
        let forward = thompson::Compiler::new()
            .configure(config.clone())
            .build_from_hir(&hir);
        let reverse = thompson::Compiler::new()
            .configure(
                config
                    .which_captures(thompson::WhichCaptures::None)
                    .reverse(true),
            )
            .build_from_hir(&hir);
        assert!(
            forward.is_ok() && reverse.is_ok(),
            "{pattern:.80}: bound {limit}: {:?} {:?}",
            forward.err(),
            reverse.err()
        );
        true
    }

    #[test]
    fn the_bound_holds_for_each_kind_of_node() {
        let words = (0..2000).map(|i| format!("w{i}")).collect::<Vec<_>>();
        for p in [
            "",
            "a",
            "^/?other/12345$",
            "^/?ivr/.*$",
            r"^/?ivr/[0-9]+/\d{3,5}$",
            "(?s).",
            "[^a]",
            r"\w",
            r"\w+",
            r"\w{30}",
            r"\W{3}[^\w]?",
            r"[\p{L}\p{N}]{5}",
            r"\p{Greek}+|\p{Han}*",
            r"[\x{10000}-\x{10FFFF}]|[\x{80}-\x{7FF}]+|[\x{800}-\x{FFFF}]{2}",
            r"(?i)straße|ǅ+",
            "💩+",
            r"(?-u:\x41)(?-u)[a-z]+[\x00-\x40]{2}",
            "a{0,5}b{3}c{2,}d{1,}e{0,}f{7,9}",
            "(a|b)*(?:)*(a*)*(|a)+(a?)+",
            "a*?b+?c??(?U)d*e{2,4}",
            "foo|bar|baz",
            "foo|foobar|f|fo|foo",
            "a|a|a",
            "x|[a-c]|yy|",
            r"\bfoo\b\B(?m)^$(?-u:\b)\<x\>",
            "(?<name>x)(y)((z))",
            r"(\w{3}|[0-9]{4}){4}",
            "[a-z&&[^aeiou]]{10}",
            &words.join("|"),
            &format!("({})+", words[..300].join("|")),
        ] {
            assert!(assert_bound_holds(p), "{p:.80}: bound too large to test");
        }
    }

    /// Random nestings of the same constructs (xorshift, reproducible).
    #[test]
    fn the_bound_holds_for_random_patterns() {
        const ATOMS: &[&str] = &[
            "a",
            "xyz",
            ".",
            r"\d",
            r"\w",
            "[a-f]",
            "[^/]",
            "é",
            r"\p{Lu}",
            "^",
            "$",
            r"\b",
            "",
            "(?i)k",
            "(?-u:[0-9])",
        ];
        let mut next = crate::pattern::xorshift(0x2545_f491_4f6c_dd1d_u64);
        fn build(depth: u32, next: &mut dyn FnMut(usize) -> usize) -> String {
            if depth == 0 || next(4) == 0 {
                return ATOMS[next(ATOMS.len())].to_string();
            }
            let a = build(depth - 1, next);
            let b = build(depth - 1, next);
            match next(9) {
                0 => format!("{a}{b}"),
                1 => format!("(?:{a}|{b})"),
                2 => format!("({a})*"),
                3 => format!("(?:{a})+?"),
                4 => format!("(?:{a})?"),
                5 => format!("(?:{a}){{{}}}", next(6)),
                6 => format!("(?:{a}){{{},{}}}", next(3), 3 + next(4)),
                7 => format!("(?:{a}){{{},}}", next(4)),
                _ => format!("({a}|{b}|c)"),
            }
        }
        let tested = (0..400)
            .filter(|_| assert_bound_holds(&build(5, &mut next)))
            .count();
        assert!(tested > 300, "{tested} patterns small enough to test");
    }
}
