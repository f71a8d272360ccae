//! An audit export file given to `keyctl audit verify`: `keyd::audit::verify` over its bytes,
//! trusting the key in the file's header (a caller's key is compared with that one first).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = keyd::audit::verify(data, None);
});
