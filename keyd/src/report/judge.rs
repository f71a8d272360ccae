//! Turns the gathered numbers into findings: which keys were overdue or beyond their bounds,
//! which policies were not enforced everywhere, and whether the audit log verifies.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keyd_proto::rules::DataplaneSummary;
use keyd_proto::{ClassReport, KeyClass, Timestamp};

use super::collect::{Collected, EXCEPTIONS, Window};
use super::{
    AdmissionEvidence, CheckpointRef, ClassEvidence, CustodyEvidence, DataplaneEvidence,
    EvidenceReport, FORMAT, IntegrityEvidence, PolicyEvidence, human_secs,
};
use crate::rotation;

/// Keys drawn per class; older ones in the period are counted, not drawn.
pub const MAX_KEYS_SHOWN: usize = 200;

/// What keyd knows now, besides the log.
#[derive(Debug, Clone)]
pub struct Context {
    pub generated_at: Timestamp,
    pub generated_by: String,
    /// keyd's own class reports, when the period ends now.
    pub current: Option<Vec<ClassReport>>,
    pub custody_backend: String,
    pub custody_key_id: String,
    pub custody_health: String,
    pub dataplane: DataplaneSummary,
    /// Policies keyd refuses to compile, with why.
    pub rejected_policies: BTreeMap<String, String>,
    pub public_key: String,
    pub key_id: String,
    /// Checkpoints in the log: (checkpoint, signature and hash verified).
    pub checkpoints: Vec<(CheckpointRef, bool)>,
}

/// Seconds of `[from, to]` inside `[since, until]`.
fn overlap(from: u64, to: u64, since: u64, until: u64) -> u64 {
    to.min(until).saturating_sub(from.max(since))
}

pub fn assemble(window: &Window, mut c: Collected, ctx: Context) -> EvidenceReport {
    let (since, until) = (window.since, window.until);
    let mut findings = Vec::new();
    let mut classes = Vec::new();
    for class in KeyClass::ALL {
        let g = c.classes.remove(&class).unwrap_or_default();
        // The collector falls back to the schedule in force now.
        let rules_now = g.rules_at_end.clone();
        let grace = Duration::from_secs(window.grace_secs);
        // How long a key activated at `a` may be in use, as keyd's own report counts it.
        let limit_of = |r: &super::collect::ClassRules, a: Timestamp| {
            rotation::overdue_after(&r.schedule, a, grace)
        };
        // Seconds of `[from, in_use_until]` in the period, and the whole span, when the key
        // was in use past `from`.
        let past = |from: u64, in_use_until: Timestamp| {
            (in_use_until.0 > from).then(|| {
                (
                    overlap(from, in_use_until.0, since.0, until.0),
                    in_use_until.0 - from,
                )
            })
        };
        let (mut overdue_secs, mut beyond_secs) = (0u64, 0u64);
        let mut reasons = Vec::new();
        // First every key's verdict (a rotation is judged by the key it replaced, which may
        // lie before the period), then what the period shows.
        let mut all = g.keys;
        for (k, rules) in all.iter_mut().zip(&g.rules_at_activation) {
            let Some(a) = k.active_from else { continue };
            let limit = limit_of(rules, a);
            let due_by = a.0.saturating_add(limit);
            let in_use_until = k.superseded.unwrap_or(until).min(until);
            if let Some(s) = k.superseded {
                k.on_schedule = Some(s.0 <= due_by);
            }
            if let Some((secs, total)) = past(due_by, in_use_until) {
                k.overdue_from = Some(Timestamp(due_by));
                overdue_secs += secs;
                if secs > 0 {
                    reasons.push(format!(
                        "{} was in use {} past its schedule (due by {})",
                        k.label,
                        human_secs(total),
                        Timestamp(due_by)
                    ));
                }
            }
            let bound = rules.bounds.max_period.map(|max| {
                a.0.saturating_add(rotation::beyond_bounds_after(max, &rules.schedule, grace))
            });
            if let Some(bound) = bound
                && let Some((secs, total)) = past(bound, in_use_until)
            {
                k.beyond_bounds_from = Some(Timestamp(bound));
                beyond_secs += secs;
                if secs > 0 {
                    reasons.push(format!(
                        "{} was in use {} beyond the max_period bound",
                        k.label,
                        human_secs(total)
                    ));
                }
            }
        }
        let (mut rotations, mut on_time, mut late) = (0u64, 0u64, 0u64);
        for (i, k) in all.iter().enumerate() {
            // A rotation that took effect in the period: this key replaced one.
            let prev = g.predecessors.get(i).copied().flatten();
            if let (Some(p), Some(a)) = (prev, k.active_from)
                && a >= since
                && a <= until
            {
                rotations += 1;
                if all[p].on_schedule == Some(false) {
                    late += 1;
                } else {
                    on_time += 1;
                }
            }
        }
        let mut keys: Vec<_> = all
            .into_iter()
            .filter(|k| {
                let start = k.created.or(k.staged).or(k.active_from);
                !(start.is_some_and(|s| s > until) || k.retired.unwrap_or(until) < since)
            })
            .collect();
        if keys.len() > MAX_KEYS_SHOWN {
            let cut = keys.len() - MAX_KEYS_SHOWN;
            keys.drain(..cut);
        }
        let current = ctx
            .current
            .as_ref()
            .and_then(|all| all.iter().find(|r| r.class == class).cloned());
        if keys.is_empty() {
            // The records of its creation were pruned (or predate the log): keyd's own view
            // still dates the key in use.
            match current.as_ref().and_then(|c| c.last_rotation) {
                Some(at) => {
                    let limit = rules_now.as_ref().map_or(u64::MAX, |r| limit_of(r, at));
                    let due_by = at.0.saturating_add(limit);
                    let overdue = (until.0 > due_by).then_some(Timestamp(due_by));
                    keys.push(super::KeyLife {
                        label: "current key (created before the retained log)".into(),
                        created: None,
                        staged: None,
                        active_from: Some(at),
                        superseded: None,
                        retired: None,
                        overdue_from: overdue,
                        beyond_bounds_from: None,
                        on_schedule: None,
                    });
                }
                None => reasons.push(
                    "no key of this class in the period (the records of its creation may have \
                     been pruned)"
                        .into(),
                ),
            }
        }
        if let Some(cur) = &current
            && (cur.overdue || !cur.within_bounds)
            && let Some(d) = &cur.detail
        {
            let line = format!("now: {d}");
            if !reasons.contains(&line) {
                reasons.push(line);
            }
        }
        let (schedule, bounds) = rules_now
            .clone()
            .map(|r| (r.schedule, r.bounds))
            .unwrap_or_else(|| (crate::rotation::default_schedule(class), Default::default()));
        let overdue_after_secs =
            schedule.period.as_secs() + schedule.overlap.as_secs() + window.grace_secs;
        for r in &reasons {
            findings.push(format!("{}: {r}", class.as_str()));
        }
        classes.push(ClassEvidence {
            class,
            compliant: reasons.is_empty(),
            reasons,
            schedule,
            bounds,
            overdue_after_secs,
            keys,
            rotations,
            rotations_on_schedule: on_time,
            rotations_late: late,
            overdue_secs,
            beyond_bounds_secs: beyond_secs,
            schedule_changes: g.changes,
            rollouts: g
                .rollouts
                .into_iter()
                .filter(|r| r.staged <= until && r.retired.is_none_or(|t| t >= since))
                .collect(),
            current,
        });
    }

    // Policies: every name the log or the nodes or keyd's compiler mention.
    let mut names: BTreeSet<String> = c.policy_admissions.keys().cloned().collect();
    names.extend(c.policy_drops.keys().cloned());
    names.extend(ctx.dataplane.policies.iter().map(|p| p.name.clone()));
    names.extend(ctx.rejected_policies.keys().cloned());
    let mut policies = Vec::new();
    for name in names {
        let admissions = c.policy_admissions.remove(&name).unwrap_or_default();
        let (drop_packets, drop_bytes) = c.policy_drops.get(&name).copied().unwrap_or_default();
        let dataplane = ctx
            .dataplane
            .policies
            .iter()
            .find(|p| p.name == name)
            .cloned();
        let rejected = ctx.rejected_policies.get(&name).cloned();
        let mut reasons = Vec::new();
        if let Some(r) = &rejected {
            reasons.push(format!("keyd cannot enforce it: {r}"));
        }
        if let Some(d) = &dataplane {
            if d.nodes_programmed < d.nodes_reporting {
                reasons.push(format!(
                    "programmed on {} of {} reporting nodes",
                    d.nodes_programmed, d.nodes_reporting
                ));
            }
            if d.clear_packets > 0 {
                reasons.push(format!(
                    "{} covered packets ({} bytes) left a node in the clear",
                    d.clear_packets, d.clear_bytes
                ));
            }
        }
        let exceptions: u64 = EXCEPTIONS.iter().filter_map(|o| admissions.get(*o)).sum();
        if exceptions > 0 {
            reasons.push(format!(
                "{exceptions} workloads admitted as exceptions (break-glass, warn or audit mode)"
            ));
        }
        for r in &reasons {
            findings.push(format!("policy {name}: {r}"));
        }
        policies.push(PolicyEvidence {
            name,
            compliant: reasons.is_empty(),
            reasons,
            admissions,
            strict_drop_packets: drop_packets,
            strict_drop_bytes: drop_bytes,
            dataplane,
            rejected,
        });
    }
    let unattributed: u64 = c
        .exceptions
        .iter()
        .filter(|e| e.policies.is_empty())
        .count() as u64;
    if unattributed > 0 {
        findings.push(format!(
            "admission: {unattributed} workloads no policy covered were admitted as exceptions \
             (break-glass, warn or audit mode)"
        ));
    }

    // Custody.
    let mut outage_secs = 0;
    for o in &mut c.outages {
        let to = o.to.unwrap_or(until).min(until);
        if o.to.is_none() {
            o.secs = to.0.saturating_sub(o.from.0);
        }
        outage_secs += overlap(o.from.0, to.0, since.0, until.0);
    }
    let outages = c
        .outages
        .into_iter()
        .filter(|o| o.from <= until && o.to.is_none_or(|t| t >= since))
        .collect();
    if c.custody_transitions_lost > 0 {
        findings.push(format!(
            "custody: {} changes of the KEK custodian's health were not recorded, so outages \
             may be missing",
            c.custody_transitions_lost
        ));
    }
    let custody_events = c
        .custody_events
        .into_iter()
        .filter(|e| e.at >= since && e.at <= until)
        .collect();

    // Integrity.
    let mut checkpoints_verified = 0;
    let mut cp_error = None;
    for (cp, ok) in &ctx.checkpoints {
        // Every checkpoint listed lies in the records read, so its record's hash is known.
        let hash_ok = c.hashes.get(&cp.seq).is_some_and(|h| *h == cp.hash);
        if *ok && hash_ok {
            checkpoints_verified += 1;
        } else if cp_error.is_none() {
            cp_error = Some(format!(
                "the checkpoint at record {} does not verify against the log",
                cp.seq
            ));
        }
    }
    let last_checkpoint = match c.last_seq {
        Some(last) => ctx
            .checkpoints
            .iter()
            .find(|(cp, ok)| *ok && cp.seq >= last)
            .map(|(cp, _)| cp.clone()),
        None => None,
    }
    .or_else(|| ctx.checkpoints.last().map(|(cp, _)| cp.clone()));
    let chain_error = c.chain_error.or(cp_error);
    if let Some(e) = &chain_error {
        findings.push(format!("audit log: {e}"));
    }
    let dataplane_available = !ctx.dataplane.nodes.is_empty();
    EvidenceReport {
        format: FORMAT.into(),
        generated_at: ctx.generated_at,
        generated_by: ctx.generated_by,
        since,
        until,
        compliant: findings.is_empty(),
        findings,
        classes,
        policies,
        custody: CustodyEvidence {
            backend: ctx.custody_backend,
            key_id: ctx.custody_key_id,
            health_now: ctx.custody_health,
            events: custody_events,
            outages,
            outage_secs,
        },
        admission: AdmissionEvidence {
            totals: c.admission_totals,
            by_namespace: c.namespaces,
            other_namespaces: c.other_namespaces,
            bucket_secs: c.bucket_secs,
            buckets: c.buckets,
            exceptions: c.exceptions,
            exceptions_total: c.exceptions_total,
        },
        dataplane: DataplaneEvidence {
            available: dataplane_available,
            note: if dataplane_available {
                format!(
                    "{} nodes report data-plane counters; the per-policy figures are their \
                     latest cumulative counters",
                    ctx.dataplane.nodes.len()
                )
            } else {
                "no node reports data-plane counters (node-shim reports them once it enforces \
                 EncryptionPolicies, with keyd's [policy] watcher on): this section is empty"
                    .into()
            },
            nodes_reporting: ctx.dataplane.nodes.len() as u64,
            strict_drops_by_node: c.drops_by_node,
        },
        integrity: IntegrityEvidence {
            first_seq: c.first_seq,
            last_seq: c.last_seq,
            records_in_period: c.records_in_period,
            records_verified: c.records_verified,
            chain_verified: chain_error.is_none(),
            chain_error,
            checkpoints_verified,
            last_checkpoint,
            public_key: ctx.public_key,
            key_id: ctx.key_id,
        },
    }
}

#[cfg(test)]
mod tests {

    use keyd_proto::{Bounds, MaintenanceWindow, Schedule};

    use super::*;
    use crate::report::KeyLife;
    use crate::report::collect::{ClassGathered, ClassRules};

    fn at(s: &str) -> Timestamp {
        Timestamp::from_system(humantime::parse_rfc3339(s).unwrap())
    }

    fn life(label: &str, active: Timestamp, superseded: Option<Timestamp>) -> KeyLife {
        KeyLife {
            label: label.into(),
            created: Some(active),
            staged: None,
            active_from: Some(active),
            superseded,
            retired: superseded,
            overdue_from: None,
            beyond_bounds_from: None,
            on_schedule: None,
        }
    }

    fn context() -> Context {
        Context {
            generated_at: at("2026-12-20T00:00:00Z"),
            generated_by: "admin/test".into(),
            current: None,
            custody_backend: "local".into(),
            custody_key_id: "k".into(),
            custody_health: "ok".into(),
            dataplane: DataplaneSummary::default(),
            rejected_policies: BTreeMap::new(),
            public_key: String::new(),
            key_id: String::new(),
            checkpoints: vec![],
        }
    }

    /// A daily schedule whose window opens at 02:00 UTC: a key activated at 10:00 is due the
    /// next day at 10:00 but may wait for the window the day after, so a replacement at 01:00
    /// two days later is on schedule; a replacement after 02:00 plus the grace is late.
    #[test]
    fn the_window_wait_counts_and_rotations_are_judged_by_the_key_they_replaced() {
        let rules = ClassRules {
            schedule: Schedule {
                period: Duration::from_secs(86_400),
                overlap: Duration::ZERO,
                window: Some(MaintenanceWindow {
                    days: vec![],
                    start_hour: 2,
                    end_hour: 3,
                }),
                paused: false,
            },
            bounds: Bounds::default(),
        };
        let (a, b, c) = (
            at("2026-12-07T10:00:00Z"),
            at("2026-12-09T01:00:00Z"),
            at("2026-12-11T03:00:00Z"),
        );
        let gathered = ClassGathered {
            keys: vec![
                life("SPI 1", a, Some(b)),
                life("SPI 2", b, Some(c)),
                life("SPI 3", c, None),
            ],
            predecessors: vec![None, Some(0), Some(1)],
            rules_at_activation: vec![rules.clone(), rules.clone(), rules.clone()],
            rules_at_end: Some(rules.clone()),
            ..ClassGathered::default()
        };
        let window = Window {
            since: at("2026-12-08T00:00:00Z"),
            until: at("2026-12-11T12:00:00Z"),
            now_rules: BTreeMap::new(),
            grace_secs: 1800,
        };
        let collected = Collected {
            classes: BTreeMap::from([(KeyClass::Ipsec, gathered)]),
            ..Collected::default()
        };
        let r = assemble(&window, collected, context());
        let ipsec = r
            .classes
            .iter()
            .find(|c| c.class == KeyClass::Ipsec)
            .unwrap();
        // SPI 2 (from 12-09 01:00) was due 12-10 01:00, window 12-10 02:00, plus 30 min grace:
        // replaced at 12-11 03:00, so late by a day and 30 minutes.
        assert_eq!(
            ipsec.keys[0].on_schedule,
            Some(true),
            "the window's wait counts"
        );
        assert_eq!(ipsec.keys[1].on_schedule, Some(false));
        assert_eq!(
            (
                ipsec.rotations,
                ipsec.rotations_on_schedule,
                ipsec.rotations_late
            ),
            (2, 1, 1)
        );
        assert_eq!(ipsec.overdue_secs, 86_400 + 1800);
        assert_eq!(ipsec.keys[1].overdue_from, Some(at("2026-12-10T02:30:00Z")));
        assert!(!ipsec.compliant && !r.compliant);
        assert!(r.findings[0].starts_with("ipsec: SPI 2 was in use 1d 0h past its schedule"));
        // The other classes had no key and no live view to date one from.
        assert!(r.findings.iter().any(|f| f.starts_with("kek: no key")));
    }

    #[test]
    fn a_lost_custodian_change_and_an_unverified_checkpoint_are_findings() {
        let window = Window {
            since: at("2026-12-08T00:00:00Z"),
            until: at("2026-12-09T00:00:00Z"),
            now_rules: BTreeMap::new(),
            grace_secs: 0,
        };
        let mut ctx = context();
        ctx.dataplane.policies = vec![keyd_proto::rules::PolicyDataplane {
            name: "pii".into(),
            nodes_reporting: 3,
            nodes_programmed: 2,
            clear_packets: 4,
            clear_bytes: 400,
            ..Default::default()
        }];
        ctx.rejected_policies = BTreeMap::from([("bad".to_owned(), "no selector".to_owned())]);
        ctx.checkpoints = vec![(
            CheckpointRef {
                seq: 7,
                hash: "ab".into(),
                at: window.until,
            },
            true,
        )];
        let collected = Collected {
            custody_transitions_lost: 3,
            last_seq: Some(7),
            // Record 7 was read with another hash than the checkpoint vouches for.
            hashes: std::collections::HashMap::from([(7, "cd".to_owned())]),
            ..Collected::default()
        };
        let r = assemble(&window, collected, ctx);
        assert!(
            r.findings
                .iter()
                .any(|f| f.contains("3 changes of the KEK custodian"))
        );
        assert!(!r.integrity.chain_verified);
        assert!(
            r.integrity
                .chain_error
                .as_deref()
                .unwrap()
                .contains("record 7")
        );
        assert_eq!(r.integrity.checkpoints_verified, 0);
        let pii = r.policies.iter().find(|p| p.name == "pii").unwrap();
        assert_eq!(
            pii.reasons,
            [
                "programmed on 2 of 3 reporting nodes",
                "4 covered packets (400 bytes) left a node in the clear"
            ]
        );
        let bad = r.policies.iter().find(|p| p.name == "bad").unwrap();
        assert_eq!(bad.reasons, ["keyd cannot enforce it: no selector"]);
    }
}
