//! YAML text → [`Node`] tree, in one pass of libyaml's event parser that also applies the
//! bounds of [`crate::prescan`].
//!
//! serde_yaml would parse the text a second time after the pre-scan, and first into a list of
//! every event of the document, before building anything: for a large config (100,000 routes)
//! that was most of the load. Here each event goes straight into the tree.
//!
//! Only what this module resolves exactly as serde_yaml does is built here: untagged scalars
//! (null, booleans, integers that fit 64 bits, floats, strings, by serde_yaml's own rules),
//! lists, mappings and aliases of one document. Anything else (a tag, a syntax error, no or
//! several documents, an unknown anchor, a huge integer) gives `None`, and the caller reads the
//! text with serde_yaml as before, which then also writes the error. So both ways give the same
//! tree, and the test `fast_tree_is_serde_yamls_tree` holds them to it.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::error::ConfigError;
use crate::prescan::{Kind, Parser, Scan};
use crate::raw::Scalar;

/// The YAML tree as written: mappings keep their order and their duplicate keys (which are
/// reported by path, not as one error for the whole file as serde_yaml's `Value` would).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Leaf(Leaf),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A scalar: serde_yaml's [`Value`] without its collections, so that a node takes 40 bytes, not
/// 80 (a large config is mostly a list of small mappings of scalars).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Leaf {
    Null,
    Bool(bool),
    Number(serde_yaml::Number),
    String(String),
}

impl Leaf {
    pub(crate) fn to_value(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::Number(n) => Value::Number(n.clone()),
            Leaf::String(s) => Value::String(s.clone()),
        }
    }
}

impl Node {
    /// A key as text, without a copy when it is a string (the common case).
    pub(crate) fn key(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Node::Leaf(Leaf::String(s)) => Some(std::borrow::Cow::Borrowed(s)),
            _ => self.name().map(std::borrow::Cow::Owned),
        }
    }

    /// A key as text: strings as written, integers and booleans in their usual spelling.
    pub(crate) fn name(&self) -> Option<String> {
        match self {
            Node::Leaf(v) => Scalar::deserialize(v.to_value()).ok().map(|s| s.0),
            _ => None,
        }
    }

    /// The node as YAML flow text, for messages: `~`, `.nan`, `[a, b]`, `{a: 1}`.
    pub(crate) fn flow(&self) -> String {
        match self {
            Node::Leaf(Leaf::Null) => "~".into(),
            Node::Leaf(Leaf::Bool(b)) => b.to_string(),
            Node::Leaf(Leaf::Number(n)) => n.to_string(),
            Node::Leaf(Leaf::String(s)) => format!("{s:?}"),
            Node::Seq(items) => {
                let items: Vec<String> = items.iter().map(Node::flow).collect();
                format!("[{}]", items.join(", "))
            }
            Node::Map(entries) => {
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k.flow(), v.flow()))
                    .collect();
                format!("{{{}}}", entries.join(", "))
            }
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        match self {
            Node::Leaf(v) => v.to_value(),
            Node::Seq(items) => Value::Sequence(items.iter().map(Node::to_value).collect()),
            Node::Map(entries) => Value::Mapping(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_value(), v.to_value()))
                    .collect::<Mapping>(),
            ),
        }
    }
}

/// The tree of `text`; `Ok(None)` when serde_yaml must read it (see the module's comment);
/// an error when it is beyond the pre-scan's bounds.
pub(crate) fn read(text: &str) -> Result<Option<Node>, ConfigError> {
    let mut parser = Parser::new(text.as_bytes(), true);
    let mut scan = Scan::default();
    let mut build = Build::default();
    while let Some(event) = parser.next() {
        scan.event(&event)?;
        if event.is_stream_end() {
            return Ok(build.root.filter(|_| build.documents == 1));
        }
        if build.event(event.kind).is_none() {
            return Ok(None);
        }
    }
    // A syntax error: serde_yaml reports it.
    Ok(None)
}

#[derive(Default)]
struct Build {
    /// Open lists and mappings, innermost last.
    open: Vec<Open>,
    anchors: HashMap<Vec<u8>, Node>,
    root: Option<Node>,
    documents: usize,
}

struct Open {
    anchor: Option<Vec<u8>>,
    node: Node,
    /// A mapping's key read, its value not yet.
    key: Option<Node>,
}

impl Build {
    /// None: not for this module to read.
    fn event(&mut self, kind: Kind) -> Option<()> {
        match kind {
            Kind::DocumentStart => {
                self.documents += 1;
                (self.documents == 1).then_some(())
            }
            Kind::Scalar {
                anchor,
                len: _,
                value,
                plain,
                tagged,
            } => {
                if tagged {
                    return None;
                }
                let leaf = Node::Leaf(if plain {
                    resolve(value?)?
                } else {
                    Leaf::String(value?)
                });
                if let Some(a) = anchor {
                    self.anchors.insert(a, leaf.clone());
                }
                self.add(leaf)
            }
            Kind::Start {
                anchor,
                map,
                tagged,
            } => {
                if tagged {
                    return None;
                }
                self.open.push(Open {
                    anchor,
                    node: if map {
                        Node::Map(Vec::new())
                    } else {
                        Node::Seq(Vec::new())
                    },
                    key: None,
                });
                Some(())
            }
            Kind::End => {
                let open = self.open.pop()?;
                if open.key.is_some() {
                    return None;
                }
                if let Some(a) = open.anchor {
                    self.anchors.insert(a, open.node.clone());
                }
                self.add(open.node)
            }
            // The pre-scan bounds what aliases expand to.
            Kind::Alias(name) => {
                let node = self.anchors.get(&name)?.clone();
                self.add(node)
            }
            Kind::Other => Some(()),
        }
    }

    fn add(&mut self, node: Node) -> Option<()> {
        let Some(top) = self.open.last_mut() else {
            if self.root.is_some() {
                return None;
            }
            self.root = Some(node);
            return Some(());
        };
        match &mut top.node {
            Node::Seq(items) => items.push(node),
            Node::Map(entries) => match top.key.take() {
                None => top.key = Some(node),
                Some(key) => entries.push((key, node)),
            },
            Node::Leaf(_) => return None,
        }
        Some(())
    }
}

/// A plain scalar's value, as serde_yaml 0.9 resolves it for `deserialize_any`
/// (`visit_untagged_scalar`); None for integers beyond 64 bits, which serde_yaml hands to
/// `visit_u128`/`visit_i128` (refused).
fn resolve(v: String) -> Option<Leaf> {
    if v.is_empty() || matches!(v.as_str(), "null" | "Null" | "NULL" | "~") {
        return Some(Leaf::Null);
    }
    match v.as_str() {
        "true" | "True" | "TRUE" => return Some(Leaf::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Leaf::Bool(false)),
        _ => {}
    }
    // Most scalars of a config are words: nothing numeric can start with a letter other than
    // the float spellings `.inf`/`.nan` (which start with `.`), so skip the number parses.
    let first = v.as_bytes()[0];
    if first.is_ascii_alphabetic() || first == b'_' || first == b'/' || first == b'^' {
        return Some(Leaf::String(v));
    }
    if let Some(n) = unsigned::<u64>(&v, u64::from_str_radix) {
        return Some(Leaf::Number(n.into()));
    }
    if let Some(n) = negative::<i64>(&v, i64::from_str_radix) {
        return Some(Leaf::Number(n.into()));
    }
    if unsigned::<u128>(&v, u128::from_str_radix).is_some()
        || negative::<i128>(&v, i128::from_str_radix).is_some()
    {
        return None;
    }
    if !digits_but_not_number(&v) {
        if let Some(f) = float(&v) {
            return Some(Leaf::Number(f.into()));
        }
    }
    Some(Leaf::String(v))
}

// serde_yaml 0.9's `parse_unsigned_int`, `parse_negative_int`, `parse_f64` and
// `digits_but_not_number`, which it does not export.

type Radix<T> = fn(&str, u32) -> Result<T, std::num::ParseIntError>;

fn unsigned<T>(scalar: &str, from_str_radix: Radix<T>) -> Option<T> {
    let unpositive = scalar.strip_prefix('+').unwrap_or(scalar);
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(rest) = unpositive.strip_prefix(prefix) {
            if rest.starts_with(['+', '-']) {
                return None;
            }
            if let Ok(int) = from_str_radix(rest, radix) {
                return Some(int);
            }
        }
    }
    if unpositive.starts_with(['+', '-']) || digits_but_not_number(scalar) {
        return None;
    }
    from_str_radix(unpositive, 10).ok()
}

fn negative<T>(scalar: &str, from_str_radix: Radix<T>) -> Option<T> {
    for (prefix, radix) in [("-0x", 16), ("-0o", 8), ("-0b", 2)] {
        if let Some(rest) = scalar.strip_prefix(prefix) {
            if let Ok(int) = from_str_radix(&format!("-{rest}"), radix) {
                return Some(int);
            }
        }
    }
    if digits_but_not_number(scalar) {
        return None;
    }
    from_str_radix(scalar, 10).ok()
}

fn float(scalar: &str) -> Option<f64> {
    let unpositive = match scalar.strip_prefix('+') {
        Some(u) if u.starts_with(['+', '-']) => return None,
        Some(u) => u,
        None => scalar,
    };
    if let ".inf" | ".Inf" | ".INF" = unpositive {
        return Some(f64::INFINITY);
    }
    if let "-.inf" | "-.Inf" | "-.INF" = scalar {
        return Some(f64::NEG_INFINITY);
    }
    if let ".nan" | ".NaN" | ".NAN" = scalar {
        return Some(f64::NAN.copysign(1.0));
    }
    unpositive.parse::<f64>().ok().filter(|f| f.is_finite())
}

fn digits_but_not_number(scalar: &str) -> bool {
    // Leading zero(s) followed by digits is a string in YAML 1.2.
    let scalar = scalar.strip_prefix(['-', '+']).unwrap_or(scalar);
    scalar.len() > 1 && scalar.starts_with('0') && scalar[1..].bytes().all(|b| b.is_ascii_digit())
}

// ---- serde_yaml's way, for what the fast path leaves to it

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::Number(v.into())))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::Number(v.into())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::Number(v.into())))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::String(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::String(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::Null))
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf(Leaf::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
    /// serde_yaml hands a value with a custom tag (`!name value`) over as an enum; serde's own
    /// message for it was "invalid type: enum" (audit).
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Node, A::Error> {
        let (tag, _): (String, _) = data.variant()?;
        Err(de::Error::custom(format_args!(
            "the YAML tag `!{tag}` means nothing to agiproxy: remove it (values are written \
             without tags)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow(text: &str) -> Option<Node> {
        serde_yaml::from_str::<Node>(text).ok()
    }

    /// Wherever the fast path builds a tree, it is the one serde_yaml builds.
    #[test]
    fn fast_tree_is_serde_yamls_tree() {
        let scalars = [
            "x",
            "",
            "~",
            "null",
            "Null",
            "NULL",
            "nil",
            "true",
            "True",
            "TRUE",
            "yes",
            "false",
            "off",
            "0",
            "1",
            "-1",
            "+1",
            "007",
            "-007",
            "+007",
            "0x1F",
            "0x",
            "-0x1F",
            "+0x1F",
            "0o17",
            "-0o17",
            "0b101",
            "-0b101",
            "0x+1",
            "1.5",
            "-1.5",
            "+1.5",
            "1e3",
            "1E-3",
            ".5",
            "5.",
            ".inf",
            "-.Inf",
            "+.INF",
            ".nan",
            "1_000",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999999999999999999999999",
            "1.0e400",
            "0.0",
            "-0",
            "+-1",
            "--1",
            "2s",
            "250ms",
            "10.0.0.1:4573",
            "^/?ivr/",
            "é",
            "a b",
            "'quoted'",
            "\"7\"",
            "\"\\x41\\u00e9\"",
            "'it''s'",
            "|\n  block\n",
            ">\n  folded\n  text\n",
        ];
        for s in scalars {
            for text in [format!("k: {s}\n"), format!("- {s}\n"), format!("{s}\n")] {
                let fast = read(&text).unwrap();
                if let Some(fast) = fast {
                    // NaN is not equal to itself: compare as written out.
                    assert_eq!(
                        format!("{fast:?}"),
                        format!("{:?}", slow(&text).expect("serde_yaml reads it")),
                        "{text:?}"
                    );
                }
            }
        }
        for text in [
            include_str!("../examples/design-contract.yaml"),
            include_str!("../examples/minimal.yaml"),
            "a: &x { b: [1, 2, &y c] }\nd: *x\ne: [*y, *x]\n",
            "a: 1\na: 2\n? [x, y]\n: z\n",
            "[1, {a: b}, [], {}]",
            "--- \nx: 1\n...\n",
            "# nothing but a comment\n",
            "k: !!str 1\n",
            "k: !custom x\n",
            "a: 1\n---\nb: 2\n",
            "a: [1, 2\n",
            "a: *nowhere\n",
        ] {
            let fast = read(text).unwrap();
            match (fast, slow(text)) {
                (Some(fast), Some(slow)) => assert_eq!(fast, slow, "{text:?}"),
                (Some(fast), None) => panic!("{text:?}: serde_yaml refuses what gave {fast:?}"),
                (None, _) => {}
            }
        }
        // The usual config takes the fast path.
        assert!(read(include_str!("../examples/design-contract.yaml"))
            .unwrap()
            .is_some());
        assert!(read("k: !!str 1\n").unwrap().is_none());
        assert!(read("a: 1\n---\nb: 2\n").unwrap().is_none());
    }

    #[test]
    fn the_prescans_bounds_hold() {
        let deep = format!("x: {}", "[".repeat(100));
        assert!(read(&deep)
            .unwrap_err()
            .message
            .contains("nest more than 64 deep"));
    }
}
