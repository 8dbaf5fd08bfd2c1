//! The rollouts a config file declares, kept when the file is read.

use std::collections::HashMap;

use agiproxy_config::{Config, Rollout};

/// The rollouts a config file declares, by route name: what the running
/// ones are compared with (`rollout::view`). Taken from a parse of the
/// file's text when it is read (at start, by the watch or a reload) and
/// kept, so that no request reads or parses the file.
#[derive(Debug, Default)]
pub struct FileRollouts(HashMap<String, Rollout>);

impl FileRollouts {
    pub fn of(config: &Config) -> FileRollouts {
        FileRollouts(
            config
                .routes
                .iter()
                .filter_map(|r| Some((r.name.clone(), (**r.rollout.as_ref()?).clone())))
                .collect(),
        )
    }

    /// The file's rollout of `route`, if it has one.
    pub fn rollout(&self, route: &str) -> Option<&Rollout> {
        self.0.get(route)
    }
}
