//! What several fuzz targets share.

/// node-shim contains panics of the netlink crates on malformed messages (a decode error, see
/// `kernel::nl`), so the hook must not abort as libfuzzer-sys's does. It prints the first few
/// (one line each); a panic nothing catches still reaches libfuzzer-sys's `catch_unwind`, which
/// aborts: a crash, with its input saved.
pub fn contained_panics() {
    static SHOWN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::panic::set_hook(Box::new(|info| {
        if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
            eprintln!("panic: {info}");
        }
    }));
}
