//! Rotation schedules and bounds, rotation by key class, the compliance report, and the
//! scheduler's tick.

use std::fmt;
use std::time::Duration;

use keyd_proto::time::format_duration;
use keyd_proto::{Bounds, ClassReport, ClassSchedule, KeyClass, Report, ScheduleUpdate, Timestamp};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;

use super::state::{Keyd, Result, SCHEDULES_DOC, ServiceError, WIREGUARD_DOC, to_json};
use crate::rotation;
use crate::store::{AuditEvent, Table, Txn};
use crate::telemetry::ClassLabel;

/// How long the scheduler waits before retrying a scheduled rotation that failed.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(3600);

impl Keyd {
    pub fn schedules(&self) -> Vec<ClassSchedule> {
        let cache = self.cache();
        KeyClass::ALL
            .iter()
            .map(|c| cache.schedules.get(*c))
            .collect()
    }

    /// Changes a class's schedule (fields left out keep their value), checked against its bounds.
    pub async fn update_schedule(
        &self,
        actor: &(dyn fmt::Display + Sync),
        class: KeyClass,
        update: ScheduleUpdate,
    ) -> Result<ClassSchedule> {
        let _w = self.writer().await?;
        let cache = self.cache();
        let before = cache.schedules.get(class);
        let after = updated_schedule(class, &before, update)?;
        let action = match (before.schedule.paused, after.schedule.paused) {
            (false, true) => "schedule.paused",
            (true, false) => "schedule.resumed",
            _ => "schedule.changed",
        };
        self.write_schedule(actor, action, &before, after).await
    }

    /// Sets a class's compliance bounds; refused when the current schedule falls outside them.
    pub async fn set_bounds(
        &self,
        actor: &(dyn fmt::Display + Sync),
        class: KeyClass,
        bounds: Bounds,
    ) -> Result<ClassSchedule> {
        rotation::validate_bounds(&bounds).map_err(ServiceError::Invalid)?;
        let _w = self.writer().await?;
        let before = self.cache().schedules.get(class);
        let after = ClassSchedule {
            bounds,
            ..before.clone()
        };
        rotation::validate_schedule(class, &after.schedule, &after.bounds).map_err(|e| {
            ServiceError::Invalid(format!(
                "{e}; change the schedule first (keyctl schedule set)"
            ))
        })?;
        self.write_schedule(actor, "schedule.bounds_changed", &before, after)
            .await
    }

    async fn write_schedule(
        &self,
        actor: &(dyn fmt::Display + Sync),
        action: &str,
        before: &ClassSchedule,
        after: ClassSchedule,
    ) -> Result<ClassSchedule> {
        let cache = self.cache();
        let mut all = cache.schedules.clone();
        all.set(after.clone());
        let txn = Txn::default()
            .guard(Table::Meta, SCHEDULES_DOC, cache.schedules_doc.clone())
            .put(Table::Meta, SCHEDULES_DOC, to_json(&all))
            .audit(AuditEvent::new(
                action,
                actor,
                json!({ "class": after.class, "before": { "schedule": before.schedule, "bounds": before.bounds },
                        "after": { "schedule": after.schedule, "bounds": after.bounds } }),
            ));
        self.commit(txn).await?;
        Ok(after)
    }

    /// Rotates one class now.
    pub async fn rotate_class(
        &self,
        actor: &(dyn fmt::Display + Sync),
        class: KeyClass,
    ) -> Result<String> {
        match class {
            KeyClass::Ipsec => {
                let s = self
                    .rotate_ipsec(actor, keyd_proto::RotateRequest::default())
                    .await?;
                Ok(match &s.rollout {
                    Some(r) => format!(
                        "IPsec rollout from SPI {} to {} started ({})",
                        r.from_spi, r.to_spi, r.phase
                    ),
                    None => format!(
                        "IPsec key {} is current",
                        s.outbound_spi.unwrap_or_default()
                    ),
                })
            }
            KeyClass::WireguardPsk => {
                let epoch = self.bump_wireguard(actor, false).await?;
                Ok(format!("WireGuard preshared keys moved to epoch {epoch}"))
            }
            KeyClass::WireguardNodeKeys => {
                let epoch = self.bump_wireguard(actor, true).await?;
                Ok(format!(
                    "nodes asked for new WireGuard keypairs (node-key epoch {epoch})"
                ))
            }
            KeyClass::Kek => self.rotate_kek(actor).await,
        }
    }

    /// Starts a new preshared-key epoch (`node_keys == false`) or node-key epoch.
    pub(super) async fn bump_wireguard(
        &self,
        actor: &(dyn fmt::Display + Sync),
        node_keys: bool,
    ) -> Result<u64> {
        let _w = self.writer().await?;
        let cache = self.cache();
        let mut wg = cache.wg.clone();
        let now = self.clock.now();
        let (action, epoch) = if node_keys {
            wg.node_key_epoch += 1;
            wg.node_key_epoch_since = now;
            ("wireguard.node_key_epoch.started", wg.node_key_epoch)
        } else {
            wg.psk_epoch += 1;
            wg.psk_epoch_since = now;
            ("wireguard.psk.rotated", wg.psk_epoch)
        };
        let txn = Txn::default()
            .guard(Table::Meta, WIREGUARD_DOC, Some(cache.wg_doc.clone()))
            .put(Table::Meta, WIREGUARD_DOC, to_json(&wg))
            .audit(AuditEvent::new(action, actor, json!({ "epoch": epoch })));
        self.commit(txn).await?;
        Ok(epoch)
    }

    /// When each class last rotated, and the age of its oldest key in use.
    fn class_times(&self, class: KeyClass, now: Timestamp) -> (Option<Timestamp>, Option<u64>) {
        let cache = self.cache();
        let age = |t: Timestamp| now.0.saturating_sub(t.0);
        match class {
            KeyClass::Ipsec => {
                let last = cache
                    .ipsec_state
                    .last_rotation
                    .or_else(|| cache.ipsec_state.keys.first().map(|k| k.created_at));
                (
                    last,
                    cache
                        .ipsec_state
                        .keys
                        .iter()
                        .map(|k| age(k.created_at))
                        .max(),
                )
            }
            KeyClass::WireguardPsk => (
                Some(cache.wg.psk_epoch_since),
                Some(age(cache.wg.psk_epoch_since)),
            ),
            KeyClass::WireguardNodeKeys => {
                let oldest = cache
                    .nodes
                    .values()
                    .filter_map(|n| n.wireguard_key_since)
                    .map(age)
                    .max();
                (Some(cache.wg.node_key_epoch_since), oldest)
            }
            KeyClass::Kek => {
                // The last KEK rotation or migration, if any, else the KEK's first use.
                let migrated = crate::custody::doc::read_doc(self.store.as_ref())
                    .ok()
                    .flatten()
                    .and_then(|(doc, _)| doc.migration)
                    .map(|m| m.started_at);
                let last = migrated.map_or(cache.kek.since, |m| m.max(cache.kek.since));
                (Some(last), Some(age(last)))
            }
        }
    }

    /// Per class: last rotation, next due, oldest key age, and whether it is within schedule and
    /// bounds.
    pub fn report(&self) -> Report {
        let now = self.clock.now();
        let classes: Vec<ClassReport> = self
            .class_reports(now)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let overdue = classes.iter().any(|c| c.overdue);
        Report {
            at: now,
            classes,
            overdue,
        }
    }

    /// [`Self::report`]'s classes, each with the ages its verdicts compare against.
    fn class_reports(&self, now: Timestamp) -> Vec<(ClassReport, AgeLimits)> {
        let cache = self.cache();
        let grace = self.config.rollout_stuck_after;
        KeyClass::ALL
            .iter()
            .map(|&class| {
                let cs = cache.schedules.get(class);
                let (last, oldest) = self.class_times(class, now);
                let next_due = last.map(|l| rotation::next_due(&cs.schedule, l));
                // A rotation may start at its due time (or the window's next opening) and then
                // take the overlap plus a rollout's allowed wait to complete.
                let limit = |last: Timestamp| rotation::overdue_after(&cs.schedule, last, grace);
                let mut problems = Vec::new();
                let max_age = cs
                    .bounds
                    .max_period
                    .map(|max| rotation::beyond_bounds_after(max, &cs.schedule, grace));
                let limits = AgeLimits {
                    overdue_after: last.map(limit),
                    max_age,
                };
                let overdue = match (last, next_due) {
                    (Some(l), Some(d)) => {
                        let lim = limit(l);
                        let late = now.0.saturating_sub(l.0) > lim;
                        let old_key = oldest.is_some_and(|a| a > lim);
                        if late {
                            problems.push(format!("rotation due since {d}"));
                        } else if old_key {
                            problems.push(format!(
                                "a key in use is {} old",
                                fmt_secs(oldest.unwrap_or_default())
                            ));
                        }
                        late || old_key
                    }
                    _ => false,
                };
                let mut within_bounds =
                    rotation::validate_schedule(class, &cs.schedule, &cs.bounds)
                        .map_err(|e| problems.push(e))
                        .is_ok();
                if let (Some(max), Some(bound), Some(age)) = (cs.bounds.max_period, max_age, oldest)
                    && age > bound
                {
                    within_bounds = false;
                    problems.push(format!(
                        "a key in use is {} old, beyond max_period = {}",
                        fmt_secs(age),
                        format_duration(max)
                    ));
                }
                if last.is_none() {
                    problems.push("no key yet".into());
                }
                let report = ClassReport {
                    class,
                    last_rotation: last,
                    next_due,
                    oldest_key_age_secs: oldest,
                    paused: cs.schedule.paused,
                    within_schedule: !overdue,
                    within_bounds,
                    overdue,
                    detail: (!problems.is_empty()).then(|| problems.join("; ")),
                };
                (report, limits)
            })
            .collect()
    }

    /// Sets the key metrics (`keyd_key_*`, `keyd_ipsec_rollout_*`) from the report and the
    /// rollout: what the alerting rules in deploy/monitoring/ read.
    pub fn update_key_metrics(&self) {
        let now = self.clock.now();
        let m = &self.metrics.keys;
        let secs = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (c, limits) in self.class_reports(now) {
            let label = ClassLabel {
                class: c.class.as_str(),
            };
            let set = |family: &Family<ClassLabel, Gauge>, v: Option<u64>| match v {
                Some(v) => {
                    family.get_or_create(&label).set(secs(v));
                }
                None => {
                    family.remove(&label);
                }
            };
            set(&m.age, c.oldest_key_age_secs);
            set(&m.overdue_after, limits.overdue_after);
            set(&m.max_age, limits.max_age);
            set(&m.overdue, Some(u64::from(c.overdue)));
            set(&m.within_bounds, Some(u64::from(c.within_bounds)));
            set(&m.paused, Some(u64::from(c.paused)));
        }
        let rollout = self.ipsec_status().rollout;
        m.rollout_waiting_nodes
            .set(rollout.as_ref().map_or(0, |r| r.waiting_for.len() as i64));
        m.rollout_phase_seconds.set(
            rollout
                .as_ref()
                .map_or(0, |r| secs(now.0.saturating_sub(r.phase_since.0))),
        );
        m.rollout_stuck
            .set(i64::from(rollout.as_ref().is_some_and(|r| r.stuck)));
    }

    /// A pass of a replica that does not lead: it writes the liveness of the nodes it served
    /// (only it saw those fetches; the leader's rollouts read the node records) and audits its
    /// own custodian's health. Schedules, rollouts and the audit log are the leader's.
    pub async fn replica_tick(&self) -> Result<()> {
        if let Err(e) = self.flush_liveness().await {
            tracing::warn!(error = %e, "cannot write node liveness; retrying on the next pass");
            self.metrics.liveness_write_failures.inc();
        }
        if let Err(e) = self.audit_custody_transitions().await {
            tracing::warn!(error = %e, "cannot audit the KEK custodian's health; retrying on the next pass");
        }
        Ok(())
    }

    /// One pass of the leader's scheduler: starts every due rotation, moves the rollout on, and
    /// keeps the audit log's checkpoints and segments. Every write is guarded, so even a pass
    /// that raced a deposed leader's would not start a rotation twice.
    pub async fn tick(&self) -> Result<()> {
        let now = self.clock.now();
        // Liveness first: the rollout decides on it (and counts pending liveness either way, so
        // a failed write delays nothing but durability; it is retried on the next pass).
        if let Err(e) = self.flush_liveness().await {
            tracing::warn!(error = %e, "cannot write node liveness; retrying on the next pass");
            self.metrics.liveness_write_failures.inc();
        }
        // Custodian outages whose audit record a store failure held back.
        if let Err(e) = self.audit_custody_transitions().await {
            tracing::warn!(error = %e, "cannot audit the KEK custodian's health; retrying on the next pass");
        }
        self.advance_rollout().await?;
        // A removal's rotations that a crash cut short, or that waited for a rollout.
        if let Err(e) = self.finish_removals().await {
            tracing::warn!(error = %e, "cannot replace a removed node's keys; retrying on the next pass");
        }
        for class in KeyClass::ALL {
            let cs = self.cache().schedules.get(class);
            let (last, _) = self.class_times(class, now);
            let Some(last) = last else { continue };
            let busy = class == KeyClass::Ipsec && self.cache().ipsec_state.rollout.is_some();
            if busy || !rotation::is_due(&cs.schedule, last, now) {
                continue;
            }
            let recently_failed = self
                .failed_rotations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&class)
                .is_some_and(|t| now.0.saturating_sub(t.0) < RETRY_FAILED_AFTER.as_secs());
            if recently_failed {
                continue;
            }
            match self
                .rotate_class(&self.system_actor("scheduler"), class)
                .await
            {
                Ok(what) => {
                    tracing::info!(class = class.as_str(), what, "scheduled rotation started");
                    self.failed_rotations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&class);
                }
                Err(e) => {
                    tracing::error!(class = class.as_str(), error = %e, "scheduled rotation failed; retrying in an hour");
                    self.metrics.scheduled_rotation_failures.inc();
                    self.failed_rotations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(class, now);
                }
            }
        }
        self.maintain_audit_log(now).await
    }
}

/// The ages a class's verdicts compare its oldest key against.
#[derive(Debug, Clone, Copy)]
struct AgeLimits {
    /// Past this the class is overdue (period + overlap + the rollout's allowed wait).
    overdue_after: Option<u64>,
    /// The compliance bound (`max_period` + overlap + the rollout's allowed wait), if set.
    max_age: Option<u64>,
}

impl Keyd {
    /// Runs [`Keyd::tick`] every `every` until `stop` turns true.
    pub async fn run_scheduler(
        &self,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let nudged = tokio::select! {
                _ = interval.tick() => false,
                () = self.nudge.notified() => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            if nudged {
                if self.is_leader()
                    && let Err(e) = self.advance_rollout().await
                {
                    tracing::warn!(error = %e, "cannot advance the rollout; retrying on the next pass");
                }
                continue;
            }
            let pass = if self.is_leader() {
                self.tick().await
            } else {
                self.replica_tick().await
            };
            match pass {
                Ok(()) => {
                    let now = i64::try_from(self.clock.now().0).unwrap_or(i64::MAX);
                    self.metrics.keys.scheduler_last_pass.set(now);
                }
                Err(e) => tracing::error!(error = %e, "scheduler pass failed"),
            }
            self.update_key_metrics();
        }
    }
}

/// `before` with the fields `update` gives, checked against the class's bounds.
pub fn updated_schedule(
    class: KeyClass,
    before: &ClassSchedule,
    update: ScheduleUpdate,
) -> Result<ClassSchedule> {
    let mut after = before.clone();
    if let Some(p) = update.period {
        after.schedule.period = p;
    }
    if let Some(o) = update.overlap {
        after.schedule.overlap = o;
    }
    if let Some(w) = update.window {
        after.schedule.window = w;
    }
    if let Some(p) = update.paused {
        after.schedule.paused = p;
    }
    rotation::validate_schedule(class, &after.schedule, &after.bounds)
        .map_err(ServiceError::Invalid)?;
    Ok(after)
}

fn fmt_secs(s: u64) -> String {
    format_duration(Duration::from_secs(s)).to_string()
}
