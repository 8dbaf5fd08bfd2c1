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
//! Structural mistakes (unknown keys, wrong types) are reported first, with line and column;
//! the checks on values run once the file's structure is right.

mod describe;
mod duration;
mod error;
mod model;
mod parse;
mod raw;
mod raw_rollout;
mod rollout;
mod template;
mod validate;

use std::path::Path;

pub use duration::MAX_DURATION;
pub use error::{ConfigError, ConfigErrors};
pub use model::{
    script_path, Backend, BackendTarget, Backoff, Balance, Config, Control, ControlTls, Dns,
    HealthCheck, HealthKind, Limits, Listener, Mode, Pool, Rewrite, Route, RouteMatch, RouteTarget,
    ScriptMatch, SplitTarget, Timeouts, TokenSource, DEFAULT_PORT, DEFAULT_SPLIT_KEY,
};
pub use rollout::{
    format_ms, parse_time, Judge, Override, OverrideAction, Peers, Rollout, MAX_ROLLOUT_STEPS,
};
pub use template::{Template, TemplateContext, TemplatePart};

/// Parses, validates and compiles a config.
pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
    let raw = parse::parse(text).map_err(ConfigErrors)?;
    validate::compile(raw).map_err(ConfigErrors)
}

/// Reads and compiles a config file. A file that cannot be read gives one error with an
/// empty path, naming the file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    from_yaml_str(&text)
}

/// A small, valid, commented config, for `agiproxy` to print as a starting point.
pub fn example_config() -> &'static str {
    include_str!("../examples/minimal.yaml")
}
