//! `keyctl status`, `nodes` and `report`: overviews; and `nodes remove` / `nodes readmit`.

use std::time::Duration;

use keyd_mtls::client::Connection;
use keyd_proto::rules::{DataplaneSummary, NodeRules};
use keyd_proto::time::format_duration;
use keyd_proto::{NodeInfo, Report, Status};

use crate::http::{call, send, to_body};
use crate::table::{print, table, ts};
use crate::{EXIT_FINDING, EXIT_INVALID, Failure, Out, fail};

pub async fn status(conn: &mut Connection, out: Out) -> Result<(), Failure> {
    let s: Status = call(conn, "GET", "/v1/status", None).await?;
    print(out.json(), &s, || status_table(&s));
    Ok(())
}

pub async fn nodes(conn: &mut Connection, out: Out) -> Result<(), Failure> {
    let nodes: Vec<NodeInfo> = call(conn, "GET", "/v1/nodes", None).await?;
    print(out.json(), &nodes, || nodes_table(&nodes));
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum NodesCommand {
    /// Remove a node: it leaves every bundle, its certificates are refused, and a new IPsec key
    /// and WireGuard preshared-key epoch follow (unless --no-rotate). Audited.
    Remove {
        node: String,
        /// Do not rotate the keys the node held (rotate them yourself soon).
        #[arg(long)]
        no_rotate: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Let a removed node back in: certificates issued after its removal are accepted again.
    Readmit { node: String },
    /// Allocate a node's endpoint addresses and pod CIDRs: it may register only these. Binds
    /// whatever `[nodes] claims` says; needed for every node where it is "allocation". Audited.
    Allow {
        node: String,
        /// An address the node may register as its endpoint (repeat for more).
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<std::net::IpAddr>,
        /// A CIDR its pod CIDRs must lie inside (repeat for more; none: no pod CIDR).
        #[arg(long = "pod-cidr")]
        pod_cidrs: Vec<ipnet::IpNet>,
        #[command(flatten)]
        out: Out,
    },
    /// Remove a node's allocation: its claims are then checked as `[nodes] claims` says.
    Disallow { node: String },
    /// List the allocations.
    Allocations {
        #[command(flatten)]
        out: Out,
    },
}

pub async fn nodes_command(conn: &mut Connection, cmd: NodesCommand) -> Result<(), Failure> {
    match cmd {
        NodesCommand::Remove {
            node,
            no_rotate,
            out,
        } => {
            keyd_proto::identity::validate_name(&node)
                .map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
            let path = format!("/v1/nodes/{node}?rotate={}", !no_rotate);
            let r: keyd_proto::NodeRemoval = call(conn, "DELETE", &path, None).await?;
            print(out.json(), &r, || {
                format!(
                    "removed {}\nIPsec: {}\nWireGuard preshared keys: {}\n",
                    r.node,
                    r.ipsec,
                    r.wireguard_psk_epoch.map_or_else(
                        || "not rotated".to_owned(),
                        |e| format!("epoch {e} started")
                    )
                )
            });
        }
        NodesCommand::Allow {
            node,
            endpoints,
            pod_cidrs,
            out,
        } => {
            keyd_proto::identity::validate_name(&node)
                .map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
            let body = keyd_proto::NodeAllocation {
                endpoints,
                pod_cidrs,
                set_by: None,
                set_at: None,
            };
            let body = to_body(&body)?;
            let path = format!("/v1/nodes/{node}/allocation");
            let r: keyd_proto::AllocationSet = call(conn, "PUT", &path, Some(body)).await?;
            print(out.json(), &r, || {
                let mut text = format!(
                    "allocated to {}: endpoints {}; pod CIDRs {}\n",
                    r.node,
                    join(&r.allocation.endpoints),
                    join(&r.allocation.pod_cidrs)
                );
                if let Some(w) = &r.warning {
                    text.push_str(&format!("warning: {w}\n"));
                }
                text
            });
        }
        NodesCommand::Disallow { node } => {
            keyd_proto::identity::validate_name(&node)
                .map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
            send(
                conn,
                "DELETE",
                &format!("/v1/nodes/{node}/allocation"),
                None,
            )
            .await?;
            println!("removed the allocation of {node}");
        }
        NodesCommand::Allocations { out } => {
            let all: std::collections::BTreeMap<String, keyd_proto::NodeAllocation> =
                call(conn, "GET", "/v1/allocations", None).await?;
            print(out.json(), &all, || {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|(name, a)| {
                        vec![
                            name.clone(),
                            join(&a.endpoints),
                            join(&a.pod_cidrs),
                            a.set_by.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(&["NODE", "ENDPOINTS", "POD CIDRS", "SET BY"], &rows)
            });
        }
        NodesCommand::Readmit { node } => {
            keyd_proto::identity::validate_name(&node)
                .map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
            send(conn, "POST", &format!("/v1/nodes/{node}/readmit"), None).await?;
            println!("readmitted {node}");
        }
    }
    Ok(())
}

/// `items` separated by commas, `-` for none.
fn join<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn rules(conn: &mut Connection, node: &str, out: Out) -> Result<(), Failure> {
    // A node name is a DNS label, so it goes into the path as it is.
    keyd_proto::identity::validate_name(node).map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
    let path = format!("/v1/nodes/{node}/rules");
    let r: NodeRules = call(conn, "GET", &path, None).await?;
    print(out.json(), &r, || rules_table(&r));
    Ok(())
}

/// The key report, and the data plane's enforcement when nodes report it.
#[derive(serde::Serialize)]
struct FullReport<'a> {
    #[serde(flatten)]
    keys: &'a Report,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataplane: Option<&'a DataplaneSummary>,
}

/// Exits 7 (after printing) when a class is overdue, so that it can gate a cron job.
pub async fn report(conn: &mut Connection, out: Out) -> Result<(), Failure> {
    let r: Report = call(conn, "GET", "/v1/report", None).await?;
    // A keyd without data-plane reports (or an older one) has no section to show.
    let dataplane: Option<DataplaneSummary> = call(conn, "GET", "/v1/dataplane", None)
        .await
        .ok()
        .filter(|d: &DataplaneSummary| !d.nodes.is_empty());
    let full = FullReport {
        keys: &r,
        dataplane: dataplane.as_ref(),
    };
    print(out.json(), &full, || {
        let mut text = report_table(&r);
        if let Some(d) = &dataplane {
            text.push('\n');
            text.push_str(&dataplane_table(d));
        }
        text
    });
    if r.overdue {
        return Err(fail(EXIT_FINDING, "a key class is overdue for rotation"));
    }
    Ok(())
}

fn spi(s: Option<u8>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| s.to_string())
}
fn status_table(s: &Status) -> String {
    let current = s.ipsec.keys.first();
    let mut replicas = Vec::new();
    if let Some(r) = &s.replication {
        replicas.push(vec!["answered by".into(), r.this.clone()]);
        if let Some(e) = &r.error {
            replicas.push(vec!["replicas".into(), format!("unknown: {e}")]);
        }
        for replica in &r.replicas {
            replicas.push(vec![
                if replica.leader { "leader" } else { "replica" }.into(),
                format!(
                    "{} api {} since {}",
                    replica.name, replica.api, replica.since
                ),
            ]);
        }
        if r.error.is_none() && !r.replicas.iter().any(|x| x.leader) {
            replicas.push(vec![
                "leader".into(),
                "none (an election is under way)".into(),
            ]);
        }
    }
    let mut rows = vec![
        vec!["version".into(), s.version.clone()],
        vec!["store".into(), s.store.clone()],
        vec!["kek".into(), format!("{} ({})", s.kek_backend, s.kek_id)],
        vec![
            "kek health".into(),
            s.custody
                .as_ref()
                .map_or("-".into(), |c| c.health.state.clone()),
        ],
        vec!["nodes".into(), s.nodes.to_string()],
        vec!["ipsec outbound spi".into(), spi(s.ipsec.outbound_spi)],
        vec![
            "ipsec algorithm".into(),
            current.map_or("-".into(), |k| {
                format!(
                    "{} {}-bit{}",
                    k.algorithm,
                    k.key_bits,
                    if k.per_tunnel { " per-tunnel" } else { "" }
                )
            }),
        ],
        vec![
            "ipsec key created".into(),
            current.map_or("-".into(), |k| k.created_at.to_string()),
        ],
        vec![
            "wireguard psk epoch".into(),
            s.wireguard.psk_epoch.to_string(),
        ],
        vec![
            "wireguard node keys".into(),
            s.wireguard.nodes_with_public_key.to_string(),
        ],
    ];
    // The replicas right after the store they serve.
    rows.splice(2..2, replicas);
    table(&["FIELD", "VALUE"], &rows)
}

fn nodes_table(nodes: &[NodeInfo]) -> String {
    if nodes.is_empty() {
        return "no nodes registered\n".into();
    }
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.endpoint.to_string(),
                n.pod_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                if n.wireguard_public_key.is_some() {
                    "yes".into()
                } else {
                    "no".into()
                },
                n.acked
                    .ack
                    .ipsec_outbound_spi
                    .map_or("-".into(), |s| s.to_string()),
                n.acked
                    .ack
                    .wireguard_epoch
                    .map_or("-".into(), |e| e.to_string()),
                n.last_seen.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NODE",
            "ENDPOINT",
            "POD CIDRS",
            "WG KEY",
            "ACKED SPI",
            "ACKED EPOCH",
            "LAST SEEN",
        ],
        &rows,
    )
}
fn secs(s: Option<u64>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| format_duration(Duration::from_secs(s)).to_string(),
    )
}
fn report_table(r: &Report) -> String {
    let rows = r
        .classes
        .iter()
        .map(|c| {
            vec![
                c.class.as_str().to_owned(),
                ts(c.last_rotation),
                ts(c.next_due),
                secs(c.oldest_key_age_secs),
                if c.overdue {
                    "OVERDUE".into()
                } else if c.within_schedule {
                    "ok".into()
                } else {
                    "late".into()
                },
                if c.within_bounds {
                    "ok".into()
                } else {
                    "VIOLATED".into()
                },
                c.detail.clone().unwrap_or_default(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "CLASS",
            "LAST ROTATION",
            "NEXT DUE",
            "OLDEST KEY",
            "SCHEDULE",
            "BOUNDS",
            "DETAIL",
        ],
        &rows,
    )
}

/// Per policy across the nodes' latest reports: where it is programmed, and the sums.
fn dataplane_table(d: &DataplaneSummary) -> String {
    let rows = d
        .policies
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                format!("{}/{}", p.nodes_programmed, p.nodes_reporting),
                p.encrypted_packets.to_string(),
                p.dropped_packets.to_string(),
                p.clear_packets.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    format!(
        "data plane ({} nodes reporting)\n{}",
        d.nodes.len(),
        table(
            &[
                "POLICY",
                "PROGRAMMED",
                "ENCRYPTED PKTS",
                "DROPPED PKTS",
                "CLEAR PKTS"
            ],
            &rows,
        )
    )
}

/// The policies by index, then the endpoints naming them by index.
fn rules_table(r: &NodeRules) -> String {
    let policies = r
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ports: Vec<String> = p
                .ports
                .iter()
                .map(|p| format!("{:?}/{}", p.protocol, p.port))
                .collect();
            vec![
                i.to_string(),
                p.name.clone(),
                format!("{:?}", p.mode).to_lowercase(),
                if p.strict { "strict" } else { "lenient" }.into(),
                if ports.is_empty() {
                    "all".into()
                } else {
                    ports.join(",")
                },
            ]
        })
        .collect::<Vec<_>>();
    let list = |v: &[u32]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        }
    };
    let endpoints = r
        .endpoints
        .iter()
        .map(|e| {
            vec![
                e.prefix.to_string(),
                e.node.clone(),
                list(&e.selected_by),
                list(&e.peer_of),
            ]
        })
        .collect::<Vec<_>>();
    let mut text = format!("node {} revision {}\n", r.node, r.revision);
    text.push_str(&table(
        &["#", "POLICY", "MODE", "STRICT", "PORTS"],
        &policies,
    ));
    text.push('\n');
    text.push_str(&table(
        &["PREFIX", "NODE", "SELECTED BY", "PEER OF"],
        &endpoints,
    ));
    for rejected in &r.rejected {
        text.push_str(&format!(
            "rejected: {}: {}\n",
            rejected.name, rejected.reason
        ));
    }
    text
}
