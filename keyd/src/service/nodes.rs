//! Nodes: registration, acknowledgements, their key bundles (and long polls for a change), and
//! liveness, written in batches off the request path.

use super::poll::long_poll;
use super::state::{
    Cache, HeldKeys, Keyd, LAST_SEEN_WRITE_INTERVAL, REMOVED_DOC, RemovedNode, RenderedBundle,
    Result, ServiceError, cidrs_overlap, from_json, not_registered, to_json,
};
use crate::rotation::NodeAcks;
use crate::store::{AuditEvent, StoreError, Table, Txn};
use crate::wireguard;
use keyd_proto::identity::Identity;
use keyd_proto::{
    Ack, Acked, IpsecBundle, IpsecPeer, NodeBundle, NodeInfo, NodeRegistration, Timestamp,
    WireguardBundle,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Every node's acknowledgements and liveness; `seen` is liveness not yet written to the store
/// ([`Keyd::flush_liveness`]), so that a rollout never counts a polling node as dead.
pub(super) fn node_acks(cache: &Cache, seen: &HashMap<String, Timestamp>) -> Vec<NodeAcks> {
    cache
        .nodes
        .values()
        .map(|n| NodeAcks {
            name: n.name.clone(),
            last_seen: last_seen(n, seen),
            installed: n.acked.ack.ipsec_spis.clone(),
            outbound: n.acked.ack.ipsec_outbound_spi,
        })
        .collect()
}

/// When the node was last seen: its stored time, or a later one not yet written (`seen`).
pub(super) fn last_seen(node: &NodeInfo, seen: &HashMap<String, Timestamp>) -> Timestamp {
    seen.get(&node.name)
        .map_or(node.last_seen, |t| node.last_seen.max(*t))
}

/// The part of a bundle's ETag that names its content (without the store revision).
pub fn bundle_content(etag: &str) -> &str {
    let inner = etag.trim_matches('"');
    inner.split_once('.').map_or(inner, |(content, _)| content)
}

pub(super) fn render_bundle(cache: &Cache, name: &str) -> RenderedBundle {
    let roles = cache.ipsec_state.roles();
    let ipsec = cache
        .ipsec_state
        .outbound_spi()
        .map(|outbound_spi| IpsecBundle {
            outbound_spi,
            keys: cache
                .ipsec
                .iter()
                .zip(&roles)
                .map(|((_, k), role)| k.to_proto(*role))
                .collect(),
            peers: cache
                .nodes
                .values()
                .filter(|n| n.name != name)
                .map(|n| IpsecPeer {
                    node: n.name.clone(),
                    endpoint: n.endpoint,
                    pod_cidrs: n.pod_cidrs.clone(),
                    boot_id: n.boot_id.clone(),
                })
                .collect(),
        });
    let wireguard = WireguardBundle {
        epoch: cache.wg.psk_epoch,
        node_key_epoch: cache.wg.node_key_epoch,
        peers: wireguard::peers_for(
            name,
            cache.nodes.values().map(|n| n.as_ref()),
            &cache.wg_master,
            cache.wg.psk_epoch,
        ),
    };
    let mut bundle = NodeBundle {
        node: name.to_owned(),
        revision: String::new(),
        ipsec,
        wireguard,
    };
    // The revision is a digest of the content, so equal bundles have equal revisions across
    // restarts and replicas.
    let unrevised = Zeroizing::new(serde_json::to_vec(&bundle).unwrap_or_default());
    bundle.revision = hex::encode(&Sha256::digest(&unrevised)[..12]);
    let body = Zeroizing::new(serde_json::to_vec(&bundle).unwrap_or_default());
    // On a shared store the ETag also names the store revision the bundle was rendered at, so
    // that no replica answers a node with anything older than what it already holds.
    let etag = match cache.revision {
        0 => format!("\"{}\"", bundle.revision),
        r => format!("\"{}.{r}\"", bundle.revision),
    };
    RenderedBundle {
        etag,
        body,
        generation: cache.generation,
    }
}

/// Pod CIDRs one node may claim (Kubernetes gives a node one per address family).
const MAX_POD_CIDRS: usize = 8;

/// What another node already holds of a registration.
struct Clash {
    holder: String,
    what: String,
}

/// The first of `reg`'s endpoint and pod CIDRs that another node than `name` holds: the same
/// endpoint, or a pod CIDR that contains or lies inside one of its pod CIDRs.
/// The checks a registration passes before keyd looks at other nodes: its own fields, as the
/// node sent them. The WireGuard key comes back in its one canonical spelling, so that the
/// uniqueness check compares keys, not strings.
pub fn check_registration(mut reg: NodeRegistration) -> Result<NodeRegistration> {
    reg.wireguard_public_key = reg
        .wireguard_public_key
        .as_deref()
        .map(wireguard::canonical_public_key)
        .transpose()
        .map_err(ServiceError::Invalid)?;
    if reg.wireguard_key_epoch.is_some() && reg.wireguard_public_key.is_none() {
        return Err(ServiceError::Invalid(
            "wireguard_key_epoch needs wireguard_public_key".into(),
        ));
    }
    if let Some(boot_id) = &reg.boot_id
        && (boot_id.is_empty() || boot_id.len() > 64)
    {
        return Err(ServiceError::Invalid(
            "boot_id must be 1 to 64 characters".into(),
        ));
    }
    if reg.pod_cidrs.len() > MAX_POD_CIDRS {
        return Err(ServiceError::Invalid(format!(
            "{} pod CIDRs; a node has at most {MAX_POD_CIDRS}",
            reg.pod_cidrs.len()
        )));
    }
    Ok(reg)
}

fn claim_conflict<'a>(
    name: &str,
    reg: &NodeRegistration,
    nodes: impl Iterator<Item = &'a NodeInfo>,
) -> Option<Clash> {
    for other in nodes.filter(|n| n.name != name) {
        let clash = |what: String| {
            Some(Clash {
                holder: other.name.clone(),
                what,
            })
        };
        if other.endpoint == reg.endpoint {
            return clash(format!("endpoint {}", reg.endpoint));
        }
        for mine in &reg.pod_cidrs {
            if let Some(theirs) = other.pod_cidrs.iter().find(|t| cidrs_overlap(t, mine)) {
                return clash(if theirs == mine {
                    format!("pod CIDR {mine}")
                } else {
                    format!("pod CIDR {mine} (it overlaps {theirs})")
                });
            }
        }
    }
    None
}

/// How many times a registration is decided again because another replica changed a node's
/// claims between the decision and the write.
const REGISTRATION_TRIES: usize = 16;
/// The Meta entry every registration that changes a node's claims (address, pod CIDRs,
/// WireGuard key) writes, on a shared store: a registration that checked the claims against a
/// cache at revision R requires that it was not written after R.
const CLAIMS_MARK: &str = "claims";

impl Keyd {
    pub async fn register_node(
        &self,
        actor: &Identity,
        name: &str,
        reg: NodeRegistration,
    ) -> Result<NodeInfo> {
        let reg = check_registration(reg)?;
        let checked = self.check_claims(actor, name, &reg).await?;
        let mut tries = 0;
        loop {
            match self
                .register_checked(actor, name, reg.clone(), checked.as_ref())
                .await
            {
                // Another node's claims changed after these were checked (on a shared store,
                // another replica's write): decide again on the newer records.
                Err(ServiceError::Store(StoreError::Conflict { table, key }))
                    if table == Table::Meta && key == format!("{CLAIMS_MARK}*") =>
                {
                    tries += 1;
                    if tries == REGISTRATION_TRIES {
                        return Err(ServiceError::Conflict(format!(
                            "other nodes' claims changed {tries} times while node {name:?} \
                             registered; register again"
                        )));
                    }
                }
                r => return r,
            }
        }
    }

    /// One decision and write of a registration whose allocation was checked as `checked`.
    async fn register_checked(
        &self,
        actor: &Identity,
        name: &str,
        reg: NodeRegistration,
        checked: Option<&keyd_proto::NodeAllocation>,
    ) -> Result<NodeInfo> {
        let _w = self.writer().await?;
        let cache = self.cache();
        if cache.allocations.get(name) != checked {
            return Err(ServiceError::Conflict(format!(
                "node {name:?}'s allocation changed while it registered; register again"
            )));
        }
        if let Some(r) = cache.removed.get(name).filter(|r| !r.readmitted) {
            return Err(ServiceError::Forbidden(r.refusal(name)));
        }
        // A node describes only itself: an address or pod CIDR another node holds would take
        // that node's traffic (a more specific WireGuard route wins; two IPsec peers with one
        // endpoint cannot both be programmed). Refused, audited, naming the holder.
        if let Some(clash) = claim_conflict(name, &reg, cache.nodes.values().map(|n| &**n)) {
            self.audit(AuditEvent::new(
                "node.claim_refused",
                actor,
                json!({ "node": name, "endpoint": reg.endpoint, "pod_cidrs": reg.pod_cidrs,
                        "held_by": clash.holder, "reason": clash.what }),
            ))
            .await?;
            return Err(ServiceError::Conflict(format!(
                "{} is held by node {:?}; a node may claim only its own address and pod CIDRs",
                clash.what, clash.holder
            )));
        }
        if let Some(key) = &reg.wireguard_public_key
            && let Some(other) = cache
                .nodes
                .values()
                .find(|n| n.name != name && n.wireguard_public_key.as_ref() == Some(key))
        {
            return Err(ServiceError::Conflict(format!(
                "this WireGuard public key is already registered by node {:?}; every node needs its own keypair",
                other.name
            )));
        }
        if let Some(epoch) = reg.wireguard_key_epoch
            && epoch > cache.wg.node_key_epoch
        {
            return Err(ServiceError::Invalid(format!(
                "wireguard_key_epoch {epoch} is ahead of the node-key epoch {}",
                cache.wg.node_key_epoch
            )));
        }
        let previous = self.store.get(Table::Nodes, name)?;
        let old: Option<NodeInfo> = previous
            .as_deref()
            .map(|b| from_json(b, "node record"))
            .transpose()?;
        let now = self.clock.now();
        let key_changed = old.as_ref().and_then(|o| o.wireguard_public_key.as_ref())
            != reg.wireguard_public_key.as_ref();
        let wireguard_key_since = match (&reg.wireguard_public_key, &old) {
            (None, _) => None,
            (Some(_), Some(o)) if !key_changed => o.wireguard_key_since.or(Some(now)),
            (Some(_), _) => Some(now),
        };
        let info = NodeInfo {
            name: name.to_owned(),
            endpoint: reg.endpoint,
            pod_cidrs: reg.pod_cidrs,
            wireguard_key_epoch: reg
                .wireguard_public_key
                .as_ref()
                .map(|_| reg.wireguard_key_epoch.unwrap_or(0)),
            wireguard_key_since,
            wireguard_public_key: reg.wireguard_public_key,
            boot_id: reg.boot_id,
            registered_at: old.as_ref().map_or(now, |o| o.registered_at),
            last_seen: now,
            acked: old.as_ref().map(|o| o.acked.clone()).unwrap_or_default(),
        };
        let mut txn = Txn::default().guard(Table::Nodes, name, previous).put(
            Table::Nodes,
            name,
            to_json(&info),
        );
        // The claims were checked against every node in this cache. On a shared store, another
        // replica may be registering a node with the same address at this moment: a change of
        // claims marks CLAIMS_MARK, and requires that no other did since the cache's revision
        // (else the decision is made again). A refresh that keeps its claims needs neither.
        let claims = |n: &NodeInfo| {
            (
                n.endpoint,
                n.pod_cidrs.clone(),
                n.wireguard_public_key.clone(),
            )
        };
        if self.store.shared() && old.as_ref().map(claims) != Some(claims(&info)) {
            txn = txn
                .unchanged_since(Table::Meta, CLAIMS_MARK, Some(cache.revision))
                .put(Table::Meta, CLAIMS_MARK, name.as_bytes().to_vec());
        }
        let details =
            json!({ "node": name, "endpoint": info.endpoint, "pod_cidrs": info.pod_cidrs });
        match &old {
            None => txn = txn.audit(AuditEvent::new("node.registered", actor, details)),
            Some(o)
                if (&o.endpoint, &o.pod_cidrs, &o.boot_id)
                    != (&info.endpoint, &info.pod_cidrs, &info.boot_id) =>
            {
                txn = txn.audit(AuditEvent::new("node.updated", actor, details));
            }
            Some(_) => {}
        }
        if key_changed {
            txn = txn.audit(AuditEvent::new(
                "wireguard.node_key.registered",
                actor,
                json!({ "node": name, "public_key": info.wireguard_public_key,
                        "epoch": info.wireguard_key_epoch }),
            ));
        }
        self.commit(txn).await?;
        Ok(info)
    }

    /// Whether a certificate of node `name` issued at `not_before` (seconds) is refused
    /// because the node was removed: all of them until it is readmitted, and those issued
    /// before the removal for ever.
    pub fn node_certificate_refused(&self, name: &str, not_before: Option<u64>) -> Option<String> {
        let cache = self.cache();
        let r = cache.removed.get(name)?;
        // Second resolution: a certificate from the second of the removal counts as after it
        // (bootstrap refuses a removed node, and issues a readmitted one's from that second).
        let old_cert = not_before.is_none_or(|nb| nb < r.at.0);
        (!r.readmitted || old_cert).then(|| r.refusal(name))
    }

    /// The record of node `name`'s removal, if it was ever removed.
    pub fn node_removal(&self, name: &str) -> Option<RemovedNode> {
        self.cache().removed.get(name).cloned()
    }

    /// Removes node `name`: it leaves every bundle, its certificates are refused from now on
    /// (until it is readmitted, and those issued before now for ever), and, with `rotate`, a new
    /// IPsec key and a new WireGuard preshared-key epoch follow, so that no key the node held
    /// stays in use. Audited as `node.removed`. Returns what followed, for the caller.
    ///
    /// The removal records which keys the node held ([`HeldKeys`]) in the same transaction, so
    /// that a crash before the rotations does not leave them in use: the next tick finishes them
    /// ([`Keyd::finish_removals`]), as it does when a rollout was in progress at the removal.
    pub async fn remove_node(
        &self,
        actor: &(dyn std::fmt::Display + Sync),
        name: &str,
        rotate: bool,
    ) -> Result<keyd_proto::NodeRemoval> {
        {
            let _w = self.writer().await?;
            let cache = self.cache();
            let Some(node) = cache.nodes.get(name).cloned() else {
                return Err(ServiceError::NotFound(format!(
                    "no node {name:?} is registered"
                )));
            };
            let newest_spi = cache
                .ipsec_state
                .rollout
                .as_ref()
                .map(|r| r.to_spi)
                .or_else(|| self.ipsec_status().outbound_spi);
            let mut removed = cache.removed.clone();
            removed.insert(
                name.to_owned(),
                RemovedNode {
                    at: self.clock.now(),
                    by: actor.to_string(),
                    readmitted: false,
                    held: rotate.then(|| HeldKeys {
                        ipsec_spi: newest_spi,
                        psk_epoch: cache.wg.psk_epoch,
                    }),
                },
            );
            let previous = self.store.get(Table::Nodes, name)?;
            let txn = Txn::default()
                .guard(Table::Nodes, name, previous)
                .delete(Table::Nodes, name)
                .guard(Table::Meta, REMOVED_DOC, cache.removed_doc.clone())
                .put(Table::Meta, REMOVED_DOC, to_json(&removed))
                .audit(AuditEvent::new(
                    "node.removed",
                    actor,
                    json!({ "node": name, "endpoint": node.endpoint, "pod_cidrs": node.pod_cidrs,
                            "rotate": rotate }),
                ));
            self.commit(txn).await?;
        }
        let mut out = keyd_proto::NodeRemoval {
            node: name.to_owned(),
            ipsec: "not rotated".into(),
            wireguard_psk_epoch: None,
        };
        if !rotate {
            return Ok(out);
        }
        let (ipsec, epoch) = self.replace_held_keys(actor, name).await?;
        out.ipsec = ipsec;
        out.wireguard_psk_epoch = epoch;
        Ok(out)
    }

    /// Replaces the keys removed nodes held where that is still to do: after a crash between a
    /// removal and its rotations, or once the rollout in progress at the removal has completed.
    /// Called by the scheduler tick.
    pub(super) async fn finish_removals(&self) -> Result<()> {
        let names: Vec<String> = self
            .cache()
            .removed
            .iter()
            .filter(|(_, r)| !r.readmitted && r.held.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        let actor = self.system_actor("scheduler");
        for name in names {
            self.replace_held_keys(&actor, &name).await?;
        }
        Ok(())
    }

    /// Starts an IPsec rollout if node `name`'s newest key is still the newest, and a new
    /// WireGuard PSK epoch if its epoch is still current. Returns what happened to each.
    async fn replace_held_keys(
        &self,
        actor: &(dyn std::fmt::Display + Sync),
        name: &str,
    ) -> Result<(String, Option<u64>)> {
        let _one = self.removals.lock().await;
        let cache = self.cache();
        let Some(held) = cache
            .removed
            .get(name)
            .filter(|r| !r.readmitted)
            .and_then(|r| r.held.clone())
        else {
            return Ok(("not rotated".into(), None));
        };
        let status = self.ipsec_status();
        let newest = status
            .rollout
            .as_ref()
            .map(|r| r.to_spi)
            .or(status.outbound_spi);
        let ipsec = match (&status.rollout, held.ipsec_spi) {
            (_, None) => "no IPsec key to rotate".into(),
            (_, Some(spi)) if newest != Some(spi) => "already rotated".into(),
            (Some(r), Some(spi)) => format!(
                "a rollout ({} -> {}) is in progress: keyd rotates again once it completes, \
                 the node knows key {spi}",
                r.from_spi, r.to_spi
            ),
            (None, Some(_)) => {
                let s = self
                    .rotate_ipsec(actor, keyd_proto::RotateRequest::default())
                    .await?;
                let to = s
                    .rollout
                    .map_or_else(|| "-".to_owned(), |r| r.to_spi.to_string());
                format!("rollout to key {to} started")
            }
        };
        let epoch = if cache.wg.psk_epoch == held.psk_epoch {
            Some(self.bump_wireguard(actor, false).await?)
        } else {
            None
        };
        Ok((ipsec, epoch))
    }

    /// Readmits a removed node: certificates issued after its removal are accepted again, and
    /// bootstrap issues it new ones. Audited as `node.readmitted`.
    pub async fn readmit_node(
        &self,
        actor: &(dyn std::fmt::Display + Sync),
        name: &str,
    ) -> Result<()> {
        let _w = self.writer().await?;
        let cache = self.cache();
        let mut removed = cache.removed.clone();
        let Some(r) = removed.get_mut(name) else {
            return Err(ServiceError::NotFound(format!(
                "node {name:?} was not removed"
            )));
        };
        if r.readmitted {
            return Ok(());
        }
        r.readmitted = true;
        let txn = Txn::default()
            .guard(Table::Meta, REMOVED_DOC, cache.removed_doc.clone())
            .put(Table::Meta, REMOVED_DOC, to_json(&removed))
            .audit(AuditEvent::new(
                "node.readmitted",
                actor,
                json!({ "node": name }),
            ));
        self.commit(txn).await
    }

    /// Every registered node, with liveness not yet flushed to the store applied.
    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        let pending = self.pending_seen();
        self.cache()
            .nodes
            .values()
            .map(|n| NodeInfo {
                last_seen: last_seen(n, &pending),
                ..NodeInfo::clone(n)
            })
            .collect()
    }

    pub async fn ack(&self, actor: &Identity, name: &str, mut ack: Ack) -> Result<NodeInfo> {
        // First: on a shared store the keys are checked against the newest state, not against
        // a cache a few milliseconds behind the replica the node fetched from.
        let _w = self.writer().await?;
        if !self.cache().nodes.contains_key(name) {
            return Err(not_registered(name));
        }
        let cache = self.cache();
        for spi in &ack.ipsec_spis {
            if !cache.ipsec.iter().any(|(e, _)| e.spi == *spi) {
                return Err(ServiceError::Invalid(format!(
                    "SPI {spi} is not a key keyd holds"
                )));
            }
        }
        if let Some(out) = ack.ipsec_outbound_spi
            && !ack.ipsec_spis.contains(&out)
        {
            return Err(ServiceError::Invalid(format!(
                "ipsec_outbound_spi {out} is not among ipsec_spis"
            )));
        }
        if let Some(epoch) = ack.wireguard_epoch
            && epoch != cache.wg.psk_epoch
        {
            return Err(ServiceError::Invalid(format!(
                "wireguard_epoch {epoch} is not the current epoch {}",
                cache.wg.psk_epoch
            )));
        }
        ack.ipsec_spis.sort_unstable();
        ack.ipsec_spis.dedup();
        let previous = self
            .store
            .get(Table::Nodes, name)?
            .ok_or_else(|| not_registered(name))?;
        let mut info: NodeInfo = from_json(&previous, "node record")?;
        let changed = info.acked.ack != ack;
        let now = self.clock.now();
        info.acked = Acked { ack, at: Some(now) };
        info.last_seen = now;
        let mut txn = Txn::default()
            .guard(Table::Nodes, name, Some(previous))
            .put(Table::Nodes, name, to_json(&info));
        if changed {
            txn = txn.audit(AuditEvent::new(
                "node.keys.acknowledged",
                actor,
                json!({ "node": name, "ipsec_spis": info.acked.ack.ipsec_spis,
                        "ipsec_outbound_spi": info.acked.ack.ipsec_outbound_spi,
                        "wireguard_epoch": info.acked.ack.wireguard_epoch }),
            ));
        }
        self.commit(txn).await?;
        drop(_w);
        // An acknowledgement may be the last one a rollout phase was waiting for (on a replica
        // that does not lead, advance_rollout leaves it to the leader).
        if changed {
            self.advance_rollout().await?;
        }
        Ok(info)
    }

    /// The node's bundle, rendered once per state generation and shared between fetches.
    pub async fn bundle(&self, name: &str) -> Result<Arc<RenderedBundle>> {
        // Held keys are served only for a bounded time while the custodian cannot be used, or
        // (a replica) while the store cannot be read.
        self.wrapper.serving_check()?;
        self.store_serving_check()?;
        let cache = self.cache();
        let node = cache.nodes.get(name).ok_or_else(|| not_registered(name))?;
        let now = self.clock.now();
        if now.0.saturating_sub(node.last_seen.0) >= LAST_SEEN_WRITE_INTERVAL.as_secs() {
            self.pending_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_owned(), now);
        }
        if let Some(b) = self
            .bundles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            && b.generation == cache.generation
        {
            return Ok(Arc::clone(b));
        }
        let rendered = Arc::new(render_bundle(&cache, name));
        drop(cache);
        self.bundles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::clone(&rendered));
        Ok(rendered)
    }

    /// Long poll: returns the node's bundle once its content differs from that of `etag`, or
    /// `None` when `wait` passes without a change. A node learns of a rotation within a second.
    pub async fn bundle_wait(
        &self,
        name: &str,
        etag: &str,
        wait: Duration,
    ) -> Result<Option<Arc<RenderedBundle>>> {
        self.bundle_after(Some(etag)).await?;
        let changed = self.changed.subscribe();
        long_poll(
            changed,
            bundle_content(etag),
            wait,
            move || async move { self.bundle(name).await.map(Some) },
            |b: &Arc<RenderedBundle>| bundle_content(&b.etag),
        )
        .await
    }

    /// On a shared store, before answering a node that holds the bundle `held` (its ETag): waits
    /// until this replica's cache is at least as new as the store revision that bundle was
    /// rendered at, so that a node moving between replicas never steps back to older keys.
    pub async fn bundle_after(&self, held: Option<&str>) -> Result<()> {
        let revision = held
            .and_then(|e| e.trim_matches('"').split_once('.'))
            .and_then(|(_, r)| r.parse::<u64>().ok());
        match revision {
            Some(r) if self.store.shared() && r > *self.applied.borrow() => {
                // A revision the store has not reached is from another history (an etcd restored
                // from a snapshot, a copy into a new cluster): nothing to wait for.
                if self.current_revision().await?.is_some_and(|now| r > now) {
                    return Ok(());
                }
                self.caught_up_to(r).await
            }
            _ => Ok(()),
        }
    }

    /// Audits a full bundle fetch (node, revision, key IDs; never key bytes), once per node and
    /// revision. Awaited: keys are handed out only after the record is durable.
    pub async fn audit_bundle_fetch(&self, name: &str, bundle: &RenderedBundle) -> Result<()> {
        let fresh = {
            let mut seen = self
                .audited_fetches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // By content: on a shared store the same bundle rendered at another revision (or by
            // another replica) was handed out already.
            let content = bundle_content(&bundle.etag);
            seen.insert(name.to_owned(), content.to_owned()).as_deref() != Some(content)
        };
        if !fresh {
            return Ok(());
        }
        let cache = self.cache();
        let details = json!({
            "node": name,
            "revision": bundle.etag.trim_matches('"'),
            "ipsec_spis": cache.ipsec.iter().map(|(e, _)| e.spi).collect::<Vec<_>>(),
            "wireguard_psk_epoch": cache.wg.psk_epoch,
            "wireguard_peers": cache.nodes.values().filter(|n| n.name != name && n.wireguard_public_key.is_some()).count(),
        });
        let result = self
            .audit(AuditEvent::new(
                "bundle.fetched",
                format!("node/{name}"),
                details,
            ))
            .await;
        if result.is_err() {
            // Not recorded, so not "seen": the next fetch tries again.
            self.audited_fetches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        }
        result
    }

    /// Liveness seen by bundle fetches and not yet written to the store, by node.
    pub(super) fn pending_seen(&self) -> HashMap<String, Timestamp> {
        self.pending_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes the liveness that bundle fetches recorded since the last pass, in one transaction
    /// (one fsync however many nodes polled). Run by every scheduler pass, before the rollout
    /// looks at liveness, and at shutdown. Entries leave the pending map only once the store and
    /// the cache hold them, so readers never see a node's liveness go back; on failure they stay
    /// for the next pass. A node record that does not parse is skipped (and logged), not allowed
    /// to block everyone else's liveness.
    pub async fn flush_liveness(&self) -> Result<usize> {
        let _w = self.writer().await?;
        let pending = self.pending_seen();
        if pending.is_empty() {
            return Ok(0);
        }
        // Nodes are independent: the writes go in as few transactions as the store allows.
        let per_txn = self.store.max_txn_ops().max(1);
        let mut chunks: Vec<(Txn, Vec<(String, Timestamp)>)> = Vec::new();
        let mut txn = Txn::default();
        let mut batch = Vec::new();
        for (name, seen) in &pending {
            // Read from the store, not the cache: the CAS guard must hold the stored bytes.
            let Some(previous) = self.store.get(Table::Nodes, name)? else {
                continue; // deleted since it fetched
            };
            let mut info: NodeInfo = match from_json(&previous, "node record") {
                Ok(info) => info,
                Err(e) => {
                    tracing::error!(node = %name, error = %e, "cannot record liveness: unreadable node record");
                    continue;
                }
            };
            if info.last_seen >= *seen {
                continue; // an acknowledgement or registration wrote a newer one
            }
            info.last_seen = *seen;
            txn = txn.guard(Table::Nodes, name, Some(previous)).put(
                Table::Nodes,
                name,
                to_json(&info),
            );
            batch.push((name.clone(), *seen));
            if batch.len() >= per_txn {
                chunks.push((std::mem::take(&mut txn), std::mem::take(&mut batch)));
            }
        }
        if !batch.is_empty() {
            chunks.push((txn, batch));
        }
        let mut written = Vec::with_capacity(pending.len());
        let mut failed = None;
        for (txn, batch) in chunks {
            match self.commit_only(txn).await {
                Ok(()) => written.extend(batch),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // On a shared store the change feed brought the written records into the cache (and
        // patching here could put back a cache older than the feed's).
        if !written.is_empty() && !self.store.shared() {
            // Only `last_seen` is copied into the cached node: nothing a bundle carries changes
            // here, so rendered bundles stay valid and long polls stay asleep.
            let _one_at_a_time = self.refreshing.lock().await;
            let prev = self.cache();
            let mut next = (*prev).clone();
            for (name, seen) in &written {
                if let Some(node) = next.nodes.get_mut(name) {
                    Arc::make_mut(node).last_seen = *seen;
                }
            }
            *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        }
        let mut now_pending = self.pending_seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = failed {
            // What was written leaves the map; the rest waits for the next pass.
            for (name, seen) in &written {
                if now_pending.get(name).is_some_and(|t| t <= seen) {
                    now_pending.remove(name);
                }
            }
            return Err(e);
        }
        for (name, seen) in &pending {
            // A fetch since the snapshot may have marked the node again, later.
            if now_pending.get(name).is_some_and(|t| t <= seen) {
                now_pending.remove(name);
            }
        }
        Ok(written.len())
    }

    // ---- IPsec -------------------------------------------------------------------------------
}
