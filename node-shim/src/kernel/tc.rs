//! tc ingress filters on the underlay device that mark ESP by its outer source address:
//! `flower ip_proto esp src_ip PEER action skbedit mark VALUE/MASK`.
//!
//! The kernel looks an inbound ESP state up by destination, SPI and mark. Every peer's states
//! for a key share the first two, so the mark, set here before the packet reaches XFRM, picks
//! the peer's state (and so its per-tunnel key). node-shim's filters are the ones at its
//! priority; their handle is the peer's mark index.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{DefaultNla, NLM_F_CREATE, NLM_F_EXCL, Nla};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionOption, TcAttribute, TcFilterFlowerOption, TcHandle,
    TcHeader, TcMessage, TcOption,
};

use crate::kernel::KernelError;
use crate::kernel::nl::NlSocket;
use crate::model::{Mark, MarkFilter};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ESP: u8 = 50;
/// `TCA_CLS_FLAGS_SKIP_HW`: a software filter.
const SKIP_HW: u32 = 1;
/// `TC_ACT_PIPE`: continue after the action.
const TC_ACT_PIPE: i32 = 3;
const TCA_SKBEDIT_PARMS: u16 = 2;
const TCA_SKBEDIT_MARK: u16 = 5;
const TCA_SKBEDIT_MASK: u16 = 8;
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;

/// The clsact (or ingress) qdisc's ingress hook, `ffff:fff2`.
const INGRESS_PARENT: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_INGRESS,
};

fn proto(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }
}

/// `tcm_info`: priority in the upper half, the protocol (network byte order) in the lower.
fn info(prio: u16, protocol: u16) -> u32 {
    (u32::from(prio) << 16) | u32::from(protocol.to_be())
}

fn handle(h: u32) -> TcHandle {
    TcHandle {
        major: (h >> 16) as u16,
        minor: (h & 0xffff) as u16,
    }
}

/// Adds a clsact qdisc to `ifindex` unless one (or an ingress qdisc) is there.
pub(crate) fn ensure_clsact(sock: &mut NlSocket, ifindex: u32) -> Result<(), KernelError> {
    let mut m = TcMessage::default();
    m.header = TcHeader {
        index: ifindex as i32,
        handle: TcHandle {
            major: 0xffff,
            minor: 0,
        },
        parent: TcHandle::CLSACT,
        ..TcHeader::default()
    };
    m.attributes.push(TcAttribute::Kind("clsact".to_owned()));
    match sock.request(
        "adding the clsact qdisc",
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_EXCL,
        |_| {},
    )? {
        Ok(()) => Ok(()),
        Err(EEXIST) => Ok(()),
        Err(errno) => Err(KernelError::netlink("adding the clsact qdisc", errno)),
    }
}

fn skbedit(mark: Mark) -> TcAction {
    // struct tc_skbedit { index, capab, action, refcnt, bindcnt }
    let mut parms = Vec::with_capacity(20);
    parms.extend_from_slice(&0u32.to_ne_bytes());
    parms.extend_from_slice(&0u32.to_ne_bytes());
    parms.extend_from_slice(&TC_ACT_PIPE.to_ne_bytes());
    parms.extend_from_slice(&0i32.to_ne_bytes());
    parms.extend_from_slice(&0i32.to_ne_bytes());
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("skbedit".to_owned()),
        TcActionAttribute::Options(vec![
            TcActionOption::Other(DefaultNla::new(TCA_SKBEDIT_PARMS, parms)),
            TcActionOption::Other(DefaultNla::new(
                TCA_SKBEDIT_MARK,
                mark.value.to_ne_bytes().to_vec(),
            )),
            TcActionOption::Other(DefaultNla::new(
                TCA_SKBEDIT_MASK,
                mark.mask.to_ne_bytes().to_vec(),
            )),
        ]),
    ];
    action
}

pub(crate) fn filter_msg(ifindex: u32, prio: u16, f: &MarkFilter, with_options: bool) -> TcMessage {
    let mut m = TcMessage::default();
    m.header = TcHeader {
        index: ifindex as i32,
        handle: handle(f.handle),
        parent: INGRESS_PARENT,
        info: info(prio, proto(&f.src)),
        ..TcHeader::default()
    };
    m.attributes.push(TcAttribute::Kind("flower".to_owned()));
    if with_options {
        let mut opts = vec![
            TcOption::Flower(TcFilterFlowerOption::EthType(proto(&f.src))),
            TcOption::Flower(TcFilterFlowerOption::IpProto(IPPROTO_ESP)),
        ];
        match f.src {
            IpAddr::V4(v4) => {
                opts.push(TcOption::Flower(TcFilterFlowerOption::Ipv4Src(v4)));
                opts.push(TcOption::Flower(TcFilterFlowerOption::Ipv4SrcMask(
                    Ipv4Addr::BROADCAST,
                )));
            }
            IpAddr::V6(v6) => {
                opts.push(TcOption::Flower(TcFilterFlowerOption::Ipv6Src(v6)));
                opts.push(TcOption::Flower(TcFilterFlowerOption::Ipv6SrcMask(
                    Ipv6Addr::from(u128::MAX),
                )));
            }
        }
        opts.push(TcOption::Flower(TcFilterFlowerOption::Flags(SKIP_HW)));
        opts.push(TcOption::Flower(TcFilterFlowerOption::Actions(vec![
            skbedit(f.mark),
        ])));
        m.attributes.push(TcAttribute::Options(opts));
    }
    m
}

/// Adds `filters`, replacing any existing filter with the same handle (`NLM_F_CREATE` without
/// `NLM_F_EXCL` is `tc filter replace`).
pub(crate) fn set_filters(
    sock: &mut NlSocket,
    ifindex: u32,
    prio: u16,
    filters: &[MarkFilter],
) -> Result<(), KernelError> {
    let msgs = filters
        .iter()
        .map(|f| RouteNetlinkMessage::NewTrafficFilter(filter_msg(ifindex, prio, f, true)))
        .collect();
    for r in sock.batch("adding ESP mark filters", msgs, NLM_F_CREATE, |_| {})? {
        r.map_err(|errno| KernelError::netlink("adding an ESP mark filter", errno))?;
    }
    Ok(())
}

pub(crate) fn del_filters(
    sock: &mut NlSocket,
    ifindex: u32,
    prio: u16,
    filters: &[MarkFilter],
    missing_ok: bool,
) -> Result<(), KernelError> {
    let msgs = filters
        .iter()
        .map(|f| RouteNetlinkMessage::DelTrafficFilter(filter_msg(ifindex, prio, f, false)))
        .collect();
    for r in sock.batch("deleting ESP mark filters", msgs, 0, |_| {})? {
        match r {
            Ok(()) => {}
            Err(ENOENT) if missing_ok => {}
            Err(errno) => return Err(KernelError::netlink("deleting an ESP mark filter", errno)),
        }
    }
    Ok(())
}

/// node-shim's filters on `ifindex`, by handle.
pub(crate) fn dump_filters(
    sock: &mut NlSocket,
    ifindex: u32,
    prio: u16,
) -> Result<BTreeMap<u32, MarkFilter>, KernelError> {
    let mut req = TcMessage::default();
    req.header.index = ifindex as i32;
    req.header.parent = INGRESS_PARENT;
    let replies = match sock.dump(
        "listing ESP mark filters",
        RouteNetlinkMessage::GetTrafficFilter(req),
    ) {
        Ok(r) => r,
        // No qdisc yet: no filters.
        Err(e) if matches!(e.errno(), Some(22) | Some(2)) => return Ok(BTreeMap::new()),
        Err(e) => Err(e)?,
    };
    Ok(filters_from(replies, prio))
}

/// node-shim's filters (priority `prio`) among the messages of a filter dump, by handle.
pub(crate) fn filters_from(
    replies: Vec<RouteNetlinkMessage>,
    prio: u16,
) -> BTreeMap<u32, MarkFilter> {
    let mut out = BTreeMap::new();
    for r in replies {
        if let RouteNetlinkMessage::NewTrafficFilter(m) = r
            && let Some(f) = parse_filter(&m, prio)
        {
            out.insert(f.handle, f);
        }
    }
    out
}

/// One of node-shim's filters from a dump message (`None` for anyone else's, or the chain
/// header message the kernel sends first for each priority).
fn parse_filter(m: &TcMessage, prio: u16) -> Option<MarkFilter> {
    if (m.header.info >> 16) as u16 != prio {
        return None;
    }
    let h = (u32::from(m.header.handle.major) << 16) | u32::from(m.header.handle.minor);
    if h == 0 {
        return None;
    }
    let mut src = None;
    let mut value = None;
    let mut mask = None;
    for a in &m.attributes {
        let TcAttribute::Options(opts) = a else {
            continue;
        };
        for o in opts {
            match o {
                TcOption::Flower(TcFilterFlowerOption::Ipv4Src(v4)) => src = Some(IpAddr::V4(*v4)),
                TcOption::Flower(TcFilterFlowerOption::Ipv6Src(v6)) => src = Some(IpAddr::V6(*v6)),
                TcOption::Flower(TcFilterFlowerOption::Actions(acts)) => {
                    for aa in acts.iter().flat_map(|act| act.attributes.iter()) {
                        let TcActionAttribute::Options(aopts) = aa else {
                            continue;
                        };
                        for ao in aopts {
                            if let TcActionOption::Other(nla) = ao {
                                let mut v = vec![0u8; nla.value_len()];
                                nla.emit_value(&mut v);
                                let n = v
                                    .get(..4)
                                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                                match nla.kind() {
                                    TCA_SKBEDIT_MARK => value = n,
                                    TCA_SKBEDIT_MASK => mask = n,
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Some(MarkFilter {
        handle: h,
        src: src?,
        mark: Mark {
            value: value?,
            // skbedit without a mask sets the whole mark.
            mask: mask.unwrap_or(u32::MAX),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable as _, Parseable as _};

    #[test]
    fn filter_messages_round_trip() {
        let f = MarkFilter {
            handle: 7,
            src: "192.0.2.7"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            mark: Mark {
                value: 7 << 16,
                mask: 0x3fff_0000,
            },
        };
        let m = filter_msg(3, 0x6b65, &f, true);
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        let parsed = TcMessage::parse(&buf[..]).expect("parses");
        assert_eq!(parse_filter(&parsed, 0x6b65), Some(f));
        assert_eq!(
            parse_filter(&parsed, 1),
            None,
            "another priority is not ours"
        );
        // tcm_info: priority high, ETH_P_IP in network order low.
        assert_eq!(
            parsed.header.info,
            (0x6b65 << 16) | u32::from(0x0800u16.to_be())
        );
    }
}
