//! IPsec keys: rotation and import, the rollout that stages, activates and retires a key as the
//! nodes acknowledge it, and the Cilium Secret export.

use super::nodes::node_acks;
use super::state::{
    Cache, IPSEC_DOC, IpsecKeyEntry, IpsecState, Keyd, Result, ServiceConfig, ServiceError, to_json,
};
use crate::ipsec::CiliumKey;
use crate::rotation::{self, Effect, Event, RolloutConfig};
use crate::seal::{self, KeyWrapper};
use crate::store::{AuditEvent, Table, Txn};
use keyd_proto::identity::Identity;
use keyd_proto::{IpsecStatus, KeyClass, KeySpec, RolloutStatus, RotateRequest, Timestamp};
use serde_json::json;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;
use zeroize::Zeroizing;

pub(super) fn ipsec_status(
    cache: &Cache,
    cfg: &ServiceConfig,
    now: Timestamp,
    seen: &HashMap<String, Timestamp>,
) -> IpsecStatus {
    let roles = cache.ipsec_state.roles();
    IpsecStatus {
        outbound_spi: cache.ipsec_state.outbound_spi(),
        keys: cache
            .ipsec
            .iter()
            .zip(&roles)
            .map(|((e, k), role)| k.info(*role, e.created_at, &e.origin))
            .collect(),
        rollout: cache.ipsec_state.rollout.as_ref().map(|r| {
            let rc = RolloutConfig {
                liveness_timeout: cfg.node_liveness_timeout,
                stuck_after: cfg.rollout_stuck_after,
                overlap: Duration::ZERO,
            };
            let p = rotation::progress(r, &node_acks(cache, seen), &rc, now);
            RolloutStatus {
                from_spi: r.from_spi,
                to_spi: r.to_spi,
                phase: r.phase.as_str().to_owned(),
                started_at: r.started_at,
                phase_since: r.phase_since,
                waiting_for: p.waiting_for,
                not_live: p.not_live,
                skipped: p.skipped,
                stuck: r.stuck_reported,
            }
        }),
    }
}

impl Keyd {
    pub fn ipsec_status(&self) -> IpsecStatus {
        ipsec_status(
            &self.cache(),
            &self.config,
            self.clock.now(),
            &self.pending_seen(),
        )
    }

    /// Starts a rotation: the first key becomes current at once; later keys roll out staged ->
    /// active -> retired (see [`crate::rotation`]). Refused while a rollout is in progress.
    pub async fn rotate_ipsec(
        &self,
        actor: &(dyn fmt::Display + Sync),
        req: RotateRequest,
    ) -> Result<IpsecStatus> {
        let _w = self.writer().await?;
        let cache = self.cache();
        if let Some(r) = &cache.ipsec_state.rollout {
            return Err(rotation::RolloutError::InProgress {
                from: r.from_spi,
                to: r.to_spi,
                phase: r.phase.as_str(),
            }
            .into());
        }
        let new_key = match (cache.ipsec.first(), req.algorithm) {
            (None, spec) => CiliumKey::generate(
                crate::ipsec::KeyId::new(1)?,
                spec.unwrap_or(KeySpec::Gcm128),
                true,
            )?,
            (Some((_, current)), None) => current.rotated()?,
            (Some((_, current)), Some(spec)) => {
                let probe = CiliumKey::generate(current.id.next(), spec, true)?;
                if probe.spec() != current.spec() {
                    return Err(ServiceError::Invalid(format!(
                        "the algorithm cannot change in a rotation (current: {} {} bits); \
                         Cilium requires the algorithm and key length to stay fixed",
                        current.spec().algorithm,
                        current.spec().key_bits
                    )));
                }
                probe
            }
        };
        self.install_ipsec_key(actor, &cache, new_key, "generated")
            .await
    }

    /// Imports a Cilium `keys` line: the first key becomes current; otherwise it rolls out like a
    /// rotation, by the same rules (the ID must follow, the form must not change).
    pub async fn import_ipsec(
        &self,
        actor: &(dyn fmt::Display + Sync),
        line: &str,
    ) -> Result<IpsecStatus> {
        let key = CiliumKey::parse_line(line)?;
        if !key.per_tunnel && !self.config.allow_global_ipsec_import {
            return Err(ServiceError::Invalid(format!(
                "key {} is global (no '+' after its ID): every tunnel would share one key and \
                 salt. Import it as '{}+' (per-tunnel, as Cilium recommends), or set \
                 ipsec.allow_global_import = true for a legacy import; the next rotation \
                 makes it per-tunnel",
                key.id.get(),
                key.id.get()
            )));
        }
        let _w = self.writer().await?;
        let cache = self.cache();
        if let Some(r) = &cache.ipsec_state.rollout {
            return Err(rotation::RolloutError::InProgress {
                from: r.from_spi,
                to: r.to_spi,
                phase: r.phase.as_str(),
            }
            .into());
        }
        if let Some((_, current)) = cache.ipsec.first() {
            key.check_replaces(current)?;
        }
        self.install_ipsec_key(actor, &cache, key, "imported").await
    }

    pub(super) async fn install_ipsec_key(
        &self,
        actor: &(dyn fmt::Display + Sync),
        cache: &Cache,
        key: CiliumKey,
        origin: &str,
    ) -> Result<IpsecStatus> {
        let now = self.clock.now();
        let mut state = cache.ipsec_state.clone();
        if state.next_serial == 0 {
            state.next_serial = 1;
        }
        let entry = IpsecKeyEntry {
            serial: state.next_serial,
            spi: key.id.get(),
            created_at: now,
            origin: origin.into(),
        };
        let line = key.to_line();
        let sealed = seal::seal(&*self.wrapper, &entry.ctx(), line.as_bytes()).await?;
        let spec = key.spec();
        let mut txn = Txn::default()
            .guard(Table::Meta, IPSEC_DOC, cache.ipsec_doc.clone())
            .put(Table::Sealed, entry.ctx().record_id, sealed.to_bytes())
            .audit(AuditEvent::new(
                &format!("ipsec.key.{origin}"),
                actor,
                json!({ "spi": entry.spi, "record": entry.ctx().record_id, "algorithm": spec.algorithm,
                        "key_bits": spec.key_bits, "per_tunnel": key.per_tunnel, "kek": self.wrapper.key_id() }),
            ));
        let from = state.keys.first().map(|e| e.spi);
        state.next_serial += 1;
        state.keys.insert(0, entry.clone());
        state.last_rotation = Some(now);
        match from {
            None => {
                txn = txn.audit(AuditEvent::new(
                    "ipsec.key.activated",
                    actor,
                    json!({ "spi": entry.spi, "first_key": true }),
                ));
            }
            Some(from) => {
                let (rollout, effects) = rotation::step(
                    None,
                    &Event::Rotate {
                        from,
                        to: entry.spi,
                    },
                    &node_acks(cache, &self.pending_seen()),
                    &self.rollout_config(cache),
                    now,
                )?;
                state.rollout = rollout;
                txn = self.apply_effects(&mut state, effects, txn, actor);
            }
        }
        txn = txn.put(Table::Meta, IPSEC_DOC, to_json(&state));
        self.commit(txn).await?;
        self.metrics.ipsec_rotations.inc();
        Ok(self.ipsec_status())
    }

    pub(super) fn rollout_config(&self, cache: &Cache) -> RolloutConfig {
        RolloutConfig {
            liveness_timeout: self.config.node_liveness_timeout,
            stuck_after: self.config.rollout_stuck_after,
            overlap: cache.schedules.get(KeyClass::Ipsec).schedule.overlap,
        }
    }

    /// Carries out a rollout step's effects on the state and the transaction.
    pub(super) fn apply_effects(
        &self,
        state: &mut IpsecState,
        effects: Vec<Effect>,
        mut txn: Txn,
        actor: &(dyn fmt::Display + Sync),
    ) -> Txn {
        for effect in effects {
            match effect {
                Effect::Staged { spi } => {
                    txn = txn.audit(AuditEvent::new(
                        "ipsec.key.staged",
                        actor,
                        json!({ "spi": spi }),
                    ));
                }
                Effect::Activated { spi } => {
                    txn = txn.audit(AuditEvent::new(
                        "ipsec.key.activated",
                        actor,
                        json!({ "spi": spi }),
                    ));
                }
                Effect::Retired { spi } => {
                    // Keep only the newest key; the rest leave the store for good.
                    for retired in state.keys.split_off(1.min(state.keys.len())) {
                        txn = txn.delete(Table::Sealed, retired.ctx().record_id).audit(AuditEvent::new(
                            "ipsec.key.retired",
                            actor,
                            json!({ "spi": retired.spi, "record": retired.ctx().record_id, "rollout_from": spi }),
                        ));
                    }
                }
                Effect::Stuck { phase, waiting_for } => {
                    self.metrics.rollouts_stuck.inc();
                    tracing::warn!(
                        phase = phase.as_str(),
                        waiting = waiting_for.len(),
                        "IPsec rollout is stuck"
                    );
                    txn = txn.audit(AuditEvent::new(
                        "ipsec.rollout.stuck",
                        actor,
                        json!({ "phase": phase.as_str(), "waiting_for": waiting_for }),
                    ));
                }
            }
        }
        txn
    }

    /// Stops waiting for `node` in the rollout in progress: for a node that polls but never
    /// acknowledges (a broken agent), which would otherwise hold the rollout forever. Audited.
    /// Only a node the rollout is waiting for can be skipped; when the old key is retired, a
    /// skipped node that never installed the new one can no longer talk to its peers.
    pub async fn skip_rollout_node(
        &self,
        actor: &(dyn fmt::Display + Sync),
        node: &str,
    ) -> Result<IpsecStatus> {
        {
            let _w = self.writer().await?;
            let cache = self.cache();
            let Some(current) = cache.ipsec_state.rollout.clone() else {
                return Err(ServiceError::Conflict(
                    "no IPsec rollout is in progress".into(),
                ));
            };
            let p = rotation::progress(
                &current,
                &node_acks(&cache, &self.pending_seen()),
                &self.rollout_config(&cache),
                self.clock.now(),
            );
            if !p.waiting_for.iter().any(|n| n == node) {
                return Err(ServiceError::Invalid(format!(
                    "the rollout is not waiting for node {node:?} (waiting for: {})",
                    if p.waiting_for.is_empty() {
                        "nobody".to_owned()
                    } else {
                        p.waiting_for.join(", ")
                    }
                )));
            }
            let mut state = cache.ipsec_state.clone();
            if let Some(r) = state.rollout.as_mut() {
                r.skipped.push(node.to_owned());
            }
            let txn = Txn::default()
                .guard(Table::Meta, IPSEC_DOC, cache.ipsec_doc.clone())
                .put(Table::Meta, IPSEC_DOC, to_json(&state))
                .audit(AuditEvent::new(
                    "ipsec.rollout.node_skipped",
                    actor,
                    json!({ "node": node, "from_spi": current.from_spi, "to_spi": current.to_spi,
                            "phase": current.phase.as_str() }),
                ));
            self.commit(txn).await?;
        }
        // Without it, the rollout may move on now.
        self.advance_rollout().await?;
        Ok(self.ipsec_status())
    }

    /// Moves the rollout on if the nodes' acknowledgements and the time allow it. Only the
    /// leader moves rollouts: on another replica this does nothing, and the leader learns of
    /// the acknowledgement (or the skip) from the store's feed.
    pub async fn advance_rollout(&self) -> Result<()> {
        if !self.is_leader() {
            return Ok(());
        }
        let _w = self.writer().await?;
        let cache = self.cache();
        let Some(current) = cache.ipsec_state.rollout.clone() else {
            return Ok(());
        };
        let (next, effects) = rotation::step(
            Some(&current),
            &Event::Tick,
            &node_acks(&cache, &self.pending_seen()),
            &self.rollout_config(&cache),
            self.clock.now(),
        )?;
        if effects.is_empty() && next.as_ref() == Some(&current) {
            return Ok(());
        }
        let mut state = cache.ipsec_state.clone();
        state.rollout = next;
        let txn = Txn::default().guard(Table::Meta, IPSEC_DOC, cache.ipsec_doc.clone());
        let actor = self.system_actor("rollout");
        let txn = self.apply_effects(&mut state, effects, txn, &actor);
        self.commit(txn.put(Table::Meta, IPSEC_DOC, to_json(&state)))
            .await
    }

    /// The current key as Cilium's `keys` line, or as the `cilium-ipsec-keys` Secret. Audited:
    /// it hands key material out of keyd.
    pub async fn cilium_export(
        &self,
        actor: &Identity,
        secret_namespace: Option<&str>,
    ) -> Result<Zeroizing<String>> {
        self.wrapper.serving_check()?;
        let cache = self.cache();
        // The key in outbound use: a staged key is not yet safe to hand to Cilium, which would
        // switch to it at once.
        let outbound = cache.ipsec_state.outbound_spi();
        let (entry, key) = cache
            .ipsec
            .iter()
            .find(|(e, _)| Some(e.spi) == outbound)
            .ok_or_else(|| {
                ServiceError::NotFound(
                    "no IPsec key yet: run `keyctl ipsec rotate` or `keyctl ipsec import`".into(),
                )
            })?;
        let out = match secret_namespace {
            Some(ns) => {
                keyd_proto::identity::validate_name(ns)
                    .map_err(|e| ServiceError::Invalid(format!("namespace: {e}")))?;
                crate::ipsec::render_secret_yaml(key, ns)
            }
            None => key.to_line(),
        };
        self.commit_only(Txn::default().audit(AuditEvent::new(
            "ipsec.key.exported",
            actor,
            json!({ "spi": entry.spi, "format": if secret_namespace.is_some() { "secret" } else { "line" } }),
        )))
        .await?;
        Ok(out)
    }

    // ---- status ------------------------------------------------------------------------------
}
