//! XFRM states and policies over `NETLINK_XFRM`.
//!
//! States are ESP in tunnel mode with ESN and a replay window (Cilium's settings). What node-shim
//! owns is recognised by its reqid: states with it, and policies whose template carries it.
//! Dumps return every state's keys (that is the kernel's interface); they are reduced to
//! fingerprints and the copies in the parsed messages zeroed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::NLM_F_CREATE;
use netlink_packet_xfrm::{
    Address, Alg, AlgAead, AlgAuth, Id, Mark as XMark, ReplayEsn, Selector, UserPolicyId,
    UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate, XFRM_MODE_TUNNEL, XFRM_POLICY_ALLOW,
    XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_STATE_ESN, XfrmAttrs, XfrmMessage,
    policy, state,
};
use zeroize::Zeroize;

use crate::kernel::KernelError;
use crate::kernel::nl::NlSocket;
use crate::model::{
    Mark, ObservedState, PolicyDir, PolicyId, PolicySpec, StateId, StateShape, Template, XfrmAlgo,
    XfrmStateSpec,
};
use crate::secret::Fingerprint;

const IPPROTO_ESP: u8 = 50;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

fn family(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

fn to_ip(addr: &Address, family: u16) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(addr.to_ipv6())
    } else {
        IpAddr::V4(addr.to_ipv4())
    }
}

fn name_bytes<const N: usize>(name: &str) -> Result<[u8; N], KernelError> {
    let mut out = [0u8; N];
    if name.len() >= N || name.as_bytes().contains(&0) {
        return Err(KernelError::Unsupported(format!(
            "algorithm name {name:?} is too long for XFRM"
        )));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

fn name_str(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn bits(len: usize) -> u32 {
    u32::try_from(len * 8).unwrap_or(u32::MAX)
}

/// `XFRM_MSG_NEWSA` for `spec`.
pub(crate) fn state_add_msg(spec: &XfrmStateSpec) -> Result<XfrmMessage, KernelError> {
    let id = &spec.id;
    let mut info = UserSaInfo {
        id: Id {
            daddr: Address::from_ip(&id.dst),
            spi: id.spi,
            proto: IPPROTO_ESP,
        },
        saddr: Address::from_ip(&id.src),
        family: family(&id.dst),
        mode: XFRM_MODE_TUNNEL,
        reqid: spec.shape.reqid,
        ..Default::default()
    };
    // The selector stays empty (family only): the policies decide what the state carries.
    info.selector.family = family(&id.dst);
    let mut nlas = Vec::new();
    match &spec.algo {
        XfrmAlgo::Aead {
            name,
            key,
            icv_bits,
        } => nlas.push(XfrmAttrs::EncryptionAlgAead(AlgAead {
            alg_name: name_bytes(name)?,
            alg_key_len: bits(key.len()),
            alg_icv_len: *icv_bits,
            alg_key: key.expose().to_vec(),
        })),
        XfrmAlgo::AuthEnc {
            auth_name,
            auth_key,
            trunc_bits,
            enc_name,
            enc_key,
        } => {
            nlas.push(XfrmAttrs::AuthenticationAlgTrunc(AlgAuth {
                alg_name: name_bytes(auth_name)?,
                alg_key_len: bits(auth_key.len()),
                alg_trunc_len: *trunc_bits,
                alg_key: auth_key.expose().to_vec(),
            }));
            nlas.push(XfrmAttrs::EncryptionAlg(Alg {
                alg_name: name_bytes(enc_name)?,
                alg_key_len: bits(enc_key.len()),
                alg_key: enc_key.expose().to_vec(),
            }));
        }
    }
    if spec.shape.esn {
        info.flags |= XFRM_STATE_ESN;
    }
    if spec.shape.esn || spec.shape.replay_window > 32 {
        nlas.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len: spec.shape.replay_window.div_ceil(32),
            oseq: 0,
            seq: 0,
            oseq_hi: 0,
            seq_hi: 0,
            replay_window: spec.shape.replay_window,
            bmp: Vec::new(),
        }));
    } else {
        info.replay_window = u8::try_from(spec.shape.replay_window).unwrap_or(32);
    }
    if let Some(m) = id.mark {
        nlas.push(XfrmAttrs::Mark(XMark {
            value: m.value,
            mask: m.mask,
        }));
    }
    if let Some(m) = spec.shape.output_mark {
        nlas.push(XfrmAttrs::MarkVal(m.value));
        nlas.push(XfrmAttrs::MarkMask(m.mask));
    }
    Ok(XfrmMessage::AddSa(state::ModifyMessage {
        user_sa_info: info,
        nlas,
    }))
}

/// Zeroes the key copies a state message holds.
pub(crate) fn scrub(msg: &mut XfrmMessage) {
    let nlas = match msg {
        XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) => &mut m.nlas,
        _ => return,
    };
    for nla in nlas {
        match nla {
            XfrmAttrs::EncryptionAlgAead(a) => a.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlgTrunc(a) => a.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlg(a) | XfrmAttrs::EncryptionAlg(a) => a.alg_key.zeroize(),
            _ => {}
        }
    }
}

pub(crate) fn state_del_msg(id: &StateId) -> XfrmMessage {
    let mut sa_id = UserSaId {
        spi: id.spi,
        proto: IPPROTO_ESP,
        ..Default::default()
    };
    sa_id.destination(&id.dst);
    let mut nlas = vec![XfrmAttrs::SrcAddr(Address::from_ip(&id.src))];
    if let Some(m) = id.mark {
        nlas.push(XfrmAttrs::Mark(XMark {
            value: m.value,
            mask: m.mask,
        }));
    }
    XfrmMessage::DeleteSa(state::DelGetMessage {
        user_sa_id: sa_id,
        nlas,
    })
}

fn dir_code(dir: PolicyDir) -> u8 {
    match dir {
        PolicyDir::In => XFRM_POLICY_IN,
        PolicyDir::Out => XFRM_POLICY_OUT,
        PolicyDir::Fwd => XFRM_POLICY_FWD,
    }
}

fn selector(id: &PolicyId) -> Selector {
    let mut sel = Selector::default();
    sel.source_prefix(&id.src.addr(), id.src.prefix_len());
    sel.destination_prefix(&id.dst.addr(), id.dst.prefix_len());
    sel
}

/// `XFRM_MSG_UPDPOLICY` (add or replace) for `spec`.
pub(crate) fn policy_set_msg(spec: &PolicySpec) -> XfrmMessage {
    let info = UserPolicyInfo {
        selector: selector(&spec.id),
        priority: spec.priority,
        direction: dir_code(spec.id.dir),
        action: XFRM_POLICY_ALLOW,
        ..Default::default()
    };
    let t = &spec.tmpl;
    let tmpl = UserTemplate {
        id: Id {
            daddr: Address::from_ip(&t.dst),
            spi: t.spi,
            proto: IPPROTO_ESP,
        },
        family: family(&t.dst),
        saddr: Address::from_ip(&t.src),
        reqid: t.reqid,
        mode: XFRM_MODE_TUNNEL,
        optional: u8::from(t.optional),
        ..Default::default()
    };
    let mut nlas = vec![XfrmAttrs::Template(vec![tmpl])];
    nlas.extend(policy_mark(&spec.id));
    XfrmMessage::UpdatePolicy(policy::ModifyMessage {
        user_policy_info: info,
        nlas,
    })
}

fn policy_mark(id: &PolicyId) -> Option<XfrmAttrs> {
    id.mark.map(|m| {
        XfrmAttrs::Mark(XMark {
            value: m.value,
            mask: m.mask,
        })
    })
}

pub(crate) fn policy_del_msg(id: &PolicyId) -> XfrmMessage {
    XfrmMessage::DeletePolicy(policy::DelGetMessage {
        user_policy_id: UserPolicyId {
            selector: selector(id),
            index: 0,
            direction: dir_code(id.dir),
        },
        nlas: policy_mark(id).into_iter().collect(),
    })
}

/// Flags for the requests above: states are created (never replaced in place: a changed state is
/// deleted and added), policies are upserted.
pub(crate) const STATE_ADD_FLAGS: u16 = NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL;
pub(crate) const POLICY_SET_FLAGS: u16 = NLM_F_CREATE;

/// The ESP states carrying `reqid`.
pub(crate) fn dump_states(
    sock: &mut NlSocket,
    reqid: u32,
) -> Result<BTreeMap<StateId, ObservedState>, KernelError> {
    let replies = sock.dump(
        "dumping XFRM states",
        XfrmMessage::GetDumpSa(state::GetDumpMessage::default()),
    )?;
    Ok(states_from(replies, reqid))
}

/// The ESP states carrying `reqid` among the messages of a state dump, whose keys are zeroed
/// once read.
pub(crate) fn states_from(
    mut replies: Vec<XfrmMessage>,
    reqid: u32,
) -> BTreeMap<StateId, ObservedState> {
    let mut out = BTreeMap::new();
    for msg in &mut replies {
        if let XfrmMessage::AddSa(m) = msg {
            let info = &m.user_sa_info;
            if info.reqid == reqid && info.id.proto == IPPROTO_ESP {
                let s = observe_state(m);
                out.insert(s.id, s);
            }
        }
        scrub(msg);
    }
    out
}

fn observe_state(m: &state::ModifyMessage) -> ObservedState {
    let info = &m.user_sa_info;
    let mut mark = None;
    let (mut set_val, mut set_mask) = (None, None);
    let mut replay_window = u32::from(info.replay_window);
    let mut aead = None;
    let mut auth = None;
    let mut enc = None;
    for nla in &m.nlas {
        match nla {
            XfrmAttrs::Mark(x) if x.mask != 0 || x.value != 0 => {
                mark = Some(Mark {
                    value: x.value,
                    mask: x.mask,
                })
            }
            XfrmAttrs::MarkVal(v) => set_val = Some(*v),
            XfrmAttrs::MarkMask(v) => set_mask = Some(*v),
            XfrmAttrs::ReplayStateEsn(r) => replay_window = r.replay_window,
            XfrmAttrs::EncryptionAlgAead(a) => aead = Some(a),
            XfrmAttrs::AuthenticationAlgTrunc(a) => auth = Some(a),
            XfrmAttrs::EncryptionAlg(a) => enc = Some(a),
            _ => {}
        }
    }
    let output_mark = match (set_val, set_mask) {
        (None, None) => None,
        (v, m) => Some(Mark {
            value: v.unwrap_or(0),
            mask: m.unwrap_or(u32::MAX),
        }),
    };
    let fingerprint = match (aead, auth, enc) {
        (Some(a), _, _) => Fingerprint::of(&[
            b"aead",
            name_str(&a.alg_name).as_bytes(),
            &a.alg_key,
            &a.alg_icv_len.to_be_bytes(),
        ]),
        (None, Some(au), Some(en)) => Fingerprint::of(&[
            b"authenc",
            name_str(&au.alg_name).as_bytes(),
            &au.alg_key,
            &au.alg_trunc_len.to_be_bytes(),
            name_str(&en.alg_name).as_bytes(),
            &en.alg_key,
        ]),
        // Not a transform node-shim installs: it matches no desired state and gets replaced.
        _ => Fingerprint::of(&[b"unknown"]),
    };
    ObservedState {
        id: StateId {
            src: to_ip(&info.saddr, info.family),
            dst: to_ip(&info.id.daddr, info.family),
            spi: info.id.spi,
            mark,
        },
        shape: StateShape {
            reqid: info.reqid,
            replay_window,
            esn: info.flags & XFRM_STATE_ESN != 0,
            output_mark,
        },
        fingerprint,
    }
}

/// The policies whose (first) template carries `reqid`.
pub(crate) fn dump_policies(
    sock: &mut NlSocket,
    reqid: u32,
) -> Result<BTreeMap<PolicyId, PolicySpec>, KernelError> {
    let replies = sock.dump(
        "dumping XFRM policies",
        XfrmMessage::GetPolicy(policy::DelGetMessage::default()),
    )?;
    Ok(policies_from(replies, reqid))
}

/// The policies whose (first) template carries `reqid` among the messages of a policy dump.
pub(crate) fn policies_from(
    replies: Vec<XfrmMessage>,
    reqid: u32,
) -> BTreeMap<PolicyId, PolicySpec> {
    let mut out = BTreeMap::new();
    for msg in replies {
        let XfrmMessage::AddPolicy(m) = msg else {
            continue;
        };
        let Some(tmpl) = m.nlas.iter().find_map(|n| match n {
            XfrmAttrs::Template(t) => t.first().copied(),
            _ => None,
        }) else {
            continue;
        };
        if tmpl.reqid != reqid {
            continue;
        }
        let info = &m.user_policy_info;
        let sel = &info.selector;
        let dir = match info.direction {
            XFRM_POLICY_IN => PolicyDir::In,
            XFRM_POLICY_OUT => PolicyDir::Out,
            XFRM_POLICY_FWD => PolicyDir::Fwd,
            _ => continue,
        };
        let (Ok(src), Ok(dst)) = (
            IpNet::new(to_ip(&sel.saddr, sel.family), sel.prefixlen_s),
            IpNet::new(to_ip(&sel.daddr, sel.family), sel.prefixlen_d),
        ) else {
            continue;
        };
        let mark = m.nlas.iter().find_map(|n| match n {
            XfrmAttrs::Mark(x) if x.mask != 0 || x.value != 0 => Some(Mark {
                value: x.value,
                mask: x.mask,
            }),
            _ => None,
        });
        let id = PolicyId {
            src,
            dst,
            dir,
            mark,
        };
        out.insert(
            id,
            PolicySpec {
                id,
                priority: info.priority,
                tmpl: Template {
                    src: to_ip(&tmpl.saddr, tmpl.family),
                    dst: to_ip(&tmpl.id.daddr, tmpl.family),
                    spi: tmpl.id.spi,
                    reqid: tmpl.reqid,
                    optional: tmpl.optional != 0,
                },
            },
        );
    }
    out
}
