//! YAML text → [`RawConfig`], reporting every structural mistake (unknown key, wrong type).
//!
//! serde stops at the first mistake. When the whole file does not deserialize, each top-level
//! section and each entry of `listeners`, `routes` and `pools` is deserialized again on its own,
//! straight from the text (the rest skipped), so every broken piece is reported, each with the
//! path and line/column serde_yaml gives it. Within one piece only its first mistake is found.
//!
//! Before any of it, [`crate::prescan`] refuses text that nests too deeply or whose aliases
//! expand too far. Each piece read again costs a parse of the whole text, so only as many are
//! read again as [`REPARSE_BYTES`] allows (4,000 broken routes once took 31 s); the other broken
//! pieces are still reported, from the parsed value, without their line.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use crate::error::{from_yaml, ConfigError};
use crate::raw::{
    RawConfig, RawControl, RawDns, RawLimits, RawListener, RawPool, RawRoute, RawTimeouts, Scalar,
    TOP_LEVEL_KEYS,
};

/// Text parsed again, in all, to locate broken pieces.
const REPARSE_BYTES: usize = 8 << 20;

pub(crate) fn parse(text: &str) -> Result<RawConfig, Vec<ConfigError>> {
    crate::prescan::check(text).map_err(|e| vec![e])?;
    let first = match serde_yaml::from_str::<RawConfig>(text) {
        Ok(raw) => return Ok(raw),
        Err(e) => e,
    };
    // Not YAML, not a mapping, or refused as a `Value` (e.g. a duplicate key): the one error
    // is all there is to say.
    let Ok(Value::Mapping(top)) = serde_yaml::from_str::<Value>(text) else {
        return Err(vec![from_yaml(&first)]);
    };

    let mut errors: Vec<ConfigError> = Vec::new();
    let mut reparses = REPARSE_BYTES / text.len().max(1);
    for (key, value) in &top {
        let Some(key) = key.as_str() else { continue };
        if !TOP_LEVEL_KEYS.contains(&key) {
            // Found here rather than by a probe: serde_yaml would place it at line 1, column 1.
            let at = top_level_line(text, key)
                .map(|line| format!(" (line {line}, column 1)"))
                .unwrap_or_default();
            errors.push(ConfigError::new(
                "",
                format!(
                    "unknown field `{key}`, expected one of {}{at}",
                    TOP_LEVEL_KEYS
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            continue;
        }
        let pieces: Vec<(Piece, Option<ConfigError>)> = match (key, value) {
            // Entries are screened on the parsed value first (cheap), and only broken ones are
            // read again from the text for their location: a parse per entry would be
            // quadratic in a config with thousands of routes.
            ("listeners" | "routes" | "pools", Value::Sequence(entries)) => entries
                .iter()
                .enumerate()
                .filter_map(|(i, entry)| {
                    entry_error(key, entry).map(|e| {
                        let e = ConfigError::new(format!("{key}[{i}]"), e.to_string());
                        (Piece::Entry(key, i), Some(e))
                    })
                })
                .collect(),
            _ => vec![(Piece::Section(key), section_error(key, value))],
        };
        for (piece, unlocated) in pieces {
            let e = if reparses > 0 {
                reparses -= 1;
                let de = serde_yaml::Deserializer::from_str(text);
                piece.deserialize(de).err().map(|e| from_yaml(&e))
            } else {
                unlocated
            };
            if let Some(e) = e.filter(|e| !errors.contains(e)) {
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        // The pieces all deserialize, so the mistake is in how they fit together; never lose it.
        errors.push(from_yaml(&first));
    }
    Err(errors)
}

/// Why an entry of a top-level list does not deserialize with its real type, if it does not.
fn entry_error(key: &str, entry: &Value) -> Option<serde_yaml::Error> {
    use serde::Deserialize;
    match key {
        "listeners" => RawListener::deserialize(entry).err(),
        "routes" => RawRoute::deserialize(entry).err(),
        "pools" => RawPool::deserialize(entry).err(),
        _ => None,
    }
}

/// Why a top-level section does not deserialize with its real type (no line: read from the
/// parsed value), if it does not.
fn section_error(key: &str, value: &Value) -> Option<ConfigError> {
    use serde::Deserialize;
    let e = match key {
        "version" => Option::<Scalar>::deserialize(value).err(),
        "listeners" => Option::<Vec<RawListener>>::deserialize(value).err(),
        "timeouts" => Option::<RawTimeouts>::deserialize(value).err(),
        "limits" => Option::<RawLimits>::deserialize(value).err(),
        "routes" => Option::<Vec<RawRoute>>::deserialize(value).err(),
        "pools" => Option::<Vec<RawPool>>::deserialize(value).err(),
        "control" => Option::<RawControl>::deserialize(value).err(),
        "dns" => Option::<RawDns>::deserialize(value).err(),
        _ => None,
    }?;
    Some(ConfigError::new(key, e.to_string()))
}

/// One part of the file to deserialize on its own.
#[derive(Clone, Copy)]
enum Piece<'a> {
    /// A top-level key and its whole value.
    Section(&'a str),
    /// One entry of a top-level list.
    Entry(&'a str, usize),
}

impl<'de> DeserializeSeed<'de> for Piece<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Piece<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of config sections")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (wanted, entry) = match self {
            Piece::Section(key) => (key, None),
            Piece::Entry(key, i) => (key, Some(i)),
        };
        while let Some(key) = map.next_key::<Scalar>()? {
            if key.0 != wanted {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match entry {
                Some(index) => map.next_value_seed(EntryOf { key: wanted, index })?,
                None => section(wanted, &mut map)?,
            }
        }
        Ok(())
    }
}

/// Deserializes one top-level section with its real type.
fn section<'de, A: MapAccess<'de>>(key: &str, map: &mut A) -> Result<(), A::Error> {
    match key {
        "version" => map.next_value::<Option<Scalar>>().map(drop),
        "listeners" => map.next_value::<Option<Vec<RawListener>>>().map(drop),
        "timeouts" => map.next_value::<Option<RawTimeouts>>().map(drop),
        "limits" => map.next_value::<Option<RawLimits>>().map(drop),
        "routes" => map.next_value::<Option<Vec<RawRoute>>>().map(drop),
        "pools" => map.next_value::<Option<Vec<RawPool>>>().map(drop),
        "control" => map.next_value::<Option<RawControl>>().map(drop),
        "dns" => map.next_value::<Option<RawDns>>().map(drop),
        _ => map.next_value::<IgnoredAny>().map(drop),
    }
}

/// Walks a top-level list, deserializing only entry `index` with its real type.
struct EntryOf<'a> {
    key: &'a str,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for EntryOf<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntryOf<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.key)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = if i == self.index {
                match self.key {
                    "listeners" => seq.next_element::<RawListener>()?.is_some(),
                    "routes" => seq.next_element::<RawRoute>()?.is_some(),
                    "pools" => seq.next_element::<RawPool>()?.is_some(),
                    _ => seq.next_element::<IgnoredAny>()?.is_some(),
                }
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// The 1-based line where a top-level `key:` is written, if it can be found.
fn top_level_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
                .iter()
                .any(|k| {
                    line.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with(':'))
                })
        })
        .map(|i| i + 1)
}
