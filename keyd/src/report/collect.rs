//! One pass over the audit log that gathers the report's numbers.
//!
//! The collector takes records in order from the log's first retained record (a key's life
//! began before the period it is judged in) and keeps only aggregates: one entry per key, per
//! rollout, per namespace, per custodian outage and per listed exception, and fixed-size time
//! buckets, so its memory does not grow with the number of records. It also re-checks the
//! hash chain as it goes.

use std::collections::{BTreeMap, HashMap};

use keyd_proto::{Bounds, KeyClass, Schedule, Timestamp};
use serde_json::Value;

use super::{
    AdmissionException, CustodyEvent, KeyLife, NamespaceAdmissions, Outage, Rollout, RolloutStuck,
    ScheduleChange, SkippedNode,
};
use crate::store::AuditRecord;

/// Exceptions listed one by one; beyond, they are counted.
pub const MAX_EXCEPTIONS: usize = 10_000;
/// Namespaces listed one by one; beyond, they are summed as "other".
pub const MAX_NAMESPACES: usize = 1_000;
/// Time buckets of the admission chart.
pub const BUCKETS: u64 = 48;
/// Outcomes counted as exceptions: admitted without the encryption a policy asks for.
pub const EXCEPTIONS: [&str; 3] = ["break_glass", "warned", "audited"];

/// A class's schedule and bounds at some time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassRules {
    pub schedule: Schedule,
    pub bounds: Bounds,
}

/// What the collector needs to know besides the records.
#[derive(Debug, Clone)]
pub struct Window {
    pub since: Timestamp,
    pub until: Timestamp,
    /// The schedules in force now (the ones before the first change are read from it).
    pub now_rules: BTreeMap<KeyClass, ClassRules>,
    /// A rollout's allowed wait, counted into "overdue" as `keyctl report` does.
    pub grace_secs: u64,
}

#[derive(Debug, Default)]
struct ClassState {
    keys: Vec<KeyLife>,
    /// For each key, the key in use when it took over (an index into `keys`).
    predecessors: Vec<Option<usize>>,
    /// The key in use: an index into `keys`.
    current: Option<usize>,
    /// IPsec: the open life of each SPI (SPIs are reused over time).
    by_spi: HashMap<u8, usize>,
    /// (at, before) of each schedule change, to know the schedule in force at a past time.
    rule_changes: Vec<(Timestamp, ClassRules)>,
    changes: Vec<ScheduleChange>,
    rollouts: Vec<Rollout>,
}

/// The numbers gathered from the records, before they are judged.
#[derive(Debug, Default)]
pub struct Collected {
    pub classes: BTreeMap<KeyClass, ClassGathered>,
    pub custody_events: Vec<CustodyEvent>,
    pub outages: Vec<Outage>,
    /// Custodian health changes keyd could not record (`kek.custodian.transitions_lost`).
    pub custody_transitions_lost: u64,
    pub admission_totals: BTreeMap<String, u64>,
    pub namespaces: Vec<NamespaceAdmissions>,
    pub other_namespaces: BTreeMap<String, u64>,
    pub bucket_secs: u64,
    pub buckets: Vec<BTreeMap<String, u64>>,
    pub exceptions: Vec<AdmissionException>,
    pub exceptions_total: u64,
    /// Per policy: admissions by outcome, strict-drop packets and bytes.
    pub policy_admissions: BTreeMap<String, BTreeMap<String, u64>>,
    pub policy_drops: BTreeMap<String, (u64, u64)>,
    pub drops_by_node: BTreeMap<String, u64>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records_in_period: u64,
    pub records_verified: u64,
    pub chain_error: Option<String>,
    /// The hashes of the records that checkpoints name, to match against their signatures.
    pub hashes: HashMap<u64, String>,
}

#[derive(Debug, Default)]
pub struct ClassGathered {
    pub keys: Vec<KeyLife>,
    /// For each key, the one it replaced (an index into `keys`).
    pub predecessors: Vec<Option<usize>>,
    /// The schedule and bounds in force at the period's end.
    pub rules_at_end: Option<ClassRules>,
    pub changes: Vec<ScheduleChange>,
    pub rollouts: Vec<Rollout>,
    /// The schedule in force from each key's activation, as (period + overlap) seconds and
    /// the max_period bound, in `keys` order.
    pub rules_at_activation: Vec<ClassRules>,
}

/// Feeds on records in log order; see the module documentation.
#[derive(Debug)]
pub struct Collector {
    window: Window,
    classes: BTreeMap<KeyClass, ClassState>,
    out: Collected,
    ns_index: HashMap<String, usize>,
    open_outage: Option<usize>,
    prev_hash: Option<String>,
    /// Checkpoint seqs whose record hash must be remembered for the signature check.
    wanted: std::collections::HashSet<u64>,
}

fn ts(v: &Value) -> Option<Timestamp> {
    serde_json::from_value(v.clone()).ok()
}

fn text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl Collector {
    /// `checkpoint_seqs`: the records whose hashes the caller will check signatures against.
    /// `anchor`: the hash the first record fed must link to (the signed segment-end checkpoint
    /// a prune left), or `None` when the log starts at its first record.
    pub fn new(
        window: Window,
        checkpoint_seqs: impl IntoIterator<Item = u64>,
        anchor: Option<String>,
    ) -> Self {
        let span = window.until.0.saturating_sub(window.since.0).max(1);
        let bucket_secs = span.div_ceil(BUCKETS).max(60);
        let buckets = vec![BTreeMap::new(); span.div_ceil(bucket_secs) as usize];
        Self {
            classes: KeyClass::ALL
                .iter()
                .map(|c| (*c, ClassState::default()))
                .collect(),
            out: Collected {
                bucket_secs,
                buckets,
                ..Collected::default()
            },
            window,
            ns_index: HashMap::new(),
            open_outage: None,
            prev_hash: anchor,
            wanted: checkpoint_seqs.into_iter().collect(),
        }
    }

    fn in_period(&self, at: Timestamp) -> bool {
        at >= self.window.since && at <= self.window.until
    }

    /// One record, in log order. Records after the period are only hash-checked.
    pub fn feed(&mut self, rec: &AuditRecord) {
        self.out.records_verified += 1;
        if self.out.chain_error.is_none() {
            if rec.compute_hash() != rec.hash {
                self.out.chain_error = Some(format!(
                    "record {} does not match its hash: it was changed",
                    rec.seq
                ));
            } else if self.prev_hash.as_ref().is_some_and(|h| *h != rec.prev_hash) {
                self.out.chain_error = Some(format!(
                    "record {} does not link to record {}: the chain is broken there",
                    rec.seq,
                    rec.seq.saturating_sub(1)
                ));
            }
        }
        self.prev_hash = Some(rec.hash.clone());
        if self.wanted.contains(&rec.seq) {
            self.out.hashes.insert(rec.seq, rec.hash.clone());
        }
        if rec.at > self.window.until {
            // A later schedule change still says which schedule was in force before it.
            if rec.event.action.starts_with("schedule.") {
                self.schedule_change(rec);
            }
            return;
        }
        let in_period = self.in_period(rec.at);
        if in_period {
            self.out.records_in_period += 1;
            self.out.first_seq.get_or_insert(rec.seq);
            self.out.last_seq = Some(rec.seq);
        }
        let d = &rec.event.details;
        let action = rec.event.action.as_str();
        match action {
            a if a.starts_with("ipsec.key.") => self.ipsec_key(rec, &a["ipsec.key.".len()..]),
            "ipsec.rollout.stuck" => {
                if let Some(r) = self.open_rollout() {
                    r.stuck.push(RolloutStuck {
                        at: rec.at,
                        phase: text(d, "phase"),
                        waiting_for: d["waiting_for"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .take(100)
                                    .map(|v| v.as_str().unwrap_or_default().to_owned())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
            }
            "ipsec.rollout.node_skipped" => {
                let actor = rec.event.actor.clone();
                if let Some(r) = self.open_rollout() {
                    r.skipped.push(SkippedNode {
                        at: rec.at,
                        node: text(d, "node"),
                        by: actor,
                    });
                }
            }
            "wireguard.psk_master.generated" => {
                let epoch = text(d, "epoch");
                self.begin(KeyClass::WireguardPsk, format!("epoch {epoch}"), rec.at);
                self.begin(KeyClass::WireguardNodeKeys, "initial".into(), rec.at);
            }
            "wireguard.psk.rotated" => {
                let epoch = text(d, "epoch");
                self.begin(KeyClass::WireguardPsk, format!("epoch {epoch}"), rec.at);
            }
            "wireguard.node_key_epoch.started" => {
                let epoch = text(d, "epoch");
                self.begin(
                    KeyClass::WireguardNodeKeys,
                    format!("epoch {epoch}"),
                    rec.at,
                );
            }
            "kek.custodian.initialised" => {
                self.begin(KeyClass::Kek, text(d, "custodian"), rec.at);
                self.custody_event(rec, text(d, "custodian"));
            }
            "kek.migration.started" => {
                let to = text(d, "target");
                let to = if to.is_empty() { text(d, "to") } else { to };
                let current = self.classes[&KeyClass::Kek]
                    .current
                    .map(|i| self.classes[&KeyClass::Kek].keys[i].label.clone());
                if current.as_deref() != Some(to.as_str()) {
                    self.begin(KeyClass::Kek, to.clone(), rec.at);
                }
                self.custody_event(rec, format!("{} to {to}", text(d, "kind")));
            }
            "kek.migration.completed" => {
                let c = self.classes.entry(KeyClass::Kek).or_default();
                let current = c.current;
                for (i, k) in c.keys.iter_mut().enumerate() {
                    if Some(i) != current && k.retired.is_none() {
                        k.retired = Some(rec.at);
                    }
                }
                self.custody_event(
                    rec,
                    format!(
                        "{} records rewrapped, {} failed",
                        text(d, "rewrapped"),
                        text(d, "failed")
                    ),
                );
            }
            "kek.migration.resumed" | "kek.migration.refused" => {
                self.custody_event(rec, String::new());
            }
            // Written as the custodian goes down. A second one while one is open is the same
            // outage seen again (keyd restarted meanwhile): the first start stands.
            "kek.custodian.unavailable" if self.open_outage.is_none() => {
                self.out.outages.push(Outage {
                    from: rec.at,
                    to: None,
                    secs: 0,
                    backend: text(d, "backend"),
                    reason: text(d, "reason"),
                });
                self.open_outage = Some(self.out.outages.len() - 1);
            }
            "kek.custodian.recovered" => {
                // `seconds` is the custodian's own measure: it dates the start when the two
                // records were written together (held back by a store failure), and only then:
                // otherwise the records' own times are the log's word.
                let started =
                    Timestamp(rec.at.0.saturating_sub(d["seconds"].as_u64().unwrap_or(0)));
                let i = match self.open_outage.take() {
                    Some(i) => i,
                    None => {
                        self.out.outages.push(Outage {
                            from: started,
                            to: None,
                            secs: 0,
                            backend: text(d, "backend"),
                            reason: String::new(),
                        });
                        self.out.outages.len() - 1
                    }
                };
                let o = &mut self.out.outages[i];
                if o.from >= rec.at {
                    o.from = started;
                }
                o.to = Some(rec.at);
                o.secs = rec.at.0.saturating_sub(o.from.0);
            }
            "kek.custodian.transitions_lost" => {
                self.out.custody_transitions_lost += d["lost"].as_u64().unwrap_or(0);
            }
            "schedule.changed"
            | "schedule.paused"
            | "schedule.resumed"
            | "schedule.bounds_changed" => self.schedule_change(rec),
            a if a.starts_with("admission.") && in_period => self.admission(rec),
            "dataplane.strict_drops" if in_period => {
                let node = text(d, "node");
                for drop in d["drops"].as_array().into_iter().flatten() {
                    let packets = drop["packets"].as_u64().unwrap_or(0);
                    let bytes = drop["bytes"].as_u64().unwrap_or(0);
                    let e = self
                        .out
                        .policy_drops
                        .entry(text(drop, "policy"))
                        .or_default();
                    e.0 = e.0.saturating_add(packets);
                    e.1 = e.1.saturating_add(bytes);
                    let n = self.out.drops_by_node.entry(node.clone()).or_default();
                    *n = n.saturating_add(packets);
                }
            }
            _ => {}
        }
    }

    fn custody_event(&mut self, rec: &AuditRecord, detail: String) {
        self.out.custody_events.push(CustodyEvent {
            at: rec.at,
            action: rec.event.action.clone(),
            actor: rec.event.actor.clone(),
            detail,
        });
    }

    fn open_rollout(&mut self) -> Option<&mut Rollout> {
        self.classes
            .get_mut(&KeyClass::Ipsec)?
            .rollouts
            .last_mut()
            .filter(|r| r.retired.is_none())
    }

    /// A new key in use for `class` from `at`; the one before is superseded.
    fn begin(&mut self, class: KeyClass, label: String, at: Timestamp) -> usize {
        let c = self.classes.entry(class).or_default();
        c.predecessors.push(c.current);
        if let Some(prev) = c.current {
            c.keys[prev].superseded = Some(at);
            if class != KeyClass::Ipsec && class != KeyClass::Kek {
                // Epochs end when the next begins.
                c.keys[prev].retired = Some(at);
            }
        }
        c.keys.push(KeyLife {
            label,
            created: Some(at),
            staged: None,
            active_from: Some(at),
            superseded: None,
            retired: None,
            overdue_from: None,
            beyond_bounds_from: None,
            on_schedule: None,
        });
        c.current = Some(c.keys.len() - 1);
        c.keys.len() - 1
    }

    fn ipsec_key(&mut self, rec: &AuditRecord, what: &str) {
        let d = &rec.event.details;
        let Some(spi) = d["spi"].as_u64().and_then(|s| u8::try_from(s).ok()) else {
            return;
        };
        let at = rec.at;
        let c = self.classes.entry(KeyClass::Ipsec).or_default();
        let life = |c: &mut ClassState| -> usize {
            if let Some(i) = c.by_spi.get(&spi) {
                return *i;
            }
            c.keys.push(KeyLife {
                label: format!("SPI {spi}"),
                created: None,
                staged: None,
                active_from: None,
                superseded: None,
                retired: None,
                overdue_from: None,
                beyond_bounds_from: None,
                on_schedule: None,
            });
            c.predecessors.push(None);
            c.by_spi.insert(spi, c.keys.len() - 1);
            c.keys.len() - 1
        };
        match what {
            "generated" | "imported" => {
                // A reused SPI starts a new life.
                c.by_spi.remove(&spi);
                let i = life(c);
                c.keys[i].created = Some(at);
            }
            "staged" => {
                let i = life(c);
                c.keys[i].staged = Some(at);
                let from_spi = c
                    .current
                    .and_then(|cur| c.keys[cur].label.strip_prefix("SPI ")?.parse().ok());
                c.rollouts.push(Rollout {
                    from_spi,
                    to_spi: spi,
                    staged: at,
                    activated: None,
                    retired: None,
                    stage_wait_secs: None,
                    activate_wait_secs: None,
                    stuck: vec![],
                    skipped: vec![],
                });
            }
            "activated" => {
                let i = life(c);
                if let Some(prev) = c.current.filter(|p| *p != i) {
                    c.keys[prev].superseded = Some(at);
                    c.predecessors[i] = Some(prev);
                }
                c.keys[i].active_from = Some(at);
                c.current = Some(i);
                if let Some(r) = c
                    .rollouts
                    .last_mut()
                    .filter(|r| r.to_spi == spi && r.activated.is_none())
                {
                    r.activated = Some(at);
                    r.stage_wait_secs = Some(at.0.saturating_sub(r.staged.0));
                }
            }
            "retired" => {
                let i = life(c);
                c.keys[i].retired = Some(at);
                c.by_spi.remove(&spi);
                // The rollout in progress ends when its old key leaves (after a prune its
                // start may not have named that key).
                if let Some(r) = c
                    .rollouts
                    .last_mut()
                    .filter(|r| r.activated.is_some() && r.retired.is_none() && r.to_spi != spi)
                {
                    r.from_spi.get_or_insert(spi);
                    r.retired = Some(at);
                    r.activate_wait_secs = r.activated.map(|a| at.0.saturating_sub(a.0));
                }
            }
            _ => {}
        }
    }

    fn schedule_change(&mut self, rec: &AuditRecord) {
        let d = &rec.event.details;
        let Ok(class) = serde_json::from_value::<KeyClass>(d["class"].clone()) else {
            return;
        };
        let before = (
            serde_json::from_value::<Schedule>(d["before"]["schedule"].clone()),
            serde_json::from_value::<Bounds>(d["before"]["bounds"].clone()),
        );
        let after: Option<Schedule> = serde_json::from_value(d["after"]["schedule"].clone()).ok();
        let in_period = self.in_period(rec.at);
        let c = self.classes.entry(class).or_default();
        if let (Ok(schedule), Ok(bounds)) = before {
            c.rule_changes
                .push((rec.at, ClassRules { schedule, bounds }));
        }
        if in_period {
            c.changes.push(ScheduleChange {
                at: rec.at,
                action: rec.event.action.clone(),
                actor: rec.event.actor.clone(),
                period_secs: after.as_ref().map(|s| s.period.as_secs()),
                paused: after.as_ref().map(|s| s.paused),
            });
        }
    }

    fn admission(&mut self, rec: &AuditRecord) {
        let d = &rec.event.details;
        let outcome = rec.event.action["admission.".len()..].to_owned();
        *self
            .out
            .admission_totals
            .entry(outcome.clone())
            .or_default() += 1;
        let ns = text(d, "namespace");
        match self.ns_index.get(&ns) {
            Some(i) => {
                *self.out.namespaces[*i]
                    .counts
                    .entry(outcome.clone())
                    .or_default() += 1
            }
            None if self.out.namespaces.len() < MAX_NAMESPACES => {
                self.ns_index.insert(ns.clone(), self.out.namespaces.len());
                self.out.namespaces.push(NamespaceAdmissions {
                    namespace: ns.clone(),
                    counts: BTreeMap::from([(outcome.clone(), 1)]),
                });
            }
            None => {
                *self
                    .out
                    .other_namespaces
                    .entry(outcome.clone())
                    .or_default() += 1
            }
        }
        // A record at exactly `until` belongs to the last bucket.
        let b = ((rec.at.0.saturating_sub(self.window.since.0) / self.out.bucket_secs) as usize)
            .min(self.out.buckets.len().saturating_sub(1));
        if let Some(bucket) = self.out.buckets.get_mut(b) {
            *bucket.entry(outcome.clone()).or_default() += 1;
        }
        let policies: Vec<String> = d["policies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for p in &policies {
            if self.out.policy_admissions.len() < MAX_NAMESPACES
                || self.out.policy_admissions.contains_key(p)
            {
                *self
                    .out
                    .policy_admissions
                    .entry(p.clone())
                    .or_default()
                    .entry(outcome.clone())
                    .or_default() += 1;
            }
        }
        if EXCEPTIONS.contains(&outcome.as_str()) {
            self.out.exceptions_total += 1;
            if self.out.exceptions.len() < MAX_EXCEPTIONS {
                self.out.exceptions.push(AdmissionException {
                    at: ts(&d["at"]).unwrap_or(rec.at),
                    outcome,
                    namespace: ns,
                    kind: text(d, "kind"),
                    name: text(d, "name"),
                    user: text(d, "user"),
                    reason: text(d, "reason"),
                    policies,
                });
            }
        }
    }

    /// The gathered numbers, with each key's schedule at its activation worked out.
    pub fn finish(mut self) -> Collected {
        for (class, c) in std::mem::take(&mut self.classes) {
            let now_rules = self.window.now_rules.get(&class).cloned();
            let rules_at = |t: Option<Timestamp>| -> Option<ClassRules> {
                t.and_then(|t| {
                    c.rule_changes
                        .iter()
                        .find(|(at, _)| *at > t)
                        .map(|(_, r)| r.clone())
                })
                .or_else(|| {
                    // No change after t: the schedule in force now; a key from before the log
                    // is judged by the first known schedule.
                    if t.is_none() {
                        c.rule_changes.first().map(|(_, r)| r.clone())
                    } else {
                        None
                    }
                })
                .or_else(|| now_rules.clone())
            };
            let rules_at_activation = c
                .keys
                .iter()
                .map(|k| {
                    rules_at(k.active_from).unwrap_or(ClassRules {
                        schedule: crate::rotation::default_schedule(class),
                        bounds: Bounds::default(),
                    })
                })
                .collect();
            let rules_at_end = rules_at(Some(self.window.until));
            self.out.classes.insert(
                class,
                ClassGathered {
                    rules_at_end,
                    predecessors: c.predecessors,
                    keys: c.keys,
                    changes: c.changes,
                    rollouts: c.rollouts,
                    rules_at_activation,
                },
            );
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditEvent, RedbStore, Store, Txn};

    fn window() -> Window {
        Window {
            since: Timestamp(0),
            until: Timestamp(u64::MAX / 2),
            now_rules: BTreeMap::new(),
            grace_secs: 0,
        }
    }

    fn records(n: u64) -> Vec<AuditRecord> {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        for i in 0..n {
            store
                .commit(Txn::default().audit(AuditEvent::new(
                    "admission.allowed",
                    "webhook/w",
                    serde_json::json!({ "namespace": format!("ns-{}", i % 2), "policies": ["p"] }),
                )))
                .unwrap();
        }
        store.audit_range(0, n as usize).unwrap()
    }

    #[test]
    fn an_edited_or_removed_record_breaks_the_chain() {
        let mut recs = records(4);
        let mut c = Collector::new(window(), [], None);
        recs.iter().for_each(|r| c.feed(r));
        let out = c.finish();
        assert_eq!(out.chain_error, None);
        assert_eq!(out.admission_totals["allowed"], 4);
        assert_eq!(out.namespaces.len(), 2);

        recs[1].event.details["namespace"] = "elsewhere".into();
        let mut c = Collector::new(window(), [], None);
        recs.iter().for_each(|r| c.feed(r));
        let err = c.finish().chain_error.unwrap();
        assert!(err.contains(&format!("record {}", recs[1].seq)), "{err}");

        let mut recs = records(4);
        recs.remove(2);
        let mut c = Collector::new(window(), [], None);
        recs.iter().for_each(|r| c.feed(r));
        let err = c.finish().chain_error.unwrap();
        assert!(err.contains("does not link"), "{err}");
    }

    #[test]
    fn exceptions_and_namespaces_are_capped_not_unbounded() {
        let mut c = Collector::new(window(), [], None);
        let mut rec = records(1).remove(0);
        rec.event.action = "admission.break_glass".into();
        for i in 0..(MAX_EXCEPTIONS + 5) {
            rec.event.details["namespace"] = format!("ns-{i}").into();
            c.feed(&rec);
        }
        let out = c.finish();
        assert_eq!(out.exceptions.len(), MAX_EXCEPTIONS);
        assert_eq!(out.exceptions_total, MAX_EXCEPTIONS as u64 + 5);
        assert_eq!(out.namespaces.len(), MAX_NAMESPACES);
        assert_eq!(
            out.other_namespaces["break_glass"],
            (MAX_EXCEPTIONS + 5 - MAX_NAMESPACES) as u64
        );
    }
}
