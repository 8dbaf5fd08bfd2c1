//! The config file as written: serde structs mirroring the YAML.
//!
//! Everything is optional here and values are kept as text where the YAML could hold
//! a number or a string, so that mistakes surface in validation (which reports all of
//! them, with fixes). `parse` fills these field by field from the YAML tree, so one
//! run reports every unknown key and wrong type too; the serde derives serve the
//! leaves and `Deserialize` users.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub version: Option<Scalar>,
    pub listeners: Option<Vec<RawListener>>,
    pub timeouts: Option<RawTimeouts>,
    pub limits: Option<RawLimits>,
    pub routes: Option<Vec<RawRoute>>,
    pub pools: Option<Vec<RawPool>>,
    pub control: Option<RawControl>,
    pub dns: Option<RawDns>,
    pub tcp_keepalive: Option<RawKeepalive>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeepalive {
    pub enabled: Option<bool>,
    pub idle: Option<DurationText>,
    pub interval: Option<DurationText>,
    pub probes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub proxy_protocol: Option<RawProxyProtocol>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxyProtocol {
    pub from: Option<Vec<Scalar>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub header: Option<DurationText>,
    pub budget: Option<DurationText>,
    pub connect: Option<DurationText>,
    pub first_command: Option<DurationText>,
    pub next_command: Option<DurationText>,
    pub drain: Option<DurationText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_sessions: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub max_header_lines: Option<u64>,
    pub max_headers_per_peer: Option<u64>,
    pub max_header_memory: Option<u64>,
    pub max_config_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matcher: Option<RawMatch>,
    pub pool: Option<String>,
    pub split: Option<Vec<RawSplit>>,
    pub split_key: Option<String>,
    pub rewrite: Option<RawRewrite>,
    pub set: Option<OrderedMap<Scalar>>,
    pub mode: Option<RawMode>,
    pub forward_hangup: Option<bool>,
    // Boxed, the rare large fields: a route is parsed into a vector of 100,000 of them, whose
    // size (1 KB each unboxed) was a tenth of a large table's load time in copies and page faults.
    pub timeouts: Option<Box<RawTimeouts>>,
    pub rollout: Option<Box<RawRollout>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub script: Option<RawScript>,
    pub query: Option<OrderedMap<Scalar>>,
    pub args: Option<OrderedMap<Scalar>>,
    pub vars: Option<OrderedMap<Scalar>>,
    pub source: Option<Vec<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScript {
    pub exact: Option<Scalar>,
    pub prefix: Option<Scalar>,
    pub regex: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSplit {
    pub pool: Option<String>,
    pub weight: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRewrite {
    pub strip_prefix: Option<Scalar>,
    pub replace_prefix: Option<RawReplacePrefix>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReplacePrefix {
    pub from: Option<Scalar>,
    pub to: Option<Scalar>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawMode {
    Lines,
    Raw,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub name: Option<String>,
    pub balance: Option<RawBalance>,
    pub hash_key: Option<String>,
    pub backends: Option<Vec<RawBackend>>,
    pub max_sessions: Option<u64>,
    pub passive: Option<RawPassive>,
    pub health: Option<RawHealth>,
    pub slow_start: Option<DurationText>,
    pub max_ejection_percent: Option<u64>,
    pub dns: Option<RawDns>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawBalance {
    RoundRobin,
    Weighted,
    LeastSessions,
    Hash,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub address: Option<String>,
    pub srv: Option<String>,
    pub weight: Option<u64>,
    pub max_sessions: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPassive {
    pub backoff: Option<DurationText>,
    pub max_backoff: Option<DurationText>,
    pub consecutive_failures: Option<u64>,
}

/// Active health checks of a pool's backends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    #[serde(rename = "type")]
    pub kind: Option<RawHealthKind>,
    pub script: Option<Scalar>,
    pub expect: Option<Scalar>,
    pub interval: Option<DurationText>,
    pub timeout: Option<DurationText>,
    pub jitter: Option<DurationText>,
    pub rise: Option<u64>,
    pub fall: Option<u64>,
}

/// How DNS backend names are resolved: top-level, and per pool over it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    pub nameservers: Option<Vec<Scalar>>,
    pub search: Option<Vec<Scalar>>,
    pub min_ttl: Option<DurationText>,
    pub max_ttl: Option<DurationText>,
    pub timeout: Option<DurationText>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawHealthKind {
    Agi,
    Tcp,
}

/// The control API's listener, authentication and limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    pub enabled: Option<bool>,
    pub address: Option<String>,
    pub socket: Option<String>,
    pub token_file: Option<String>,
    pub token_env: Option<String>,
    pub tls: Option<RawControlTls>,
    pub max_body_bytes: Option<u64>,
    pub request_timeout: Option<DurationText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControlTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
    pub peers: Option<RawPeerTls>,
}

/// How this replica reads its peers' control APIs over TLS (rollout judgement).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeerTls {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub server_name: Option<String>,
}

/// A YAML scalar kept as text: strings as written, integers and booleans in their usual spelling
/// (`1` → "1"), so `args: { 1: "^x" }` and `query: { page: 2 }` work unquoted.
/// Decimals are refused: `1.50` would come back as "1.5" and then never match.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a string (quote decimals, e.g. \"1.50\", to keep them as written)",
            allow_float: false,
        })
        .map(Scalar)
    }
}

/// A duration as written. Numbers are accepted here only so validation can answer them with
/// "add a unit" instead of a type error.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a duration with a unit, e.g. 250ms, 2s, 5m",
            allow_float: true,
        })
        .map(DurationText)
    }
}

struct ScalarVisitor {
    expecting: &'static str,
    allow_float: bool,
}

impl Visitor<'_> for ScalarVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        if self.allow_float {
            Ok(v.to_string())
        } else {
            Err(E::invalid_type(de::Unexpected::Float(v), &self))
        }
    }
}

/// A YAML mapping kept in file order, duplicates included (validation reports them by name;
/// serde_yaml's own `Mapping` would stop at the first one without a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderedMap<V>(pub Vec<(Scalar, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(std::marker::PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of names to values, e.g. { name: value }")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Scalar>()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(OrderedMap(entries))
            }
        }

        d.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

// ---- the `rollout:` block of a route, as written (see `validate::rollout`)

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRollout {
    pub from: Option<String>,
    pub to: Option<String>,
    pub steps: Option<Vec<f64>>,
    pub step_duration: Option<DurationText>,
    pub start: Option<Scalar>,
    pub skew: Option<DurationText>,
    pub canary: Option<RawMatch>,
    pub judge: Option<RawJudge>,
    pub overrides: Option<Vec<RawOverride>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJudge {
    pub enabled: Option<bool>,
    pub interval: Option<DurationText>,
    pub min_sessions: Option<u64>,
    pub max_failures: Option<f64>,
    pub max_connect_errors: Option<f64>,
    pub max_early_closes: Option<f64>,
    pub max_deadlines: Option<f64>,
    pub max_first_command_p95: Option<DurationText>,
    pub peers: Option<RawPeers>,
}

/// `peers: "dns:NAME:PORT"` / `"dns:_control._tcp.NAME"`, or a list of `ip:port`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawPeers {
    Dns(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOverride {
    pub action: Option<String>,
    pub at: Option<Scalar>,
}
