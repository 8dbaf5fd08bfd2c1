//! agiproxy's configuration: the YAML schema, parsing, validation and compilation into the
//! typed [`Config`] the proxy runs on. Knows nothing of sockets or async.
//!
//! YAML text → serde structs mirroring the file (`raw`, unknown keys refused) → checks and
//! compilation (`validate`) → [`Config`]. Every mistake is reported, not just the first, each
//! with its path in the file and how to fix it:
//!
//! ```text
//! routes[2].pool: unknown pool "ivr-gren"; known pools: ivr-blue, ivr-green
//! timeouts.budget: "15OOms" is not a duration (write e.g. 250ms, 2s, 5m)
//! ```
//!
//! Unknown keys and wrong types do not stop the checks on values: the file is read leniently
//! and one run reports everything, in file order, each with its line and column.

mod describe;
mod duration;
mod error;
mod file;
mod model;
mod parse;
mod pattern;
pub mod prescan;
mod raw;
mod template;
mod tree;
mod validate;

use std::path::Path;

pub use duration::{parse_flag as parse_duration_flag, MAX_DURATION};
pub use error::{ConfigError, ConfigErrors};
pub use file::{read_file, FileError};
pub use model::{
    format_ms, parse_time, Judge, Override, OverrideAction, Peers, Rollout, MAX_RFC3339_MS,
    MAX_ROLLOUT_STEPS,
};
pub use model::{
    script_path, Backend, BackendTarget, Backoff, Balance, Config, Control, ControlTls, Dns,
    HealthCheck, HealthKind, Keepalive, Limits, Listener, Mode, PeerTls, Pool, ProxyProtocol,
    Rewrite, Route, RouteMatch, RouteTarget, ScriptMatch, SplitTarget, Timeouts, TokenSource,
    DEFAULT_PORT, DEFAULT_SPLIT_KEY,
};
pub use pattern::{Pattern, PatternError, CONFIG_NFA_BUDGET};
pub use template::{Template, TemplateContext, TemplatePart};
pub use validate::{binds_clash, control_takes};

/// Errors reported for one config at most, the first in file order; one more error then
/// says how many were left out. A config of 300,000 unknown keys once gave 42 MB of errors
/// (`check`'s output, the API's answer, a log line the log writer dropped).
pub const MAX_ERRORS: usize = 100;

/// `299900` as `299,900`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `text` without a leading UTF-8 byte order mark, which some editors write (Windows
/// Notepad): the YAML reader takes it for the start of a second document. For
/// [`from_yaml_str_within`], and for whatever else reads a config text as YAML (an edit of
/// the running text).
pub fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses, validates and compiles a config of any size `limits.max_config_bytes` accepts.
pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
    from_yaml_str_within(text, *Limits::MAX_CONFIG_BYTES.end())
}

/// Parses, validates and compiles a config, refusing before any parsing a text over
/// `max_bytes` (a replacement is held to the running config's `limits.max_config_bytes`) or
/// one whose nesting or aliases exceed the bounds of [`prescan`]. A config over its own
/// `limits.max_config_bytes` is refused too, so that what starts can also be reloaded.
pub fn from_yaml_str_within(text: &str, max_bytes: usize) -> Result<Config, ConfigErrors> {
    if text.len() > max_bytes {
        return Err(ConfigError::new(
            "",
            format!(
                "the config is {} bytes, over limits.max_config_bytes ({max_bytes} bytes) of \
                 the running config; raise that limit first, or make the config smaller",
                text.len()
            ),
        )
        .into());
    }
    // Every path (file, API, check) comes through here.
    let text = without_bom(text);
    let parsed = parse::parse(text)?;
    // The config's regexes share one budget of checking work.
    let budget = pattern::Budget::start();
    let compiled = validate::compile(parsed.raw);
    drop(budget);
    let config = match compiled {
        Ok(config) if parsed.structural.is_empty() => config,
        compiled => {
            let validation = compiled.err().unwrap_or_default();
            return Err(ConfigErrors(parse::report(
                text,
                parsed.structural,
                validation,
            )));
        }
    };
    if text.len() > config.limits.max_config_bytes {
        return Err(ConfigError::new(
            "limits.max_config_bytes",
            format!(
                "the config is {} bytes, over its own limit of {}; raise the limit",
                text.len(),
                config.limits.max_config_bytes
            ),
        )
        .into());
    }
    Ok(config)
}

/// Reads (see [`read_file`]) and compiles a config file of any size `limits.max_config_bytes`
/// accepts. A file that cannot be read gives one error with an empty path, naming the file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read_file(path, *Limits::MAX_CONFIG_BYTES.end())
        .map_err(|e| ConfigError::new("", e.to_string()))?;
    from_yaml_str(&text)
}

/// A small, valid, commented config, for `agiproxy` to print as a starting point.
pub fn example_config() -> &'static str {
    include_str!("../examples/minimal.yaml")
}
