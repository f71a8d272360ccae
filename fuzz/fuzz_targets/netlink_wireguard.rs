//! A generic netlink reply datagram: the WireGuard family lookup and device dump, as node-shim
//! decodes and parses them (`kernel::replies::wireguard`). The first 4 bytes are the request's
//! sequence number; the rest is the datagram.
#![no_main]

use keyd_fuzz::contained_panics;
use keyd_node_shim::kernel::replies;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: contained_panics(), |data: &[u8]| {
    let Some((head, datagram)) = data.split_first_chunk::<4>() else {
        return;
    };
    let _ = replies::wireguard(datagram, u32::from_le_bytes(*head));
});
