//! What a node may claim: its endpoint and pod CIDRs are checked against an administrator's
//! allocation (`keyctl nodes allow`), else against its Node object where keyd has the Kubernetes
//! API, else refused (or, in `open` mode, accepted when no other node holds them). A node's
//! certificate proves its name, never its addresses.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use keyd_proto::identity::Identity;
use keyd_proto::{NodeAllocation, NodeRegistration};
use serde_json::json;

use super::state::{
    ALLOCATION_PREFIX, ClaimCheck, Keyd, NodeDirectory, Result, ServiceError, cidrs_overlap,
    to_json,
};
use crate::store::{AuditEvent, Table, Txn};

/// What a node's claims must lie inside, and where that came from (for messages).
struct Allowance {
    source: String,
    endpoints: Vec<IpAddr>,
    pod_cidrs: Vec<IpNet>,
}

impl Allowance {
    /// Why `reg` is not inside this allowance, if it is not.
    fn refusal(&self, reg: &NodeRegistration) -> Option<String> {
        if !self.endpoints.contains(&reg.endpoint) {
            return Some(format!(
                "endpoint {} is not among the node's addresses in {} ({})",
                reg.endpoint,
                self.source,
                list(&self.endpoints)
            ));
        }
        reg.pod_cidrs
            .iter()
            .find(|mine| !self.pod_cidrs.iter().any(|a| a.contains(*mine)))
            .map(|mine| {
                format!(
                    "pod CIDR {mine} does not lie inside the node's pod CIDRs in {} ({})",
                    self.source,
                    list(&self.pod_cidrs)
                )
            })
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most pod CIDRs and endpoints one allocation may hold.
const MAX_ALLOCATED: usize = 8;

/// `PUT /v1/nodes/{name}/allocation`'s body checked and put in canonical form (CIDRs cut to
/// their network, endpoints sorted and unique): at least one endpoint, at most
/// [`MAX_ALLOCATED`] of each.
pub fn check_allocation(mut allocation: NodeAllocation) -> Result<NodeAllocation> {
    if allocation.endpoints.is_empty() {
        return Err(ServiceError::Invalid(
            "an allocation needs at least one endpoint".into(),
        ));
    }
    if allocation.endpoints.len() > MAX_ALLOCATED || allocation.pod_cidrs.len() > MAX_ALLOCATED {
        return Err(ServiceError::Invalid(format!(
            "an allocation holds at most {MAX_ALLOCATED} endpoints and {MAX_ALLOCATED} pod CIDRs"
        )));
    }
    for n in &mut allocation.pod_cidrs {
        *n = n.trunc();
    }
    allocation.pod_cidrs.sort();
    allocation.pod_cidrs.dedup();
    allocation.endpoints.sort();
    allocation.endpoints.dedup();
    Ok(allocation)
}

impl Keyd {
    /// Sets where Node objects are read from (bootstrap's Kubernetes client), once, at start.
    pub fn set_node_directory(&self, directory: Arc<dyn NodeDirectory>) {
        // A second call (never made) keeps the first directory.
        let _ = self.node_directory.set(directory);
    }

    /// Refuses `reg` for node `name` unless its endpoint and pod CIDRs are the node's own (see
    /// the module documentation). Against a Node object: when the API server cannot be asked, a
    /// registration that repeats what is stored is accepted (so that nodes restarting during an
    /// outage still register), any other gets 503. Refusals are audited as `node.claim_refused`.
    ///
    /// Returns the allocation the check used, which the caller compares with the current one
    /// under its write lock (an admin may change it meanwhile).
    pub(super) async fn check_claims(
        &self,
        actor: &Identity,
        name: &str,
        reg: &NodeRegistration,
    ) -> Result<Option<NodeAllocation>> {
        let cache = self.cache();
        let allocation = cache.allocations.get(name).cloned();
        let unchanged = cache
            .nodes
            .get(name)
            .is_some_and(|n| n.endpoint == reg.endpoint && n.pod_cidrs == reg.pod_cidrs);
        drop(cache);
        // The node's own addresses, or why it has none to claim.
        let allowance: std::result::Result<Allowance, String> = match (
            &allocation,
            self.config.claims,
        ) {
            (Some(a), _) => Ok(Allowance {
                source: "its allocation (keyctl nodes allow)".to_owned(),
                endpoints: a.endpoints.clone(),
                pod_cidrs: a.pod_cidrs.clone(),
            }),
            (None, ClaimCheck::Open) => return Ok(None),
            (None, ClaimCheck::Allocation) => Err(format!(
                "node {name:?} has no allocation: an admin must allow its endpoint and pod \
                     CIDRs first (keyctl nodes allow {name} --endpoint IP --pod-cidr CIDR)"
            )),
            (None, ClaimCheck::NodeObject) => {
                let directory = self.node_directory.get().cloned().ok_or_else(|| {
                    ServiceError::ClaimsUnverifiable(
                        "this keyd checks claims against Node objects but has no \
                             Kubernetes API client"
                            .to_owned(),
                    )
                })?;
                match directory.node(name).await {
                    Ok(Some(facts)) => Ok(Allowance {
                        source: format!("its Node object {name:?}"),
                        endpoints: facts.addresses,
                        pod_cidrs: facts.pod_cidrs,
                    }),
                    Ok(None) => Err(format!(
                        "there is no Node object {name:?} to check its endpoint and pod \
                             CIDRs against (or allocate them: keyctl nodes allow)"
                    )),
                    Err(why) if unchanged => {
                        tracing::warn!(node = name, error = %why,
                                "cannot read the Node object; accepting the registration keyd already holds");
                        return Ok(None);
                    }
                    Err(why) => {
                        return Err(ServiceError::ClaimsUnverifiable(format!(
                            "cannot check node {name:?}'s endpoint and pod CIDRs against \
                                 its Node object: {why}"
                        )));
                    }
                }
            }
        };
        match allowance.map(|a| a.refusal(reg)) {
            Ok(None) => Ok(allocation),
            Ok(Some(why)) | Err(why) => self.refuse_claim(actor, name, reg, why).await,
        }
    }

    /// Audits and refuses (never returns `Ok`).
    async fn refuse_claim<T>(
        &self,
        actor: &Identity,
        name: &str,
        reg: &NodeRegistration,
        why: String,
    ) -> Result<T> {
        self.audit(AuditEvent::new(
            "node.claim_refused",
            actor,
            json!({ "node": name, "endpoint": reg.endpoint, "pod_cidrs": reg.pod_cidrs,
                    "reason": why }),
        ))
        .await?;
        Err(ServiceError::Forbidden(why))
    }

    /// Every allocation, by node name.
    pub fn allocations(&self) -> std::collections::BTreeMap<String, NodeAllocation> {
        self.cache().allocations.clone()
    }

    /// Sets node `name`'s allocation (`keyctl nodes allow`). Another node's allocation may not
    /// hold the same endpoint or an overlapping pod CIDR. Audited as `node.allocated`. Returns
    /// the stored allocation, and a warning when the node's current registration lies outside
    /// it (it stays until the node registers again or is removed).
    pub async fn allocate_node(
        &self,
        actor: &(dyn std::fmt::Display + Sync),
        name: &str,
        allocation: NodeAllocation,
    ) -> Result<(NodeAllocation, Option<String>)> {
        let mut allocation = check_allocation(allocation)?;
        let _w = self.writer().await?;
        let cache = self.cache();
        for (other, theirs) in cache.allocations.iter().filter(|(o, _)| *o != name) {
            if let Some(ip) = allocation
                .endpoints
                .iter()
                .find(|ip| theirs.endpoints.contains(ip))
            {
                return Err(ServiceError::Conflict(format!(
                    "endpoint {ip} is allocated to node {other:?}"
                )));
            }
            if let Some((mine, t)) = allocation.pod_cidrs.iter().find_map(|m| {
                theirs
                    .pod_cidrs
                    .iter()
                    .find(|t| cidrs_overlap(t, m))
                    .map(|t| (m, t))
            }) {
                return Err(ServiceError::Conflict(format!(
                    "pod CIDR {mine} overlaps {t}, allocated to node {other:?}"
                )));
            }
        }
        allocation.set_by = Some(actor.to_string());
        allocation.set_at = Some(self.clock.now());
        let warning = cache.nodes.get(name).and_then(|n| {
            let current = NodeRegistration {
                endpoint: n.endpoint,
                pod_cidrs: n.pod_cidrs.clone(),
                wireguard_public_key: None,
                wireguard_key_epoch: None,
                boot_id: None,
            };
            let allowance = Allowance {
                source: "the new allocation".to_owned(),
                endpoints: allocation.endpoints.clone(),
                pod_cidrs: allocation.pod_cidrs.clone(),
            };
            allowance.refusal(&current).map(|why| {
                format!(
                    "node {name:?} is registered outside it ({why}); its next registration is \
                     refused unless it fits: remove the node (keyctl nodes remove {name}) to take \
                     it out of the bundles now"
                )
            })
        });
        let warning = warning.or_else(|| {
            let held = cache.nodes.values().filter(|n| n.name != name).find(|n| {
                allocation.endpoints.contains(&n.endpoint)
                    || n.pod_cidrs
                        .iter()
                        .any(|c| allocation.pod_cidrs.iter().any(|a| cidrs_overlap(a, c)))
            })?;
            Some(format!(
                "node {:?} is registered with an endpoint or pod CIDR inside this allocation; \
                 {name} cannot register it until that node is removed (keyctl nodes remove {})",
                held.name, held.name
            ))
        });
        let key = format!("{ALLOCATION_PREFIX}{name}");
        let previous = self.store.get(Table::Meta, &key)?;
        let txn = Txn::default()
            .guard(Table::Meta, key.clone(), previous)
            .put(Table::Meta, key, to_json(&allocation))
            .audit(AuditEvent::new(
                "node.allocated",
                actor,
                json!({ "node": name, "endpoints": allocation.endpoints,
                        "pod_cidrs": allocation.pod_cidrs }),
            ));
        drop(cache);
        self.commit(txn).await?;
        Ok((allocation, warning))
    }

    /// Removes node `name`'s allocation (`keyctl nodes disallow`); its claims are then checked
    /// as configured (`[nodes] claims`). Audited as `node.allocation_removed`.
    pub async fn remove_allocation(
        &self,
        actor: &(dyn std::fmt::Display + Sync),
        name: &str,
    ) -> Result<()> {
        let _w = self.writer().await?;
        let key = format!("{ALLOCATION_PREFIX}{name}");
        let Some(previous) = self.store.get(Table::Meta, &key)? else {
            return Err(ServiceError::NotFound(format!(
                "node {name:?} has no allocation"
            )));
        };
        let txn = Txn::default()
            .guard(Table::Meta, key.clone(), Some(previous))
            .delete(Table::Meta, key)
            .audit(AuditEvent::new(
                "node.allocation_removed",
                actor,
                json!({ "node": name }),
            ));
        self.commit(txn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(endpoint: &str, cidrs: &[&str]) -> NodeRegistration {
        NodeRegistration {
            endpoint: endpoint.parse().unwrap(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            wireguard_public_key: None,
            wireguard_key_epoch: None,
            boot_id: None,
        }
    }

    fn allowance() -> Allowance {
        Allowance {
            source: "its Node object \"a\"".into(),
            endpoints: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn claims_inside_the_allowance_pass() {
        let a = allowance();
        assert_eq!(a.refusal(&reg("192.0.2.1", &["10.1.0.0/24"])), None);
        assert_eq!(a.refusal(&reg("2001:db8::1", &["10.1.0.128/25"])), None);
        assert_eq!(a.refusal(&reg("192.0.2.1", &[])), None);
    }

    #[test]
    fn claims_outside_say_which_and_where_from() {
        let a = allowance();
        let why = a.refusal(&reg("192.0.2.9", &["10.1.0.0/24"])).unwrap();
        assert!(
            why.contains("endpoint 192.0.2.9") && why.contains("Node object"),
            "{why}"
        );
        let why = a.refusal(&reg("192.0.2.1", &["10.1.0.0/23"])).unwrap();
        assert!(
            why.contains("pod CIDR 10.1.0.0/23") && why.contains("10.1.0.0/24"),
            "{why}"
        );
        let none = Allowance {
            pod_cidrs: vec![],
            ..allowance()
        };
        let why = none.refusal(&reg("192.0.2.1", &["10.9.0.0/24"])).unwrap();
        assert!(why.contains("(none)"), "{why}");
    }
}
