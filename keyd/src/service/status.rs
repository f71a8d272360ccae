//! What keyd reports about itself: its status, the enforcement status the webhook reads, and the
//! webhook's admission decisions recorded in the audit log.

use super::ipsec::ipsec_status;
use super::state::{Keyd, Result, ServiceError};
use crate::seal::KeyWrapper;
use crate::store::{AuditEvent, Txn};
use keyd_proto::identity::Identity;
use keyd_proto::{EnforcementStatus, KeyClass, ModeStatus, Status, WireguardStatus};

impl Keyd {
    pub fn status(&self) -> Status {
        let cache = self.cache();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store: self.store.describe(),
            kek_backend: self.wrapper.backend().to_owned(),
            kek_id: self.wrapper.key_id(),
            nodes: cache.nodes.len(),
            ipsec: ipsec_status(&cache, &self.config, self.clock.now(), &self.pending_seen()),
            wireguard: WireguardStatus {
                psk_epoch: cache.wg.psk_epoch,
                nodes_with_public_key: cache
                    .nodes
                    .values()
                    .filter(|n| n.wireguard_public_key.is_some())
                    .count(),
            },
            custody: Some(self.wrapper.status()),
            replication: self.replication(),
        }
    }

    /// The replicas over a shared store; `None` on one only this process uses.
    fn replication(&self) -> Option<keyd_proto::Replication> {
        let this = self.replica_name.get()?.clone();
        Some(match self.store.replicas() {
            Ok(replicas) => keyd_proto::Replication {
                this,
                replicas: replicas.unwrap_or_default(),
                error: None,
            },
            Err(e) => keyd_proto::Replication {
                this,
                replicas: Vec::new(),
                error: Some(keyd_mtls::error_chain(&e)),
            },
        })
    }

    /// Whether each encryption mode can be relied on (for the admission webhook): keys exist,
    /// and the classes it depends on are within schedule and bounds.
    pub fn enforcement_status(&self) -> EnforcementStatus {
        let cache = self.cache();
        let report = self.report();
        let class_ok = |classes: &[KeyClass]| -> Option<String> {
            let bad: Vec<String> = report
                .classes
                .iter()
                .filter(|c| classes.contains(&c.class) && !(c.within_schedule && c.within_bounds))
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.class.as_str(),
                        c.detail.clone().unwrap_or_else(|| "overdue".into())
                    )
                })
                .collect();
            (!bad.is_empty()).then(|| bad.join("; "))
        };
        let mode =
            |active: Result<(), String>, classes: &[KeyClass]| match (active, class_ok(classes)) {
                (Err(why), _) => ModeStatus {
                    active: false,
                    within_schedule: false,
                    reason: Some(why),
                },
                (Ok(()), Some(why)) => ModeStatus {
                    active: true,
                    within_schedule: false,
                    reason: Some(why),
                },
                (Ok(()), None) => ModeStatus {
                    active: true,
                    within_schedule: true,
                    reason: None,
                },
            };
        let ipsec_active = match cache.ipsec.first() {
            Some(_) => Ok(()),
            None => Err("keyd holds no IPsec key yet (keyctl ipsec rotate)".to_owned()),
        };
        // WireGuard encrypts between nodes: one node with a key has no one to encrypt to. Active
        // once two nodes have registered keys and acknowledged programming their peers.
        let keyed: Vec<_> = cache
            .nodes
            .values()
            .filter(|n| n.wireguard_public_key.is_some())
            .collect();
        let programmed = keyed
            .iter()
            .filter(|n| n.acked.ack.wireguard_epoch.is_some())
            .count();
        let wg_active = match (keyed.len(), programmed) {
            (0, _) => Err("no node has registered a WireGuard public key".to_owned()),
            (_, 2..) => Ok(()),
            (k, p) => Err(format!(
                "{p} of the {k} nodes with a WireGuard public key have programmed their peers; \
                 WireGuard needs two at least"
            )),
        };
        EnforcementStatus {
            at: self.clock.now(),
            ipsec: mode(ipsec_active, &[KeyClass::Ipsec, KeyClass::Kek]),
            wireguard: mode(
                wg_active,
                &[
                    KeyClass::WireguardNodeKeys,
                    KeyClass::WireguardPsk,
                    KeyClass::Kek,
                ],
            ),
            rejected_policies: self.rejected_policies(),
            rules_pending: self.rules_pending(),
        }
    }

    /// Appends the webhook's admission decisions to the audit log, one record each.
    pub async fn record_admission_decisions(
        &self,
        actor: &Identity,
        decisions: Vec<keyd_proto::AdmissionDecision>,
    ) -> Result<()> {
        pub(super) const OUTCOMES: [&str; 5] =
            ["allowed", "denied", "warned", "audited", "break_glass"];
        pub(super) const ENFORCEMENTS: [&str; 3] = ["enforce", "warn", "audit"];
        let mut events = Vec::with_capacity(decisions.len());
        for d in decisions {
            if !OUTCOMES.contains(&d.outcome.as_str()) {
                return Err(ServiceError::Invalid(format!(
                    "outcome {:?} is not one of {OUTCOMES:?}",
                    d.outcome
                )));
            }
            if !ENFORCEMENTS.contains(&d.enforcement.as_str()) {
                return Err(ServiceError::Invalid(format!(
                    "enforcement {:?} is not one of {ENFORCEMENTS:?}",
                    d.enforcement
                )));
            }
            let details =
                serde_json::to_value(&d).map_err(|e| ServiceError::Invalid(e.to_string()))?;
            events.push(AuditEvent::new(
                &format!("admission.{}", d.outcome),
                actor,
                details,
            ));
        }
        // One durable transaction for the whole report.
        self.commit_audit(Txn {
            audit: events,
            ..Txn::default()
        })
        .await
    }
}
