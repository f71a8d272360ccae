//! A stateful fake kernel: keeps what was applied, answers `observe` from it, and refuses what the
//! real kernel refuses (a second state with the same destination, SPI and mark; deleting what is
//! not there; peers on a device that does not exist). Tests share its state through
//! [`FakeKernel::state`] while the agent owns the kernel, and can make the next ops fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kernel::{ApplyError, Kernel, KernelError};
use crate::model::{
    MarkFilter, Observed, ObservedPeer, ObservedState, ObservedWg, Op, PolicyId, PolicySpec,
    RouteSpec, StateId, WgDeviceConfig, WgPeerSpec, XfrmStateSpec,
};
use crate::secret::PublicKey;

const EEXIST: i32 = 17;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;

#[derive(Debug, Default)]
pub struct FakeWg {
    pub up: bool,
    pub config: Option<WgDeviceConfig>,
    pub peers: BTreeMap<PublicKey, WgPeerSpec>,
    pub routes: BTreeSet<RouteSpec>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub states: BTreeMap<StateId, XfrmStateSpec>,
    pub policies: BTreeMap<PolicyId, PolicySpec>,
    pub filters: BTreeMap<u32, MarkFilter>,
    pub wg: Option<FakeWg>,
    /// Every op kind applied, in order.
    pub log: Vec<&'static str>,
    /// Ops of this kind fail with this errno (until cleared).
    pub fail_kind: Option<(&'static str, i32)>,
    /// `observe` fails with this errno (until cleared).
    pub fail_observe: Option<i32>,
    /// Whether the private key is reported back (the kernel does, boringtun does not).
    pub hide_private_key: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    state: Arc<Mutex<FakeState>>,
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock already failed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_one(s: &mut FakeState, op: &Op) -> Result<(), KernelError> {
        if let Some((kind, errno)) = s.fail_kind
            && kind == op.kind()
        {
            return Err(KernelError::netlink(op.to_string(), errno));
        }
        match op {
            Op::WgEnsureDevice => {
                s.wg.get_or_insert_with(FakeWg::default).up = true;
            }
            Op::WgConfigure(c) => {
                let wg =
                    s.wg.as_mut()
                        .ok_or(KernelError::netlink("configure", ENODEV))?;
                wg.config = Some(c.clone());
            }
            Op::WgUpsertPeers(peers) => {
                let wg = s.wg.as_mut().ok_or(KernelError::netlink("peers", ENODEV))?;
                if wg.config.is_none() {
                    return Err(KernelError::netlink("peers before a private key", EINVAL));
                }
                for p in peers {
                    // Allowed IPs belong to one peer: giving them to another takes them away.
                    for other in wg.peers.values_mut() {
                        if other.public_key != p.public_key {
                            other.allowed_ips.retain(|ip| !p.allowed_ips.contains(ip));
                        }
                    }
                    wg.peers.insert(p.public_key, p.clone());
                }
            }
            Op::WgRemovePeers(keys) => {
                let wg = s.wg.as_mut().ok_or(KernelError::netlink("peers", ENODEV))?;
                for k in keys {
                    wg.peers.remove(k);
                }
            }
            Op::RouteAdd(r) => {
                let wg = s.wg.as_mut().ok_or(KernelError::netlink("route", ENODEV))?;
                if !wg.routes.insert(*r) {
                    return Err(KernelError::netlink(op.to_string(), EEXIST));
                }
            }
            Op::RouteDel(r) => {
                let wg = s.wg.as_mut().ok_or(KernelError::netlink("route", ENODEV))?;
                if !wg.routes.remove(r) {
                    return Err(KernelError::netlink(op.to_string(), ESRCH));
                }
            }
            Op::FilterSet(f) => {
                s.filters.insert(f.handle, *f);
            }
            Op::FilterDel(f) => {
                if s.filters.remove(&f.handle).is_none() {
                    return Err(KernelError::netlink(op.to_string(), ESRCH));
                }
            }
            Op::XfrmStateAdd(spec) => {
                let clash = s.states.keys().any(|id| {
                    (id.dst, id.spi, id.mark) == (spec.id.dst, spec.id.spi, spec.id.mark)
                });
                if clash {
                    return Err(KernelError::netlink(op.to_string(), EEXIST));
                }
                s.states.insert(spec.id, spec.clone());
            }
            Op::XfrmStateDel(id) => {
                if s.states.remove(id).is_none() {
                    return Err(KernelError::netlink(op.to_string(), ESRCH));
                }
            }
            Op::XfrmPolicySet(p) => {
                s.policies.insert(p.id, *p);
            }
            Op::XfrmPolicyDel(id) => {
                if s.policies.remove(id).is_none() {
                    return Err(KernelError::netlink(op.to_string(), ESRCH));
                }
            }
        }
        s.log.push(op.kind());
        Ok(())
    }
}

impl Kernel for FakeKernel {
    fn observe(&mut self) -> Result<Observed, KernelError> {
        let s = self.state();
        if let Some(errno) = s.fail_observe {
            return Err(KernelError::netlink("dump", errno));
        }
        let states = s
            .states
            .values()
            .map(|st| {
                (
                    st.id,
                    ObservedState {
                        id: st.id,
                        shape: st.shape,
                        fingerprint: st.algo.fingerprint(),
                    },
                )
            })
            .collect();
        let wg = s.wg.as_ref().map(|w| ObservedWg {
            up: w.up,
            private_key: if s.hide_private_key {
                None
            } else {
                w.config.as_ref().map(|c| c.private_key.clone())
            },
            public_key: w.config.as_ref().map(|c| c.private_key.public_key()),
            listen_port: w.config.as_ref().map_or(0, |c| c.listen_port),
            fwmark: w.config.as_ref().map_or(0, |c| c.fwmark),
            key_epoch: w.config.as_ref().map(|c| c.key_epoch),
            peers: w
                .peers
                .values()
                .map(|p| {
                    (
                        p.public_key,
                        ObservedPeer {
                            public_key: p.public_key,
                            preshared_key: Some(p.preshared_key.fingerprint()),
                            endpoint: Some(p.endpoint),
                            allowed_ips: p.allowed_ips.clone(),
                            keepalive: p.keepalive,
                            last_handshake: None,
                        },
                    )
                })
                .collect(),
            routes: w.routes.clone(),
        });
        Ok(Observed {
            states,
            policies: s.policies.clone(),
            filters: s.filters.clone(),
            wg,
        })
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), ApplyError> {
        let mut s = self.state();
        for (i, op) in ops.iter().enumerate() {
            Self::apply_one(&mut s, op).map_err(|source| ApplyError {
                applied: i,
                op: op.to_string(),
                kind: op.kind(),
                source,
            })?;
        }
        Ok(())
    }
}
