//! rtnetlink: the WireGuard link, the routes to remote pod CIDRs through it, and finding the
//! device that holds the node's address. Routes node-shim adds carry their own protocol number,
//! so a dump tells them apart from anyone else's on the same device.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::kernel::KernelError;
use crate::kernel::nl::NlSocket;
use crate::model::RouteSpec;

/// `proto` of the routes node-shim adds (unregistered in `/etc/iproute2/rt_protos`; shows as 199).
pub const RTPROT_NODE_SHIM: u8 = 199;
const ENODEV: i32 = 19;

fn check(what: &'static str, r: Result<(), i32>) -> Result<(), KernelError> {
    r.map_err(|errno| KernelError::netlink(what, errno))
}

/// A link's index and whether it is up, or `None` if there is no link of that name.
pub(crate) fn link_by_name(
    sock: &mut NlSocket,
    name: &str,
) -> Result<Option<(u32, bool)>, KernelError> {
    Ok(link_details(sock, name)?.map(|l| (l.index, l.up)))
}

pub(crate) struct LinkDetails {
    pub index: u32,
    pub up: bool,
    pub alias: Option<String>,
}

pub(crate) fn link_details(
    sock: &mut NlSocket,
    name: &str,
) -> Result<Option<LinkDetails>, KernelError> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match sock.fetch(
        "looking up a link",
        RouteNetlinkMessage::GetLink(m),
        NLM_F_ACK,
    ) {
        Ok(replies) => Ok(link_details_from(replies)),
        Err(e) if e.errno() == Some(ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The link a `GetLink` request was answered with.
pub(crate) fn link_details_from(replies: Vec<RouteNetlinkMessage>) -> Option<LinkDetails> {
    replies.into_iter().find_map(|r| match r {
        RouteNetlinkMessage::NewLink(l) => Some(LinkDetails {
            index: l.header.index,
            up: l.header.flags.contains(LinkFlags::Up),
            alias: l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfAlias(s) => Some(s),
                _ => None,
            }),
        }),
        _ => None,
    })
}

/// Sets a link's alias (`ip link set DEV alias TEXT`).
pub(crate) fn set_alias(sock: &mut NlSocket, index: u32, alias: &str) -> Result<(), KernelError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::IfAlias(alias.to_owned()));
    let r = sock.request(
        "setting the link alias",
        RouteNetlinkMessage::SetLink(m),
        0,
        |_| {},
    )?;
    check("setting the link alias", r)
}

/// The alias node-shim gives its WireGuard device, carrying the key's node-key epoch.
pub(crate) fn epoch_alias(epoch: u64) -> String {
    format!("keyd-node-shim key-epoch={epoch}")
}

pub(crate) fn parse_epoch_alias(alias: &str) -> Option<u64> {
    alias
        .strip_prefix("keyd-node-shim key-epoch=")?
        .parse()
        .ok()
}

/// Creates a link of `kind` (`wireguard`).
pub(crate) fn create_link(
    sock: &mut NlSocket,
    name: &str,
    kind: InfoKind,
) -> Result<(), KernelError> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
    let r = sock.request(
        "creating the WireGuard link",
        RouteNetlinkMessage::NewLink(m),
        NLM_F_CREATE | NLM_F_EXCL,
        |_| {},
    )?;
    check("creating the WireGuard link", r)
}

pub(crate) fn set_up(sock: &mut NlSocket, index: u32) -> Result<(), KernelError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    let r = sock.request(
        "bringing the link up",
        RouteNetlinkMessage::SetLink(m),
        0,
        |_| {},
    )?;
    check("bringing the link up", r)
}

pub(crate) fn delete_link(sock: &mut NlSocket, index: u32) -> Result<(), KernelError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    let r = sock.request(
        "deleting a link",
        RouteNetlinkMessage::DelLink(m),
        0,
        |_| {},
    )?;
    check("deleting a link", r)
}

/// The index of the link that holds `addr`.
pub(crate) fn link_with_address(
    sock: &mut NlSocket,
    addr: IpAddr,
) -> Result<Option<u32>, KernelError> {
    let replies = sock.dump(
        "listing addresses",
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
    )?;
    Ok(link_with_address_from(replies, addr))
}

/// The index of the link that holds `addr`, among the messages of an address dump.
pub(crate) fn link_with_address_from(
    replies: Vec<RouteNetlinkMessage>,
    addr: IpAddr,
) -> Option<u32> {
    replies.into_iter().find_map(|r| match r {
        RouteNetlinkMessage::NewAddress(a) => a
            .attributes
            .iter()
            .any(|x| matches!(x, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if *ip == addr))
            .then_some(a.header.index),
        _ => None,
    })
}

pub(crate) fn route_msg(spec: &RouteSpec, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    let (family, dst) = match spec.dst {
        IpNet::V4(n) => (AddressFamily::Inet, RouteAddress::Inet(n.addr())),
        IpNet::V6(n) => (AddressFamily::Inet6, RouteAddress::Inet6(n.addr())),
    };
    m.header = RouteHeader {
        address_family: family,
        destination_prefix_length: spec.dst.prefix_len(),
        table: u8::try_from(spec.table).unwrap_or(252),
        protocol: RouteProtocol::Other(RTPROT_NODE_SHIM),
        scope: RouteScope::Link,
        kind: RouteType::Unicast,
        ..RouteHeader::default()
    };
    m.attributes.push(RouteAttribute::Destination(dst));
    m.attributes.push(RouteAttribute::Oif(oif));
    m.attributes.push(RouteAttribute::Table(spec.table));
    if spec.metric != 0 {
        m.attributes.push(RouteAttribute::Priority(spec.metric));
    }
    m
}

/// Adds (`add`) or deletes routes; returns per route `Ok` or errno.
pub(crate) fn change_routes(
    sock: &mut NlSocket,
    specs: &[RouteSpec],
    oif: u32,
    add: bool,
) -> Result<Vec<Result<(), i32>>, KernelError> {
    let msgs = specs
        .iter()
        .map(|s| {
            let m = route_msg(s, oif);
            if add {
                RouteNetlinkMessage::NewRoute(m)
            } else {
                RouteNetlinkMessage::DelRoute(m)
            }
        })
        .collect();
    let flags = if add { NLM_F_CREATE | NLM_F_EXCL } else { 0 };
    sock.batch(
        if add {
            "adding routes"
        } else {
            "deleting routes"
        },
        msgs,
        flags,
        |_| {},
    )
}

/// The routes node-shim added through `oif`, in any table.
pub(crate) fn routes(sock: &mut NlSocket, oif: u32) -> Result<BTreeSet<RouteSpec>, KernelError> {
    let mut out = BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        let replies = sock.dump("listing routes", RouteNetlinkMessage::GetRoute(req))?;
        routes_from(replies, family, oif, &mut out);
    }
    Ok(out)
}

/// The routes through `oif` that node-shim added, among the messages of a route dump of
/// `family`, into `out`.
pub(crate) fn routes_from(
    replies: Vec<RouteNetlinkMessage>,
    family: AddressFamily,
    oif: u32,
    out: &mut BTreeSet<RouteSpec>,
) {
    for r in replies {
        let RouteNetlinkMessage::NewRoute(m) = r else {
            continue;
        };
        if m.header.protocol != RouteProtocol::Other(RTPROT_NODE_SHIM) {
            continue;
        }
        let mut dst = None;
        let mut route_oif = None;
        let mut table = u32::from(m.header.table);
        let mut metric = 0;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
                RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
                RouteAttribute::Oif(o) => route_oif = Some(*o),
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        if route_oif != Some(oif) {
            continue;
        }
        let addr = dst.unwrap_or(match family {
            AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        });
        if let Ok(net) = IpNet::new(addr, m.header.destination_prefix_length) {
            out.insert(RouteSpec {
                dst: net,
                table,
                metric,
            });
        }
    }
}

/// Every link's index and name (to find the devices local pods send on, and the underlay).
pub(crate) fn links(sock: &mut NlSocket) -> Result<Vec<(u32, String)>, KernelError> {
    let replies = sock.dump(
        "listing links",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )?;
    Ok(links_from(replies))
}

/// Every link's index and name among the messages of a link dump.
pub(crate) fn links_from(replies: Vec<RouteNetlinkMessage>) -> Vec<(u32, String)> {
    replies
        .into_iter()
        .filter_map(|r| match r {
            RouteNetlinkMessage::NewLink(l) => {
                let index = l.header.index;
                l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some((index, n)),
                    _ => None,
                })
            }
            _ => None,
        })
        .collect()
}

/// Policy routing for steered WireGuard traffic, IPv4 and IPv6: packets whose mark matches look
/// up `table` (routes through the WireGuard device) at `priority`, and one priority later the
/// same packets are blackholed, so a marked packet the table has no route for (its peer's route
/// removed) is dropped rather than routed in the clear. Adds what is missing; idempotent.
pub(crate) fn ensure_mark_rules(
    sock: &mut NlSocket,
    mark: u32,
    mask: u32,
    table: u32,
    priority: u32,
) -> Result<(), KernelError> {
    use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for (action, prio) in [
            (RuleAction::ToTable, priority),
            (RuleAction::Blackhole, priority + 1),
        ] {
            let mut m = RuleMessage::default();
            m.header.family = family;
            m.header.action = action;
            m.attributes.push(RuleAttribute::Priority(prio));
            m.attributes.push(RuleAttribute::FwMark(mark));
            m.attributes.push(RuleAttribute::FwMask(mask));
            m.attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Other(
                    RTPROT_NODE_SHIM,
                )));
            if action == RuleAction::ToTable {
                m.header.table = if table < 256 { table as u8 } else { 0 };
                m.attributes.push(RuleAttribute::Table(table));
            }
            match sock.request(
                "adding a routing rule for steered packets",
                RouteNetlinkMessage::NewRule(m),
                NLM_F_CREATE | NLM_F_EXCL,
                |_| {},
            )? {
                Ok(()) | Err(17) => {}
                Err(errno) => {
                    return Err(KernelError::netlink(
                        format!("adding the rule for mark {mark:#x}/{mask:#x} at priority {prio}"),
                        errno,
                    ));
                }
            }
        }
    }
    Ok(())
}
