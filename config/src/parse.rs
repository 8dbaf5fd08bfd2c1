//! YAML text → [`RawConfig`], leniently: every unknown key and every value of the wrong type
//! is reported, and the rest of the file is still read, so that validation checks the values
//! in the same run. One `check` shows every mistake of a file.
//!
//! The file is parsed once into a YAML tree ([`crate::tree`]), which has no positions; the line
//! and column of each reported path are found by [`locate`], which reads the text again up to
//! that path (once per reported error, at most [`MAX_LOCATED`] of them).

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess};
use serde::de::{SeqAccess, Visitor};

use crate::error::{from_yaml, ConfigError};
use crate::raw::RawRollout;
use crate::raw::{
    DurationText, OrderedMap, RawBackend, RawBalance, RawConfig, RawControl, RawControlTls, RawDns,
    RawHealth, RawHealthKind, RawKeepalive, RawLimits, RawListener, RawMatch, RawMode, RawPassive,
    RawPeerTls, RawPool, RawProxyProtocol, RawReplacePrefix, RawRewrite, RawRoute, RawScript,
    RawSplit, RawTimeouts, Scalar,
};
use crate::tree::{Leaf, Node};

/// Errors given a line and column; beyond, each search would read the file again for little.
const MAX_LOCATED: usize = 200;

/// Text read again, in all, to locate errors (each search reads the text up to its path):
/// a large file gets fewer located errors, not a long wait.
const LOCATE_BYTES: usize = 8 << 20;

/// The file read as far as its structure allows, and what did not fit.
pub(crate) struct Parsed {
    pub raw: RawConfig,
    pub structural: Vec<Structural>,
}

/// An unknown key, or a value of the wrong type (left out of the [`RawConfig`]).
pub(crate) struct Structural {
    /// The mapping with the unknown key, or the refused value.
    at: Vec<Seg>,
    unknown_key: Option<String>,
    message: String,
}

/// Not YAML at all (or beyond the bounds of [`crate::prescan`]): the one error there is to say.
pub(crate) fn parse(text: &str) -> Result<Parsed, ConfigError> {
    let tree = match crate::tree::read(text)? {
        Some(tree) => tree,
        None => {
            crate::prescan::check(text)?;
            serde_yaml::from_str(text).map_err(|e| from_yaml(&e))?
        }
    };
    let mut walk = Walk::default();
    let raw = match &tree {
        Node::Leaf(Leaf::Null) => RawConfig::default(),
        v => RawConfig::lenient(v, &mut walk).unwrap_or_default(),
    };
    for s in walk.found.iter_mut().filter(|s| s.at.is_empty()) {
        // A snippet pasted alone (a list of routes) said only "expected a
        // mapping" (walkthrough): say what the top level holds.
        if s.message.starts_with("invalid type: sequence") {
            s.message.push_str(
                "; a config is a mapping (version:, listeners:, routes:, pools:, ...): \
                 this is a list, e.g. routes written without `routes:` above them",
            );
        }
    }
    Ok(Parsed {
        raw,
        structural: walk.found,
    })
}

/// Every error of a file: its structural mistakes, and the validation errors that are not
/// consequences of them (a field refused for its type is not also "missing"), each with its
/// line and column where it can be found, in file order.
pub(crate) fn report(
    text: &str,
    structural: Vec<Structural>,
    validation: Vec<ConfigError>,
) -> Vec<ConfigError> {
    let mut all: Vec<(Vec<Seg>, bool, ConfigError)> = Vec::new();
    for s in &structural {
        all.push((
            s.at.clone(),
            s.unknown_key.is_some(),
            ConfigError::new(render(&s.at), s.message.clone()),
        ));
        if let Some(key) = &s.unknown_key {
            // Located at the key itself.
            let last = all.last_mut().expect("just pushed");
            last.0.push(Seg::Key(key.clone()));
        }
    }
    for e in validation {
        if !structural.iter().any(|s| s.explains(&e)) {
            all.push((segments(&e.path), false, e));
        }
    }
    let budget = MAX_LOCATED.min(LOCATE_BYTES / text.len().max(1));
    let mut located: Vec<((u8, usize), ConfigError)> = all
        .into_iter()
        .enumerate()
        .map(|(i, (segs, key, mut e))| {
            let at = if i < budget {
                locate_nearest(text, &segs, key)
            } else {
                None
            };
            if let Some((line, column)) = at {
                e.message = format!("{} (line {line}, column {column})", e.message);
            }
            // Errors about the file as a whole (nothing to point at) first; those past the
            // budget last, so that the ones kept (see `MAX_ERRORS`) are the located ones.
            let order = match at {
                Some((line, _)) => (1, line),
                None if i < budget => (0, 0),
                None => (2, 0),
            };
            (order, e)
        })
        .collect();
    // File order by line (within a line, as found).
    located.sort_by_key(|(order, _)| *order);
    let more = located.len().saturating_sub(crate::MAX_ERRORS);
    let mut errors: Vec<ConfigError> = located
        .into_iter()
        .take(crate::MAX_ERRORS)
        .map(|(_, e)| e)
        .collect();
    if more > 0 {
        errors.push(ConfigError::new(
            "",
            format!(
                "… and {} more error{}",
                crate::thousands(more),
                if more == 1 { "" } else { "s" }
            ),
        ));
    }
    errors
}

impl Structural {
    /// Whether a validation error follows from this mistake: anything at or under a refused
    /// value; beside an unknown key (likely a misspelling), what is said of its mapping as a
    /// whole (`has no target`) and of its fields that are "missing".
    fn explains(&self, e: &ConfigError) -> bool {
        let at = render(&self.at);
        // A rollout is read whole: refused, it leaves its route without a
        // target, which is no second mistake (every rollout error came
        // with a spurious "has no target").
        if let Some(route) = at.find(".rollout").map(|i| &at[..i]) {
            let rest = &at[route.len() + ".rollout".len()..];
            if (rest.is_empty() || rest.starts_with(['.', '[']))
                && e.path == route
                && e.message.starts_with("has no target")
            {
                return true;
            }
        }
        match &self.unknown_key {
            None => {
                at.is_empty()
                    || e.path == at
                    || e.path.starts_with(&format!("{at}."))
                    || e.path.starts_with(&format!("{at}["))
            }
            Some(_) => {
                e.path == at
                    || e.message.starts_with("missing")
                        && e.path
                            .strip_prefix(at.as_str())
                            .is_some_and(|rest| rest.starts_with('.') && !rest[1..].contains('.'))
            }
        }
    }
}

/// One step of a config path: `routes[2].match` is `routes`, `2`, `match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// `routes[2].match.args.1`, as validation writes paths.
fn render(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The steps of a path as validation writes it (a key with a `.` or `[` in it is not found,
/// and the error is located at its parent instead).
fn segments(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Seg::Key(key.to_string()));
        }
        while let Some((index, after)) = rest.split_once(']') {
            match index.parse() {
                Ok(i) => out.push(Seg::Index(i)),
                Err(_) => return out,
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    out
}

/// Reads a YAML tree into the raw structs, reporting what does not fit instead of stopping.
#[derive(Default)]
struct Walk {
    path: Vec<Seg>,
    found: Vec<Structural>,
}

impl Walk {
    fn refuse(&mut self, message: String) {
        self.found.push(Structural {
            at: self.path.clone(),
            unknown_key: None,
            message,
        });
    }

    fn wrong_type(&mut self, v: &Node, expected: &str) {
        self.refuse(format!(
            "invalid type: {}, expected {expected}",
            Unexpected(v)
        ));
    }

    fn leaf<T: DeserializeOwned>(&mut self, v: &Node) -> Option<T> {
        // A mapping read whole by serde (a rollout) becomes serde_yaml's
        // `Value` first, where a later duplicate key silently wins: a
        // rollback followed by `overrides: []` was dropped (audit).
        if !matches!(v, Node::Leaf(_)) && self.duplicate_keys(v) {
            return None;
        }
        let parsed = match v {
            Node::Leaf(leaf) => T::deserialize(leaf.to_value()),
            _ => T::deserialize(&v.to_value()),
        };
        match parsed {
            Ok(t) => Some(t),
            Err(e) => {
                self.refuse(e.to_string());
                None
            }
        }
    }

    /// Reports every key repeated in a mapping under `v`; true if any is.
    fn duplicate_keys(&mut self, v: &Node) -> bool {
        let mut found = false;
        match v {
            Node::Leaf(_) => {}
            Node::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.path.push(Seg::Index(i));
                    found |= self.duplicate_keys(item);
                    self.path.pop();
                }
            }
            Node::Map(map) => {
                // By each key's flow form (`"1"` and `1` differ, as in YAML),
                // in a set: a scan of the earlier keys made a rollout of
                // 100,000 keys cost 5 billion comparisons.
                let mut seen = std::collections::HashSet::with_capacity(map.len());
                for (key, value) in map {
                    let name = key.key().map_or_else(|| key.flow(), |n| n.into_owned());
                    self.path.push(Seg::Key(name.clone()));
                    if !seen.insert(key.flow()) {
                        self.refuse(format!("duplicate field `{name}`"));
                        found = true;
                    }
                    found |= self.duplicate_keys(value);
                    self.path.pop();
                }
            }
        }
        found
    }

    fn mapping<'v>(&mut self, v: &'v Node) -> Option<&'v [(Node, Node)]> {
        match v {
            Node::Map(m) => Some(m),
            _ => {
                self.wrong_type(v, "a mapping");
                None
            }
        }
    }

    fn unknown_keys(&mut self, map: &[(Node, Node)], known: &[&str]) {
        for (i, (key, _)) in map.iter().enumerate() {
            let name = match key.key() {
                Some(name) if known.contains(&name.as_ref()) => {
                    if map[..i].iter().any(|(k, _)| k.key() == Some(name.clone())) {
                        self.path.push(Seg::Key(name.to_string()));
                        self.refuse(format!("duplicate field `{name}`"));
                        self.path.pop();
                    }
                    continue;
                }
                Some(name) => name.into_owned(),
                // A key YAML gives no name (`~`, `.nan`, a list): as written, in flow style.
                None => key.flow(),
            };
            let expected = match known {
                [one] => format!("`{one}`"),
                [a, b] => format!("`{a}` or `{b}`"),
                _ => format!(
                    "one of {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            self.found.push(Structural {
                at: self.path.clone(),
                unknown_key: Some(name.clone()),
                message: format!("unknown field `{name}`, expected {expected}"),
            });
        }
    }

    /// An optional field: absent and `~` are both "not set".
    fn field<T: Lenient>(&mut self, map: &[(Node, Node)], key: &str) -> Option<T> {
        let (_, v) = map.iter().find(|(k, _)| k.key().as_deref() == Some(key))?;
        if matches!(v, Node::Leaf(Leaf::Null)) {
            return None;
        }
        self.path.push(Seg::Key(key.to_string()));
        let out = T::lenient(v, self);
        self.path.pop();
        out
    }
}

/// Read from a YAML tree, reporting mistakes to the [`Walk`].
trait Lenient: Sized {
    /// None: refused (and reported).
    fn lenient(v: &Node, walk: &mut Walk) -> Option<Self>;

    /// What stands in for a refused list entry, so the entries after it keep their index.
    fn placeholder() -> Option<Self> {
        None
    }
}

macro_rules! leaves {
    ($($t:ty),* $(,)?) => {$(
        impl Lenient for $t {
            fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
                walk.leaf(v)
            }
        }
    )*};
}

// A rollout is read whole by serde: its first mistake is reported, at `routes[N].rollout`.
leaves!(
    String,
    u64,
    bool,
    RawMode,
    RawBalance,
    RawHealthKind,
    RawRollout
);

impl Lenient for Scalar {
    fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
        walk.leaf(v)
    }
    fn placeholder() -> Option<Self> {
        Some(Scalar::default())
    }
}

impl Lenient for DurationText {
    fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
        walk.leaf(v)
    }
}

impl<T: Lenient> Lenient for Box<T> {
    fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
        T::lenient(v, walk).map(Box::new)
    }
}

impl<T: Lenient> Lenient for Vec<T> {
    fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
        let Node::Seq(items) = v else {
            walk.wrong_type(v, "a sequence");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            walk.path.push(Seg::Index(i));
            out.extend(T::lenient(item, walk).or_else(T::placeholder));
            walk.path.pop();
        }
        Some(out)
    }
}

impl<V: Lenient> Lenient for OrderedMap<V> {
    fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
        let Node::Map(map) = v else {
            walk.wrong_type(v, "a mapping of names to values, e.g. { name: value }");
            return None;
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let key: Scalar = walk.leaf(key)?;
            walk.path.push(Seg::Key(key.0.clone()));
            if let Some(value) = V::lenient(value, walk) {
                entries.push((key, value));
            }
            walk.path.pop();
        }
        Some(OrderedMap(entries))
    }
}

/// A raw struct: its fields and the keys they are written as.
macro_rules! structs {
    ($($t:ident { $($field:ident: $key:literal),* $(,)? })*) => {$(
        impl Lenient for $t {
            fn lenient(v: &Node, walk: &mut Walk) -> Option<Self> {
                let map = walk.mapping(v)?;
                walk.unknown_keys(map, &[$($key),*]);
                Some($t { $($field: walk.field(map, $key)),* })
            }
            fn placeholder() -> Option<Self> {
                Some($t::default())
            }
        }
    )*};
}

structs! {
    RawConfig {
        version: "version", listeners: "listeners", timeouts: "timeouts", limits: "limits",
        routes: "routes", pools: "pools", control: "control", dns: "dns",
        tcp_keepalive: "tcp_keepalive",
    }
    RawKeepalive { enabled: "enabled", idle: "idle", interval: "interval", probes: "probes" }
    RawListener { name: "name", address: "address", proxy_protocol: "proxy_protocol" }
    RawProxyProtocol { from: "from" }
    RawTimeouts {
        header: "header", budget: "budget", connect: "connect",
        first_command: "first_command", next_command: "next_command", drain: "drain",
    }
    RawLimits {
        max_sessions: "max_sessions", max_header_bytes: "max_header_bytes",
        max_header_lines: "max_header_lines", max_config_bytes: "max_config_bytes",
        max_headers_per_peer: "max_headers_per_peer", max_header_memory: "max_header_memory",
    }
    RawRoute {
        name: "name", matcher: "match", pool: "pool", split: "split", split_key: "split_key",
        rewrite: "rewrite", set: "set", mode: "mode", forward_hangup: "forward_hangup",
        timeouts: "timeouts", rollout: "rollout",
    }
    RawMatch { script: "script", query: "query", args: "args", vars: "vars", source: "source" }
    RawScript { exact: "exact", prefix: "prefix", regex: "regex" }
    RawSplit { pool: "pool", weight: "weight" }
    RawRewrite { strip_prefix: "strip_prefix", replace_prefix: "replace_prefix" }
    RawReplacePrefix { from: "from", to: "to" }
    RawPool {
        name: "name", balance: "balance", hash_key: "hash_key", backends: "backends",
        max_sessions: "max_sessions", passive: "passive", health: "health",
        slow_start: "slow_start", max_ejection_percent: "max_ejection_percent", dns: "dns",
    }
    RawBackend { address: "address", srv: "srv", weight: "weight", max_sessions: "max_sessions" }
    RawPassive {
        backoff: "backoff", max_backoff: "max_backoff",
        consecutive_failures: "consecutive_failures",
    }
    RawHealth {
        kind: "type", script: "script", expect: "expect", interval: "interval",
        timeout: "timeout", jitter: "jitter", rise: "rise", fall: "fall",
    }
    RawDns {
        nameservers: "nameservers", search: "search", min_ttl: "min_ttl", max_ttl: "max_ttl",
        timeout: "timeout",
    }
    RawControl {
        enabled: "enabled", address: "address", socket: "socket", token_file: "token_file",
        token_env: "token_env", tls: "tls", max_body_bytes: "max_body_bytes",
        request_timeout: "request_timeout",
    }
    RawControlTls { cert: "cert", key: "key", client_ca: "client_ca", peers: "peers" }
    RawPeerTls { ca: "ca", cert: "cert", key: "key", server_name: "server_name" }
}

/// A YAML value as serde names it in `invalid type` messages.
struct Unexpected<'a>(&'a Node);

impl fmt::Display for Unexpected<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self.0 {
            Node::Seq(_) => return f.write_str("sequence"),
            Node::Map(_) => return f.write_str("map"),
            Node::Leaf(v) => v,
        };
        match v {
            Leaf::Null => f.write_str("unit"),
            Leaf::Bool(b) => write!(f, "boolean `{b}`"),
            Leaf::Number(n) if n.is_f64() => write!(f, "floating point `{n}`"),
            Leaf::Number(n) => write!(f, "integer `{n}`"),
            Leaf::String(s) => write!(f, "string {s:?}"),
        }
    }
}

/// The line and column of `segs`, or of its nearest ancestor that can be found (a missing
/// field is located at the mapping it is missing from). Nothing for the file as a whole.
fn locate_nearest(text: &str, segs: &[Seg], key: bool) -> Option<(usize, usize)> {
    (1..=segs.len())
        .rev()
        .find_map(|n| locate(text, &segs[..n], key && n == segs.len()))
}

/// Marks the place found: serde_yaml gives an error raised by a visitor the position of the
/// YAML node being read.
const HERE: &str = "\u{1}here";

/// The line and column of the value at `segs` (of its key, when `key`).
fn locate(text: &str, segs: &[Seg], key: bool) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(text);
    match (Find { segs, key }).deserialize(de) {
        Err(e) if e.to_string().contains(HERE) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

/// Walks the text down `segs` and fails at the node it names (see [`HERE`]).
struct Find<'a> {
    segs: &'a [Seg],
    key: bool,
}

impl Find<'_> {
    fn here<E: de::Error>(&self) -> Result<(), E> {
        if self.segs.is_empty() {
            Err(E::custom(HERE))
        } else {
            Ok(())
        }
    }
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.here()?;
        let (Seg::Key(want), rest) = self.segs.split_first().expect("not empty") else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let at_key = self.key && rest.is_empty();
        while let Some(found) = map.next_key_seed(KeyIs { want, at_key })? {
            if found {
                map.next_value_seed(Find {
                    segs: rest,
                    key: self.key,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.here()?;
        let (Seg::Index(want), rest) = self.segs.split_first().expect("not empty") else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut i = 0;
        loop {
            let more = if i == *want {
                seq.next_element_seed(Find {
                    segs: rest,
                    key: self.key,
                })?
                .is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
}

/// A mapping key: whether it is `want` (failing at it, when it is the place sought).
struct KeyIs<'a> {
    want: &'a str,
    at_key: bool,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl KeyIs<'_> {
    fn is<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match key == self.want {
            true if self.at_key => Err(E::custom(HERE)),
            same => Ok(same),
        }
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.is(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_and_join() {
        for path in [
            "routes[2].match.args.1",
            "pools[0].backends[1]",
            "timeouts",
            "",
        ] {
            assert_eq!(render(&segments(path)), path);
        }
    }

    #[test]
    fn values_and_keys_are_located() {
        let text = "version: 1\nroutes:\n  - name: a\n    pool: x\n  - { name: b, pool: y }\n";
        let at = |p: &str, key| locate(text, &segments(p), key);
        assert_eq!(at("routes[0].pool", false), Some((4, 11)));
        assert_eq!(at("routes[1].pool", false), Some((5, 22)));
        assert_eq!(at("routes[1].pool", true), Some((5, 16)));
        assert_eq!(at("routes[1].weight", false), None);
        assert_eq!(
            locate_nearest(text, &segments("routes[1].weight"), false),
            Some((5, 5))
        );
    }
}
