//! Where a rollout stands at a given time: a pure function of the declared
//! plan, its overrides and the judged rollback (if any). Every replica that
//! reads the same config computes the same answer for the same time, which
//! is what makes routing sticky without shared state. Allocation-free: it
//! runs for every AGI of a rollout route.

use agiproxy_config::{OverrideAction, Rollout};

/// Unix milliseconds now (the wall clock: the schedule is in wall time).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The rollout's state, as in `agiproxy_rollout_state{state=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Before `start`: blue takes every call (canaries aside).
    Pending,
    Progressing,
    /// Paused by an operator: the step in force stays.
    Halted,
    RolledBack,
    Promoted,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Progressing,
        State::Halted,
        State::RolledBack,
        State::Promoted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Progressing => "progressing",
            State::Halted => "halted",
            State::RolledBack => "rolled_back",
            State::Promoted => "promoted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub state: State,
    /// Index into `steps` of the step in force (the last one reached when
    /// rolled back or promoted); None before the start.
    pub step: Option<usize>,
    /// Green's share of new calls, in basis points.
    pub weight_bp: u32,
    /// When the next step begins (Unix ms), if one will by the schedule.
    pub next_change_ms: Option<i64>,
}

/// The position at `t_ms` (Unix ms). `judged_ms`: when a judged rollback
/// takes effect, treated as one more `rollback` override.
pub fn position(ro: &Rollout, t_ms: i64, judged_ms: Option<i64>) -> Position {
    let step_ms = (ro.step_duration.as_millis() as i64).max(1);
    let n = ro.steps.len();
    let mut paused_since: Option<i64> = None;
    let mut paused_total = 0i64;
    // Overrides and the judged rollback, merged in time order.
    let mut judged = judged_ms.filter(|j| *j <= t_ms);
    let mut i = 0;
    loop {
        let next_override = ro.overrides.get(i).filter(|o| o.at_ms <= t_ms);
        let (at, action) = match (next_override, judged) {
            (Some(o), Some(j)) if j < o.at_ms => {
                judged = None;
                (j, OverrideAction::Rollback)
            }
            (Some(o), _) => {
                i += 1;
                (o.at_ms, o.action)
            }
            (None, Some(j)) => {
                judged = None;
                (j, OverrideAction::Rollback)
            }
            (None, None) => break,
        };
        match action {
            OverrideAction::Pause => {
                paused_since.get_or_insert(at);
            }
            OverrideAction::Resume => {
                if let Some(p) = paused_since.take() {
                    paused_total += at - p;
                }
            }
            OverrideAction::Rollback | OverrideAction::Promote => {
                let elapsed = paused_since.unwrap_or(at) - ro.start_ms - paused_total;
                let step = (elapsed >= 0).then(|| ((elapsed / step_ms) as usize).min(n - 1));
                let (state, weight_bp) = if action == OverrideAction::Rollback {
                    (State::RolledBack, 0)
                } else {
                    (State::Promoted, 10_000)
                };
                return Position {
                    state,
                    step,
                    weight_bp,
                    next_change_ms: None,
                };
            }
        }
    }
    let elapsed = paused_since.unwrap_or(t_ms) - ro.start_ms - paused_total;
    if elapsed < 0 {
        return Position {
            state: if paused_since.is_some() {
                State::Halted
            } else {
                State::Pending
            },
            step: None,
            weight_bp: 0,
            next_change_ms: paused_since.is_none().then_some(ro.start_ms + paused_total),
        };
    }
    let step = ((elapsed / step_ms) as usize).min(n - 1);
    let weight_bp = ro.steps[step];
    let state = if paused_since.is_some() {
        State::Halted
    } else if step == n - 1 && weight_bp >= 10_000 {
        State::Promoted
    } else {
        State::Progressing
    };
    let next_change_ms = (paused_since.is_none() && step + 1 < n)
        .then(|| ro.start_ms + paused_total + (step as i64 + 1) * step_ms);
    Position {
        state,
        step: Some(step),
        weight_bp,
        next_change_ms,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agiproxy_config::Override;

    /// A rollout from `steps` (percent), one step a minute from t = 1000 s.
    pub(crate) fn plan(steps: &[u32], overrides: &[(OverrideAction, i64)]) -> Rollout {
        let text = format!(
            "version: 1\nroutes:\n  - name: r\n    rollout:\n      from: blue\n      to: green\n      steps: {steps:?}\n      step_duration: 1m\n      start: \"1970-01-01T00:16:40Z\"\npools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:2\" }}]\n"
        );
        let mut ro = agiproxy_config::from_yaml_str(&text).unwrap().routes[0]
            .rollout
            .clone()
            .unwrap();
        ro.overrides = overrides
            .iter()
            .map(|(action, s)| Override {
                action: *action,
                at_ms: s * 1000,
            })
            .collect();
        *ro
    }

    const S: i64 = 1000;

    #[test]
    fn the_clock_alone_gives_the_step() {
        let ro = plan(&[1, 5, 25, 50, 100], &[]);
        let p = position(&ro, 999 * S, None);
        assert_eq!(
            (p.state, p.step, p.weight_bp, p.next_change_ms),
            (State::Pending, None, 0, Some(1000 * S))
        );
        let p = position(&ro, 1000 * S, None);
        assert_eq!(
            (p.state, p.step, p.weight_bp, p.next_change_ms),
            (State::Progressing, Some(0), 100, Some(1060 * S))
        );
        let p = position(&ro, 1179 * S + 999, None);
        assert_eq!((p.step, p.weight_bp), (Some(2), 2500));
        let p = position(&ro, 1240 * S, None);
        assert_eq!(
            (p.state, p.step, p.weight_bp, p.next_change_ms),
            (State::Promoted, Some(4), 10_000, None)
        );
        // A rollout that ends below 100 % holds its last step.
        let ro = plan(&[10, 50], &[]);
        let p = position(&ro, 5000 * S, None);
        assert_eq!((p.state, p.weight_bp), (State::Progressing, 5000));
    }

    #[test]
    fn a_pause_holds_the_step_and_resume_shifts_the_rest() {
        let ro = plan(
            &[1, 5, 25],
            &[
                (OverrideAction::Pause, 1030),
                (OverrideAction::Resume, 1130),
            ],
        );
        let p = position(&ro, 1100 * S, None);
        assert_eq!(
            (p.state, p.step, p.next_change_ms),
            (State::Halted, Some(0), None)
        );
        // 30 s of step 0 before the pause, 30 s after the resume.
        let p = position(&ro, 1159 * S, None);
        assert_eq!((p.state, p.step), (State::Progressing, Some(0)));
        assert_eq!(p.next_change_ms, Some(1160 * S));
        assert_eq!(position(&ro, 1160 * S, None).step, Some(1));
    }

    #[test]
    fn rollback_and_promote_are_final_and_anchored_in_time() {
        let ro = plan(&[10, 50], &[(OverrideAction::Rollback, 1070)]);
        assert_eq!(position(&ro, 1069 * S, None).weight_bp, 5000);
        let p = position(&ro, 1070 * S, None);
        assert_eq!(
            (p.state, p.step, p.weight_bp),
            (State::RolledBack, Some(1), 0)
        );
        let ro = plan(&[10, 50], &[(OverrideAction::Promote, 1010)]);
        assert_eq!(position(&ro, 1009 * S, None).weight_bp, 1000);
        assert_eq!(position(&ro, 1010 * S, None).state, State::Promoted);
        // A judged rollback counts like an override at its time.
        let ro = plan(&[10, 50], &[(OverrideAction::Promote, 1090)]);
        let p = position(&ro, 2000 * S, Some(1080 * S));
        assert_eq!(p.state, State::RolledBack);
        assert_eq!(position(&ro, 1079 * S, Some(1080 * S)).weight_bp, 5000);
    }
}
