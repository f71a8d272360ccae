//! Rotation schedules and the IPsec rollout state machine, as pure functions over data and time.
//!
//! A rollout replaces the IPsec key without any moment at which two live nodes lack a key that
//! both hold:
//!
//! 1. **staged**: every node installs the new key for inbound traffic only; outbound stays on the
//!    old key. Once every live node has acknowledged the new SPI as installed:
//! 2. **active**: nodes switch outbound to the new SPI and keep the old key for inbound. Once
//!    every live node has acknowledged the new outbound SPI and the overlap time has passed:
//! 3. **retired**: the old key is removed.
//!
//! A node not seen within the liveness timeout stops blocking (it gets the current keys when it
//! returns); a rollout that waits longer than a limit raises an alarm once instead of waiting in
//! silence. [`step`] is the whole state machine; the service persists its output.

use std::time::Duration;

use keyd_proto::time::format_duration;
use keyd_proto::{Bounds, KeyClass, MaintenanceWindow, Schedule, Timestamp};
use serde::{Deserialize, Serialize};

use crate::ipsec::KeyId;

/// A rollout in progress (persisted in the IPsec state document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub from_spi: u8,
    pub to_spi: u8,
    pub phase: Phase,
    pub started_at: Timestamp,
    pub phase_since: Timestamp,
    /// The stuck alarm fires once per phase.
    #[serde(default)]
    pub stuck_reported: bool,
    /// Nodes an administrator excused from this rollout (`keyctl rollout skip`): it no longer
    /// waits for them, in any phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Staged,
    Active,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Staged => "staged",
            Phase::Active => "active",
        }
    }
}

/// What one node last acknowledged, and when it was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAcks {
    pub name: String,
    pub last_seen: Timestamp,
    pub installed: Vec<u8>,
    pub outbound: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutConfig {
    /// A node unseen for longer stops blocking rollouts.
    pub liveness_timeout: Duration,
    /// A phase waiting longer raises the stuck alarm.
    pub stuck_after: Duration,
    /// How long the old key stays accepted after the switch.
    pub overlap: Duration,
}

/// What happens to the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Start a rollout from the current key `from` to `to`.
    Rotate { from: u8, to: u8 },
    /// Time passed or acknowledgements arrived: re-evaluate.
    Tick,
}

/// What the service must do (persist, audit, delete) as a result of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Staged {
        spi: u8,
    },
    Activated {
        spi: u8,
    },
    Retired {
        spi: u8,
    },
    Stuck {
        phase: Phase,
        waiting_for: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error("a rollout from SPI {from} to {to} is in progress ({phase}); wait for it to finish")]
    InProgress {
        from: u8,
        to: u8,
        phase: &'static str,
    },
    #[error("SPI {to} does not follow SPI {from} (IDs increase and wrap from 15 to 1)")]
    NotSuccessor { from: u8, to: u8 },
}

/// Who blocks the rollout now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    pub waiting_for: Vec<String>,
    pub not_live: Vec<String>,
    /// Live nodes not waited for because an administrator skipped them.
    pub skipped: Vec<String>,
}

pub fn is_live(node: &NodeAcks, cfg: &RolloutConfig, now: Timestamp) -> bool {
    now.0.saturating_sub(node.last_seen.0) <= cfg.liveness_timeout.as_secs()
}

/// The nodes the current phase waits for, and those not live.
pub fn progress(r: &Rollout, nodes: &[NodeAcks], cfg: &RolloutConfig, now: Timestamp) -> Progress {
    let mut p = Progress::default();
    for n in nodes {
        if !is_live(n, cfg, now) {
            p.not_live.push(n.name.clone());
            continue;
        }
        if r.skipped.contains(&n.name) {
            p.skipped.push(n.name.clone());
            continue;
        }
        let done = match r.phase {
            Phase::Staged => n.installed.contains(&r.to_spi),
            Phase::Active => n.outbound == Some(r.to_spi) && n.installed.contains(&r.to_spi),
        };
        if !done {
            p.waiting_for.push(n.name.clone());
        }
    }
    p
}

/// The state machine: from the current rollout (if any), an event, the nodes' acknowledgements
/// and the time, the next rollout state and the effects to carry out.
pub fn step(
    state: Option<&Rollout>,
    event: &Event,
    nodes: &[NodeAcks],
    cfg: &RolloutConfig,
    now: Timestamp,
) -> Result<(Option<Rollout>, Vec<Effect>), RolloutError> {
    match (state, event) {
        (Some(r), Event::Rotate { .. }) => Err(RolloutError::InProgress {
            from: r.from_spi,
            to: r.to_spi,
            phase: r.phase.as_str(),
        }),
        (None, Event::Rotate { from, to }) => {
            let ok = matches!((KeyId::new(*from), KeyId::new(*to)), (Ok(f), Ok(t)) if t.is_successor_of(f));
            if !ok {
                return Err(RolloutError::NotSuccessor {
                    from: *from,
                    to: *to,
                });
            }
            let r = Rollout {
                from_spi: *from,
                to_spi: *to,
                phase: Phase::Staged,
                started_at: now,
                phase_since: now,
                stuck_reported: false,
                skipped: Vec::new(),
            };
            // With nobody to wait for, the rollout may advance at once.
            let (next, mut effects) = step(Some(&r), &Event::Tick, nodes, cfg, now)?;
            effects.insert(0, Effect::Staged { spi: *to });
            Ok((next, effects))
        }
        (None, Event::Tick) => Ok((None, vec![])),
        (Some(r), Event::Tick) => {
            let p = progress(r, nodes, cfg, now);
            let waited = Duration::from_secs(now.0.saturating_sub(r.phase_since.0));
            match r.phase {
                Phase::Staged if p.waiting_for.is_empty() => {
                    let active = Rollout {
                        phase: Phase::Active,
                        phase_since: now,
                        stuck_reported: false,
                        ..r.clone()
                    };
                    // The overlap may be zero and every node may already have switched.
                    let (next, mut effects) = step(Some(&active), &Event::Tick, nodes, cfg, now)?;
                    effects.insert(0, Effect::Activated { spi: r.to_spi });
                    Ok((next, effects))
                }
                Phase::Active if p.waiting_for.is_empty() && waited >= cfg.overlap => {
                    Ok((None, vec![Effect::Retired { spi: r.from_spi }]))
                }
                _ if !p.waiting_for.is_empty() && waited > cfg.stuck_after && !r.stuck_reported => {
                    let stuck = Rollout {
                        stuck_reported: true,
                        ..r.clone()
                    };
                    Ok((
                        Some(stuck),
                        vec![Effect::Stuck {
                            phase: r.phase,
                            waiting_for: p.waiting_for,
                        }],
                    ))
                }
                _ => Ok((Some(r.clone()), vec![])),
            }
        }
    }
}

// ---- schedules ---------------------------------------------------------------------------------

/// The schedule each class has until an administrator sets one.
pub fn default_schedule(class: KeyClass) -> Schedule {
    const DAY: u64 = 86_400;
    let (period, overlap) = match class {
        // Cilium keeps old IPsec keys for 5 minutes after a switch; keyd waits for every node's
        // acknowledgement and then the overlap.
        KeyClass::Ipsec => (7 * DAY, 300),
        KeyClass::WireguardNodeKeys => (30 * DAY, 0),
        KeyClass::WireguardPsk => (DAY, 0),
        // AWS KMS's shortest automatic rotation period.
        KeyClass::Kek => (90 * DAY, 0),
    };
    Schedule {
        period: Duration::from_secs(period),
        overlap: Duration::from_secs(overlap),
        window: None,
        paused: false,
    }
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Checks a schedule on its own and against the class's bounds; the message names the bound.
pub fn validate_schedule(class: KeyClass, s: &Schedule, b: &Bounds) -> Result<(), String> {
    if s.period < Duration::from_secs(60) {
        return Err(format!("{}: period must be at least 1m", class.as_str()));
    }
    if s.overlap >= s.period {
        return Err(format!(
            "{}: overlap must be shorter than the period",
            class.as_str()
        ));
    }
    if let Some(min) = b.min_period
        && s.period < min
    {
        return Err(format!(
            "{}: period {} is below the compliance bound min_period = {}",
            class.as_str(),
            format_duration(s.period),
            format_duration(min)
        ));
    }
    if let Some(max) = b.max_period
        && s.period > max
    {
        return Err(format!(
            "{}: period {} exceeds the compliance bound max_period = {}",
            class.as_str(),
            format_duration(s.period),
            format_duration(max)
        ));
    }
    if let Some(w) = &s.window {
        validate_window(w)?;
    }
    Ok(())
}

pub fn validate_bounds(b: &Bounds) -> Result<(), String> {
    if let (Some(min), Some(max)) = (b.min_period, b.max_period)
        && min > max
    {
        return Err("min_period must not exceed max_period".into());
    }
    Ok(())
}

pub fn validate_window(w: &MaintenanceWindow) -> Result<(), String> {
    for d in &w.days {
        if !DAYS.contains(&d.as_str()) {
            return Err(format!(
                "window day {d:?} is not one of {}",
                DAYS.join(", ")
            ));
        }
    }
    if w.start_hour > 23 {
        return Err("window start_hour must be 0..=23".into());
    }
    if w.end_hour == 0 || w.end_hour > 24 {
        return Err("window end_hour must be 1..=24".into());
    }
    if w.start_hour == w.end_hour {
        return Err("window start_hour and end_hour must differ".into());
    }
    Ok(())
}

/// 0 = Monday. The Unix epoch was a Thursday.
fn weekday(day_number: u64) -> usize {
    ((day_number + 3) % 7) as usize
}

/// Whether `t` falls inside the window. A window wrapping past midnight belongs to the day it
/// starts on.
pub fn window_open(w: &MaintenanceWindow, t: Timestamp) -> bool {
    let day = t.0 / 86_400;
    let hour = ((t.0 % 86_400) / 3600) as u8;
    let day_ok = |d: u64| w.days.is_empty() || w.days.iter().any(|x| x == DAYS[weekday(d)]);
    if w.start_hour < w.end_hour {
        (w.start_hour..w.end_hour).contains(&hour) && day_ok(day)
    } else {
        (hour >= w.start_hour && day_ok(day)) || (hour < w.end_hour && day > 0 && day_ok(day - 1))
    }
}

/// The first moment at or after `from` inside the window (`from` itself when it is open).
pub fn next_window_start(w: &MaintenanceWindow, from: Timestamp) -> Timestamp {
    if window_open(w, from) {
        return from;
    }
    let mut t = (from.0 / 3600 + 1) * 3600;
    // A valid window opens at least once a week: 8 days of hours is enough.
    for _ in 0..(8 * 24) {
        if window_open(w, Timestamp(t)) {
            return Timestamp(t);
        }
        t += 3600;
    }
    from
}

/// When the next rotation of a class may start: the period after the last one, moved to the
/// window's next opening.
pub fn next_due(s: &Schedule, last: Timestamp) -> Timestamp {
    let due = Timestamp(last.0.saturating_add(s.period.as_secs()));
    match &s.window {
        Some(w) => next_window_start(w, due),
        None => due,
    }
}

/// How long a key that took over at `since` may stay in use before it is overdue: up to its
/// next due time (the period, then the window's next opening), plus the overlap and `grace`
/// (a rollout's allowed wait). `keyctl report`, the key metrics and the evidence report judge
/// by it.
pub fn overdue_after(s: &Schedule, since: Timestamp, grace: Duration) -> u64 {
    next_due(s, since)
        .0
        .saturating_sub(since.0)
        .saturating_add(s.overlap.as_secs())
        .saturating_add(grace.as_secs())
}

/// How long a key may stay in use before it is beyond the `max_period` bound: the bound plus
/// the overlap and `grace`, as for [`overdue_after`] (no window wait: bounds are absolute).
pub fn beyond_bounds_after(max_period: Duration, s: &Schedule, grace: Duration) -> u64 {
    max_period
        .as_secs()
        .saturating_add(s.overlap.as_secs())
        .saturating_add(grace.as_secs())
}

/// Whether the scheduler should start a rotation now.
pub fn is_due(s: &Schedule, last: Timestamp, now: Timestamp) -> bool {
    if s.paused || now < next_due(s, last) {
        return false;
    }
    s.window.as_ref().is_none_or(|w| window_open(w, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    fn cfg() -> RolloutConfig {
        RolloutConfig {
            liveness_timeout: Duration::from_secs(5 * MIN),
            stuck_after: Duration::from_secs(30 * MIN),
            overlap: Duration::from_secs(5 * MIN),
        }
    }

    fn node(name: &str, seen: u64, installed: &[u8], outbound: Option<u8>) -> NodeAcks {
        NodeAcks {
            name: name.into(),
            last_seen: Timestamp(seen),
            installed: installed.to_vec(),
            outbound,
        }
    }

    #[test]
    fn staged_active_retired_with_acks_and_overlap() {
        let t0 = 1_000_000;
        let mut nodes = vec![node("a", t0, &[3], Some(3)), node("b", t0, &[3], Some(3))];
        let (r, fx) = step(
            None,
            &Event::Rotate { from: 3, to: 4 },
            &nodes,
            &cfg(),
            Timestamp(t0),
        )
        .unwrap();
        assert_eq!(fx, vec![Effect::Staged { spi: 4 }]);
        let r = r.unwrap();
        assert_eq!(r.phase, Phase::Staged);
        // Only a has installed 4: still staged, waiting for b.
        nodes[0].installed = vec![3, 4];
        let (r, fx) = step(Some(&r), &Event::Tick, &nodes, &cfg(), Timestamp(t0 + 10)).unwrap();
        let r = r.unwrap();
        assert!(fx.is_empty());
        assert_eq!(
            progress(&r, &nodes, &cfg(), Timestamp(t0 + 10)).waiting_for,
            vec!["b"]
        );
        nodes[1].installed = vec![3, 4];
        let (r, fx) = step(Some(&r), &Event::Tick, &nodes, &cfg(), Timestamp(t0 + 20)).unwrap();
        assert_eq!(fx, vec![Effect::Activated { spi: 4 }]);
        let r = r.unwrap();
        assert_eq!(
            (r.phase, r.phase_since),
            (Phase::Active, Timestamp(t0 + 20))
        );
        // Both switch outbound, but the overlap has not passed.
        for n in &mut nodes {
            n.outbound = Some(4);
            n.last_seen = Timestamp(t0 + 30);
        }
        let (r, fx) = step(Some(&r), &Event::Tick, &nodes, &cfg(), Timestamp(t0 + 30)).unwrap();
        assert!(fx.is_empty());
        let r = r.unwrap();
        let (r, fx) = step(
            Some(&r),
            &Event::Tick,
            &nodes,
            &cfg(),
            Timestamp(t0 + 20 + 5 * MIN),
        )
        .unwrap();
        assert_eq!(fx, vec![Effect::Retired { spi: 3 }]);
        assert_eq!(r, None);
    }

    #[test]
    fn a_second_rotation_waits_for_the_first() {
        let (r, _) = step(
            None,
            &Event::Rotate { from: 1, to: 2 },
            &[node("a", 0, &[1], Some(1))],
            &cfg(),
            Timestamp(0),
        )
        .unwrap();
        let err = step(
            r.as_ref(),
            &Event::Rotate { from: 2, to: 3 },
            &[],
            &cfg(),
            Timestamp(1),
        )
        .unwrap_err();
        assert!(
            matches!(err, RolloutError::InProgress { from: 1, to: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn key_id_wraps_from_15_to_1_and_nothing_else_is_accepted() {
        let nodes = [node("a", 0, &[15], Some(15))];
        let (r, _) = step(
            None,
            &Event::Rotate { from: 15, to: 1 },
            &nodes,
            &cfg(),
            Timestamp(0),
        )
        .unwrap();
        assert_eq!(r.unwrap().to_spi, 1);
        for (from, to) in [(15, 2), (14, 1), (3, 3), (3, 2), (0, 1), (15, 16)] {
            let err = step(
                None,
                &Event::Rotate { from, to },
                &nodes,
                &cfg(),
                Timestamp(0),
            )
            .unwrap_err();
            assert_eq!(err, RolloutError::NotSuccessor { from, to });
        }
    }

    #[test]
    fn with_no_live_nodes_a_rollout_completes_after_the_overlap() {
        let (r, fx) = step(
            None,
            &Event::Rotate { from: 1, to: 2 },
            &[],
            &cfg(),
            Timestamp(0),
        )
        .unwrap();
        assert_eq!(
            fx,
            vec![Effect::Staged { spi: 2 }, Effect::Activated { spi: 2 }]
        );
        let (r, fx) = step(r.as_ref(), &Event::Tick, &[], &cfg(), Timestamp(5 * MIN)).unwrap();
        assert_eq!((r, fx), (None, vec![Effect::Retired { spi: 1 }]));
        let zero = RolloutConfig {
            overlap: Duration::ZERO,
            ..cfg()
        };
        let (r, fx) = step(
            None,
            &Event::Rotate { from: 1, to: 2 },
            &[],
            &zero,
            Timestamp(0),
        )
        .unwrap();
        assert_eq!(r, None);
        assert_eq!(fx.len(), 3);
    }

    #[test]
    fn a_node_that_dies_mid_rollout_stops_blocking_it() {
        let t0 = 10_000;
        let mut nodes = vec![node("a", t0, &[5], Some(5)), node("b", t0, &[5], Some(5))];
        let (r, _) = step(
            None,
            &Event::Rotate { from: 5, to: 6 },
            &nodes,
            &cfg(),
            Timestamp(t0),
        )
        .unwrap();
        // a installs and keeps checking in; b dies (its last_seen stays at t0).
        nodes[0].installed = vec![5, 6];
        nodes[0].last_seen = Timestamp(t0 + 4 * MIN);
        let (r, fx) = step(
            r.as_ref(),
            &Event::Tick,
            &nodes,
            &cfg(),
            Timestamp(t0 + 4 * MIN),
        )
        .unwrap();
        assert!(fx.is_empty(), "b is still live at 4 minutes: {fx:?}");
        let now = Timestamp(t0 + 5 * MIN + 1);
        nodes[0].last_seen = now;
        let p = progress(r.as_ref().unwrap(), &nodes, &cfg(), now);
        assert_eq!(
            (p.waiting_for.len(), p.not_live.clone()),
            (0, vec!["b".to_owned()])
        );
        let (r, fx) = step(r.as_ref(), &Event::Tick, &nodes, &cfg(), now).unwrap();
        assert_eq!(fx, vec![Effect::Activated { spi: 6 }]);
        // When b returns it is live again and must switch before the old key retires.
        nodes[0].outbound = Some(6);
        nodes[1].last_seen = Timestamp(now.0 + 10 * MIN);
        nodes[0].last_seen = Timestamp(now.0 + 10 * MIN);
        let (r, fx) = step(
            r.as_ref(),
            &Event::Tick,
            &nodes,
            &cfg(),
            Timestamp(now.0 + 10 * MIN),
        )
        .unwrap();
        assert!(fx.is_empty());
        assert_eq!(
            progress(
                r.as_ref().unwrap(),
                &nodes,
                &cfg(),
                Timestamp(now.0 + 10 * MIN)
            )
            .waiting_for,
            vec!["b"]
        );
    }

    #[test]
    fn a_stuck_rollout_raises_the_alarm_once() {
        let nodes = |t: u64| vec![node("a", t, &[1], Some(1))];
        let (r, _) = step(
            None,
            &Event::Rotate { from: 1, to: 2 },
            &nodes(0),
            &cfg(),
            Timestamp(0),
        )
        .unwrap();
        let t = 30 * MIN + 1;
        let (r, fx) = step(r.as_ref(), &Event::Tick, &nodes(t), &cfg(), Timestamp(t)).unwrap();
        assert_eq!(
            fx,
            vec![Effect::Stuck {
                phase: Phase::Staged,
                waiting_for: vec!["a".into()]
            }]
        );
        assert!(r.as_ref().unwrap().stuck_reported);
        let (_, fx) = step(
            r.as_ref(),
            &Event::Tick,
            &nodes(t + 60),
            &cfg(),
            Timestamp(t + 60),
        )
        .unwrap();
        assert!(fx.is_empty(), "reported once");
    }

    /// Simulates nodes that follow the bundle with random lag, and checks after every step that
    /// each live node's outbound key is installed at every other live node.
    #[test]
    fn no_pair_of_live_nodes_ever_lacks_a_shared_key() {
        // A small deterministic generator keeps the test reproducible without a dependency.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let cfg = RolloutConfig {
            overlap: Duration::from_secs(30),
            ..cfg()
        };
        let mut spi = 14u8;
        let mut nodes: Vec<NodeAcks> = (0..20)
            .map(|i| node(&format!("n{i}"), 0, &[spi], Some(spi)))
            .collect();
        let mut state: Option<Rollout> = None;
        let mut now = 0u64;
        let mut completed = 0;
        while completed < 5 {
            now += 1;
            if state.is_none() {
                let to = KeyId::new(spi).unwrap().next().get();
                state = step(
                    None,
                    &Event::Rotate { from: spi, to },
                    &nodes,
                    &cfg,
                    Timestamp(now),
                )
                .unwrap()
                .0;
            }
            // What keyd's bundle says right now.
            let (keys, outbound): (Vec<u8>, u8) = match &state {
                Some(r) if r.phase == Phase::Staged => (vec![r.to_spi, r.from_spi], r.from_spi),
                Some(r) => (vec![r.to_spi, r.from_spi], r.to_spi),
                None => (vec![spi], spi),
            };
            // Some nodes catch up with the bundle this second (programming order: install new
            // states first, then switch outbound, then remove old states), and acknowledge.
            for n in nodes.iter_mut() {
                if rand(3) == 0 {
                    for k in &keys {
                        if !n.installed.contains(k) {
                            n.installed.push(*k);
                        }
                    }
                    n.outbound = Some(outbound);
                    n.installed.retain(|k| keys.contains(k));
                    n.last_seen = Timestamp(now);
                }
            }
            let live: Vec<&NodeAcks> = nodes
                .iter()
                .filter(|n| is_live(n, &cfg, Timestamp(now)))
                .collect();
            for a in &live {
                for b in &live {
                    let out = a.outbound.unwrap();
                    assert!(
                        b.installed.contains(&out),
                        "at {now}s {} sends with SPI {out} that {} lacks",
                        a.name,
                        b.name
                    );
                }
            }
            let (next, fx) =
                step(state.as_ref(), &Event::Tick, &nodes, &cfg, Timestamp(now)).unwrap();
            if fx.iter().any(|e| matches!(e, Effect::Retired { .. })) {
                spi = state.as_ref().unwrap().to_spi;
                completed += 1;
            }
            state = next;
            assert!(now < 10_000, "rollouts do not complete");
        }
        assert_eq!(spi, 4, "14 -> 15 -> 1 -> 2 -> 3 -> 4 crosses the wrap");
    }

    #[test]
    fn bounds_are_named_when_violated() {
        let mut s = default_schedule(KeyClass::Ipsec);
        let b = Bounds {
            min_period: Some(Duration::from_secs(86_400)),
            max_period: Some(Duration::from_secs(30 * 86_400)),
        };
        assert!(validate_schedule(KeyClass::Ipsec, &s, &b).is_ok());
        s.period = Duration::from_secs(31 * 86_400);
        assert!(
            validate_schedule(KeyClass::Ipsec, &s, &b)
                .unwrap_err()
                .contains("max_period = 30d")
        );
        s.period = Duration::from_secs(3600);
        assert!(
            validate_schedule(KeyClass::Ipsec, &s, &b)
                .unwrap_err()
                .contains("min_period = 1d")
        );
        s.period = Duration::from_secs(86_400);
        s.overlap = s.period;
        assert!(
            validate_schedule(KeyClass::Ipsec, &s, &b)
                .unwrap_err()
                .contains("overlap")
        );
        assert!(
            validate_bounds(&Bounds {
                min_period: b.max_period,
                max_period: b.min_period
            })
            .is_err()
        );
    }

    #[test]
    fn windows() {
        // 1970-01-05 was a Monday.
        let monday = 4 * 86_400;
        let w = MaintenanceWindow {
            days: vec!["mon".into()],
            start_hour: 2,
            end_hour: 4,
        };
        assert!(!window_open(&w, Timestamp(monday + 3600)));
        assert!(window_open(&w, Timestamp(monday + 2 * 3600)));
        assert!(window_open(&w, Timestamp(monday + 4 * 3600 - 1)));
        assert!(!window_open(&w, Timestamp(monday + 4 * 3600)));
        assert!(
            !window_open(&w, Timestamp(monday + 86_400 + 2 * 3600)),
            "tuesday"
        );
        assert_eq!(
            next_window_start(&w, Timestamp(monday + 5 * 3600)),
            Timestamp(monday + 7 * 86_400 + 2 * 3600)
        );
        // Wrapping past midnight: Friday 22:00 to Saturday 02:00 belongs to Friday.
        let friday = monday + 4 * 86_400;
        let wrap = MaintenanceWindow {
            days: vec!["fri".into()],
            start_hour: 22,
            end_hour: 2,
        };
        assert!(window_open(&wrap, Timestamp(friday + 23 * 3600)));
        assert!(window_open(&wrap, Timestamp(friday + 86_400 + 3600)));
        assert!(
            !window_open(&wrap, Timestamp(friday + 3600)),
            "thursday night's part"
        );
        assert!(
            validate_window(&MaintenanceWindow {
                days: vec!["funday".into()],
                start_hour: 1,
                end_hour: 2
            })
            .is_err()
        );
        assert!(
            validate_window(&MaintenanceWindow {
                days: vec![],
                start_hour: 3,
                end_hour: 3
            })
            .is_err()
        );
    }

    #[test]
    fn due_times_respect_pause_and_window() {
        let monday = 4 * 86_400;
        let mut s = Schedule {
            period: Duration::from_secs(86_400),
            overlap: Duration::ZERO,
            window: None,
            paused: false,
        };
        let last = Timestamp(monday);
        assert_eq!(next_due(&s, last), Timestamp(monday + 86_400));
        assert!(!is_due(&s, last, Timestamp(monday + 86_399)));
        assert!(is_due(&s, last, Timestamp(monday + 86_400)));
        s.paused = true;
        assert!(!is_due(&s, last, Timestamp(monday + 10 * 86_400)));
        s.paused = false;
        s.window = Some(MaintenanceWindow {
            days: vec!["wed".into()],
            start_hour: 1,
            end_hour: 2,
        });
        let wednesday_1am = Timestamp(monday + 2 * 86_400 + 3600);
        assert_eq!(next_due(&s, last), wednesday_1am);
        assert!(!is_due(&s, last, Timestamp(monday + 86_400)));
        assert!(is_due(&s, last, wednesday_1am));
        // Missed while down: due as soon as the window is open again.
        assert!(!is_due(&s, last, Timestamp(wednesday_1am.0 + 3600)));
        assert!(is_due(&s, last, Timestamp(wednesday_1am.0 + 7 * 86_400)));
    }
}
