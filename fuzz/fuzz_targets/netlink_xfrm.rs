//! An XFRM reply datagram: state and policy dumps, as node-shim decodes and parses them
//! (`kernel::replies::xfrm`). The first 8 bytes are the request's sequence number and the
//! reqid node-shim filters on; the rest is the datagram.
#![no_main]

use keyd_fuzz::contained_panics;
use keyd_node_shim::kernel::replies;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: contained_panics(), |data: &[u8]| {
    let Some((head, datagram)) = data.split_first_chunk::<8>() else {
        return;
    };
    let seq = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let reqid = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let _ = replies::xfrm(datagram, seq, reqid);
});
