//! Nodes' data-plane reports (`POST /v1/nodes/{name}/dataplane`): what each node's eBPF maps
//! enforce and their counters. The latest report of each node is kept in the store (one small
//! transaction per report), so that every replica answers `GET /v1/dataplane` alike. A report
//! with new strict drops is audited once (policy, count), never per packet.

use std::collections::BTreeMap;

use keyd_proto::Timestamp;
use keyd_proto::identity::Identity;
use keyd_proto::rules::{
    DataplaneReport, DataplaneSummary, MAX_RULE_POLICIES, NodeDataplane, PolicyDataplane,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::state::{Keyd, Result, ServiceError, from_json, to_json};
use crate::store::{AuditEvent, Table, Txn};

/// A report as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredReport {
    received_at: Timestamp,
    report: DataplaneReport,
}

/// The name that stands for every policy in `all` mode.
const ALL: &str = "all";

/// Longest a name in an error message is quoted (a node's input, echoed back to it only).
const QUOTE_MAX: usize = 128;

fn quote(s: &str) -> String {
    let cut: String = s.chars().take(QUOTE_MAX).collect();
    format!("{cut:?}")
}

/// Checks a report against the policies of the node's current rules (`None`: keyd has none to
/// check against). Every problem names what is wrong.
pub fn validate_report(report: &DataplaneReport, current: Option<&[String]>) -> Result<()> {
    let invalid = |m: String| Err(ServiceError::Invalid(m));
    if report.node_mode != "all" && report.node_mode != "policy" {
        return invalid(format!(
            "node_mode {} is neither \"all\" nor \"policy\"",
            quote(&report.node_mode)
        ));
    }
    if report.policies.len() > MAX_RULE_POLICIES + 1 {
        return invalid(format!(
            "{} policies; a node's rules hold at most {MAX_RULE_POLICIES}",
            report.policies.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in &report.policies {
        if !seen.insert(c.name.as_str()) {
            return invalid(format!("policy {} is listed twice", quote(&c.name)));
        }
        if c.name == ALL {
            continue;
        }
        match current {
            Some(names) if names.contains(&c.name) => {}
            Some(_) => {
                return invalid(format!(
                    "policy {} is not in this node's current rules (name \"all\" or a policy of GET /v1/nodes/NAME/rules)",
                    quote(&c.name)
                ));
            }
            None => {
                return Err(ServiceError::RulesNotReady(
                    "keyd has no current rules for this node to check the report's policies \
                     against (no [policy] section, or not compiled yet); report \"all\" or \
                     retry once GET /v1/nodes/NAME/rules answers"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

/// The strict drops new in `now` since `prev` (per policy: packets, bytes). Counters restarted
/// (another `counting_since`, or smaller than before) count from zero.
fn new_drops(prev: Option<&DataplaneReport>, now: &DataplaneReport) -> Vec<(String, u64, u64)> {
    let prev = prev.filter(|p| p.counting_since == now.counting_since);
    now.policies
        .iter()
        .filter_map(|c| {
            let base = prev.and_then(|p| p.policies.iter().find(|q| q.name == c.name));
            let (bp, bb) = base.map_or((0, 0), |b| (b.dropped_packets, b.dropped_bytes));
            let packets = c
                .dropped_packets
                .checked_sub(bp)
                .unwrap_or(c.dropped_packets);
            let bytes = c.dropped_bytes.checked_sub(bb).unwrap_or(c.dropped_bytes);
            (packets > 0).then(|| (c.name.clone(), packets, bytes))
        })
        .collect()
}

/// Every node's latest report, summed per policy.
fn summarize(reports: Vec<(String, StoredReport)>) -> DataplaneSummary {
    let mut policies: BTreeMap<String, PolicyDataplane> = BTreeMap::new();
    let mut nodes = Vec::with_capacity(reports.len());
    for (node, stored) in reports {
        for c in &stored.report.policies {
            policies
                .entry(c.name.clone())
                .or_insert_with(|| PolicyDataplane {
                    name: c.name.clone(),
                    ..PolicyDataplane::default()
                })
                .add(c);
        }
        nodes.push(NodeDataplane {
            node,
            node_mode: stored.report.node_mode,
            rules_revision: stored.report.rules_revision,
            at: stored.report.at,
            received_at: stored.received_at,
        });
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    DataplaneSummary {
        nodes,
        policies: policies.into_values().collect(),
    }
}

impl Keyd {
    /// Keeps a node's data-plane report as its latest, auditing new strict drops.
    pub async fn record_dataplane(
        &self,
        actor: &Identity,
        name: &str,
        report: DataplaneReport,
    ) -> Result<usize> {
        if !self.cache().nodes.contains_key(name) {
            return Err(ServiceError::NotFound(format!(
                "node {name:?} is not registered"
            )));
        }
        let current = match self.rule_policy_names(name) {
            Ok(names) => names,
            Err(ServiceError::PolicyNotConfigured) => None,
            Err(e) => return Err(e),
        };
        validate_report(&report, current.as_deref())?;
        let _w = self.writer().await?;
        let previous = self.store.get(Table::Dataplane, name)?;
        let prev: Option<StoredReport> = previous
            .as_deref()
            .map(|b| from_json(b, "data-plane report"))
            .transpose()?;
        let drops = new_drops(prev.as_ref().map(|p| &p.report), &report);
        let stored = StoredReport {
            received_at: self.clock.now(),
            report,
        };
        let mut txn = Txn::default().guard(Table::Dataplane, name, previous).put(
            Table::Dataplane,
            name,
            to_json(&stored),
        );
        if !drops.is_empty() {
            let drops: Vec<_> = drops
                .iter()
                .map(|(policy, packets, bytes)| {
                    json!({ "policy": policy, "packets": packets, "bytes": bytes })
                })
                .collect();
            txn = txn.audit(AuditEvent::new(
                "dataplane.strict_drops",
                actor,
                json!({ "node": name, "rules_revision": stored.report.rules_revision,
                        "drops": drops }),
            ));
        }
        let n = drops.len();
        self.commit_audit(txn).await?;
        self.metrics.rules.dataplane_reports.inc();
        Ok(n)
    }

    /// `GET /v1/dataplane`.
    pub fn dataplane_summary(&self) -> Result<DataplaneSummary> {
        let mut reports = Vec::new();
        for (node, bytes) in self.store.scan(Table::Dataplane)? {
            reports.push((node, from_json(&bytes, "data-plane report")?));
        }
        Ok(summarize(reports))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyd_proto::rules::PolicyCounters;

    fn counters(name: &str, dropped: u64) -> PolicyCounters {
        PolicyCounters {
            name: name.into(),
            programmed: true,
            dropped_packets: dropped,
            dropped_bytes: dropped * 100,
            encrypted_packets: 10,
            ..PolicyCounters::default()
        }
    }

    fn report(mode: &str, since: u64, policies: Vec<PolicyCounters>) -> DataplaneReport {
        DataplaneReport {
            node_mode: mode.into(),
            rules_revision: None,
            counting_since: Timestamp(since),
            at: Timestamp(since + 60),
            policies,
        }
    }

    #[test]
    fn reports_are_checked_against_the_current_rules() {
        let names = vec!["EncryptionPolicy a/p".to_owned()];
        // (name, report, the current rules' policies, a part of the expected error)
        type Case<'a> = (
            &'a str,
            DataplaneReport,
            Option<&'a [String]>,
            Option<&'a str>,
        );
        let cases: [Case<'_>; 7] = [
            (
                "a policy of the rules",
                report("policy", 1, vec![counters("EncryptionPolicy a/p", 0)]),
                Some(&names),
                None,
            ),
            (
                "all mode",
                report("all", 1, vec![counters("all", 0)]),
                None,
                None,
            ),
            (
                "an unknown mode",
                report("some", 1, vec![]),
                Some(&names),
                Some("node_mode"),
            ),
            (
                "a policy not in the rules",
                report("policy", 1, vec![counters("EncryptionPolicy b/q", 0)]),
                Some(&names),
                Some("not in this node's current rules"),
            ),
            (
                "a policy twice",
                report("policy", 1, vec![counters("all", 0), counters("all", 0)]),
                Some(&names),
                Some("twice"),
            ),
            (
                "no rules to check against",
                report("policy", 1, vec![counters("EncryptionPolicy a/p", 0)]),
                None,
                Some("no current rules"),
            ),
            (
                "too many",
                report(
                    "policy",
                    1,
                    (0..=MAX_RULE_POLICIES + 1)
                        .map(|i| counters(&format!("p{i}"), 0))
                        .collect(),
                ),
                Some(&names),
                Some("at most"),
            ),
        ];
        for (name, r, current, error) in cases {
            match (validate_report(&r, current), error) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, wanted an error saying {want:?}"),
            }
        }
    }

    #[test]
    fn only_new_drops_are_audited() {
        let first = report("policy", 1, vec![counters("p", 5), counters("q", 0)]);
        assert_eq!(new_drops(None, &first), [("p".to_owned(), 5, 500)]);
        let same = report("policy", 1, vec![counters("p", 5), counters("q", 0)]);
        assert!(new_drops(Some(&first), &same).is_empty(), "no new drops");
        let more = report("policy", 1, vec![counters("p", 7), counters("q", 1)]);
        assert_eq!(
            new_drops(Some(&first), &more),
            [("p".to_owned(), 2, 200), ("q".to_owned(), 1, 100)]
        );
        let restarted = report("policy", 50, vec![counters("p", 3)]);
        assert_eq!(
            new_drops(Some(&more), &restarted),
            [("p".to_owned(), 3, 300)],
            "new maps count from zero"
        );
    }

    #[test]
    fn the_summary_sums_per_policy_across_nodes() {
        let stored = |r| StoredReport {
            received_at: Timestamp(100),
            report: r,
        };
        let mut unprogrammed = counters("p", 1);
        unprogrammed.programmed = false;
        let s = summarize(vec![
            ("n2".into(), stored(report("policy", 1, vec![unprogrammed]))),
            (
                "n1".into(),
                stored(report(
                    "policy",
                    1,
                    vec![counters("p", 2), counters("q", 0)],
                )),
            ),
        ]);
        let nodes: Vec<&str> = s.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(nodes, ["n1", "n2"]);
        assert_eq!(s.policies.len(), 2);
        let p = &s.policies[0];
        assert_eq!(
            (p.name.as_str(), p.nodes_reporting, p.nodes_programmed),
            ("p", 2, 1)
        );
        assert_eq!((p.dropped_packets, p.encrypted_packets), (3, 20));
    }
}
