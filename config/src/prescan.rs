//! A bounded look at a config's YAML before anything is built from it.
//!
//! Two kinds of text cost far more than their size once parsed, and serde_yaml guards against
//! neither in time:
//! - aliases: `y: [*a, *a, …]` where `&a` is a list of 100,000 items builds 100,000 values per
//!   alias (a 200 KB "alias bomb" took 3.4 GB). serde_yaml's repetition limit is 100 jumps per
//!   event of the document, which such a bomb stays well under.
//! - nesting in flow style (`{a: {a: …`): libyaml rescans every open level for each token, so
//!   40,000 levels took seconds and 100,000 minutes, before serde_yaml's own depth limit (128)
//!   ever sees an event.
//!
//! So the text is first run through the same event parser serde_yaml uses (libyaml, through
//! `unsafe-libyaml`: the two can never disagree about the structure), one event at a time, and
//! refused at the first event beyond a bound: nesting deeper than [`MAX_DEPTH`], more than
//! [`MAX_ALIASES`] aliases, or aliases that together stand for more than
//! [`MAX_ALIAS_NODES`] nodes, or anchors and aliases that together copy more than
//! [`MAX_COPY_COST`] bytes of tree. That last bound counts bytes, not nodes: one alias of a
//! 500 KB string is one node (10,000 of them took 2.9 GB), and every anchored node is copied
//! once when it closes, used or not (60 nested anchors over one large list took 60 times its
//! size). The scan stops there, so its cost is linear in the text it read and it holds no more
//! than one small entry per anchor. A syntax error ends the scan quietly: serde_yaml stops at
//! the same event, and reports it better.

use std::collections::HashMap;
use std::ffi::CStr;
use std::mem::MaybeUninit;

use unsafe_libyaml as unsafe_sys;

use crate::error::ConfigError;

/// Deepest nesting of lists and mappings. A config needs about 6 (`routes`, an entry, `match`,
/// `vars`, a value); JSON written by tools stays well under this too.
pub const MAX_DEPTH: usize = 64;
/// Aliases (`*name`) in one config.
pub const MAX_ALIASES: usize = 10_000;
/// Nodes that all aliases together stand for, once expanded.
pub const MAX_ALIAS_NODES: u64 = 100_000;
/// Bytes of tree that anchors (a copy of each anchored node) and aliases (a copy per alias)
/// may add together: a config has no use for more, and the largest text allowed by default
/// (4 MiB) builds a tree of about this size.
pub const MAX_COPY_COST: u64 = 16 << 20;
/// What one node costs in the tree, beyond a scalar's bytes (a `tree::Node` and its share of
/// the list holding it).
const NODE_COST: u64 = 48;

/// Refuses `text` when it nests too deeply or its aliases expand too far. The error names the
/// line (1-based) of the offending event.
pub(crate) fn check(text: &str) -> Result<(), ConfigError> {
    let mut parser = Parser::new(text.as_bytes(), false);
    let mut scan = Scan::default();
    while let Some(event) = parser.next() {
        scan.event(&event)?;
        if event.is_stream_end() {
            break;
        }
    }
    Ok(())
}

/// What the scan keeps: open collections, and each anchor's expanded size.
#[derive(Default)]
pub(crate) struct Scan {
    /// Per open collection: its anchor (if any) and the node count and cost when it opened.
    open: Vec<(Option<Vec<u8>>, Size)>,
    /// The document so far, aliases counted at their expanded size.
    total: Size,
    /// Expanded size of each anchored node, by anchor name (`None` while the node is still open:
    /// an alias inside its own anchor would be infinite).
    anchors: HashMap<Vec<u8>, Option<Size>>,
    aliases: usize,
    alias_nodes: u64,
    /// Bytes of tree that anchors and aliases copy (see [`MAX_COPY_COST`]).
    copied: u64,
}

/// A node's size once built: nodes, and bytes of tree.
#[derive(Default, Clone, Copy)]
struct Size {
    nodes: u64,
    cost: u64,
}

impl Size {
    fn since(self, start: Size) -> Size {
        Size {
            nodes: self.nodes - start.nodes,
            cost: self.cost - start.cost,
        }
    }
}

impl Scan {
    pub(crate) fn event(&mut self, event: &Event) -> Result<(), ConfigError> {
        let line = event.line;
        match &event.kind {
            Kind::Scalar { anchor, len, .. } => {
                let size = Size {
                    nodes: 1,
                    cost: NODE_COST + *len as u64,
                };
                self.total.nodes += 1;
                self.total.cost += size.cost;
                if let Some(a) = anchor {
                    self.anchors.insert(a.clone(), Some(size));
                    self.copy(line, size.cost, || format!("anchor &{}", shown(a)))?;
                }
            }
            Kind::Start { anchor, .. } => {
                self.total.nodes += 1;
                self.total.cost += NODE_COST;
                if self.open.len() >= MAX_DEPTH {
                    return Err(refused(
                        line,
                        format!(
                            "lists and mappings nest more than {MAX_DEPTH} deep; a config needs \
                             far fewer levels"
                        ),
                    ));
                }
                if let Some(a) = anchor {
                    self.anchors.insert(a.clone(), None);
                }
                let mut start = self.total;
                start.nodes -= 1;
                start.cost -= NODE_COST;
                self.open.push((anchor.clone(), start));
            }
            Kind::End => {
                if let Some((Some(a), start)) = self.open.pop() {
                    let size = self.total.since(start);
                    self.copy(line, size.cost, || format!("anchor &{}", shown(&a)))?;
                    self.anchors.insert(a, Some(size));
                }
            }
            Kind::Alias(name) => {
                self.aliases += 1;
                let shown = shown(name);
                if self.aliases > MAX_ALIASES {
                    return Err(refused(
                        line,
                        format!(
                            "more than {MAX_ALIASES} aliases (`*name`); write the values out, or \
                             generate the config"
                        ),
                    ));
                }
                let expanded = match self.anchors.get(name.as_slice()) {
                    Some(Some(size)) => *size,
                    Some(None) => {
                        return Err(refused(
                            line,
                            format!("alias *{shown} is inside the node it names (`&{shown}`)"),
                        ))
                    }
                    // An unknown anchor: serde_yaml reports it, with its position.
                    None => Size {
                        nodes: 1,
                        cost: NODE_COST,
                    },
                };
                let size = expanded.nodes;
                self.total.nodes += size;
                self.total.cost += expanded.cost;
                self.alias_nodes += size;
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Err(refused(
                        line,
                        format!(
                            "alias *{shown} (a node of {size} values) brings what aliases expand \
                             to over {MAX_ALIAS_NODES} values; a config has no use for anchors \
                             on this scale: write the values out"
                        ),
                    ));
                }
                self.copy(line, expanded.cost, || format!("alias *{shown}"))?;
            }
            Kind::DocumentStart | Kind::Other => {}
        }
        Ok(())
    }
}

impl Scan {
    /// Counts a copy of `cost` bytes of tree (an anchored node, or an alias's expansion).
    fn copy(&mut self, line: u64, cost: u64, what: impl Fn() -> String) -> Result<(), ConfigError> {
        self.copied += cost;
        if self.copied > MAX_COPY_COST {
            return Err(refused(
                line,
                format!(
                    "{} brings what anchors and aliases copy over {} MiB (a copy of each \
                     anchored node, one more per alias); a config has no use for anchors on this \
                     scale: write the values out",
                    what(),
                    MAX_COPY_COST >> 20
                ),
            ));
        }
        Ok(())
    }
}

fn shown(name: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(name)
}

fn refused(line: u64, what: String) -> ConfigError {
    ConfigError::new("", format!("refused before parsing: {what} (line {line})"))
}

/// One libyaml event, reduced to what the scan (and [`crate::tree`]) needs.
pub(crate) struct Event {
    pub kind: Kind,
    /// 1-based line where the event starts.
    pub line: u64,
}

pub(crate) enum Kind {
    Scalar {
        anchor: Option<Vec<u8>>,
        /// The value's length in bytes (also when it is not copied out).
        len: usize,
        /// The value as text (empty unless the parser was asked for values; None when it is
        /// not UTF-8).
        value: Option<String>,
        /// Written plain (unquoted, not a block scalar): YAML resolves its type.
        plain: bool,
        tagged: bool,
    },
    Start {
        anchor: Option<Vec<u8>>,
        map: bool,
        tagged: bool,
    },
    End,
    Alias(Vec<u8>),
    DocumentStart,
    Other,
}

impl Event {
    pub(crate) fn is_stream_end(&self) -> bool {
        matches!(self.kind, Kind::Other) && self.line == u64::MAX
    }
}

/// libyaml's parser over a borrowed text. The parser keeps pointers to itself (its read
/// handler's data) and into the text, so it lives in a box that never moves, and the text
/// outlives it.
pub(crate) struct Parser<'a> {
    sys: Box<MaybeUninit<unsafe_sys::yaml_parser_t>>,
    _text: &'a [u8],
    /// Copy scalars' values out (for [`crate::tree`]); the scan alone does not need them.
    values: bool,
    /// Initialised (and so to be deleted).
    live: bool,
    done: bool,
}

impl<'a> Parser<'a> {
    pub(crate) fn new(text: &'a [u8], values: bool) -> Parser<'a> {
        let mut sys: Box<MaybeUninit<unsafe_sys::yaml_parser_t>> = Box::new(MaybeUninit::uninit());
        // SAFETY: the parser is initialised in place before any other call; the input pointer
        // and length describe `text`, which the lifetime keeps alive and unmoved for as long
        // as the parser exists; the box is never moved out of.
        let ok = unsafe {
            let p = sys.as_mut_ptr();
            if unsafe_sys::yaml_parser_initialize(p).fail {
                false
            } else {
                unsafe_sys::yaml_parser_set_encoding(p, unsafe_sys::YAML_UTF8_ENCODING);
                unsafe_sys::yaml_parser_set_input_string(p, text.as_ptr(), text.len() as u64);
                true
            }
        };
        Parser {
            sys,
            _text: text,
            values,
            live: ok,
            // Out of memory at initialisation: no scan (serde_yaml will fail the same way).
            done: !ok,
        }
    }

    /// The next event; None after the stream's end or a syntax error.
    pub(crate) fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let mut raw = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser was initialised (`done` is false); on success libyaml has filled
        // in the event, which is read according to its type and deleted exactly once.
        unsafe {
            if unsafe_sys::yaml_parser_parse(self.sys.as_mut_ptr(), raw.as_mut_ptr()).fail {
                self.done = true;
                return None;
            }
            let ev = raw.as_mut_ptr();
            let line = (*ev).start_mark.line + 1;
            let kind = match (*ev).type_ {
                unsafe_sys::YAML_SCALAR_EVENT => {
                    let s = &(*ev).data.scalar;
                    let value = if self.values && !s.value.is_null() {
                        let bytes = std::slice::from_raw_parts(s.value, s.length as usize);
                        std::str::from_utf8(bytes).ok().map(str::to_owned)
                    } else {
                        Some(String::new())
                    };
                    Kind::Scalar {
                        anchor: name(s.anchor),
                        len: s.length as usize,
                        value,
                        plain: s.style == unsafe_sys::YAML_PLAIN_SCALAR_STYLE,
                        tagged: !s.tag.is_null(),
                    }
                }
                unsafe_sys::YAML_SEQUENCE_START_EVENT => {
                    let s = &(*ev).data.sequence_start;
                    Kind::Start {
                        anchor: name(s.anchor),
                        map: false,
                        tagged: !s.tag.is_null(),
                    }
                }
                unsafe_sys::YAML_MAPPING_START_EVENT => {
                    let s = &(*ev).data.mapping_start;
                    Kind::Start {
                        anchor: name(s.anchor),
                        map: true,
                        tagged: !s.tag.is_null(),
                    }
                }
                unsafe_sys::YAML_DOCUMENT_START_EVENT => Kind::DocumentStart,
                unsafe_sys::YAML_SEQUENCE_END_EVENT | unsafe_sys::YAML_MAPPING_END_EVENT => {
                    Kind::End
                }
                unsafe_sys::YAML_ALIAS_EVENT => {
                    Kind::Alias(name((*ev).data.alias.anchor).unwrap_or_default())
                }
                _ => Kind::Other,
            };
            let end = (*ev).type_ == unsafe_sys::YAML_STREAM_END_EVENT;
            unsafe_sys::yaml_event_delete(ev);
            if end {
                self.done = true;
                return Some(Event {
                    kind: Kind::Other,
                    line: u64::MAX,
                });
            }
            Some(Event { kind, line })
        }
    }
}

/// An anchor's name, copied out of libyaml's NUL-terminated string.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives until the event is deleted.
unsafe fn name(p: *const u8) -> Option<Vec<u8>> {
    (!p.is_null()).then(|| CStr::from_ptr(p.cast()).to_bytes().to_vec())
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        if self.live {
            // SAFETY: initialised in `new`, deleted once, here.
            unsafe { unsafe_sys::yaml_parser_delete(self.sys.as_mut_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_with(text: &str) -> String {
        check(text).expect_err("refused").message
    }

    #[test]
    fn ordinary_configs_and_small_anchors_pass() {
        check(include_str!("../examples/design-contract.yaml")).unwrap();
        check(include_str!("../examples/minimal.yaml")).unwrap();
        let text = "h: &h { type: agi, interval: 2s }\npools:\n".to_string()
            + &"  - { name: p, health: *h }\n".repeat(500);
        check(&text).unwrap();
        // Syntax errors are serde_yaml's to report.
        check("a: [1, 2\nb: {").unwrap();
        check("").unwrap();
    }

    #[test]
    fn a_wide_alias_bomb_is_refused_at_its_line() {
        let text = format!(
            "x: &a [{}]\ny: [{}]\n",
            vec!["a"; 100_000].join(", "),
            vec!["*a"; 2_000].join(", ")
        );
        let started = std::time::Instant::now();
        let m = refused_with(&text);
        assert!(m.contains("alias *a") && m.ends_with("(line 2)"), "{m}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_deep_alias_bomb_and_too_many_aliases_are_refused() {
        // The "billion laughs": each level doubles the one before.
        let mut text = "a0: &a0 [x, x]\n".to_string();
        for i in 1..40 {
            text.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
        }
        assert!(refused_with(&text).contains("over 100000 values"));
        let many = format!("a: &a x\nb: [{}]\n", vec!["*a"; MAX_ALIASES + 1].join(","));
        assert!(refused_with(&many).contains("more than 10000 aliases"));
        assert!(refused_with("a: &a [1, *a]\n").contains("inside the node"));
    }

    /// One alias of a large string is one node: 10,000 of a 300 KB string (a 340 KB config)
    /// took 2.9 GB before the copies were counted in bytes (audit).
    #[test]
    fn aliases_of_a_large_string_are_refused_by_their_bytes() {
        let text = format!(
            "version: 1\nx: &a \"{}\"\ny: [{}]\n",
            "x".repeat(500_000),
            vec!["*a"; 40].join(", ")
        );
        let m = refused_with(&text);
        assert!(m.contains("alias *a") && m.contains("over 16 MiB"), "{m}");
        assert!(m.ends_with("(line 3)"), "{m}");
        // A few copies of it are not a bomb.
        let few = format!("x: &a \"{}\"\ny: [*a, *a]\n", "x".repeat(500_000));
        check(&few).unwrap();
    }

    /// Every anchored node is copied when it closes, aliased or not: 60 anchors nested over one
    /// list copied it 60 times (a 3.9 MB config took gigabytes; audit).
    #[test]
    fn nested_anchors_over_a_large_node_are_refused() {
        let nested = |anchors: usize| {
            let mut text = "x: ".to_string();
            for i in 0..60 {
                if i < anchors {
                    text.push_str(&format!("&n{i} "));
                }
                text.push('[');
            }
            text.push_str(&vec!["a"; 20_000].join(", "));
            text.push_str(&"]".repeat(60));
            text + "\n"
        };
        let m = refused_with(&nested(60));
        assert!(m.contains("anchor &n") && m.contains("over 16 MiB"), "{m}");
        // The same with a few anchors is an ordinary list.
        for anchors in [0, 3] {
            let text = nested(anchors);
            check(&text).unwrap();
            assert!(crate::tree::read(&text).unwrap().is_some(), "a tree");
        }
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        for text in [
            format!("x: {}", "{a: ".repeat(100_000)),
            format!("x: {}", "[".repeat(100_000)),
            format!("x:\n{}", "- ".repeat(100_000)),
        ] {
            let started = std::time::Instant::now();
            let m = refused_with(&text);
            assert!(m.contains("nest more than 64 deep"), "{m}");
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
        }
        let ok = format!("x: {}1{}", "[".repeat(60), "]".repeat(60));
        check(&ok).unwrap();
    }
}
