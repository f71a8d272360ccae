//! Entry points over raw reply bytes for the fuzz targets (fuzz/): what the kernel or boringtun
//! sends back is input node-shim does not control, and none of it may panic. Each function
//! decodes one datagram as `NlSocket` does on receipt and then runs every parser
//! `NetlinkKernel` runs on that kind of reply. The results are dropped: only the decoding is
//! exercised.

use std::hint::black_box;
use std::net::IpAddr;

use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::GenlCtrl;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_packet_xfrm::XfrmMessage;

use super::{KernelError, nl, route, tc, userspace, wireguard};

const WHAT: &str = "a fuzzed reply";

/// Decodes `datagram` as acknowledgements (how batches are answered) and as replies of type `T`
/// to request `seq`.
fn decode<T: netlink_packet_core::NetlinkDeserializable>(
    datagram: &[u8],
    seq: u32,
) -> Result<Vec<T>, KernelError> {
    nl::for_each_message(datagram, WHAT, |header, code| {
        black_box((header, code));
    })?;
    let mut out = Vec::new();
    nl::decode_replies(datagram, seq, WHAT, &mut out)?;
    Ok(out)
}

/// An rtnetlink reply: tc filter dumps (priority `prio`), link lookups (and the alias carrying
/// the WireGuard key epoch), link, address (`addr`) and route (`oif`) dumps.
pub fn rtnetlink(
    datagram: &[u8],
    seq: u32,
    prio: u16,
    oif: u32,
    addr: IpAddr,
) -> Result<(), KernelError> {
    let msgs: Vec<RouteNetlinkMessage> = decode(datagram, seq)?;
    black_box(tc::filters_from(msgs.clone(), prio));
    if let Some(link) = route::link_details_from(msgs.clone()) {
        black_box((link.index, link.up));
        black_box(link.alias.as_deref().and_then(route::parse_epoch_alias));
    }
    black_box(route::links_from(msgs.clone()));
    black_box(route::link_with_address_from(msgs.clone(), addr));
    let mut routes = std::collections::BTreeSet::new();
    route::routes_from(msgs.clone(), AddressFamily::Inet, oif, &mut routes);
    route::routes_from(msgs, AddressFamily::Inet6, oif, &mut routes);
    black_box(routes);
    Ok(())
}

/// An XFRM reply: state and policy dumps (`reqid`).
pub fn xfrm(datagram: &[u8], seq: u32, reqid: u32) -> Result<(), KernelError> {
    let msgs: Vec<XfrmMessage> = decode(datagram, seq)?;
    black_box(super::xfrm::states_from(msgs.clone(), reqid));
    black_box(super::xfrm::policies_from(msgs, reqid));
    Ok(())
}

/// A generic netlink reply: the WireGuard family lookup and the WireGuard device dump. `Ok`
/// when it decodes as either.
pub fn wireguard(datagram: &[u8], seq: u32) -> Result<(), KernelError> {
    let family = decode::<GenlMessage<GenlCtrl>>(datagram, seq).map(|ctrl| {
        black_box(wireguard::family_id_from(&ctrl));
    });
    let device = decode::<wireguard::WgMsg>(datagram, seq).map(|msgs| {
        let d = wireguard::device_from(msgs);
        black_box((d.listen_port, d.fwmark, d.peers.len(), d.public_key));
    });
    family.or(device)
}

/// What boringtun's UAPI socket answers a `get=1` with, as read from the socket.
pub fn uapi(reply: &[u8]) -> Result<(), KernelError> {
    let end = userspace::find_errno_end(reply).unwrap_or(reply.len());
    let text = userspace::decode_reply(reply[..end].to_vec())?;
    let d = userspace::parse_get(&text);
    black_box((d.public_key, d.listen_port, d.fwmark, d.peers.len()));
    Ok(())
}

/// The seed corpus of the netlink and UAPI fuzz targets (fuzz/corpus/): replies as the kernel
/// and boringtun send them, built with the same message types node-shim sends (dummy keys).
/// `seeds_parse` keeps them meaningful; `write_fuzz_corpus` rewrites the committed files:
/// `cargo test -p keyd-node-shim --lib write_fuzz_corpus -- --ignored`.
#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use ipnet::IpNet;
    use keyd_proto::SecretBytes;
    use netlink_packet_core::{
        DoneMessage, ErrorMessage, NLM_F_MULTIPART, NetlinkHeader, NetlinkMessage, NetlinkPayload,
        NetlinkSerializable,
    };
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
    use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd};
    use netlink_packet_xfrm::XfrmMessage;

    use super::*;
    use crate::kernel::{route, tc, wireguard, xfrm as kxfrm};
    use crate::model::{
        Mark, MarkFilter, PolicyDir, PolicyId, PolicySpec, RouteSpec, StateId, StateShape,
        Template, WgPeerSpec, XfrmAlgo, XfrmStateSpec,
    };
    use crate::secret::{Key32, PublicKey};

    const SEQ: u32 = 7;
    const PRIO: u16 = 0x6b65;
    const REQID: u32 = 0x6b65;
    const OIF: u32 = 4;

    enum End {
        Done,
        Ack,
    }

    /// `msgs` as one reply datagram to request `SEQ`, ended as a dump (`NLMSG_DONE`) or a
    /// single answer (an acknowledgement) ends.
    fn datagram<T: NetlinkSerializable + Clone + std::fmt::Debug>(
        msgs: Vec<T>,
        end: End,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |payload: NetlinkPayload<T>| {
            let mut header = NetlinkHeader::default();
            header.sequence_number = SEQ;
            header.flags = NLM_F_MULTIPART;
            let mut m = NetlinkMessage::new(header, payload);
            m.finalize();
            let start = out.len();
            out.resize(start + m.buffer_len().div_ceil(4) * 4, 0);
            m.serialize(&mut out[start..]);
        };
        for m in msgs {
            push(NetlinkPayload::InnerMessage(m));
        }
        match end {
            End::Done => push(NetlinkPayload::Done(DoneMessage::default())),
            End::Ack => push(NetlinkPayload::Error(ErrorMessage::default())),
        }
        out
    }

    fn head(a: u32, b: u32) -> Vec<u8> {
        [a.to_le_bytes(), b.to_le_bytes()].concat()
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("a test CIDR")
    }

    fn link() -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = OIF;
        l.header.flags = LinkFlags::Up;
        l.attributes.push(LinkAttribute::IfName("keyd-wg".into()));
        l.attributes
            .push(LinkAttribute::IfAlias(route::epoch_alias(3)));
        l
    }

    fn state(spi: u32, algo: XfrmAlgo) -> XfrmMessage {
        let spec = XfrmStateSpec {
            id: StateId {
                src: v4(192, 0, 2, 1),
                dst: v4(192, 0, 2, 2),
                spi,
                mark: Some(Mark {
                    value: 0x0d00,
                    mask: 0xff00,
                }),
            },
            shape: StateShape {
                reqid: REQID,
                replay_window: 1024,
                esn: true,
                output_mark: Some(Mark {
                    value: 0x0e00,
                    mask: 0xff00,
                }),
            },
            algo,
        };
        kxfrm::state_add_msg(&spec).expect("a state message")
    }

    fn policy(dir: PolicyDir) -> XfrmMessage {
        let spec = PolicySpec {
            id: PolicyId {
                src: net("10.1.0.0/16"),
                dst: net("10.2.0.0/24"),
                dir,
                mark: Some(Mark {
                    value: 0x0d00,
                    mask: 0xff00,
                }),
            },
            priority: 1000,
            tmpl: Template {
                src: v4(192, 0, 2, 1),
                dst: v4(192, 0, 2, 2),
                spi: 3,
                reqid: REQID,
                optional: dir != PolicyDir::Out,
            },
        };
        // The kernel answers a policy dump with XFRM_MSG_NEWPOLICY.
        match kxfrm::policy_set_msg(&spec) {
            XfrmMessage::UpdatePolicy(m) => XfrmMessage::AddPolicy(m),
            other => other,
        }
    }

    /// (target, file name, input).
    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let filter = |handle, src, value| MarkFilter {
            handle,
            src,
            mark: Mark {
                value,
                mask: 0x3fff_0000,
            },
        };
        let filters = datagram(
            vec![
                RouteNetlinkMessage::NewTrafficFilter(tc::filter_msg(
                    2,
                    PRIO,
                    &filter(1, v4(192, 0, 2, 2), 1 << 16),
                    false,
                )),
                RouteNetlinkMessage::NewTrafficFilter(tc::filter_msg(
                    2,
                    PRIO,
                    &filter(1, v4(192, 0, 2, 2), 1 << 16),
                    true,
                )),
                RouteNetlinkMessage::NewTrafficFilter(tc::filter_msg(
                    2,
                    PRIO,
                    &filter(2, "2001:db8::2".parse().expect("v6"), 2 << 16),
                    true,
                )),
            ],
            End::Done,
        );
        let mut address = AddressMessage::default();
        address.header.index = 2;
        address
            .attributes
            .push(AddressAttribute::Address(v4(192, 0, 2, 1)));
        let links = datagram(
            vec![
                RouteNetlinkMessage::NewLink(link()),
                RouteNetlinkMessage::NewAddress(address),
            ],
            End::Done,
        );
        let link_lookup = datagram(vec![RouteNetlinkMessage::NewLink(link())], End::Ack);
        let routes = datagram(
            vec![
                RouteNetlinkMessage::NewRoute(route::route_msg(
                    &RouteSpec::new(net("10.2.0.0/24"), 0x6b65, 0),
                    OIF,
                )),
                RouteNetlinkMessage::NewRoute(route::route_msg(
                    &RouteSpec::new(net("fd00:2::/64"), 0x6b65, 0),
                    OIF,
                )),
            ],
            End::Done,
        );
        let gcm = XfrmAlgo::Aead {
            name: "rfc4106(gcm(aes))".into(),
            key: SecretBytes::new(vec![7; 20]),
            icv_bits: 128,
        };
        let cbc = XfrmAlgo::AuthEnc {
            auth_name: "hmac(sha256)".into(),
            auth_key: SecretBytes::new(vec![7; 32]),
            trunc_bits: 128,
            enc_name: "cbc(aes)".into(),
            enc_key: SecretBytes::new(vec![8; 32]),
        };
        let states = datagram(vec![state(3, gcm), state(4, cbc)], End::Done);
        let policies = datagram(
            vec![
                policy(PolicyDir::Out),
                policy(PolicyDir::In),
                policy(PolicyDir::Fwd),
            ],
            End::Done,
        );
        let peer = WgPeerSpec {
            public_key: PublicKey([9; 32]),
            preshared_key: Key32::from_bytes([7; 32]),
            endpoint: SocketAddr::new(v4(192, 0, 2, 2), 51871),
            allowed_ips: vec![net("10.2.0.0/24"), net("fd00:2::/64")],
            keepalive: 25,
        };
        let device = datagram(
            vec![wireguard::msg(
                0x15,
                WireguardCmd::GetDevice,
                vec![
                    WireguardAttribute::IfName("keyd-wg".into()),
                    WireguardAttribute::PrivateKey([1; 32]),
                    WireguardAttribute::PublicKey([2; 32]),
                    WireguardAttribute::ListenPort(51871),
                    WireguardAttribute::Fwmark(0x0e00),
                    WireguardAttribute::Peers(vec![wireguard::peer_attrs(&peer)]),
                ],
            )],
            End::Done,
        );
        let family = datagram(
            vec![GenlMessage::from_payload(GenlCtrl {
                cmd: GenlCtrlCmd::NewFamily,
                nlas: vec![
                    GenlCtrlAttrs::FamilyName("wireguard".into()),
                    GenlCtrlAttrs::FamilyId(0x15),
                ],
            })],
            End::Ack,
        );
        let uapi = format!(
            "own_public_key={}\nlisten_port=51871\nfwmark=3584\npublic_key={}\npreshared_key={}\n\
             endpoint=192.0.2.2:51871\nallowed_ip=10.2.0.0/24\nallowed_ip=fd00:2::/64\n\
             persistent_keepalive_interval=25\nlast_handshake_time_sec=3\n\
             last_handshake_time_nsec=0\nrx_bytes=0\ntx_bytes=0\nerrno=0\n\n",
            hex::encode([2u8; 32]),
            hex::encode([9u8; 32]),
            hex::encode([7u8; 32]),
        );
        let seq = SEQ.to_le_bytes().to_vec();
        vec![
            (
                "netlink_route",
                "tc-filters",
                [head(SEQ, 2), filters].concat(),
            ),
            ("netlink_route", "links", [head(SEQ, OIF), links].concat()),
            (
                "netlink_route",
                "link-lookup",
                [head(SEQ, OIF), link_lookup].concat(),
            ),
            ("netlink_route", "routes", [head(SEQ, OIF), routes].concat()),
            (
                "netlink_xfrm",
                "states",
                [head(SEQ, REQID), states].concat(),
            ),
            (
                "netlink_xfrm",
                "policies",
                [head(SEQ, REQID), policies].concat(),
            ),
            (
                "netlink_wireguard",
                "device",
                [seq.clone(), device].concat(),
            ),
            ("netlink_wireguard", "family", [seq, family].concat()),
            ("wireguard_uapi", "get", uapi.into_bytes()),
            ("wireguard_uapi", "error", b"errno=19\n\n".to_vec()),
        ]
    }

    /// Runs a seed through its entry point as the fuzz target does (same layout).
    fn run(target: &str, input: &[u8]) -> Result<(), KernelError> {
        let word =
            |i: usize| u32::from_le_bytes([input[i], input[i + 1], input[i + 2], input[i + 3]]);
        match target {
            "netlink_route" => rtnetlink(&input[8..], word(0), PRIO, word(4), v4(192, 0, 2, 1)),
            "netlink_xfrm" => xfrm(&input[8..], word(0), word(4)),
            "netlink_wireguard" => wireguard(&input[4..], word(0)),
            _ => uapi(input),
        }
    }

    #[test]
    fn seeds_parse() {
        for (target, name, input) in seeds() {
            let r = run(target, &input);
            if name == "error" {
                assert!(r.is_err(), "{target}/{name}: an errno reply is an error");
            } else {
                assert!(r.is_ok(), "{target}/{name}: {r:?}");
            }
        }
        // What the seeds carry comes out of the parsers, so they reach the interesting code.
        let msgs: Vec<RouteNetlinkMessage> =
            decode(&seeds()[0].2[8..], SEQ).expect("the filter seed decodes");
        assert_eq!(tc::filters_from(msgs, PRIO).len(), 2);
        let msgs: Vec<XfrmMessage> = decode(&seeds()[4].2[8..], SEQ).expect("the state seed");
        assert_eq!(kxfrm::states_from(msgs, REQID).len(), 2);
        let msgs: Vec<XfrmMessage> = decode(&seeds()[5].2[8..], SEQ).expect("the policy seed");
        assert_eq!(kxfrm::policies_from(msgs, REQID).len(), 3);
        let msgs: Vec<wireguard::WgMsg> = decode(&seeds()[6].2[4..], SEQ).expect("the device");
        let d = wireguard::device_from(msgs);
        assert_eq!(d.peers[&PublicKey([9; 32])].allowed_ips.len(), 2);
        let msgs: Vec<RouteNetlinkMessage> = decode(&seeds()[3].2[8..], SEQ).expect("routes");
        let mut routes = std::collections::BTreeSet::new();
        route::routes_from(msgs, AddressFamily::Inet6, OIF, &mut routes);
        assert_eq!(routes.len(), 2);
    }

    #[test]
    #[ignore = "rewrites fuzz/corpus: run by hand after changing the seeds"]
    fn write_fuzz_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, name, input) in seeds() {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).expect("creating the corpus directory");
            std::fs::write(dir.join(name), input).expect("writing a seed");
        }
    }
}
