//! Errors: one [`ConfigError`] per mistake, each naming where it is and how to fix it.

use std::fmt;

/// One mistake in a config, e.g. `routes[2].pool: unknown pool "ivr-gren"; known pools: ivr-blue, ivr-green`.
///
/// `path` is in the config's own terms (`routes[2].match.args.1`, `pools[1].backends[0].weight`);
/// it is empty for errors about the file as a whole (unreadable, not YAML at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }

    fn render(&self) -> String {
        if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }
}

/// Every mistake found in one config, in file order as far as possible. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One error per line, so `agiproxy check` can print it as is.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Collects errors while validation carries on, so one run reports every mistake.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<ConfigError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(path, message));
    }

    pub(crate) fn extend(&mut self, other: Errors) {
        self.0.extend(other.0);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

/// Converts a serde_yaml error into a [`ConfigError`].
///
/// serde_yaml prints `path: message at line L column C` but exposes neither part on its own,
/// so the path is split off its text: it is the part before the first `": "` when that part
/// has no spaces (serde's own messages, such as `invalid type: ...`, always contain one).
pub(crate) fn from_yaml(err: &serde_yaml::Error) -> ConfigError {
    let mut text = err.to_string();
    let location = err.location();
    if let Some(loc) = &location {
        // Said once, at the end: a syntax error has it mid-text (`… at line 3 column 1,
        // while scanning a quoted scalar at line 2 column 18`).
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        text = text.replacen(&at, "", 1);
    }
    let (path, message) = match text.split_once(": ") {
        Some((path, rest)) if !path.is_empty() && !path.contains(char::is_whitespace) => {
            (path.to_string(), rest.to_string())
        }
        _ => (String::new(), text),
    };
    let message = match location {
        Some(loc) => format!("{message} (line {}, column {})", loc.line(), loc.column()),
        None => message,
    };
    ConfigError::new(path, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_omits_an_empty_path() {
        assert_eq!(
            ConfigError::new("", "cannot read").to_string(),
            "cannot read"
        );
        assert_eq!(
            ConfigError::new("routes[0].name", "missing").to_string(),
            "routes[0].name: missing"
        );
    }

    #[test]
    fn errors_print_one_per_line() {
        let errs = ConfigErrors(vec![ConfigError::new("a", "x"), ConfigError::new("b", "y")]);
        assert_eq!(errs.to_string(), "a: x\nb: y");
    }
}
