//! What boringtun's UAPI socket answers `get=1` with, as node-shim reads and parses it
//! (`kernel::replies::uapi`).
#![no_main]

use keyd_node_shim::kernel::replies;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = replies::uapi(data);
});
