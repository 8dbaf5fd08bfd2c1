//! A direct parse of the simple patterns routes are mostly made of, to the same `Hir` that
//! regex-syntax makes of them, without its AST.
//!
//! A large table of regex routes spent a quarter of its load and apply in regex-syntax: an
//! AST per pattern (allocated, visited, dropped) before the `Hir` the check and the regex
//! sets need. Patterns of the subset below go straight to the `Hir`, built with the same
//! smart constructors the translator calls (which put literals, concatenations and
//! alternations in one canonical form), so the result is equal, not just equivalent; a test
//! compares the two over random patterns. Anything else (escapes of letters, counted
//! repetitions, flags, named groups, Perl and Unicode classes, whitespace, and every
//! pattern regex refuses) is left to regex-syntax: `parse` answers `None` and the caller
//! parses as before, errors included.
//!
//! The subset, with regex's default syntax (Unicode on, no flags):
//! - literals: ASCII letters and digits, `/ _ - : , = @ % ! ; ' " < >`, any non-ASCII
//!   character but whitespace, and `\` before an ASCII punctuation character regex calls
//!   meta (`\.`, `\*`, `\(` ...);
//! - `.`, `^`, `$`;
//! - bracket classes of ASCII letters, digits and `_ / . : , = @ % + * ?`, single or as
//!   ranges `a-z` (in order), `-` first or last, optionally negated with `^`;
//! - groups `( )` and `(?: )`, nested at most [`MAX_DEPTH`] deep, and alternation `|`;
//! - `?`, `*`, `+` (each optionally lazy `?`) after a literal, `.`, class or group.

use regex_syntax::hir::{
    Capture, Class, ClassUnicode, ClassUnicodeRange, Dot, Hir, Look, Repetition,
};

/// Group nesting accepted here: far below regex's nest limit (250), which counts groups,
/// repetitions, alternations and classes, at most four levels per group here.
const MAX_DEPTH: u32 = 16;

/// The pattern's `Hir`, equal to regex-syntax's, when `text` is in the subset.
pub(super) fn parse(text: &str) -> Option<Hir> {
    let mut p = Parser {
        rest: text,
        captures: 0,
    };
    let hir = p.alternation(0)?;
    p.rest.is_empty().then_some(hir)
}

struct Parser<'a> {
    rest: &'a str,
    /// Capture groups opened so far (regex numbers them from 1 as they open).
    captures: u32,
}

/// What a piece of a concatenation was, for the quantifier that may follow it.
enum Atom {
    /// A literal character, appended to the pending literal bytes from this offset.
    Literal(usize),
    Expr(Hir),
    /// `^` or `$`: nothing may repeat them here.
    Anchor(Hir),
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.rest.chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.rest = &self.rest[c.len_utf8()..];
        Some(c)
    }

    fn eat(&mut self, c: char) -> bool {
        let ate = self.rest.starts_with(c);
        if ate {
            self.rest = &self.rest[c.len_utf8()..];
        }
        ate
    }

    /// Branches up to the end of the pattern or of the enclosing group.
    fn alternation(&mut self, depth: u32) -> Option<Hir> {
        let first = self.concat(depth)?;
        if !self.eat('|') {
            return Some(first);
        }
        let mut branches = vec![first];
        loop {
            branches.push(self.concat(depth)?);
            if !self.eat('|') {
                return Some(Hir::alternation(branches));
            }
        }
    }

    fn concat(&mut self, depth: u32) -> Option<Hir> {
        let mut items: Vec<Hir> = Vec::new();
        // Adjacent literal characters, as one literal (as `Hir::concat` would merge them).
        let mut literal: Vec<u8> = Vec::new();
        loop {
            let atom = match self.peek() {
                None | Some('|' | ')') => break,
                Some('(') => {
                    self.bump();
                    Atom::Expr(self.group(depth)?)
                }
                Some('[') => {
                    self.bump();
                    Atom::Expr(self.class()?)
                }
                Some('.') => {
                    self.bump();
                    Atom::Expr(Hir::dot(Dot::AnyCharExcept('\n')))
                }
                Some('^') => {
                    self.bump();
                    Atom::Anchor(Hir::look(Look::Start))
                }
                Some('$') => {
                    self.bump();
                    Atom::Anchor(Hir::look(Look::End))
                }
                Some('\\') => {
                    self.bump();
                    let c = self
                        .bump()
                        .filter(|&c| regex_syntax::is_meta_character(c))?;
                    let at = literal.len();
                    push_char(&mut literal, c);
                    Atom::Literal(at)
                }
                Some(c) if plain(c) => {
                    self.bump();
                    let at = literal.len();
                    push_char(&mut literal, c);
                    Atom::Literal(at)
                }
                Some(_) => return None,
            };
            let repeat = self.quantifier();
            let expr = match (atom, repeat) {
                (Atom::Literal(_), None) => continue,
                (Atom::Literal(at), Some(rep)) => {
                    let c = literal.split_off(at);
                    flush(&mut literal, &mut items);
                    rep(Hir::literal(c))
                }
                (Atom::Anchor(_), Some(_)) => return None,
                (Atom::Expr(e), Some(rep)) => rep(e),
                (Atom::Expr(e) | Atom::Anchor(e), None) => e,
            };
            flush(&mut literal, &mut items);
            items.push(expr);
        }
        flush(&mut literal, &mut items);
        Some(Hir::concat(items))
    }

    /// After `(`: the group's contents and its `)`.
    fn group(&mut self, depth: u32) -> Option<Hir> {
        if depth >= MAX_DEPTH {
            return None;
        }
        let capture = if self.rest.starts_with("?:") {
            self.rest = &self.rest[2..];
            None
        } else if self.peek() == Some('?') {
            return None; // flags or a name
        } else {
            self.captures += 1;
            Some(self.captures)
        };
        let sub = self.alternation(depth + 1)?;
        if !self.eat(')') {
            return None;
        }
        Some(match capture {
            Some(index) => Hir::capture(Capture {
                index,
                name: None,
                sub: Box::new(sub),
            }),
            None => sub,
        })
    }

    /// After `[`: the class's items and its `]`.
    fn class(&mut self) -> Option<Hir> {
        let negated = self.eat('^');
        let mut ranges = Vec::new();
        // A `-` first or last is literal; both would read as `--`, set difference.
        let leading_dash = self.eat('-');
        if leading_dash {
            ranges.push(ClassUnicodeRange::new('-', '-'));
        }
        loop {
            match self.bump()? {
                ']' if !ranges.is_empty() => break,
                '-' if !leading_dash && self.peek() == Some(']') => {
                    ranges.push(ClassUnicodeRange::new('-', '-'))
                }
                start if in_class(start) => {
                    let mut end = start;
                    if self.rest.starts_with('-') && !self.rest[1..].starts_with(']') {
                        self.bump();
                        end = self.bump().filter(|&c| in_class(c) && c >= start)?;
                    }
                    ranges.push(ClassUnicodeRange::new(start, end));
                }
                _ => return None,
            }
        }
        let mut class = ClassUnicode::new(ranges);
        if negated {
            class.negate();
        }
        Some(Hir::class(Class::Unicode(class)))
    }

    /// `?`, `*` or `+`, greedy or lazy, as a function making the repetition.
    fn quantifier(&mut self) -> Option<impl FnOnce(Hir) -> Hir> {
        let (min, max) = match self.peek()? {
            '?' => (0, Some(1)),
            '*' => (0, None),
            '+' => (1, None),
            _ => return None,
        };
        self.bump();
        let greedy = !self.eat('?');
        Some(move |sub: Hir| {
            Hir::repetition(Repetition {
                min,
                max,
                greedy,
                sub: Box::new(sub),
            })
        })
    }
}

/// A literal character outside a class (whitespace and the rest of ASCII are left to
/// regex-syntax, which reads some of them as syntax).
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '/' | '_' | '-' | ':' | ',' | '=' | '@' | '%' | '!' | ';' | '\'' | '"' | '<' | '>'
        )
        || (!c.is_ascii() && !c.is_whitespace())
}

/// A character a class item may be here.
fn in_class(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '_' | '/' | '.' | ':' | ',' | '=' | '@' | '%' | '+' | '*' | '?'
        )
}

fn push_char(literal: &mut Vec<u8>, c: char) {
    literal.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
}

fn flush(literal: &mut Vec<u8>, items: &mut Vec<Hir>) {
    if !literal.is_empty() {
        items.push(Hir::literal(std::mem::take(literal)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_syntax(p: &str) -> Option<Hir> {
        regex_syntax::ParserBuilder::new()
            .utf8(true)
            .build()
            .parse(p)
            .ok()
    }

    /// Where the direct parse answers, it answers what regex-syntax does; it answers for
    /// the patterns routes are made of; and it leaves the rest (errors included) alone.
    #[test]
    fn equal_to_regex_syntax_at_the_edges() {
        let simple = [
            "",
            "^/?other/12345$",
            "^/?ivr/[0-9]+$",
            "^/?app-[a-z0-9_-]+/",
            "a|b|c",
            "x|[a-c]|yy|",
            "(|a)",
            "()",
            "(a)(b(c))+?",
            "(?:ab)*c",
            "ab+c??d*?",
            "[^/]+/[-a]",
            "[a-]",
            "[-]",
            "[.*+?]",
            r"\.\*\(\)\[\]\{\}\^\$\|\\\#\&\-\~",
            "é+ß|日本",
            "..$",
            "m1",
        ];
        for p in simple {
            let got = parse(p);
            assert!(got.is_some(), "{p} is simple");
            assert_eq!(got, regex_syntax(p), "{p}");
        }
        for p in [
            "(",
            ")",
            "a)",
            "[z-a]",
            "[]",
            "[]a]",
            "[^]",
            "[--]",
            "[a--b]",
            "[a&&b]",
            "*a",
            "a**",
            "^*",
            "$+",
            "|*",
            r"\d",
            r"\/",
            r"\w+",
            "(?i)a",
            "(?<n>a)",
            "(?P<n>a)",
            "a{2}",
            "a b",
            "#",
            "&",
            "~",
            "\\",
            "[[:alpha:]]",
            "[a-\\]",
            &format!("{}a{}", "(".repeat(17), ")".repeat(17)),
        ] {
            assert_eq!(parse(p), None, "{p}");
        }
        let deep = format!("{}a{}", "(".repeat(16), ")".repeat(16));
        assert_eq!(parse(&deep), regex_syntax(&deep));
    }

    /// Random patterns of the subset and of its near misses (xorshift, reproducible).
    #[test]
    fn equal_to_regex_syntax_on_random_patterns() {
        const PIECES: &[&str] = &[
            "a", "b", "Z", "0", "9", "/", "_", "-", ":", "é", "日", ".", "^", "$", "|", "(", ")",
            "(?:", "[", "]", "[^", "a-z", "0-9", "-]", "?", "*", "+", "??", r"\.", r"\-", r"\\",
            "{", "}", " ", "&&", "~", "#",
        ];
        let mut next = crate::pattern::xorshift(0x9e37_79b9_7f4a_7c15_u64);
        let (mut answered, mut valid) = (0, 0);
        for _ in 0..200_000 {
            let len = 1 + next(10);
            let p: String = (0..len).map(|_| PIECES[next(PIECES.len())]).collect();
            let want = regex_syntax(&p);
            valid += usize::from(want.is_some());
            if let Some(got) = parse(&p) {
                answered += 1;
                assert_eq!(Some(got), want, "{p}");
            }
        }
        assert!(
            answered > 5_000 && valid > answered,
            "{answered} of {valid}"
        );
    }
}
