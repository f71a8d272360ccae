//! An rtnetlink reply datagram: link, address, route and tc filter dumps, as node-shim decodes
//! and parses them (`kernel::replies::rtnetlink`). The first 8 bytes are the request's sequence
//! number and the interface index node-shim asked about; the rest is the datagram.
#![no_main]

use keyd_fuzz::contained_panics;
use keyd_node_shim::kernel::replies;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: contained_panics(), |data: &[u8]| {
    let Some((head, datagram)) = data.split_first_chunk::<8>() else {
        return;
    };
    let seq = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let oif = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    // node-shim's filter priority by default (0x6b65, "ke") and the seeds' underlay address.
    let addr = std::net::IpAddr::from([192, 0, 2, 1]);
    let _ = replies::rtnetlink(datagram, seq, 0x6b65, oif, addr);
});
