//! Kernel access behind one narrow trait: [`Kernel::observe`] what node-shim owns, [`Kernel::apply`]
//! changes. [`fake::FakeKernel`] is the stateful stand-in for unit tests; [`netlink::NetlinkKernel`]
//! is the real thing (XFRM and rtnetlink over netlink, WireGuard over generic netlink or boringtun).
//!
//! All netlink code lives here. It needs no `unsafe`: the sockets come from `netlink-sys` and the
//! TUN device from boringtun, so the crate-wide `forbid(unsafe_code)` holds here too.

use std::io;

use crate::model::{Observed, Op};

pub mod ebpf;
pub mod fake;
pub mod netlink;
mod nl;
pub mod replies;
mod route;
mod tc;
mod userspace;
mod wireguard;
mod xfrm;

pub trait Kernel: Send {
    /// What node-shim owns in the kernel now. Objects that are not its own are not reported.
    fn observe(&mut self) -> Result<Observed, KernelError>;

    /// Applies `ops` in order and stops at the first failure.
    fn apply(&mut self, ops: &[Op]) -> Result<(), ApplyError>;
}

impl<K: Kernel + ?Sized> Kernel for Box<K> {
    fn observe(&mut self) -> Result<Observed, KernelError> {
        (**self).observe()
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), ApplyError> {
        (**self).apply(ops)
    }
}

/// Why a kernel call failed. Messages name the object (addresses, SPIs, device names), never key
/// bytes: netlink error replies are requested without the echoed request (`NETLINK_CAP_ACK`), and
/// only their error code is kept.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{what} failed")]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot decode the kernel's reply to {what}")]
    Decode { what: &'static str },
    #[error("{0}")]
    Unsupported(String),
    #[error("userspace WireGuard: {what} failed")]
    Userspace {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl KernelError {
    pub fn netlink(what: impl Into<String>, errno: i32) -> Self {
        KernelError::Netlink {
            what: what.into(),
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// The OS error number, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Netlink { source, .. } | KernelError::Userspace { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// The first op of a batch that failed; the ones before it were applied.
#[derive(Debug, thiserror::Error)]
#[error("{op} (after {applied} applied op(s))")]
pub struct ApplyError {
    pub applied: usize,
    /// The failed op, as [`Op`]'s `Display` (no key material).
    pub op: String,
    pub kind: &'static str,
    #[source]
    pub source: KernelError,
}
