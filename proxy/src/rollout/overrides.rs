//! Rollout overrides in a config text: written into it (by the API, and
//! those a reload from the file keeps), and the ones of a running rollout
//! that a new config of the same rollout lacks.

use agiproxy_config::{format_ms, OverrideAction};

use crate::session::rollout::live::same_rollouts;

/// Why a config text could not take an override.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// No such route, or no rollout on it.
    #[error("{0}")]
    NotFound(String),
    /// The text is not a YAML mapping that can be edited.
    #[error("{0}")]
    Uneditable(String),
}

/// Parses a config text as YAML, edits it and writes it back.
pub(crate) fn edit_text<E: From<EditError>>(
    text: &str,
    edit: impl FnOnce(&mut serde_yaml::Value) -> Result<(), E>,
) -> Result<String, E> {
    // A running text may start with a byte order mark, which serde_yaml refuses.
    let text = agiproxy_config::without_bom(text);
    let mut doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        EditError::Uneditable(format!("the running config text cannot be edited: {e}"))
    })?;
    edit(&mut doc)?;
    serde_yaml::to_string(&doc).map_err(|e| EditError::Uneditable(e.to_string()).into())
}

/// The rollout mapping of `route` in `doc`.
pub(crate) fn rollout_mut<'d>(
    doc: &'d mut serde_yaml::Value,
    route: &str,
) -> Result<&'d mut serde_yaml::Mapping, EditError> {
    let entry = doc
        .get_mut("routes")
        .and_then(|r| r.as_sequence_mut())
        .and_then(|routes| {
            routes
                .iter_mut()
                .filter_map(|r| r.as_mapping_mut())
                .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(route))
        })
        .ok_or_else(|| EditError::NotFound(format!("no route {route:?}")))?;
    entry
        .get_mut("rollout")
        .and_then(|r| r.as_mapping_mut())
        .ok_or_else(|| EditError::NotFound(format!("route {route:?} has no rollout")))
}

/// Appends `{ action, at }` to a rollout's overrides.
pub(crate) fn push_override(rollout: &mut serde_yaml::Mapping, action: &str, at: &str) {
    let mut o = serde_yaml::Mapping::new();
    o.insert("action".into(), action.into());
    o.insert("at".into(), at.into());
    match rollout
        .get_mut("overrides")
        .and_then(|v| v.as_sequence_mut())
    {
        Some(list) => list.push(serde_yaml::Value::Mapping(o)),
        None => {
            rollout.insert(
                "overrides".into(),
                serde_yaml::Value::Sequence(vec![serde_yaml::Value::Mapping(o)]),
            );
        }
    }
}

/// An override of the running config that a new config of the same
/// rollout lacks: kept across a reload from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub route: String,
    pub action: OverrideAction,
    /// The time as written (`at`, without the skew), as `ctl` printed it.
    pub at: String,
}

impl Carried {
    /// The entry to write into the file, as `ctl rollout status` prints it.
    pub fn entry(&self) -> String {
        format!("{{ action: {}, at: \"{}\" }}", self.action, self.at)
    }
}

/// The overrides that `running` has and `new` lacks (by action and
/// written `at`, each matched once), for every route whose rollout in `new`
/// is the same rollout (the same identity) as in `running`: an override
/// written through the API lives in the running config only, and a reload
/// from a file that does not have it yet must not drop it (calls placed on
/// blue by a rollback would move to green). A new rollout (a new `start`,
/// other pools or steps) takes none: its overrides are the file's.
///
/// `running`: a config with its routes, not a snapshot's (whose routes are
/// in its router: `Snapshot::rollout_config`).
pub fn carried_overrides(
    running: &agiproxy_config::Config,
    new: &agiproxy_config::Config,
) -> Vec<Carried> {
    carried_unless_from_file(running, new, None)
}

/// [`carried_overrides`] for a text read from the file, except those the
/// file had when last read (`file_had`), by route, action and written `at`:
/// one the file had and no longer has was deleted from it, and goes
/// (before, a scheduled `promote` deleted from the file stayed scheduled,
/// a deleted `pause` held the rollout: audit). Whether its going changes
/// where calls went is for `past_changes` to judge.
pub fn carried_unless_from_file(
    running: &agiproxy_config::Config,
    new: &agiproxy_config::Config,
    file_had: Option<&super::file::FileRollouts>,
) -> Vec<Carried> {
    let mut out = Vec::new();
    for (_, was, before, ro) in same_rollouts(running, new) {
        let route = was.name.as_str();
        let from_file = |action: OverrideAction, written: i64| {
            file_had.and_then(|f| f.rollout(route)).is_some_and(|f| {
                let skew = f.skew.as_millis() as i64;
                f.overrides
                    .iter()
                    .any(|o| o.action == action && o.at_ms - skew == written)
            })
        };
        if before.overrides.is_empty() {
            continue;
        }
        // Compared as written: a new skew moves them all alike (and
        // `skew_changes` refuses a move across now).
        let (was, is) = (before.skew.as_millis() as i64, ro.skew.as_millis() as i64);
        let mut has: Vec<(OverrideAction, i64)> = ro
            .overrides
            .iter()
            .map(|o| (o.action, o.at_ms - is))
            .collect();
        // A final override kept after the file's own of the same action,
        // in force no later (effective times: a new skew moves the file's),
        // changes nothing, and would keep this replica's config apart from
        // its peers' for good (a replica that refused `ctl`'s first time
        // took a second one; the file with the first brings it back in
        // line). Every call it placed stays where it is. Another action,
        // or a later time, is kept (and the skew check sees it).
        let moot = |o: &agiproxy_config::Override| {
            matches!(o.action, OverrideAction::Promote | OverrideAction::Rollback)
                && ro
                    .overrides
                    .iter()
                    .any(|f| f.action == o.action && f.at_ms <= o.at_ms)
        };
        for o in &before.overrides {
            let written = (o.action, o.at_ms - was);
            match has.iter().position(|h| *h == written) {
                Some(i) => {
                    has.swap_remove(i);
                }
                None if moot(o) || from_file(written.0, written.1) => {}
                None => out.push(Carried {
                    route: route.to_string(),
                    action: o.action,
                    at: format_ms(written.1),
                }),
            }
        }
    }
    out
}

/// `text` with the `carried` overrides appended, as the API writes them
/// (one parse of the text for all). Not checked against the clock: each is
/// already in force, or scheduled, in the running config.
pub fn with_carried(text: &str, carried: &[Carried]) -> Result<String, EditError> {
    edit_text(text, |doc| {
        for c in carried {
            push_override(rollout_mut(doc, &c.route)?, c.action.as_str(), &c.at);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "version: 1\nroutes:\n  - name: ivr\n    rollout: { from: blue, to: green, steps: [10, 100], step_duration: 1h, start: \"2026-12-06T09:00:00Z\" }\npools:\n  - name: blue\n    backends: [{ address: \"127.0.0.1:1\" }]\n  - name: green\n    backends: [{ address: \"127.0.0.1:2\" }]\n";

    fn snapshot(text: &str) -> crate::snapshot::Snapshot {
        use crate::snapshot::{ConfigMeta, Snapshot};
        let config = agiproxy_config::from_yaml_str(text).unwrap();
        Snapshot::build(
            config,
            ConfigMeta::new(1, "test", std::sync::Arc::from(text)),
            None,
        )
    }

    /// A text from the file keeps the running rollout's overrides it
    /// lacks, compared as written (`at` without the skew), while it is the
    /// same rollout; those it has are its own; a new rollout keeps none.
    #[test]
    fn a_text_from_the_file_keeps_the_overrides_it_lacks_of_the_same_rollout() {
        let with = |extra: &str, overrides: &str| {
            TEXT.replace(
                "start: \"2026-12-06T09:00:00Z\" }",
                &format!("start: \"2026-12-06T09:00:00Z\"{extra}, overrides: [{overrides}] }}"),
            )
        };
        let pause = "{ action: pause, at: \"2026-12-06T09:10:00Z\" }";
        let rollback = "{ action: rollback, at: \"2026-12-06T09:20:00.250Z\" }";
        let running = snapshot(&with("", &format!("{pause}, {rollback}")));
        let running = running.rollout_config();
        let carried = |text: &str| {
            carried_overrides(&running, &agiproxy_config::from_yaml_str(text).unwrap())
        };
        let lacking = with(", skew: 5s", pause);
        let kept = carried(&lacking);
        assert_eq!(
            kept,
            vec![Carried {
                route: "ivr".into(),
                action: OverrideAction::Rollback,
                at: "2026-12-06T09:20:00.250Z".into(),
            }],
            "a new skew is not a new rollout; the times are compared as written"
        );
        // Written as the API writes it: then the text has them all.
        let edited = with_carried(&lacking, &kept).unwrap();
        assert_eq!(carried(&edited), vec![]);
        let config = agiproxy_config::from_yaml_str(&edited).unwrap();
        let ro = config.routes[0].rollout.as_deref().unwrap();
        assert_eq!(ro.overrides.len(), 2);
        assert_eq!(ro.skew, std::time::Duration::from_secs(5));
        // The file has them (another spelling of the same time): nothing.
        assert_eq!(
            carried(&with("", &format!("{rollback}, {pause}")).replace(":00.250Z", ":00.25Z")),
            vec![]
        );
        // Another action at that time is not the same override.
        assert_eq!(
            carried(&with(
                "",
                &format!("{pause}, {}", rollback.replace("rollback", "promote"))
            ))
            .len(),
            1
        );
        // The file's own rollback in force no later makes the running
        // one moot: not kept (a replica whose `ctl` time was later than its
        // peers' converges on the file's). Later, another action, or later
        // once the file's skew is counted: kept.
        let rollback_at = |at: &str| rollback.replace("09:20:00.250Z", at);
        for (extra, file_has, kept) in [
            ("", rollback_at("09:15:00Z"), 0),
            ("", rollback_at("09:20:00.200Z"), 0),
            ("", rollback_at("09:30:00Z"), 1),
            (
                "",
                rollback
                    .replace("rollback", "promote")
                    .replace("09:20:00.250Z", "09:15:00Z"),
                1,
            ),
            (", skew: 5s", rollback_at("09:20:00Z"), 1),
            (", skew: 5s", rollback_at("09:19:55Z"), 0),
        ] {
            assert_eq!(
                carried(&with(extra, &format!("{pause}, {file_has}"))).len(),
                kept,
                "{extra} {file_has}"
            );
        }
        // A new start, or other steps: another rollout, nothing is kept.
        assert_eq!(
            carried(&with("", "").replace("09:00:00Z", "10:00:00Z")),
            vec![]
        );
        assert_eq!(
            carried(&with("", "").replace("[10, 100]", "[20, 100]")),
            vec![]
        );
        // A route that is gone, or has no rollout any more: nothing.
        assert_eq!(carried(&TEXT.replace("name: ivr", "name: menu")), vec![]);
    }
}
