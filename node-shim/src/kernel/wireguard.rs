//! The kernel's WireGuard over generic netlink: `WG_CMD_GET_DEVICE` and `WG_CMD_SET_DEVICE`.
//!
//! Keys go out in messages that are zeroed after serialization; the device dump returns the
//! private key and every preshared key, which are copied into [`Key32`] / reduced to fingerprints
//! and zeroed in the parsed messages.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use netlink_packet_core::NLM_F_ACK;
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use zeroize::Zeroize;

use crate::kernel::KernelError;
use crate::kernel::nl::NlSocket;
use crate::model::{ObservedPeer, WgDeviceConfig, WgPeerSpec};
use crate::secret::{Key32, PublicKey};

/// Peers per `SET_DEVICE` message: keeps each message near 16 KiB, as wg(8) splits its own.
const PEERS_PER_MESSAGE: usize = 96;

pub(crate) type WgMsg = GenlMessage<WireguardMessage>;

/// The generic netlink family id of `wireguard`, or `None` when the kernel has no WireGuard.
pub(crate) fn family_id(sock: &mut NlSocket) -> Result<Option<u16>, KernelError> {
    let req = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".to_owned())],
    });
    match sock.fetch("resolving the wireguard netlink family", req, NLM_F_ACK) {
        Ok(replies) => Ok(family_id_from(&replies)),
        // ENOENT: no such family (no module, or it cannot be loaded).
        Err(e) if e.errno() == Some(2) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The family id a `GetFamily` request was answered with.
pub(crate) fn family_id_from(replies: &[GenlMessage<GenlCtrl>]) -> Option<u16> {
    replies.iter().find_map(|m| {
        m.payload.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
    })
}

pub(crate) fn msg(family: u16, cmd: WireguardCmd, attributes: Vec<WireguardAttribute>) -> WgMsg {
    let mut m = GenlMessage::from_payload(WireguardMessage { cmd, attributes });
    m.set_resolved_family_id(family);
    m
}

pub(crate) fn scrub(m: &mut WgMsg) {
    for attr in &mut m.payload.attributes {
        match attr {
            WireguardAttribute::PrivateKey(k) => k.zeroize(),
            WireguardAttribute::Peers(peers) => {
                for p in peers {
                    for a in &mut p.0 {
                        if let WireguardPeerAttribute::PresharedKey(k) = a {
                            k.zeroize();
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn run(sock: &mut NlSocket, what: &'static str, msgs: Vec<WgMsg>) -> Result<(), KernelError> {
    let results = sock.batch(what, msgs, 0, scrub)?;
    for r in results {
        if let Err(errno) = r {
            return Err(KernelError::netlink(what, errno));
        }
    }
    Ok(())
}

pub(crate) fn configure(
    sock: &mut NlSocket,
    family: u16,
    device: &str,
    c: &WgDeviceConfig,
) -> Result<(), KernelError> {
    let m = msg(
        family,
        WireguardCmd::SetDevice,
        vec![
            WireguardAttribute::IfName(device.to_owned()),
            WireguardAttribute::PrivateKey(*c.private_key.expose()),
            WireguardAttribute::ListenPort(c.listen_port),
            WireguardAttribute::Fwmark(c.fwmark),
        ],
    );
    run(sock, "configuring the WireGuard device", vec![m])
}

pub(crate) fn peer_attrs(p: &WgPeerSpec) -> WireguardPeer {
    let allowed = p
        .allowed_ips
        .iter()
        .map(|net| {
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(if net.addr().is_ipv4() {
                    WireguardAddressFamily::Ipv4
                } else {
                    WireguardAddressFamily::Ipv6
                }),
                WireguardAllowedIpAttr::IpAddr(net.addr()),
                WireguardAllowedIpAttr::Cidr(net.prefix_len()),
            ])
        })
        .collect();
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(p.public_key.0),
        WireguardPeerAttribute::PresharedKey(*p.preshared_key.expose()),
        WireguardPeerAttribute::Endpoint(p.endpoint),
        WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::AllowedIps(allowed),
    ])
}

/// Adds or updates `peers`; their allowed IPs are replaced. An existing peer keeps its session:
/// a changed preshared key applies from the next handshake.
pub(crate) fn upsert_peers(
    sock: &mut NlSocket,
    family: u16,
    device: &str,
    peers: &[WgPeerSpec],
) -> Result<(), KernelError> {
    let msgs = peers
        .chunks(PEERS_PER_MESSAGE)
        .map(|chunk| {
            msg(
                family,
                WireguardCmd::SetDevice,
                vec![
                    WireguardAttribute::IfName(device.to_owned()),
                    WireguardAttribute::Peers(chunk.iter().map(peer_attrs).collect()),
                ],
            )
        })
        .collect();
    run(sock, "setting WireGuard peers", msgs)
}

pub(crate) fn remove_peers(
    sock: &mut NlSocket,
    family: u16,
    device: &str,
    keys: &[PublicKey],
) -> Result<(), KernelError> {
    let msgs = keys
        .chunks(PEERS_PER_MESSAGE * 4)
        .map(|chunk| {
            msg(
                family,
                WireguardCmd::SetDevice,
                vec![
                    WireguardAttribute::IfName(device.to_owned()),
                    WireguardAttribute::Peers(
                        chunk
                            .iter()
                            .map(|k| {
                                WireguardPeer(vec![
                                    WireguardPeerAttribute::PublicKey(k.0),
                                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                                ])
                            })
                            .collect(),
                    ),
                ],
            )
        })
        .collect();
    run(sock, "removing WireGuard peers", msgs)
}

/// The device as the kernel holds it.
pub(crate) struct DeviceDump {
    pub private_key: Option<Key32>,
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<PublicKey, ObservedPeer>,
}

pub(crate) fn get_device(
    sock: &mut NlSocket,
    family: u16,
    device: &str,
) -> Result<DeviceDump, KernelError> {
    let req = msg(
        family,
        WireguardCmd::GetDevice,
        vec![WireguardAttribute::IfName(device.to_owned())],
    );
    let replies = sock.dump("reading the WireGuard device", req)?;
    Ok(device_from(replies))
}

/// The device as the messages of a `GetDevice` dump describe it; their keys are zeroed once
/// read.
pub(crate) fn device_from(mut replies: Vec<WgMsg>) -> DeviceDump {
    let mut out = DeviceDump {
        private_key: None,
        public_key: None,
        listen_port: 0,
        fwmark: 0,
        peers: BTreeMap::new(),
    };
    for m in &mut replies {
        for attr in &m.payload.attributes {
            match attr {
                WireguardAttribute::PrivateKey(k) if k.iter().any(|b| *b != 0) => {
                    out.private_key = Some(Key32::from_bytes(*k));
                }
                WireguardAttribute::PublicKey(k) if k.iter().any(|b| *b != 0) => {
                    out.public_key = Some(PublicKey(*k));
                }
                WireguardAttribute::ListenPort(p) => out.listen_port = *p,
                WireguardAttribute::Fwmark(f) => out.fwmark = *f,
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        merge_peer(&mut out.peers, p);
                    }
                }
                _ => {}
            }
        }
        scrub(m);
    }
    for p in out.peers.values_mut() {
        p.allowed_ips.sort();
        p.allowed_ips.dedup();
    }
    out
}

/// A peer may span several dump messages (its allowed IPs continue in the next one).
fn merge_peer(peers: &mut BTreeMap<PublicKey, ObservedPeer>, p: &WireguardPeer) {
    let Some(key) = p.0.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(PublicKey(*k)),
        _ => None,
    }) else {
        return;
    };
    let entry = peers.entry(key).or_insert_with(|| ObservedPeer {
        public_key: key,
        preshared_key: None,
        endpoint: None,
        allowed_ips: Vec::new(),
        keepalive: 0,
        last_handshake: None,
    });
    for a in &p.0 {
        match a {
            WireguardPeerAttribute::PresharedKey(k) if k.iter().any(|b| *b != 0) => {
                entry.preshared_key = Some(Key32::from_bytes(*k).fingerprint());
            }
            WireguardPeerAttribute::Endpoint(e) => entry.endpoint = Some(normalize(*e)),
            WireguardPeerAttribute::PersistentKeepalive(k) => entry.keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                entry.last_handshake = u64::try_from(t.seconds).ok();
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for x in &ip.0 {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(*a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                            _ => {}
                        }
                    }
                    if let (Some(a), Some(c)) = (addr, cidr)
                        && let Ok(net) = IpNet::new(a, c)
                    {
                        entry.allowed_ips.push(net);
                    }
                }
            }
            _ => {}
        }
    }
}

/// IPv4 endpoints come back as IPv4 (not v4-mapped) so they compare equal to what was set.
fn normalize(e: SocketAddr) -> SocketAddr {
    match e {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => e,
        },
        v4 => v4,
    }
}
