//! The real kernel: [`Kernel`] over netlink sockets (and boringtun for userspace WireGuard).

use netlink_packet_route::link::InfoKind;
use netlink_packet_xfrm::XfrmMessage;
use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE, NETLINK_XFRM};

use crate::config::{Config, Mode, WgBackend};
use crate::kernel::nl::NlSocket;
use crate::kernel::userspace::Userspace;
use crate::kernel::{ApplyError, Kernel, KernelError, route, tc, wireguard, xfrm};
use crate::model::{MarkFilter, Observed, ObservedWg, Op, RouteSpec};

/// Which WireGuard implementation carries the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgImpl {
    Kernel,
    Userspace,
}

impl WgImpl {
    pub fn as_str(self) -> &'static str {
        match self {
            WgImpl::Kernel => "kernel",
            WgImpl::Userspace => "userspace",
        }
    }
}

enum Wg {
    Kernel { sock: NlSocket, family: u16 },
    Userspace(Userspace),
}

pub struct NetlinkKernel {
    mode: Mode,
    route: NlSocket,
    xfrm: Option<NlSocket>,
    wg: Option<Wg>,
    wg_device: String,
    reqid: u32,
    filter_prio: u16,
    underlay: Option<u32>,
}

impl std::fmt::Debug for NetlinkKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkKernel")
            .field("mode", &self.mode)
            .field("wg", &self.wg_impl())
            .finish_non_exhaustive()
    }
}

fn open(protocol: isize, what: &'static str) -> Result<NlSocket, KernelError> {
    NlSocket::open_for(protocol, what)
}

impl NetlinkKernel {
    /// Opens the sockets `config.mode` needs and picks the WireGuard implementation. Touches
    /// nothing but a clsact qdisc on the underlay device (IPsec mode), which is idempotent.
    pub fn open(config: &Config) -> Result<Self, KernelError> {
        let mut route = open(NETLINK_ROUTE, "route")?;
        let mut k = NetlinkKernel {
            mode: config.mode,
            route: open(NETLINK_ROUTE, "route")?,
            xfrm: None,
            wg: None,
            wg_device: config.wireguard.device.clone(),
            reqid: config.ipsec.reqid,
            filter_prio: config.ipsec.filter_priority,
            underlay: None,
        };
        match config.mode {
            Mode::Ipsec => {
                k.xfrm = Some(open(NETLINK_XFRM, "xfrm")?);
                let underlay = match &config.ipsec.underlay_device {
                    Some(name) => route::link_by_name(&mut route, name)?
                        .map(|(i, _)| i)
                        .ok_or_else(|| {
                            KernelError::Unsupported(format!(
                                "ipsec.underlay_device {name:?} does not exist"
                            ))
                        })?,
                    None => route::link_with_address(&mut route, config.endpoint)?.ok_or_else(
                        || {
                            KernelError::Unsupported(format!(
                                "no device holds this node's endpoint {}; set ipsec.underlay_device",
                                config.endpoint
                            ))
                        },
                    )?,
                };
                tc::ensure_clsact(&mut route, underlay)?;
                k.underlay = Some(underlay);
            }
            Mode::Wireguard => {
                let mut genl = open(NETLINK_GENERIC, "generic")?;
                let family = match config.wireguard.backend {
                    WgBackend::Userspace => None,
                    WgBackend::Kernel | WgBackend::Auto => wireguard::family_id(&mut genl)?,
                };
                k.wg = Some(match (family, config.wireguard.backend) {
                    (Some(family), _) => Wg::Kernel { sock: genl, family },
                    (None, WgBackend::Kernel) => {
                        return Err(KernelError::Unsupported(
                            "wireguard.backend is \"kernel\" but this kernel has no WireGuard"
                                .into(),
                        ));
                    }
                    (None, _) => Wg::Userspace(Userspace::new(
                        &config.wireguard.device,
                        std::fs::File::open("/proc/thread-self/ns/net").ok(),
                    )),
                });
            }
        }
        k.route = route;
        Ok(k)
    }

    pub fn wg_impl(&self) -> Option<WgImpl> {
        self.wg.as_ref().map(|w| match w {
            Wg::Kernel { .. } => WgImpl::Kernel,
            Wg::Userspace(_) => WgImpl::Userspace,
        })
    }

    /// Deletes the WireGuard device (tests and benchmarks; node-shim itself never does).
    pub fn delete_wg_device(&mut self) -> Result<(), KernelError> {
        if let Some(Wg::Userspace(u)) = &mut self.wg {
            u.stop();
            return Ok(());
        }
        if let Some((idx, _)) = route::link_by_name(&mut self.route, &self.wg_device)? {
            route::delete_link(&mut self.route, idx)?;
        }
        Ok(())
    }

    fn wg_index(&mut self) -> Result<u32, KernelError> {
        route::link_by_name(&mut self.route, &self.wg_device)?
            .map(|(i, _)| i)
            .ok_or_else(|| KernelError::netlink(format!("finding {}", self.wg_device), 19))
    }

    fn xfrm_sock(&mut self) -> Result<&mut NlSocket, KernelError> {
        self.xfrm
            .as_mut()
            .ok_or_else(|| KernelError::Unsupported("XFRM is used only in IPsec mode".into()))
    }

    fn observe_wg(&mut self) -> Result<Option<ObservedWg>, KernelError> {
        let Some(link) = route::link_details(&mut self.route, &self.wg_device)? else {
            return Ok(None);
        };
        let (index, up) = (link.index, link.up);
        let key_epoch = link.alias.as_deref().and_then(route::parse_epoch_alias);
        let routes = route::routes(&mut self.route, index)?;
        let device = self.wg_device.clone();
        match &mut self.wg {
            Some(Wg::Kernel { sock, family }) => {
                let d = wireguard::get_device(sock, *family, &device)?;
                Ok(Some(ObservedWg {
                    up,
                    private_key: d.private_key,
                    public_key: d.public_key,
                    listen_port: d.listen_port,
                    fwmark: d.fwmark,
                    key_epoch,
                    peers: d.peers,
                    routes,
                }))
            }
            Some(Wg::Userspace(u)) => {
                if !u.running() {
                    // A TUN device of that name that boringtun in this process does not drive
                    // (left by someone else): not ours to adopt.
                    return Err(KernelError::Unsupported(format!(
                        "device {device} exists but is not a WireGuard device this process runs"
                    )));
                }
                let d = u.get()?;
                Ok(Some(ObservedWg {
                    up,
                    private_key: None,
                    public_key: d.public_key,
                    listen_port: d.listen_port,
                    fwmark: d.fwmark,
                    key_epoch,
                    peers: d.peers,
                    routes,
                }))
            }
            None => Ok(None),
        }
    }

    fn apply_run(&mut self, run: &[Op]) -> Result<(), (usize, KernelError)> {
        let first = &run[0];
        let at = |i: usize| move |e: KernelError| (i, e);
        let per_item = |results: Vec<Result<(), i32>>, what: &dyn Fn(usize) -> String| {
            for (i, r) in results.into_iter().enumerate() {
                if let Err(errno) = r {
                    return Err((i, KernelError::netlink(what(i), errno)));
                }
            }
            Ok(())
        };
        match first {
            Op::WgEnsureDevice => {
                let device = self.wg_device.clone();
                match &mut self.wg {
                    Some(Wg::Kernel { .. }) => {
                        if route::link_by_name(&mut self.route, &device)
                            .map_err(at(0))?
                            .is_none()
                        {
                            route::create_link(&mut self.route, &device, InfoKind::Wireguard)
                                .map_err(at(0))?;
                        }
                    }
                    Some(Wg::Userspace(u)) => u.start().map_err(at(0))?,
                    None => {
                        return Err((0, KernelError::Unsupported("not in WireGuard mode".into())));
                    }
                }
                let idx = self.wg_index().map_err(at(0))?;
                route::set_up(&mut self.route, idx).map_err(at(0))
            }
            Op::WgConfigure(c) => {
                let device = self.wg_device.clone();
                match &mut self.wg {
                    Some(Wg::Kernel { sock, family }) => {
                        wireguard::configure(sock, *family, &device, c).map_err(at(0))?
                    }
                    Some(Wg::Userspace(u)) => u.configure(c).map_err(at(0))?,
                    None => {
                        return Err((0, KernelError::Unsupported("not in WireGuard mode".into())));
                    }
                }
                // The key first, then the epoch it answers.
                let idx = self.wg_index().map_err(at(0))?;
                route::set_alias(&mut self.route, idx, &route::epoch_alias(c.key_epoch))
                    .map_err(at(0))
            }
            Op::WgUpsertPeers(peers) => {
                let device = self.wg_device.clone();
                match &mut self.wg {
                    Some(Wg::Kernel { sock, family }) => {
                        wireguard::upsert_peers(sock, *family, &device, peers).map_err(at(0))
                    }
                    Some(Wg::Userspace(u)) => u.upsert_peers(peers).map_err(at(0)),
                    None => Err((0, KernelError::Unsupported("not in WireGuard mode".into()))),
                }
            }
            Op::WgRemovePeers(keys) => {
                let device = self.wg_device.clone();
                match &mut self.wg {
                    Some(Wg::Kernel { sock, family }) => {
                        wireguard::remove_peers(sock, *family, &device, keys).map_err(at(0))
                    }
                    Some(Wg::Userspace(u)) => u.remove_peers(keys).map_err(at(0)),
                    None => Err((0, KernelError::Unsupported("not in WireGuard mode".into()))),
                }
            }
            Op::RouteAdd(_) | Op::RouteDel(_) => {
                let add = matches!(first, Op::RouteAdd(_));
                let specs: Vec<RouteSpec> = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::RouteAdd(r) | Op::RouteDel(r) => Some(*r),
                        _ => None,
                    })
                    .collect();
                let idx = self.wg_index().map_err(at(0))?;
                let results =
                    route::change_routes(&mut self.route, &specs, idx, add).map_err(at(0))?;
                per_item(results, &|i| run[i].to_string())
            }
            Op::FilterSet(_) | Op::FilterDel(_) => {
                let set = matches!(first, Op::FilterSet(_));
                let filters: Vec<MarkFilter> = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::FilterSet(f) | Op::FilterDel(f) => Some(*f),
                        _ => None,
                    })
                    .collect();
                let underlay = self.underlay.ok_or_else(|| {
                    (
                        0,
                        KernelError::Unsupported("no underlay device (not in IPsec mode)".into()),
                    )
                })?;
                if set {
                    tc::set_filters(&mut self.route, underlay, self.filter_prio, &filters)
                } else {
                    tc::del_filters(&mut self.route, underlay, self.filter_prio, &filters, false)
                }
                .map_err(at(0))
            }
            Op::XfrmStateAdd(_) => {
                let mut msgs = Vec::with_capacity(run.len());
                for (i, op) in run.iter().enumerate() {
                    if let Op::XfrmStateAdd(spec) = op {
                        msgs.push(xfrm::state_add_msg(spec).map_err(at(i))?);
                    }
                }
                let flags = xfrm::STATE_ADD_FLAGS;
                self.xfrm_batch(run, "adding XFRM states", msgs, flags, xfrm::scrub)
            }
            Op::XfrmStateDel(_) => {
                let msgs = xfrm_msgs(run, |op| match op {
                    Op::XfrmStateDel(id) => Some(xfrm::state_del_msg(id)),
                    _ => None,
                });
                self.xfrm_batch(run, "deleting XFRM states", msgs, 0, |_| {})
            }
            Op::XfrmPolicySet(_) => {
                let msgs = xfrm_msgs(run, |op| match op {
                    Op::XfrmPolicySet(spec) => Some(xfrm::policy_set_msg(spec)),
                    _ => None,
                });
                let flags = xfrm::POLICY_SET_FLAGS;
                self.xfrm_batch(run, "setting XFRM policies", msgs, flags, |_| {})
            }
            Op::XfrmPolicyDel(_) => {
                let msgs = xfrm_msgs(run, |op| match op {
                    Op::XfrmPolicyDel(id) => Some(xfrm::policy_del_msg(id)),
                    _ => None,
                });
                self.xfrm_batch(run, "deleting XFRM policies", msgs, 0, |_| {})
            }
        }
    }

    /// Sends a run of XFRM messages (one per op of `run`, in order) as one batch; a refused
    /// message is reported against its op.
    fn xfrm_batch(
        &mut self,
        run: &[Op],
        what: &'static str,
        msgs: Vec<XfrmMessage>,
        flags: u16,
        scrub: impl Fn(&mut XfrmMessage),
    ) -> Result<(), (usize, KernelError)> {
        let sock = self.xfrm_sock().map_err(|e| (0, e))?;
        let results = sock.batch(what, msgs, flags, scrub).map_err(|e| (0, e))?;
        for (i, r) in results.into_iter().enumerate() {
            if let Err(errno) = r {
                return Err((i, KernelError::netlink(run[i].to_string(), errno)));
            }
        }
        Ok(())
    }
}

/// The messages for a run of one kind of XFRM op.
fn xfrm_msgs(run: &[Op], msg: impl Fn(&Op) -> Option<XfrmMessage>) -> Vec<XfrmMessage> {
    run.iter().filter_map(msg).collect()
}

/// Ops that go to the kernel together when consecutive.
fn batchable(a: &Op, b: &Op) -> bool {
    matches!(
        (a, b),
        (Op::RouteAdd(_), Op::RouteAdd(_))
            | (Op::RouteDel(_), Op::RouteDel(_))
            | (Op::FilterSet(_), Op::FilterSet(_))
            | (Op::FilterDel(_), Op::FilterDel(_))
            | (Op::XfrmStateAdd(_), Op::XfrmStateAdd(_))
            | (Op::XfrmStateDel(_), Op::XfrmStateDel(_))
            | (Op::XfrmPolicySet(_), Op::XfrmPolicySet(_))
            | (Op::XfrmPolicyDel(_), Op::XfrmPolicyDel(_))
    )
}

impl Kernel for NetlinkKernel {
    fn observe(&mut self) -> Result<Observed, KernelError> {
        let mut o = Observed::default();
        match self.mode {
            Mode::Ipsec => {
                let reqid = self.reqid;
                let sock = self.xfrm_sock()?;
                o.states = xfrm::dump_states(sock, reqid)?;
                o.policies = xfrm::dump_policies(sock, reqid)?;
                if let Some(underlay) = self.underlay {
                    o.filters = tc::dump_filters(&mut self.route, underlay, self.filter_prio)?;
                }
            }
            Mode::Wireguard => o.wg = self.observe_wg()?,
        }
        Ok(o)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), ApplyError> {
        let mut start = 0;
        while start < ops.len() {
            let mut end = start + 1;
            while end < ops.len() && batchable(&ops[start], &ops[end]) {
                end += 1;
            }
            self.apply_run(&ops[start..end])
                .map_err(|(i, source)| ApplyError {
                    applied: start + i,
                    op: ops[start + i].to_string(),
                    kind: ops[start + i].kind(),
                    source,
                })?;
            start = end;
        }
        Ok(())
    }
}
